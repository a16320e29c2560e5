"""What a user waits for: whole training processes, ours against the report's loop
(docs/performance.md):

    python benchmarks/bench_process.py --epochs 2 --repeats 3

On a synthetic dataset built by Dataset.py (about 140 training images after the rule), runs
each of these as a fresh process, alternating, from start to exit (importing torch,
building the model, decoding, every epoch with its evaluation, every file written):

  reference   python benchmarks/reference.py --data_dir DATA --out_dir OUT --epoch E
  ours        python train.py --data_dir DATA --out_dir OUT --epochs E --device auto --quiet

and prints the median wall time of --repeats runs, the peak resident memory of each process
and what it left on disk.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import ROOT, make_data  # noqa: E402
from cli import HelpFormatter  # noqa: E402


def run_process(cmd, out_dir):
    """(wall seconds, peak RSS bytes, bytes left in out_dir) of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output.decode()[-3000:]}")
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out_dir) for f in files)
    return seconds, usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024), disk


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--epochs", type=int, default=2, help="epochs of each training process")
    p.add_argument("--repeats", type=int, default=3, help="runs of each command")
    return p


def main(args):
    with tempfile.TemporaryDirectory(prefix="bench_process_") as work:
        data = make_data(work, 160, 80)
        n_images = len(os.listdir(os.path.join(data, "train_data")))
        commands = {"reference": [sys.executable, os.path.join("benchmarks", "reference.py"), "--epoch"],
                    "ours": [sys.executable, "train.py", "--device", "auto", "--quiet", "--epochs"]}
        runs = {"reference": [], "ours": []}
        for r in range(args.repeats):
            for name in (("reference", "ours") if r % 2 == 0 else ("ours", "reference")):
                out = os.path.join(work, f"{name}{r}")
                cmd = commands[name] + [str(args.epochs), "--data_dir", data, "--out_dir", out]
                runs[name].append(run_process(cmd, out))
                shutil.rmtree(out, ignore_errors=True)
                print(f"  {name} run {r + 1}: {runs[name][-1][0]:.1f} s", flush=True)
    print(f"{os.cpu_count()} cores, torch {torch.__version__}: {args.epochs} epochs on {n_images} training "
          f"images, whole processes, median of {args.repeats}")
    seconds = {name: statistics.median(v[0] for v in values) for name, values in runs.items()}
    for name, values in runs.items():
        print(f"  {name:10s} {seconds[name]:7.1f} s  (runs {', '.join(f'{v[0]:.1f}' for v in values)})  "
              f"peak RSS {max(v[1] for v in values) / 1e9:.2f} GB  left on disk {values[-1][2] / 1e9:.2f} GB")
    print(f"  ours is {seconds['reference'] / seconds['ours']:.2f}x the reference")
    return runs


if __name__ == "__main__":
    main(get_args_parser().parse_args())
