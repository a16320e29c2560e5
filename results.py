"""What an experiment's OUT says: results.md, the page a TA reads first (the run's numbers
beside the report's, the verdicts, what differs from the report, every figure under its
report number), results.json, the seed aggregate, and the figures drawn from saved
predictions (--redraw)."""
import logging
import math
import os
import re

from checkpoints import RunFiles
from cli import UserError
from Dataset import MyCOCODataset, plot_images
from outputs import read_json, write_json, write_text
from utils import (CLASS_NAMES, display_comparison, display_preds, plot_cm, plot_history,
                   predictions_from_records)

log = logging.getLogger("results")

MODELS = (("ciou", "CIoU"), ("mse", "MSE"))
SPLITS = ("train", "val", "test")
# Report Section 4 (its prose: the report has no results table): accuracy as a fraction, mean IoU.
REPORT = {
    "ciou": {"train": {"accuracy": 0.996, "mean_iou": 0.68}, "test": {"accuracy": 0.889, "mean_iou": 0.61}},
    "mse": {"train": {"accuracy": 0.994, "mean_iou": 0.67}, "test": {"accuracy": 0.896, "mean_iou": 0.57}},
}
REPORT_IMAGES = {"n_train": 3789, "n_test": 1972}
# The report's settings, as this package's options (ordered boxes are SPEC's fix of its code).
REPORT_SETTINGS = {"width": 8, "n_blocks": 5, "learnable_res": False, "epochs": 30, "batch_size": 16,
                   "lr": 0.001, "beta1": 0.9, "beta2": 0.99, "lr_schedule": "constant", "warmup_epochs": 0.0,
                   "seed": 0, "single_backward": False, "raw_boxes": True, "augment": False,
                   "val_fraction": 0.0, "amp": False, "tf32": False, "strict_fp32": False,
                   "cudnn_benchmark": False}
WHY_IT_DIFFERS = {
    "raw_boxes": "the box head's output is ordered (min, max) before the loss and the metric; the "
                 "report's code fed it raw, and CIoU is undefined on inverted boxes (README, Differences)",
    "single_backward": "one backward pass of the summed loss: the same gradients as the report's two calls",
    "lr_schedule": "the learning rate's schedule", "val_fraction": "the best epoch selected on a held-out "
                   "part of the training set, not on the test set",
    "amp": "bfloat16 autocast", "tf32": "TF32 matrix products on CUDA",
    "strict_fp32": "no TF32 on CUDA, convolutions included",
}
# Which file is which figure of the report, Section 4 (Fig. 20 is the CIoU model's curves
# only); two files of one figure are its (a) and (b).
FIGURES = (("2", "sample images of each class, training data", ["sample_images.png"]),
           ("14", "confusion matrices over the train data, (a) CIoU model, (b) MSE model",
            ["ciou_train_cm.png", "mse_train_cm.png"]),
           ("15", "the CIoU model's predictions on train data", ["ciou_train_preds.png"]),
           ("16", "the MSE model's predictions on train data", ["mse_train_preds.png"]),
           ("17", "confusion matrices over the test data, (a) CIoU model, (b) MSE model",
            ["ciou_test_cm.png", "mse_test_cm.png"]),
           ("18", "the CIoU model's predictions on test data", ["ciou_test_preds.png"]),
           ("19", "the MSE model's predictions on test data", ["mse_test_preds.png"]),
           ("20", "training curves of the CIoU model", ["ciou_curves.png"]),
           (None, "the MSE model's curves, and both models' boxes image by image (Section 4.2's comparison)",
            ["mse_curves.png", "ciou_vs_mse_train.png", "ciou_vs_mse_test.png"]))
REPORT_FIGURES = {file: number + ("(a)", "(b)")[i] if len(files) == 2 else number
                  for number, _, files in FIGURES if number for i, file in enumerate(files)}
# What results.json keeps of a run's settings (train.run_settings), and what results.md lists.
EXPERIMENT_SETTINGS = ("demo", "device", "data_dir", *REPORT_SETTINGS, "eval_batch_size")
DEMO_NOTE = ["Demo run on synthetic data (drawn buses, cats and pizzas). The report's numbers "
             "are for COCO 2014 and are shown for scale only.", ""]


def holds_an_experiment(out_dir):
    """Whether an experiment folder holds a run of either model."""
    return any(RunFiles(os.path.join(out_dir, key)).holds_a_run() for key, _ in MODELS)


def seed_runs(out_dir):
    """The seeds of OUT/seed{k}/ folders that hold a run, sorted."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(int(d[4:]) for d in os.listdir(out_dir)
                  if re.fullmatch(r"seed(0|[1-9]\d*)", d) and holds_an_experiment(os.path.join(out_dir, d)))


def run_dirs(out_dir):
    """The experiment folders of an OUT: its seed{k}/ folders, or OUT itself."""
    return [os.path.join(out_dir, f"seed{k}") for k in seed_runs(out_dir)] or [out_dir]


# ---------------------------------------------------------------------------------
# results.md
# ---------------------------------------------------------------------------------
def mean(v):
    """A number, or over seeds its spread's mean."""
    return v["mean"] if isinstance(v, dict) else v


def numbers_table(rows, baseline, coco):
    """Both models' train and test numbers beside the report's; rows[(key, split)] gives
    (accuracy cell, mean IoU cell), coco[(key, split)] the AP50 and AP cells."""
    lines = ["| model | split | accuracy | mean IoU | report accuracy | report mean IoU | mean-box "
             "baseline IoU | AP50 | AP |", "|---|---|---|---|---|---|---|---|---|"]
    for split in ("train", "test"):
        for key, name in MODELS:
            rep = REPORT[key][split]
            lines.append(f"| {name} | {split} | {' | '.join(rows[key, split])} | {100 * rep['accuracy']:.1f}% "
                         f"| {rep['mean_iou']:.2f} | {mean(baseline[split]):.3f} | {' | '.join(coco[key, split])} |")
    return lines + [""]


def verdict_lines(test):
    """Which model classifies better and which boxes better on the test set (test[key]:
    accuracy and mean IoU), each set against the report's order."""
    lines = []
    for metric, what, ours_format, report_format in (
            ("accuracy", "Classification (test accuracy)", "{:.1%}", "{:.1%}"),
            ("mean_iou", "Boxes (test mean IoU)", "{:.3f}", "{:.2f}")):
        def order(values, unit):
            (a, va), (b, vb) = sorted(((name, values[key][metric]) for key, name in MODELS), key=lambda kv: -kv[1])
            return (None if va == vb else a), f"{a} {unit.format(va)} against {b} {unit.format(vb)}"
        ours, ours_text = order(test, ours_format)
        theirs, theirs_text = order({key: REPORT[key]["test"] for key, _ in MODELS}, report_format)
        verdict = (f"{ours} is the better, " + ("as in the report" if ours == theirs else "the reverse of the report")
                   if ours else "the two are equal, unlike in the report")
        lines.append(f"- {what}: {verdict} ({ours_text}; the report: {theirs_text}).")
    return lines + [""]


def differing_settings(settings):
    """A line for each setting of the run that is not the report's."""
    def option(k, v):
        return f"`--{k}`" if v is True else f"no `--{k}`" if v is False else f"`--{k} {v}`"
    lines = [f"- {option(k, settings[k])} (the report's: {option(k, v)})"
             + (f": {WHY_IT_DIFFERS[k]}" if k in WHY_IT_DIFFERS else "")
             for k, v in REPORT_SETTINGS.items() if k in settings and settings[k] != v]
    if settings.get("demo"):
        lines.append("- the data: synthetic drawings (`--demo`), not COCO 2014")
    lines += [f"- {k} {settings[k]} (the report's: {n})" for k, n in REPORT_IMAGES.items() if settings[k] != n]
    return lines or ["- none"]


def figure_lines():
    lines = ["## Figures, as the report numbers them", "",
             "Fig. 5 and the layer table: [model_sum.txt](model_sum.txt).", ""]
    for number, title, files in FIGURES:
        lines += [f"### {f'Fig. {number}' if number else 'Not in the report'}: {title}", "",
                  " ".join(f"![{f}]({f})" for f in files), ""]
    return lines


def coco_markdown(coco):
    """The COCO metrics' table; coco[model][split] is a coco_metrics() dict (over seeds,
    its spread: the mean is shown)."""
    def cell(v):
        v = mean(v) if v is not None else None
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
    return lines + [""], {(key, split): (cell(c["AP50"]), cell(c["AP"]))
                          for key, _ in MODELS for split, c in coco[key].items()}


def run_lines(settings):
    """Where the run ran and how long it took; every option is in results.json's settings."""
    s = settings
    earlier = (f" (before a --resume: {', '.join(f'{t} s' for t in s['earlier_wall_seconds'])})"
               if "earlier_wall_seconds" in s else "")
    drawn = (f" (drawn with --n_train {s['n_synthetic_train']} --n_val {s['n_synthetic_val']} "
             f"--synthetic_seed {s['synthetic_seed']})" if s["demo"] else "")
    return ["## The run", "", f"{s['n_train']} training, {s['n_test']} test and {s['n_val']} held-out "
            f"images from {s['data_dir']}{drawn}; on {s['device']}, torch {s['torch']}; {s['wall_seconds']} s "
            f"from the command's start to its end{earlier}. Every option: `settings` in results.json."]


def comparison_lines(comparison):
    """Image by image, which model's box is the better (over seeds, the means)."""
    lines = []
    for split, c in comparison.items():
        seeds = isinstance(c["mse_better"], dict)
        v = {k: mean(c[k]) for k in c}
        count, over = ("{:.1f}", ", means over the seeds") if seeds else ("{}", "")
        lines.append(f"- Image by image on {split} ({v['n_images']:.0f} images{over}): "
                     f"the MSE model's box is the better on {count.format(v['mse_better'])}, the CIoU "
                     f"model's on {count.format(v['ciou_better'])}; mean IoU difference (MSE - CIoU) "
                     f"{v['mean_iou_difference']:+.3f} (`ciou_vs_mse_{split}.png`).")
    return lines + [""]


def cell(value, scale, digits, unit=""):
    """A number for results.md, or over seeds its spread: mean ± std (min to max)."""
    def number(x):
        return f"{scale * x:.{digits}f}"
    if isinstance(value, dict):
        return (f"{number(value['mean'])}{unit} ± {number(value['std'])} ({number(value['min'])} to "
                f"{number(value['max'])})")
    return f"{number(value)}{unit}"


def results_markdown(results):
    """results.md: the numbers beside the report's, the verdicts, what differs from the report,
    the COCO metrics, then a run's figures, or a --seeds run's seeds, and the run."""
    settings, seeds = results["settings"], results.get("seeds")
    numbers = results["aggregate"] if seeds else results  # over seeds, the spread of each number
    coco_lines, coco = coco_markdown({key: {split: numbers[key][split]["coco"] for split in SPLITS
                                            if split in numbers[key]} for key, _ in MODELS})
    rows = {(key, split): (cell(n["accuracy"], 100, 1, "%"), cell(n["mean_iou"], 1, 3))
            for key, _ in MODELS for split in ("train", "test") for n in [numbers[key][split]]}
    lines = ["# HW5Net: CIoU vs MSE box loss" + (", over seeds " + ", ".join(map(str, seeds)) if seeds else ""), ""]
    lines += DEMO_NOTE if settings["demo"] else []
    lines += ([f"Mean ± sample std (min to max) over {len(seeds)} training seeds; the data is the same for every "
               f"seed.", ""] if seeds else [])
    lines += ["The report's Section 4 numbers (its prose: the report has no results table) beside this "
              "run's, with the mean-box baseline: the training set's mean box given to every image.", ""]
    lines += numbers_table(rows, results["baseline"], coco)
    lines += verdict_lines({key: {m: mean(numbers[key]["test"][m]) for m in ("accuracy", "mean_iou")}
                            for key, _ in MODELS})
    lines += comparison_lines(numbers["comparison"])
    for key, name in [] if seeds else MODELS:
        r = results[key]
        skipped = (f"; {r['skipped_steps']} training steps skipped for a non-finite loss or "
                   f"gradient" if r["skipped_steps"] else "")
        lines.append(f"- {name}: best epoch {r['best_epoch']} of {r['epochs_trained']} (selected on "
                     f"{r['select_on']}); {r['train_seconds']:.0f} s of epochs (training and per-epoch "
                     f"evaluation), {r['save_seconds']:.1f} s writing files ({r['files_written']}: "
                     f"checkpoints and the best model){skipped}")
    lines += ["", "## Settings that differ from the report's", ""] + differing_settings(settings) + [""]
    lines += coco_lines + (seed_lines(results) if seeds else figure_lines())
    return "\n".join(lines + run_lines(settings)) + "\n"


def seed_lines(results):
    """Each seed's numbers, and where its run is."""
    lines = ["## Each seed", "",
             "| seed | model | best epoch | train accuracy | train mean IoU | test accuracy | test mean IoU |",
             "|---|---|---|---|---|---|---|"]
    for seed in results["seeds"]:
        for key, name in MODELS:
            r = results["per_seed"][str(seed)][key]
            lines.append(f"| {seed} | {name} | {r['best_epoch']} of {r['epochs_trained']} | "
                         f"{100 * r['train']['accuracy']:.1f}% | {r['train']['mean_iou']:.3f} | "
                         f"{100 * r['test']['accuracy']:.1f}% | {r['test']['mean_iou']:.3f} |")
    return lines + ["", "Each seed's run, figures and results: "
                    + ", ".join(f"[seed{k}/results.md](seed{k}/results.md)" for k in results["seeds"]) + ".", ""]


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
    write_text(results_markdown(results), os.path.join(out_dir, "results.md"))
    return results


def keep_earlier_wall_seconds(settings, path):
    """Into settings (a resumed run's), as earlier_wall_seconds, the wall times of the
    commands that wrote the results.json at path, which this run replaces."""
    if not os.path.exists(path):
        return
    before = read_json(path, "the results.json of hw5_main.py")["settings"]
    earlier = before.get("earlier_wall_seconds", []) + [before["wall_seconds"]]
    settings["earlier_wall_seconds"] = earlier


# ---------------------------------------------------------------------------------
# Figures from saved predictions
# ---------------------------------------------------------------------------------
def figure_title(file, text):
    """A figure's title, led by its number in the report (none: not in the report)."""
    number = REPORT_FIGURES.get(file)
    return f"Fig. {number} (report): {text}" if number else f"{text} (not in the report)"


def draw_figures(run_dir, results, histories, records, images, data_dir):
    """Every figure of an experiment, from its results, histories, prediction records
    (records[key, split]) and DATA's images: the first drawing and --redraw both go here."""
    seed = results["settings"]["seed"]

    def path(file):
        return os.path.join(run_dir, file)
    for key, loss_name in MODELS:
        for split in ("train", "test"):
            metrics, predictions = results[key][split], predictions_from_records(records[key, split])
            plot_cm(metrics["confusion_matrix"], path(f"{key}_{split}_cm.png"), figure_title(
                f"{key}_{split}_cm.png", f"HW5Net, {loss_name} loss, {split} data"), metrics["accuracy"],
                metrics["mean_iou"])
            display_preds(images[split], predictions, path(f"{key}_{split}_preds.png"), figure_title(
                f"{key}_{split}_preds.png", f"{loss_name} model on {split} data (best epoch "
                f"{histories[key]['best_epoch']}): ground truth green, prediction red"), seed=seed)
        plot_history(histories[key], path(f"{key}_curves.png"), loss_name,
                     figure_title(f"{key}_curves.png", f"training curves of the {loss_name} model"))
    for split in ("train", "test"):
        display_comparison(images[split], *(predictions_from_records(records[key, split]) for key, _ in MODELS),
                           path(f"ciou_vs_mse_{split}.png"), figure_title(f"ciou_vs_mse_{split}.png", f"CIoU (red) "
                           f"and MSE (blue) models on the same {split} images, ground truth green"), seed=seed)
    plot_images(data_dir, path("sample_images.png"))
    return [path(file) for _, _, files in FIGURES for file in files]


def compare_models(ciou_records, mse_records):
    """The two models image by image on one split: how often each box is the better one
    (IoU), and the mean IoU difference, MSE - CIoU."""
    ciou, mse = (predictions_from_records(p)["iou"].double() for p in (ciou_records, mse_records))
    diff = mse - ciou
    return {"n_images": len(diff), "mse_better": int((diff > 0).sum()), "ciou_better": int((diff < 0).sum()),
            "equal": int((diff == 0).sum()), "mean_iou_difference": float(diff.mean()),
            "mean_abs_iou_difference": float(diff.abs().mean())}


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


def read_predictions(run_dir, key, split):
    return read_json(os.path.join(run_dir, key, f"predictions_{split}.json"),
                     "the predictions hw5_main.py writes when it evaluates a model")


def redraw(out_dir, data_dir=None):
    """Every figure of a finished OUT drawn again from OUT and DATA alone: results.json, each
    history.json, the prediction records and DATA's images. No model runs. Returns the paths."""
    if not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir}: no such directory (an OUT that hw5_main.py wrote)")
    drawn = []
    for run_dir in run_dirs(out_dir):
        results = read_json(os.path.join(run_dir, "results.json"), "the results.json of a finished run")
        histories = {key: RunFiles(os.path.join(run_dir, key)).read_history() for key, _ in MODELS}
        data = find_data_dir(run_dir, data_dir, histories["ciou"]["settings"]["data_dir"])
        records = {(key, split): read_predictions(run_dir, key, split)
                   for key, _ in MODELS for split in ("train", "test")}
        images = {split: MyCOCODataset(data, train=split == "train",
                                       files=[r["file_name"] for r in records["ciou", split]]).images
                  for split in ("train", "test")}
        drawn += draw_figures(run_dir, results, histories, records, images, data)
    return drawn
