"""Training and evaluation throughput, ours against the report's loop (benchmarks/reference.py),
the cost of feeding and writing, and the machine's limit for one training step
(docs/performance.md):

    python benchmarks/bench_train.py --repeats 3                    # train, eval, limit
    python benchmarks/bench_train.py --sections eval --repeats 5
    python benchmarks/bench_train.py --sections feed --repeats 5

Both loops run the same HW5Net (same seed) at batch 16 on the same synthetic dataset, built
by Dataset.py, with train.py's default GPU settings. Each loop runs in a fresh process;
each figure is the median of --repeats timed runs after one untimed warm-up.

  train   whole training epochs and the process's peak memory: the reference; ours with
          the report's settings; --single_backward; --single_backward --system_malloc
  eval    one evaluation pass over the test split: the reference at batch 16, ours at 64
  feed    host seconds per training batch of a DataLoader over MyCOCODataset against
          DeviceBatches, and the seconds to write checkpoint.pt and best_model.pt
  limit   one step's FLOPs over the measured float32 GEMM rate plus Adam's memory traffic
          over the measured bandwidth: the step time this machine cannot beat
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
import reference  # noqa: E402
from checkpoints import checkpoint_state, save  # noqa: E402
from cli import HelpFormatter  # noqa: E402
from Dataset import MyCOCODataset, build_dataset  # noqa: E402
from devices import DEVICE_HELP, DeviceBatches, pick_device, reuse_freed_memory, set_gpu_options  # noqa: E402
from network import ARCHITECTURE, build_model  # noqa: E402
from train import make_criteria, make_optimizer, seed_everything, train_one_epoch  # noqa: E402
from utils import evaluation, order_boxes  # noqa: E402

TRAIN_RUNS = {"reference": "reference", "ours (report settings)": "ours",
              "ours (--single_backward)": "single", "ours (--single_backward --system_malloc)": "single_system_malloc"}
EVAL_RUNS = {"reference": "reference", "ours (batch 64)": "ours"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Median seconds of repeats runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_data(work, n_train, n_val):
    """A synthetic COCO tree in work, built into work/data by Dataset.py."""
    from synthetic.coco import make_synthetic_coco
    coco, data = os.path.join(work, "coco"), os.path.join(work, "data")
    make_synthetic_coco(coco, n_train, n_val, seed=0)
    build_dataset(coco, data, workers=os.cpu_count() or 1, progress=False, figure=False)
    return data


def new_model(device, seed=0):
    seed_everything(seed)
    return build_model(ARCHITECTURE).to(device)


def peak_rss_bytes():
    """This process's peak resident memory (VmHWM: ru_maxrss would carry the parent's peak
    over fork and exec)."""
    if not os.path.exists("/proc/self/status"):  # macOS: ru_maxrss, in bytes there
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reuse_as_train_does(device, kind):
    if device.type == "cpu" and kind != "single_system_malloc":
        reuse_freed_memory()


# ---------------------------------------------------------------------------------
# One measurement, in a fresh process (run_child)
# ---------------------------------------------------------------------------------
def child(section, kind, data_dir, device, repeats):
    """Whole training epochs (section train; kind a value of TRAIN_RUNS) or one evaluation
    pass over the test split (eval; kind reference, at batch 16, or ours, at 64) of one loop."""
    out, model = {}, new_model(device)
    if kind == "reference":
        train_loader, test_loader = reference.make_loaders(data_dir)
        ce, ciou, opt = torch.nn.CrossEntropyLoss(), reference.CompleteIOULoss("mean"), reference.make_optimizer(model)
        if section == "train":
            data, run = train_loader, lambda: reference.train_epoch(model, train_loader, opt, ce, ciou, device)
        else:
            data, run = test_loader, lambda: reference.evaluation(model, test_loader, ce, ciou, device)
    else:
        reuse_as_train_does(device, kind)
        t0 = time.perf_counter()
        dataset = MyCOCODataset(data_dir, train=section == "train")
        out["decode_once_s"] = time.perf_counter() - t0
        cls, box, _ = make_criteria("ciou")
        if section == "train":
            opt = make_optimizer(model, 1e-3, (0.9, 0.99))
            data = DeviceBatches(dataset, 16, device, generator=torch.Generator().manual_seed(0))
            run = lambda: train_one_epoch(model, data, opt, cls, box, device, 0,  # noqa: E731
                                          single_backward=kind != "ours", progress=False)
        else:
            data = DeviceBatches(dataset, 64, device)
            run = lambda: evaluation(model, data, cls, box, device)  # noqa: E731
    seconds = timed(run, device, repeats)
    return {**out, "seconds": seconds, "images_per_s": len(data.dataset) / seconds, "steps": len(data),
            "images": len(data.dataset), "peak_rss_bytes": peak_rss_bytes(),
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None}


def run_child(what, data_dir, args):
    """One measurement (what: 'train:ours', 'eval:reference', ...) in a fresh process, so
    that each starts from the same memory state; returns its figures."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", what, "--data_dir", data_dir,
           "--repeats", str(args.repeats), "--device", args.device]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------
def bench_loops(section, runs, data_dir, args):
    """Each loop of runs (name: kind) in its own process, a row each."""
    results = {name: run_child(f"{section}:{kind}", data_dir, args) for name, kind in runs.items()}
    ref = results["reference"]
    print(f"\ntraining, one epoch of {ref['steps']} steps ({ref['images']} images):" if section == "train"
          else "\nevaluation over the test split:")
    for name, r in results.items():
        row = f"  {name:42s} {r['seconds']:7.2f} s {r['images_per_s']:6.1f} images/s"
        if section == "train":
            row += f" {r['seconds'] / r['steps']:.3f} s/step  peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB"
            if r["cuda_max_allocated_bytes"]:
                row += f", CUDA {r['cuda_max_allocated_bytes'] / 1e9:.2f} GB"
        print(row + (f"  {ref['seconds'] / r['seconds']:.2f}x the reference" if r is not ref else ""))
    if section == "train":
        print(f"  ours: decoding the training images once: {results['ours (report settings)']['decode_once_s']:.2f} s")
    return results


def bench_feed(data_dir, device, repeats):
    """Host seconds per batch of 16 of the two feeding paths (device work waited for), and
    the seconds to write a checkpoint and a best model into data_dir."""
    reuse_as_train_does(device, "ours")  # else each batch's 12.6 MB faults in anew, whichever the path
    train_set = MyCOCODataset(data_dir, train=True)
    gen = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(train_set, batch_size=16, shuffle=True, generator=gen,
                                         pin_memory=device.type == "cuda")
    batches = DeviceBatches(train_set, 16, device, generator=gen)

    def loader_epoch():
        for batch in loader:
            batch["image"].to(device, non_blocking=True)

    def device_epoch():
        for _ in batches:
            pass

    print("\nfeeding, host seconds per training batch of 16 (no model):")
    for name, epoch in (("DataLoader (workers 0)", loader_epoch), ("DeviceBatches", device_epoch)):
        print(f"  {name:42s} {1e3 * timed(epoch, device, repeats) / len(batches):7.2f} ms")
    model = new_model(device)
    opt = make_optimizer(model, 1e-3, (0.9, 0.99))
    logits, box = model(next(iter(batches))["image"])
    (logits.sum() + box.sum()).backward()
    opt.step()  # Adam's moments exist
    for name, state in (("checkpoint.pt", lambda: checkpoint_state(model, opt, 1, {}, gen, device, {})),
                        ("best_model.pt", model.state_dict)):
        path = os.path.join(data_dir, name)
        t0 = time.perf_counter()
        save(state(), path)
        print(f"  writing {name:34s} {time.perf_counter() - t0:7.2f} s for {os.path.getsize(path) / 1e9:.2f} GB")
        os.remove(path)


def memory_bandwidth(device, mbytes=512, repeats=10):
    """Bytes moved per second, the best of three streaming kernels over mbytes buffers: an
    out-of-place add, an in-place add, and a fused Adam step on a bare parameter (four
    reads, three writes: the traffic the limit counts)."""
    n = mbytes * 2 ** 20 // 4
    a, b = torch.randn(n, device=device), torch.randn(n, device=device)
    c = torch.empty_like(a)
    rates = [3 * 4 * n / timed(lambda: torch.add(a, b, out=c), device, repeats),
             3 * 4 * n / timed(lambda: a.add_(b), device, repeats)]
    p = torch.nn.Parameter(c)
    p.grad = b
    try:
        opt = torch.optim.Adam([p], fused=True)
        rates.append(7 * 4 * n / timed(opt.step, device, repeats))
    except (RuntimeError, TypeError):  # no fused Adam on this device
        pass
    return max(rates)


def bench_limit(device, train_results):
    from torch.utils.flop_counter import FlopCounterMode
    model = new_model(device)
    x = torch.rand(16, 3, 256, 256, device=device)
    y = torch.randint(0, 3, (16,), device=device)
    target = torch.tensor([[0.2, 0.2, 0.7, 0.8]], device=device).expand(16, 4)
    cls, box, _ = make_criteria("ciou")
    counter = FlopCounterMode(display=False)
    with counter:  # forward and backward of one step at batch 16
        logits, raw = model(x)
        (cls(logits, y) + box(order_boxes(raw), target)).backward()
    flops = counter.get_total_flops()
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    rate = 2 * 2048 ** 3 / timed(lambda: a @ b, device, 10)
    bandwidth = memory_bandwidth(device)
    adam_bytes = 7 * 4 * sum(p.numel() for p in model.parameters())  # read p, grad, 2 moments; write 3
    limit = flops / rate + adam_bytes / bandwidth
    print(f"\nlimit of one training step (batch 16):\n"
          f"  FLOPs {flops / 1e9:.1f} G at {rate / 1e9:.1f} GFLOP/s (float32 GEMM, measured) = {flops / rate:.3f} s\n"
          f"  Adam traffic {adam_bytes / 1e9:.2f} GB at {bandwidth / 1e9:.1f} GB/s (measured) = "
          f"{adam_bytes / bandwidth:.3f} s\n  limit {limit:.3f} s/step")
    if train_results:
        fastest = train_results["ours (--single_backward)"]
        step = fastest["seconds"] / fastest["steps"]
        print(f"  achieved {step:.3f} s/step (--single_backward) = {100 * limit / step:.0f}% of the limit")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--sections", nargs="+", default=["train", "eval", "limit"],
                   choices=["train", "eval", "feed", "limit"], help="sections to run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure, after a warm-up")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--child", help=argparse.SUPPRESS)  # one measurement, in a fresh process
    p.add_argument("--data_dir", help=argparse.SUPPRESS)  # the child's dataset
    return p


def main(args):
    device = pick_device(args.device)
    set_gpu_options()  # train.py's defaults, so that a GPU figure is that of a default run
    if args.child:
        section, kind = args.child.split(":")
        out = child(section, kind, args.data_dir, device, args.repeats)
        print(json.dumps(out))
        return out
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} after a warm-up")
    with tempfile.TemporaryDirectory() as work:
        data_dir = make_data(work, 200, 100)
        train_results = bench_loops("train", TRAIN_RUNS, data_dir, args) if "train" in args.sections else None
        if "eval" in args.sections:
            bench_loops("eval", EVAL_RUNS, data_dir, args)
        if "feed" in args.sections:
            bench_feed(data_dir, device, args.repeats)
        if "limit" in args.sections:
            bench_limit(device, train_results)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
