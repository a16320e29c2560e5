"""gpu/first_run.py in its CPU mode: every step it runs exits 0, the resume check passes,
and the summary is there for a cut-off GPU run to leave (the GPU's figures need a GPU)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_first_run_cpu_mode_runs_every_step_and_writes_the_summary(tmp_path):
    out = tmp_path / "first_run"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "gpu", "first_run.py"), "--cpu", "--skip", "suite",
                          "--out_dir", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["finished"] and summary["machine"]["torch"]
    steps = {s["name"]: s for s in summary["steps"]}
    ran = {name for name, s in steps.items() if s["status"] != "skipped"}
    assert ran == {"deps", "demo", "resume", "bench", "memory"}
    for name in ran:
        assert steps[name]["status"] == "ok" and steps[name]["returncode"] == 0, steps[name]
        assert (out / f"{name}.log").stat().st_size > 0
    assert steps["suite"]["note"] == "--skip" and "--thumbs" in steps["photos"]["note"]

    resume = steps["resume"]["figures"]
    assert resume["passed"] and resume["max_relative_difference"] <= 1e-5
    assert resume["resumed_after_epoch"] == 1  # from the checkpoint, not started again
    assert [c.get("killed") for c in steps["resume"]["commands"]].count(True) == 1
    for name in ("demo", "demo_amp"):
        demo = steps["demo"]["figures"][name]
        assert all(0 <= demo[m][f"test_{k}"] <= 1 for m in ("ciou", "mse") for k in ("accuracy", "mean_iou"))
        assert demo["wall_seconds"] > 0
    assert steps["bench"]["figures"]["bench"]["eval ours (batch 64)"]["images_per_s"] > 0
    assert steps["memory"]["figures"]["peak_rss_gb"] > 0

    markdown = (out / "summary.md").read_text()
    assert markdown.startswith("# First GPU run") and "| torch |" in markdown
    assert all(f"| {name} | ok | 0 |" in markdown for name in ran)


def test_a_failing_step_is_recorded_and_the_run_goes_on(tmp_path):
    out = tmp_path / "first_run"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "gpu", "first_run.py"), "--cpu", "--only", "photos",
                          "deps", "--thumbs", str(tmp_path / "no_such_tree"), "--out_dir", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    with open(out / "summary.json") as f:
        steps = {s["name"]: s for s in json.load(f)["steps"]}
    assert set(steps) == {"deps", "photos"} and steps["deps"]["status"] == "ok"
    assert steps["photos"]["status"] == "failed" and steps["photos"]["returncode"] == 2  # Dataset.py's refusal
    assert "no_such_tree" in (out / "photos.log").read_text()


def test_history_comparison_leaves_out_timings_only():
    sys.path.insert(0, os.path.join(ROOT, "gpu"))
    from first_run import compare_histories
    a = {"train": {"accuracy": [0.5, 0.75]}, "epoch_seconds": [1.0, 2.0], "best_epoch": 2,
         "settings": {"resume": False}}
    b = {"train": {"accuracy": [0.5, 0.75 * (1 + 1e-7)]}, "epoch_seconds": [9.0, 9.0], "best_epoch": 2,
         "settings": {"resume": True}}
    worst, differ = compare_histories(a, b)
    assert differ == [] and 0 < worst < 1e-6
    b["train"]["accuracy"][1] = 0.76
    worst, differ = compare_histories(a, b)
    assert differ == ["train.accuracy[1]: 0.75 vs 0.76"] and worst > 1e-2
    assert compare_histories(a, {**a, "best_epoch": 1})[1] == ["best_epoch: 2 vs 1"]
