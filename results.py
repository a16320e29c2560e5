"""What an experiment's OUT says, and its checks: results.md beside the report's numbers,
the seed aggregate, the figures drawn from saved predictions (--redraw), and the
read-only check a TA runs on a handed-in OUT (--check)."""
import logging
import math
import os
import re

import numpy as np
import torch

from checkpoints import RunFiles, load_checkpoint, load_model_state
from Dataset import CLASS_NAMES, MyCOCODataset
from devices import DeviceBatches
from files import UserError, read_json, write_json, write_text
from network import HW5Net
from utils import (box_iou_per_image, coco_ground_truth, coco_metrics, confusion_matrix,
                   display_comparison, display_preds, evaluation, plot_cm, plot_history,
                   predictions_from_records)

log = logging.getLogger("results")

MODELS = (("ciou", "CIoU"), ("mse", "MSE"))
SPLITS = ("train", "val", "test")
# Report Section 4: accuracy as a fraction, mean IoU.
REPORT = {
    "ciou": {"train": {"accuracy": 0.996, "mean_iou": 0.68}, "test": {"accuracy": 0.889, "mean_iou": 0.61}},
    "mse": {"train": {"accuracy": 0.994, "mean_iou": 0.67}, "test": {"accuracy": 0.896, "mean_iou": 0.57}},
}
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
DEMO_NOTE = ["Demo run on synthetic data (drawn buses, cats and pizzas). The report's numbers "
             "are for COCO 2014 and are shown for scale only.", ""]


def holds_a_run(out_dir):
    return any(RunFiles(os.path.join(out_dir, key)).holds_a_run() for key, _ in MODELS)


def seed_runs(out_dir):
    """The seeds of OUT/seed{k}/ folders that hold a run, sorted."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(int(d[4:]) for d in os.listdir(out_dir)
                  if re.fullmatch(r"seed(0|[1-9]\d*)", d) and holds_a_run(os.path.join(out_dir, d)))


def run_dirs(out_dir):
    """The experiment folders of an OUT: its seed{k}/ folders, or OUT itself."""
    return [os.path.join(out_dir, f"seed{k}") for k in seed_runs(out_dir)] or [out_dir]


# ---------------------------------------------------------------------------------
# results.md
# ---------------------------------------------------------------------------------
def coco_markdown(coco):
    """The COCO metrics' table; coco[model][split] is a coco_metrics() dict (over seeds,
    its spread: the mean is shown)."""
    def cell(v):
        v = v.get("mean") if isinstance(v, dict) else v
        return "n/a" if v is None else f"{100 * v:.1f}"

    lines = ["COCO detection metrics (pycocotools' COCOeval, bbox, in the original images' pixels; "
             "AP in per cent):", "",
             "| model | split | AP | AP50 | AP75 | AP bus | AP cat | AP pizza |",
             "|---|---|---|---|---|---|---|---|"]
    for key, name in MODELS:
        for split, c in coco[key].items():
            per_class = " | ".join(cell((c["per_class"].get(cls) or {}).get("AP")) for cls in CLASS_NAMES)
            lines.append(f"| {name} | {split} | {cell(c['AP'])} | {cell(c['AP50'])} | "
                         f"{cell(c['AP75'])} | {per_class} |")
    return lines + [""]


def settings_lines(settings, keys):
    return [f"- {k} ({SETTING_NOTES[k]}): {settings[k]}" if k in SETTING_NOTES else f"- {k}: {settings[k]}"
            for k in keys if k in settings]


def baseline_line(results):
    return ["", f"Mean-box baseline (the training set's mean box for every test image): test mean "
                f"IoU {results['baseline']['mean_box_test_iou']:.3f}.", ""]


def comparison_lines(comparison):
    """Image by image, which model's box is the better (over seeds, the means)."""
    lines = []
    for split, c in comparison.items():
        seeds = isinstance(c["mse_better"], dict)
        v = {k: c[k]["mean"] if seeds else c[k] for k in c}
        count, over = ("{:.1f}", ", means over the seeds") if seeds else ("{}", "")
        lines.append(f"Image by image on {split} ({v['n_images']:.0f} images{over}): "
                     f"the MSE model's box is the better on {count.format(v['mse_better'])}, the CIoU "
                     f"model's on {count.format(v['ciou_better'])}; mean IoU difference (MSE - CIoU) "
                     f"{v['mean_iou_difference']:+.3f} (`ciou_vs_mse_{split}.png`).")
    return lines + [""]


def results_markdown(results):
    """results.md: the run's table beside the report's, the baseline and the settings."""
    s = results["settings"]
    lines = ["# HW5Net: CIoU vs MSE box loss", ""] + (DEMO_NOTE if s["demo"] else [])
    lines += ["| model | split | accuracy | mean IoU | report accuracy | report mean IoU |",
              "|---|---|---|---|---|---|"]
    for split in ("train", "test"):
        for key, name in MODELS:
            ours, rep = results[key][split], REPORT[key][split]
            lines.append(f"| {name} | {split} | {100 * ours['accuracy']:.1f}% | {ours['mean_iou']:.3f} "
                         f"| {100 * rep['accuracy']:.1f}% | {rep['mean_iou']:.2f} |")
    lines += baseline_line(results)
    lines += comparison_lines(results["comparison"])
    lines += coco_markdown({key: {split: results[key][split]["coco"] for split in SPLITS
                                  if split in results[key]} for key, _ in MODELS})
    for key, name in MODELS:
        r = results[key]
        skipped = (f"; {r['skipped_steps']} training steps skipped for a non-finite loss or "
                   f"gradient" if r["skipped_steps"] else "")
        lines.append(f"- {name}: best epoch {r['best_epoch']} of {r['epochs_trained']} (selected on "
                     f"{r['select_on']}); {r['train_seconds']:.0f} s of epochs (training and per-epoch "
                     f"evaluation), {r['save_seconds']:.1f} s writing files ({r['files_written']}: "
                     f"checkpoints and the best model){skipped}")
    lines += ["", "## Settings", ""] + settings_lines(s, SETTINGS_SHOWN)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------
# Several seeds
# ---------------------------------------------------------------------------------
def spread(values):
    """{"mean", "std" (sample, ddof 1; 0.0 for one value), "min", "max"} over seeds; values
    that are None are left out, and None when all are."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def _number(v):
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def aggregate_numbers(items):
    """The spread of every number in like-shaped dicts (one per seed), nested dicts
    followed; lists (confusion matrices) are left out."""
    out = {}
    for key, first in items[0].items():
        values = [item.get(key) for item in items]
        if isinstance(first, dict):
            out[key] = aggregate_numbers([v if isinstance(v, dict) else {} for v in values])
        elif all(_number(v) for v in values):
            out[key] = spread(values)
    return out


def aggregate_results(per_seed, wall_seconds):
    """OUT/results.json of a --seeds run: results["aggregate"][model][split][metric] =
    {"mean", "std", "min", "max"} over seeds, the best epochs' spread per model, and each
    seed's results.json under results["per_seed"][seed]."""
    seeds = list(per_seed)
    runs = [per_seed[s] for s in seeds]
    first = runs[0]
    aggregate = {}
    for key, _ in MODELS:
        aggregate[key] = {split: aggregate_numbers([run[key][split] for run in runs])
                          for split in SPLITS if split in first[key]}
        aggregate[key]["best_epoch"] = spread([run[key]["best_epoch"] for run in runs])
    aggregate["comparison"] = aggregate_numbers([run["comparison"] for run in runs])
    settings = {k: v for k, v in first["settings"].items()
                if k not in ("seed", "wall_seconds", "earlier_wall_seconds")}
    settings.update(seeds=seeds, wall_seconds=wall_seconds)
    return {"seeds": seeds, "aggregate": aggregate, "per_seed": {str(s): per_seed[s] for s in seeds},
            "baseline": first["baseline"], "report": REPORT, "settings": settings}


def aggregate_seed_folders(out_dir, seeds=None):
    """OUT/results.json and results.md of a --seeds run whose seeds ran as separate processes
    (--seed_index): the files --seeds writes in one process. Each seed (of seeds, or every
    seed{k}/ of OUT) must have finished, that is, written its seed{k}/results.json; the wall
    time is the seeds' own, summed."""
    seeds = seeds or seed_runs(out_dir)
    if not seeds:
        raise UserError(f"{out_dir} holds no seed{{k}}/ runs: nothing to aggregate")
    paths = {k: os.path.join(out_dir, f"seed{k}", "results.json") for k in seeds}
    unfinished = [k for k, path in paths.items() if not os.path.exists(path)]
    if unfinished:
        raise UserError(f"{out_dir}: seed(s) {' '.join(map(str, unfinished))} of {' '.join(map(str, seeds))} "
                        f"have not finished (no results.json in their seed{{k}}/): run them first")
    per_seed = {k: read_json(path, "the results.json of hw5_main.py") for k, path in paths.items()}
    results = aggregate_results(per_seed, round(sum(r["settings"]["wall_seconds"] for r in per_seed.values()), 1))
    write_json(results, os.path.join(out_dir, "results.json"))
    write_text(seeds_markdown(results), os.path.join(out_dir, "results.md"))
    return results


def seeds_markdown(results):
    """OUT/results.md of a --seeds run: mean ± std (min to max) per model and split beside
    the report's numbers, then a row per seed."""
    s, seeds, agg = results["settings"], results["seeds"], results["aggregate"]
    lines = ["# HW5Net: CIoU vs MSE box loss, over seeds " + ", ".join(map(str, seeds)), ""]
    lines += DEMO_NOTE if s["demo"] else []
    lines += [f"Mean ± sample std (min to max) over {len(seeds)} training seeds; the data is the "
              f"same for every seed.", "",
              "| model | split | accuracy | mean IoU | report accuracy | report mean IoU |",
              "|---|---|---|---|---|---|"]
    for split in SPLITS:
        for key, name in MODELS:
            if split not in agg[key]:
                continue
            a, m = agg[key][split]["accuracy"], agg[key][split]["mean_iou"]
            rep = REPORT[key].get(split)
            report = f"{100 * rep['accuracy']:.1f}% | {rep['mean_iou']:.2f}" if rep else "| "
            lines.append(f"| {name} | {split} | {100 * a['mean']:.1f}% ± {100 * a['std']:.1f} "
                         f"({100 * a['min']:.1f} to {100 * a['max']:.1f}) | {m['mean']:.3f} ± "
                         f"{m['std']:.3f} ({m['min']:.3f} to {m['max']:.3f}) | {report} |")
    lines += baseline_line(results)
    lines += comparison_lines(agg["comparison"])
    lines += coco_markdown({key: {split: agg[key][split]["coco"] for split in SPLITS
                                  if split in agg[key]} for key, _ in MODELS})
    lines += ["## Each seed", "",
              "| seed | model | best epoch | train accuracy | train mean IoU | test accuracy | test mean IoU |",
              "|---|---|---|---|---|---|---|"]
    for seed in seeds:
        for key, name in MODELS:
            r = results["per_seed"][str(seed)][key]
            lines.append(f"| {seed} | {name} | {r['best_epoch']} of {r['epochs_trained']} | "
                         f"{100 * r['train']['accuracy']:.1f}% | {r['train']['mean_iou']:.3f} | "
                         f"{100 * r['test']['accuracy']:.1f}% | {r['test']['mean_iou']:.3f} |")
    lines += ["", "Each seed's run, figures and results are in `seed{k}/`.", "", "## Settings", ""]
    lines += settings_lines(s, SETTINGS_SHOWN + ("seeds",))
    return "\n".join(lines) + "\n"


def keep_earlier_wall_seconds(settings, path):
    """Into settings (a resumed run's), as earlier_wall_seconds, the wall times of the
    commands that wrote the results.json at path, which this run replaces."""
    if not os.path.exists(path):
        return
    before = read_json(path, "the results.json of hw5_main.py")["settings"]
    earlier = before.get("earlier_wall_seconds", []) + [before["wall_seconds"]]
    settings["earlier_wall_seconds"] = earlier


# ---------------------------------------------------------------------------------
# Figures from saved predictions, and the check of a handed-in OUT
# ---------------------------------------------------------------------------------
def draw_split_figures(run_dir, key, loss_name, split, images, predictions, metrics, best_epoch, seed):
    """One model's confusion matrix (Figs. 14, 17) and prediction grid (Figs. 15, 16, 18,
    19) on one split, from its prediction records and saved metrics: the first drawing
    and --redraw both go through here."""
    plot_cm(metrics["confusion_matrix"], os.path.join(run_dir, f"{key}_{split}_cm.png"), loss_name,
            split, metrics["accuracy"], metrics["mean_iou"])
    display_preds(images, predictions_from_records(predictions),
                  os.path.join(run_dir, f"{key}_{split}_preds.png"),
                  f"{loss_name} model on {split} data (best epoch {best_epoch}): "
                  f"ground truth green, prediction red", seed=seed)


def compare_models(ciou_records, mse_records):
    """The two models image by image on one split: how often each box is the better one
    (IoU), and the mean IoU difference, MSE - CIoU."""
    ciou, mse = (predictions_from_records(p)["iou"].double() for p in (ciou_records, mse_records))
    diff = mse - ciou
    return {"n_images": len(diff), "mse_better": int((diff > 0).sum()), "ciou_better": int((diff < 0).sum()),
            "equal": int((diff == 0).sum()), "mean_iou_difference": float(diff.mean()),
            "mean_abs_iou_difference": float(diff.abs().mean())}


def draw_comparison(run_dir, split, images, ciou_records, mse_records, seed):
    display_comparison(images, predictions_from_records(ciou_records), predictions_from_records(mse_records),
                       os.path.join(run_dir, f"ciou_vs_mse_{split}.png"),
                       f"CIoU (red) and MSE (blue) models on the same {split} images, ground truth green",
                       seed=seed)


def find_data_dir(run_dir, given=None, recorded=None):
    """The dataset a run was trained on: --data_dir when given, else the one its settings
    record, else a demo's inside OUT (OUT/data, or beside the seed{k}/ folders)."""
    candidates = [given] if given else [recorded, os.path.join(run_dir, "data"),
                                        os.path.join(run_dir, os.pardir, "data")]
    for candidate in candidates:
        if candidate and os.path.exists(os.path.join(candidate, "train_data.pkl")):
            return candidate
    raise UserError(f"the dataset of {run_dir} is not at {given or recorded}: give --data_dir DATA, "
                    f"the dataset the run was trained on")


def read_run(run_dir, key, data_dir=None):
    """(results.json, the model's history, its DATA) of one finished model in run_dir."""
    if not os.path.isdir(run_dir):
        raise UserError(f"--out_dir {run_dir}: no such directory (an OUT that hw5_main.py wrote)")
    results = read_json(os.path.join(run_dir, "results.json"), "the results.json of a finished run")
    history = RunFiles(os.path.join(run_dir, key)).read_history()
    return results, history, find_data_dir(run_dir, data_dir, history["settings"]["data_dir"])


def read_predictions(run_dir, key, split):
    return read_json(os.path.join(run_dir, key, f"predictions_{split}.json"),
                     "the predictions hw5_main.py writes when it evaluates a model")


def redraw(out_dir, data_dir=None):
    """Every figure of a finished OUT drawn again from OUT and DATA alone: the predictions,
    results.json, each history.json and DATA's images. No model runs. Returns the paths."""
    drawn = []
    for run_dir in run_dirs(out_dir) if os.path.isdir(out_dir) else [out_dir]:
        records, images = {"train": {}, "test": {}}, {}
        for key, loss_name in MODELS:
            results, history, data = read_run(run_dir, key, data_dir)
            for split in records:
                records[split][key] = read_predictions(run_dir, key, split)
                files = [r["file_name"] for r in records[split][key]]
                images[split] = MyCOCODataset(data, train=split == "train", files=files).images
                draw_split_figures(run_dir, key, loss_name, split, images[split], records[split][key],
                                   results[key][split], history["best_epoch"], results["settings"]["seed"])
                drawn += [os.path.join(run_dir, f"{key}_{split}_{kind}.png") for kind in ("cm", "preds")]
            plot_history(history, os.path.join(run_dir, f"{key}_curves.png"), loss_name)
            drawn.append(os.path.join(run_dir, f"{key}_curves.png"))
        for split, pair in records.items():
            draw_comparison(run_dir, split, images[split], pair["ciou"], pair["mse"], results["settings"]["seed"])
            drawn.append(os.path.join(run_dir, f"ciou_vs_mse_{split}.png"))
    return drawn


def metrics_of_records(predictions):
    """Accuracy, mean IoU (from the boxes, not the records' IoUs) and the confusion matrix,
    recomputed from prediction records."""
    p = predictions_from_records(predictions)
    return {"accuracy": float((p["label"] == p["pred_label"]).double().mean()),
            "mean_iou": float(box_iou_per_image(p["pred_box"], p["box"]).numpy().mean(dtype=np.float64)),
            "confusion_matrix": confusion_matrix(p["label"], p["pred_label"]).tolist()}


def _compare(what, saved, recomputed, tolerance, problems):
    for k, v in recomputed.items():
        if isinstance(v, float) and isinstance(saved[k], float):
            differs = abs(v - saved[k]) > tolerance
        else:  # a confusion matrix, or a metric that is None
            differs = v != saved[k]
        if differs:
            problems.append(f"{what}: {k} is {saved[k]} in results.json, {v} recomputed")


def check(out_dir, data_dir=None, device=torch.device("cpu"), tolerance=0.005):
    """The TA's check of a handed-in OUT, reading only: every split's accuracy, mean IoU,
    confusion matrix and COCO AP recomputed from the saved predictions and set against
    results.json; where a model's best_model.pt is there, the model is evaluated again
    on DATA and set against them (within tolerance: another machine's float sums differ).
    Returns (lines checked, problems)."""
    checked, problems = [], []
    for run_dir in run_dirs(out_dir) if os.path.isdir(out_dir) else [out_dir]:
        for key, loss_name in MODELS:
            results, history, data = read_run(run_dir, key, data_dir)
            best = RunFiles(os.path.join(run_dir, key)).best
            model = None
            if os.path.exists(best):
                arch = history["settings"]
                model = HW5Net(width=arch["width"], n_blocks=arch["n_blocks"],
                               learnable_res=arch["learnable_res"])
                load_model_state(model, load_checkpoint(best), best)
                model.to(device)
            for split in [split for split in SPLITS if split in results[key]]:
                saved, what = results[key][split], f"{run_dir} {loss_name} {split}"
                predictions = read_predictions(run_dir, key, split)
                # 1e-6: the IoUs of a GPU run, recomputed on the CPU, may differ in the last bit
                _compare(what, saved, metrics_of_records(predictions), 1e-6, problems)
                dataset = MyCOCODataset(data, train=split != "test", files=[r["file_name"] for r in predictions])
                coco_path = os.path.join(run_dir, key, f"coco_results_{split}.json")
                coco = coco_metrics(coco_ground_truth(dataset.files, dataset.data),
                                    read_json(coco_path, "COCO-format detections"))
                _compare(what, saved["coco"], {k: coco[k] for k in ("AP", "AP50", "AP75")}, 1e-9, problems)
                if model is not None:
                    again = evaluation(model, DeviceBatches(dataset, 64, device), torch.nn.CrossEntropyLoss(),
                                       lambda p, t: p.new_zeros(()), device,
                                       order=not history["settings"]["raw_boxes"],
                                       amp=history["settings"]["amp"])[1]
                    _compare(f"{what} (evaluated again)", saved,
                             {k: again[k] for k in ("accuracy", "mean_iou")}, tolerance, problems)
                checked.append(f"{what}: accuracy {saved['accuracy']:.4f}, mean IoU "
                               f"{saved['mean_iou']:.4f}, AP50 {saved['coco']['AP50']:.4f}"
                               + (" (model evaluated again)" if model is not None else ""))
    return checked, problems
