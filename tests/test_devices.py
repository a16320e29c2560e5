"""Device paths, each tested on the CPU: choosing the device, checkpoints that resume on any
device, the running sums Apple MPS can hold, bfloat16 autocast (--amp)."""
import argparse
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import checkpoints
import devices
import train
import utils
from network import HW5Net
from files import UserError
from tiny import TinyNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------
# Choosing the device
# ---------------------------------------------------------------------------------
@pytest.fixture
def no_gpu(monkeypatch):
    """A machine on which torch sees neither CUDA nor MPS."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_a_gpu_torch_cannot_use_is_said_loudly_and_cuda_fails_with_the_fix(no_gpu, monkeypatch, caplog):
    """An A100 node whose driver is older than the CUDA that pip's torch was built for."""
    monkeypatch.setattr(devices, "nvidia_driver_info", lambda: ("535.104.05", "12.2"))
    with caplog.at_level(logging.WARNING, logger="devices"):
        assert devices.pick_device("auto") == CPU
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    assert "TRAINING ON THE CPU" in record.getMessage() and "driver 535.104.05" in record.getMessage()
    assert "CUDA up to 12.2" in record.getMessage() and "pip install torch" in record.getMessage()
    with pytest.raises(UserError, match=r"--device cuda: this machine has an NVIDIA GPU .*cannot use it: install"):
        devices.pick_device("cuda")


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


# ---------------------------------------------------------------------------------
# Checkpoints: onto the CPU, then wherever the parameters are
# ---------------------------------------------------------------------------------
def one_step(model, opt):
    x = torch.rand(4, 3, 4, 4)
    logits, box = model(x)
    (logits.square().mean() + box.square().mean()).backward()
    opt.step()
    opt.zero_grad()


def write_checkpoint(path, fused=True):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=fused)
    one_step(model, opt)
    generator = torch.Generator().manual_seed(5)
    torch.randperm(10, generator=generator)
    checkpoints.save(checkpoints.checkpoint_state(model, opt, 1, {"best_epoch": 1}, generator, CPU,
                                                       {"seed": 0}), str(path))
    return model, opt, generator


@pytest.mark.filterwarnings("ignore:for fc:UserWarning")
def test_resume_loads_onto_the_cpu_and_moves_adam_to_the_parameters_device(tmp_path):
    """'meta' stands in for CUDA or MPS: a device whose tensors torch.set_rng_state,
    Generator.set_state and .numpy() refuse, as they refuse CUDA tensors. A checkpoint
    loaded onto the training device (map_location=device) fails here; loaded onto the CPU
    and moved, it resumes."""
    path = tmp_path / "checkpoint.pt"
    _, opt, generator = write_checkpoint(path)
    cpu_rng = torch.get_rng_state()
    torch.manual_seed(123)
    meta = torch.device("meta")
    model = TinyNet().to(meta)
    resumed_opt = torch.optim.Adam(model.parameters(), lr=0.01, foreach=False)
    resumed_gen = torch.Generator()
    ckpt = checkpoints.load_checkpoint(str(path))
    checkpoints.restore(ckpt, str(path), model, resumed_opt, resumed_gen, meta)
    assert ckpt["epoch"] == 1 and ckpt["history"] == {"best_epoch": 1}
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    assert torch.equal(resumed_gen.get_state(), generator.get_state())
    for p in model.parameters():
        state = resumed_opt.state[p]
        assert state["exp_avg"].device == meta and state["exp_avg_sq"].device == meta
        assert state["step"].device == CPU  # plain Adam keeps its step count on the host
    assert not resumed_opt.param_groups[0]["fused"]  # the resuming optimizer's own kind


@pytest.mark.parametrize("fused_before, fused_after", [(True, False), (False, True)])
def test_a_checkpoint_resumes_with_another_adam_implementation(tmp_path, fused_before, fused_after):
    """Written with fused Adam (CUDA, CPU), resumed where it is missing, and the other way:
    the next step is the one the writing optimizer would have taken."""
    path = tmp_path / "checkpoint.pt"
    model, opt, generator = write_checkpoint(path, fused=fused_before)
    torch.manual_seed(1)
    one_step(model, opt)  # the step the writer takes next
    resumed = TinyNet()
    resumed_opt = torch.optim.Adam(resumed.parameters(), lr=0.01, fused=fused_after)
    checkpoints.restore(checkpoints.load_checkpoint(str(path)), str(path), resumed, resumed_opt,
                        torch.Generator(), CPU)
    torch.manual_seed(1)
    one_step(resumed, resumed_opt)
    for p, q in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert bool(resumed_opt.param_groups[0]["fused"]) is fused_after


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_the_training_devices_generator_is_saved_and_restored(kind, monkeypatch):
    """The device's generator is read and restored through torch.cuda / torch.mps; here
    those are stand-ins that record what they are given."""
    restored = {}
    module = getattr(torch, kind)
    monkeypatch.setattr(module, "get_rng_state", lambda *index: torch.arange(8, dtype=torch.uint8))
    monkeypatch.setattr(module, "set_rng_state", lambda state, *index: restored.update(state=state))
    if kind == "cuda":
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    device = torch.device(kind)
    generator = torch.Generator().manual_seed(0)
    state = checkpoints.rng_state(generator, device)
    assert state[kind].device == CPU and torch.equal(state[kind], torch.arange(8, dtype=torch.uint8))
    checkpoints.set_rng_state(state, generator, device)
    assert torch.equal(restored["state"], state[kind])
    restored.clear()
    checkpoints.set_rng_state(checkpoints.rng_state(generator, CPU), generator, device)  # written on a CPU
    assert restored == {}


# ---------------------------------------------------------------------------------
# Apple MPS: no float64 on the device
# ---------------------------------------------------------------------------------
class NoFloat64(TorchDispatchMode):
    """Every op that makes a float64 tensor fails, as it does on Apple MPS."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise AssertionError(f"{func} made a float64 tensor (MPS has none)")
        return out


def test_training_and_evaluation_make_no_float64_tensor_with_mps_sums(monkeypatch):
    """With the accumulator dtype MPS gets, one training epoch and one evaluation of HW5Net
    (at 64x64: the same layers) make no float64 tensor at all, and their means agree with
    the float64 sums the CPU keeps."""
    assert devices.accumulator_dtype("mps") == torch.float32
    assert devices.accumulator_dtype("cpu") == devices.accumulator_dtype("cuda") == torch.float64
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(8, 2, generator=g) * 0.5
    items = [{"image": torch.rand(3, 64, 64, generator=g), "label": torch.tensor(i % 3),
              "bbox": torch.cat([xy[i], xy[i] + 0.4])} for i in range(8)]
    data = torch.utils.data.DataLoader(items, batch_size=4)
    criterion_cls, criterion_box, _ = train.make_criteria("ciou")

    def run():
        torch.manual_seed(0)
        model = HW5Net(image_size=64)
        opt = train.make_optimizer(model, 1e-3, (0.9, 0.99))
        res = train.train_one_epoch(model, data, opt, criterion_cls, criterion_box, CPU, 1,
                                    progress=False)
        _, ev = utils.evaluation(model, data, criterion_cls, criterion_box, CPU)
        return res, ev

    expected = run()
    mps_dtype = devices.accumulator_dtype("mps")
    as_on_mps = lambda device: mps_dtype  # noqa: E731
    monkeypatch.setattr(train, "accumulator_dtype", as_on_mps)
    monkeypatch.setattr(utils, "accumulator_dtype", as_on_mps)
    with NoFloat64():
        got = run()
    for mine, theirs in zip(got, expected):
        for key in train.METRICS:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6), key


# ---------------------------------------------------------------------------------
# --amp: bfloat16 autocast on any device, the CPU included
# ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from Dataset import build_dataset
    from synthetic.coco import make_synthetic_coco
    root = tmp_path_factory.mktemp("amp")
    make_synthetic_coco(str(root / "coco"), n_train=16, n_val=8, seed=1)
    build_dataset(str(root / "coco"), str(root / "data"), workers=1, progress=False, figure=False)
    return str(root / "data")


def test_amp_trains_on_the_cpu(small_data, tmp_path):
    """--amp on the CPU runs the forward passes in bfloat16 (the path CUDA and MPS take) and
    trains: finite numbers, no skipped step, a falling loss. (A small HW5Net: bfloat16 on a
    CPU without native support for it is slow.)"""
    args = train.get_args_parser().parse_args(
        ["--data_dir", small_data, "--out_dir", str(tmp_path / "run"), "--batch_size", "4",
         "--epochs", "2", "--amp", "--device", "cpu", "--quiet", "--width", "2", "--n_blocks", "1"])
    seen = []
    original = HW5Net.forward

    def spy(self, x):
        logits, box = original(self, x)
        seen.append((torch.is_autocast_enabled("cpu"), logits.dtype, box.dtype))
        return logits, box

    HW5Net.forward = spy
    try:
        history = train.main(args)
    finally:
        HW5Net.forward = original
    assert seen and all(s == (True, torch.bfloat16, torch.bfloat16) for s in seen)
    assert history["skipped_steps"] == [0, 0]
    for split in ("train", "test"):
        assert all(torch.isfinite(torch.tensor(history[split][m])).all() for m in train.METRICS)
    assert history["train"]["cross_entropy"][1] < history["train"]["cross_entropy"][0]
    assert history["settings"]["amp"] is True


def test_a_gpu_hidden_by_cuda_visible_devices_or_unusable_for_another_reason_is_named(no_gpu, monkeypatch):
    """The fix named is the one that applies: not a reinstall when CUDA_VISIBLE_DEVICES hides
    the GPU, nor when the driver supports torch's CUDA version."""
    monkeypatch.setattr(devices, "nvidia_driver_info", lambda: ("580.65.06", "13.0"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES='' hides it" in devices.unusable_gpu_message()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    message = devices.unusable_gpu_message()
    assert "which that driver supports, yet torch cannot use it" in message and "pip install" not in message
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    assert "pip install torch" in devices.unusable_gpu_message()
