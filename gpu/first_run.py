"""The first run on one A100 or H100 (gpu/README.md), in at most 8 minutes. OUT/summary.md and
summary.json are rewritten as each step starts and ends: a run cut off keeps what it measured.

    python gpu/first_run.py --out_dir OUT --thumbs ../shared/coco_thumbs   # on the GPU
    python gpu/first_run.py --out_dir OUT --cpu      # every step tiny, on the CPU (CI)
"""
import argparse
import json
import logging
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

# Seconds each step may take: on a GPU 480 in all, for a borrowed GPU that may be taken back
# after 10 minutes; --cpu on 2 shared cores.
LIMITS = {"gpu": {"bench_vs_cpu": 100, "resume": 100, "photos": 280},
          "cpu": {"bench_vs_cpu": 90, "resume": 150, "photos": 180}}
# HW5Net, its train.py options, bench_vs_cpu's (steps, batch, image size), resume's synthetic
# (train, val) images: the report's on a GPU, tiny with --cpu.
SIZES = {"gpu": (ARCHITECTURE, [], (20, 16, 256), (96, 32)),
         "cpu": ({"width": 1, "n_blocks": 1, "learnable_res": False}, ["--width", "1", "--n_blocks", "1"],
                 (6, 4, 64), (24, 8))}
# (tf32, strict_fp32, amp) of each setting timed; the strict one is compared with the CPU.
BENCH = {"defaults": (False, False, False), "--tf32": (True, False, False),
         "--amp": (False, False, True), "--strict_fp32": (False, True, False)}
# CUDA against the CPU, from the same weights: the first loss's and the first gradients' relative
# differences, about 10x those of two CPU runs whose kernels sum in other orders (gpu/README.md).
# Later steps get no tolerance: those two CPU runs' losses part by up to 9% within 20 steps.
FIRST_LOSS_RTOL, FIRST_GRADIENT_RTOL = 4e-6, 4e-2
TIMINGS = ("epoch_seconds", "save_seconds", "settings")  # what a resume changes: timings, options


class StepTimeout(BaseException):
    """A step's time ran out (SIGALRM); a BaseException, which no `except Exception` swallows."""


def time_out(signum, frame):
    raise StepTimeout()


def run_command(cmd, log_path, commands, on_line=None, expected=0):
    """Run cmd in the repository root, its output appended to log_path and handed line by line
    to on_line(proc, line); killed if the step ends first. An exit status not expected raises."""
    commands.append(shlex.join(cmd).replace(sys.executable, "python"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a") as f, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, text=True) as proc:
        try:
            f.write(f"$ {commands[-1]}\n")
            for line in proc.stdout:
                f.write(line)
                if on_line:
                    on_line(proc, line)
        except BaseException:  # the step's time ran out, or a SIGTERM came: the command goes too
            proc.kill()
            raise
    if expected is not None and proc.returncode != expected:
        raise RuntimeError(f"`{commands[-1]}` exited with status {proc.returncode}, not {expected}")


def machine(device):
    p = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    driver, driver_cuda = nvidia_driver_info() or ("none", None)
    git = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True) \
        if shutil.which("git") else None
    return {"GPU": f"{p.name}, {p.total_memory / 2 ** 30:.0f} GiB, sm_{p.major}{p.minor}" if p else "none",
            "driver": f"{driver} (CUDA {driver_cuda})", "torch": torch.__version__, "CUDA": torch.version.cuda,
            "cuDNN": torch.backends.cudnn.version(), "Python": sys.version.split()[0],
            "CPU": f"{os.uname().machine}, {os.cpu_count()} cores", "commit": git.stdout.strip() if git else "unknown"}


def train_steps(device, settings, shape, amp=False, seed=0):
    """The report's step (train.train_one_epoch: two backward calls, fused Adam, CIoU) from the
    seed's weights on noise drawn on the CPU from seed, the same on every device: (each step's
    loss, each step's seconds, the model, the first step's gradients)."""
    from train import make_criteria, make_optimizer, seed_everything, train_one_epoch
    n_steps, batch_size, size = shape
    seed_everything(seed)
    model = build_model(settings, image_size=size).to(device)
    optimizer = make_optimizer(model, 1e-3, (0.9, 0.99))
    criterion_cls, criterion_box, _ = make_criteria("ciou")
    noise, losses, seconds, gradients = torch.Generator().manual_seed(seed), [], [], None
    for _ in range(n_steps):
        batch = {"image": torch.rand(batch_size, 3, size, size, generator=noise),
                 "bbox": torch.rand(batch_size, 2, 2, generator=noise).sort(1).values.flatten(1),
                 "label": torch.randint(3, (batch_size,), generator=noise)}
        start = time.perf_counter()  # the step before read its means back, a sync: this one alone
        means = train_one_epoch(model, [{k: v.to(device) for k, v in batch.items()}], optimizer,
                                criterion_cls, criterion_box, device, 1, amp=amp, progress=False)
        seconds.append(time.perf_counter() - start)
        losses.append(means["cross_entropy"] + means["box_loss"])
        if gradients is None:
            gradients = {n: p.grad.to("cpu", copy=True) for n, p in model.named_parameters()}
    return losses, seconds, model, gradients


def differences(a, b):
    """How far apart two runs are, each (losses, first gradients, final state_dict)."""
    (losses, grads, weights), (other_losses, other_grads, other_weights) = a, b
    norm = lambda tensors: sum(t.double().pow(2).sum() for t in tensors).item() ** 0.5  # noqa: E731
    return {"first loss, relative difference": abs(losses[0] - other_losses[0]) / abs(losses[0]),
            "first gradients, relative difference":
                norm(grads[k] - other_grads[k] for k in grads) / norm(grads.values()),
            "largest relative loss difference":
                max(abs(x - y) / max(abs(x), abs(y)) for x, y in zip(losses, other_losses)),
            "largest weight difference": max((weights[k].cpu().double() - other_weights[k].cpu().double())
                                             .abs().max().item() for k in weights if weights[k].is_floating_point())}


def bench_vs_cpu(fig, device, settings, shape):
    """Median step time (of the second half) and peak memory at each of BENCH; then the strict
    float32 run's losses, gradients and weights against the same steps on the CPU."""
    for name, (tf32, strict_fp32, amp) in BENCH.items():
        set_gpu_options(tf32, strict_fp32)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses, seconds, model, gradients = train_steps(device, settings, shape, amp)
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"  # the CPU: peak RSS
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
        fig[name] = {"ms a step": round(1000 * statistics.median(seconds[shape[0] // 2:]), 2),
                     "peak GiB": round(peak, 2)}
        if strict_fp32:
            strict = losses, gradients, {k: v.cpu() for k, v in model.state_dict().items()}
        del model  # one HW5Net at a time
    losses, _, model, gradients = train_steps(torch.device("cpu"), settings, shape)
    fig.update({f"losses on {device}, strict float32": strict[0], "losses on the CPU": losses})
    fig.update(differences(strict, (losses, gradients, model.state_dict())))
    fig["passed"] = (fig["first loss, relative difference"] <= FIRST_LOSS_RTOL
                     and fig["first gradients, relative difference"] <= FIRST_GRADIENT_RTOL)
    fig.update({"tolerances": [FIRST_LOSS_RTOL, FIRST_GRADIENT_RTOL], "(steps, batch, image size)": shape})


def without_timings(history):
    return {k: without_timings(v) if isinstance(v, dict) else v for k, v in history.items() if k not in TIMINGS}


def resume(fig, out, device, model_options, n_images):
    """train.py for 3 epochs, sent SIGTERM once it logs epoch 1 (as Slurm stops a job), then run
    again with --resume, against the same run left alone: the histories must be the same."""
    from Dataset import build_dataset
    from synthetic.coco import make_synthetic_coco
    folder = os.path.join(out, "resume")
    coco, data, cut, whole = (os.path.join(folder, d) for d in ("coco", "data", "cut", "whole"))
    shutil.rmtree(folder, ignore_errors=True)
    make_synthetic_coco(coco, *n_images, seed=0)
    build_dataset(coco, data, progress=False, figure=False)
    train = [sys.executable, "train.py", "--data_dir", data, "--epochs", "3", "--checkpoint_minutes", "0",
             "--device", str(device), "--quiet", *model_options]

    def watch(proc, line):
        if line.startswith("INFO train: epoch 1/3:") and "resumed after epoch" not in fig:
            proc.send_signal(signal.SIGTERM)
        if "continuing the run in" in line:  # "... after epoch N"
            fig["resumed after epoch"] = int(line.split()[-1])

    log_path, commands = os.path.join(out, "resume.log"), fig.setdefault("commands", [])
    run_command([*train, "--out_dir", cut], log_path, commands, watch, EXIT_INTERRUPTED)
    run_command([*train, "--out_dir", cut, "--resume"], log_path, commands, watch)
    run_command([*train, "--out_dir", whole], log_path, commands)
    cut_history, whole_history = (read_json(os.path.join(d, "history.json"), "a history") for d in (cut, whole))
    fig["same history"] = without_timings(cut_history) == without_timings(whole_history)
    fig["passed"] = fig["same history"] and fig.get("resumed after epoch") in (1, 2)


def photos(fig, out, thumbs, device, options):
    """The photos built into a dataset (Dataset.py), the report's experiment on them, and the
    TA's check of that run on the CPU, in float32: is the device's run within its tolerances?"""
    data, run = os.path.join(out, "photos", "data"), os.path.join(out, "photos", "run")
    shutil.rmtree(os.path.join(out, "photos"), ignore_errors=True)
    log_path, commands, said = os.path.join(out, "photos.log"), fig.setdefault("commands", []), []
    python = sys.executable
    run_command([python, "Dataset.py", "--coco_dir", os.path.abspath(thumbs), "--out_dir", data, "--quiet"],
                log_path, commands)
    run_command([python, "hw5_main.py", "--data_dir", data, "--out_dir", run, "--device", str(device), "--quiet",
                 *options], log_path, commands)
    run_command([python, "hw5_main.py", "--out_dir", run, "--check", "--device", "cpu"], log_path, commands,
                lambda proc, line: said.append(line.strip()), expected=None)
    results = read_json(os.path.join(run, "results.json"), "hw5_main.py's results")
    for key in ("ciou", "mse"):
        fig[key] = {f"{split} {m}": round(results[key][split][m], 4) for split in ("train", "test")
                    for m in ("accuracy", "mean_iou")}
        fig[key].update({"test AP50": results[key]["test"]["coco"]["AP50"], "best epoch": results[key]["best_epoch"]})
    fig["mean-box baseline, test mean IoU"] = round(results["baseline"]["test"], 4)
    fig["--check on the CPU"] = [line for line in said if line.startswith(("MISMATCH", "MISSING"))][:5] + said[-1:]


def write_summary(summary, out):
    """summary.json, and summary.md: the machine's table, then each step's status and figures."""
    lines = [f"# First GPU run ({summary['mode']} mode)", "", f"`{summary['command']}`, {summary['started']}, "
             f"{summary['seconds']} s" + ("" if summary["finished"] else ", NOT FINISHED"), "",
             "| machine | |", "|---|---|", *(f"| {k} | {v} |" for k, v in summary["machine"].items())]
    for step in summary["steps"]:
        timing = f" in {step['seconds']} s (limit {step['limit']})" if "seconds" in step else ""
        figures = step.get("figures", {})
        lines += ["", f"## {step['name']}: {step['status']}{timing}", ""]
        lines += [f"**{step['error']}**", ""] if "error" in step else []
        lines += [f"- {k}: {json.dumps(v)}" for k, v in figures.items() if k != "commands"]
        lines += ["", "```bash", *figures["commands"], "```"] if "commands" in figures else []
    write_json(summary, os.path.join(out, "summary.json"))
    write_text("\n".join(lines) + "\n", os.path.join(out, "summary.md"))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--out_dir", required=True, help="for summary.md, summary.json, the logs and the runs (required)")
    p.add_argument("--thumbs", help="a COCO 2014 tree of photos (../shared/coco_thumbs); without it, no photos step")
    p.add_argument("--device", default="cuda", help="the GPU (--cpu: the CPU)")
    p.add_argument("--cpu", action="store_true", help="every step tiny, on the CPU (CI)")
    return p


def main(args):
    run_start, out, mode = time.perf_counter(), args.out_dir, "cpu" if args.cpu else "gpu"
    device = pick_device("cpu" if args.cpu else args.device)
    model, options, shape, n_images = SIZES[mode]
    steps = {"bench_vs_cpu": lambda fig: bench_vs_cpu(fig, device, model, shape),
             "resume": lambda fig: resume(fig, out, device, options, n_images),
             "photos": lambda fig: photos(fig, out, args.thumbs, device, options + ["--epochs", "1"] * args.cpu)}
    summary = {"command": shlex.join(["python", *sys.argv]), "mode": mode, "started": time.strftime("%Y-%m-%d %H:%M"),
               "seconds": 0, "finished": False, "machine": machine(device), "steps": []}
    os.makedirs(out, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the step recorded, its command killed
    signal.signal(signal.SIGALRM, time_out)
    for name, work in steps.items():
        if name == "photos" and not args.thumbs:
            summary["steps"].append({"name": name, "status": "skipped (no --thumbs)"})
            continue
        step = {"name": name, "status": "running", "limit": LIMITS[mode][name], "figures": {}}
        summary["steps"].append(step)
        write_summary(summary, out)  # a run cut off now shows this step running
        log.info("%s, at most %d s", name, step["limit"])
        step_start = time.perf_counter()
        signal.alarm(step["limit"])
        try:
            work(step["figures"])
            step["status"] = "ok" if step["figures"].get("passed", True) else "failed"
        except StepTimeout:
            step["status"] = "timeout"
        except Exception as e:  # recorded; the next step runs
            step["status"], step["error"] = "failed", f"{type(e).__name__}: {e}"
        finally:  # after a SIGTERM too, the step still "running"
            signal.alarm(0)
            step["seconds"] = round(time.perf_counter() - step_start, 1)
            summary["seconds"] = round(time.perf_counter() - run_start, 1)
            write_summary(summary, out)
            log.info("%s: %s in %.1f s", name, step["status"], step["seconds"])
    summary["finished"] = True
    write_summary(summary, out)
    failed = [s["name"] for s in summary["steps"] if s["status"] not in ("ok", "skipped (no --thumbs)")]
    log.info("%s: %s", os.path.join(out, "summary.md"), f"not ok: {failed}" if failed else "all ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(command(lambda: main(get_args_parser().parse_args()), log))
