"""Training and evaluation throughput, ours vs the report's loop (benchmarks/reference.py),
the machine's limit for one training step, and peak memory.

    python benchmarks/bench_train.py                     # every section, synthetic data
    python benchmarks/bench_train.py --sections train --repeats 5

Both loops run the same HW5Net (same seed) on the same dataset, built by Dataset.py from
a synthetic COCO tree, at batch 16 on the same device. Each loop is measured in a fresh
process; each throughput figure is the median over --repeats timed runs after one
untimed warm-up run.

Sections:
  train   images/s over whole training epochs, data loading included, and the peak
          memory of the process (RSS; on a GPU also torch.cuda.max_memory_allocated):
          the reference; ours with the report's settings (two backward calls); ours
          with the fastest options (--single_backward); and that again with
          --system_malloc, to show what reusing freed memory is worth (train.py's
          reuse_freed_memory). Ours decodes the images once, before the first epoch;
          that one-off cost is printed on its own.
  eval    images/s of one evaluation pass over the test split.
  feed    seconds per training batch of feeding alone (no model): the DataLoader over
          MyCOCODataset's items (index each, convert, collate, and pin for a GPU: the path
          before devices.DeviceBatches) against DeviceBatches (one index into the images in
          device memory, one conversion), and the bytes and seconds of one checkpoint.pt
          and one best_model.pt of HW5Net written to the data's folder.
  limit   FLOPs of one training step (counted by torch.utils.flop_counter) over the
          measured fp32 GEMM rate, plus the optimizer's memory traffic over the measured
          memory bandwidth (the best of three streaming kernels): the step time this
          machine cannot beat. The achieved step time (fastest options) is reported as a
          fraction of it.
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
from checkpoints import checkpoint_state, save  # noqa: E402
from devices import DeviceBatches, pick_device, reuse_freed_memory  # noqa: E402
from train import make_criteria, make_optimizer, seed_everything, train_one_epoch  # noqa: E402
from utils import evaluation, order_boxes  # noqa: E402


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
    from synthetic.coco import make_synthetic_coco
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


def new_model(device, seed=0, reference_layers=False):
    """HW5Net from the seed; with reference_layers, as the report printed it."""
    seed_everything(seed)
    net = HW5Net()
    return (reference.printed_layers(net) if reference_layers else net).to(device)


# ---------------------------------------------------------------------------------
# Measurements, each run in a fresh process (see run_child)
# ---------------------------------------------------------------------------------
def peak_rss_bytes():
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's
    peak over fork and exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


def child_train(kind, data_dir, device, repeats, amp):
    """Time whole training epochs of one loop: kind is reference, ours, single or
    single_system_malloc (as single, with glibc's malloc left alone)."""
    out = {}
    if kind in ("ours", "single"):
        reuse_freed_memory()  # as train() does
    if kind == "reference":
        train_dict, test_dict, inv_map = load_dicts(data_dir)
        data, _ = reference.make_loaders(train_dict, test_dict, inv_map, data_dir)
        model = new_model(device, reference_layers=True)
        opt = reference.make_optimizer(model)
        ce, ciou = torch.nn.CrossEntropyLoss(), reference.CompleteIOULoss("mean")
        run = lambda: reference.train_epoch(model, data, opt, ce, ciou, device)  # noqa: E731
    else:
        t0 = time.perf_counter()
        train_set = MyCOCODataset(data_dir, train=True)
        out["decode_once_s"] = time.perf_counter() - t0
        model = new_model(device)
        opt = make_optimizer(model, 1e-3, (0.9, 0.99))
        cls, box, _ = make_criteria("ciou")
        data = DeviceBatches(train_set, 16, device, generator=torch.Generator().manual_seed(0))
        run = lambda: train_one_epoch(model, data, opt, cls, box, device, 0,  # noqa: E731
                                      single_backward=kind.startswith("single"), amp=amp, progress=False)
    med, times = timed(run, device, repeats)
    n = len(data.dataset)
    out.update(epoch_s=med, images_per_s=n / med, runs_s=times, steps=len(data), images=n,
               peak_rss_bytes=peak_rss_bytes(),
               cuda_max_allocated_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else None)
    return out


def child_eval(kind, data_dir, device, repeats):
    """Time one evaluation pass over the test split: the report's evaluation() at batch
    16, or ours at batch 64."""
    model = new_model(device, reference_layers=kind == "reference")
    if kind == "reference":
        train_dict, test_dict, inv_map = load_dicts(data_dir)
        _, data = reference.make_loaders(train_dict, test_dict, inv_map, data_dir)
        ce, ciou = torch.nn.CrossEntropyLoss(), reference.CompleteIOULoss("mean")
        run = lambda: reference.evaluation(model, data, ce, ciou, device)  # noqa: E731
    else:
        reuse_freed_memory()
        data = DeviceBatches(MyCOCODataset(data_dir, train=False), 64, device)
        cls, box, _ = make_criteria("ciou")
        run = lambda: evaluation(model, data, cls, box, device)  # noqa: E731
    med, times = timed(run, device, repeats)
    return {"seconds": med, "images_per_s": len(data.dataset) / med, "runs_s": times}


def run_child(what, data_dir, args):
    """Run one measurement (what = 'train:ours', 'eval:reference', ...) in a fresh
    process, so that each starts from the same memory state, and return its figures."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", what, "--data_dir", data_dir,
           "--repeats", str(args.repeats), "--device", args.device] + (["--amp"] if args.amp else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


TRAIN_RUNS = (("reference", "train:reference"),
              ("ours (report settings)", "train:ours"),
              ("ours (--single_backward)", "train:single"),
              ("ours (--single_backward --system_malloc)", "train:single_system_malloc"))


def bench_train(data_dir, args):
    results = {}
    for name, what in TRAIN_RUNS:
        results[name] = run_child(what, data_dir, args)
        if name != "reference":
            results[name]["speedup"] = results["reference"]["epoch_s"] / results[name]["epoch_s"]
    return results


def bench_eval(data_dir, args):
    results = {"reference": run_child("eval:reference", data_dir, args)}
    results["ours (batch 64)"] = run_child("eval:ours", data_dir, args)
    results["ours (batch 64)"]["speedup"] = (results["reference"]["seconds"]
                                             / results["ours (batch 64)"]["seconds"])
    return results


def gemm_rate(device, size=2048, repeats=10):
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    med, _ = timed(lambda: a @ b, device, repeats)
    return 2 * size ** 3 / med


def memory_bandwidth(device, mbytes=512, repeats=10):
    """Bytes moved per second: the best of three streaming kernels over mbytes buffers,
    an out-of-place add (two reads, one write), an in-place add (two reads, one write
    back) and a fused Adam step on a bare parameter (four reads, three writes back, the
    pattern whose traffic the limit counts)."""
    n = mbytes * 2 ** 20 // 4
    a, b = torch.randn(n, device=device), torch.randn(n, device=device)
    c = torch.empty_like(a)
    rates = [3 * 4 * n / timed(lambda: torch.add(a, b, out=c), device, repeats)[0],
             3 * 4 * n / timed(lambda: a.add_(b), device, repeats)[0]]
    p = torch.nn.Parameter(c)
    p.grad = b
    try:
        opt = torch.optim.Adam([p], fused=True)
        rates.append(7 * 4 * n / timed(opt.step, device, repeats)[0])
    except (RuntimeError, TypeError):  # no fused Adam on this device
        pass
    return max(rates)


def step_flops(device, batch=16):
    """(FLOPs of one forward and backward pass at this batch size, parameters)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = new_model(device)
    x = torch.rand(batch, 3, 256, 256, device=device)
    y = torch.randint(0, 3, (batch,), device=device)
    b = torch.tensor([[0.2, 0.2, 0.7, 0.8]], device=device).expand(batch, 4)
    cls, box, _ = make_criteria("ciou")
    counter = FlopCounterMode(display=False)
    with counter:
        logits, raw = model(x)
        (cls(logits, y) + box(order_boxes(raw), b)).backward()
    return counter.get_total_flops(), sum(p.numel() for p in model.parameters())


def bench_feed(data_dir, device, repeats):
    """Host seconds per batch of 16 of the two feeding paths (device work waited for), and
    the cost of writing a checkpoint and a best model. Malloc keeps freed blocks, as in
    train() (otherwise each batch's 12.6 MB faults in anew, whichever the path)."""
    reuse_freed_memory()
    train_set = MyCOCODataset(data_dir, train=True)
    gen = torch.Generator().manual_seed(0)
    old = torch.utils.data.DataLoader(train_set, batch_size=16, shuffle=True, generator=gen,
                                      pin_memory=device.type == "cuda")
    new = DeviceBatches(train_set, 16, device, generator=gen)

    def epoch(batches, move):
        for batch in batches:
            if move:
                batch["image"].to(device, non_blocking=True)
        sync(device)

    res = {}
    for name, batches, move in (("DataLoader (workers 0)", old, True), ("DeviceBatches", new, False)):
        med, _ = timed(lambda: epoch(batches, move), device, repeats)  # noqa: B023
        res[name] = {"seconds_per_batch": med / len(batches)}
    model = new_model(device)
    opt = make_optimizer(model, 1e-3, (0.9, 0.99))
    one_step = next(iter(new))
    logits, box = model(one_step["image"])
    (logits.sum() + box.sum()).backward()
    opt.step()  # Adam's moments exist
    for name, obj in (("checkpoint.pt", lambda: checkpoint_state(model, opt, 1, {}, gen, device, {})),
                      ("best_model.pt", model.state_dict)):
        path = os.path.join(data_dir, name)
        t0 = time.perf_counter()
        save(obj(), path)
        res[name] = {"seconds": time.perf_counter() - t0, "bytes": os.path.getsize(path)}
        os.remove(path)
    return res


def bench_limit(device, train_results):
    flops, n_params = step_flops(device)
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


# ---------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------
def print_results(res):
    gb = 1e9
    if "train" in res:
        t = res["train"]
        print(f"\ntraining, batch 16, one epoch of {t['reference']['steps']} steps "
              f"({t['reference']['images']} images; median of {res['repeats']} after a warm-up):")
        for name, r in t.items():
            extra = f"  {r['speedup']:.2f}x the reference" if "speedup" in r else ""
            cuda = (f", CUDA {r['cuda_max_allocated_bytes'] / gb:.2f} GB"
                    if r.get("cuda_max_allocated_bytes") else "")
            print(f"  {name:42s} {r['epoch_s']:7.2f} s/epoch {r['images_per_s']:6.1f} images/s "
                  f"{r['epoch_s'] / r['steps']:.3f} s/step  peak RSS {r['peak_rss_bytes'] / gb:.2f} GB"
                  f"{cuda}{extra}")
        print(f"  ours: decoding the training images once, before the first epoch: "
              f"{t['ours (report settings)']['decode_once_s']:.2f} s")
    if "eval" in res:
        print("\nevaluation over the test split:")
        for name, r in res["eval"].items():
            extra = f"  {r['speedup']:.2f}x the reference" if "speedup" in r else ""
            print(f"  {name:42s} {r['seconds']:7.2f} s {r['images_per_s']:7.1f} images/s{extra}")
    if "feed" in res:
        print("\nfeeding, host seconds per training batch of 16 (no model):")
        for name in ("DataLoader (workers 0)", "DeviceBatches"):
            print(f"  {name:42s} {1e3 * res['feed'][name]['seconds_per_batch']:7.2f} ms")
        for name in ("checkpoint.pt", "best_model.pt"):
            r = res["feed"][name]
            print(f"  writing {name:34s} {r['seconds']:7.2f} s for {r['bytes'] / gb:.2f} GB")
    if "limit" in res:
        lim = res["limit"]
        print("\nlimit of one training step (batch 16):")
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


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["train", "eval", "limit"],
                   choices=["train", "eval", "feed", "limit"], help="what to measure")
    p.add_argument("--data_dir", help="a dataset built by Dataset.py (default: a synthetic one, "
                                      "made in a temporary folder)")
    p.add_argument("--n_train", type=int, default=200, help="synthetic train images (before the filter)")
    p.add_argument("--n_val", type=int, default=100, help="synthetic val images (before the filter)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure, after a warm-up")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for ours (CUDA)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one measurement, in a fresh process
    return p


def main(args):
    device = pick_device(args.device)
    if args.child:
        section, kind = args.child.split(":")
        if section == "train":
            out = child_train(kind, args.data_dir, device, args.repeats, args.amp and device.type == "cuda")
        else:
            out = child_eval(kind, args.data_dir, device, args.repeats)
        print(json.dumps(out))
        return out
    tmp = None
    data_dir = args.data_dir
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory()
        data_dir = make_data(tmp.name, args.n_train, args.n_val)
    res = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
           "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv)}
    if "train" in args.sections:
        res["train"] = bench_train(data_dir, args)
    if "eval" in args.sections:
        res["eval"] = bench_eval(data_dir, args)
    if "feed" in args.sections:
        res["feed"] = bench_feed(data_dir, device, args.repeats)
    if "limit" in args.sections:
        res["limit"] = bench_limit(device, res.get("train"))
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
