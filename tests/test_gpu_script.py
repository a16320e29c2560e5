"""gpu/first_run.py: its CPU mode runs every step and records its figures; a step that fails or
runs out of time is recorded, on disk before the next one runs; the resume check compares all
but timings and settings."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "gpu"))
import first_run  # noqa: E402


def read_summary(out):
    with open(out / "summary.json") as f:
        summary = json.load(f)
    return summary, {s["name"]: s for s in summary["steps"]}


@pytest.mark.slow
def test_cpu_mode_runs_every_step_and_records_its_figures(tmp_path):
    script = os.path.join(ROOT, "gpu", "first_run.py")
    res = subprocess.run([sys.executable, script, "--cpu", "--out_dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary, steps = read_summary(tmp_path)
    assert [(name, step["status"]) for name, step in steps.items()] == [
        ("bench_vs_cpu", "ok"), ("resume", "ok"), ("photos", "skipped (no --thumbs)")]
    assert summary["finished"] and summary["machine"]["torch"]
    bench = steps["bench_vs_cpu"]["figures"]
    assert all(bench[k]["ms a step"] > 0 and bench[k]["peak GiB"] > 0 for k in first_run.BENCH)
    assert len(bench["losses on the CPU"]) == 6
    assert all(math.isfinite(x) for x in bench["losses on the CPU"])
    # the CPU against itself: the plumbing runs, the figures are exact
    assert bench["passed"] and bench["first gradients, relative difference"] == 0
    assert bench["largest relative loss difference"] == 0 == bench["largest weight difference"]
    resume = steps["resume"]["figures"]
    assert resume["passed"] and resume["same history"]
    assert resume["resumed after epoch"] in (1, 2)
    assert len(resume["commands"]) == 3 and resume["commands"][1].endswith("--resume")
    markdown = (tmp_path / "summary.md").read_text()
    assert markdown.index("| torch |") < markdown.index("## bench_vs_cpu: ok")
    assert markdown.index("## bench_vs_cpu: ok") < markdown.index("## resume: ok")
    assert "python train.py --data_dir" in markdown and "NOT FINISHED" not in markdown


@pytest.mark.slow
def test_a_failed_or_timed_out_step_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    def failing(fig, *args):
        fig["before the failure"] = 1
        raise ValueError("a broken step")

    seen_on_disk = []

    def hanging(fig, *args):
        seen_on_disk.append([step["status"] for step in read_summary(tmp_path)[0]["steps"]])
        time.sleep(5)

    monkeypatch.setattr(first_run, "bench_vs_cpu", failing)
    monkeypatch.setattr(first_run, "resume", hanging)
    monkeypatch.setitem(first_run.LIMITS["cpu"], "resume", 1)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)
    args = first_run.get_args_parser().parse_args(
        ["--cpu", "--out_dir", str(tmp_path), "--thumbs", str(tmp_path / "no_such_tree")])
    try:
        assert first_run.main(args) == 1
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGALRM, previous[1])
    assert seen_on_disk == [["failed", "running"]]  # a run cut off there would keep both
    _, steps = read_summary(tmp_path)
    assert [step["status"] for step in steps.values()] == ["failed", "timeout", "failed"]
    assert steps["bench_vs_cpu"]["error"] == "ValueError: a broken step"
    assert steps["bench_vs_cpu"]["figures"] == {"before the failure": 1}  # what it measured is kept
    assert steps["resume"]["seconds"] < 4
    assert steps["photos"]["error"].startswith("RuntimeError: `python Dataset.py --coco_dir")
    assert steps["photos"]["error"].endswith("` exited with status 2, not 0")
    assert "no_such_tree" in (tmp_path / "photos.log").read_text()
    assert "**ValueError: a broken step**" in (tmp_path / "summary.md").read_text()


def test_history_comparison_leaves_out_only_timings_and_settings():
    a = {"train": {"accuracy": [0.5, 0.75]}, "best_epoch": 2, "loss": "CIoU",
         "epoch_seconds": [1.0, 2.0], "save_seconds": [{"seconds": 3.0}],
         "settings": {"resume": False}}
    b = {**a, "epoch_seconds": [9.0, 9.0], "save_seconds": [], "settings": {"resume": True}}
    assert first_run.without_timings(a) == first_run.without_timings(b)
    for other in ({"train": {"accuracy": [0.5, 0.76]}}, {"best_epoch": 1}, {"loss": "MSE"},
                  {"train": {"accuracy": [0.5]}}, {"skipped_steps": [0]}):
        assert first_run.without_timings(a) != first_run.without_timings({**b, **other}), other
