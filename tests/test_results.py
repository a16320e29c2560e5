"""results.py: results.md, the page a TA reads first (the report's numbers beside the run's,
the verdicts, what differs from the report, every figure under its report number), the
seed aggregate, and the figures drawn again from saved predictions."""
import os
import re
import shutil

import cv2
import pytest

import hw5_main
import results
from cli import UserError
from outputs import read_json, write_json
from tiny import hw5_args, linked_copy

FIGURES = [f"{model}_{split}_{kind}.png" for model in ("ciou", "mse") for split in ("train", "test")
           for kind in ("cm", "preds")] + ["ciou_curves.png", "mse_curves.png", "ciou_vs_mse_train.png",
                                           "ciou_vs_mse_test.png", "sample_images.png"]


@pytest.mark.slow
def test_results_md_embeds_every_figure_under_its_report_number_and_states_the_verdicts(tiny_out):
    with open(os.path.join(tiny_out, "results.md")) as f:
        md = f.read()
    links = re.findall(r"\]\(([^)]+)\)", md)
    assert sorted(link for link in links if link.endswith(".png")) == sorted(FIGURES)
    assert all(os.path.isfile(os.path.join(tiny_out, link)) for link in links), links
    for number, files in (("14", "ciou_train_cm.png) ![mse_train_cm.png"), ("15", "ciou_train_preds"),
                          ("16", "mse_train_preds"), ("17", "ciou_test_cm.png) ![mse_test_cm.png"),
                          ("18", "ciou_test_preds"), ("19", "mse_test_preds"), ("20", "ciou_curves")):
        assert re.search(rf"### Fig\. {number}:[^\n]*\n\n!\[[^\n]*{re.escape(files)}", md), number
    saved = read_json(os.path.join(tiny_out, "results.json"), "results")
    for split, key, name, report in (("train", "ciou", "CIoU", "99.6% | 0.68"), ("test", "mse", "MSE", "89.6% | 0.57")):
        r = saved[key][split]
        assert (f"| {name} | {split} | {100 * r['accuracy']:.1f}% | {r['mean_iou']:.3f} | {report} | "
                f"{saved['baseline'][split]:.3f} | {100 * r['coco']['AP50']:.1f} | {100 * r['coco']['AP']:.1f} |") in md
    assert "- Classification (test accuracy): " in md and "- Boxes (test mean IoU): " in md
    assert "- `--epochs 2` (the report's: `--epochs 30`)" in md and "synthetic drawings" in md


def test_the_verdicts_set_the_run_against_the_reports_order():
    def verdicts(ciou, mse):
        return results.verdict_lines({"ciou": dict(zip(("accuracy", "mean_iou"), ciou)),
                                      "mse": dict(zip(("accuracy", "mean_iou"), mse))})
    same = verdicts((0.90, 0.62), (0.91, 0.58))
    assert same[0] == ("- Classification (test accuracy): MSE is the better, as in the report (MSE 91.0% against "
                       "CIoU 90.0%; the report: MSE 89.6% against CIoU 88.9%).")
    assert same[1].startswith("- Boxes (test mean IoU): CIoU is the better, as in the report (CIoU 0.620 against "
                              "MSE 0.580; the report: CIoU 0.61 against MSE 0.57)")
    reverse = verdicts((0.95, 0.55), (0.91, 0.60))
    assert "CIoU is the better, the reverse of the report" in reverse[0]
    assert "MSE is the better, the reverse of the report" in reverse[1]
    assert "the two are equal" in verdicts((0.9, 0.6), (0.9, 0.6))[0]


def test_every_setting_that_differs_from_the_reports_is_named():
    report = {**results.REPORT_SETTINGS, **results.REPORT_IMAGES, "demo": False}
    assert results.differing_settings(report) == ["- none"]
    ours = {**report, "raw_boxes": False, "single_backward": True, "lr_schedule": "cosine", "n_test": 560}
    lines = results.differing_settings(ours)
    assert len(lines) == 4 and lines[0].startswith("- `--lr_schedule cosine` (the report's: `--lr_schedule constant`)")
    assert any(line.startswith("- no `--raw_boxes` (the report's: `--raw_boxes`): the box head's output is ordered")
               for line in lines)
    assert "- n_test 560 (the report's: 1972)" in lines


def test_figure_titles_carry_the_reports_numbers():
    assert results.figure_title("mse_train_preds.png", "MSE model on train data").startswith("Fig. 16 (report): ")
    assert results.figure_title("ciou_train_cm.png", "x") == "Fig. 14(a) (report): x"
    assert results.figure_title("mse_test_cm.png", "x") == "Fig. 17(b) (report): x"
    assert results.figure_title("ciou_curves.png", "x") == "Fig. 20 (report): x"
    assert results.figure_title("mse_curves.png", "x") == "x (not in the report)"


@pytest.mark.slow
def test_redraw_rewrites_every_figure_pixel_for_pixel_from_the_saved_run(tiny_out, tmp_path):
    out = linked_copy(tiny_out, tmp_path / "out")
    first = {name: cv2.imread(os.path.join(out, name)) for name in FIGURES}
    for name in FIGURES:
        os.remove(os.path.join(out, name))
    hw5_main.main(hw5_args("--out_dir", out, "--redraw"))
    for name in FIGURES:
        assert (cv2.imread(os.path.join(out, name)) == first[name]).all(), name
    for key in ("ciou", "mse"):  # handed in from another machine: the DATA its runs name is not here
        history = read_json(os.path.join(out, key, "history.json"), "history")
        history["settings"]["data_dir"] = "/elsewhere/data"
        write_json(history, os.path.join(out, key, "history.json"))
    os.remove(os.path.join(out, "ciou_test_preds.png"))
    hw5_main.main(hw5_args("--out_dir", out, "--redraw"))  # the demo's DATA inside OUT
    assert (cv2.imread(os.path.join(out, "ciou_test_preds.png")) == first["ciou_test_preds.png"]).all()
    with pytest.raises(UserError, match="no such directory"):
        hw5_main.main(hw5_args("--out_dir", str(tmp_path / "nowhere"), "--redraw"))
    shutil.rmtree(os.path.join(out, "data"))
    with pytest.raises(UserError, match="the dataset of .* is not at /elsewhere/data: give --data_dir DATA"):
        hw5_main.main(hw5_args("--out_dir", out, "--redraw"))


def test_spread_of_numbers_nested_and_missing():
    assert results.spread([1.0, 2.0, 4.0]) == pytest.approx(
        {"mean": 7 / 3, "std": (((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2) ** 0.5,
         "min": 1.0, "max": 4.0})
    got = results.aggregate_numbers([{"a": 1, "m": [[1]], "c": {"AP": 0.5, "bus": None}},
                                      {"a": 3, "m": [[2]], "c": {"AP": 0.7, "bus": None}}])
    assert got["a"]["mean"] == 2 and got["a"]["std"] == pytest.approx(2 ** 0.5)
    assert "m" not in got and got["c"]["AP"]["max"] == 0.7 and got["c"]["bus"] is None


def test_the_image_by_image_comparison_counts():
    def record(iou):
        return {"label": 0, "pred_label": 0, "scores": [1, 0, 0], "box": [0, 0, 1, 1], "pred_box": [0, 0, 1, 1],
                "iou": iou}
    c = results.compare_models([record(v) for v in (0.5, 0.2, 0.7)], [record(v) for v in (0.6, 0.2, 0.1)])
    assert (c["n_images"], c["mse_better"], c["ciou_better"], c["equal"]) == (3, 1, 1, 1)
    assert c["mean_iou_difference"] == pytest.approx((0.1 + 0 - 0.6) / 3, abs=1e-7)
