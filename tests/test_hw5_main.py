"""hw5_main.py: the two-model experiment writes every output, goes on with --resume, runs
seeds apart or together, stops at a safe point on SIGTERM, and checks its options."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import cli
import hw5_main
from cli import UserError
from outputs import read_json, write_json
from tiny import ROOT, TINY_DEMO, hw5_args, linked_copy, without_timings

parse = hw5_args
FIGURES = [f"{model}_{split}_{kind}.png" for model in ("ciou", "mse")
           for split in ("train", "test") for kind in ("cm", "preds")] + [
    "ciou_curves.png", "mse_curves.png", "ciou_vs_mse_train.png", "ciou_vs_mse_test.png", "sample_images.png"]


@pytest.mark.slow
def test_a_tiny_demo_writes_every_output_and_its_numbers_agree(tiny_out, tmp_path):
    out = tiny_out
    # The demo made and built its data inside OUT.
    assert os.path.exists(os.path.join(out, "synthetic_coco", "annotations", "instances_train2014.json"))
    assert os.path.exists(os.path.join(out, "data", "sample_images.png"))
    for name in FIGURES + ["model_sum.txt", "results.json", "results.md"]:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    for model in ("ciou", "mse"):  # finished: no checkpoint.pt (2.5 GB each) is left
        assert sorted(os.listdir(os.path.join(out, model))) == [
            ".lock", "best_model.pt", "coco_results_test.json", "coco_results_train.json", "history.json",
            "predictions_test.json", "predictions_train.json"]
    assert [f for _, _, files in os.walk(out) for f in files if ".tmp" in f] == []

    saved = read_json(os.path.join(out, "results.json"), "results")
    n_train, n_test = saved["settings"]["n_train"], saved["settings"]["n_test"]
    for model in ("ciou", "mse"):
        for split, n in (("train", n_train), ("test", n_test)):
            r = saved[model][split]
            assert r["n_images"] == n and sum(map(sum, r["confusion_matrix"])) == n
            trace = sum(r["confusion_matrix"][i][i] for i in range(3))
            assert r["accuracy"] == pytest.approx(trace / n)  # the matrix's trace over its total
            preds = read_json(os.path.join(out, model, f"predictions_{split}.json"), "records")
            assert len(preds) == n and set(preds[0]) == {"file_name", "image_id", "label", "pred_label",
                                                          "scores", "box", "pred_box", "iou"}
            assert sum(p["label"] == p["pred_label"] for p in preds) / n == pytest.approx(r["accuracy"])
            assert sum(p["iou"] for p in preds) / n == pytest.approx(r["mean_iou"])
            assert all(p["pred_label"] == max(range(3), key=p["scores"].__getitem__) for p in preds)
            from pycocotools.coco import COCO  # COCO's results format loads into pycocotools
            gt = COCO(os.path.join(out, "synthetic_coco", "annotations",
                                   f"instances_{'train' if split == 'train' else 'val'}2014.json"))
            assert len(gt.loadRes(os.path.join(out, model, f"coco_results_{split}.json")).getAnnIds()) == n
            assert 0.0 <= r["coco"]["AP"] <= r["coco"]["AP50"] <= 1.0
        assert saved[model]["best_epoch"] in (1, 2) and saved[model]["epochs_trained"] == 2
        assert saved[model]["skipped_steps"] == 0 and saved[model]["files_written"] == 1
    for split, n in (("train", n_train), ("test", n_test)):  # image by image, from the predictions
        iou = {m: [r["iou"] for r in read_json(os.path.join(out, m, f"predictions_{split}.json"), "")]
               for m in ("ciou", "mse")}
        diff = [m - c for c, m in zip(iou["ciou"], iou["mse"])]
        c = saved["comparison"][split]
        assert (c["mse_better"], c["ciou_better"], c["equal"]) == (
            sum(d > 0 for d in diff), sum(d < 0 for d in diff), sum(d == 0 for d in diff))
    s = saved["settings"]
    assert s["demo"] is True and s["epochs"] == 2 and s["single_backward"] is True and s["device"] == "cpu"
    assert 0.0 < saved["baseline"]["test"] < 1.0 and 0.0 < saved["baseline"]["train"] < 1.0

    # The best CIoU model's weights give the recorded test accuracy.
    from Dataset import MyCOCODataset
    from network import build_model
    model = build_model(s)
    model.load_state_dict(torch.load(os.path.join(out, "ciou", "best_model.pt"), weights_only=True))
    test_set = MyCOCODataset(os.path.join(out, "data"), train=False)
    with torch.no_grad():
        logits, _ = model.eval()(test_set.images.float() / 255)
    assert (logits.argmax(1) == test_set.labels).double().mean().item() == pytest.approx(saved["ciou"]["test"]["accuracy"])

    # A second run into the same OUT is refused before any work; so is going on with its
    # data drawn otherwise, or with a --seeds run into it.
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        hw5_main.main(parse("--out_dir", out, *TINY_DEMO, "--epochs", "2"))
    with pytest.raises(UserError, match="was drawn with --n_train 24 .now 30.; give the same options"):
        hw5_main.main(parse("--out_dir", out, *TINY_DEMO, "--epochs", "2", "--n_train", "30", "--resume"))
    with pytest.raises(UserError, match="holds a single run"):
        hw5_main.main(parse("--out_dir", out, "--seeds", "0", "1", "--resume", *TINY_DEMO))

    # Interrupted after the CIoU model: --resume evaluates the finished CIoU model without
    # training it again, trains the MSE model from its start, and ends with the same results.
    copy = linked_copy(out, tmp_path / "copy")
    shutil.rmtree(os.path.join(copy, "mse"))
    os.remove(os.path.join(copy, "results.json"))
    resumed = hw5_main.main(parse("--out_dir", copy, *TINY_DEMO, "--epochs", "2", "--resume"))
    assert os.path.samefile(os.path.join(copy, "ciou", "best_model.pt"), os.path.join(out, "ciou", "best_model.pt"))
    assert without_timings(json.loads(json.dumps(resumed))) == without_timings(saved)


class SigtermAt(logging.Handler):
    """Sends this process SIGTERM when the run logs a line holding every one of words: the
    signal lands at that moment of the run."""

    def __init__(self, *words):
        super().__init__()
        self.words, self.sent = words, False

    def emit(self, record):
        if not self.sent and all(w in record.getMessage() for w in self.words):
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


MOMENTS = {  # where the signal lands: the log line it comes after
    "loading the data": ("loading the data in",),
    "the CIoU model's first epoch": ("training HW5Net with CIoU",),
    "the end of the CIoU model's last epoch": ("epoch 2/2", "CIoU"),
    "the CIoU model's evaluation": ("CIoU model: evaluating",),
    "between the models": ("CIoU model (best epoch",),
    "the figures and results": ("drawing the figures",),
    "the end": ("outputs in",),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", MOMENTS)
def test_sigterm_at_any_moment_stops_with_75_and_resume_gives_the_uninterrupted_results(
        tiny_out, tmp_path, caplog, moment):
    argv = ["--out_dir", str(tmp_path / "out"), *TINY_DEMO, "--epochs", "2", "--resume"]
    sigterm = SigtermAt(*MOMENTS[moment])
    logging.getLogger().addHandler(sigterm)
    try:
        with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stopped:
            cli.command(lambda: hw5_main.main(parse(*argv)), logging.getLogger("test"), stops_on_sigterm=True)
    finally:
        logging.getLogger().removeHandler(sigterm)
    assert sigterm.sent and stopped.value.code == cli.EXIT_INTERRUPTED == 75
    assert "stopped by SIGTERM" in caplog.text and "the same command with --resume goes on" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and not cli.Sigterm.received
    resumed = hw5_main.main(parse(*argv))
    expected = read_json(os.path.join(tiny_out, "results.json"), "results")
    assert without_timings(json.loads(json.dumps(resumed))) == without_timings(expected)


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


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """One `--seeds 0 1` run, shared by the tests that read it (each copies before changing it)."""
    out = str(tmp_path_factory.mktemp("two_seeds") / "seeds")
    return out, hw5_main.main(parse("--out_dir", out, "--seeds", "0", "1", *TINY_DEMO))


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_check_of_a_seeds_run_checks_each_seed_and_their_spread(two_seeds, tmp_path):
    import grading
    out = linked_copy(two_seeds[0], tmp_path / "seeds")
    report = grading.check(out)
    assert report["problems"] == [] and report["evaluated"] == 4
    results = read_json(os.path.join(out, "results.json"), "results")
    results["aggregate"]["ciou"]["test"]["accuracy"]["mean"] += 0.1
    write_json(results, os.path.join(out, "results.json"))
    assert any("its spread over seeds is not the seeds' results'" in p for p in grading.check(out)["problems"])


@pytest.mark.slow
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
    assert without_timings(json.loads(json.dumps(aggregated))) == without_timings(one_process)
    with open(os.path.join(apart, "results.md")) as f:
        assert "over seeds 0, 1" in f.read()
    with pytest.raises(UserError, match="--seed_index 2: --seeds lists 2 seeds"):
        parse("--out_dir", apart, "--seeds", "0", "1", "--seed_index", "2", *TINY_DEMO)


@pytest.mark.slow
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


