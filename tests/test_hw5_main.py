"""hw5_main.py: the two-model experiment writes every output; its options are checked."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import hw5_main
import results
from cli import UserError
from tiny import DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIGURES = [f"{model}_{split}_{kind}.png" for model in ("ciou", "mse")
           for split in ("train", "test") for kind in ("cm", "preds")] + [
    "ciou_curves.png", "mse_curves.png", "ciou_vs_mse_train.png", "ciou_vs_mse_test.png"]


# A tiny run of a small HW5Net on the CPU, where the network is not what is tested.
TINY_TRAINING = ["--epochs", "1", "--batch_size", "4", "--quiet", "--width", "2", "--n_blocks", "1",
                 "--device", "cpu"]
TINY_DEMO = ["--demo", "--n_train", "24", "--n_val", "12", *TINY_TRAINING]


def parse(*argv):
    return hw5_main.resolve_args(hw5_main.get_args_parser().parse_args(list(argv)))


def test_demo_on_a_tiny_synthetic_set_writes_every_output(tmp_path):
    out = str(tmp_path / "demo")
    results = hw5_main.main(parse("--demo", "--out_dir", out, "--n_train", "24", "--n_val", "12",
                                  "--epochs", "1", "--batch_size", "4", "--quiet", "--device", DEVICE))
    # The demo made and built its data inside OUT.
    assert os.path.exists(os.path.join(out, "synthetic_coco", "annotations", "instances_train2014.json"))
    assert os.path.exists(os.path.join(out, "data", "sample_images.png"))
    for name in FIGURES + ["model_sum.txt", "results.json", "results.md"]:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    for model in ("ciou", "mse"):  # finished: no checkpoint.pt (2.5 GB each) is left
        assert sorted(os.listdir(os.path.join(out, model))) == [
            ".lock", "best_model.pt", "coco_results_test.json", "coco_results_train.json", "history.json",
            "predictions_test.json", "predictions_train.json"]
    leftovers = [f for _, _, files in os.walk(out) for f in files if ".tmp" in f]
    assert leftovers == []

    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    n_train, n_test = saved["settings"]["n_train"], saved["settings"]["n_test"]
    for model in ("ciou", "mse"):
        for split, n in (("train", n_train), ("test", n_test)):
            r = saved[model][split]
            assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["mean_iou"] <= 1.0
            assert r["n_images"] == n and sum(map(sum, r["confusion_matrix"])) == n
            # accuracy is the confusion matrix's trace over its total
            trace = sum(r["confusion_matrix"][i][i] for i in range(3))
            assert r["accuracy"] == pytest.approx(trace / n)
        assert saved[model]["best_epoch"] == 1 and saved[model]["epochs_trained"] == 1
        assert saved[model]["skipped_steps"] == 0
        assert saved[model]["files_written"] == 1 and saved[model]["save_seconds"] >= 0
    for split, n in (("train", n_train), ("test", n_test)):  # image by image, from the predictions
        iou = {}
        for model in ("ciou", "mse"):
            with open(os.path.join(out, model, f"predictions_{split}.json")) as f:
                iou[model] = [r["iou"] for r in json.load(f)]
        diff = [m - c for c, m in zip(iou["ciou"], iou["mse"])]
        c = saved["comparison"][split]
        assert (c["mse_better"], c["ciou_better"], c["equal"]) == (
            sum(d > 0 for d in diff), sum(d < 0 for d in diff), sum(d == 0 for d in diff))
        assert c["n_images"] == n and c["mean_iou_difference"] == pytest.approx(sum(diff) / n)
    s = saved["settings"]
    assert s["demo"] is True and s["epochs"] == 1 and s["device"] == DEVICE
    assert s["backward"] == "single" and s["parameters"] == 211_083_307
    assert 0.0 < saved["baseline"]["mean_box_test_iou"] < 1.0

    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    ciou_test = saved["ciou"]["test"]
    assert f"| CIoU | test | {100 * ciou_test['accuracy']:.1f}% | {ciou_test['mean_iou']:.3f} | 88.9% | 0.61 |" in md
    assert "Mean-box baseline" in md and "synthetic data" in md

    # Predictions on disk, per model and split, agree with the numbers; COCO's results
    # format loads into pycocotools; the COCO metrics are in results.json.
    from pycocotools.coco import COCO
    for model in ("ciou", "mse"):
        for split, n in (("train", n_train), ("test", n_test)):
            with open(os.path.join(out, model, f"predictions_{split}.json")) as f:
                preds = json.load(f)
            assert len(preds) == n and set(preds[0]) == {"file_name", "image_id", "label", "pred_label",
                                                          "scores", "box", "pred_box", "iou"}
            r = saved[model][split]
            assert sum(p["label"] == p["pred_label"] for p in preds) / n == pytest.approx(r["accuracy"])
            assert sum(p["iou"] for p in preds) / n == pytest.approx(r["mean_iou"])
            assert all(abs(sum(p["scores"]) - 1) < 1e-5 and p["pred_label"] == max(range(3), key=p["scores"].__getitem__)
                       for p in preds)
            gt = COCO(os.path.join(out, "synthetic_coco", "annotations",
                                   f"instances_{'train' if split == 'train' else 'val'}2014.json"))
            detections = gt.loadRes(os.path.join(out, model, f"coco_results_{split}.json"))
            assert len(detections.getAnnIds()) == n
            coco = r["coco"]
            assert set(coco) == {"AP", "AP50", "AP75", "per_class"} and 0.0 <= coco["AP"] <= coco["AP50"] <= 1.0
            assert set(coco["per_class"]) == {"bus", "cat", "pizza"}
    assert "COCO detection metrics" in md

    # Every figure drawn again from OUT alone (no model) is the same, pixel for pixel.
    import cv2
    first = {name: cv2.imread(os.path.join(out, name)) for name in FIGURES}
    for name in FIGURES:
        os.remove(os.path.join(out, name))
    hw5_main.main(parse("--out_dir", out, "--redraw"))
    for name in FIGURES:
        assert (cv2.imread(os.path.join(out, name)) == first[name]).all(), name

    # The best CIoU model's weights give the recorded test accuracy.
    from Dataset import MyCOCODataset
    from network import HW5Net
    device = torch.device(DEVICE)
    model = HW5Net()
    model.load_state_dict(torch.load(os.path.join(out, "ciou", "best_model.pt"), weights_only=True))
    model.to(device).eval()
    test_set = MyCOCODataset(os.path.join(out, "data"), train=False)
    with torch.no_grad():
        logits, _ = model(test_set.images.to(device).float() / 255)
        logits = logits.cpu()
    assert (logits.argmax(1) == test_set.labels).double().mean().item() == pytest.approx(ciou_test["accuracy"])

    # The TA's check: the numbers recomputed from the predictions and by evaluating the models
    # again agree with results.json, and nothing in OUT is written; a changed number is found.
    def tree():
        return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
                for d, _, files in os.walk(out) for f in files}
    before = tree()
    assert hw5_main.main(parse("--out_dir", out, "--check", "--device", DEVICE)) == []
    assert tree() == before
    results_path = os.path.join(out, "results.json")
    with open(results_path) as f:
        original = f.read()
    tampered = json.loads(original)
    tampered["mse"]["test"]["accuracy"] += 0.01
    tampered["ciou"]["train"]["confusion_matrix"][0][0] += 1
    with open(results_path, "w") as f:
        json.dump(tampered, f)
    problems = hw5_main.main(parse("--out_dir", out, "--check", "--device", DEVICE))
    assert len(problems) == 3  # the matrix; the accuracy from the predictions and evaluated again
    assert any("MSE test: accuracy" in p for p in problems)
    assert any("CIoU train: confusion_matrix" in p for p in problems)
    with open(results_path, "w") as f:
        f.write(original)
    predictions_path = os.path.join(out, "ciou", "predictions_test.json")  # a box moved
    with open(predictions_path) as f:
        original = f.read()
    tampered = json.loads(original)
    tampered[0]["pred_box"] = tampered[0]["box"]  # its IoU 1, the record's left as it was
    with open(predictions_path, "w") as f:
        json.dump(tampered, f)
    problems = hw5_main.main(parse("--out_dir", out, "--check", "--device", DEVICE))
    assert len(problems) == 1 and "CIoU test: mean_iou" in problems[0], problems
    with open(predictions_path, "w") as f:
        f.write(original)

    # A second run into the same OUT is refused before any work; so is going on with its
    # data drawn otherwise, or with a --seeds run into it.
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        hw5_main.main(parse("--demo", "--out_dir", out, "--n_train", "24", "--quiet"))
    with pytest.raises(UserError, match="was drawn with --n_train 24 .now 30.; give the same options"):
        hw5_main.main(parse("--demo", "--out_dir", out, "--n_train", "30", "--n_val", "12", "--epochs", "1",
                            "--batch_size", "4", "--quiet", "--resume", "--device", DEVICE))
    with pytest.raises(UserError, match="holds a single run"):
        hw5_main.main(parse("--out_dir", out, "--seeds", "0", "1", "--resume", *TINY_DEMO))
    assert "- n_val (images held out of training for validation, --val_fraction): 0" in md
    assert "- n_synthetic_val (synthetic val2014 images drawn, --n_val): 12" in md

    # Interrupted after the CIoU model: --resume evaluates the finished CIoU model without
    # training it again, trains the MSE model from its start, and ends with the same results.
    shutil.rmtree(os.path.join(out, "mse"))
    os.remove(os.path.join(out, "results.json"))
    ciou_best_mtime = os.path.getmtime(os.path.join(out, "ciou", "best_model.pt"))
    resumed = hw5_main.main(parse("--demo", "--out_dir", out, "--n_train", "24", "--n_val", "12",
                                  "--epochs", "1", "--batch_size", "4", "--quiet", "--resume", "--device", DEVICE))
    assert os.path.getmtime(os.path.join(out, "ciou", "best_model.pt")) == ciou_best_mtime
    for model in ("ciou", "mse"):
        for split in ("train", "test"):
            for metric in ("accuracy", "mean_iou", "confusion_matrix"):
                assert resumed[model][split][metric] == results[model][split][metric], (model, split, metric)

    # A handed-in OUT is redrawn where it lands: the demo's DATA moves with it.
    import cv2
    first = cv2.imread(os.path.join(out, "ciou_test_preds.png"))
    moved = str(tmp_path / "handed_in")
    shutil.move(out, moved)
    os.remove(os.path.join(moved, "ciou_test_preds.png"))
    hw5_main.main(parse("--out_dir", moved, "--redraw"))
    assert (cv2.imread(os.path.join(moved, "ciou_test_preds.png")) == first).all()
    with pytest.raises(UserError, match="no such directory"):
        hw5_main.main(parse("--out_dir", str(tmp_path / "nowhere"), "--redraw"))
    shutil.rmtree(os.path.join(moved, "data"))
    with pytest.raises(UserError, match="give --data_dir DATA"):
        hw5_main.main(parse("--out_dir", moved, "--redraw"))


def test_options_resolve_to_the_report_or_the_demo():
    full = parse("--data_dir", "d", "--out_dir", "o")
    assert full.epochs == 30 and full.single_backward is False and full.batch_size == 16
    assert full.lr_schedule == "constant" and full.warmup_epochs == 0 and full.lr == 1e-3
    demo = parse("--demo", "--out_dir", "o")
    assert demo.epochs == hw5_main.DEMO["epochs"] and demo.single_backward is True
    assert demo.lr_schedule == "cosine" and demo.warmup_epochs == 1 and demo.lr == 1e-3
    assert parse("--demo", "--out_dir", "o", "--lr_schedule", "constant").lr_schedule == "constant"
    assert demo.n_train == hw5_main.DEMO["n_train"]
    assert parse("--demo", "--out_dir", "o", "--epochs", "2").epochs == 2
    assert parse("--data_dir", "d", "--out_dir", "o", "--single_backward").single_backward is True
    with pytest.raises(UserError, match="one of the two"):
        parse("--out_dir", "o")
    with pytest.raises(UserError, match="one of the two"):
        parse("--demo", "--data_dir", "d", "--out_dir", "o")
    with pytest.raises(UserError, match="--n_train applies to --demo only"):
        parse("--data_dir", "d", "--out_dir", "o", "--n_train", "5")


def test_options_that_cannot_train_stop_before_the_demo_draws_its_data(tmp_path):
    for extra, message in ((["--epochs", "0"], "--epochs must be at least 1"),
                           (["--batch_size", "1"], "--batch_size 1: BatchNorm needs at least 2"),
                           (["--warmup_epochs", "9"], "--warmup_epochs must lie")):
        out = tmp_path / "demo"
        with pytest.raises(UserError, match=message):
            hw5_main.main(parse(*TINY_DEMO, "--out_dir", str(out), *extra))
        assert not out.exists()


def test_mean_box_baseline():
    train_boxes = torch.tensor([[0.0, 0.0, 0.4, 0.5], [0.0, 0.0, 0.6, 0.5]])  # mean [0, 0, .5, .5]
    test_boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0]])
    assert hw5_main.mean_box_baseline(train_boxes, test_boxes) == pytest.approx((1 + 0 + 0.5) / 3)


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """One `--seeds 0 1` run, shared by the tests that read it (each copies before changing it)."""
    out = str(tmp_path_factory.mktemp("two_seeds") / "seeds")
    return out, hw5_main.main(parse("--out_dir", out, "--seeds", "0", "1", *TINY_DEMO))


def test_seeds_run_the_experiment_per_seed_and_aggregate_their_spread(two_seeds, tmp_path):
    import statistics
    out = str(tmp_path / "seeds")
    shutil.copytree(two_seeds[0], out)
    results = two_seeds[1]
    assert os.listdir(os.path.join(out, "data"))  # the data is built once, beside the seeds
    assert not os.path.exists(os.path.join(out, "seed0", "data"))
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results)) and saved["seeds"] == [0, 1]
    runs = []
    for seed in (0, 1):
        with open(os.path.join(out, f"seed{seed}", "results.json")) as f:
            runs.append(json.load(f))
        assert runs[-1]["settings"]["seed"] == seed
        assert os.path.exists(os.path.join(out, f"seed{seed}", "ciou_test_preds.png"))
    assert runs[0]["settings"]["n_train"] == runs[1]["settings"]["n_train"]
    # Different seeds, different training: the two runs are not copies of each other.
    assert runs[0]["ciou"]["test"]["box_loss"] != runs[1]["ciou"]["test"]["box_loss"]
    for model in ("ciou", "mse"):
        assert set(saved["aggregate"][model]) == {"train", "test", "best_epoch"}
        for split in ("train", "test"):
            agg = saved["aggregate"][model][split]
            assert {"accuracy", "mean_iou", "cross_entropy", "box_loss"} <= set(agg)
            for metric in ("accuracy", "mean_iou", "box_loss"):
                values = [run[model][split][metric] for run in runs]
                assert agg[metric] == pytest.approx({"mean": statistics.mean(values),
                                                     "std": statistics.stdev(values),
                                                     "min": min(values), "max": max(values)})
    diffs = [run["comparison"]["test"]["mean_iou_difference"] for run in runs]
    assert saved["aggregate"]["comparison"]["test"]["mean_iou_difference"]["mean"] == pytest.approx(
        statistics.mean(diffs))
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    for seed, run in zip((0, 1), runs):
        r = run["mse"]
        assert (f"| {seed} | MSE | {r['best_epoch']} of 1 | {100 * r['train']['accuracy']:.1f}% | "
                f"{r['train']['mean_iou']:.3f} | {100 * r['test']['accuracy']:.1f}% | "
                f"{r['test']['mean_iou']:.3f} |") in md
    a = saved["aggregate"]["ciou"]["test"]["accuracy"]
    assert f"| CIoU | test | {100 * a['mean']:.1f}% ± {100 * a['std']:.1f} " in md

    # Each seed resumes like a single run: a seed whose MSE model was lost is completed.
    shutil.rmtree(os.path.join(out, "seed1", "mse"))
    with pytest.raises(UserError, match="already holds a run"):
        hw5_main.main(parse("--out_dir", out, "--seeds", "0", "1", *TINY_DEMO))
    resumed = hw5_main.main(parse("--out_dir", out, "--seeds", "0", "1", "--resume", *TINY_DEMO))
    assert resumed["aggregate"] == saved["aggregate"]
    assert resumed["settings"]["earlier_wall_seconds"] == [saved["settings"]["wall_seconds"]]
    # The aggregate is never overwritten by a single run, nor made over some seeds only.
    for seeds, message in ((["--seeds", "0"], "give --seeds all of them"), ([], "holds a --seeds run .seeds 0 1."),
                           (["--seeds", "1", "2"], "give --seeds all of them")):
        with pytest.raises(UserError, match=message):
            hw5_main.main(parse("--out_dir", out, *seeds, "--resume", *TINY_DEMO))
    # A --seeds run stopped with only its first seed done goes on as a --seeds run.
    shutil.rmtree(os.path.join(out, "seed1"))
    os.remove(os.path.join(out, "results.json"))
    one = hw5_main.main(parse("--out_dir", out, "--seeds", "0", "--resume", *TINY_DEMO))
    assert one["seeds"] == [0] and "earlier_wall_seconds" not in one["settings"]
    assert one["aggregate"]["ciou"]["test"]["accuracy"]["mean"] == saved["per_seed"]["0"]["ciou"]["test"]["accuracy"]


TIMINGS = ("wall_seconds", "earlier_wall_seconds", "train_seconds", "save_seconds")


def without_timings(obj):
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMINGS}
    return [without_timings(v) for v in obj] if isinstance(obj, list) else obj


def test_seeds_run_as_separate_processes_and_aggregated_equal_one_process(two_seeds, tmp_path):
    """Two array tasks (--seed_index 0 and 1, each its own process, one building the demo's
    data while the other waits for it) and then --aggregate write what --seeds writes in
    one process; only timings differ. A seed not finished is named."""
    together = two_seeds[0]
    apart = str(tmp_path / "apart")
    task = [sys.executable, "hw5_main.py", "--out_dir", apart, "--seeds", "0", "1", "--resume", *TINY_DEMO]
    tasks = [subprocess.Popen([*task, "--seed_index", str(i)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    logs = [t.communicate(timeout=600)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], logs
    assert sum("reusing the dataset" in log for log in logs) == 1  # built once
    assert all("starting a new run in" in log for log in logs)
    assert not os.path.exists(os.path.join(apart, "results.json"))  # a task writes its seed only
    with pytest.raises(UserError, match=r"seed\(s\) 2 of 0 1 2 have not finished"):
        hw5_main.main(parse("--out_dir", apart, "--aggregate", "--seeds", "0", "1", "2"))
    aggregated = hw5_main.main(parse("--out_dir", apart, "--aggregate"))
    with open(os.path.join(together, "results.json")) as f:
        one_process = json.load(f)
    with open(os.path.join(apart, "results.json")) as f:
        assert json.load(f) == json.loads(json.dumps(aggregated))
    for results_json in (one_process, aggregated):  # the seeds' own paths differ, not their numbers
        for run in [results_json, *results_json["per_seed"].values()]:
            run["settings"].pop("data_dir")
    assert without_timings(json.loads(json.dumps(aggregated))) == without_timings(one_process)
    with open(os.path.join(apart, "results.md")) as f:
        assert "over seeds 0, 1" in f.read()
    with pytest.raises(UserError, match="--seed_index 2: --seeds lists 2 seeds"):
        parse("--out_dir", apart, "--seeds", "0", "1", "--seed_index", "2", *TINY_DEMO)


def test_one_seed_is_a_plain_run_and_seed_with_seeds_is_refused(tmp_path):
    one = hw5_main.main(parse("--out_dir", str(tmp_path / "one"), "--seeds", "3", *TINY_DEMO))
    plain = hw5_main.main(parse("--out_dir", str(tmp_path / "plain"), "--seed", "3", *TINY_DEMO))
    assert "aggregate" not in one and not os.path.exists(str(tmp_path / "one" / "seed3"))
    assert one["settings"]["seed"] == 3
    for model in ("ciou", "mse"):
        for split in ("train", "test"):
            assert one[model][split] == plain[model][split]
    with pytest.raises(UserError, match="--seed or --seeds, not both"):
        parse("--out_dir", "o", "--demo", "--seed", "1", "--seeds", "1", "2")
    with pytest.raises(UserError, match="each seed once"):
        parse("--out_dir", "o", "--demo", "--seeds", "1", "1")
    assert parse("--out_dir", "o", "--demo").seed == 0


def test_spread_of_numbers_nested_and_missing():
    assert results.spread([1.0, 2.0, 4.0]) == pytest.approx(
        {"mean": 7 / 3, "std": (((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2) ** 0.5,
         "min": 1.0, "max": 4.0})
    got = results.aggregate_numbers([{"a": 1, "m": [[1]], "c": {"AP": 0.5, "bus": None}},
                                      {"a": 3, "m": [[2]], "c": {"AP": 0.7, "bus": None}}])
    assert got["a"]["mean"] == 2 and got["a"]["std"] == pytest.approx(2 ** 0.5)
    assert "m" not in got and got["c"]["AP"]["max"] == 0.7 and got["c"]["bus"] is None


def test_an_out_dir_that_is_a_file_stops_every_script_with_one_line(tmp_path):
    import Dataset
    import predict
    import synthetic.coco as synthetic_coco
    import train
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    message = "afile is a file, not a folder"
    with pytest.raises(UserError, match=message):
        hw5_main.main(parse("--out_dir", str(afile), *TINY_DEMO))
    with pytest.raises(UserError, match=message):  # a folder below a file
        hw5_main.main(parse("--out_dir", str(afile / "run"), *TINY_DEMO))
    with pytest.raises(UserError, match=message):
        train.main(train.get_args_parser().parse_args(["--data_dir", "DATA", "--out_dir", str(afile)]))
    with pytest.raises(UserError, match=message):
        synthetic_coco.main(synthetic_coco.get_args_parser().parse_args(["--out_dir", str(afile)]))
    with pytest.raises(Dataset.DatasetError, match=message):
        Dataset.main(Dataset.get_args_parser().parse_args(["--coco_dir", "COCO", "--out_dir", str(afile)]))
    with pytest.raises(UserError, match=message):
        predict.main(predict.get_args_parser().parse_args(["--weights", "w.pt", "--out_dir", str(afile), "x.jpg"]))
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    with pytest.raises(UserError, match="link is a link to .*nowhere, which does not exist"):
        hw5_main.main(parse("--out_dir", str(tmp_path / "link"), *TINY_DEMO))
