"""Training and evaluation throughput, ours vs the report's loop (benchmarks/reference.py),
the machine's limit for one training step, and peak memory.

    python benchmarks/bench_train.py                     # every section, synthetic data
    python benchmarks/bench_train.py --sections train eval --repeats 5

Both loops run the same HW5Net (same seed) on the same dataset, built by Dataset.py from
a synthetic COCO tree, at batch 16 on the same device. Each throughput figure is the
median over --repeats timed runs after one untimed warm-up run.

Sections:
  train   images/s over whole training epochs, data loading included: the reference;
          ours with the report's settings (two backward calls); ours with the fastest
          options (--single_backward). Ours decodes the images once, before the first
          epoch; that one-off cost is printed on its own.
  eval    images/s of one evaluation pass over the test split.
  limit   FLOPs of one training step (counted by torch.utils.flop_counter) over the
          measured fp32 GEMM rate, plus the optimizer's memory traffic over the measured
          memory bandwidth: the step time this machine cannot beat. The achieved step
          time (fastest options) is reported as a fraction of it.
  memory  peak memory of training at batch 16, each loop in a fresh process: RSS on the
          CPU, torch.cuda.max_memory_allocated on a GPU.
"""
import argparse
import json
import logging
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402
from Dataset import MyCOCODataset, build_dataset  # noqa: E402
from network import HW5Net  # noqa: E402
from train import get_args_parser as train_args, loader, make_criteria, make_optimizer  # noqa: E402
from train import pick_device, seed_everything, train_one_epoch  # noqa: E402
from utils import evaluation  # noqa: E402

log = logging.getLogger("bench_train")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """(median seconds, all seconds) of repeats runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def make_data(data_dir, n_train, n_val):
    from synthetic_coco import make_synthetic_coco
    coco = os.path.join(data_dir, "coco")
    make_synthetic_coco(coco, n_train, n_val, seed=0)
    build_dataset(coco, os.path.join(data_dir, "data"), workers=os.cpu_count() or 1,
                  progress=False, figure=False)
    return os.path.join(data_dir, "data")


def load_dicts(data_dir):
    out = []
    for name in ("train_data.pkl", "test_data.pkl", "inv_map.pkl"):
        with open(os.path.join(data_dir, name), "rb") as f:
            out.append(pickle.load(f))
    return out


def new_model(device, seed=0):
    seed_everything(seed)
    return HW5Net().to(device)


# ---------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------
def bench_train(data_dir, device, repeats, amp):
    train_dict, test_dict, inv_map = load_dicts(data_dir)
    results = {}

    ref_loader, _ = reference.make_loaders(train_dict, test_dict, inv_map, data_dir)
    model = new_model(device)
    opt = reference.make_optimizer(model)
    ce, ciou = torch.nn.CrossEntropyLoss(), reference.CompleteIOULoss("mean")
    n = len(ref_loader.dataset)
    med, times = timed(lambda: reference.train_epoch(model, ref_loader, opt, ce, ciou, device),
                       device, repeats)
    results["reference"] = {"epoch_s": med, "images_per_s": n / med, "runs_s": times,
                            "steps": len(ref_loader)}
    del model, opt

    t0 = time.perf_counter()
    train_set = MyCOCODataset(data_dir, train=True)
    results["decode_once_s"] = time.perf_counter() - t0
    args = train_args(False).parse_args([])
    for name, single in (("ours (report settings)", False), ("ours (--single_backward)", True)):
        model = new_model(device)
        opt = make_optimizer(model, args, device)
        cls, box, _ = make_criteria("ciou")
        data = loader(train_set, 16, True, device, torch.Generator().manual_seed(0))
        med, times = timed(lambda: train_one_epoch(model, data, opt, cls, box, device, 0,
                                                   single_backward=single, amp=amp, progress=False),
                           device, repeats)
        results[name] = {"epoch_s": med, "images_per_s": len(train_set) / med, "runs_s": times,
                         "steps": len(data), "speedup": results["reference"]["epoch_s"] / med}
        del model, opt
    return results


def bench_eval(data_dir, device, repeats):
    train_dict, test_dict, inv_map = load_dicts(data_dir)
    _, ref_loader = reference.make_loaders(train_dict, test_dict, inv_map, data_dir)
    model = new_model(device)
    ce, ciou = torch.nn.CrossEntropyLoss(), reference.CompleteIOULoss("mean")
    n = len(ref_loader.dataset)
    med, times = timed(lambda: reference.evaluation(model, ref_loader, ce, ciou, device), device, repeats)
    results = {"reference": {"seconds": med, "images_per_s": n / med, "runs_s": times}}
    test_set = MyCOCODataset(data_dir, train=False)
    cls, box, _ = make_criteria("ciou")
    for bs in (64,):
        data = loader(test_set, bs, False, device)
        med, times = timed(lambda: evaluation(model, data, cls, box, device), device, repeats)
        results[f"ours (batch {bs})"] = {"seconds": med, "images_per_s": n / med, "runs_s": times,
                                         "speedup": results["reference"]["seconds"] / med}
    return results


def gemm_rate(device, size=2048, repeats=10):
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    med, _ = timed(lambda: a @ b, device, repeats)
    return 2 * size ** 3 / med


def memory_bandwidth(device, mbytes=512, repeats=10):
    """Bytes moved per second by an out-of-place add (two reads, one write)."""
    n = mbytes * 2 ** 20 // 4
    a, b = torch.randn(n, device=device), torch.randn(n, device=device)
    c = torch.empty_like(a)
    med, _ = timed(lambda: torch.add(a, b, out=c), device, repeats)
    return 3 * 4 * n / med


def step_flops(device, batch=16):
    from torch.utils.flop_counter import FlopCounterMode
    model = new_model(device)
    x = torch.rand(batch, 3, 256, 256, device=device)
    y = torch.randint(0, 3, (batch,), device=device)
    b = torch.tensor([[0.2, 0.2, 0.7, 0.8]], device=device).expand(batch, 4)
    cls, box, _ = make_criteria("ciou")
    counter = FlopCounterMode(display=False)
    with counter:
        logits, raw = model(x)
        from utils import order_boxes
        (cls(logits, y) + box(order_boxes(raw), b)).backward()
    return counter.get_total_flops()


def bench_limit(device, train_results):
    n_params = sum(p.numel() for p in HW5Net().parameters())
    flops = step_flops(device)
    rate = gemm_rate(device)
    bw = memory_bandwidth(device)
    # Adam reads parameter, gradient and both moments and writes back the three.
    adam_bytes = 7 * 4 * n_params
    compute_s, adam_s = flops / rate, adam_bytes / bw
    limit_s = compute_s + adam_s
    out = {"step_flops": flops, "gemm_flops_per_s": rate, "bandwidth_bytes_per_s": bw,
           "adam_bytes": adam_bytes, "compute_s": compute_s, "adam_s": adam_s, "limit_step_s": limit_s}
    fastest = (train_results or {}).get("ours (--single_backward)")
    if fastest:
        step_s = fastest["epoch_s"] / fastest["steps"]
        out.update(achieved_step_s=step_s, fraction_of_limit=limit_s / step_s)
    return out


MEMORY_CHILD = r"""
import json, os, resource, sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
import bench_train as b
device = torch.device({device!r})
kind, data_dir, steps = {kind!r}, {data_dir!r}, {steps}
model = b.new_model(device)
if kind == "reference":
    import reference
    tr, te, inv = b.load_dicts(data_dir)
    loader, _ = reference.make_loaders(tr, te, inv, data_dir)
    opt = reference.make_optimizer(model)
    ce, ciou = torch.nn.CrossEntropyLoss(), reference.CompleteIOULoss("mean")
    loader = [x for _, x in zip(range(steps), loader)]
    reference.train_epoch(model, loader, opt, ce, ciou, device)
else:
    from Dataset import MyCOCODataset
    ds = MyCOCODataset(data_dir, train=True)
    args = b.train_args(False).parse_args([])
    opt = b.make_optimizer(model, args, device)
    cls, box, _ = b.make_criteria("ciou")
    data = [x for _, x in zip(range(steps), b.loader(ds, 16, True, device, torch.Generator().manual_seed(0)))]
    b.train_one_epoch(model, data, opt, cls, box, device, 0, single_backward=kind == "single", progress=False)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
cuda = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
print(json.dumps({{"peak_rss_bytes": rss, "cuda_max_allocated_bytes": cuda}}))
"""


def bench_memory(data_dir, device, steps=3):
    out = {}
    for kind, name in (("reference", "reference"), ("ours", "ours (report settings)"),
                       ("single", "ours (--single_backward)")):
        code = MEMORY_CHILD.format(root=ROOT, bench=os.path.dirname(os.path.abspath(__file__)),
                                   device=str(device), kind=kind, data_dir=data_dir, steps=steps)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------
def print_results(res):
    gb = 1e9
    if "train" in res:
        t = res["train"]
        print(f"\ntraining, batch 16, one epoch of {t['reference']['steps']} steps "
              f"(median of {res['repeats']} after a warm-up):")
        for name in ("reference", "ours (report settings)", "ours (--single_backward)"):
            r = t[name]
            extra = f"  {r['speedup']:.2f}x the reference" if "speedup" in r else ""
            print(f"  {name:28s} {r['epoch_s']:7.2f} s/epoch {r['images_per_s']:7.1f} images/s "
                  f"{r['epoch_s'] / r['steps']:.3f} s/step{extra}")
        print(f"  ours: decoding the training images once, before the first epoch: "
              f"{t['decode_once_s']:.2f} s")
    if "eval" in res:
        print(f"\nevaluation over the test split:")
        for name, r in res["eval"].items():
            extra = f"  {r['speedup']:.2f}x the reference" if "speedup" in r else ""
            print(f"  {name:28s} {r['seconds']:7.2f} s {r['images_per_s']:7.1f} images/s{extra}")
    if "limit" in res:
        lim = res["limit"]
        print(f"\nlimit of one training step (batch 16):")
        print(f"  FLOPs {lim['step_flops'] / 1e9:.1f} G at {lim['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s "
              f"(fp32 GEMM, measured) = {lim['compute_s']:.3f} s")
        print(f"  Adam traffic {lim['adam_bytes'] / gb:.2f} GB at {lim['bandwidth_bytes_per_s'] / gb:.1f} GB/s "
              f"(measured) = {lim['adam_s']:.3f} s")
        print(f"  limit {lim['limit_step_s']:.3f} s/step", end="")
        if "achieved_step_s" in lim:
            print(f"; achieved {lim['achieved_step_s']:.3f} s/step (--single_backward) = "
                  f"{100 * lim['fraction_of_limit']:.0f}% of the limit")
        else:
            print()
    if "memory" in res:
        print(f"\npeak memory, training at batch 16 (fresh process each):")
        for name, r in res["memory"].items():
            cuda = (f", CUDA max allocated {r['cuda_max_allocated_bytes'] / gb:.2f} GB"
                    if r["cuda_max_allocated_bytes"] else "")
            print(f"  {name:28s} RSS {r['peak_rss_bytes'] / gb:.2f} GB{cuda}")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["train", "eval", "limit", "memory"],
                   choices=["train", "eval", "limit", "memory"], help="what to measure")
    p.add_argument("--data_dir", help="a dataset built by Dataset.py (default: a synthetic one, "
                                      "made in a temporary folder)")
    p.add_argument("--n_train", type=int, default=200, help="synthetic train images (before the filter)")
    p.add_argument("--n_val", type=int, default=100, help="synthetic val images (before the filter)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure, after a warm-up")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for ours (CUDA)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p


def main(args):
    device = pick_device(args.device)
    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory()
        data_dir = make_data(tmp.name, args.n_train, args.n_val)
    res = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
           "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv)}
    if "train" in args.sections:
        res["train"] = bench_train(data_dir, device, args.repeats, args.amp and device.type == "cuda")
    if "eval" in args.sections:
        res["eval"] = bench_eval(data_dir, device, args.repeats)
    if "limit" in args.sections:
        res["limit"] = bench_limit(device, res.get("train"))
    if "memory" in args.sections:
        res["memory"] = bench_memory(data_dir, device)
    print(f"device {res['device']}, torch {res['torch']}, {res['threads']} threads, {res['date']}")
    print_results(res)
    print(f"\nrepeat with: {res['command']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    return res


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main(get_args_parser().parse_args())
