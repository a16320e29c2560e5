"""COCO -> 256x256 single-dominant-object dataset (report Section 2), and MyCOCODataset.

    python Dataset.py --coco_dir /data/coco --out_dir data/hw5 --workers 8

(`python -m synthetic.coco` draws a COCO-format tree where there is no COCO.) An image
is kept when, among its non-crowd bus/cat/pizza annotations, exactly one has COCO
`area` > 200*200. DATA then holds train_data/ and test_data/ (256x256 JPEGs named
as in COCO), train_data.pkl, test_data.pkl, inv_map.pkl and sample_images.png (Fig. 2).
"""
import argparse
import contextlib
import copy
import glob
import io
import json
import logging
import math
import os
import pickle
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from tqdm import tqdm

from cli import HelpFormatter, UserError, command, out_dir_problem
from devices import usable_cpus
from outputs import atomic_write, write_json
from utils import CLASS_NAMES, COCO_IDS, IMAGE_SIZE, draw_box, pyplot, save_figure

log = logging.getLogger("Dataset")

MIN_AREA = 200 * 200  # pycocotools' areaRng is strict: an area of exactly 40000 is not dominant
INV_MAP = {cid: i for i, cid in enumerate(COCO_IDS)}  # COCO id -> class index
# Decode without EXIF rotation: COCO boxes refer to the stored pixels.
IMREAD_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
SPLITS = (("train", "train_data"), ("val", "test_data"))  # COCO split -> our folder


class DatasetError(UserError):
    """Bad input found before any work: the message names the path and what was expected."""


# ---------------------------------------------------------------------------------
# Locating and reading a COCO tree
# ---------------------------------------------------------------------------------
def expected_layout(coco_dir, year):
    return (f"expected {coco_dir}/annotations/instances_train{year}.json, "
            f"{coco_dir}/annotations/instances_val{year}.json, {coco_dir}/train{year}/ and "
            f"{coco_dir}/val{year}/ (or the report's annotations{year}/ and test{year}/)")


def _first_existing(paths):
    return next((p for p in paths if os.path.exists(p)), None)


def _years_present(coco_dir):
    """The years of the instances_train{year}.json files under annotations*/."""
    found = glob.glob(os.path.join(coco_dir, "annotations*", "instances_train*.json"))
    return sorted({os.path.basename(p)[len("instances_train"):-len(".json")] for p in found})


def resolve_coco_layout(coco_dir, year):
    """{'train': (annotation json, image dir), 'val': (...)} for a COCO tree, accepting
    the standard layout and the report's (annotations{year}/, test{year}/ for val)."""
    if not os.path.isdir(coco_dir):
        raise DatasetError(f"COCO directory not found: {coco_dir}; {expected_layout(coco_dir, year)}")
    layout = {}
    for split, image_dirs in (("train", [f"train{year}"]), ("val", [f"val{year}", f"test{year}"])):
        ann = _first_existing(os.path.join(coco_dir, d, f"instances_{split}{year}.json")
                              for d in ("annotations", f"annotations{year}"))
        if ann is None:
            found = _years_present(coco_dir)
            hint = f"; this tree has year {' and '.join(found)}: pass --year {found[0]}" if found else ""
            raise DatasetError(f"missing annotation file instances_{split}{year}.json under "
                               f"{coco_dir}{hint}; {expected_layout(coco_dir, year)}")
        image_dir = _first_existing(os.path.join(coco_dir, d) for d in image_dirs)
        if image_dir is None or not os.path.isdir(image_dir):
            raise DatasetError(f"missing image directory {os.path.join(coco_dir, image_dirs[0])}; "
                               f"{expected_layout(coco_dir, year)}")
        layout[split] = (ann, image_dir)
    return layout


def load_coco(path):
    """A pycocotools COCO object, or a DatasetError naming the file when it is not a
    readable COCO instances JSON."""
    try:
        with open(path) as f:
            dataset = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e}); expected a COCO instances file") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from None
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(dataset, dict) or not isinstance(dataset.get(k), list)]
    if missing:
        raise DatasetError(f"{path}: not a COCO instances file (no list {', '.join(missing)}); "
                           f"expected keys images, annotations, categories")
    cat_ids = {c.get("id") for c in dataset["categories"]}
    absent = [cid for cid in COCO_IDS if cid not in cat_ids]
    if absent:
        raise DatasetError(f"{path}: categories lack COCO id(s) {absent}; expected bus (6), "
                           f"cat (17) and pizza (59)")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            coco.createIndex()
        except (KeyError, TypeError) as e:
            raise DatasetError(f"{path}: malformed COCO record ({e!r} missing or wrong type)") from None
    return coco


# ---------------------------------------------------------------------------------
# The dataset rule
# ---------------------------------------------------------------------------------
def dominant_annotation(coco, image_id):
    """(annotation, reason): the image's one non-crowd bus/cat/pizza annotation with
    area > 40000, or (None, 'no dominant object' | 'several dominant objects')."""
    ann_ids = coco.getAnnIds(imgIds=[image_id], catIds=list(COCO_IDS), iscrowd=False,
                             areaRng=[MIN_AREA, math.inf])
    if len(ann_ids) == 1:
        return coco.loadAnns(ann_ids)[0], None
    return None, "no dominant object" if not ann_ids else "several dominant objects"


def select_images(coco):
    """Candidates (image record, annotation) and a Counter of rejection reasons, over
    the images that hold any bus, cat or pizza annotation, in image-id order."""
    image_ids = sorted(set().union(*(coco.getImgIds(catIds=[c]) for c in COCO_IDS)))
    kept, rejected = [], Counter()
    for image_id in image_ids:
        ann, reason = dominant_annotation(coco, image_id)
        if ann is None:
            rejected[reason] += 1
        else:
            kept.append((coco.imgs[image_id], ann))
    return kept, rejected


def scale_bbox(bbox, width, height, size=IMAGE_SIZE):
    """COCO [x, y, w, h] in original pixels -> [x, y, w, h] in size x size pixels."""
    sx, sy = size / width, size / height
    x, y, w, h = bbox
    return [x * sx, y * sy, w * sx, h * sy]


# ---------------------------------------------------------------------------------
# Image processing (runs in worker processes)
# ---------------------------------------------------------------------------------
def read_rgb(path):
    """HxWx3 uint8 RGB, or None when the file is missing or cannot be decoded. Grayscale,
    CMYK and palette images come out as 3-channel RGB; EXIF rotation is not applied."""
    img = cv2.imread(path, IMREAD_FLAGS)
    if img is None:
        return None
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resize_image(img, size=IMAGE_SIZE):
    """Anti-aliased resize to size x size: area averaging along an axis that shrinks,
    bilinear along one that grows (a 640x240 image takes two passes, shrinking first)."""
    h, w = img.shape[:2]
    if w >= size and h >= size:
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    if w > size:
        img = cv2.resize(img, (size, h), interpolation=cv2.INTER_AREA)
    elif h > size:
        img = cv2.resize(img, (w, size), interpolation=cv2.INTER_AREA)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)


def process_image(task):
    """Read, check, resize and write one image. task = (src, dst, width, height,
    jpeg_quality); returns (dst, None) or (src, reason)."""
    src, dst, width, height, quality = task
    if not os.path.exists(src):
        return src, "missing on disk"
    # imread of a truncated JPEG may still return an image (libjpeg pads it); insist on
    # the end-of-image marker so a cut-off download is caught.
    try:
        with open(src, "rb") as f:
            raw = f.read()
    except OSError as e:
        return src, f"unreadable ({e.strerror})"
    if raw[:2] == b"\xff\xd8" and raw.rfind(b"\xff\xd9") < len(raw) - 4096:
        return src, "truncated JPEG (no end-of-image marker)"
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), IMREAD_FLAGS)
    if img is None:
        return src, "cannot be decoded"
    if img.shape[1] != width or img.shape[0] != height:
        return src, f"size {img.shape[1]}x{img.shape[0]} differs from the annotation's {width}x{height}"
    out = resize_image(img)
    ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        return src, "cannot be encoded"
    with open(dst, "wb") as f:
        f.write(buf.tobytes())
    return dst, None


def _init_worker():
    cv2.setNumThreads(1)  # one process per core: no nested threading


# ---------------------------------------------------------------------------------
# Building a split
# ---------------------------------------------------------------------------------
def _atomic_pickle(obj, path):
    def write(tmp):
        with open(tmp, "wb") as f:
            pickle.dump(obj, f)
    atomic_write(path, write)


def _replace_dir(tmp_dir, final_dir):
    """Move a finished directory into place; an older one is removed only after."""
    old = final_dir + ".old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(final_dir):
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if os.path.exists(old):
        shutil.rmtree(old)


def build_split(coco, image_dir, out_dir, folder, workers=1, jpeg_quality=95, progress=True):
    """Filter one COCO split, write folder/ and folder.pkl into out_dir atomically.
    Returns (records dict, summary dict)."""
    candidates, rejected = select_images(coco)
    considered = len(candidates) + sum(rejected.values())
    tmp_dir = os.path.join(out_dir, f".{folder}.partial")
    if os.path.exists(tmp_dir):
        shutil.rmtree(tmp_dir)  # left by an interrupted run
    os.makedirs(tmp_dir)
    tasks = [(os.path.join(image_dir, img["file_name"]),
              os.path.join(tmp_dir, img["file_name"]), img["width"], img["height"], jpeg_quality)
             for img, _ in candidates]
    bar = tqdm(total=len(tasks), desc=f"{folder}", unit="img", disable=not progress, leave=False)
    failures = {}
    # spawn, not fork: a forked child inherits the parent's OpenCV/torch thread pools in a
    # broken state and can hang in its first cv2 call.
    workers = min(workers, 1 + len(tasks) // 32)
    pool = get_context("spawn").Pool(workers, initializer=_init_worker) if workers > 1 else None
    with pool or contextlib.nullcontext():
        results = pool.imap_unordered(process_image, tasks, chunksize=16) if pool else map(process_image, tasks)
        for path, reason in results:
            if reason is not None:
                failures[path] = reason
            bar.update(1)
    bar.close()
    for src, reason in sorted(failures.items()):
        log.warning("skipped %s: %s", src, reason)
    records = {}
    for img, ann in candidates:
        src = os.path.join(image_dir, img["file_name"])
        if src in failures:
            continue
        records[img["file_name"]] = {
            "bbox": scale_bbox(ann["bbox"], img["width"], img["height"]),
            "category_id": ann["category_id"],
            "image_id": ann["image_id"],
            "id": ann["id"],
            "area": ann["area"],
            # The original geometry: outputs in the COCO image's own pixels, COCOeval.
            "width": img["width"],
            "height": img["height"],
            "coco_bbox": [float(v) for v in ann["bbox"]],
        }
    if failures:
        rejected["unreadable"] += len(failures)
    _replace_dir(tmp_dir, os.path.join(out_dir, folder))
    _atomic_pickle(records, os.path.join(out_dir, f"{folder}.pkl"))
    per_class = Counter(CLASS_NAMES[INV_MAP[r["category_id"]]] for r in records.values())
    summary = {"kept": len(records), "per_class": {c: per_class.get(c, 0) for c in CLASS_NAMES},
               "rejected": dict(rejected), "considered": considered}
    return records, summary


def build_dataset(coco_dir, out_dir, year=2014, workers=1, jpeg_quality=95, progress=True,
                  figure=True):
    """Build DATA from a COCO tree; returns {'train_data': summary, 'test_data': summary}.
    All input is checked before any image is processed."""
    layout = resolve_coco_layout(coco_dir, year)
    cocos = {split: load_coco(layout[split][0]) for split in layout}
    os.makedirs(out_dir, exist_ok=True)
    summaries = {}
    for split, folder in SPLITS:
        t0 = time.perf_counter()
        _, summary = build_split(cocos[split], layout[split][1], out_dir, folder, workers,
                                 jpeg_quality, progress)
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        summaries[folder] = summary
        log.info("%s: kept %d (%s); rejected %s; %.1fs", folder, summary["kept"],
                 ", ".join(f"{c} {n}" for c, n in summary["per_class"].items()),
                 ", ".join(f"{k}: {v}" for k, v in sorted(summary["rejected"].items())) or "none",
                 summary["seconds"])
        if summary["kept"] == 0:
            raise DatasetError(f"no image of {layout[split][0]} has exactly one bus/cat/pizza "
                               f"annotation with area > {MIN_AREA}: nothing to write for {folder}")
    _atomic_pickle(dict(INV_MAP), os.path.join(out_dir, "inv_map.pkl"))
    write_json({"coco_dir": os.path.abspath(coco_dir), "year": year, **summaries},
               os.path.join(out_dir, "build_summary.json"))
    if figure:
        plot_images(out_dir, os.path.join(out_dir, "sample_images.png"))
    return summaries


# ---------------------------------------------------------------------------------
# Figure 2: sample images
# ---------------------------------------------------------------------------------
def plot_images(data_dir, out_path, per_class=5, seed=0, split="train_data"):
    """Report Fig. 2: per_class images of each class, green box and class name."""
    plt = pyplot()
    with open(os.path.join(data_dir, f"{split}.pkl"), "rb") as f:
        records = pickle.load(f)
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(CLASS_NAMES), per_class, figsize=(2.6 * per_class, 2.8 * len(CLASS_NAMES)))
    axes = np.atleast_2d(axes)
    for row, (cid, name) in enumerate(zip(COCO_IDS, CLASS_NAMES)):
        files = sorted(f for f, r in records.items() if r["category_id"] == cid)
        chosen = rng.choice(files, size=min(per_class, len(files)), replace=False) if files else []
        for col in range(per_class):
            ax = axes[row, col]
            ax.axis("off")
            if col >= len(chosen):
                continue
            img = read_rgb(os.path.join(data_dir, split, chosen[col]))
            x, y, w, h = records[chosen[col]]["bbox"]
            draw_box(img, (x, y, x + w, y + h), (0, 255, 0), name)
            ax.imshow(img)
            ax.set_title(f"{name} {col + 1}", fontsize=10)
    fig.suptitle("Fig. 2 (report): sample images from each class", fontsize=13)
    fig.tight_layout()
    save_figure(fig, out_path)


# ---------------------------------------------------------------------------------
# MyCOCODataset
# ---------------------------------------------------------------------------------
def load_split_records(data_dir, train=True):
    """(records dict, inv_map, image folder) of one split of a built DATA directory."""
    folder = "train_data" if train else "test_data"
    paths = [os.path.join(data_dir, f"{folder}.pkl"), os.path.join(data_dir, "inv_map.pkl")]
    for p in paths + [os.path.join(data_dir, folder)]:
        if not os.path.exists(p):
            raise DatasetError(f"{p} not found; expected a directory built by "
                               f"`python Dataset.py --coco_dir COCO --out_dir {data_dir}`")
    loaded = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                loaded.append(pickle.load(f))
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise DatasetError(f"{p}: not a readable pickle ({e}); rebuild with Dataset.py") from None
    return loaded[0], loaded[1], os.path.join(data_dir, folder)


def hold_out(files, fraction, seed=0):
    """(training files, validation files): a seeded part of a split held out for
    --val_fraction, the same for a DATA and fraction whatever the training seed."""
    order = np.random.default_rng(seed).permutation(len(files))
    n_val = max(1, round(fraction * len(files)))
    return sorted(files[i] for i in order[n_val:]), sorted(files[i] for i in order[:n_val])


def decode_images(paths, workers=None, progress=False):
    """N x 3 x 256 x 256 uint8 tensor of the images at paths (decoded once, in threads:
    cv2 releases the GIL while decoding)."""
    out = torch.empty((len(paths), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)

    def load(i):
        img = read_rgb(paths[i])
        if img is None:
            raise DatasetError(f"{paths[i]}: missing or not a decodable image")
        if img.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
            img = resize_image(img)
        out[i] = torch.from_numpy(img).permute(2, 0, 1)

    workers = workers or min(8, usable_cpus())
    with ThreadPoolExecutor(workers) as pool:
        list(tqdm(pool.map(load, range(len(paths))), total=len(paths), desc="decoding",
                  unit="img", disable=not progress, leave=False))
    return out


class MyCOCODataset(torch.utils.data.Dataset):
    """One split of a built DATA directory.

    Items are {"image": float 3x256x256 in [0, 1], "label": long, "bbox": float
    [x1, y1, x2, y2] / 256}. Every image is decoded once, into a uint8 tensor (0.75 GB
    for COCO's 3.8k training images); training reads it through devices.DeviceBatches.
    """

    def __init__(self, data_dir, train=True, files=None, progress=False):
        records, inv_map, image_dir = load_split_records(data_dir, train)
        self.files = sorted(records) if files is None else list(files)
        unknown = [f for f in self.files if f not in records]
        if unknown:
            raise DatasetError(f"{unknown[0]} is not in {image_dir}.pkl")
        self.data, self.label_map, self.image_dir = records, inv_map, image_dir
        self.images = decode_images([os.path.join(image_dir, f) for f in self.files],
                                    progress=progress)
        self.labels = torch.tensor([inv_map[records[f]["category_id"]] for f in self.files],
                                   dtype=torch.long)
        xywh = torch.tensor([records[f]["bbox"] for f in self.files], dtype=torch.float32)
        xywh = xywh.reshape(-1, 4)
        self.boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1) / IMAGE_SIZE

    def subset(self, files):
        """A dataset of some of these files (a held-out validation split), indexing the
        decoded images: nothing is decoded again."""
        position = {f: i for i, f in enumerate(self.files)}
        missing = [f for f in files if f not in position]
        if missing:
            raise DatasetError(f"{missing[0]} is not in {self.image_dir}.pkl")
        part = copy.copy(self)
        part.files = list(files)
        index = torch.tensor([position[f] for f in files], dtype=torch.long)
        part.images, part.labels, part.boxes = self.images[index], self.labels[index], self.boxes[index]
        return part

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return {"image": self.images[index].float().div_(255.0), "label": self.labels[index],
                "bbox": self.boxes[index]}


def load_splits(data_dir, val_fraction=0.0, progress=False):
    """(train, test, val or None) of DATA; with val_fraction, hold_out's part of the training
    set is the validation split (one decode: both parts index its images)."""
    train_set = MyCOCODataset(data_dir, train=True, progress=progress)
    val_set = None
    if val_fraction:
        train_files, val_files = hold_out(train_set.files, val_fraction)
        train_set, val_set = train_set.subset(train_files), train_set.subset(val_files)
    return train_set, MyCOCODataset(data_dir, train=False, progress=progress), val_set


# ---------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------
def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--coco_dir", required=True,
                   help="COCO tree: annotations/, train{year}/, val{year}/ (required)")
    p.add_argument("--out_dir", required=True, help="where the dataset (DATA) is written (required)")
    p.add_argument("--year", type=int, default=2014, help="COCO release year in the file names")
    p.add_argument("--workers", type=int, default=usable_cpus(),
                   help="processes resizing images (1: in this process)")
    p.add_argument("--jpeg_quality", type=int, default=95, help="JPEG quality of the 256x256 images")
    p.add_argument("--no_figure", action="store_true", help="skip sample_images.png (report Fig. 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(args):
    if problem := out_dir_problem(args.out_dir):
        raise DatasetError(problem)
    summaries = build_dataset(args.coco_dir, args.out_dir, args.year, args.workers,
                              args.jpeg_quality, progress=not args.quiet, figure=not args.no_figure)
    log.info("dataset written to %s", args.out_dir)
    return summaries


if __name__ == "__main__":
    command(lambda: main(get_args_parser().parse_args()), log)
