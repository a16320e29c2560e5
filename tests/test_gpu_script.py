"""gpu/first_run.py: its CPU mode runs every step and records its figures; a step that fails or runs out
of time is recorded and the next one runs; the resume check compares all but timings and settings."""
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


def read_steps(out):
    with open(out / "summary.json") as f:
        return {s["name"]: s for s in json.load(f)["steps"]}


@pytest.mark.slow
def test_cpu_mode_runs_every_step_and_records_its_figures(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "gpu", "first_run.py"), "--cpu", "--out_dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = read_steps(tmp_path)
    assert list(steps) == ["machine", "bench_vs_cpu", "resume", "photos"]
    assert [steps[n]["status"] for n in steps] == ["ok", "ok", "ok", "skipped (no --thumbs)"]
    assert steps["machine"]["figures"]["torch"] and steps["machine"]["figures"]["commit"]
    bench = steps["bench_vs_cpu"]["figures"]
    assert all(bench[k]["ms a step"] > 0 and bench[k]["peak GiB"] > 0 for k in first_run.BENCH)
    assert len(bench["losses on the CPU"]) == 6 and all(math.isfinite(x) for x in bench["losses on the CPU"])
    # the CPU against itself: the plumbing runs, the figures are exact
    assert bench["passed"] and bench["largest relative loss difference"] == 0 == bench["largest weight difference"]
    resume = steps["resume"]["figures"]
    assert resume["passed"] and resume["largest difference"] == 0 and resume["resumed after epoch"] in (1, 2)
    assert len(resume["commands"]) == 3 and resume["commands"][1].endswith("--resume")
    markdown = (tmp_path / "summary.md").read_text()
    assert markdown.index("| torch |") < markdown.index("## bench_vs_cpu: ok") < markdown.index("## resume: ok")
    assert "python train.py --data_dir" in markdown and "NOT FINISHED" not in markdown


@pytest.mark.slow
def test_a_failed_or_timed_out_step_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    def failing(fig, *args):
        fig["before the failure"] = 1
        raise ValueError("a broken step")

    monkeypatch.setattr(first_run, "bench_vs_cpu", failing)
    monkeypatch.setattr(first_run, "resume", lambda fig, *args: time.sleep(5))
    monkeypatch.setitem(first_run.LIMITS, "resume", (1, 1))
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)
    args = first_run.get_args_parser().parse_args(["--cpu", "--out_dir", str(tmp_path), "--thumbs",
                                                   str(tmp_path / "no_such_tree")])
    try:
        assert first_run.main(args) == 1
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGALRM, previous[1])
    steps = read_steps(tmp_path)
    assert [steps[n]["status"] for n in steps] == ["ok", "failed", "timeout", "failed"]
    assert steps["bench_vs_cpu"]["error"] == "ValueError: a broken step"
    assert steps["bench_vs_cpu"]["figures"] == {"before the failure": 1}  # what it measured is kept
    assert steps["resume"]["seconds"] < 4
    assert steps["photos"]["error"] == "RuntimeError: Dataset.py exited with status 2"
    assert "no_such_tree" in (tmp_path / "photos.log").read_text()
    assert "**ValueError: a broken step**" in (tmp_path / "summary.md").read_text()


def test_history_comparison_leaves_out_only_timings_and_settings():
    a = {"train": {"accuracy": [0.5, 0.75]}, "best_epoch": 2, "loss": "CIoU", "epoch_seconds": [1.0, 2.0],
         "save_seconds": [{"seconds": 3.0}], "settings": {"resume": False}}
    b = {**a, "epoch_seconds": [9.0, 9.0], "save_seconds": [], "settings": {"resume": True}}
    assert first_run.largest_difference(a, b) == 0
    assert first_run.largest_difference(a, {**b, "train": {"accuracy": [0.5, 0.76]}}) == pytest.approx(0.01)
    assert first_run.largest_difference(a, {**b, "best_epoch": 1}) == 1
    for other in ({"loss": "MSE"}, {"train": {"accuracy": [0.5]}}, {"skipped_steps": [0]}, {"best_epoch": None}):
        assert first_run.largest_difference(a, {**b, **other}) == math.inf, other
