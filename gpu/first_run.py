"""One command for the first GPU run: what docs/devices.md and docs/performance.md list
as "still to be run on a GPU", step by step, written up in OUT as it goes.

    python gpu/first_run.py --out_dir OUT --thumbs ../shared/coco_thumbs   # about 6 minutes on a GPU
    python gpu/first_run.py --out_dir OUT --only long                      # the COCO-sized run alone
    python gpu/first_run.py --out_dir OUT --cpu --skip suite               # the same steps, tiny, on the CPU

Each step runs as subprocesses with a time limit of its own; a step that fails or runs
out of time is recorded and the next one starts. After every step OUT/summary.json is
rewritten (atomically) and OUT/summary.md with it, and OUT/<step>.log holds the step's
output, so a run cut off by a machine taken back still leaves what it measured.
"""
import argparse
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cli import HelpFormatter, UserError  # noqa: E402
from outputs import read_json, write_json, write_text  # noqa: E402

log = logging.getLogger("first_run")

STEPS = ("deps", "suite", "demo", "resume", "bench", "memory", "photos", "long")
# Each step's time limit in seconds: on a GPU, and in --cpu mode on 2 cores. Limits, not
# expectations: a step ends when it is done.
LIMITS = {"env": (120, 120), "deps": (120, 120), "suite": (420, 900), "demo": (300, 300), "resume": (240, 300),
          "bench": (360, 300), "memory": (120, 180), "photos": (360, 900), "long": (1500, 600)}
# Imported by the package or the suite; the wheels beside the script can supply these.
WHEEL_PACKAGES = {"pycocotools": "pycocotools", "pytorch_model_summary": "pytorch-model-summary",
                  "tqdm": "tqdm", "pytest": "pytest"}
MACHINE_PACKAGES = ("torch", "torchvision", "numpy", "cv2", "skimage", "matplotlib", "seaborn")
TIMINGS = ("epoch_seconds", "save_seconds")  # left out of the resume comparison, with settings

# --cpu: a model and data small enough that every step takes seconds (the plumbing is
# what runs; the figures mean nothing).
TINY_MODEL = ["--width", "1", "--n_blocks", "1", "--batch_size", "8"]
SIZES = {
    "gpu": {"demo": ["--epochs", "2"], "train": [], "resume_epochs": 3,
            "synthetic": ["--n_train", "200", "--n_val", "100"], "bench": [], "bench_amp": True,
            "memory_model": [], "photos": [], "long_coco": ["--n_train", "4450", "--n_val", "2300"],
            "long": []},
    "cpu": {"demo": ["--epochs", "1", "--n_train", "16", "--n_val", "8", *TINY_MODEL],
            "train": [*TINY_MODEL, "--single_backward"], "resume_epochs": 2,
            "synthetic": ["--n_train", "16", "--n_val", "8"],
            # bench_train has no smaller model, and its training section takes minutes on a CPU
            "bench": ["--sections", "eval", "--n_train", "16", "--n_val", "8", "--repeats", "1"],
            "bench_amp": False,  # bench_train applies --amp on CUDA only
            "memory_model": ["1", "1"], "photos": ["--epochs", "1", *TINY_MODEL],
            "long_coco": ["--n_train", "60", "--n_val", "30"], "long": ["--epochs", "1", *TINY_MODEL]},
}


class StepFailed(UserError):
    """A step's check that did not hold, or a file it expected that is not there."""


class FirstRun:
    """The run: its options, the summary it keeps, and the subprocesses of the step in progress."""

    def __init__(self, args):
        self.args, self.out = args, os.path.abspath(args.out_dir)
        self.device = "cpu" if args.cpu else args.device
        self.sizes = SIZES["cpu" if args.cpu else "gpu"]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if os.path.isdir(os.path.join(self.out, "deps")):  # installed there by an earlier run into OUT
            self.use_deps()
        self.t0 = time.perf_counter()
        self.summary = {"command": "python " + " ".join(sys.argv), "mode": "cpu" if args.cpu else "gpu",
                        "device": self.device, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "out_dir": self.out, "machine": {}, "steps": [], "finished": False}
        self.step = None

    def use_deps(self):
        deps = os.path.join(self.out, "deps")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (deps, self.env.get("PYTHONPATH")) if p)
        return deps

    def python(self, *argv, timeout=None):
        """Run python argv in the repository root, its output appended to the step's log;
        returns the exit status (124 when the step's time ran out)."""
        return self.run([sys.executable, *argv], timeout)

    def run(self, cmd, timeout=None, kill_when=None):
        """Run cmd in its own process group; kill_when(), polled while it runs, SIGKILLs it
        when it returns True. The record (command, status, seconds) goes into the step."""
        record = {"command": " ".join(cmd).replace(sys.executable, "python"), "returncode": None}
        self.step["commands"].append(record)
        t0 = time.perf_counter()
        remaining = self.deadline - t0 if timeout is None else timeout
        with open(self.step_log, "a") as logf:
            logf.write(f"\n$ {record['command']}\n")
            logf.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                while proc.poll() is None:
                    if time.perf_counter() - t0 > remaining:
                        record["timed_out"] = True
                        break
                    if kill_when is not None and kill_when():
                        record["killed"] = True
                        break
                    time.sleep(0.1)
            finally:  # also on Ctrl-C or SIGTERM: no child outlives the run
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        record["returncode"] = 124 if record.get("timed_out") else proc.returncode
        record["seconds"] = round(time.perf_counter() - t0, 1)
        return record["returncode"]

    def log_text(self):
        with open(self.step_log) as f:
            return f.read()

    def write(self):
        self.summary["wall_seconds"] = round(time.perf_counter() - self.t0, 1)
        write_json(self.summary, os.path.join(self.out, "summary.json"))
        write_text(summary_markdown(self.summary), os.path.join(self.out, "summary.md"))

    def start(self, name):
        """A fresh record (replacing any of an earlier run into the same OUT) and log."""
        self.summary["steps"] = [s for s in self.summary["steps"] if s["name"] != name]
        self.step = {"name": name, "status": "running", "returncode": None, "wall_seconds": None,
                     "log": f"{name}.log", "commands": [], "figures": {}, "headline": ""}
        self.summary["steps"].append(self.step)
        self.step_log = os.path.join(self.out, f"{name}.log")
        open(self.step_log, "w").close()
        self.deadline = time.perf_counter() + LIMITS[name][1 if self.args.cpu else 0]
        self.write()

    def skip(self, name, why):
        self.summary["steps"] = [s for s in self.summary["steps"] if s["name"] != name]
        self.summary["steps"].append({"name": name, "status": "skipped", "note": why})

    def step_dir(self, *names):
        """OUT/names..., emptied first: a step owns its folders."""
        path = os.path.join(self.out, *names)
        shutil.rmtree(path, ignore_errors=True)
        return path


# ---------------------------------------------------------------------------------
# Steps: each fills run.step["figures"] and ["headline"]; a StepFailed fails it
# ---------------------------------------------------------------------------------
def step_deps(run):
    """Import what the package and the suite need; install what is missing from the wheels
    beside the script (--wheels), into this Python or, where it refuses, into OUT/deps."""
    missing = missing_modules(run, [*MACHINE_PACKAGES, *WHEEL_PACKAGES])
    fig = run.step["figures"]
    fig["missing_before"] = missing
    wanted = [WHEEL_PACKAGES[m] for m in missing if m in WHEEL_PACKAGES]
    if wanted:
        wheels = os.path.abspath(run.args.wheels)
        pip = ["-m", "pip", "install", "--no-index", "--find-links", wheels]
        if not os.path.isdir(wheels):
            raise StepFailed(f"{', '.join(wanted)} missing and no wheels in {wheels} (gpu/README.md)")
        if run.python(*pip, *wanted) != 0:
            # A Python that pip may not change (or a dependency not carried): every wheel
            # carried, into OUT/deps, which the later steps import from.
            carried = sorted(os.path.join(wheels, w) for w in os.listdir(wheels) if w.endswith(".whl"))
            fig["installed_into"] = run.use_deps()
            run.python(*pip, "--no-deps", "--target", fig["installed_into"], *carried)
        fig["missing_after"] = missing_modules(run, missing)
    still = fig.get("missing_after", missing)
    run.step["headline"] = (f"missing: {', '.join(still)}" if still else
                            f"installed {', '.join(wanted)}" if wanted else "all present")
    if still:
        raise StepFailed(f"cannot import {', '.join(still)}")
    return 0


def missing_modules(run, modules):
    code = ("import importlib.util, json, sys; "
            "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]))")
    return child_json(run, ["-c", code, *modules])


def child_json(run, argv):
    """Run python argv and return the JSON its output's last line holds."""
    if run.python(*argv) != 0:
        raise StepFailed(f"python {argv[0]} failed (see {run.step['log']})")
    return json.loads(run.log_text().strip().splitlines()[-1])


def step_suite(run):
    """The whole test suite on this machine's default device (CUDA on a GPU), except this
    script's own test, which would run the script again."""
    rc = run.python("-m", "pytest", "-q", "-p", "no:cacheprovider", "--ignore", "tests/test_gpu_script.py")
    lines = [line for line in run.log_text().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", last)}
    run.step["figures"] = {"last_line": last.strip("= "), **counts,
                           "failed_tests": [line.split()[1] for line in lines
                                            if line.startswith(("FAILED ", "ERROR "))][:30]}
    run.step["headline"] = last.strip("= ")
    return rc


def model_figures(results):
    """Both models' figures from a results.json of hw5_main.py."""
    out = {}
    for key in ("ciou", "mse"):
        r = results[key]
        out[key] = {f"{split}_{m}": round_(r[split][m]) for split in ("train", "test")
                    for m in ("accuracy", "mean_iou")}
        out[key].update(test_AP50=round_(r["test"]["coco"]["AP50"]), best_epoch=r["best_epoch"],
                        train_seconds=r["train_seconds"])
    out["mean_box_test_iou"] = round_(results["baseline"]["mean_box_test_iou"])
    out["wall_seconds"] = results["settings"]["wall_seconds"]
    return out


def read_output(path):
    return read_json(path, "a file this step's command writes")


def round_(x, digits=4):
    return None if x is None else round(x, digits)


def step_demo(run):
    """hw5_main.py --demo (2 epochs), then the same with --amp."""
    heads = []
    for name, extra in (("demo", []), ("demo_amp", ["--amp"])):
        out = run.step_dir(name)
        if run.python("hw5_main.py", "--demo", *run.sizes["demo"], "--device", run.device, "--quiet",
                      "--out_dir", out, *extra) == 0:
            fig = model_figures(read_output(os.path.join(out, "results.json")))
            run.step["figures"][name] = fig
            heads.append(f"{name}: CIoU test acc {fig['ciou']['test_accuracy']:.3f} mIoU "
                         f"{fig['ciou']['test_mean_iou']:.3f}, MSE {fig['mse']['test_accuracy']:.3f} / "
                         f"{fig['mse']['test_mean_iou']:.3f}, {fig['wall_seconds']} s")
        else:
            heads.append(f"{name}: failed")
    run.step["headline"] = "; ".join(heads)


def dataset(run, step):
    """The demo's data if a demo has built it, else a small synthetic set in OUT/step/data."""
    demo = os.path.join(run.out, "demo")
    if os.path.exists(os.path.join(demo, "demo_data.json")):
        return os.path.join(demo, "data")
    coco, data = run.step_dir(step, "coco"), run.step_dir(step, "data")
    if (run.python("-m", "synthetic.coco", "--out_dir", coco, *run.sizes["synthetic"]) != 0
            or run.python("Dataset.py", "--coco_dir", coco, "--out_dir", data, "--quiet", "--no_figure") != 0):
        raise StepFailed("could not make the synthetic dataset")
    return data


def step_resume(run):
    """A training run SIGKILLed once its first epoch and checkpoint are on disk, continued
    with --resume, against the same run uninterrupted: the histories must match."""
    data = dataset(run, "resume")
    epochs = run.sizes["resume_epochs"]
    killed, whole = run.step_dir("resume", "killed"), run.step_dir("resume", "whole")
    cmd = [sys.executable, "train.py", "--data_dir", data, "--epochs", str(epochs), *run.sizes["train"],
           "--checkpoint_minutes", "0", "--device", run.device, "--quiet"]
    fig = run.step["figures"]

    def first_epoch_saved():
        # The checkpoint too: on CUDA it is written in the background after history.json.
        try:
            done = len(read_output(os.path.join(killed, "history.json"))["epoch_seconds"])
        except UserError:
            return False
        if done >= 1 and os.path.exists(os.path.join(killed, "checkpoint.pt")):
            fig["epochs_done_when_killed"] = done
            return True
        return False

    rc = run.run([*cmd, "--out_dir", killed], kill_when=first_epoch_saved)
    if not run.step["commands"][-1].get("killed"):
        raise StepFailed(f"the run to kill ended by itself (status {rc}) before its first checkpoint")
    before = len(run.log_text())
    rc = run.run([*cmd, "--out_dir", killed, "--resume"])
    # The first epoch the resumed run logs: after epoch k of a checkpoint, k + 1 (1: it started again).
    first = re.search(r"epoch (\d+)/\d+:", run.log_text()[before:])
    rc = rc or run.run([*cmd, "--out_dir", whole])
    if rc:
        return rc
    fig["resumed_after_epoch"] = int(first.group(1)) - 1 if first else None
    resumed = bool(fig["resumed_after_epoch"])
    worst, differ = compare_histories(read_output(os.path.join(killed, "history.json")),
                                      read_output(os.path.join(whole, "history.json")))
    fig.update(max_relative_difference=worst, differences=differ[:10], tolerance=1e-5,
               passed=not differ and worst <= 1e-5 and resumed)
    run.step["headline"] = (f"{'pass' if fig['passed'] else 'FAIL'}: max relative difference {worst:.2e}, "
                            f"resumed after epoch {fig['resumed_after_epoch']} of {epochs}")
    if not fig["passed"]:
        raise StepFailed("the resumed run's history differs from the uninterrupted one's"
                         if resumed else "the second run did not resume from the checkpoint")
    return 0


def compare_histories(a, b, path=""):
    """(largest relative difference between two history.json's numbers, the places where
    they differ otherwise); timings and settings are left out."""
    if isinstance(a, dict) and isinstance(b, dict):
        worst, differ = 0.0, []
        if set(a) != set(b):
            differ.append(f"{path or 'history'}: keys {sorted(set(a) ^ set(b))}")
        for k in sorted(set(a) & set(b) - {*TIMINGS, "settings"}):
            w, d = compare_histories(a[k], b[k], f"{path}.{k}".strip("."))
            worst, differ = max(worst, w), differ + d
        return worst, differ
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = [compare_histories(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))]
        return max([w for w, _ in pairs], default=0.0), [d for _, ds in pairs for d in ds]
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if numbers:
        scale = max(abs(a), abs(b))
        worst = abs(a - b) / scale if scale else 0.0
        return worst, [f"{path}: {a} vs {b}"] if worst > 1e-5 or not math.isfinite(worst) else []
    return 0.0, [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def step_bench(run):
    """benchmarks/bench_train.py (training and evaluation), then the same with --amp."""
    variants = (("bench", []), ("bench_amp", ["--amp"])) if run.sizes["bench_amp"] else (("bench", []),)
    heads = []
    for name, extra in variants:
        path = os.path.join(run.out, f"{name}.json")
        if os.path.exists(path):
            os.remove(path)
        sections = [] if "--sections" in run.sizes["bench"] else ["--sections", "train", "eval"]
        if run.python("benchmarks/bench_train.py", "--device", run.device, *sections, *run.sizes["bench"],
                      "--json", path, *extra) != 0:
            heads.append(f"{name}: failed")
            continue
        fig = bench_figures(read_output(path))
        run.step["figures"][name] = fig
        heads.append(f"{name}: " + ", ".join(f"{k} {v['images_per_s']} images/s" for k, v in fig.items()
                                             if k.startswith(("train ours (report", "train ours (--single_backward)",
                                                              "eval ours"))))
    run.step["headline"] = "; ".join(heads)


def bench_figures(res):
    out = {}
    for name, r in res.get("train", {}).items():
        cuda = r.get("cuda_max_allocated_bytes")
        out[f"train {name}"] = {"images_per_s": round(r["images_per_s"], 1),
                                "seconds_per_step": round(r["epoch_s"] / r["steps"], 4),
                                "cuda_max_allocated_gb": round(cuda / 2 ** 30, 2) if cuda else None,
                                "peak_rss_gb": round(r["peak_rss_bytes"] / 2 ** 30, 2)}
    for name, r in res.get("eval", {}).items():
        out[f"eval {name}"] = {"images_per_s": round(r["images_per_s"], 1), "seconds": round(r["seconds"], 4)}
    return out


def step_memory(run):
    """Peak memory of one training epoch at batch 16, report settings: bench_train.py's
    torch.cuda.max_memory_allocated where bench.json has it, else measured in a child."""
    ours = (read_json_or_empty(os.path.join(run.out, "bench.json")).get("train", {})
            .get("ours (report settings)", {}))
    fig = run.step["figures"]
    if ours.get("cuda_max_allocated_bytes"):
        fig.update(source="bench.json, train, ours (report settings)", images=ours["images"],
                   cuda_max_allocated_gb=round(ours["cuda_max_allocated_bytes"] / 2 ** 30, 2))
    else:
        res = child_json(run, [os.path.abspath(__file__), "--out_dir", run.out, "--device", run.device,
                               "--child", "memory", dataset(run, "memory"), *run.sizes["memory_model"]])
        fig.update(source="one epoch in a child of gpu/first_run.py", **res)
    gb = fig.get("cuda_max_allocated_gb")
    run.step["headline"] = (f"{gb} GB CUDA max allocated ({fig['source']})" if gb else
                            f"no CUDA figure on {run.device}; peak RSS {fig.get('peak_rss_gb')} GB")


def read_json_or_empty(path):
    try:
        return read_output(path)
    except UserError:
        return {}


def memory_child(device_name, data_dir, width=None, n_blocks=None):
    """One training epoch of HW5Net (the report's, or width and n_blocks) at batch 16 with the
    report's settings; prints its peak memory as JSON (CUDA's allocator figures on a GPU,
    the process's peak RSS always)."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_train import peak_rss_bytes
    from Dataset import MyCOCODataset
    from devices import DeviceBatches, pick_device
    from network import ARCHITECTURE, HW5Net
    from train import make_criteria, make_optimizer, seed_everything, train_one_epoch
    device = pick_device(device_name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(0)
    train_set = MyCOCODataset(data_dir, train=True, progress=False)
    width, n_blocks = int(width or ARCHITECTURE["width"]), int(n_blocks or ARCHITECTURE["n_blocks"])
    model = HW5Net(width=width, n_blocks=n_blocks).to(device)
    optimizer = make_optimizer(model, 1e-3, (0.9, 0.99))
    cls, box, _ = make_criteria("ciou")
    batches = DeviceBatches(train_set, 16, device, generator=torch.Generator().manual_seed(0))
    train_one_epoch(model, batches, optimizer, cls, box, device, 1, progress=False)
    out = {"images": len(train_set), "width": width, "n_blocks": n_blocks,
           "peak_rss_gb": round(peak_rss_bytes() / 2 ** 30, 2)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out.update(cuda_max_allocated_gb=round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2),
                   cuda_max_reserved_gb=round(torch.cuda.max_memory_reserved(device) / 2 ** 30, 2))
    print(json.dumps(out))


def step_photos(run):
    """The thumbnails built into a dataset, then the report's experiment on them."""
    data, out = run.step_dir("photos_data"), run.step_dir("photos")
    workers = str(min(8, os.cpu_count() or 1))
    if run.python("Dataset.py", "--coco_dir", os.path.abspath(run.args.thumbs), "--out_dir", data,
                  "--workers", workers, "--quiet") != 0:
        raise StepFailed("Dataset.py could not build the thumbnails")
    rc = run.python("hw5_main.py", "--data_dir", data, "--out_dir", out, *run.sizes["photos"],
                    "--device", run.device, "--quiet")
    if rc == 0:
        fig = model_figures(read_output(os.path.join(out, "results.json")))
        run.step["figures"] = fig
        run.step["headline"] = (
            f"test acc / mIoU / AP50: CIoU {fig['ciou']['test_accuracy']:.3f} / {fig['ciou']['test_mean_iou']:.3f} / "
            f"{fig['ciou']['test_AP50']}, MSE {fig['mse']['test_accuracy']:.3f} / {fig['mse']['test_mean_iou']:.3f} / "
            f"{fig['mse']['test_AP50']}; mean box {fig['mean_box_test_iou']:.3f}; {fig['wall_seconds']} s")
    return rc


def step_long(run):
    """docs/performance.md's COCO-sized synthetic run: about 3.8k training and 2k test
    images, both models, the report's 30 epochs; its wall time is the figure."""
    coco, data, out = run.step_dir("long", "coco"), run.step_dir("long", "data"), run.step_dir("long", "run")
    workers = str(min(8, os.cpu_count() or 1))
    if (run.python("-m", "synthetic.coco", "--out_dir", coco, *run.sizes["long_coco"]) != 0
            or run.python("Dataset.py", "--coco_dir", coco, "--out_dir", data, "--workers", workers,
                          "--quiet") != 0):
        raise StepFailed("could not make the COCO-sized dataset")
    rc = run.python("hw5_main.py", "--data_dir", data, "--out_dir", out, *run.sizes["long"],
                    "--device", run.device, "--quiet")
    if rc == 0:
        results = read_output(os.path.join(out, "results.json"))
        fig = {"job_seconds": run.step["commands"][-1]["seconds"], "n_train": results["settings"]["n_train"],
               "n_test": results["settings"]["n_test"], **model_figures(results)}
        for key in ("ciou", "mse"):
            history = read_output(os.path.join(out, key, "history.json"))
            fig[key]["mean_epoch_seconds"] = round(sum(history["epoch_seconds"]) / len(history["epoch_seconds"]), 2)
            fig[key]["save_seconds"] = round(sum(w["seconds"] for w in history["save_seconds"]), 1)
        run.step["figures"] = fig
        run.step["headline"] = (f"two models, epochs {results['settings']['epochs']}: {fig['job_seconds']} s "
                                f"(CIoU {fig['ciou']['mean_epoch_seconds']} s, MSE {fig['mse']['mean_epoch_seconds']} s "
                                f"an epoch)")
    return rc


STEP_FUNCTIONS = {"deps": step_deps, "suite": step_suite, "demo": step_demo, "resume": step_resume,
                  "bench": step_bench, "memory": step_memory, "photos": step_photos, "long": step_long}


# ---------------------------------------------------------------------------------
# The machine, and the summary
# ---------------------------------------------------------------------------------
def env_child(device_name):
    """The versions and the GPU this Python sees, printed as JSON."""
    import importlib
    import importlib.metadata
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        index = torch.device(device_name).index or 0 if device_name.startswith("cuda") else 0
        p = torch.cuda.get_device_properties(index)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                    capability=f"{p.major}.{p.minor}", gpu_count=torch.cuda.device_count())
    versions = {}
    for module, dist in (("torchvision", "torchvision"), ("numpy", "numpy"), ("cv2", None),
                         ("skimage", "scikit-image"), ("matplotlib", "matplotlib"), ("seaborn", "seaborn"),
                         *WHEEL_PACKAGES.items()):
        try:
            mod = importlib.import_module(module)
            versions[module] = importlib.metadata.version(dist) if dist else mod.__version__
        except Exception as e:  # missing, or broken on this machine: either is worth a line
            versions[module] = f"not importable ({type(e).__name__})"
    info["packages"] = versions
    print(json.dumps(info))


def machine_record(run):
    """Versions, GPU and driver (nvidia-smi), the commit; recorded before the steps."""
    run.start("env")
    try:
        info = child_json(run, [os.path.abspath(__file__), "--out_dir", run.out, "--device", run.device,
                                "--child", "env"])
    except (UserError, ValueError, IndexError) as e:
        info = {"error": f"{e}"}
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        top = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
        if m := re.search(r"Driver Version: (\S+)\s+CUDA Version: (\S+)", top):
            info["driver"], info["driver_cuda"] = m.groups()
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain"], capture_output=True, text=True)
    info.update(commit=git.stdout.strip() or None, uncommitted_files=len(dirty.stdout.splitlines()),
                host=platform.node())
    run.summary["steps"] = [s for s in run.summary["steps"] if s["name"] != "env"]
    run.summary["machine"] = info
    run.write()


def summary_markdown(s):
    m = s["machine"]
    lines = ["# First GPU run", "",
             f"`{s['command']}`, started {s['started']}, mode {s['mode']}, device {s['device']}; "
             f"{s.get('wall_seconds', 0)} s so far; {'finished' if s['finished'] else 'NOT FINISHED'}.", "",
             "| | |", "|---|---|",
             f"| GPU | {m.get('gpu', 'none')} ({m.get('gpu_memory_gib', '-')} GiB, compute capability "
             f"{m.get('capability', '-')}) |",
             f"| driver | {m.get('driver', '-')} (supports CUDA {m.get('driver_cuda', '-')}) |",
             f"| torch | {m.get('torch', '-')}, built for CUDA {m.get('cuda_build', '-')}, cuDNN {m.get('cudnn', '-')} |",
             f"| Python | {m.get('python', '-')} |",
             f"| CPU | {m.get('cpu', '-')}, {m.get('cpu_count', '-')} cores |",
             f"| commit | {m.get('commit', '-')} ({m.get('uncommitted_files', '-')} files uncommitted) |",
             "| packages | " + ", ".join(f"{k} {v}" for k, v in m.get("packages", {}).items()) + " |",
             "", "| step | status | exit | seconds | key figures |", "|---|---|---|---|---|"]
    for st in s["steps"]:
        lines.append(f"| {st['name']} | {st['status']} | {st.get('returncode', '')} | "
                     f"{st.get('wall_seconds', '')} | {st.get('headline') or st.get('note', '')} |")
    for st in s["steps"]:
        if st["status"] == "skipped":
            continue
        lines += ["", f"## {st['name']} ({st['log']})", ""]
        if st.get("note"):
            lines += [st["note"], ""]
        lines += [f"- `{c['command']}`: exit {c['returncode']}, {c.get('seconds', '?')} s"
                  + (" (killed on purpose)" if c.get("killed") else "") for c in st["commands"]]
        if st["figures"]:
            lines += ["", "```json", json.dumps(st["figures"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def run_step(run, name):
    run.start(name)
    t0 = time.perf_counter()
    step = run.step
    log.info("step %s ...", name)
    try:
        rc = STEP_FUNCTIONS[name](run)
        codes = [c["returncode"] for c in step["commands"] if not c.get("killed")]
        step["returncode"] = rc if rc is not None else next((c for c in codes if c), 0)
        timed_out = any(c.get("timed_out") for c in step["commands"])
        step["status"] = "timeout" if timed_out else "ok" if step["returncode"] == 0 else "failed"
    except UserError as e:
        step["status"], step["note"] = "failed", str(e)
        step["returncode"] = next((c["returncode"] for c in step["commands"]
                                   if c["returncode"] and not c.get("killed")), 0)
        if any(c.get("timed_out") for c in step["commands"]):
            step["status"] = "timeout"
    except (KeyboardInterrupt, SystemExit):
        step["status"] = "interrupted"
        raise
    except Exception as e:  # this script's bug reading a result: recorded, and the next step runs
        step["status"], step["note"] = "error", f"{type(e).__name__}: {e}"
        step["returncode"] = next((c["returncode"] for c in step["commands"] if c["returncode"]), 0)
    finally:
        step["wall_seconds"] = round(time.perf_counter() - t0, 1)
        run.write()
        log.info("step %s: %s in %.1f s %s", name, step["status"], step["wall_seconds"], step.get("headline", ""))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--out_dir", required=True, help="where the summary, logs and every run go (required)")
    p.add_argument("--device", default="cuda", help="the device of every step (--cpu: cpu)")
    p.add_argument("--thumbs", help="a COCO-like tree (../shared/coco_thumbs) for the photos step; "
                                    "without it the step is skipped")
    p.add_argument("--wheels", default=os.path.join(ROOT, "gpu", "wheels"),
                   help="wheels of pycocotools and pytorch-model-summary, for a Python without them")
    p.add_argument("--only", nargs="+", choices=STEPS, metavar="STEP", help=f"only these steps ({', '.join(STEPS)})")
    p.add_argument("--skip", nargs="+", choices=STEPS, default=[], metavar="STEP", help="leave these steps out")
    p.add_argument("--long", action="store_true", help="also the COCO-sized synthetic run (long)")
    p.add_argument("--cpu", action="store_true", help="every step on the CPU, tiny: tests this script")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # env | memory DATA [WIDTH N_BLOCKS]
    return p


def main(args):
    if args.child:
        device = "cpu" if args.cpu else args.device
        return env_child(device) if args.child[0] == "env" else memory_child(device, *args.child[1:])
    os.makedirs(args.out_dir, exist_ok=True)
    run = FirstRun(args)
    earlier = os.path.join(run.out, "summary.json")
    if os.path.exists(earlier):  # a second run into OUT (--only the steps a first missed) adds to it
        run.summary["steps"] = read_json_or_empty(earlier).get("steps", [])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wanted = args.only or [s for s in STEPS if s != "long" or args.long]
    machine_record(run)
    for name in STEPS:
        if name not in wanted:
            if not args.only:
                run.skip(name, "without --long" if name == "long" else "")
        elif name in args.skip:
            run.skip(name, "--skip")
        elif name == "photos" and not args.thumbs:
            run.skip(name, "no --thumbs given")
        else:
            run_step(run, name)
            if name == "deps" and "missing_after" in run.step["figures"]:
                machine_record(run)  # the versions now installed
    run.summary["finished"] = True
    run.write()
    failed = [s["name"] for s in run.summary["steps"] if s["status"] not in ("ok", "skipped")]
    log.info("summary in %s; %s", os.path.join(run.out, "summary.md"),
             f"not ok: {', '.join(failed)}" if failed else "every step ok")
    return 1 if failed else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(get_args_parser().parse_args()))
