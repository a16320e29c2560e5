"""The TA's check of a handed-in OUT (`python hw5_main.py --out_dir OUT --check`), reading
only. Every truth comes from DATA, never from the run's records: each split is rebuilt from
DATA and the run's settings and must be covered by the records once, image by image; every
number of results.json is recomputed from DATA and the records, and results.md from
results.json; the report's selection rule is applied again to history.json; and each model's
best_model.pt is evaluated again and compared with its records image by image
(docs/grading.md)."""
import logging
import os
from collections import Counter

import torch

from checkpoints import RunFiles, load_checkpoint, load_model_state
from cli import UserError
from Dataset import load_splits
from devices import DeviceBatches, set_gpu_options
from network import build_model
from outputs import read_json
from results import (MODELS, REPORT, REPORT_SETTINGS, SPLITS, aggregate_results, compare_models,
                     find_data_dir, read_predictions, results_markdown, run_dirs, seed_runs)
from train import METRICS, selection_score
from utils import (IMAGE_SIZE, box_iou_per_image, coco_ground_truth, coco_metrics, coco_results,
                   confusion_matrix, evaluation, mean_box_baseline, predictions_from_records)

log = logging.getLogger("grading")

# A model evaluated again in float32 on the TA's machine, against its records: the largest
# difference of a box coordinate (pixels of the 256x256 image), and of a class probability
# (a class may change only where the top two lie closer than that). By how the run's final
# evaluation computed: float32 (the CPU, MPS, CUDA with --strict_fp32), TF32 convolutions
# (CUDA's default, as the report's run), bfloat16 autocast (--amp). Measured: docs/grading.md.
TOLERANCES = {"float32": (0.5, 1e-3), "tf32": (2.0, 1e-2), "bfloat16": (8.0, 5e-2)}
NAMED = 10  # files named per kind of mismatch; the rest are counted


def precision(settings):
    """How a run computed, for TOLERANCES."""
    if settings["amp"]:
        return "bfloat16"
    on_cuda = settings["device"].startswith("cuda")
    return "tf32" if on_cuda and (settings["tf32"] or not settings["strict_fp32"]) else "float32"


def named(files, what):
    shown = ", ".join(files[:NAMED]) + (f" and {len(files) - NAMED} more" if len(files) > NAMED else "")
    return f"{len(files)} image(s) {what}: {shown}"


def name_masked(records, mask, what, where, problems):
    if mask.any():
        problems.append(f"{where}: {named([records[i]['file_name'] for i in mask.nonzero().flatten()], what)}")


def compare(where, saved, recomputed, tolerance, problems, source="results.json"):
    for k, v in recomputed.items():
        close = abs(v - saved[k]) <= tolerance if isinstance(v, float) and saved[k] is not None else v == saved[k]
        if not close:
            problems.append(f"{where}: {k} is {saved[k]} in {source}, {v} recomputed")


# ---------------------------------------------------------------------------------
# A model's records of one split
# ---------------------------------------------------------------------------------
def check_coverage(records, expected, where, problems):
    """Every image of the split once: a missing, extra or repeated record is named."""
    counts = Counter(r["file_name"] for r in records)
    expected_set = set(expected)
    for files, what in (([f for f in expected if f not in counts], "of DATA's split have no record"),
                        (sorted(f for f in counts if f not in expected_set), "are not in DATA's split"),
                        (sorted(f for f, n in counts.items() if n > 1), "have more than one record")):
        if files:
            problems.append(f"{where}: {named(files, what)}")


def check_records(records, dataset, saved, where, problems):
    """The records' truth and IoUs against DATA's, and results.json's numbers recomputed from
    DATA's truth and the records' predictions."""
    p = predictions_from_records(records)
    iou = box_iou_per_image(p["pred_box"], dataset.boxes)
    name_masked(records, p["label"] != dataset.labels, "whose recorded true class is not DATA's", where, problems)
    name_masked(records, (p["box"] - dataset.boxes).abs().amax(1) * IMAGE_SIZE > 1e-3,
                "whose recorded true box is not DATA's", where, problems)
    name_masked(records, (p["iou"] - iou).abs() > 1e-5, "whose recorded IoU is not its boxes'", where, problems)
    compare(where, saved, {"accuracy": float((p["pred_label"] == dataset.labels).double().mean()),
                           "mean_iou": float(iou.double().mean()),
                           "confusion_matrix": confusion_matrix(dataset.labels, p["pred_label"]).tolist()},
            1e-6, problems)


def check_detections(records, dataset, path, where, saved, problems):
    """coco_results_{split}.json is what the records give (coco_results, exactly), and COCO's
    AP of those detections is results.json's."""
    expected = coco_results(records, dataset.data)
    if read_json(path, "COCO-format detections") != expected:
        problems.append(f"{where}: {os.path.basename(path)} is not what the predictions give")
    coco = coco_metrics(coco_ground_truth(dataset.files, dataset.data), expected)
    compare(where, saved["coco"], {k: coco[k] for k in ("AP", "AP50", "AP75")}, 1e-9, problems)


def check_again(model, records, dataset, tolerance, raw_boxes, device, where, problems):
    """The model evaluated again in float32, image by image against the records: each box
    coordinate and class probability within tolerance, the class the same unless the model's
    own top two probabilities lie closer than that."""
    pixels, probability = tolerance
    again = evaluation(model, DeviceBatches(dataset, 64, device), torch.nn.CrossEntropyLoss(),
                       lambda p, t: p.new_zeros(()), device, order=not raw_boxes)[1]["predictions"]
    saved = predictions_from_records(records)
    top2 = again["scores"].topk(2, dim=1).values
    name_masked(records, (again["pred_label"] != saved["pred_label"]) & (top2[:, 0] - top2[:, 1] > probability),
                "predicted as another class when evaluated again", where, problems)
    name_masked(records, (again["scores"] - saved["scores"]).abs().amax(1) > probability,
                f"whose class probabilities move by more than {probability} when evaluated again", where, problems)
    name_masked(records, (again["pred_box"] - saved["pred_box"]).abs().amax(1) * IMAGE_SIZE > pixels,
                f"whose box moves by more than {pixels} px when evaluated again", where, problems)


def check_split(run_dir, key, split, data, saved, model, tolerance, raw_boxes, device, where, problems):
    """One model's records of one split (data: DATA's), against DATA and, where it is there,
    the model. Returns the records, in DATA's order."""
    records = read_predictions(run_dir, key, split)
    check_coverage(records, data.files, where, problems)
    by_file = {r["file_name"]: r for r in records}
    records = [by_file[f] for f in data.files if f in by_file]
    dataset = data.subset([r["file_name"] for r in records])
    check_records(records, dataset, saved, where, problems)
    check_detections(records, dataset, os.path.join(run_dir, key, f"coco_results_{split}.json"), where,
                     saved, problems)
    if model is not None:
        check_again(model, records, dataset, tolerance, raw_boxes, device, where, problems)
    return records


# ---------------------------------------------------------------------------------
# A model's history, and an experiment's
# ---------------------------------------------------------------------------------
def check_history(history, saved, where, problems):
    """history.json holds the run's epochs; the report's rule applied again to its per-epoch
    metrics gives the best epoch recorded; results.json's numbers on the split selected on
    are that epoch's (within two images and 0.01 of mean IoU: another device's evaluation)."""
    settings, select_on = history["settings"], history["select_on"]
    if select_on != ("val" if settings["val_fraction"] else "test"):
        problems.append(f"{where}: history.json selects on {select_on}, its settings on the other split")
    chosen = history[select_on]
    n_epochs = len(history["epoch_seconds"])
    if n_epochs != settings["epochs"] or any(len(chosen[m]) != n_epochs for m in METRICS):
        problems.append(f"{where}: history.json holds {n_epochs} epochs, its settings {settings['epochs']}")
        return
    scores = [selection_score({m: chosen[m][i] for m in METRICS}) for i in range(n_epochs)]
    best = scores.index(max(scores)) + 1  # the first of equal scores, as in training
    for source, epoch, score in (("history.json", history["best_epoch"], history["best_score"]),
                                 ("results.json", saved["best_epoch"], saved["best_score"])):
        if epoch != best or abs(score - scores[best - 1]) > 1e-12:
            problems.append(f"{where}: {source} gives best epoch {epoch} (score {score}); the report's rule "
                            f"on history.json's {select_on} metrics gives epoch {best} (score {scores[best - 1]})")
    final = saved[select_on]
    if (abs(final["accuracy"] - chosen["accuracy"][best - 1]) > 2 / final["n_images"] + 1e-9
            or abs(final["mean_iou"] - chosen["mean_iou"][best - 1]) > 0.01):
        problems.append(f"{where}: results.json's {select_on} accuracy and mean IoU are not those history.json "
                        f"gives for its best epoch {best}: best_model.pt is not that epoch's model")


def check_experiment(run_dir, results, records, splits, problems):
    """The mean-box baselines, the image-by-image comparison and results.md are what DATA,
    the records and results.json give."""
    compare(run_dir, results["baseline"], {split: mean_box_baseline(splits["train"].boxes, splits[split].boxes)
                                           for split in ("train", "test")}, 1e-9, problems)
    for split in ("train", "test"):  # where both models' records cover the split (else named already)
        if all(len(records.get((key, split), ())) == len(splits[split]) for key, _ in MODELS):
            compare(f"{run_dir} comparison {split}", results["comparison"][split],
                    compare_models(*(records[key, split] for key, _ in MODELS)), 1e-9, problems)
    check_markdown(os.path.join(run_dir, "results.md"), results_markdown(results), problems)


def check_markdown(path, expected, problems):
    try:
        with open(path) as f:
            same = f.read() == expected
    except OSError:
        same = False
    if not same:
        problems.append(f"{path} is missing or not what its results.json gives (results.md is written from it)")


def check_seeds(out_dir, problems):
    """A --seeds OUT: its results.json holds each seed's results.json and their spread, and its
    results.md is what that gives."""
    top = read_json(os.path.join(out_dir, "results.json"), "the results.json of a --seeds run")
    per_seed = {k: read_json(os.path.join(out_dir, f"seed{k}", "results.json"), "a seed's results.json")
                for k in top["seeds"]}
    if top["seeds"] != seed_runs(out_dir) or any(top["per_seed"][str(k)] != r for k, r in per_seed.items()):
        problems.append(f"{out_dir}/results.json: its seeds are not the seed{{k}}/ runs' results.json")
    again = aggregate_results(per_seed, top["settings"]["wall_seconds"])
    if again["aggregate"] != top["aggregate"]:
        problems.append(f"{out_dir}/results.json: its spread over seeds is not the seeds' results'")
    check_markdown(os.path.join(out_dir, "results.md"), results_markdown(top), problems)


# ---------------------------------------------------------------------------------
# The check of an OUT
# ---------------------------------------------------------------------------------
def described(error):
    """A file missing or unreadable (UserError), or edited out of shape, as a problem's text."""
    return str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"


MALFORMED = (UserError, KeyError, TypeError, ValueError, IndexError)


def check(out_dir, data_dir=None, device=torch.device("cpu")):
    """The check of every model and split of OUT. Returns {"lines": a line per split with the
    report's numbers beside the run's, "problems", "evaluated", "models"}."""
    if not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir}: no such directory (an OUT that hw5_main.py wrote)")
    set_gpu_options(strict_fp32=True)  # the reference: float32 without TF32
    report = {"lines": [], "problems": [], "evaluated": 0, "models": 0}
    for run_dir in run_dirs(out_dir):
        try:
            check_run(run_dir, data_dir, device, report)
        except MALFORMED as e:
            report["problems"].append(f"{run_dir}: {described(e)}")
    if seed_runs(out_dir):
        try:
            check_seeds(out_dir, report["problems"])
        except MALFORMED as e:
            report["problems"].append(f"{out_dir}: {described(e)}")
    return report


def check_run(run_dir, data_dir, device, report):
    """One experiment folder: both models, every split."""
    problems = report["problems"]
    results = read_json(os.path.join(run_dir, "results.json"), "the results.json of a finished run")
    tolerance = TOLERANCES[precision(results["settings"])]
    records, loaded = {}, {}
    for key, name in MODELS:
        files = RunFiles(os.path.join(run_dir, key))
        history = files.read_history()
        settings = history["settings"]
        if differ := [k for k in REPORT_SETTINGS if results["settings"].get(k) != settings.get(k)]:
            problems.append(f"{run_dir}: results.json's settings and {key}/history.json's differ in "
                            f"{', '.join(differ)}")
        data = find_data_dir(run_dir, data_dir, settings["data_dir"])
        if (data, settings["val_fraction"]) not in loaded:  # decoded once for both models
            loaded[data, settings["val_fraction"]] = dict(zip(("train", "test", "val"),
                                                              load_splits(data, settings["val_fraction"])))
        splits = loaded[data, settings["val_fraction"]]
        check_history(history, results[key], f"{run_dir} {name}", problems)
        report["models"] += 1
        model = None
        if os.path.exists(files.best):
            model = build_model(settings)
            load_model_state(model, load_checkpoint(files.best), files.best)
            model.to(device)
            report["evaluated"] += 1
        else:
            problems.append(f"MISSING {files.best}: the {name} model cannot be evaluated again")
        for split in [s for s in SPLITS if s in results[key]]:
            where = f"{run_dir} {name} {split}"
            try:
                records[key, split] = check_split(run_dir, key, split, splits[split], results[key][split], model,
                                                  tolerance, settings["raw_boxes"], device, where, problems)
            except MALFORMED as e:
                problems.append(f"{where}: {described(e)}")
            report["lines"].append(summary_line(where, results[key][split], REPORT[key].get(split),
                                                len(splits[split]), model is not None and tolerance))
    check_experiment(run_dir, results, records, splits, problems)


def summary_line(where, saved, report, n_images, tolerance):
    theirs = (f" (report {100 * report['accuracy']:.1f}%)", f" (report {report['mean_iou']:.2f})") if report \
        else ("", "")
    ap50 = saved["coco"]["AP50"]
    again = (f", evaluated again (boxes within {tolerance[0]} px, probabilities within {tolerance[1]})"
             if tolerance else "")
    return (f"{where}: accuracy {100 * saved['accuracy']:.1f}%{theirs[0]}, mean IoU {saved['mean_iou']:.3f}"
            f"{theirs[1]}, AP50 {'n/a' if ap50 is None else f'{100 * ap50:.1f}'}; {n_images} images{again}")


def check_summary(report):
    """What --check prints: a line per split, a line per problem, and the count."""
    return "\n".join(report["lines"] + [p if p.startswith("MISSING") else f"MISMATCH {p}"
                                        for p in report["problems"]]
                     + [f"{len(report['problems'])} problem(s); {report['evaluated']} of {report['models']} "
                        f"models evaluated again"])
