"""What each CPU-only speed trick is worth to a training step, measured with and without
it, alternating, each run in a fresh process:

    python benchmarks/bench_cpu_tricks.py --steps 8 --repeats 3

  plain       HW5Net, --single_backward, fused Adam, batch 16 (the demo's step)
  no_reuse    the same without devices.reuse_freed_memory (glibc's malloc left alone)
  linear_wxt  the same with the heads' products computed as (W x^T)^T, a trick this
              package once had in network.py and dropped (it lives only here now)
Each run's figure is the median seconds per step over its timed steps (docs/performance.md).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import HelpFormatter  # noqa: E402
from devices import NonFiniteGuard, reuse_freed_memory  # noqa: E402
from network import ARCHITECTURE, build_model  # noqa: E402
from train import make_criteria, make_optimizer  # noqa: E402
from utils import order_boxes  # noqa: E402


class LinearWxT(torch.autograd.Function):
    """y = (W x^T)^T + b: the same product as nn.Linear's, the other orientation."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.addmm(bias.unsqueeze(1), weight, x.t()).t().contiguous()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return grad.mm(weight), grad.t().mm(x), grad.sum(0)


def child(kind, steps):
    if kind != "no_reuse":
        reuse_freed_memory()
    if kind == "linear_wxt":
        nn.Linear.forward = lambda self, x: LinearWxT.apply(x, self.weight, self.bias)
    torch.manual_seed(0)
    model = build_model(ARCHITECTURE).train()
    opt = make_optimizer(model, 1e-3, (0.9, 0.99))
    guard = NonFiniteGuard(opt, torch.device("cpu"))
    cls, box, _ = make_criteria("ciou")
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(16, 2, generator=g) * 0.5
    images, labels = torch.rand(16, 3, 256, 256, generator=g), torch.arange(16) % 3
    boxes = torch.cat([xy, xy + 0.4], dim=1)
    times = []
    for _ in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits, raw = model(images)
        loss = cls(logits, labels) + box(order_boxes(raw), boxes)
        loss.backward()
        guard.check(loss.detach())
        if guard.allows_step():
            opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run, after two warm-up steps")
    p.add_argument("--repeats", type=int, default=3, help="runs of each kind, alternating")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main(args):
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    kinds = ("plain", "no_reuse", "linear_wxt")
    runs = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True).stdout
            runs[kind].append(json.loads(out.strip().splitlines()[-1]))
    plain = statistics.median(runs["plain"])
    for kind in kinds:
        med = statistics.median(runs[kind])
        print(f"{kind:11s} {med:.3f} s/step (runs {', '.join(f'{t:.3f}' for t in runs[kind])}); "
              f"{100 * (med - plain) / plain:+.1f}% against plain")
    print(f"torch {torch.__version__}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
