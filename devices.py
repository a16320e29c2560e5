"""Where CUDA, Apple MPS and the CPU differ, in one place: choosing the device (and saying
why a GPU cannot be used), batches read from the device's memory, autocast, the dtype of
running sums, skipping a non-finite step on the device, and the speed settings of GPUs
and of glibc's malloc on the CPU."""
import contextlib
import ctypes
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings

import torch

from files import UserError

log = logging.getLogger("devices")

DEVICES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_HELP = DEVICES + " (auto: CUDA, then Apple MPS, then the CPU)"


def nvidia_driver_info(proc_path="/proc/driver/nvidia/version", smi="nvidia-smi"):
    """(driver version, highest CUDA version it supports or None) of this machine's NVIDIA
    driver, from nvidia-smi's header or else the kernel module; None without one."""
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


def _version(text):
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def unusable_gpu_message():
    """One line on an NVIDIA GPU that the installed torch cannot use: why, and the fix.
    None when torch can use it or the machine has none."""
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
            f"--index-url https://download.pytorch.org/whl/cu126` for CUDA 12.6 (docs/devices.md), "
            f"or update the driver")


def pick_device(name="auto"):
    """The torch.device for --device. A device that cannot be used raises UserError with
    the reason; auto falling back to the CPU beside an NVIDIA GPU says so loudly."""
    mps_ok = torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        if message := unusable_gpu_message():
            log.warning("TRAINING ON THE CPU: %s", message)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; expected {DEVICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: " + (unusable_gpu_message() or
                            f"torch {torch.__version__} sees no CUDA GPU on this machine"))
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not mps_ok:
        raise UserError(f"--device {name}: Apple MPS is not available (it needs an Apple-silicon "
                        f"Mac and a torch build with MPS)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: expected {DEVICES}")
    return device


class DeviceBatches:
    """Batches of a MyCOCODataset read from the device's memory: the split's uint8 images,
    labels and boxes go to the device once, and each batch is an index into them. With a
    generator (a CPU torch.Generator) each epoch's order, and with augment which images
    are flipped with their boxes, are drawn from it alone, so a resumed run draws as the
    uninterrupted one. A batch is {"image": float [B, 3, 256, 256] in [0, 1], "label",
    "bbox": [x1, y1, x2, y2] / 256}, as the dataset's items collated."""

    def __init__(self, dataset, batch_size, device, generator=None, augment=False, drop_last=False):
        self.dataset = dataset
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self.boxes = dataset.boxes.to(device)
        self.batch_size, self.device = batch_size, torch.device(device)
        self.generator, self.augment, self.drop_last = generator, augment, drop_last

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        if self.generator is not None:
            order = torch.randperm(n, generator=self.generator).to(self.device)
            flips = (torch.rand(n, generator=self.generator) < 0.5).to(self.device) if self.augment else None
        else:
            order, flips = torch.arange(n, device=self.device), None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            # index_select: advanced indexing of uint8 images is far slower on the CPU
            images = self.images.index_select(0, index).float().div_(255.0)
            boxes = self.boxes.index_select(0, index)
            if flips is not None:
                flip = flips[start:start + self.batch_size]
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
                mirrored = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], dim=1)
                boxes = torch.where(flip[:, None], mirrored, boxes)
            yield {"image": images, "label": self.labels.index_select(0, index), "bbox": boxes}


def autocast(device, amp):
    """bfloat16 autocast on device when amp, else nothing (torch.autocast, even disabled,
    refuses a device type its build cannot autocast: MPS before torch 2.5)."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def autocast_problem(device):
    """Why bfloat16 autocast does not work on device, or None. Apple MPS has it from torch
    2.6 on macOS 14; older builds raise, or warn and run in float32."""
    device_type = torch.device(device).type
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autocast(device_type, dtype=torch.bfloat16):
                enabled = torch.is_autocast_enabled(device_type)
        except (RuntimeError, ValueError) as e:
            return f"bfloat16 autocast is not available on {device_type} with torch {torch.__version__} ({e})"
    if not enabled:
        why = f" ({caught[0].message})" if caught else ""
        return (f"bfloat16 autocast is disabled on {device_type} with torch {torch.__version__}{why}"
                + ("; MPS needs torch 2.6 or newer and macOS 14 or newer" if device_type == "mps" else ""))
    return None


def accumulator_dtype(device):
    """Running sums in float64, so that a split's means do not depend on the batch order;
    float32 on MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def set_gpu_options(tf32=False, cudnn_benchmark=False):
    """--tf32: TF32 float32 matrix products on CUDA. --cudnn_benchmark: cuDNN picks the
    fastest convolution algorithms, not deterministically. Neither changes a CPU run."""
    if tf32:
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.deterministic = not cudnn_benchmark


def _glibc():
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def reuse_freed_memory():
    """Have glibc's malloc keep large freed blocks instead of unmapping them: a CPU step
    frees and reallocates about 1 GB (gradients, activations), whose pages otherwise fault
    in again every step. Only where memory comes from changes. True when applied."""
    if not _glibc():
        return False
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1


def release_freed_memory():
    """Hand the heap's free pages back to the kernel (malloc_trim) when training ends."""
    if _glibc():
        ctypes.CDLL(None).malloc_trim(0)


class NonFiniteGuard:
    """Keeps a step whose loss or gradient is not finite from reaching the weights, with no
    host sync on a GPU: check() sets `found` on the device, step() hands it to fused Adam
    as found_inf (GradScaler's device-side skip). MPS's fused kernel has not always
    honoured found_inf, and plain Adam has none: there the flag is read on the host."""

    def __init__(self, optimizer, device):
        self.optimizer = optimizer
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.found = torch.zeros((), device=device)
        self.one = torch.ones((), device=device)
        self.device_side = bool(optimizer.defaults.get("fused")) and torch.device(device).type in ("cuda", "cpu")
        self.foreach_check = True

    def check(self, loss):
        self.found.copy_(~torch.isfinite(loss))
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.foreach_check:
            try:  # one pass over the gradients (multiplying by 1 is exact)
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
