"""Where CUDA, Apple MPS and the CPU differ, in one place: choosing the device (and saying
why a GPU cannot be used), batches read from the device's memory, autocast, the dtype of
running sums, skipping a non-finite step on the device, and the speed settings of GPUs
and of glibc's malloc on the CPU."""
import contextlib
import ctypes
import functools
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

from cli import UserError

log = logging.getLogger("devices")

DEVICES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_HELP = DEVICES + (" (auto: CUDA, then Apple MPS, then the CPU; beside an NVIDIA GPU "
                         "that torch cannot use it stops and says why)")


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


def _major(version):
    return int(version.split(".")[0])


# The PyTorch wheel index for a driver's CUDA major version within torch>=2.4,<3, and the pins it
# needs. Refresh from https://pytorch.org/get-started/previous-versions/ and
# `pip index versions torch --index-url https://download.pytorch.org/whl/cu126`.
CUDA_WHEELS = {11: ("cu118", '"torch<2.8" "torchvision<0.23"'),  # torch 2.4 to 2.7: 2.8 dropped cu118
               12: ("cu126", "torch torchvision"),                 # torch 2.6 on
               13: ("cu130", "torch torchvision")}                 # torch 2.9 on

# What Slurm sets for a job or step given GPUs: --gres=gpu:N, --gpus=N, --gpus-per-task/-node/-socket
SLURM_GPU_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS",
                       "SLURM_GPUS_PER_TASK", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_SOCKET")


def hides_every_gpu(visible):
    """Whether CUDA_VISIBLE_DEVICES=visible leaves torch no GPU: CUDA reads the list up to
    its first entry that is neither an index nor a GPU-/MIG- UUID ("", "-1", and Slurm's
    "NoDevFiles" for a job given no GPU)."""
    first = visible.split(",")[0].strip()
    return not (first.isdigit() or first.startswith(("GPU-", "MIG-")))


def slurm_job_without_gpu():
    """Whether this is a Slurm job given no GPU that left CUDA_VISIBLE_DEVICES unset: the
    node's GPUs are then hidden by its cgroup, or, on a node without one, all visible."""
    return ("SLURM_JOB_ID" in os.environ and "CUDA_VISIBLE_DEVICES" not in os.environ
            and all(os.environ.get(name, "0") in ("", "0") for name in SLURM_GPU_VARIABLES))


def visible_gpus(count):
    gpus = f"cuda:0 to cuda:{count - 1}" if count > 1 else "cuda:0"
    return f"{count} CUDA GPU{'s are' if count > 1 else ' is'} visible to this process ({gpus})"


def install_advice(driver_cuda):
    """The fix for a torch build newer than the driver: the build for the driver's CUDA major
    version (any build of the same major runs on it, since CUDA 11), else a newer driver."""
    fitting = [major for major in CUDA_WHEELS if major <= _major(driver_cuda)]
    if not fitting:
        return f"update the NVIDIA driver (torch>=2.4 needs one for CUDA {min(CUDA_WHEELS)} or newer)"
    return (f"install the build for the driver, `{reinstall(*CUDA_WHEELS[max(fitting)])}` (docs/devices.md), "
            f"or update the driver")


def reinstall(index, packages):
    """The pip line that replaces the installed torch with the build of a PyTorch wheel index
    (a plain install would find torch there already and keep it)."""
    return (f"pip uninstall -y torch torchvision && pip install {packages} --index-url "
            f"https://download.pytorch.org/whl/{index}")


def unusable_gpu_message():
    """One line on an NVIDIA GPU that the installed torch cannot use: why, likeliest cause
    first, and the fix, as far as they are known. None when torch can use it or the machine
    has none."""
    if torch.cuda.is_available():
        return None
    info = nvidia_driver_info()
    if info is None:
        return None
    driver, driver_cuda = info
    gpu = f"this machine has an NVIDIA GPU (NVIDIA driver {driver}" + (
        f", which supports CUDA up to {driver_cuda})" if driver_cuda else ")")
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hides_every_gpu(hidden):
        return (f"{gpu} but CUDA_VISIBLE_DEVICES={hidden!r} hides it from torch (under Slurm: the "
                f"job was given no GPU; ask for one, e.g. --gres=gpu:1)")
    if slurm_job_without_gpu():
        return f"{gpu} but this Slurm job was given none of them: ask for one, e.g. --gres=gpu:1"
    ask_torch = "`python -c \"import torch; torch.cuda.init()\"` prints torch's reason"
    if torch.version.cuda is None:
        return (f"{gpu} but torch {torch.__version__} is a build without CUDA: install a CUDA "
                f"build (docs/devices.md)")
    built = f"torch {torch.__version__} was built for CUDA {torch.version.cuda}"
    if driver_cuda is None:
        return f"{gpu} and {built}, but the CUDA version the driver supports is unknown: {ask_torch}"
    if _major(torch.version.cuda) <= _major(driver_cuda):
        return f"{gpu} and {built}, which that driver supports, yet torch cannot use it: {ask_torch}"
    return f"{gpu} but {built} and cannot use it: {install_advice(driver_cuda)}"


def missing_kernels_message(device):
    """One line when torch's build has no kernels for this GPU (a CUDA 13 build starts at
    sm_75, so a V100, sm_70, fails at its first kernel); None when it has them. A cubin
    runs on its major version's later minors, PTX (compute_XY) on any later GPU."""
    if torch.version.hip:  # ROCm: gfx names, another story
        return None
    major, minor = torch.cuda.get_device_capability(device)
    arch = torch.cuda.get_arch_list()
    for m in filter(None, (re.fullmatch(r"(sm|compute)_(\d+)(\d)", a) for a in arch)):
        built = (int(m[2]), int(m[3]))
        if built <= (major, minor) and (m[1] == "compute" or built[0] == major):
            return None
    return (f"the GPU {torch.cuda.get_device_name(device)} (sm_{major}{minor}) has no kernels in "
            f"torch {torch.__version__}, built for CUDA {torch.version.cuda} with {' '.join(arch)}: "
            f"install a build that has sm_{major}{minor}, e.g. `{reinstall(*CUDA_WHEELS[12])}` (CUDA 12.6: "
            f"sm_50 to sm_90)")


def pick_device(name="auto"):
    """The torch.device for --device. A device that cannot be used raises UserError with
    the reason; so does auto beside an NVIDIA GPU that torch cannot use (a CPU run there
    takes hours while the GPU idles: --device cpu asks for it)."""
    given = name
    if name == "auto":
        if torch.cuda.is_available():
            if slurm_job_without_gpu():  # no cgroup: the node's GPUs, other jobs' too, are all visible
                raise UserError(f"--device auto: this Slurm job was given no GPU, yet "
                                f"{visible_gpus(torch.cuda.device_count())} and may be other jobs': "
                                f"ask for one with --gres=gpu:1 (or --gpus=1), pass --device cpu, or "
                                f"pass --device cuda to use a visible one deliberately")
            name = "cuda"
        elif torch.backends.mps.is_available():
            return torch.device("mps")
        elif message := unusable_gpu_message():
            raise UserError(f"--device auto: {message}; to train on the CPU, pass --device cpu")
        else:
            return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {given}: not a device; expected {DEVICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {given}: " + (unusable_gpu_message() or
                            f"torch {torch.__version__} sees no CUDA GPU on this machine"))
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {given}: {visible_gpus(torch.cuda.device_count())}")
        if message := missing_kernels_message(device):
            raise UserError(f"--device {given}: {message}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {given}: Apple MPS is not available (it needs an Apple-silicon "
                        f"Mac and a torch build with MPS)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {given}: expected {DEVICES}")
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


def set_gpu_options(tf32=False, strict_fp32=False, cudnn_benchmark=False):
    """CUDA's float32 settings. By default those of the report's run: deterministic cuDNN (its
    code set it), convolutions in TF32 and matrix products in float32 (torch's defaults, which
    it left alone). tf32 adds TF32 matrix products; strict_fp32 turns TF32 off everywhere, for
    a run to compare with the CPU. Set through the allow_tf32 flags only: after the newer
    fp32_precision API, reading them raises, and torch.compile reads them. cudnn_benchmark:
    the fastest convolution algorithms, not deterministically. A CPU run is unchanged."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = not strict_fp32
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.deterministic = not cudnn_benchmark


def usable_cpus():
    """The CPUs this process may run on (a Slurm task's or a container's share), not the
    machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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


@functools.cache
def skips_on_the_device(optimizer_class, device):
    """Whether optimizer_class, fused on device (a string), leaves a parameter alone when
    handed found_inf = 1. Fused Adam does on CUDA and the CPU; on MPS not in every torch
    release. Probed once per process, with one parameter of one element."""
    p = torch.zeros(1, device=device, requires_grad=True)
    p.grad = torch.ones_like(p)
    probe = optimizer_class([p], fused=True)
    probe.found_inf = torch.ones((), device=device)
    probe.step()
    return bool((p == 0).all())


class NonFiniteGuard:
    """Keeps a step whose loss or gradient is not finite from reaching the weights, with no
    host sync, the way GradScaler does: check() sets a flag on the device from the gradients'
    largest magnitudes (read, not written), and fused Adam, holding that flag as its
    found_inf, skips the update on the device. Where the kernel does not honour found_inf
    (plain Adam; fused Adam on MPS in some torch releases) the host reads the flag instead."""

    def __init__(self, optimizer, device):
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.nonfinite = torch.zeros((), device=device)
        self.on_device = bool(optimizer.defaults.get("fused")) and skips_on_the_device(
            type(optimizer), str(device))
        if self.on_device:
            optimizer.found_inf = self.nonfinite  # read by every optimizer.step()

    def check(self, loss):
        """Sets and returns the step's flag (1.0: not finite)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        largest = torch.stack(torch._foreach_norm(grads, math.inf)).max() if grads else loss  # NaN stays NaN
        self.nonfinite.copy_(~(torch.isfinite(loss) & torch.isfinite(largest)))
        return self.nonfinite

    def allows_step(self):
        """Whether to call optimizer.step(): always where it skips on the device, else after
        the host has read the flag (a sync)."""
        return self.on_device or not self.nonfinite.item()
