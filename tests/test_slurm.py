"""gpu/seeds.sbatch under a stand-in Slurm: bash runs the batch script with the SLURM_*
variables of array task 1234_0 and a stub `scontrol` first on PATH. SIGTERM to the batch
shell alone (what `--signal=B:TERM@N` sends) reaches the run through the shell, the run
stops at a safe point, and the task asks to be requeued; started again, as Slurm would,
the same command line finishes the seed."""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Checkpoints at the default interval (10 minutes): the one the second start goes on from
# is the one the SIGTERM asked for.
TINY_RUN = ["--device", "cpu", "--width", "2", "--n_blocks", "1", "--epochs", "3", "--batch_size", "4", "--quiet"]
TRAINING_STARTED = "training HW5Net with CIoU"


def stand_in_slurm(tmp_path):
    """The environment of array task 1234_0 (job 1235), with a stub scontrol that records
    its arguments, one call a line, in the returned file."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    stub = bin_dir / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    stub.chmod(0o755)
    calls.touch()
    # The venv's python first after the stub, as in a job submitted from an activated venv.
    path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]])
    env = {**os.environ, "PATH": path, "SLURM_JOB_ID": "1235", "SLURM_ARRAY_JOB_ID": "1234",
           "SLURM_ARRAY_TASK_ID": "0", "SLURM_SUBMIT_DIR": ROOT}
    return env, calls


def start_task(data, out, env):
    return subprocess.Popen(["bash", os.path.join("gpu", "seeds.sbatch"), data, out, *TINY_RUN], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def lines_of(task):
    """The task's output, line by line as it comes, in a queue (None at its end)."""
    lines = queue.Queue()

    def read():
        for line in task.stdout:
            lines.put(line)
        lines.put(None)
    threading.Thread(target=read, daemon=True).start()
    return lines


@pytest.mark.slow
def test_a_signalled_task_requeues_itself_and_its_second_start_finishes_the_seed(tiny_data, tmp_path):
    env, calls = stand_in_slurm(tmp_path)
    out = str(tmp_path / "out")

    task = start_task(tiny_data, out, env)
    lines, log = lines_of(task), []
    deadline = time.monotonic() + 300
    try:
        while TRAINING_STARTED not in "".join(log):
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, "the task ended before training started:\n" + "".join(log)[-3000:]
            log.append(line)
        os.kill(task.pid, signal.SIGTERM)  # the batch shell alone, as --signal=B: does
        while (line := lines.get(timeout=max(deadline - time.monotonic(), 0.1))) is not None:
            log.append(line)
        status = task.wait(timeout=60)
    finally:
        if task.poll() is None:
            task.kill()
    first = "".join(log)
    assert status == 75, first[-3000:]  # the run's own status: stopped, resume me
    assert "SIGTERM: stopping at the next point from which --resume goes on" in first
    assert "stopped by SIGTERM" in first
    assert calls.read_text().splitlines() == ["requeue 1234_0"]
    # The signal came in the first model's first epoch, seconds before the run's end.
    assert not os.path.exists(os.path.join(out, "seed0", "results.json")), first[-3000:]

    again = subprocess.run(["bash", os.path.join("gpu", "seeds.sbatch"), tiny_data, out, *TINY_RUN], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    second = again.stdout + again.stderr
    assert again.returncode == 0, second[-3000:]
    ciou = os.path.join(out, "seed0", "ciou")
    # The CIoU model went on from where it stopped: it did not start again.
    assert not [line for line in second.splitlines() if "starting" in line and line.endswith(ciou)], second[-3000:]
    assert calls.read_text().splitlines() == ["requeue 1234_0"]  # not requeued again
    with open(os.path.join(out, "seed0", "results.json")) as f:
        results = json.load(f)
    for key in ("ciou", "mse"):
        assert results[key]["epochs_trained"] == 3
        with open(os.path.join(out, "seed0", key, "history.json")) as f:
            assert json.load(f)["finished"]
