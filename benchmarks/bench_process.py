"""What a user waits for: whole training processes, ours against the report's loop.

    python benchmarks/bench_process.py --epochs 2 --repeats 3
    python benchmarks/bench_process.py --demo            # also time the README's demo, once

Runs, each as a fresh process on the same synthetic dataset (built by Dataset.py, about
140 training images after the rule by default), from start to exit: importing torch,
building the model, decoding, every epoch, evaluation and every file written:

  reference   python benchmarks/reference.py --epoch E  (the report's train(); it saves
              its best model whenever the score improves, nothing else)
  ours        python train.py --epochs E                 (the report's settings; checkpoints
              by train.py's defaults)

Each row is the median of --repeats runs, the two commands alternating; the peak
resident memory of each process and what it left on disk are reported too. With
--demo, `python hw5_main.py --demo --out_dir OUT` is timed once the same way.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_data(work, n_train, n_val):
    from Dataset import build_dataset
    from synthetic.coco import make_synthetic_coco
    coco, data = os.path.join(work, "coco"), os.path.join(work, "data")
    make_synthetic_coco(coco, n_train, n_val, seed=0)
    build_dataset(coco, data, workers=os.cpu_count() or 1, progress=False, figure=False)
    return data


def disk_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run_process(cmd, out_dir):
    """(wall seconds, peak RSS bytes, bytes left in out_dir) of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output.decode()[-3000:]}")
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return seconds, rss, disk_bytes(out_dir)


def commands(data_dir, out_dir, args):
    return {
        "reference": [sys.executable, os.path.join("benchmarks", "reference.py"), "--data_dir", data_dir,
                      "--out_dir", out_dir, "--epoch", str(args.epochs)],
        "ours": [sys.executable, "train.py", "--data_dir", data_dir, "--out_dir", out_dir,
                 "--epochs", str(args.epochs), "--device", args.device, "--quiet"],
    }


def main(args):
    work = tempfile.mkdtemp(prefix="bench_process_")
    try:
        data_dir = args.data_dir or make_data(work, args.n_train, args.n_val)
        with open(os.path.join(data_dir, "train_data.pkl"), "rb") as f:
            import pickle
            n_images = len(pickle.load(f))
        runs = {"reference": [], "ours": []}
        for r in range(args.repeats):
            for name in (("reference", "ours") if r % 2 == 0 else ("ours", "reference")):
                out = os.path.join(work, f"{name}{r}")
                runs[name].append(run_process(commands(data_dir, out, args)[name], out))
                shutil.rmtree(out, ignore_errors=True)
                print(f"  {name} run {r + 1}: {runs[name][-1][0]:.1f} s", flush=True)
        res = {"torch": __import__("torch").__version__, "machine": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "epochs": args.epochs,
               "train_images": n_images, "command": "python " + " ".join(sys.argv), "runs": {}}
        for name, values in runs.items():
            res["runs"][name] = {"seconds": statistics.median(v[0] for v in values),
                                 "all_seconds": [round(v[0], 2) for v in values],
                                 "peak_rss_bytes": max(v[1] for v in values),
                                 "disk_bytes": values[-1][2]}
        res["speedup"] = res["runs"]["reference"]["seconds"] / res["runs"]["ours"]["seconds"]
        if args.demo:
            out = os.path.join(work, "demo")
            cmd = [sys.executable, "hw5_main.py", "--demo", "--out_dir", out, "--quiet"]
            seconds, rss, disk = run_process(cmd, out)
            res["demo"] = {"seconds": seconds, "peak_rss_bytes": rss, "disk_bytes": disk}
            with open(os.path.join(out, "results.json")) as f:
                res["demo"]["results"] = json.load(f)
        print(f"{res['cores']} cores, torch {res['torch']}, {res['date']}: {args.epochs} epochs on "
              f"{n_images} training images, whole processes, median of {args.repeats}")
        for name, r in res["runs"].items():
            print(f"  {name:10s} {r['seconds']:7.1f} s  (runs {r['all_seconds']})  peak RSS "
                  f"{r['peak_rss_bytes'] / 1e9:.2f} GB  left on disk {r['disk_bytes'] / 1e9:.2f} GB")
        print(f"  ours is {res['speedup']:.2f}x the reference")
        if args.demo:
            d = res["demo"]
            print(f"  demo: {d['seconds'] / 60:.1f} min, peak RSS {d['peak_rss_bytes'] / 1e9:.2f} GB, "
                  f"OUT {d['disk_bytes'] / 1e9:.2f} GB")
        print(f"repeat with: {res['command']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=2, help="epochs of each training process")
    p.add_argument("--repeats", type=int, default=3, help="runs of each command")
    p.add_argument("--data_dir", help="a dataset built by Dataset.py (default: a synthetic one)")
    p.add_argument("--n_train", type=int, default=160, help="synthetic train images (before the rule)")
    p.add_argument("--n_val", type=int, default=80, help="synthetic val images (before the rule)")
    p.add_argument("--device", default="auto", help="ours: auto, cpu, cuda, mps (the reference picks CUDA or the CPU)")
    p.add_argument("--demo", action="store_true", help="also time hw5_main.py --demo once")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
