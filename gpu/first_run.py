"""The first run on one A100 or H100 (gpu/README.md): its steps in at most 8 minutes, each recorded in
OUT/summary.md and summary.json as it ends, so that a run cut off keeps what it measured.

    python gpu/first_run.py --out_dir OUT --thumbs ../shared/coco_thumbs   # on the GPU
    python gpu/first_run.py --out_dir OUT --cpu                            # every step tiny, on the CPU (CI)
"""
import argparse
import importlib.util
import json
import logging
import math
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the package, for a script in gpu/
from cli import EXIT_INTERRUPTED, HelpFormatter, command  # noqa: E402
from devices import nvidia_driver_info, pick_device, set_gpu_options  # noqa: E402
from network import ARCHITECTURE, build_model  # noqa: E402
from outputs import read_json, write_json, write_text  # noqa: E402

log = logging.getLogger("first_run")

# Seconds a step may take (GPU, --cpu on 2 shared cores); photos gets the rest of TOTAL, on a GPU at
# least 255 s: 8 minutes in all, for a borrowed GPU that may be taken back after 10.
LIMITS = {"machine": (25, 60), "bench_vs_cpu": (100, 90), "resume": (100, 150)}
TOTAL = (480, 420)
# Imported by the package, missing from some GPU images: installed from gpu/wheels (gpu/README.md).
WHEELS = {"pycocotools": "pycocotools", "pytorch_model_summary": "pytorch-model-summary", "tqdm": "tqdm"}
# (GPU, --cpu): HW5Net and its train.py options, the (steps, batch, image size) of bench_vs_cpu, resume's
# synthetic (train, val) images. --cpu: tiny, and in this process on 64x64 images.
SIZES = ((ARCHITECTURE, [], (20, 16, 256), (96, 32)),
         ({"width": 1, "n_blocks": 1, "learnable_res": False}, ["--width", "1", "--n_blocks", "1"], (6, 4, 64),
          (24, 8)))
BENCH = {"defaults": (False, False, False), "--tf32": (True, False, False), "--amp": (False, False, True),
         "--strict_fp32": (False, True, False)}  # (tf32, strict_fp32, amp); the last is compared with the CPU
# CUDA against the CPU, from the same weights: the first loss's and the first gradients' relative
# differences, about 10x those of two CPU runs whose kernels sum in other orders (AVX-512, AVX2; gpu/README.md).
# Later steps get no tolerance: those two CPU runs' losses part by up to 9% within 20 steps.
FIRST_LOSS_RTOL, FIRST_GRADIENT_RTOL = 4e-6, 4e-2
RESUME_ATOL = 1e-6  # a resumed run redoes no work: its history matches to the last digit
LEFT_OUT = ("epoch_seconds", "save_seconds", "settings")  # timings and options, which a resume changes


class StepTimeout(BaseException):
    """A step's limit ran out (SIGALRM); a BaseException, which no `except Exception` swallows."""

    def throw(*_):
        raise StepTimeout()


def run_command(cmd, log_path, commands, on_line=None):
    """Run cmd in the repository root, its output appended to log_path and handed line by line to
    on_line(proc, line); killed if the step ends first (its limit, a SIGTERM). Returns its status."""
    commands.append(shlex.join(cmd).replace(sys.executable, "python"))
    with open(log_path, "a") as f, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                    text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        f.write(f"$ {commands[-1]}\n")
        try:
            for line in proc.stdout:
                f.write(line)
                if on_line:
                    on_line(proc, line)
        except BaseException:  # the step's limit, a SIGTERM: the command goes too
            proc.kill()
            raise
    return proc.returncode


def machine(fig, device, wheels, log_path):
    """The machine's table, after installing from wheels what this Python lacks."""
    if missing := [m for m in WHEELS if importlib.util.find_spec(m) is None]:
        run_command([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels,
                     *(WHEELS[m] for m in missing)], log_path, fig.setdefault("commands", []))
        importlib.invalidate_caches()
    p = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    commit = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True)
    fig.update({"GPU": f"{p.name}, {p.total_memory / 2 ** 30:.0f} GiB, sm_{p.major}{p.minor}" if p else "none",
                "driver": "%s (CUDA %s)" % (nvidia_driver_info() or ("none", None)), "torch": torch.__version__,
                "CUDA": torch.version.cuda, "cuDNN": torch.backends.cudnn.version(), "Python": sys.version.split()[0],
                "CPU": f"{os.uname().machine}, {os.cpu_count()} cores", "commit": commit.stdout.strip(),
                "still missing": [m for m in missing if importlib.util.find_spec(m) is None]})


def train_steps(device, settings, shape, amp=False, seed=0):
    """The report's step (train.train_one_epoch: two backward calls, fused Adam, CIoU) from the seed's
    weights on batches of noise drawn on the CPU from seed, the same on every device:
    (each step's loss, each step's seconds, the model, the first step's gradients)."""
    from train import make_criteria, make_optimizer, seed_everything, train_one_epoch
    n_steps, batch_size, size = shape
    seed_everything(seed)
    model = build_model(settings, image_size=size).to(device)
    optimizer, (criterion_cls, criterion_box, _) = make_optimizer(model, 1e-3, (0.9, 0.99)), make_criteria("ciou")
    g, losses, seconds, grads = torch.Generator().manual_seed(seed), [], [], None
    for _ in range(n_steps):
        batch = {k: v.to(device) for k, v in (("image", torch.rand(batch_size, 3, size, size, generator=g)),
                 ("bbox", torch.rand(batch_size, 2, 2, generator=g).sort(1).values.flatten(1)),  # x1 y1 x2 y2
                 ("label", torch.randint(3, (batch_size,), generator=g)))}
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's time alone
        t0 = time.perf_counter()
        means = train_one_epoch(model, [batch], optimizer, criterion_cls, criterion_box, device, 1, amp=amp,
                                progress=False)  # reads its means back: a sync
        seconds.append(time.perf_counter() - t0)
        losses.append(means["cross_entropy"] + means["box_loss"])
        grads = grads or {n: p.grad.to("cpu", copy=True) for n, p in model.named_parameters()}
    return losses, seconds, model, grads


def differences(a, b):
    """Of two runs, each (losses, first gradients, final state_dict): the relative differences of the first
    loss and of the first gradients (their norm), the largest of the losses', the largest weight difference."""
    def norm(tensors):
        return sum(t.double().pow(2).sum() for t in tensors).item() ** 0.5

    return (abs(a[0][0] - b[0][0]) / abs(a[0][0]), norm(a[1][k] - b[1][k] for k in a[1]) / norm(a[1].values()),
            max(abs(x - y) / max(abs(x), abs(y)) for x, y in zip(a[0], b[0])),
            max((a[2][k].cpu().double() - b[2][k].cpu().double()).abs().max().item() for k in a[2]
                if a[2][k].is_floating_point()))


def bench_vs_cpu(fig, device, settings, shape):
    """Median step time (of the second half) and peak memory at each of BENCH; then the strict float32
    run's losses and weights against the same steps on the CPU."""
    for name, (tf32, strict_fp32, amp) in BENCH.items():
        set_gpu_options(tf32, strict_fp32)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses, seconds, model, grads = train_steps(device, settings, shape, amp)
        fig[name] = {"ms a step": round(1000 * statistics.median(seconds[shape[0] // 2:]), 2), "peak GiB": round(
            torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}  # the CPU: the process's RSS
        strict = losses, grads, {k: v.cpu() for k, v in model.state_dict().items()}  # the last run's: strict
        del model  # one HW5Net at a time
    losses, _, model, grads = train_steps(torch.device("cpu"), settings, shape)
    first, gradient, loss, weight = differences(strict, (losses, grads, model.state_dict()))
    fig.update({f"losses on {device}, strict float32": strict[0], "losses on the CPU": losses,
                "first loss, relative difference": first, "first gradients, relative difference": gradient,
                "largest relative loss difference": loss, "largest weight difference": weight,
                "passed": first <= FIRST_LOSS_RTOL and gradient <= FIRST_GRADIENT_RTOL,
                "tolerances": [FIRST_LOSS_RTOL, FIRST_GRADIENT_RTOL], "(steps, batch, image size)": shape,
                "HW5Net": settings})


def largest_difference(a, b):
    """The largest absolute difference between the numbers of two history.json's, LEFT_OUT left
    out; inf where they differ otherwise (keys, lengths, text)."""
    if isinstance(a, dict) and isinstance(b, dict) and set(a) == set(b):
        return max((largest_difference(a[k], b[k]) for k in a if k not in LEFT_OUT), default=0.0)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return max(map(largest_difference, a, b), default=0.0)
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return abs(a - b) if numbers else 0.0 if a == b else math.inf


def resume(fig, out, device, model_options, n_images, log_path):
    """train.py for 3 epochs, sent SIGTERM once it logs epoch 1, then run again with --resume, against
    the same run left alone: the histories must match."""
    from Dataset import build_dataset
    from synthetic.coco import make_synthetic_coco
    folder = os.path.join(out, "resume")
    shutil.rmtree(folder, ignore_errors=True)
    make_synthetic_coco(os.path.join(folder, "coco"), *n_images, seed=0)
    build_dataset(os.path.join(folder, "coco"), os.path.join(folder, "data"), progress=False, figure=False)
    cmd = [sys.executable, "train.py", "--data_dir", os.path.join(folder, "data"), "--epochs", "3",
           "--checkpoint_minutes", "0", "--device", str(device), "--quiet", *model_options]
    cut, whole, commands = os.path.join(folder, "cut"), os.path.join(folder, "whole"), fig.setdefault("commands", [])

    def watch(proc, line):  # SIGTERM as Slurm sends it; then where the resumed run goes on
        if line.startswith("INFO train: epoch 1/3:") and "resumed after epoch" not in fig:
            proc.send_signal(signal.SIGTERM)
        if "continuing the run in" in line:  # "... after epoch N"
            fig["resumed after epoch"] = int(line.split()[-1])

    for argv, expected in (([*cmd, "--out_dir", cut], EXIT_INTERRUPTED), ([*cmd, "--out_dir", cut, "--resume"], 0),
                           ([*cmd, "--out_dir", whole], 0)):
        if (rc := run_command(argv, log_path, commands, watch)) != expected:
            raise RuntimeError(f"exit status {rc}, not {expected}, of `{commands[-1]}`")
    difference = largest_difference(*(read_json(os.path.join(d, "history.json"), "a history") for d in (cut, whole)))
    fig.update({"largest difference": difference if difference < math.inf else "keys, lengths or text differ",
                "passed": difference <= RESUME_ATOL and fig.get("resumed after epoch") in (1, 2)})


def photos(fig, out, thumbs, device, options, log_path):
    """The photos built into DATA (Dataset.py), then the report's experiment on them (hw5_main.py)."""
    data, run, t0 = os.path.join(out, "photos", "data"), os.path.join(out, "photos", "run"), time.perf_counter()
    shutil.rmtree(os.path.join(out, "photos"), ignore_errors=True)
    for cmd in (["Dataset.py", "--coco_dir", os.path.abspath(thumbs), "--out_dir", data, "--quiet"],
                ["hw5_main.py", "--data_dir", data, "--out_dir", run, "--device", str(device), "--quiet", *options]):
        if (rc := run_command([sys.executable, *cmd], log_path, fig.setdefault("commands", []))) != 0:
            raise RuntimeError(f"{cmd[0]} exited with status {rc}")
    r = read_json(os.path.join(run, "results.json"), "hw5_main.py's results")
    fig.update({key: {f"{split} {m}": round(r[key][split][m], 4) for split in ("train", "test") for m in
                      ("accuracy", "mean_iou")} | {"test AP50": r[key]["test"]["coco"]["AP50"], "best epoch":
                                                   r[key]["best_epoch"]} for key in ("ciou", "mse")})
    fig.update({"mean-box baseline, test mean IoU": round(r["baseline"]["test"], 4),
                "wall seconds": round(time.perf_counter() - t0, 1)})


def write_summary(summary, out):
    """summary.json, and summary.md: the machine, a line per step, then each step's figures and commands."""
    steps = summary["steps"]
    lines = [f"# First GPU run ({summary['mode']} mode)", "", f"`{summary['command']}`, {summary['started']}, "
             f"{summary['seconds']} s" + ("" if summary["finished"] else ", NOT FINISHED"), "",
             "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in (steps[0]["figures"] if steps else {}).items() if k != "commands"]
    lines += ["", "| step | status | seconds (limit) |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s.get('seconds', '-')} ({s.get('limit', '-')}) |" for s in steps]
    for s in steps:
        fig = s.get("figures", {})
        lines += ["", f"## {s['name']}: {s['status']}", ""] + ([f"**{s['error']}**", ""] if "error" in s else [])
        lines += [f"- {k}: {json.dumps(v)}" for k, v in fig.items() if k != "commands" and s["name"] != "machine"]
        lines += ["", "```bash", *fig["commands"], "```"] if fig.get("commands") else []
    write_json(summary, os.path.join(out, "summary.json"))
    write_text("\n".join(lines) + "\n", os.path.join(out, "summary.md"))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", required=True, help="for summary.md, summary.json, the logs and the runs (required)")
    g.add_argument("--device", default="cuda", help="the GPU (--cpu: the CPU)")
    g.add_argument("--cpu", action="store_true", help="every step tiny, on the CPU: tests this script")
    g = p.add_argument_group("inputs")
    g.add_argument("--thumbs", help="a COCO 2014 tree of photos (../shared/coco_thumbs); without it, no photos step")
    g.add_argument("--wheels", default=os.path.join(ROOT, "gpu", "wheels"),
                   help="wheels of the packages this Python may lack (gpu/README.md)")
    return p


def main(args):
    t_start, out, device = time.perf_counter(), args.out_dir, pick_device("cpu" if args.cpu else args.device)
    model, options, shape, n_images = SIZES[args.cpu]
    steps = {"machine": lambda fig: machine(fig, device, args.wheels, os.path.join(out, "machine.log")),
             "bench_vs_cpu": lambda fig: bench_vs_cpu(fig, device, model, shape),
             "resume": lambda fig: resume(fig, out, device, options, n_images, os.path.join(out, "resume.log")),
             "photos": lambda fig: photos(fig, out, args.thumbs, device, options + ["--epochs", "1"] * args.cpu,
                                          os.path.join(out, "photos.log"))}
    summary = {"command": shlex.join(["python", *sys.argv]), "mode": "cpu" if args.cpu else "gpu",
               "started": time.strftime("%Y-%m-%d %H:%M"), "seconds": 0, "finished": False, "steps": []}
    os.makedirs(out, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # Slurm's: the step is recorded, its child killed
    signal.signal(signal.SIGALRM, StepTimeout.throw)
    for name, work in steps.items():
        if name == "photos" and not args.thumbs:
            summary["steps"].append({"name": name, "status": "skipped (no --thumbs)"})
            continue
        limit = LIMITS[name][args.cpu] if name in LIMITS else int(TOTAL[args.cpu] - (time.perf_counter() - t_start))
        summary["steps"].append(step := {"name": name, "status": "running", "limit": limit, "figures": {}})
        write_summary(summary, out)  # a run cut off now shows this step running
        log.info("%s, at most %d s", name, limit)
        t0 = time.perf_counter()
        signal.alarm(limit)
        try:
            work(step["figures"])
            step["status"] = "ok" if step["figures"].get("passed", True) else "failed"
        except StepTimeout:
            step["status"] = "timeout"
        except Exception as e:  # recorded; the next step runs
            step["status"], step["error"] = "failed", f"{type(e).__name__}: {e}"
        finally:  # after a SIGTERM too, the step still "running"
            signal.alarm(0)
            step["seconds"], summary["seconds"] = (round(time.perf_counter() - t, 1) for t in (t0, t_start))
            write_summary(summary, out)
            log.info("%s: %s in %.1f s", name, step["status"], step["seconds"])
    summary["finished"] = True
    write_summary(summary, out)
    failed = [s["name"] for s in summary["steps"] if s["status"] not in ("ok", "skipped (no --thumbs)")]
    log.info("%s: %s", os.path.join(out, "summary.md"), f"not ok: {', '.join(failed)}" if failed else "every step ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(command(lambda: main(get_args_parser().parse_args()), log))
