"""Train one HW5Net: cross-entropy for the class plus CIoU or MSE for the box (report 3.4).

    python train.py --data_dir data/hw5 --out_dir runs/ciou --loss ciou
    python train.py --data_dir data/hw5 --out_dir runs/ciou --loss ciou --resume   # after an interruption

Defaults are the report's: Adam (lr 1e-3, betas 0.9/0.99), batch 16, 30 epochs, seed 0,
two backward calls (the first with retain_graph=True), and after every epoch the best
model kept by round(test accuracy, 3) + (1 - test box loss). OUT receives history.json
(every epoch: metrics, timings, settings), best_model.pt (a state_dict) and, while the
run trains, checkpoint.pt (every --checkpoint_minutes; removed when the run has finished
unless --keep_checkpoint).
"""
import argparse
import contextlib
import copy
import ctypes
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from Dataset import DatasetError, MyCOCODataset
from network import HW5Net
from utils import (CompleteIOULoss, accumulator_dtype, autocast, autocast_problem, box_iou_per_image,
                   evaluation, order_boxes, out_dir_problem, write_json)

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
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return (f"this machine has an NVIDIA GPU ({gpu}) but CUDA_VISIBLE_DEVICES={hidden!r} hides "
                f"it from torch")
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a build without CUDA"
    elif driver_cuda and _version(torch.version.cuda) <= _version(driver_cuda):
        return (f"this machine has an NVIDIA GPU ({gpu}) and torch {torch.__version__} was built "
                f"for CUDA {torch.version.cuda}, which that driver supports, yet torch cannot use "
                f"it: `python -c \"import torch; torch.cuda.init()\"` prints why")
    else:
        why = f"torch {torch.__version__} was built for CUDA {torch.version.cuda}"
    return (f"this machine has an NVIDIA GPU ({gpu}) but {why} and cannot use it: install the "
            f"torch build for the driver's CUDA version, e.g. `pip install torch torchvision "
            f"--index-url https://download.pytorch.org/whl/cu126` for CUDA 12.6 (README: "
            f"Installing torch for your machine), or update the driver")


def _version(text):
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


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


class DeviceBatches:
    """Batches of a MyCOCODataset read from the training device's memory: the split's uint8
    images (about 0.75 GB for COCO's 3.8k training images), labels and boxes go to the
    device once, and each batch is an index into them, converted to float there. On the
    CPU nothing is copied: the dataset's tensors are indexed in place.

    With shuffle, each epoch's order, and with augment which images are flipped
    horizontally (their boxes with them), is drawn from `generator`, a CPU torch.Generator,
    when the epoch starts. There are no worker processes and no other randomness, so a
    run resumed from a checkpoint that holds the generator's state draws exactly as the
    uninterrupted one. Each batch is {"image": float [B, 3, 256, 256] in [0, 1],
    "label", "bbox": [x1, y1, x2, y2] / 256}, as MyCOCODataset's items collated."""

    def __init__(self, dataset, batch_size, device, shuffle=False, generator=None, augment=False,
                 drop_last=False):
        if shuffle and generator is None:
            raise ValueError("DeviceBatches: shuffle needs a generator")
        self.dataset = dataset
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self.boxes = dataset.boxes.to(device)
        self.batch_size, self.device = batch_size, torch.device(device)
        self.shuffle, self.generator, self.augment = shuffle, generator, augment
        self.drop_last = drop_last

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.device)
            flips = (torch.rand(n, generator=self.generator) < 0.5).to(self.device) if self.augment else None
        else:
            order, flips = torch.arange(n, device=self.device), None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            # index_select: on the CPU, advanced indexing of uint8 images is ten times slower.
            images = self.images.index_select(0, index).float().div_(255.0)
            boxes = self.boxes.index_select(0, index)
            if flips is not None:
                flip = flips[start:start + self.batch_size]
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
                mirrored = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], dim=1)
                boxes = torch.where(flip[:, None], mirrored, boxes)
            yield {"image": images, "label": self.labels.index_select(0, index), "bbox": boxes}


def drops_small_last_batch(n_images, batch_size):
    """Whether an epoch's last, partial training batch is skipped: when it holds one image
    (BatchNorm cannot train on one) or fewer than half a batch. The heads' BatchNorm1d
    layers normalise each feature over the batch; over two images every output is -1 or
    +1, and the gradient through a variance of two samples can be a hundred times an
    ordinary step's (measured: up to fifty times). Adam carries such a step into the next
    ones (its first moment keeps a tenth of it): the demo's 610 training images left a
    last batch of 2 every epoch, and its runs swung. A training set smaller than a batch
    is one batch, kept. Which images fall in it changes with the epoch's
    shuffle, so every image is still trained on. COCO's 3789 images at batch 16 leave 13,
    which are kept, as the report's loop kept them."""
    remainder = n_images % batch_size
    return remainder == 1 or (n_images > batch_size and 0 < 2 * remainder < batch_size)


class LearningRate:
    """The learning rate of each training step. "constant" is the report's: --lr
    throughout. "cosine" rises linearly from 0 over the first warmup_epochs, then falls
    along a half cosine to 0 at the last step of the last epoch: the late epochs take
    small steps, so the weights settle and the best-epoch rule picks from a flat curve
    instead of a swinging one. A function of the step alone, so a resumed run follows
    the same schedule."""

    def __init__(self, base_lr, schedule, epochs, steps_per_epoch, warmup_epochs=0.0):
        if schedule not in ("constant", "cosine"):
            raise TrainingError(f"--lr_schedule must be constant or cosine, not {schedule!r}")
        self.base_lr, self.schedule = base_lr, schedule
        self.total = epochs * steps_per_epoch
        self.warmup = round(warmup_epochs * steps_per_epoch) if schedule == "cosine" else 0

    def __call__(self, step):
        """The rate of the 0-based global step `step`."""
        if self.schedule == "constant":
            return self.base_lr
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.base_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def check_training_args(args, device, n_train=None):
    """Options that cannot train (and, given n_train, a training set too small to), refused
    in one line before anything is written."""
    if args.batch_size < 2 or (n_train is not None and n_train < 2):
        images = f" with {n_train} training images" if n_train is not None else ""
        raise TrainingError(f"--batch_size {args.batch_size}{images}: BatchNorm needs at least "
                            f"2 images a batch")
    if args.epochs < 1:
        raise TrainingError(f"--epochs must be at least 1, not {args.epochs}")
    if args.eval_batch_size < 1:
        raise TrainingError(f"--eval_batch_size must be at least 1, not {args.eval_batch_size}")
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise TrainingError(f"--warmup_epochs must lie between 0 and --epochs ({args.epochs}), "
                            f"not {args.warmup_epochs}")
    if args.warmup_epochs and args.lr_schedule == "constant":
        raise TrainingError("--warmup_epochs goes with --lr_schedule cosine (the constant schedule "
                            "has no warm-up)")
    if args.amp and (problem := autocast_problem(device)):
        raise TrainingError(f"--amp: {problem}; run without --amp")


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
    optimizer with it. Fused Adam on CUDA or the CPU takes it as found_inf, the
    device-side skip that torch.amp.GradScaler uses: weights, moments and step count stay
    as they were. Elsewhere (MPS, Adam without a fused kernel) the optimizer is stepped
    only after `found` is read on the host."""

    def __init__(self, optimizer, device):
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.found = torch.zeros((), device=device)
        self.one = torch.ones((), device=device)
        # Fused Adam honours found_inf on CUDA and the CPU; MPS's kernel has not always (it
        # ignored or refused it in some torch releases), so there the flag is read first.
        self.device_side = bool(optimizer.defaults.get("fused")) and torch.device(device).type in ("cuda", "cpu")
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
                    order=True, single_backward=False, amp=False, progress=True, check_every=20,
                    lr=None):
    """One pass over data. lr: a LearningRate, called with each step's global index (the
    optimizer's rate is left as it is when None). Returns the epoch's running means over images (model in train
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
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr((epoch - 1) * len(data) + step)
        with autocast(device, amp):
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
                    f"{float(box_loss.detach())}); none of them changed the weights. Stopped; OUT "
                    f"keeps the best model so far and the last checkpoint, if one was written "
                    f"(try a lower --lr)")
            bar.set_postfix(ce=f"{means[0]:.3f}", box=f"{means[1]:.3f}", acc=f"{means[2]:.3f}")
    means = (sums[:4] / sums[4]).tolist()
    return {**dict(zip(METRICS, means)), "skipped_steps": int(skipped)}


def selection_score(metrics):
    """The report's rule for the best model (Fig. 13): round(accuracy, 3) + (1 - box loss),
    of the split selected on (test, as the report; val with --val_fraction). The highest
    score wins; a tie keeps the earlier epoch."""
    return round(metrics["accuracy"], 3) + (1 - metrics["box_loss"])


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
        saved = state[device.type]
        if isinstance(saved, (list, tuple)):  # older checkpoints: every CUDA device's state
            index = device.index if device.index is not None else torch.cuda.current_device()
            saved = saved[index] if index < len(saved) else None
        if saved is not None:
            own[1](saved)


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


def restore(ckpt, path, model, optimizer, generator, device):
    """Restore a checkpoint loaded onto the CPU (load_checkpoint): the model and Adam (moved
    to the parameters' device) and every generator."""
    load_model_state(model, ckpt["model"], path)
    load_optimizer_state(optimizer, ckpt["optimizer"])
    set_rng_state(ckpt["rng"], generator, device)


def resume_from(path, model, optimizer, generator, device):
    """Load checkpoint.pt onto the CPU and restore() it. Returns the checkpoint."""
    ckpt = load_checkpoint(path)
    restore(ckpt, path, model, optimizer, generator, device)
    return ckpt


def host_copy(obj):
    """obj (dicts, lists and tuples of tensors and plain values) with every tensor copied
    to host memory: a snapshot that training does not change. A CUDA tensor's copy waits
    for the GPU's queue, a sync point."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return copy.deepcopy(obj)


class RunFiles:
    """The files of one training run in OUT, and what they say about it."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.checkpoint = os.path.join(out_dir, "checkpoint.pt")
        self.best = os.path.join(out_dir, "best_model.pt")
        self.history = os.path.join(out_dir, "history.json")

    def best_next(self, epoch):
        """Where a checkpoint's best model waits until the checkpoint is on disk."""
        return f"{self.best}.next{epoch}"

    def holds_a_run(self):
        return os.path.exists(self.checkpoint) or os.path.exists(self.history)

    def read_history(self):
        try:
            with open(self.history) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise TrainingError(f"{self.history} is not a readable history ({type(e).__name__}); "
                                f"the run in {self.out_dir} cannot be continued") from None

    def commit_best(self, ckpt):
        """After a resume: the checkpoint's best model, if it was still waiting under its
        .next name when the run stopped, takes best_model.pt's place; a newer one that a
        later, unfinished checkpoint left is removed."""
        mine = ckpt.get("best_model_next")
        if mine and os.path.exists(os.path.join(self.out_dir, mine)):
            os.replace(os.path.join(self.out_dir, mine), self.best)
        prefix = os.path.basename(self.best) + ".next"
        for name in os.listdir(self.out_dir):
            if name.startswith(prefix):
                os.remove(os.path.join(self.out_dir, name))


class CheckpointWriter:
    """Writes checkpoints (and the best model found since the last one), each through a
    temporary name, timing every file. In the background where asked (CUDA): the caller
    hands over a snapshot in host memory and trains on while it is written; the next
    write, or finish(), first waits for the last. On the CPU writes are synchronous: a
    writing thread competes with training for the cores and the memory bandwidth.

    Order on disk: the best model under a .next name, then the checkpoint (which names
    that file), then the rename to best_model.pt; a kill between any two leaves a
    checkpoint whose best model can be found (RunFiles.commit_best)."""

    def __init__(self, files, background):
        self.files, self.background = files, background
        self.thread, self.error, self.done = None, None, []

    def write(self, epoch, checkpoint, best_state=None):
        self.wait()
        if best_state is not None:
            checkpoint["best_model_next"] = os.path.basename(self.files.best_next(epoch))
        if self.background:
            self.thread = threading.Thread(target=self._write, args=(epoch, checkpoint, best_state),
                                           name="checkpoint-writer")
            self.thread.start()
        else:
            self._write(epoch, checkpoint, best_state)
            self._raise()

    def write_best(self, epoch, best_state):
        """The best model alone, straight to best_model.pt (the run's end)."""
        self.wait()
        self._timed(epoch, best_state, self.files.best)

    def wait(self):
        """Wait for a write in progress; returns (and forgets) the timings of finished ones."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self._raise()
        done, self.done = self.done, []
        return done

    def _raise(self):
        if self.error is not None:
            error, self.error = self.error, None
            raise TrainingError(f"writing a checkpoint in {self.files.out_dir} failed: {error}")

    def _timed(self, epoch, obj, path):
        t0 = time.perf_counter()
        save_atomic(obj, path)
        self.done.append({"epoch": epoch, "file": os.path.basename(path).split(".next")[0],
                          "seconds": round(time.perf_counter() - t0, 3),
                          "background": self.background and threading.current_thread() is self.thread})

    def _write(self, epoch, checkpoint, best_state):
        try:
            if best_state is not None:
                self._timed(epoch, best_state, self.files.best_next(epoch))
            self._timed(epoch, checkpoint, self.files.checkpoint)
            if best_state is not None:
                os.replace(self.files.best_next(epoch), self.files.best)
        except Exception as e:  # a full disk, a lost mount: said in the training thread
            self.error = f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------
def run_settings(args, device):
    """The run's settings as JSON values: every option (the architecture among them, so
    that OUT alone says how to rebuild the model) and the device."""
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    settings["device"] = str(device)
    for path in ("data_dir", "out_dir"):  # where they are, wherever the run was started from
        if settings.get(path):
            settings[path] = os.path.abspath(settings[path])
    return settings


def set_gpu_options(tf32=False, cudnn_benchmark=False):
    """--tf32: TF32 for float32 matrix products on CUDA (torch's default leaves them in full
    float32; cuDNN's convolutions use TF32 by default, in the report's run too).
    --cudnn_benchmark: cuDNN times its algorithms for each shape and keeps the fastest,
    which is not deterministic (the report's run was). Neither changes anything on a CPU."""
    if tf32:
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.deterministic = not cudnn_benchmark


def finished_run(files, args, model, history):
    """--resume on a run whose last epoch is done: nothing is trained or written. Returns
    (model with the best weights, history). A larger --epochs needs the checkpoint that
    --keep_checkpoint keeps; without it the run stops with the reason."""
    done = len(history.get("epoch_seconds", []))
    if args.epochs > done:
        if os.path.exists(files.checkpoint):
            return None  # kept: train on from it
        raise TrainingError(
            f"{files.out_dir} finished its {done} epochs and its checkpoint.pt was removed (runs "
            f"keep only best_model.pt unless --keep_checkpoint): it cannot train to --epochs "
            f"{args.epochs}; start a new run with --keep_checkpoint, or leave --epochs at {done}")
    if not os.path.exists(files.best):
        raise TrainingError(f"{files.out_dir} holds a finished run without its best_model.pt; "
                            f"start a new run in another --out_dir")
    check_same_settings({k: v for k, v in history.get("settings", {}).items() if k != "epochs"},
                        args, files.history)
    if os.path.exists(files.checkpoint) and not history.get("settings", {}).get("keep_checkpoint"):
        os.remove(files.checkpoint)  # left by a run stopped between its last two writes
    log.info("%s has finished its %d epochs: nothing to train", files.out_dir, done)
    load_model_state(model, load_checkpoint(files.best), files.best)
    return model, history


# The settings that decide a run's course: a resumed run must have the same.
TRAJECTORY = ("loss", "lr", "beta1", "beta2", "batch_size", "seed", "augment", "raw_boxes",
              "single_backward", "val_fraction", "width", "n_blocks", "learnable_res", "amp",
              "lr_schedule", "warmup_epochs")


# What the options of TRAJECTORY were before they existed: a run written then had these.
LEGACY_DEFAULTS = {"lr_schedule": "constant", "warmup_epochs": 0.0}


def check_same_settings(saved, args, path):
    """Refuse to go on with a run (saved: its settings) under other TRAJECTORY settings."""
    changed = []
    for k in TRAJECTORY:
        if k in saved or k in LEGACY_DEFAULTS:
            was = saved.get(k, LEGACY_DEFAULTS.get(k))
            if was != getattr(args, k):
                changed.append(f"--{k} {was} (now {getattr(args, k)})")
    if changed:
        raise TrainingError(f"{path} was written with " + ", ".join(changed) + "; resume with "
                            f"the same settings, or start a new run in another --out_dir")


def check_resumable(ckpt, args, path):
    saved = ckpt.get("args", {})
    check_same_settings(saved, args, path)
    if saved.get("lr_schedule", "constant") != "constant" and saved.get("epochs") != args.epochs:
        # The schedule spans the run's epochs: another --epochs is another schedule.
        raise TrainingError(f"{path} was written with --epochs {saved.get('epochs')} (now "
                            f"{args.epochs}; --lr_schedule {saved['lr_schedule']} decays over the "
                            f"run's epochs); resume with the same settings, or start a new run in "
                            f"another --out_dir")
    if ckpt["epoch"] > args.epochs:
        raise TrainingError(f"{path} is at epoch {ckpt['epoch']}, past --epochs {args.epochs}")


def remove_partial_writes(out_dir):
    """Temporary files of writes a killed run left (a checkpoint's is 2.5 GB), and a best
    model waiting for a checkpoint that was never written (RunFiles.commit_best)."""
    no_checkpoint = not os.path.exists(os.path.join(out_dir, "checkpoint.pt"))
    for name in os.listdir(out_dir):
        partial = name.endswith(".tmp") and name.split(".")[0] in ("checkpoint", "best_model", "history")
        if partial or (no_checkpoint and name.startswith("best_model.pt.next")):
            os.remove(os.path.join(out_dir, name))


def train(model, train_set, test_set, out_dir, args, device, val_set=None, progress=True):
    """Train model for args.epochs epochs, evaluating test_set (and val_set) after each.
    Returns (model, history).

    OUT receives history.json after every epoch (metrics, timings, the settings);
    best_model.pt, the state_dict of the epoch the report's rule selects; and
    checkpoint.pt (model, Adam, history, every RNG state) after an epoch once
    args.checkpoint_minutes of training have passed since the last (0: after every
    epoch), written in the background on CUDA. best_model.pt is brought up to date with
    each checkpoint, at the end, and when the run stops on an error. When the last epoch
    is done, checkpoint.pt is removed unless args.keep_checkpoint. With args.resume the
    run continues from checkpoint.pt, starts again if it stopped before its first
    checkpoint, and has nothing to do if it had finished."""
    files = RunFiles(out_dir)
    if args.resume and not files.holds_a_run():
        raise TrainingError(f"nothing to resume in {out_dir}: no checkpoint.pt or history.json (run "
                            f"without --resume to start)")
    if files.holds_a_run() and not args.resume:
        held = "checkpoint.pt" if os.path.exists(files.checkpoint) else "history.json"
        raise TrainingError(f"{out_dir} already holds a run ({held}); pass --resume to continue it, "
                            f"or choose another --out_dir")
    check_training_args(args, device, len(train_set))
    os.makedirs(out_dir, exist_ok=True)
    remove_partial_writes(out_dir)
    seed_everything(args.seed)
    set_gpu_options(args.tf32, args.cudnn_benchmark)
    model.to(device)
    if args.resume and os.path.exists(files.history):
        previous = files.read_history()
        if previous.get("finished"):
            done = finished_run(files, args, model, previous)
            if done is not None:
                return done
        elif not os.path.exists(files.checkpoint):
            log.info("%s has no checkpoint yet (the run stopped before its first): starting again "
                     "from epoch 1", out_dir)
    if device.type == "cpu" and not args.system_malloc and reuse_freed_memory():
        log.info("malloc keeps freed blocks for reuse (--system_malloc leaves it alone)")
    optimizer = make_optimizer(model, args, device)
    criterion_cls, criterion_box, loss_name = make_criteria(args.loss)
    order = not args.raw_boxes
    generator = torch.Generator().manual_seed(args.seed)
    small_last = drops_small_last_batch(len(train_set), args.batch_size)
    if small_last:
        log.info("%d training images at batch %d: the last batch, of %d image(s), is skipped each "
                 "epoch (too few for BatchNorm's statistics; see drops_small_last_batch)",
                 len(train_set), args.batch_size, len(train_set) % args.batch_size)
    train_batches = DeviceBatches(train_set, args.batch_size, device, shuffle=True, generator=generator,
                                  augment=args.augment, drop_last=small_last)
    lr = LearningRate(args.lr, args.lr_schedule, args.epochs, len(train_batches), args.warmup_epochs)
    eval_batches = {"test": DeviceBatches(test_set, args.eval_batch_size, device)}
    if val_set is not None:
        eval_batches["val"] = DeviceBatches(val_set, args.eval_batch_size, device)
    select_on = "val" if val_set is not None else "test"
    history = {split: {m: [] for m in METRICS} for split in ["train", *eval_batches]}
    history.update(epoch_seconds=[], save_seconds=[], skipped_steps=[], best_epoch=None,
                   best_score=None, select_on=select_on, loss=loss_name, finished=False)
    start_epoch = 1
    if args.resume and os.path.exists(files.checkpoint):
        ckpt = load_checkpoint(files.checkpoint)
        check_resumable(ckpt, args, files.checkpoint)
        restore(ckpt, files.checkpoint, model, optimizer, generator, device)
        files.commit_best(ckpt)
        history = {**history, **ckpt["history"], "finished": False}
        missing = len(history["epoch_seconds"]) - len(history["skipped_steps"])
        history["skipped_steps"] += [0] * missing  # a checkpoint from before they were counted
        start_epoch = ckpt["epoch"] + 1
        log.info("resumed from %s after epoch %d", files.checkpoint, ckpt["epoch"])
        del ckpt
    history["settings"] = run_settings(args, device)
    if args.amp and device.type == "cpu":
        log.info("--amp on the CPU: bfloat16 autocast runs as on a GPU, but is fast only on a CPU "
                 "with native bfloat16 (AMX); elsewhere it is much slower than float32")
    log.info("training HW5Net with %s on %s: %d train, %d %s images, epochs %d, batch %d, a "
             "checkpoint every %g min", loss_name, device, len(train_set),
             len(eval_batches[select_on].dataset), select_on, args.epochs, args.batch_size,
             args.checkpoint_minutes)
    writer = CheckpointWriter(files, background=device.type == "cuda")
    best_state = None  # the best epoch's weights, in host memory until best_model.pt has them
    since_checkpoint = time.perf_counter()
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            t0 = time.perf_counter()
            train_metrics = train_one_epoch(model, train_batches, optimizer, criterion_cls,
                                            criterion_box, device, epoch, order, args.single_backward,
                                            args.amp, progress, lr=lr)
            for m in METRICS:
                history["train"][m].append(train_metrics[m])
            history["skipped_steps"].append(train_metrics["skipped_steps"])
            if train_metrics["skipped_steps"]:
                log.warning("epoch %d: %d steps with a non-finite loss or gradient were skipped (the "
                            "weights did not take them)", epoch, train_metrics["skipped_steps"])
            for split, data in eval_batches.items():
                _, res = evaluation(model, data, criterion_cls, criterion_box, device, order=order,
                                    amp=args.amp)
                for m in METRICS:
                    history[split][m].append(res[m])
            history["epoch_seconds"].append(round(time.perf_counter() - t0, 3))
            sel = {m: history[select_on][m][-1] for m in METRICS}
            score = selection_score(sel)
            if history["best_score"] is None or score > history["best_score"]:  # a tie keeps the earlier
                history["best_score"], history["best_epoch"] = score, epoch
                best_state = host_copy(model.state_dict())
            log.info("epoch %d/%d: train ce %.4f %s %.4f acc %.3f mIoU %.3f | %s ce %.4f %s %.4f "
                     "acc %.3f mIoU %.3f | %.1fs%s", epoch, args.epochs, train_metrics["cross_entropy"],
                     loss_name, train_metrics["box_loss"], train_metrics["accuracy"],
                     train_metrics["mean_iou"], select_on, sel["cross_entropy"], loss_name,
                     sel["box_loss"], sel["accuracy"], sel["mean_iou"], history["epoch_seconds"][-1],
                     " (best)" if history["best_epoch"] == epoch else "")
            last = epoch == args.epochs
            due = time.perf_counter() - since_checkpoint >= 60 * args.checkpoint_minutes
            if (due and not last) or (last and args.keep_checkpoint):
                history["save_seconds"] += writer.wait()
                state = checkpoint_state(model, optimizer, epoch, history, generator, device, args)
                writer.write(epoch, host_copy(state) if writer.background else state, best_state)
                best_state = None
                since_checkpoint = time.perf_counter()
            write_json(history, files.history)
        history["save_seconds"] += writer.wait()
        if best_state is not None:
            writer.write_best(args.epochs, best_state)
            history["save_seconds"] += writer.wait()
            best_state = None
    finally:
        # Stopped by an error or Ctrl-C: a checkpoint being written is finished, and the best
        # weights so far are not lost. (After a kill, --resume recomputes them.)
        if best_state is not None or writer.thread is not None:
            with contextlib.suppress(Exception):
                writer.wait()
                if best_state is not None:
                    save_atomic(best_state, files.best)
    history["finished"] = True
    write_json(history, files.history)  # before the checkpoint goes: a finished run is never retrained
    if not args.keep_checkpoint and os.path.exists(files.checkpoint):
        os.remove(files.checkpoint)  # finished: best_model.pt and history.json are the run
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
    p.add_argument("--lr_schedule", choices=("constant", "cosine"), default="constant",
                   help="constant: --lr throughout (the report's); cosine: linear warm-up over "
                        "--warmup_epochs, then a half cosine down to 0 at the last step")
    p.add_argument("--warmup_epochs", type=float, default=0.0,
                   help="--lr_schedule cosine: epochs of linear warm-up from 0 to --lr")
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
    p.add_argument("--checkpoint_minutes", type=float, default=10.0,
                   help="write checkpoint.pt after an epoch once this many minutes of training have "
                        "passed since the last one (0: after every epoch); a killed run redoes at most "
                        "this much work, plus the epoch it was in")
    p.add_argument("--keep_checkpoint", action="store_true",
                   help="keep checkpoint.pt (model and Adam, 2.5 GB) when the run has finished, to "
                        "train it further with --resume and a larger --epochs; by default a finished "
                        "run keeps best_model.pt and history.json only")
    p.add_argument("--tf32", action="store_true",
                   help="CUDA: TF32 matrix products (faster on an A100, 10-bit mantissa); the report's "
                        "run had full-float32 products (cuDNN's convolutions use TF32 either way)")
    p.add_argument("--cudnn_benchmark", action="store_true",
                   help="CUDA: let cuDNN pick the fastest convolution algorithms, not deterministic "
                        "(the report's run was deterministic)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out_dir: from checkpoint.pt, from the start if it "
                        "stopped before its first checkpoint; a finished run is left as it is")
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
    if problem := out_dir_problem(args.out_dir):
        raise TrainingError(problem)
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
