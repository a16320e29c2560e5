"""The detector on any image: a trained HW5Net's class and box for each photo given.

    python predict.py --weights runs/demo/ciou/best_model.pt --out_dir PRED photo.jpg photos/

Each image (JPEG or PNG, any size and mode) is prepared as Dataset.py prepares COCO's,
after its EXIF orientation is applied. PRED receives predictions.json (a record per
image, the box in the image's own pixels), an overlay PNG per image, and .overlays.json
(the overlays' names, which later searches leave out). The architecture is read from
history.json beside the weights, else from --width, --n_blocks and --learnable_res.
"""
import argparse
import json
import logging
import os

import cv2
import numpy as np
import torch
from tqdm import tqdm

from checkpoints import load_checkpoint, load_model_state
from Dataset import resize_image
from devices import DEVICE_HELP, autocast, autocast_problem, pick_device
from cli import HelpFormatter, UserError, command, out_dir_problem
from outputs import atomic_write, write_json
from network import ARCHITECTURE, build_model
from utils import CLASS_NAMES, draw_box, order_boxes

log = logging.getLogger("predict")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
BOX_COLOUR = (255, 0, 0)  # RGB, the prediction's colour in the report's figures
OVERLAY_LIST = ".overlays.json"  # every overlay predict.py has written into a folder


def earlier_overlays(folder):
    """The overlay PNGs that earlier predict.py runs wrote into folder (listed in its
    .overlays.json), so that a search does not predict them as photos."""
    try:
        with open(os.path.join(folder, OVERLAY_LIST)) as f:
            return {name for name in json.load(f) if isinstance(name, str)}
    except (OSError, ValueError, TypeError):
        return set()


def find_images(inputs, skip_dir=None):
    """The image files named by inputs, in order: a file as given, a directory's JPEG and
    PNG files (searched recursively, sorted; skip_dir, where the overlays go, and the
    overlays of earlier runs into a searched folder are left out). Raises UserError
    for a path that does not exist."""
    found = []
    skip = os.path.realpath(skip_dir) if skip_dir else None
    for path in inputs:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) != skip)
                overlays = earlier_overlays(root) & set(files)
                if overlays:
                    log.info("%s: %d overlay(s) of an earlier predict.py run left out", root,
                             len(overlays))
                found += [os.path.join(root, f) for f in sorted(files)
                          if f.lower().endswith(IMAGE_EXTENSIONS) and f not in overlays]
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise UserError(f"{path}: no such file or directory")
    return found


def read_image(path):
    """HxWx3 uint8 RGB as a viewer shows the file (EXIF orientation applied; grayscale and
    RGBA become RGB, as Dataset.read_rgb), or None when it is not a decodable image."""
    try:
        raw = np.fromfile(path, np.uint8)
    except OSError:
        return None
    img = cv2.imdecode(raw, cv2.IMREAD_COLOR) if raw.size else None
    return None if img is None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def overlay_names(paths):
    """A unique PNG name per input: the file's name with its extension kept in the stem
    (x.jpg -> x_jpg.png, x.png -> x_png.png), and -2, -3, ... for the same name, in any
    case, found in different folders."""
    names, seen = [], {}
    for path in paths:
        stem, ext = os.path.splitext(os.path.basename(path))
        base = f"{stem}_{ext.lstrip('.').lower()}" if ext else stem
        key = base.lower()  # Cat.jpg and cat.jpg: one file on a case-insensitive disk (macOS)
        seen[key] = seen.get(key, 0) + 1
        names.append(f"{base}.png" if seen[key] == 1 else f"{base}-{seen[key]}.png")
    return names


def architecture(weights, args):
    """(width, n_blocks, learnable_res): from the settings in history.json beside the
    weights when it is there, else from the options (train.py's defaults when unset). An
    option that contradicts the saved settings is an error."""
    history = os.path.join(os.path.dirname(os.path.abspath(weights)), "history.json")
    settings = {}
    if os.path.exists(history):
        try:
            with open(history) as f:
                settings = json.load(f).get("settings", {})
        except (OSError, ValueError):
            log.warning("%s is unreadable: the architecture is taken from the options", history)
    arch = {}
    for key, default in ARCHITECTURE.items():
        given = getattr(args, key)
        if key in settings:
            if given is not None and given != settings[key]:
                raise UserError(f"--{key} {given} contradicts {history}, which says the weights "
                                f"were trained with {key} {settings[key]}")
            arch[key] = settings[key]
        else:
            arch[key] = default if given is None else given
    return arch


def predict_batch(model, images, device, amp=False):
    """(class probabilities [N, 3], boxes [N, 4] ordered, normalised, clipped to [0, 1]) for
    a list of 256x256 RGB uint8 arrays."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(device).float().div_(255.0)
    with torch.no_grad(), autocast(device, amp):
        logits, raw = model(batch)
    return logits.float().softmax(1).cpu(), order_boxes(raw.float()).clamp(0, 1).cpu()


def draw_overlay(img, box, text):
    """The image (RGB) with the box and its label drawn, line and lettering scaled with the
    image so that they read alike on a thumbnail and on a 4000-pixel photo."""
    scale = max(img.shape[:2]) / 512
    return draw_box(img.copy(), box, BOX_COLOUR, text, thickness=max(2, round(2 * scale)),
                    font_scale=max(0.45, 0.45 * scale))


def write_png(img_rgb, path):
    _, buf = cv2.imencode(".png", cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR))
    atomic_write(path, buf.tofile)


def predict(model, paths, out_dir, device, batch_size=32, amp=False, progress=True):
    """Predict every image of paths and write PRED's files. Returns the records; images
    that cannot be decoded are skipped with a warning each."""
    names = overlay_names(paths)
    records, skipped = [], 0
    bar = tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress, leave=False)
    for start in range(0, len(paths), batch_size):
        chunk = []
        for path, name in zip(paths[start:start + batch_size], names[start:start + batch_size]):
            img = read_image(path)
            if img is None:
                log.warning("skipped %s: not a decodable image", path)
                skipped += 1
                continue
            chunk.append((path, name, img))
        if chunk:
            os.makedirs(out_dir, exist_ok=True)  # not before an image has decoded
            probs, boxes = predict_batch(model, [resize_image(img) for _, _, img in chunk], device, amp)
            for (path, name, img), p, box in zip(chunk, probs.tolist(), boxes.tolist()):
                h, w = img.shape[:2]
                xyxy = [box[0] * w, box[1] * h, box[2] * w, box[3] * h]  # the resize undone
                c = int(np.argmax(p))
                records.append({"file": path, "class": CLASS_NAMES[c], "score": p[c],
                                "scores": dict(zip(CLASS_NAMES, p)), "bbox_xyxy": xyxy,
                                "overlay": name})
                write_png(draw_overlay(img, xyxy, f"{CLASS_NAMES[c]} {p[c]:.2f}"),
                          os.path.join(out_dir, name))
        bar.update(min(batch_size, len(paths) - start))
    bar.close()
    if not records:
        raise UserError(f"none of the {len(paths)} file(s) given is a decodable image")
    overlays = earlier_overlays(out_dir) | {r["overlay"] for r in records}
    write_json(sorted(overlays), os.path.join(out_dir, OVERLAY_LIST))
    write_json(records, os.path.join(out_dir, "predictions.json"))
    log.info("%d image(s) predicted into %s%s", len(records), out_dir,
             f"; {skipped} skipped (not decodable)" if skipped else "")
    return records


def load_model(weights, args, device):
    if not os.path.isfile(weights):
        raise UserError(f"--weights {weights}: no such file (a best_model.pt written by "
                        f"train.py or hw5_main.py)")
    arch = architecture(weights, args)
    model = build_model(arch)
    state = load_checkpoint(weights)  # onto the CPU, then moved
    if "model" in state and "optimizer" in state:  # a checkpoint.pt kept with --keep_checkpoint
        log.info("%s is a training checkpoint: its last epoch's weights are used (the best "
                 "epoch's are in best_model.pt beside it)", weights)
        state = state["model"]
    load_model_state(model, state, weights)
    return model.to(device).eval()


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, and directories searched for .jpg, .jpeg and .png files")
    p.add_argument("--weights", required=True,
                   help="a best_model.pt (state_dict) of train.py or hw5_main.py (required)")
    p.add_argument("--out_dir", required=True, help="where predictions.json and the overlays go (required)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for the forward pass")
    for key, default in ARCHITECTURE.items():
        kind = {"action": "store_const", "const": True} if isinstance(default, bool) else {"type": int}
        p.add_argument(f"--{key}", default=None, **kind,
                       help=f"the model's {key}, when no history.json is beside the weights "
                            f"(then default {default}, train.py's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(args):
    if problem := out_dir_problem(args.out_dir):
        raise UserError(problem)
    paths = find_images(args.inputs, skip_dir=args.out_dir)
    if not paths:
        raise UserError(f"no .jpg, .jpeg or .png file in {' '.join(args.inputs)}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, not {args.batch_size}")
    device = pick_device(args.device)
    if args.amp and (problem := autocast_problem(device)):
        raise UserError(f"--amp: {problem}; run without --amp")
    model = load_model(args.weights, args, device)
    return predict(model, paths, args.out_dir, device, args.batch_size, args.amp, not args.quiet)


if __name__ == "__main__":
    command(lambda: main(get_args_parser().parse_args()), log)
