"""Train one HW5Net: cross-entropy for the class plus CIoU or MSE for the box (report 3.4).

    python train.py --data_dir data/hw5 --out_dir runs/ciou --loss ciou
    python train.py --data_dir data/hw5 --out_dir runs/ciou --loss ciou --resume   # after an interruption

Defaults are the report's: Adam (lr 1e-3, betas 0.9/0.99), batch 16, 30 epochs, seed 0,
two backward calls (the first with retain_graph=True), and after every epoch the best
model kept by round(test accuracy, 3) + (1 - test box loss). OUT receives
checkpoint.pt (after every epoch), best_model.pt (a state_dict), history.json.
"""
import argparse
import contextlib
import ctypes
import logging
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from Dataset import DatasetError, MyCOCODataset
from network import HW5Net
from utils import (CompleteIOULoss, accumulator_dtype, box_iou_per_image, evaluation, order_boxes,
                   write_json)

log = logging.getLogger("train")

METRICS = ("cross_entropy", "box_loss", "accuracy", "mean_iou")


class TrainingError(Exception):
    """A run that cannot start or go on; the message says why and what to do."""


# ---------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------
def nvidia_driver_info(proc_path="/proc/driver/nvidia/version", smi="nvidia-smi"):
    """(driver version, highest CUDA version the driver supports or None) of this
    machine's NVIDIA driver, or None when it has none. Read from nvidia-smi's header,
    else from the kernel module's version file."""
    if shutil.which(smi):
        try:
            out = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        driver = re.search(r"Driver Version:\s*([\d.]+)", out)
        if driver:
            cuda = re.search(r"CUDA Version:\s*([\d.]+)", out)
            return driver.group(1), cuda.group(1) if cuda else None
    try:
        with open(proc_path) as f:
            driver = re.search(r"Kernel Module\s+([\d.]+)", f.read())
    except OSError:
        return None
    return (driver.group(1), None) if driver else None


def unusable_gpu_message():
    """One line saying that this machine has an NVIDIA GPU which the installed torch cannot
    use, why, and the fix; None when torch can use it or there is none."""
    if torch.cuda.is_available():
        return None
    info = nvidia_driver_info()
    if info is None:
        return None
    driver, driver_cuda = info
    gpu = f"NVIDIA driver {driver}" + (f", which supports CUDA up to {driver_cuda}" if driver_cuda else "")
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a build without CUDA"
    else:
        why = f"torch {torch.__version__} was built for CUDA {torch.version.cuda}"
    return (f"this machine has an NVIDIA GPU ({gpu}) but {why} and cannot use it: install the "
            f"torch build for the driver's CUDA version, e.g. `pip install torch torchvision "
            f"--index-url https://download.pytorch.org/whl/cu126` for CUDA 12.6 (README: "
            f"Installing torch for your machine), or update the driver")


def pick_device(name="auto"):
    """torch.device for --device: auto is CUDA, then Apple MPS, then the CPU. A device that
    cannot be used raises TrainingError with the reason; auto falling back to the CPU on a
    machine with an NVIDIA GPU says so in one loud line."""
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        message = unusable_gpu_message()
        if message:
            log.warning("TRAINING ON THE CPU: %s", message)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"--device {name}: not a device; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"--device {name}: " + (unusable_gpu_message() or
                                f"torch {torch.__version__} sees no CUDA GPU on this machine"))
        if (device.index or 0) >= torch.cuda.device_count():
            raise TrainingError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not mps_ok:
        raise TrainingError(f"--device {name}: Apple MPS is not available (it needs an Apple-silicon "
                            f"Mac and a torch build with MPS)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise TrainingError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def make_criteria(loss):
    """(class criterion, box criterion, loss name). The box criterion takes the boxes as
    given: train_one_epoch and evaluation order the head's output first (unless
    --raw_boxes), once, for either loss."""
    if loss == "ciou":
        return nn.CrossEntropyLoss(), CompleteIOULoss("mean", order=False), "CIoU"
    if loss == "mse":
        return nn.CrossEntropyLoss(), nn.MSELoss(), "MSE"
    raise ValueError(f"loss must be 'ciou' or 'mse', not {loss!r}")


def make_optimizer(model, args, device):
    """The report's Adam. Fused (one multi-tensor kernel) where the device has it: the same
    update up to float rounding, and on 2 CPU cores the step over 211M parameters falls
    from about 0.75 s to 0.13 s."""
    params = list(model.parameters())
    kwargs = dict(lr=args.lr, betas=(args.beta1, args.beta2))
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # a device (or torch) without the fused kernel
        return torch.optim.Adam(params, **kwargs)


def reuse_freed_memory():
    """Have glibc's malloc keep large freed blocks for reuse instead of handing them back
    to the kernel. A CPU training step frees and reallocates about 1 GB: the gradients
    of the two 32768-wide linear layers (set to None by zero_grad) and the activations.
    By default glibc maps each such block anew and every page of it faults in again;
    on 2 cores that is a quarter of the step (0.82 s -> 0.59 s with reuse). Results are
    unchanged: only where memory comes from changes. Returns True when applied (Linux
    with glibc), False elsewhere."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
        # No mmap for large blocks (they come from the heap and go back to it), and the
        # heap is trimmed only when more than 2 GB lies free at its top.
        return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    except (OSError, AttributeError):
        return False


def release_freed_memory():
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim), as train()
    does when it ends: a process that goes on to other work does not keep the training
    run's freed memory."""
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)


def loader(dataset, batch_size, shuffle, device, generator=None, workers=0, drop_last=False):
    # Images already sit decoded in memory; worker processes only pay off on a GPU box.
    # Workers are not persistent: each epoch's iterator draws the workers' base seed from
    # the shuffle generator, in an uninterrupted run and after a resume alike, so a resumed
    # run shuffles (and flips) as the uninterrupted one. Persistent workers draw it once.
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       generator=generator, num_workers=workers, drop_last=drop_last,
                                       pin_memory=device.type == "cuda")


def split_train_val(files, fraction, seed):
    """(train files, validation files): a seeded random fraction held out."""
    if not 0 < fraction < 1:
        raise TrainingError(f"--val_fraction must lie in (0, 1), not {fraction}")
    perm = np.random.default_rng(seed).permutation(len(files))
    n_val = max(1, int(round(fraction * len(files))))
    val = sorted(files[i] for i in perm[:n_val])
    train = sorted(files[i] for i in perm[n_val:])
    return train, val


# ---------------------------------------------------------------------------------
# One epoch
# ---------------------------------------------------------------------------------
class NonFiniteGuard:
    """Keeps a step whose loss or gradient is not finite from reaching the weights, with no
    host sync on a GPU. After the backward pass, check(loss) sets `found` on the device
    (1.0 when the loss or any gradient holds an inf or a NaN); step() then runs the
    optimizer with it. Fused Adam takes it as found_inf, the device-side skip that
    torch.amp.GradScaler uses: weights, moments and step count stay as they were. An
    optimizer without fused support is stepped only after `found` is read on the host."""

    def __init__(self, optimizer, device):
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.found = torch.zeros((), device=device)
        self.one = torch.ones((), device=device)
        self.device_side = bool(optimizer.defaults.get("fused"))
        self.foreach_check = True

    def check(self, loss):
        self.found.copy_(~torch.isfinite(loss))
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.foreach_check:
            try:  # one pass over the gradients that reads them (multiplying by 1 is exact)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found, self.one)
                return self.found
            except (RuntimeError, NotImplementedError):  # a device without the kernel
                self.foreach_check = False
        norms = torch.stack(torch._foreach_norm(grads)) if grads else self.one
        self.found.copy_(torch.maximum(self.found, (~torch.isfinite(norms.sum())).float()))
        return self.found

    def step(self):
        if self.device_side:
            self.optimizer.found_inf = self.found
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not self.found.item():
            self.optimizer.step()


def train_one_epoch(model, data, optimizer, criterion_cls, criterion_box, device, epoch,
                    order=True, single_backward=False, amp=False, progress=True, check_every=20):
    """One pass over data. Returns the epoch's running means over images (model in train
    mode, as the report logged them) and skipped_steps: the steps whose loss or gradient
    was not finite, which changed neither the weights nor Adam's state and are left out
    of the means (NonFiniteGuard). Raises TrainingError when check_every steps in a row,
    or every step of a shorter epoch, were skipped. The host reads the device every
    check_every steps, for that check and the progress bar, and never in between."""
    model.train()
    guard = NonFiniteGuard(optimizer, device)
    acc = accumulator_dtype(device)
    sums = torch.zeros(5, device=device, dtype=acc)  # ce, box, correct, IoU (summed over images), images
    skipped = torch.zeros((), device=device)
    streak = torch.zeros((), device=device)  # skipped steps in a row
    bar = tqdm(data, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not progress)
    for step, batch in enumerate(bar):
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        boxes = batch["bbox"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits, raw = model(images)
        logits, raw = logits.float(), raw.float()
        pred_box = order_boxes(raw) if order else raw
        ce = criterion_cls(logits, labels)
        box_loss = criterion_box(pred_box, boxes)
        if single_backward:
            (ce + box_loss).backward()  # same gradients, one pass back through the trunk
        else:
            ce.backward(retain_graph=True)  # report Fig. 12
            box_loss.backward()
        found = guard.check(ce.detach() + box_loss.detach())
        guard.step()
        bs = labels.shape[0]
        with torch.no_grad():
            batch_sums = torch.cat([torch.stack([ce.detach(), box_loss.detach()]).to(acc) * bs,
                                    (logits.argmax(1) == labels).sum().to(acc).reshape(1),
                                    box_iou_per_image(pred_box.detach(), boxes).sum().to(acc).reshape(1),
                                    sums.new_full((1,), bs)])
            sums += batch_sums.masked_fill(found.bool(), 0)
            skipped += found
            streak.mul_(found).add_(found)
        if (step + 1) % check_every == 0 or step + 1 == len(data):
            # A host sync, every check_every steps: the guard's verdict and the bar.
            means = (sums[:4] / sums[4]).tolist()
            n_streak = int(streak)
            if n_streak >= min(check_every, step + 1):  # this step ends the streak
                raise TrainingError(
                    f"non-finite loss or gradient in epoch {epoch}, {n_streak} step(s) in a row "
                    f"(the last: cross-entropy {float(ce.detach())}, box loss "
                    f"{float(box_loss.detach())}); none of them changed the weights. Stopped; the "
                    f"last checkpoint is kept (try a lower --lr)")
            bar.set_postfix(ce=f"{means[0]:.3f}", box=f"{means[1]:.3f}", acc=f"{means[2]:.3f}")
    means = (sums[:4] / sums[4]).tolist()
    return {**dict(zip(METRICS, means)), "skipped_steps": int(skipped)}


# ---------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------
def device_rng(device):
    """(get_state, set_state) of the training device's own generator, or None on the CPU."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return (lambda: torch.cuda.get_rng_state(index)), (lambda s: torch.cuda.set_rng_state(s, index))
    if device.type == "mps":
        return torch.mps.get_rng_state, torch.mps.set_rng_state
    return None


def rng_state(loader_generator, device):
    """Every generator a run draws from, as CPU tensors and Python values: the CPU's, the
    shuffle generator's, Python's, numpy's and the training device's own (key cuda or
    mps)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "loader": loader_generator.get_state(),
             "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    own = device_rng(device)
    if own is not None:
        state[device.type] = own[0]().cpu()
    return state


def set_rng_state(state, loader_generator, device):
    """Restore rng_state(); each state must be a CPU tensor (load_checkpoint gives that). The
    device's generator is restored when the checkpoint was written on the same kind of
    device."""
    torch.set_rng_state(state["torch"])
    loader_generator.set_state(state["loader"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    s = state["numpy"]
    np.random.set_state(("MT19937", s["key"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                         s["cached_gaussian"]))
    own = device_rng(device)
    if own is not None and device.type in state:
        own[1](state[device.type])


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """A checkpoint's (or best_model.pt's) contents with every tensor on the CPU, whatever
    device wrote it: the RNG states must be CPU tensors, and load_state_dict moves weights
    and Adam's moments to their parameters' device (as torchvision's references load)."""
    if not os.path.exists(path):
        raise TrainingError(f"no checkpoint at {path}: nothing to resume (run without --resume "
                            f"to start)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not where in torch
        raise TrainingError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None


def load_model_state(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise TrainingError(f"{path} holds weights of a different architecture than "
                            f"{type(model).__name__} with these settings (width, n_blocks, "
                            f"learnable_res must match the run that wrote it)") from None


# How an optimizer runs, not what it has learnt: these stay the resuming run's own, so a
# checkpoint written with fused Adam on one device resumes on a device without it.
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer, state):
    groups = [{**saved, **{k: current[k] for k in IMPLEMENTATION_FLAGS if k in current}}
              for saved, current in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})


def checkpoint_state(model, optimizer, epoch, history, generator, device, args):
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "history": history, "rng": rng_state(generator, device),
            "args": {k: v for k, v in vars(args).items()
                     if isinstance(v, (int, float, str, bool, type(None)))}}


def resume_from(path, model, optimizer, generator, device):
    """Load checkpoint.pt onto the CPU, then restore the model and Adam (moved to the
    parameters' device) and every generator. Returns the checkpoint."""
    ckpt = load_checkpoint(path)
    load_model_state(model, ckpt["model"], path)
    load_optimizer_state(optimizer, ckpt["optimizer"])
    set_rng_state(ckpt["rng"], generator, device)
    return ckpt


# ---------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------
def train(model, train_set, test_set, out_dir, args, device, val_set=None, progress=True):
    """Train model for args.epochs epochs, evaluating test_set (and val_set) after each.
    Writes checkpoint.pt, best_model.pt and history.json into out_dir; with args.resume
    continues from checkpoint.pt. Returns (model, history)."""
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    best_path = os.path.join(out_dir, "best_model.pt")
    history_path = os.path.join(out_dir, "history.json")
    if os.path.exists(ckpt_path) and not args.resume:
        raise TrainingError(f"{out_dir} already holds a run (checkpoint.pt); pass --resume to "
                            f"continue it, or choose another --out_dir")
    if not args.system_malloc and reuse_freed_memory():
        log.info("malloc keeps freed blocks for reuse (--system_malloc leaves it alone)")
    seed_everything(args.seed)
    model.to(device)
    optimizer = make_optimizer(model, args, device)
    criterion_cls, criterion_box, loss_name = make_criteria(args.loss)
    order = not args.raw_boxes
    generator = torch.Generator().manual_seed(args.seed)
    # BatchNorm1d cannot train on a batch of one image: a last batch of one is dropped.
    lone_last = len(train_set) % args.batch_size == 1
    if lone_last:
        log.info("%d training images at batch %d: the last batch, of one image, is skipped "
                 "each epoch (BatchNorm cannot train on one)", len(train_set), args.batch_size)
    train_loader = loader(train_set, args.batch_size, True, device, generator, args.workers,
                          drop_last=lone_last)
    eval_loaders = {"test": loader(test_set, args.eval_batch_size, False, device)}
    if val_set is not None:
        eval_loaders["val"] = loader(val_set, args.eval_batch_size, False, device)
    select_on = "val" if val_set is not None else "test"
    history = {split: {m: [] for m in METRICS} for split in ["train", *eval_loaders]}
    history.update(epoch_seconds=[], skipped_steps=[], best_epoch=None, best_score=None,
                   select_on=select_on, loss=loss_name)
    start_epoch = 1
    if args.resume:
        ckpt = resume_from(ckpt_path, model, optimizer, generator, device)
        history = ckpt["history"]
        history.setdefault("skipped_steps", [0] * len(history["epoch_seconds"]))
        start_epoch = ckpt["epoch"] + 1
        log.info("resumed from %s after epoch %d", ckpt_path, ckpt["epoch"])
    if args.amp and device.type == "cpu":
        log.info("--amp on the CPU: bfloat16 autocast runs as on a GPU, but is fast only on a CPU "
                 "with native bfloat16 (AMX); elsewhere it is much slower than float32")
    log.info("training HW5Net with %s on %s: %d train, %d %s images, epochs %d, batch %d",
             loss_name, device, len(train_set), len(eval_loaders[select_on].dataset), select_on,
             args.epochs, args.batch_size)
    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.perf_counter()
        train_metrics = train_one_epoch(model, train_loader, optimizer, criterion_cls, criterion_box,
                                        device, epoch, order, args.single_backward, args.amp, progress)
        for m in METRICS:
            history["train"][m].append(train_metrics[m])
        history["skipped_steps"].append(train_metrics["skipped_steps"])
        if train_metrics["skipped_steps"]:
            log.warning("epoch %d: %d steps with a non-finite loss or gradient were skipped (the "
                        "weights did not take them)", epoch, train_metrics["skipped_steps"])
        for split, data in eval_loaders.items():
            _, res = evaluation(model, data, criterion_cls, criterion_box, device, order=order,
                                amp=args.amp)
            for m in METRICS:
                history[split][m].append(res[m])
        history["epoch_seconds"].append(round(time.perf_counter() - t0, 3))
        sel = {m: history[select_on][m][-1] for m in METRICS}
        # The report's selection rule (Fig. 13).
        score = round(sel["accuracy"], 3) + (1 - sel["box_loss"])
        if history["best_score"] is None or score > history["best_score"]:
            history["best_score"], history["best_epoch"] = score, epoch
            save_atomic(model.state_dict(), best_path)
        log.info("epoch %d/%d: train ce %.4f %s %.4f acc %.3f mIoU %.3f | %s ce %.4f %s %.4f "
                 "acc %.3f mIoU %.3f | %.1fs%s", epoch, args.epochs, train_metrics["cross_entropy"],
                 loss_name, train_metrics["box_loss"], train_metrics["accuracy"],
                 train_metrics["mean_iou"], select_on, sel["cross_entropy"], loss_name,
                 sel["box_loss"], sel["accuracy"], sel["mean_iou"], history["epoch_seconds"][-1],
                 " (best)" if history["best_epoch"] == epoch else "")
        write_json(history, history_path)
        save_atomic(checkpoint_state(model, optimizer, epoch, history, generator, device, args),
                    ckpt_path)
    release_freed_memory()
    return model, history


def build_model(args):
    return HW5Net(width=args.width, n_blocks=args.n_blocks, learnable_res=args.learnable_res)


def load_datasets(args, progress=True):
    """(train, test, val or None) MyCOCODatasets as the arguments ask."""
    train_set = MyCOCODataset(args.data_dir, train=True, augment=args.augment, progress=progress)
    val_set = None
    if args.val_fraction:
        # One decode of the training images; both parts index its cache.
        train_files, val_files = split_train_val(train_set.files, args.val_fraction, args.seed)
        val_set = train_set.subset(val_files, augment=False)
        train_set = train_set.subset(train_files, augment=args.augment)
    test_set = MyCOCODataset(args.data_dir, train=False, progress=progress)
    return train_set, test_set, val_set


def add_training_args(p):
    """The options one training run takes, shared with hw5_main.py; defaults are the
    report's."""
    p.add_argument("--epochs", "--epoch", type=int, default=30, help="epochs (report Section 4)")
    p.add_argument("--batch_size", type=int, default=16, help="training batch size")
    p.add_argument("--eval_batch_size", type=int, default=64, help="evaluation batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--beta1", type=float, default=0.9, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.99, help="Adam beta2")
    p.add_argument("--seed", type=int, default=0, help="seed for random, numpy and torch")
    p.add_argument("--width", type=int, default=8, help="HW5Net stem width")
    p.add_argument("--n_blocks", type=int, default=5, help="residual blocks")
    p.add_argument("--learnable_res", action="store_true", help="conv3x3-BN skips (the report tried and dropped them)")
    p.add_argument("--augment", action="store_true", help="random horizontal flip that moves the box")
    p.add_argument("--raw_boxes", action="store_true",
                   help="feed the box head's raw output to the loss and metric, as the report's code "
                        "(default: order each coordinate pair first)")
    p.add_argument("--single_backward", action="store_true",
                   help="one backward of the summed loss instead of the report's two (same gradients)")
    p.add_argument("--val_fraction", type=float, default=0.0,
                   help="select the best model on this held-out part of the training set instead "
                        "of on the test set (0: the report's rule, on the test set)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for the forward passes, on any device (CUDA, MPS, CPU)")
    p.add_argument("--system_malloc", action="store_true",
                   help="leave glibc's malloc settings alone (by default large freed blocks are "
                        "kept for reuse, which takes about a quarter off a CPU step; results are the same)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes (a resumed run is exact with any number)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out_dir from checkpoint.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser(description="Train one HW5Net (report Section 3.4).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                add_help=add_help)
    p.add_argument("--data_dir", required=add_help, help="dataset built by Dataset.py")
    p.add_argument("--out_dir", required=add_help, help="where checkpoints, the best model and history go")
    p.add_argument("--loss", choices=("ciou", "mse"), default="ciou", help="box loss")
    return add_training_args(p)


def main(args):
    device = pick_device(args.device)
    train_set, test_set, val_set = load_datasets(args, progress=not args.quiet)
    seed_everything(args.seed)  # the initial weights come from the seed too
    model = build_model(args)
    _, history = train(model, train_set, test_set, args.out_dir, args, device, val_set,
                       progress=not args.quiet)
    log.info("best epoch %s (score %.4f); outputs in %s", history["best_epoch"],
             history["best_score"], args.out_dir)
    return history


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(get_args_parser().parse_args())
    except (TrainingError, DatasetError) as e:
        log.error("%s", e)
        sys.exit(2)
