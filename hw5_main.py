"""The report's experiment (Section 4): HW5Net trained with CIoU and with MSE, compared.

    python hw5_main.py --data_dir data/hw5 --out_dir runs/hw5     # on a dataset built by Dataset.py
    python hw5_main.py --demo --out_dir runs/demo                  # no COCO: synthetic data, 9-14 min on 2 CPU cores

Trains both models (train.py), evaluates the best of each on the training and test
splits, and writes into OUT: ciou/ and mse/ (best_model.pt and history.json; checkpoint.pt
while a model trains), the confusion matrices, prediction grids and training curves of the
report's Figs. 14-20, model_sum.txt, results.json and results.md (the run's numbers
beside the report's, with the mean-box baseline and the settings).
"""
import argparse
import json
import logging
import math
import os
import platform
import re
import sys
import time

import numpy as np
import torch

from Dataset import CLASS_NAMES, DatasetError, MyCOCODataset, build_dataset, has_coco_geometry
from network import count_parameters, model_summary
from train import (DeviceBatches, RunFiles, TrainingError, add_training_args, build_model,
                   check_training_args, load_checkpoint, load_datasets, load_model_state,
                   make_criteria, pick_device, seed_everything, train)
from utils import (box_iou_per_image, coco_ground_truth, coco_metrics, coco_results,
                   confusion_matrix, display_preds, evaluation, plot_cm, plot_history,
                   out_dir_problem, predictions_from_records, prediction_records, write_json,
                   write_text)

log = logging.getLogger("hw5_main")

MODELS = (("ciou", "CIoU"), ("mse", "MSE"))

# Report Section 4 (SPEC.md): accuracy as a fraction, mean IoU.
REPORT = {
    "ciou": {"train": {"accuracy": 0.996, "mean_iou": 0.68}, "test": {"accuracy": 0.889, "mean_iou": 0.61}},
    "mse": {"train": {"accuracy": 0.994, "mean_iou": 0.67}, "test": {"accuracy": 0.896, "mean_iou": 0.57}},
}

# The demo: a synthetic COCO tree small enough for 9 to 14 minutes on 2 CPU cores
# (a --single_backward training step of HW5Net at batch 16 costs 0.6 to 1 s there).
# Each option that is left unset on the command line takes the demo's value with
# --demo and train.py's default (the report's) without.
DEMO_DATA = {"n_train": 720, "n_val": 200, "synthetic_seed": 0}
# The learning rate warmed up over the first epoch, then decayed to 0 along a cosine:
# Adam's first steps at the full rate sent some seeds' runs into a slow start they did
# not recover from in 8 epochs, and 8 short epochs at a constant rate end wherever the
# last epoch's noise leaves them, so the best-epoch rule picked from a curve that still
# swung (README, "What the demo does and gives").
DEMO_TRAINING = {"epochs": 8, "single_backward": True, "lr_schedule": "cosine", "warmup_epochs": 1}
DEMO = {**DEMO_DATA, **DEMO_TRAINING}


def mean_box_baseline(train_boxes, test_boxes):
    """Mean IoU on the test split of one box for every image: the training set's mean
    box. A model that learned nothing about where the object is scores about this."""
    mean_box = train_boxes.float().mean(0, keepdim=True).expand_as(test_boxes)
    return float(box_iou_per_image(mean_box, test_boxes.float()).mean())


# ---------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------
def drawn_with(out_dir):
    """What a demo's data in OUT was drawn with: OUT/demo_data.json ({"n_train", "n_val",
    "synthetic_seed"}), or for an OUT made before that file, the image counts of its
    synthetic COCO tree."""
    try:
        with open(os.path.join(out_dir, "demo_data.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    counts = {}
    for key, split in (("n_train", "train2014"), ("n_val", "val2014")):
        try:
            with open(os.path.join(out_dir, "synthetic_coco", "annotations", f"instances_{split}.json")) as f:
                counts[key] = len(json.load(f)["images"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return counts


def prepare_demo_data(out_dir, args):
    """Generate the synthetic COCO tree and build the dataset inside OUT; an existing
    build is reused (a resumed demo)."""
    from synthetic_coco import make_synthetic_coco
    data_dir = os.path.join(out_dir, "data")
    drawn = {"n_train": args.n_train, "n_val": args.n_val, "synthetic_seed": args.synthetic_seed}
    record = os.path.join(out_dir, "demo_data.json")  # what the data was drawn with
    if os.path.exists(os.path.join(data_dir, "build_summary.json")):
        was = drawn_with(out_dir)
        if was:
            changed = [f"--{k} {was[k]} (now {v})" for k, v in drawn.items() if was.get(k, v) != v]
            if changed:
                raise TrainingError(f"{data_dir} was drawn with " + ", ".join(changed) + "; give the "
                                    f"same options to go on with it, or choose another --out_dir")
        log.info("demo: reusing the dataset in %s", data_dir)
        return data_dir
    coco_dir = os.path.join(out_dir, "synthetic_coco")
    t0 = time.perf_counter()
    make_synthetic_coco(coco_dir, args.n_train, args.n_val, args.synthetic_seed, year=2014)
    log.info("demo: synthetic COCO tree (%d train, %d val images) in %s, %.0fs",
             args.n_train, args.n_val, coco_dir, time.perf_counter() - t0)
    build_dataset(coco_dir, data_dir, year=2014, workers=os.cpu_count() or 1,
                  progress=not args.quiet)
    write_json(drawn, record)
    return data_dir


# ---------------------------------------------------------------------------------
# One model: train, then evaluate its best state on every split
# ---------------------------------------------------------------------------------
def run_model(key, loss_name, datasets, out_dir, args, device):
    """Train the `key` model into OUT/key, reload its best state and evaluate it on every
    split: the metrics, OUT/key/predictions_{split}.json, and with the original geometry
    in DATA, OUT/key/coco_results_{split}.json and COCOeval's metrics. Draws the figures
    from the written predictions. Returns (results per split, history)."""
    train_set, test_set, val_set = datasets
    run_dir = os.path.join(out_dir, key)
    # With --resume, a model that has started continues (or, finished, is only evaluated);
    # one that never started starts.
    args = argparse.Namespace(**{**vars(args), "loss": key,
                                 "resume": args.resume and RunFiles(run_dir).holds_a_run()})
    seed_everything(args.seed)  # both models start from the same seeded weights
    model = build_model(args)
    model, history = train(model, train_set, test_set, run_dir, args, device, val_set,
                           progress=not args.quiet)
    best_path = os.path.join(run_dir, "best_model.pt")
    load_model_state(model, load_checkpoint(best_path), best_path)
    criterion_cls, criterion_box, _ = make_criteria(key)
    splits = {"train": train_set.subset(train_set.files, augment=False), "test": test_set}
    if val_set is not None:
        splits["val"] = val_set
    results = {}
    for split, data in splits.items():
        cm, res = evaluation(model, DeviceBatches(data, args.eval_batch_size, device),
                             criterion_cls, criterion_box, device, order=not args.raw_boxes,
                             amp=args.amp)
        results[split] = {k: v for k, v in res.items() if k != "predictions"}
        results[split]["confusion_matrix"] = cm.tolist()
        predictions = prediction_records(data.files, data.data, res["predictions"])
        write_json(predictions, os.path.join(run_dir, f"predictions_{split}.json"))
        results[split]["coco"] = None
        if has_coco_geometry(data.data):
            detections = coco_results(predictions, data.data)
            write_json(detections, os.path.join(run_dir, f"coco_results_{split}.json"))
            results[split]["coco"] = coco_metrics(coco_ground_truth(data.files, data.data), detections)
        if split != "val":
            draw_split_figures(out_dir, key, loss_name, split, data.images, predictions,
                               history["best_epoch"], args.seed)
    plot_history(history, os.path.join(out_dir, f"{key}_curves.png"), loss_name)
    log.info("%s model (best epoch %s): train accuracy %.3f mIoU %.3f | test accuracy %.3f "
             "mIoU %.3f", loss_name, history["best_epoch"], results["train"]["accuracy"],
             results["train"]["mean_iou"], results["test"]["accuracy"], results["test"]["mean_iou"])
    return results, history


def draw_split_figures(out_dir, key, loss_name, split, images, predictions, best_epoch, seed):
    """The confusion matrix (Figs. 14, 17) and the prediction grid (Figs. 15, 16, 18, 19)
    of one model on one split, from its prediction records alone: the first drawing and
    --redraw go through here."""
    preds = predictions_from_records(predictions)
    cm = confusion_matrix(preds["label"], preds["pred_label"])
    accuracy = int((preds["label"] == preds["pred_label"]).sum()) / len(predictions)
    mean_iou = float(preds["iou"].numpy().mean(dtype=np.float64))
    plot_cm(cm, os.path.join(out_dir, f"{key}_{split}_cm.png"), loss_name, split, accuracy, mean_iou)
    display_preds(images, preds, os.path.join(out_dir, f"{key}_{split}_preds.png"),
                  f"{loss_name} model on {split} data (best epoch {best_epoch}): "
                  f"ground truth green, prediction red", seed=seed)


def find_data_dir(run_dir, given=None, recorded=None):
    """The dataset a run in run_dir was trained on: --data_dir when given; else the one its
    settings record, if it is still there; else a demo's, inside OUT (OUT/data, or beside
    the seed{k}/ folders), which moves with OUT."""
    if given:
        candidates = [given]
    else:
        candidates = [recorded, os.path.join(run_dir, "data"), os.path.join(run_dir, os.pardir, "data")]
    for candidate in candidates:
        if candidate and os.path.exists(os.path.join(candidate, "train_data.pkl")):
            return candidate
    raise TrainingError(f"the dataset of {run_dir} is not at {given or recorded}: give --data_dir "
                        f"DATA, the dataset the run was trained on")


def redraw(out_dir, data_dir=None):
    """Every figure of a finished OUT drawn again from what OUT and DATA hold: each
    model's predictions_{split}.json and history.json, and DATA's 256x256 images. No
    model is run. A --seeds OUT is redrawn seed by seed. Returns the figures' paths."""
    if not os.path.isdir(out_dir):
        raise TrainingError(f"--out_dir {out_dir}: no such directory (an OUT that hw5_main.py wrote)")
    run_dirs = sorted(os.path.join(out_dir, d) for d in os.listdir(out_dir)
                      if d.startswith("seed") and os.path.isdir(os.path.join(out_dir, d, "ciou")))
    drawn = []
    for run_dir in run_dirs or [out_dir]:
        for key, loss_name in MODELS:
            files = RunFiles(os.path.join(run_dir, key))
            if not os.path.exists(files.history):
                raise TrainingError(f"{files.history} is missing: {run_dir} holds no finished "
                                    f"{loss_name} run to redraw")
            history = files.read_history()
            settings = history.get("settings", {})
            data = find_data_dir(run_dir, data_dir, settings.get("data_dir"))
            for split in ("train", "test"):
                path = os.path.join(files.out_dir, f"predictions_{split}.json")
                try:
                    with open(path) as f:
                        predictions = json.load(f)
                except (OSError, ValueError) as e:
                    raise TrainingError(f"{path} is missing or unreadable ({type(e).__name__}); "
                                        f"it is written when the model is evaluated (run "
                                        f"again with --resume)") from None
                images = MyCOCODataset(data, train=split == "train",
                                       files=[r["file_name"] for r in predictions]).images
                draw_split_figures(run_dir, key, loss_name, split, images, predictions,
                                   history["best_epoch"], settings.get("seed", 0))
                drawn += [os.path.join(run_dir, f"{key}_{split}_{kind}.png") for kind in ("cm", "preds")]
            plot_history(history, os.path.join(run_dir, f"{key}_curves.png"), loss_name)
            drawn.append(os.path.join(run_dir, f"{key}_curves.png"))
    return drawn


# ---------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------
def coco_markdown(coco):
    """The COCO detection metrics' table; coco[model][split] is a coco_metrics() dict (or,
    over seeds, its spread: the mean is shown), None where DATA lacks the geometry."""
    def cell(v):
        v = v.get("mean") if isinstance(v, dict) else v
        return "n/a" if v is None else f"{100 * v:.1f}"

    rows = [(key, name, split, c) for key, name in MODELS for split, c in coco[key].items() if c]
    if not rows:
        return []
    lines = ["COCO detection metrics (pycocotools' COCOeval, bbox, in the original images' pixels; "
             "AP in per cent):", "",
             "| model | split | AP | AP50 | AP75 | AP bus | AP cat | AP pizza |",
             "|---|---|---|---|---|---|---|---|"]
    for key, name, split, c in rows:
        per_class = " | ".join(cell((c["per_class"].get(cls) or {}).get("AP")) for cls in CLASS_NAMES)
        lines.append(f"| {name} | {split} | {cell(c['AP'])} | {cell(c['AP50'])} | {cell(c['AP75'])} "
                     f"| {per_class} |")
    return lines + [""]


SETTINGS_SHOWN = ("device", "data_dir", "n_train", "n_test", "n_val", "epochs", "batch_size", "lr",
                  "lr_schedule", "betas", "seed", "boxes", "backward", "augment", "amp",
                  "learnable_res", "torch", "wall_seconds", "earlier_wall_seconds",
                  "n_synthetic_train", "n_synthetic_val", "synthetic_seed")
# What a settings line of results.md counts, where its name alone could mislead.
SETTING_NOTES = {
    "n_train": "images trained on", "n_test": "test images",
    "n_val": "images held out of training for validation, --val_fraction",
    "n_synthetic_train": "synthetic train2014 images drawn, --n_train",
    "n_synthetic_val": "synthetic val2014 images drawn, --n_val",
    "wall_seconds": "the command, start to end; in OUT/seed{k}, that seed's part of it",
    "earlier_wall_seconds": "the earlier commands that wrote these results, before a --resume",
}


def settings_lines(settings, keys):
    return [f"- {k} ({SETTING_NOTES[k]}): {settings[k]}" if k in SETTING_NOTES else f"- {k}: {settings[k]}"
            for k in keys if k in settings]


def results_markdown(results):
    """results.md: the run's table beside the report's, the baseline and the settings."""
    s = results["settings"]
    lines = ["# HW5Net: CIoU vs MSE box loss", ""]
    if s["demo"]:
        lines += ["Demo run on synthetic data (drawn buses, cats and pizzas). The report's "
                  "numbers are for COCO 2014 and are shown for scale only.", ""]
    lines += ["| model | split | accuracy | mean IoU | report accuracy | report mean IoU |",
              "|---|---|---|---|---|---|"]
    for split in ("train", "test"):
        for key, name in MODELS:
            ours, rep = results[key][split], REPORT[key][split]
            lines.append(f"| {name} | {split} | {100 * ours['accuracy']:.1f}% | {ours['mean_iou']:.3f} "
                         f"| {100 * rep['accuracy']:.1f}% | {rep['mean_iou']:.2f} |")
    b = results["baseline"]
    lines += ["", f"Mean-box baseline (the training set's mean box for every test image): "
                  f"test mean IoU {b['mean_box_test_iou']:.3f}.", ""]
    lines += coco_markdown({key: {split: results[key][split].get("coco") for split in
                                  ("train", "val", "test") if split in results[key]}
                            for key, _ in MODELS})
    for key, name in MODELS:
        r = results[key]
        skipped = (f"; {r['skipped_steps']} training steps skipped for a non-finite loss or "
                   f"gradient" if r["skipped_steps"] else "")
        lines.append(f"- {name}: best epoch {r['best_epoch']} of {r['epochs_trained']} "
                     f"(selected on {r['select_on']}); {r['train_seconds']:.0f} s of epochs (training and "
                     f"per-epoch evaluation), {r['save_seconds']:.1f} s writing files ({r['files_written']}: "
                     f"checkpoints and the best model){skipped}")
    lines += ["", "## Settings", ""]
    lines += settings_lines(s, SETTINGS_SHOWN)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------
# Several seeds
# ---------------------------------------------------------------------------------
def spread(values):
    """{"mean", "std", "min", "max"} of numbers over seeds (std: the sample standard
    deviation, ddof 1; 0.0 for one value). Values that are None (a metric a split does
    not have) are left out; None when all are."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def aggregate_numbers(items):
    """The spread of every number in a list of like-shaped dicts (one per seed), nested
    dicts followed; lists (confusion matrices) are left out."""
    out = {}
    for key, first in items[0].items():
        values = [item.get(key) for item in items]
        if isinstance(first, dict):
            out[key] = aggregate_numbers([v if isinstance(v, dict) else {} for v in values])
        elif isinstance(first, (int, float)) and not isinstance(first, bool) or first is None:
            if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
                out[key] = spread(values)
    return out


def aggregate_results(per_seed, wall_seconds):
    """OUT/results.json of a --seeds run: results["aggregate"][model][split][metric] =
    {"mean", "std", "min", "max"} over seeds, for every number a single run's
    results.json carries per split; the best epochs' spread per model; each seed's
    results under results["per_seed"][seed]."""
    seeds = list(per_seed)
    runs = [per_seed[s] for s in seeds]
    first = runs[0]
    aggregate = {}
    for key, _ in MODELS:
        splits = [split for split in ("train", "val", "test") if split in first[key]]
        aggregate[key] = {split: aggregate_numbers([run[key][split] for run in runs]) for split in splits}
        aggregate[key]["best_epoch"] = spread([run[key]["best_epoch"] for run in runs])
    settings = {k: v for k, v in first["settings"].items()
                if k not in ("seed", "wall_seconds", "earlier_wall_seconds")}
    settings.update(seeds=seeds, wall_seconds=wall_seconds)
    return {"seeds": seeds, "aggregate": aggregate, "per_seed": {str(s): per_seed[s] for s in seeds},
            "baseline": first["baseline"], "report": REPORT, "settings": settings}


def seeds_markdown(results):
    """OUT/results.md of a --seeds run: mean ± std (min to max) per model and split beside
    the report's numbers, then a row per seed."""
    s, seeds, agg = results["settings"], results["seeds"], results["aggregate"]
    lines = ["# HW5Net: CIoU vs MSE box loss, over seeds " + ", ".join(map(str, seeds)), ""]
    if s["demo"]:
        lines += ["Demo run on synthetic data (drawn buses, cats and pizzas). The report's "
                  "numbers are for COCO 2014 and are shown for scale only.", ""]
    lines += [f"Mean ± sample std (min to max) over {len(seeds)} training seeds; the data is the "
              f"same for every seed.", "",
              "| model | split | accuracy | mean IoU | report accuracy | report mean IoU |",
              "|---|---|---|---|---|---|"]
    for split in ("train", "val", "test"):
        for key, name in MODELS:
            if split not in agg[key]:
                continue
            a, m = agg[key][split]["accuracy"], agg[key][split]["mean_iou"]
            rep = REPORT[key].get(split)
            report = (f"{100 * rep['accuracy']:.1f}% | {rep['mean_iou']:.2f}" if rep else "| ")
            lines.append(f"| {name} | {split} | {100 * a['mean']:.1f}% ± {100 * a['std']:.1f} "
                         f"({100 * a['min']:.1f} to {100 * a['max']:.1f}) | {m['mean']:.3f} ± "
                         f"{m['std']:.3f} ({m['min']:.3f} to {m['max']:.3f}) | {report} |")
    lines += ["", f"Mean-box baseline (the training set's mean box for every test image): "
                  f"test mean IoU {results['baseline']['mean_box_test_iou']:.3f}.", ""]
    lines += coco_markdown({key: {split: agg[key][split].get("coco") for split in ("train", "val", "test")
                                  if split in agg[key]} for key, _ in MODELS})
    lines += ["## Each seed", "",
              "| seed | model | best epoch | train accuracy | train mean IoU | test accuracy | test mean IoU |",
              "|---|---|---|---|---|---|---|"]
    for seed in seeds:
        run = results["per_seed"][str(seed)]
        for key, name in MODELS:
            r = run[key]
            lines.append(f"| {seed} | {name} | {r['best_epoch']} of {r['epochs_trained']} | "
                         f"{100 * r['train']['accuracy']:.1f}% | {r['train']['mean_iou']:.3f} | "
                         f"{100 * r['test']['accuracy']:.1f}% | {r['test']['mean_iou']:.3f} |")
    lines += ["", "Each seed's run, figures and results are in `seed{k}/`.", "", "## Settings", ""]
    lines += settings_lines(s, SETTINGS_SHOWN + ("seeds",))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except the unset ones whose help already says them."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def demo_settings():
    """The demo's training options as they would be typed: '--epochs 8 --single_backward'."""
    return " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in DEMO_TRAINING.items())


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--data_dir", help="dataset built by Dataset.py (required unless --demo)")
    p.add_argument("--out_dir", required=True, help="where models, figures and results go (required)")
    p.add_argument("--demo", action="store_true",
                   help=f"generate a synthetic COCO tree in OUT/synthetic_coco, build it into "
                        f"OUT/data and run on it with the demo's settings ({demo_settings()}) "
                        f"unless given otherwise")
    p.add_argument("--n_train", type=int, default=None,
                   help=f"--demo: synthetic train images (default {DEMO['n_train']})")
    p.add_argument("--n_val", type=int, default=None,
                   help=f"--demo: synthetic val (test) images (default {DEMO['n_val']})")
    p.add_argument("--synthetic_seed", type=int, default=None,
                   help=f"--demo: synthetic tree seed (default {DEMO['synthetic_seed']})")
    p.add_argument("--redraw", action="store_true",
                   help="draw every figure of a finished OUT again from its predictions_*.json and "
                        "history.json files and the dataset's images (DATA from the run's settings, "
                        "or --data_dir); no model is run")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run the whole experiment once per training seed, into OUT/seed{k}/, and "
                        "write the mean, std, min and max over seeds to OUT/results.json and "
                        "OUT/results.md (one seed: the same as --seed, in OUT itself)")
    add_training_args(p)
    # The training options whose default depends on --demo, and --seed (unset, so that
    # --seed and --seeds together can be refused).
    report_defaults = {a.dest: a.default for a in p._actions if a.dest in DEMO_TRAINING}
    p.set_defaults(seed=None, **{k: None for k in DEMO_TRAINING})
    for action in p._actions:
        if action.dest in DEMO_TRAINING:
            shown = "off" if action.default is False else report_defaults[action.dest]
            demo = DEMO_TRAINING[action.dest]
            demo = "on" if demo is True else demo
            action.help += f" (default: {shown}, the report's; {demo} with --demo)"
        elif action.dest == "seed":
            action.help += " (default: 0)"
    p.report_defaults = report_defaults
    return p


def resolve_args(args, parser=None):
    """Fill the options left unset: the demo's values with --demo, else the report's."""
    parser = parser or get_args_parser()
    if args.redraw:
        return args
    if args.demo == bool(args.data_dir):
        raise TrainingError("give --data_dir DATA (a dataset built by Dataset.py) or --demo, "
                            "one of the two")
    for key in DEMO_DATA:
        if getattr(args, key) is None:
            setattr(args, key, DEMO[key])
        elif not args.demo:
            raise TrainingError(f"--{key} applies to --demo only")
    for key in DEMO_TRAINING:
        if getattr(args, key) is None:
            setattr(args, key, DEMO[key] if args.demo else parser.report_defaults[key])
    if args.seeds is not None:
        if args.seed is not None:
            raise TrainingError("give --seed or --seeds, not both")
        if len(set(args.seeds)) != len(args.seeds):
            raise TrainingError(f"--seeds {' '.join(map(str, args.seeds))}: each seed once")
    if args.seed is None:
        args.seed = args.seeds[0] if args.seeds else 0
    return args


def holds_a_run(out_dir):
    return any(RunFiles(os.path.join(out_dir, key)).holds_a_run() for key, _ in MODELS)


def seed_runs(out_dir):
    """The seeds of OUT/seed{k}/ folders that hold a run (a --seeds run's), sorted."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(int(d[4:]) for d in os.listdir(out_dir)
                  if re.fullmatch(r"seed(0|[1-9]\d*)", d) and holds_a_run(os.path.join(out_dir, d)))


def check_layout(out_dir, held, seeds, resume):
    """Refuse a command that would mix a single run and a --seeds run in one OUT (held: the
    seeds of its seed{k}/ runs; the aggregate results.json of one would be overwritten by
    the other's), or start over on a run without --resume."""
    if held and not seeds:
        raise TrainingError(f"{out_dir} holds a --seeds run (seeds {' '.join(map(str, held))}): go on "
                            f"with it with --seeds and --resume, or choose another --out_dir")
    if seeds and holds_a_run(out_dir):
        raise TrainingError(f"{out_dir} holds a single run (ciou/, mse/): give a --seeds run its own "
                            f"--out_dir")
    if not resume and (held or holds_a_run(out_dir)):
        where = f" ({', '.join(f'seed{k}' for k in held)})" if held else ""
        raise TrainingError(f"{out_dir} already holds a run{where}; pass --resume to continue it, "
                            f"or choose another --out_dir")
    if seeds and not set(held) <= set(seeds):  # OUT/results.json would leave some out
        raise TrainingError(f"{out_dir} holds seeds {' '.join(map(str, held))}: give --seeds all of "
                            f"them (and any new ones), not {' '.join(map(str, seeds))}")


def run_experiment(args, out_dir, datasets, device, t_start):
    """Both models trained with args.seed into out_dir, evaluated, drawn and written up
    (results.json, results.md). Returns the results."""
    train_set, test_set, val_set = datasets
    os.makedirs(out_dir, exist_ok=True)
    seed_everything(args.seed)
    net = build_model(args)
    write_text(model_summary(net), os.path.join(out_dir, "model_sum.txt"))
    n_layers, n_params = count_parameters(net)
    del net

    results = {"baseline": {"mean_box_test_iou": mean_box_baseline(train_set.boxes, test_set.boxes)}}
    log.info("mean-box baseline: test mean IoU %.3f", results["baseline"]["mean_box_test_iou"])
    for key, loss_name in MODELS:
        res, history = run_model(key, loss_name, datasets, out_dir, args, device)
        # Epoch times (training and the per-epoch evaluation) and file writes, each summed
        # over the whole run, a resumed one included.
        saves = history.get("save_seconds", [])
        results[key] = {**res, "best_epoch": history["best_epoch"],
                        "best_score": history["best_score"], "select_on": history["select_on"],
                        "epochs_trained": len(history["epoch_seconds"]),
                        "skipped_steps": sum(history.get("skipped_steps", [])),
                        "train_seconds": round(sum(history["epoch_seconds"]), 1),
                        "save_seconds": round(sum(w["seconds"] for w in saves), 1),
                        "files_written": len(saves)}
    results["report"] = REPORT
    results["settings"] = experiment_settings(args, device, datasets, n_params, n_layers, t_start)
    if args.resume:  # a finished run evaluated again: its first command's time is kept
        keep_earlier_wall_seconds(results["settings"], os.path.join(out_dir, "results.json"))
    write_json(results, os.path.join(out_dir, "results.json"))
    write_text(results_markdown(results), os.path.join(out_dir, "results.md"))
    return results


def keep_earlier_wall_seconds(settings, path):
    """Put into settings, as earlier_wall_seconds (oldest first), the wall times of the
    commands that wrote the results.json at path, which a resumed run replaces; nothing
    when there is none."""
    try:
        with open(path) as f:
            before = json.load(f).get("settings", {})
    except (OSError, ValueError):
        return
    earlier = before.get("earlier_wall_seconds", []) + [before["wall_seconds"]] * ("wall_seconds" in before)
    if earlier:
        settings["earlier_wall_seconds"] = earlier


def experiment_settings(args, device, datasets, n_params, n_layers, t_start):
    train_set, test_set, val_set = datasets
    settings = {
        "demo": args.demo, "device": str(device), "data_dir": os.path.abspath(args.data_dir),
        "n_train": len(train_set), "n_test": len(test_set),
        "n_val": len(val_set) if val_set is not None else 0,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "lr_schedule": args.lr_schedule + (f", warm-up {args.warmup_epochs:g} epoch(s)"
                                           if args.lr_schedule != "constant" and args.warmup_epochs else ""),
        "betas": [args.beta1, args.beta2], "seed": args.seed,
        "boxes": "raw (as the report's code)" if args.raw_boxes else "ordered (order_boxes)",
        "backward": "single" if args.single_backward else "two calls (as the report)",
        "augment": args.augment, "amp": args.amp,
        "learnable_res": args.learnable_res, "parameters": n_params, "parameter_tensors": n_layers,
        "torch": torch.__version__, "python": platform.python_version(),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    if args.demo:
        settings.update(n_synthetic_train=args.n_train, n_synthetic_val=args.n_val,
                        synthetic_seed=args.synthetic_seed)
    return settings


def main(args):
    if args.redraw:
        drawn = redraw(args.out_dir, args.data_dir)
        log.info("redrew %d figures in %s from its predictions and histories", len(drawn), args.out_dir)
        return drawn
    t_start = time.perf_counter()
    out_dir = args.out_dir
    if problem := out_dir_problem(out_dir):
        raise TrainingError(problem)
    held = seed_runs(out_dir)
    if args.seeds and len(args.seeds) == 1 and not held:
        args.seeds = None  # one seed is a plain run, except in the OUT of a --seeds run
    seeds = args.seeds or [args.seed]
    run_dirs = {seed: os.path.join(out_dir, f"seed{seed}") if args.seeds else out_dir for seed in seeds}
    check_layout(out_dir, held, args.seeds, args.resume)
    device = pick_device(args.device)
    try:  # needed after training, for the COCO metrics: say so now, not hours later
        import pycocotools.cocoeval  # noqa: F401
    except ImportError:
        raise TrainingError("pycocotools is not installed: pip install -r requirements.txt") from None
    check_training_args(args, device)  # the options alone, before the demo's data is drawn
    args.data_dir = prepare_demo_data(out_dir, args) if args.demo else args.data_dir
    # Loaded once for every seed (with --val_fraction, held out with the first seed): the
    # seeds vary training only. Bad data stops here, before OUT is made.
    datasets = load_datasets(args, progress=not args.quiet)
    check_training_args(args, device, len(datasets[0]))  # before anything goes into OUT
    if not all(has_coco_geometry(d.data) for d in (datasets[0], datasets[1])):
        log.warning("%s was built by an older Dataset.py, without each image's original size and "
                    "COCO box: coco_results_*.json and the COCO metrics are skipped (rebuild it "
                    "with Dataset.py to have them)", args.data_dir)
    per_seed = {}
    for seed, run_dir in run_dirs.items():
        if args.seeds:
            log.info("seed %d of %s: %s", seed, " ".join(map(str, seeds)), run_dir)
        run_args = argparse.Namespace(**{**vars(args), "seed": seed, "seeds": None})
        # A single run's wall time counts from the command's start (data included).
        per_seed[seed] = run_experiment(run_args, run_dir, datasets, device,
                                        time.perf_counter() if args.seeds else t_start)
    if args.seeds:
        results = aggregate_results(per_seed, round(time.perf_counter() - t_start, 1))
        if args.resume:
            keep_earlier_wall_seconds(results["settings"], os.path.join(out_dir, "results.json"))
        markdown = seeds_markdown(results)
        write_json(results, os.path.join(out_dir, "results.json"))
        write_text(markdown, os.path.join(out_dir, "results.md"))
    else:
        results = per_seed[args.seed]
        markdown = results_markdown(results)
    print(markdown)
    log.info("outputs in %s (results.md, results.json, figures; models in %s)", out_dir,
             ", ".join(os.path.join(d, m) for d in run_dirs.values() for m in ("ciou", "mse")))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        parser = get_args_parser()
        main(resolve_args(parser.parse_args(), parser))
    except (TrainingError, DatasetError) as e:
        log.error("%s", e)
        sys.exit(2)
