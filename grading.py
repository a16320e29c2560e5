"""The TA's check of a handed-in OUT (`python hw5_main.py --out_dir OUT --check`), reading
only. Every truth comes from DATA, never from the run's records: each split is rebuilt from
DATA and the run's settings and must be covered by the records once, image by image; every
number of results.json is recomputed from DATA's truth and the records' predictions; the
report's selection rule is applied again to history.json; and each model's best_model.pt is
evaluated again and compared with its records image by image (docs/grading.md)."""
import logging
import os
from collections import Counter

import torch

from checkpoints import RunFiles, load_checkpoint, load_model_state
from cli import UserError
from Dataset import MyCOCODataset, hold_out, load_split_records
from devices import DeviceBatches, set_gpu_options
from network import build_model
from outputs import read_json
from results import MODELS, REPORT, SPLITS, find_data_dir, read_predictions, run_dirs
from train import METRICS, selection_score
from utils import (IMAGE_SIZE, box_iou_per_image, coco_ground_truth, coco_metrics, coco_results,
                   confusion_matrix, evaluation, predictions_from_records)

log = logging.getLogger("grading")

# A model evaluated again on the TA's machine, against its records: the largest difference
# of a box coordinate (pixels of the 256x256 image), and the margin between the run's top two
# class probabilities under which the predicted class may flip. By how the run computed:
# float32 (the CPU, or CUDA with --strict_fp32), TF32 convolutions (CUDA's default, as the
# report's run), bfloat16 autocast (--amp). Measured: docs/grading.md.
TOLERANCES = {"float32": (0.5, 1e-3), "tf32": (2.0, 1e-2), "bfloat16": (8.0, 5e-2)}
NAMED = 10  # files named per kind of mismatch; the rest are counted


def precision(settings):
    """How a run computed, for TOLERANCES."""
    if settings["amp"]:
        return "bfloat16"
    on_cuda = settings["device"].startswith("cuda")
    return "tf32" if on_cuda and (settings["tf32"] or not settings["strict_fp32"]) else "float32"


def split_files(data_dir, settings):
    """Each split's files, rebuilt from DATA and the run's settings (--val_fraction's part)."""
    splits = {"train": sorted(load_split_records(data_dir, train=True)[0]),
              "test": sorted(load_split_records(data_dir, train=False)[0])}
    if settings["val_fraction"]:
        splits["train"], splits["val"] = hold_out(splits["train"], settings["val_fraction"])
    return splits


def named(files, what):
    shown = ", ".join(files[:NAMED]) + (f" and {len(files) - NAMED} more" if len(files) > NAMED else "")
    return f"{len(files)} image(s) {what}: {shown}"


def check_coverage(records, expected, where, problems):
    """Every image of the split once: a missing, extra or repeated record is named."""
    counts = Counter(r["file_name"] for r in records)
    expected_set = set(expected)
    for files, what in (([f for f in expected if f not in counts], "of DATA's split have no record"),
                        (sorted(f for f in counts if f not in expected_set), "are not in DATA's split"),
                        (sorted(f for f, n in counts.items() if n > 1), "have more than one record")):
        if files:
            problems.append(f"{where}: {named(files, what)}")


def check_truth(records, dataset, where, problems):
    """The records' true class and box against DATA's."""
    truth = predictions_from_records(records)
    wrong_class = (truth["label"] != dataset.labels).nonzero().flatten().tolist()
    wrong_box = ((truth["box"] - dataset.boxes).abs().amax(1) * IMAGE_SIZE > 1e-3).nonzero().flatten().tolist()
    for index, what in ((wrong_class, "whose recorded true class is not DATA's"),
                        (wrong_box, "whose recorded true box is not DATA's")):
        if index:
            problems.append(f"{where}: {named([records[i]['file_name'] for i in index], what)}")


def recompute(records, dataset):
    """Accuracy, mean IoU and confusion matrix of the records' predictions against DATA's truth."""
    p = predictions_from_records(records)
    return {"accuracy": float((p["pred_label"] == dataset.labels).double().mean()),
            "mean_iou": float(box_iou_per_image(p["pred_box"], dataset.boxes).double().mean()),
            "confusion_matrix": confusion_matrix(dataset.labels, p["pred_label"]).tolist()}


def compare(where, saved, recomputed, tolerance, problems):
    for k, v in recomputed.items():
        close = abs(v - saved[k]) <= tolerance if isinstance(v, float) and saved[k] is not None else v == saved[k]
        if not close:
            problems.append(f"{where}: {k} is {saved[k]} in results.json, {v} recomputed")


def check_detections(records, dataset, path, where, saved, problems):
    """coco_results_{split}.json against the records, and its COCO AP against results.json."""
    detections = read_json(path, "COCO-format detections")
    by_image = {d["image_id"]: d for d in detections}
    expected = coco_results(records, dataset.data)

    def agrees(e, d):
        return d is not None and d["category_id"] == e["category_id"] and all(
            abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(d["bbox"] + [d["score"]], e["bbox"] + [e["score"]]))
    differ = [r["file_name"] for r, e in zip(records, expected) if not agrees(e, by_image.get(e["image_id"]))]
    if len(detections) != len(expected) or differ:
        problems.append(f"{where}: {os.path.basename(path)} does not match the predictions ({len(detections)} "
                        f"detections for {len(expected)} records" + (f"; {named(differ, 'differ')})" if differ else ")"))
    ids = {e["image_id"] for e in expected}
    coco = coco_metrics(coco_ground_truth(dataset.files, dataset.data), [d for d in detections if d["image_id"] in ids])
    compare(where, saved["coco"], {k: coco[k] for k in ("AP", "AP50", "AP75")}, 1e-9, problems)


def check_selection(history, saved, where, problems):
    """The report's rule applied again to history.json's per-epoch metrics."""
    chosen = history[history["select_on"]]
    scores = [selection_score({m: chosen[m][i] for m in METRICS}) for i in range(len(chosen["accuracy"]))]
    best = scores.index(max(scores)) + 1  # the first of equal scores, as in training
    for source, epoch, score in (("history.json", history["best_epoch"], history["best_score"]),
                                 ("results.json", saved["best_epoch"], saved["best_score"])):
        if epoch != best or abs(score - scores[best - 1]) > 1e-12:
            problems.append(f"{where}: {source} gives best epoch {epoch} (score {score}); the report's rule "
                            f"on history.json's {history['select_on']} metrics gives epoch {best} "
                            f"(score {scores[best - 1]})")


def check_again(model, records, dataset, settings, device, where, problems):
    """The model evaluated again, image by image against the records, within TOLERANCES."""
    pixels, margin = TOLERANCES[precision(settings)]
    again = evaluation(model, DeviceBatches(dataset, 64, device), torch.nn.CrossEntropyLoss(),
                       lambda p, t: p.new_zeros(()), device, order=not settings["raw_boxes"],
                       amp=settings["amp"])[1]["predictions"]
    saved = predictions_from_records(records)
    top2 = saved["scores"].topk(2, dim=1).values
    flipped = (again["pred_label"] != saved["pred_label"]) & (top2[:, 0] - top2[:, 1] > margin)
    moved = (again["pred_box"] - saved["pred_box"]).abs().amax(1) * IMAGE_SIZE > pixels
    for mask, what in ((flipped, "predicted as another class when evaluated again"),
                       (moved, f"whose box moves by more than {pixels} px when evaluated again")):
        if mask.any():
            problems.append(f"{where}: {named([records[i]['file_name'] for i in mask.nonzero().flatten()], what)}")


def check(out_dir, data_dir=None, device=torch.device("cpu")):
    """The check of every model and split of OUT. Returns {"lines": a line per split with
    the report's numbers beside the run's, "problems", "evaluated", "models"}."""
    if not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir}: no such directory (an OUT that hw5_main.py wrote)")
    set_gpu_options(strict_fp32=True)  # the reference: float32 without TF32
    report = {"lines": [], "problems": [], "evaluated": 0, "models": 0}
    problems, datasets = report["problems"], {}
    for run_dir in run_dirs(out_dir):
        results = read_json(os.path.join(run_dir, "results.json"), "the results.json of a finished run")
        for key, name in MODELS:
            files = RunFiles(os.path.join(run_dir, key))
            history = files.read_history()
            settings = history["settings"]
            data = find_data_dir(run_dir, data_dir, settings["data_dir"])
            splits = split_files(data, settings)
            check_selection(history, results[key], f"{run_dir} {name}", problems)
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
                    check_split(run_dir, key, split, splits[split], data, settings, results[key][split],
                                model, device, datasets, where, problems)
                except (KeyError, TypeError, ValueError, IndexError) as e:  # a record edited out of shape
                    problems.append(f"{where}: malformed predictions or results ({type(e).__name__}: {e})")
                report["lines"].append(summary_line(where, results[key][split], REPORT[key].get(split),
                                                    len(splits[split]), model is not None))
    return report


def check_split(run_dir, key, split, expected, data, settings, saved, model, device, datasets, where, problems):
    """One model's records of one split, against DATA and, where it is there, the model."""
    records = read_predictions(run_dir, key, split)
    check_coverage(records, expected, where, problems)
    by_file = {r["file_name"]: r for r in records}
    records = [by_file[f] for f in expected if f in by_file]
    if (data, split) not in datasets:  # decoded once for both models
        datasets[data, split] = MyCOCODataset(data, train=split != "test", files=expected)
    dataset = datasets[data, split].subset([r["file_name"] for r in records])
    check_truth(records, dataset, where, problems)
    compare(where, saved, recompute(records, dataset), 1e-6, problems)
    check_detections(records, dataset, os.path.join(run_dir, key, f"coco_results_{split}.json"), where,
                     saved, problems)
    if model is not None:
        check_again(model, records, dataset, settings, device, where, problems)


def summary_line(where, saved, report, n_images, evaluated):
    theirs = (f" (report {100 * report['accuracy']:.1f}%)", f" (report {report['mean_iou']:.2f})") if report \
        else ("", "")
    ap50 = saved["coco"]["AP50"]
    return (f"{where}: accuracy {100 * saved['accuracy']:.1f}%{theirs[0]}, mean IoU {saved['mean_iou']:.3f}"
            f"{theirs[1]}, AP50 {'n/a' if ap50 is None else f'{100 * ap50:.1f}'}; {n_images} images"
            + (", evaluated again" if evaluated else ""))


def check_summary(report):
    """What --check prints: a line per split, a line per problem, and the count."""
    return "\n".join(report["lines"] + [f"MISMATCH {p}" if not p.startswith("MISSING") else p
                                        for p in report["problems"]]
                     + [f"{len(report['problems'])} problem(s); {report['evaluated']} of {report['models']} "
                        f"models evaluated again"])
