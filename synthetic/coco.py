"""Synthetic COCO: a small COCO-format tree of drawn buses, cats and pizzas.

Users and CI have no COCO, so the whole pipeline is exercised on images this module
draws: real JPEG files in the standard layout, with `instances_*.json` files that
pycocotools reads exactly as it reads the COCO release:

    python -m synthetic.coco --out_dir data/synthetic_coco --n_train 300 --n_val 150
    python Dataset.py --coco_dir data/synthetic_coco --out_dir data/hw5_synthetic

Every case the dataset filter must handle occurs: one dominant object; a dominant
object plus small ones; two dominant objects; none; a large crowd annotation; a large
object of another category; grayscale images (2%).

The drawings carry what tells the classes apart in photos, not only their colour: a
bus is a long box with a row of windows and two wheels (any paint); a cat has ears,
eyes, whiskers and tabby stripes, in a cat's coat colour (black, greys, white, browns);
a pizza is a crust ring round the cheese, cut into slices, with toppings. Objects vary
in size, aspect, position and colour, on backgrounds of gradients, random shapes,
lines and noise.
"""
import argparse
import json
import logging
import math
import os

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from cli import HelpFormatter, UserError, command, out_dir_problem
from outputs import write_text

log = logging.getLogger(__name__)

# Real COCO category ids and names: the three classes plus a few others.
CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 6, "name": "bus", "supercategory": "vehicle"},
    {"id": 17, "name": "cat", "supercategory": "animal"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 59, "name": "pizza", "supercategory": "food"},
    {"id": 62, "name": "chair", "supercategory": "furniture"},
]
TARGET_IDS = (6, 17, 59)
OTHER_IDS = (1, 3, 18, 62)
IMAGE_SIZES = ((640, 480), (480, 640), (500, 375), (640, 427), (427, 640))  # (w, h)

# How often each image case occurs; the filter must keep only "single" and the two
# "single_plus_*" kinds (and "crowd" when it also has a dominant non-crowd object).
CASES = {
    "single": 0.62,
    "single_plus_small": 0.12,
    "single_plus_other_large": 0.05,
    "single_plus_crowd": 0.04,
    "two_dominant": 0.07,
    "none": 0.06,
    "crowd_only": 0.04,
}
GRAYSCALE_FRACTION = 0.02
# A dominant object's box spans this fraction of the image's shorter side. The mask
# areas that follow lie well above the 200*200 threshold, and small ones well below.
DOMINANT_SPAN = (0.45, 0.85)
SMALL_SPAN_PX = (30, 110)
LARGE_MIN_AREA = 46000


def _random_colour(rng, lo=0, hi=256):
    return tuple(int(c) for c in rng.integers(lo, hi, size=3))


def _background(rng, w, h):
    """A cluttered background: a colour gradient, random shapes and noise."""
    c0 = np.array(_random_colour(rng, 40, 220), np.float32)
    c1 = np.array(_random_colour(rng, 40, 220), np.float32)
    t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    img = np.broadcast_to(c0 * (1 - t) + c1 * t, (h, w, 3)).copy()
    img = img.astype(np.uint8)
    for _ in range(int(rng.integers(6, 16))):
        kind = rng.integers(0, 3)
        colour = _random_colour(rng)
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if kind == 0:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(10, 120)), y + int(rng.integers(10, 120))),
                          colour, -1)
        elif kind == 1:
            cv2.circle(img, (x, y), int(rng.integers(5, 60)), colour, -1)
        else:
            cv2.line(img, (x, y), (int(rng.integers(0, w)), int(rng.integers(0, h))), colour,
                     int(rng.integers(1, 6)))
    noise = rng.normal(0.0, 8.0, size=img.shape).astype(np.float32)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def _draw_bus(img, mask, rng, x, y, bw, bh):
    body = _random_colour(rng, 60, 255)
    x2, y2 = x + bw, y + bh
    wheel_r = max(2, int(0.14 * bh))
    body_bottom = y2 - wheel_r
    r = max(1, int(0.08 * min(bw, bh)))
    for m, colour in ((img, body), (mask, 1)):
        cv2.rectangle(m, (x + r, y), (x2 - r, body_bottom), colour, -1)
        cv2.rectangle(m, (x, y + r), (x2, body_bottom - r), colour, -1)
        for cx in (x + r, x2 - r):
            for cy in (y + r, body_bottom - r):
                cv2.circle(m, (cx, cy), r, colour, -1)
    window = _random_colour(rng, 0, 90)
    n_windows = int(rng.integers(3, 7))
    wy1, wy2 = y + int(0.12 * bh), y + int(0.42 * bh)
    step = bw / n_windows
    for i in range(n_windows):
        wx1 = int(x + i * step + 0.15 * step)
        wx2 = int(x + (i + 1) * step - 0.15 * step)
        cv2.rectangle(img, (wx1, wy1), (wx2, wy2), window, -1)
    for cx in (x + int(0.22 * bw), x + int(0.78 * bw)):
        cv2.circle(img, (cx, body_bottom), wheel_r, (20, 20, 20), -1)
        cv2.circle(img, (cx, body_bottom), max(1, wheel_r // 2), (150, 150, 150), -1)
        cv2.circle(mask, (cx, body_bottom), wheel_r, 1, -1)


# Cat coats (BGR): black, greys, white, blue-grey, browns, chocolate; each drawn with jitter.
CAT_COATS = ((25, 25, 25), (70, 70, 75), (130, 130, 135), (225, 225, 230), (150, 130, 120),
             (45, 65, 95), (60, 90, 130), (30, 45, 70))


def _draw_cat(img, mask, rng, x, y, bw, bh):
    coat = np.array(CAT_COATS[int(rng.integers(0, len(CAT_COATS)))], np.int64)
    fur = tuple(int(c) for c in np.clip(coat + rng.integers(-20, 21, size=3), 0, 255))
    head_r = int(0.3 * min(bw, bh))
    hx, hy = x + bw // 2, y + int(0.2 * bh) + head_r // 2 + 1
    ear = np.array([[hx - head_r, hy - head_r // 3], [hx - head_r // 2, y],
                    [hx - head_r // 6, hy - head_r],
                    [hx + head_r // 6, hy - head_r], [hx + head_r // 2, y],
                    [hx + head_r, hy - head_r // 3]], np.int32)
    body_c = (x + bw // 2, y + int(0.7 * bh))
    body_axes = (max(1, bw // 2 - 1), max(1, int(0.3 * bh) - 1))
    for m, colour in ((img, fur), (mask, 1)):
        cv2.ellipse(m, body_c, body_axes, 0, 0, 360, colour, -1)
        cv2.fillPoly(m, [ear[:3]], colour)
        cv2.fillPoly(m, [ear[3:]], colour)
        cv2.circle(m, (hx, hy), head_r, colour, -1)
    # Tabby stripes across the body and whiskers: a cat's own texture, whatever its colour.
    shade = tuple(int(c * 0.55) for c in fur)
    stripe_w = max(1, bw // 40)
    for k in range(int(rng.integers(3, 6))):
        sx = body_c[0] + int((k - 2) * 0.16 * bw)
        cv2.ellipse(img, (sx, body_c[1]), (max(1, bw // 12), max(1, body_axes[1] - 2)), 0, 200, 340,
                    shade, stripe_w)
    eye = _random_colour(rng, 0, 255)
    er = max(1, head_r // 5)
    for ex in (hx - head_r // 2 + er // 2, hx + head_r // 2 - er // 2):
        cv2.circle(img, (ex, hy - head_r // 6), er, eye, -1)
        cv2.circle(img, (ex, hy - head_r // 6), max(1, er // 2), (0, 0, 0), -1)
    nose = (hx, hy + head_r // 4)
    cv2.circle(img, nose, max(1, er // 2), (120, 90, 200), -1)
    for side in (-1, 1):
        for dy in (-1, 0, 1):
            cv2.line(img, (nose[0] + side * er, nose[1]),
                     (nose[0] + side * int(0.9 * head_r), nose[1] + dy * er), (235, 235, 235), 1)


def _draw_pizza(img, mask, rng, x, y, bw, bh):
    crust = (int(rng.integers(20, 80)), int(rng.integers(110, 170)), int(rng.integers(190, 240)))
    cheese = (int(rng.integers(40, 110)), int(rng.integers(170, 230)), int(rng.integers(220, 256)))
    centre = (x + bw // 2, y + bh // 2)
    axes = (max(1, bw // 2), max(1, bh // 2))
    cv2.ellipse(img, centre, axes, 0, 0, 360, crust, -1)
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, -1)
    inner = (max(1, int(axes[0] * 0.85)), max(1, int(axes[1] * 0.85)))
    cv2.ellipse(img, centre, inner, 0, 0, 360, cheese, -1)
    # Cut into slices: lines through the centre, in the crust's colour.
    n_cuts = int(rng.integers(2, 5))
    phase = rng.uniform(0, math.pi)
    for k in range(n_cuts):
        a = phase + k * math.pi / n_cuts
        dx, dy = int(inner[0] * math.cos(a)), int(inner[1] * math.sin(a))
        cv2.line(img, (centre[0] - dx, centre[1] - dy), (centre[0] + dx, centre[1] + dy), crust,
                 max(1, min(bw, bh) // 60))
    topping = _random_colour(rng, 0, 200)
    for _ in range(int(rng.integers(5, 14))):
        a = rng.uniform(0, 2 * math.pi)
        rad = math.sqrt(rng.uniform(0, 0.7))
        tx = int(centre[0] + rad * inner[0] * math.cos(a))
        ty = int(centre[1] + rad * inner[1] * math.sin(a))
        cv2.circle(img, (tx, ty), max(1, int(0.07 * min(bw, bh))), topping, -1)


def _draw_other(img, mask, rng, x, y, bw, bh):
    """A plain object of a category the filter ignores (person, car, dog, chair)."""
    colour = _random_colour(rng)
    pts = np.array([[x + int(rng.uniform(0, 0.3) * bw), y],
                    [x + bw, y + int(rng.uniform(0, 0.3) * bh)],
                    [x + bw - int(rng.uniform(0, 0.3) * bw), y + bh],
                    [x, y + bh - int(rng.uniform(0, 0.3) * bh)]], np.int32)
    cv2.fillPoly(img, [pts], colour)
    cv2.fillPoly(mask, [pts], 1)


DRAW = {6: _draw_bus, 17: _draw_cat, 59: _draw_pizza}


def _place(rng, w, h, span_px, aspect_range):
    """A random box (x, y, bw, bh) inside the image, its longer side span_px long."""
    aspect = rng.uniform(*aspect_range)  # width / height
    if aspect >= 1:
        bw, bh = span_px, span_px / aspect
    else:
        bw, bh = span_px * aspect, span_px
    bw, bh = int(min(bw, w - 4)), int(min(bh, h - 4))
    x = int(rng.integers(1, w - bw - 1))
    y = int(rng.integers(1, h - bh - 1))
    return x, y, bw, bh


ASPECTS = {6: (1.5, 2.6), 17: (0.75, 1.1), 59: (0.8, 1.25)}


def _polygons(mask):
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
    return polys


def _uncompressed_rle(mask):
    """COCO's crowd encoding: run lengths of the column-major mask, starting with 0s."""
    flat = mask.reshape(-1, order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _annotation(mask, category_id, iscrowd, h, w):
    """A COCO annotation from a drawn mask: polygons (or RLE for a crowd), mask area,
    tight bbox; None when the object left too little on the image."""
    if iscrowd:
        segmentation = _uncompressed_rle(mask)
        rle = mask_utils.frPyObjects(segmentation, h, w)
    else:
        segmentation = _polygons(mask)
        if not segmentation:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    # Area and bbox as COCO computes them: from the rasterised segmentation.
    area = float(mask_utils.area(rle))
    if area < 1:
        return None
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    return {"segmentation": segmentation, "area": area, "bbox": bbox,
            "iscrowd": int(iscrowd), "category_id": int(category_id)}


def _objects_for_case(rng, case):
    """[(category_id, size_kind, iscrowd)] for one image case, in drawing order."""
    main = int(rng.choice(TARGET_IDS))
    small = [(int(rng.choice(TARGET_IDS + OTHER_IDS)), "small", False)
             for _ in range(int(rng.integers(1, 4)))]
    if case == "single":
        return [(main, "large", False)]
    if case == "single_plus_small":
        # A second object of the same class, small, is a case the filter must ignore.
        return small + [(main, "small", False), (main, "large", False)]
    if case == "single_plus_other_large":
        return [(int(rng.choice(OTHER_IDS)), "large", False), (main, "large", False)]
    if case == "single_plus_crowd":
        # A crowd of the same class behind the object (a table of pizzas, a bus depot).
        return [(main, "large", True), (main, "large", False)]
    if case == "two_dominant":
        return [(main, "large", False), (int(rng.choice(TARGET_IDS)), "large", False)]
    if case == "none":
        return small
    if case == "crowd_only":
        return [(main, "large", True)] + small[:1]
    raise ValueError(f"unknown case {case!r}")


def _draw_object(img, mask, rng, category_id, iscrowd, box):
    x, y, bw, bh = box
    draw = DRAW.get(category_id, _draw_other)
    if not iscrowd:
        draw(img, mask, rng, x, y, bw, bh)
        return
    # A crowd region: a group of smaller instances covered by one RLE mask.
    for _ in range(int(rng.integers(6, 12))):
        sw, sh = int(bw * rng.uniform(0.3, 0.5)), int(bh * rng.uniform(0.3, 0.5))
        sx = x + int(rng.integers(0, max(1, bw - sw)))
        sy = y + int(rng.integers(0, max(1, bh - sh)))
        draw(img, mask, rng, sx, sy, max(sw, 4), max(sh, 4))


def draw_image(rng, w, h, case):
    """Draw one image; returns (HxWx3 uint8 BGR image, list of annotation dicts)."""
    img = _background(rng, w, h)
    anns = []
    objects = _objects_for_case(rng, case)
    for category_id, size_kind, iscrowd in objects:
        aspect = ASPECTS.get(category_id, (0.6, 1.6))
        if size_kind == "large":
            span = rng.uniform(*DOMINANT_SPAN) * min(w, h) * (1.25 if category_id == 6 else 1.0)
        else:
            span = rng.uniform(*SMALL_SPAN_PX)
        # A large object grows until its mask area clears the threshold with a margin,
        # so each image is the case it was drawn as (areas near 40000 are coco_mini's job).
        for _ in range(12):
            canvas, mask = img.copy(), np.zeros((h, w), np.uint8)
            _draw_object(canvas, mask, rng, category_id, iscrowd, _place(rng, w, h, span, aspect))
            ann = _annotation(mask, category_id, iscrowd, h, w)
            if size_kind == "small" or (ann is not None and ann["area"] > LARGE_MIN_AREA):
                break
            span *= 1.12
        img = canvas
        if ann is not None:
            anns.append(ann)
    return img, anns


def make_split(out_dir, split, year, n_images, seed, first_image_id, first_ann_id):
    """Write `{split}{year}/*.jpg` and return the split's COCO dict."""
    image_dir = os.path.join(out_dir, f"{split}{year}")
    os.makedirs(image_dir, exist_ok=True)
    cases, weights = zip(*CASES.items())
    weights = np.array(weights) / sum(weights)
    images, annotations = [], []
    ann_id = first_ann_id
    split_key = 0 if split == "train" else 1
    for i in range(n_images):
        # One generator per image: the tree is the same for a seed however it is built.
        rng = np.random.default_rng([seed, split_key, i])
        image_id = first_image_id + i
        w, h = IMAGE_SIZES[int(rng.integers(0, len(IMAGE_SIZES)))]
        case = str(rng.choice(cases, p=weights))
        img, anns = draw_image(rng, w, h, case)
        file_name = f"COCO_{split}{year}_{image_id:012d}.jpg"
        if rng.uniform() < GRAYSCALE_FRACTION:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)  # a one-channel JPEG, as COCO has
        path = os.path.join(image_dir, file_name)
        if not cv2.imwrite(path, img, [cv2.IMWRITE_JPEG_QUALITY, 90]):
            raise OSError(f"could not write {path}")
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h,
                       "license": 1, "date_captured": "", "synthetic_case": case})
        for ann in anns:
            ann.update(id=ann_id, image_id=image_id)
            annotations.append(ann)
            ann_id += 1
    return {
        "info": {"description": f"synthetic COCO-format data, seed {seed}", "year": int(year)},
        "licenses": [{"id": 1, "name": "synthetic", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def make_synthetic_coco(out_dir, n_train=300, n_val=150, seed=0, year=2014):
    """Write a COCO-format tree into out_dir: annotations/instances_{train,val}{year}.json,
    train{year}/ and val{year}/. Returns the two COCO dicts."""
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(ann_dir, exist_ok=True)
    result = {}
    next_ann = 1
    for split, n, first_id in (("train", n_train, 1), ("val", n_val, 1_000_000)):
        coco = make_split(out_dir, split, year, n, seed, first_id, next_ann)
        next_ann += len(coco["annotations"])
        path = os.path.join(ann_dir, f"instances_{split}{year}.json")
        write_text(json.dumps(coco), path)
        log.info("synthetic %s%s: %d images, %d annotations -> %s",
                 split, year, n, len(coco["annotations"]), path)
        result[split] = coco
    return result


def slice_of_coco(src, dst, n_images):
    """A COCO tree at dst of every k-th image of each split of the tree at src (n_images:
    {"train": n, "val": n}), so that the class mix is kept; its images are linked, not copied."""
    for split, n in n_images.items():
        with open(os.path.join(src, "annotations", f"instances_{split}2014.json")) as f:
            coco = json.load(f)
        images = sorted(coco["images"], key=lambda im: im["id"])
        images = images[::max(1, len(images) // n)][:n]
        ids = {im["id"] for im in images}
        coco.update(images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
        os.makedirs(os.path.join(dst, "annotations"), exist_ok=True)
        write_text(json.dumps(coco), os.path.join(dst, "annotations", f"instances_{split}2014.json"))
        os.symlink(os.path.join(os.path.abspath(src), f"{split}2014"), os.path.join(dst, f"{split}2014"))
    return dst


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--out_dir", required=True, help="where the COCO-format tree goes (required)")
    p.add_argument("--n_train", type=int, default=300, help="train images")
    p.add_argument("--n_val", type=int, default=150, help="val images")
    p.add_argument("--seed", type=int, default=0, help="the tree's seed")
    p.add_argument("--year", type=int, default=2014, help="COCO release year in the file names")
    return p


def main(args):
    if problem := out_dir_problem(args.out_dir):
        raise UserError(problem)
    make_synthetic_coco(args.out_dir, args.n_train, args.n_val, args.seed, args.year)
    log.info("synthetic COCO tree in %s; build with: python Dataset.py --coco_dir %s --out_dir DATA%s",
             args.out_dir, args.out_dir, "" if args.year == 2014 else f" --year {args.year}")


if __name__ == "__main__":
    command(lambda: main(get_args_parser().parse_args()), log)
