"""grading.py: the TA's check passes an untouched OUT, writes nothing, and fails on each way of
tampering with a handed-in run, even one covered up in results.json, naming the image, the
file or the epoch concerned."""
import os

import pytest
import torch

import grading
import hw5_main
from Dataset import load_split_records
from outputs import read_json, write_json, write_text
from results import results_markdown
from tiny import TINY_DEMO, hw5_args, linked_copy
from utils import IMAGE_SIZE, box_iou_per_image, coco_results, confusion_matrix


def problems_of(out):
    report = grading.check(out)
    assert report["lines"]  # a line per model and split, whatever was found
    return report["problems"]


def edit(path, change):
    """Change a JSON file of a linked copy by replacing it (the original stays as it was);
    returns what change returns."""
    data = read_json(path, "JSON")
    returned = change(data)
    write_json(data, path)
    return returned


def cover_up(out, key, split):
    """What a student covering up an edit of the records would do: results.json's accuracy,
    mean IoU and confusion matrix, and coco_results, recomputed from the records alone."""
    records = read_json(os.path.join(out, key, f"predictions_{split}.json"), "records")
    label, pred = (torch.tensor([r[k] for r in records]) for k in ("label", "pred_label"))
    box, pred_box = (torch.tensor([r[k] for r in records]) / IMAGE_SIZE for k in ("box", "pred_box"))

    def change(results):
        results[key][split].update(accuracy=float((label == pred).double().mean()),
                                   mean_iou=float(box_iou_per_image(pred_box, box).double().mean()),
                                   confusion_matrix=confusion_matrix(label, pred).tolist())
    edit(os.path.join(out, "results.json"), change)
    data = load_split_records(os.path.join(out, "data"), train=split != "test")[0]
    write_json(coco_results([r for r in records if r["file_name"] in data], data), os.path.join(out, key, f"coco_results_{split}.json"))


def records_of(out, key="ciou", split="test"):
    return os.path.join(out, key, f"predictions_{split}.json")


# Each edit of a model's records returns the image it names.
def set_label_to_predicted(records):
    r = next((r for r in records if r["label"] != r["pred_label"]), records[0])
    if r["label"] == r["pred_label"]:  # every image right: make one wrong, then "right" again
        r["pred_label"] = (r["label"] + 1) % 3
    r["label"] = r["pred_label"]
    return r["file_name"]


def set_box_to_predicted(records):
    records[0]["box"], records[0]["iou"] = records[0]["pred_box"], 1.0
    return records[0]["file_name"]


def change_predicted_class(records):
    r = records[0]
    r["pred_label"] = (r["pred_label"] + 1) % 3
    r["scores"] = [float(c == r["pred_label"]) for c in range(3)]  # a confident prediction
    return r["file_name"]


def move_predicted_box(records):
    records[0]["pred_box"] = [v + 2.0 for v in records[0]["pred_box"]]
    return records[0]["file_name"]


def fake_a_near_tie(records):
    """A wrong prediction made right, its probabilities made a near tie, as if it were one."""
    r = next((r for r in records if r["label"] != r["pred_label"]), records[0])
    wrong = r["pred_label"] if r["pred_label"] != r["label"] else (r["label"] + 1) % 3
    r["pred_label"], r["scores"] = r["label"], [0.0] * 3
    r["scores"][r["label"]], r["scores"][wrong] = 0.5004, 0.4996
    return r["file_name"]


def change_an_iou(records):
    records[0]["iou"] = 0.99
    return records[0]["file_name"]


def add_another_splits_record(records):
    records.append({**records[0], "file_name": "COCO_val2014_999999999999.jpg"})
    return "COCO_val2014_999999999999.jpg"


# (the edit, what the problem says)
TAMPERING = {
    "true class set to the prediction": (set_label_to_predicted, "recorded true class is not DATA's"),
    "true box set to the prediction": (set_box_to_predicted, "recorded true box is not DATA's"),
    "a record left out": (lambda records: records.pop(0)["file_name"], "have no record"),
    "a record repeated": (lambda records: records.append(dict(records[0])) or records[0]["file_name"],
                          "more than one record"),
    "a record of another split": (add_another_splits_record, "are not in DATA's split"),
    "a predicted class changed": (change_predicted_class, "predicted as another class when evaluated again"),
    "a wrong class made right, its probabilities a near tie": (fake_a_near_tie, "whose class probabilities move"),
    "a recorded IoU changed": (change_an_iou, "whose recorded IoU is not its boxes'"),
    "a predicted box moved by 2 px": (move_predicted_box, "whose box moves by more than"),
}


@pytest.mark.slow
def test_an_untouched_run_passes_and_nothing_in_it_is_written(tiny_out):
    def tree():
        return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, files in os.walk(tiny_out)
                for f in files}
    before = tree()
    report = grading.check(tiny_out)
    assert report["problems"] == [] and (report["evaluated"], report["models"]) == (2, 2)
    results = read_json(os.path.join(tiny_out, "results.json"), "results")
    test = results["ciou"]["test"]
    assert (f"{tiny_out} CIoU test: accuracy {100 * test['accuracy']:.1f}% (report 88.9%), mean IoU "
            f"{test['mean_iou']:.3f} (report 0.61)") in report["lines"][1]
    assert grading.check_summary(report).endswith("0 problem(s); 2 of 2 models evaluated again")
    assert tree() == before


@pytest.mark.slow
@pytest.mark.parametrize("what", TAMPERING)
def test_each_edit_of_the_records_is_found_even_when_covered_up(tiny_out, tmp_path, what):
    change, said = TAMPERING[what]
    out = linked_copy(tiny_out, tmp_path / "out")
    image = edit(records_of(out), change)
    cover_up(out, "ciou", "test")
    problems = problems_of(out)
    assert any(said in p and "CIoU test" in p and image in p for p in problems), problems


@pytest.mark.slow
def test_numbers_detections_epochs_and_missing_models_are_checked(tiny_out, tmp_path):
    out = linked_copy(tiny_out, tmp_path / "numbers")
    edit(os.path.join(out, "results.json"), lambda r: r["mse"]["test"].update(accuracy=r["mse"]["test"]["accuracy"]
                                                                             + 0.01))
    assert any("MSE test: accuracy is" in p for p in problems_of(out))

    out = linked_copy(tiny_out, tmp_path / "detections")
    edit(os.path.join(out, "mse", "coco_results_train.json"), lambda d: d[0].update(score=0.123))
    assert any("MSE train: coco_results_train.json is not what the predictions give" in p for p in problems_of(out))

    out = linked_copy(tiny_out, tmp_path / "epoch")  # another epoch named the best, in both files
    history = read_json(os.path.join(out, "ciou", "history.json"), "history")
    other = 3 - history["best_epoch"]
    edit(os.path.join(out, "ciou", "history.json"), lambda h: h.update(best_epoch=other))
    edit(os.path.join(out, "results.json"), lambda r: r["ciou"].update(best_epoch=other))
    problems = problems_of(out)
    assert any(f"history.json gives best epoch {other}" in p and f"gives epoch {3 - other}" in p for p in problems)
    assert any(f"results.json gives best epoch {other}" in p for p in problems)

    out = linked_copy(tiny_out, tmp_path / "missing")
    os.remove(os.path.join(out, "ciou", "best_model.pt"))
    report = grading.check(out)
    assert report["problems"] == [f"MISSING {os.path.join(out, 'ciou', 'best_model.pt')}: the CIoU model "
                                  f"cannot be evaluated again"]
    assert grading.check_summary(report).splitlines()[-1] == "1 problem(s); 1 of 2 models evaluated again"
    assert hw5_main.main(hw5_args("--out_dir", out, "--check")) == report["problems"]


@pytest.mark.slow
def test_the_validation_split_is_rebuilt_from_the_settings(tmp_path):
    out = str(tmp_path / "val")
    hw5_main.main(hw5_args("--out_dir", out, *TINY_DEMO, "--val_fraction", "0.25"))
    assert problems_of(out) == []
    edit(records_of(out, "mse", "val"), lambda records: records.pop())
    assert any("MSE val: 1 image(s) of DATA's split have no record" in p for p in problems_of(out))


@pytest.mark.slow
def test_results_md_baselines_settings_and_the_best_epochs_numbers_are_checked(tiny_out, tmp_path):
    def remade_md(results):  # a student keeping results.md in step with an edited results.json
        write_text(results_markdown(results), os.path.join(out, "results.md"))

    out = linked_copy(tiny_out, tmp_path / "md")
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    write_text(md.replace("| CIoU | test |", "| CIoU | test | 9", 1), os.path.join(out, "results.md"))
    assert any("results.md is missing or not what its results.json gives" in p for p in problems_of(out))

    out = linked_copy(tiny_out, tmp_path / "baseline")
    remade_md(edit(os.path.join(out, "results.json"), lambda r: r["baseline"].update(test=0.1) or r))
    assert any(f"{out}: test is 0.1 in results.json" in p for p in problems_of(out))

    out = linked_copy(tiny_out, tmp_path / "settings")
    remade_md(edit(os.path.join(out, "results.json"), lambda r: r["settings"].update(epochs=30) or r))
    assert any("results.json's settings and ciou/history.json's differ in epochs" in p for p in problems_of(out))

    out = linked_copy(tiny_out, tmp_path / "best")  # the best epoch's own numbers, not results.json's
    best = read_json(os.path.join(out, "mse", "history.json"), "history")["best_epoch"]
    edit(os.path.join(out, "mse", "history.json"), lambda h: h["test"]["mean_iou"].__setitem__(best - 1, 0.9))
    assert any("MSE: results.json's test accuracy and mean IoU are not those history.json gives" in p
               for p in problems_of(out))

    out = linked_copy(tiny_out, tmp_path / "gone")  # a missing file is a problem found, not a stop
    os.remove(os.path.join(out, "mse", "predictions_train.json"))
    problems = problems_of(out)
    assert any("MSE train: " in p and "predictions_train.json is missing" in p for p in problems), problems


def test_the_tolerance_follows_how_the_run_computed():
    cpu = {"amp": False, "tf32": False, "strict_fp32": False, "device": "cpu"}
    assert grading.precision(cpu) == "float32"
    assert grading.precision({**cpu, "device": "cuda"}) == "tf32"  # cuDNN's TF32 convolutions, the default
    assert grading.precision({**cpu, "device": "cuda:1", "strict_fp32": True}) == "float32"
    assert grading.precision({**cpu, "device": "cuda", "tf32": True}) == "tf32"
    assert grading.precision({**cpu, "amp": True}) == "bfloat16"
    pixels = [grading.TOLERANCES[p][0] for p in ("float32", "tf32", "bfloat16")]
    assert pixels == sorted(pixels)
