"""devices.py, choosing the device: the one line that says why a GPU cannot be used and the
fix (stand-ins for nvidia-smi, the driver, Slurm's variables), CUDA's float32 settings, and
the CPUs a process may use."""
import logging
import os
import subprocess
import sys

import pytest
import torch

import devices
from cli import UserError
from tiny import ROOT

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------
# Choosing the device
# ---------------------------------------------------------------------------------
@pytest.fixture
def no_gpu(monkeypatch):
    """A machine on which torch sees neither CUDA nor MPS."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_a_gpu_torch_cannot_use_stops_auto_with_the_fix(no_gpu, monkeypatch):
    """An A100 node whose driver is older than the CUDA that pip's torch was built for:
    auto does not fall back to hours on the CPU; --device cpu asks for that."""
    monkeypatch.setattr(devices, "nvidia_driver_info", lambda: ("535.104.05", "12.2"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(UserError, match=r"--device auto: this machine has an NVIDIA GPU \(NVIDIA driver "
                       r"535.104.05, which supports CUDA up to 12.2\) .*pip install torch.*pass --device cpu"):
        devices.pick_device("auto")
    with pytest.raises(UserError, match=r"--device cuda: this machine has an NVIDIA GPU .*cannot use it: install"):
        devices.pick_device("cuda")
    assert devices.pick_device("cpu") == CPU


def test_devices_that_cannot_be_used_fail_with_one_line(no_gpu, monkeypatch, caplog):
    monkeypatch.setattr(devices, "nvidia_driver_info", lambda: None)
    with caplog.at_level(logging.WARNING, logger="devices"):
        assert devices.pick_device("auto") == CPU
    assert caplog.records == []  # no NVIDIA GPU: the CPU is what the machine has
    assert devices.pick_device("cpu") == CPU
    with pytest.raises(UserError, match="--device cuda: torch .* sees no CUDA GPU"):
        devices.pick_device("cuda")
    with pytest.raises(UserError, match="--device mps: Apple MPS is not available"):
        devices.pick_device("mps")
    with pytest.raises(UserError, match="--device gpu: not a device; expected auto, cpu"):
        devices.pick_device("gpu")


def test_nvidia_driver_info_reads_nvidia_smi_else_the_kernel_module(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4 |'\n")
    smi.chmod(0o755)
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n")
    missing = str(tmp_path / "absent")
    assert devices.nvidia_driver_info(str(proc), str(smi)) == ("550.54.15", "12.4")
    assert devices.nvidia_driver_info(str(proc), missing) == ("535.104.05", None)
    assert devices.nvidia_driver_info(missing, missing) is None


@pytest.mark.skipif(sys.platform == "darwin", reason="MPS may exist on a Mac")
def test_train_py_with_an_unusable_device_exits_with_one_line(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data_dir", str(tmp_path),
                          "--out_dir", str(tmp_path / "run"), "--device", "mps"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["ERROR train: --device mps: Apple MPS is not available "
                                               "(it needs an Apple-silicon Mac and a torch build with MPS)"]
    assert not os.path.exists(tmp_path / "run")


@pytest.fixture
def nvidia_smi(tmp_path, monkeypatch):
    """Puts on PATH an nvidia-smi that prints the header of a driver supporting CUDA `cuda`."""
    def install(cuda, driver="550.54.15"):
        smi = tmp_path / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho '| NVIDIA-SMI {driver}    Driver Version: {driver}    "
                       f"CUDA Version: {cuda}     |'\n")
        smi.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return install


def test_a_driver_of_the_builds_cuda_major_version_is_not_blamed(no_gpu, nvidia_smi, monkeypatch):
    """A 12.4 driver runs a 12.6 build (minor-version compatibility, since CUDA 11): the line
    says so and gives the command that prints torch's own reason, not a reinstall."""
    nvidia_smi("12.4")
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    with pytest.raises(UserError) as caught:
        devices.pick_device("auto")
    assert str(caught.value) == (
        f"--device auto: this machine has an NVIDIA GPU (NVIDIA driver 550.54.15, which supports CUDA up to "
        f"12.4) and torch {torch.__version__} was built for CUDA 12.6, which that driver supports, yet torch "
        f"cannot use it: `python -c \"import torch; torch.cuda.init()\"` prints torch's reason; to train on "
        f"the CPU, pass --device cpu")


REINSTALL = "`pip uninstall -y torch torchvision && pip install "
INDEX = " --index-url https://download.pytorch.org/whl/"


@pytest.mark.parametrize("driver_cuda, built, advice", [
    ("11.8", "13.0", REINSTALL + '"torch<2.8" "torchvision<0.23"' + INDEX + "cu118`"),
    ("11.4", "12.6", REINSTALL + '"torch<2.8" "torchvision<0.23"' + INDEX + "cu118`"),
    ("12.2", "13.0", REINSTALL + "torch torchvision" + INDEX + "cu126`"),
    ("13.0", "14.0", REINSTALL + "torch torchvision" + INDEX + "cu130`"),
    ("10.2", "12.6", "update the NVIDIA driver (torch>=2.4 needs one for CUDA 11 or newer)"),
])
def test_the_advice_is_the_wheel_index_for_the_drivers_cuda_major_version(no_gpu, nvidia_smi, monkeypatch,
                                                                          driver_cuda, built, advice):
    nvidia_smi(driver_cuda)
    monkeypatch.setattr(torch.version, "cuda", built)
    message = devices.unusable_gpu_message()
    assert message.endswith(f"was built for CUDA {built} and cannot use it: " + (
        advice if advice.startswith("update") else
        f"install the build for the driver, {advice} (docs/devices.md), or update the driver"))


SLURM_GPUS_REFUSED = ("--device auto: this Slurm job was given no GPU, yet 4 CUDA GPUs are visible to this "
                      "process (cuda:0 to cuda:3) and may be other jobs': ask for one with --gres=gpu:1 (or "
                      "--gpus=1), pass --device cpu, or pass --device cuda to use a visible one deliberately")


@pytest.fixture
def gpu_node(monkeypatch):
    """A node whose 4 GPUs torch can use, in no Slurm job."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(devices, "missing_kernels_message", lambda device: None)
    for name in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES") + devices.SLURM_GPU_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_auto_stops_in_a_slurm_job_given_no_gpu_beside_visible_gpus(gpu_node, monkeypatch):
    """A node without cgroup confinement shows a CPU-only job every GPU, other jobs' too:
    auto stops; a device asked for by name is taken."""
    assert devices.pick_device("auto") == torch.device("cuda")  # outside Slurm
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with pytest.raises(UserError) as caught:
        devices.pick_device("auto")
    assert str(caught.value) == SLURM_GPUS_REFUSED
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "0")
    with pytest.raises(UserError, match="this Slurm job was given no GPU"):
        devices.pick_device("auto")
    for name in ("cuda", "cuda:3", "cpu"):
        assert devices.pick_device(name) == torch.device(name)


@pytest.mark.parametrize("variable, value", [
    ("SLURM_JOB_GPUS", "2"), ("SLURM_STEP_GPUS", "2"), ("SLURM_GPUS_ON_NODE", "1"), ("SLURM_GPUS", "1"),
    ("SLURM_GPUS_PER_TASK", "1"), ("SLURM_GPUS_PER_NODE", "a100:1"), ("CUDA_VISIBLE_DEVICES", "0"),
])
def test_auto_takes_cuda_in_a_slurm_job_given_a_gpu(gpu_node, monkeypatch, variable, value):
    """--gres=gpu:N, --gpus=N, --gpus-per-task, --gpus-per-node each leave their variable."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv(variable, value)
    assert devices.pick_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("count, line", [
    (2, "--device cuda:3: 2 CUDA GPUs are visible to this process (cuda:0 to cuda:1)"),
    (1, "--device cuda:3: 1 CUDA GPU is visible to this process (cuda:0)"),
])
def test_a_gpu_index_past_the_visible_ones_names_them(gpu_node, monkeypatch, count, line):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(UserError) as caught:
        devices.pick_device("cuda:3")
    assert str(caught.value) == line

def test_a_gpu_hidden_by_cuda_visible_devices_or_unusable_for_another_reason_is_named(no_gpu, monkeypatch):
    """The fix named is the one that applies: not a reinstall when CUDA_VISIBLE_DEVICES hides
    the GPU (Slurm's NoDevFiles included) or a Slurm job has none, nor when the driver supports torch's CUDA
    version, nor when that is unknown (then torch's own reason is what to read)."""
    monkeypatch.setattr(devices, "nvidia_driver_info", lambda: ("580.65.06", "13.0"))
    for hidden in ("", "-1", "NoDevFiles"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert f"CUDA_VISIBLE_DEVICES={hidden!r} hides it" in devices.unusable_gpu_message()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a CPU-only job on a GPU node: the cgroup hides the GPUs
    assert "this Slurm job was given none of them: ask for one, e.g. --gres=gpu:1" in devices.unusable_gpu_message()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    message = devices.unusable_gpu_message()
    assert "which that driver supports, yet torch cannot use it" in message and "pip install" not in message
    monkeypatch.setattr(torch.version, "cuda", "13.2")  # a 13.0 driver runs any CUDA 13 build
    assert "which that driver supports, yet torch cannot use it" in devices.unusable_gpu_message()
    monkeypatch.setattr(torch.version, "cuda", "14.0")
    assert "whl/cu130" in devices.unusable_gpu_message()
    monkeypatch.setattr(devices, "nvidia_driver_info", lambda: ("580.65.06", None))  # only /proc readable
    message = devices.unusable_gpu_message()
    assert "the CUDA version the driver supports is unknown" in message and "pip install" not in message
    assert 'python -c "import torch; torch.cuda.init()"' in message


@pytest.mark.parametrize("capability, arch, runs", [
    ((7, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"], False),  # V100, CUDA 13
    ((8, 6), ["sm_75", "sm_80", "sm_90", "compute_90"], True),   # A10: sm_80's cubins run on 8.6
    ((8, 0), ["sm_75", "sm_86", "compute_86"], False),           # an A100 below every kernel but sm_75's
    ((12, 1), ["sm_90", "sm_120"], True),
    ((9, 0), ["sm_80", "compute_80"], True),                     # PTX for 8.0, compiled for 9.0 at load
    ((9, 0), ["sm_80", "sm_90a"], False),                        # sm_90a is for 9.0a only
], ids=["V100 under CUDA 13", "A10", "A100 without sm_80", "12.1 on sm_120", "PTX", "arch-specific only"])
def test_a_gpu_without_kernels_in_the_build_is_caught_before_training(monkeypatch, capability, arch, runs):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # auto's Slurm check is tested above
    if runs:
        assert devices.pick_device("cuda:0") == torch.device("cuda:0")
        assert devices.pick_device("auto") == torch.device("cuda")
        return
    sm = f"sm_{capability[0]}{capability[1]}"
    for name in ("auto", "cuda"):
        with pytest.raises(UserError, match=rf"--device {name}: the GPU Tesla V100-SXM2-32GB \({sm}\) has no "
                           rf"kernels in torch .* install a build that has {sm}, e.g. .*cu126"):
            devices.pick_device(name)


# ---------------------------------------------------------------------------------
# CUDA's float32 settings, and the CPUs a process may use
# ---------------------------------------------------------------------------------
def test_gpu_options_are_the_reports_by_default_and_tf32_or_strict_on_request():
    """The report's environment: deterministic cuDNN, TF32 convolutions, float32 products;
    --tf32 adds TF32 products, --strict_fp32 turns TF32 off everywhere. Set through one API
    both ways: afterwards every flag torch (and torch.compile) reads agrees, and reading none
    of them raises (the legacy and new APIs mixed do)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32)
    try:
        for options, conv, products in (({}, True, False), ({"tf32": True}, True, True),
                                        ({"strict_fp32": True}, False, False), ({}, True, False)):
            devices.set_gpu_options(**options)
            assert (cudnn.benchmark, cudnn.deterministic) == (False, True)
            assert cudnn.allow_tf32 is conv and matmul.allow_tf32 is products
            assert torch.get_float32_matmul_precision() == ("high" if products else "highest")
            if hasattr(matmul, "fp32_precision"):  # the newer API says the same
                assert (matmul.fp32_precision == "tf32") is products and (cudnn.conv.fp32_precision == "tf32") is conv
        devices.set_gpu_options(cudnn_benchmark=True)
        assert (cudnn.benchmark, cudnn.deterministic) == (True, False)
    finally:
        cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = saved


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux's CPU affinity")
def test_workers_default_to_the_cpus_this_process_may_use():
    """As a Slurm task given one CPU of the node sees it: the count is the process's share."""
    code = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); sys.path.insert(0, '.')\n"
            "import devices, Dataset; print(devices.usable_cpus(), Dataset.get_args_parser().parse_args("
            "['--coco_dir', 'C', '--out_dir', 'D']).workers, os.cpu_count())")
    usable, workers, machine = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                                              text=True, check=True).stdout.split()
    assert usable == workers == "1" and int(machine) == os.cpu_count()
