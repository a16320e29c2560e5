"""Device paths, each tested on the CPU: choosing the device, checkpoints that resume on any
device, the running sums Apple MPS can hold, bfloat16 autocast (--amp)."""
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
from cli import UserError
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


@pytest.mark.parametrize("driver_cuda, built, advice", [
    ("11.8", "13.0", '`pip install "torch<2.8" "torchvision<0.23" --index-url https://download.pytorch.org/whl/cu118`'),
    ("11.4", "12.6", '`pip install "torch<2.8" "torchvision<0.23" --index-url https://download.pytorch.org/whl/cu118`'),
    ("12.2", "13.0", "`pip install torch torchvision --index-url https://download.pytorch.org/whl/cu126`"),
    ("13.0", "14.0", "`pip install torch torchvision --index-url https://download.pytorch.org/whl/cu130`"),
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
def test_amp_trains_on_the_cpu(tiny_data, tmp_path):
    """--amp on the CPU runs the forward passes in bfloat16 (the path CUDA and MPS take) and
    trains: finite numbers, no skipped step, a falling loss. (A small HW5Net: bfloat16 on a
    CPU without native support for it is slow.)"""
    args = train.get_args_parser().parse_args(
        ["--data_dir", tiny_data, "--out_dir", str(tmp_path / "run"), "--batch_size", "4",
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


class IgnoresFoundInf(torch.optim.Adam):
    """A fused Adam that steps whatever found_inf says (as MPS's in some torch releases)."""

    def step(self, closure=None):
        self.__dict__.pop("found_inf", None)
        return super().step(closure)


def test_the_device_side_skip_is_used_only_where_the_kernel_honours_it():
    assert devices.skips_on_the_device(torch.optim.Adam, "cpu") is True
    assert devices.skips_on_the_device(IgnoresFoundInf, "cpu") is False
    model = TinyNet()
    guard = devices.NonFiniteGuard(IgnoresFoundInf(model.parameters(), fused=True), CPU)
    assert not guard.device_side  # so the flag is read on the host, and the step skipped there
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    assert guard.check(torch.tensor(1.0)) == 1
    guard.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class Writes(TorchDispatchMode):
    """The storages every op under it writes to (its schema's Tensor(a!) arguments)."""

    def __enter__(self):
        self.written = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for arg, value in zip(func._schema.arguments, args):
            if arg.alias_info is not None and arg.alias_info.is_write:
                self.written |= {t.untyped_storage().data_ptr() for t in tree_leaves(value)
                                 if isinstance(t, torch.Tensor)}
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_the_non_finite_check_reads_the_gradients_and_writes_only_its_flag(bad):
    model = TinyNet()
    model(torch.rand(2, 3, 4, 4))[1].sum().backward()
    if bad is not None:
        model.fc.bias.grad[5] = bad
    guard = devices.NonFiniteGuard(torch.optim.Adam(model.parameters(), fused=True), CPU)
    with Writes() as ops:
        found = guard.check(torch.tensor(0.5))
    grads = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
    assert not ops.written & grads and ops.written == {guard.found.untyped_storage().data_ptr()}
    assert float(found) == (bad is not None)
    assert float(guard.check(torch.tensor(float("nan")))) == 1  # a non-finite loss alone


def test_the_best_weights_are_kept_on_the_models_device_not_copied_to_the_host(tiny_data, tmp_path, monkeypatch):
    """A meta-device model stands in for a GPU's: its copy stays there (a host copy of a meta
    tensor fails). In training, an improving epoch makes no host copy (the writer makes one
    as it writes best_model.pt, with host tensors, so a plain torch.load works anywhere)."""
    kept = checkpoints.best_weights(torch.nn.Linear(3, 2, device="meta"))
    assert {v.device.type for v in kept.values()} == {"meta"}
    model = torch.nn.Linear(3, 2)
    kept = checkpoints.best_weights(model)
    assert torch.equal(kept["weight"], model.weight) and kept["weight"].data_ptr() != model.weight.data_ptr()
    copies = []
    monkeypatch.setattr(train, "host_copy", lambda obj: copies.append(obj) or checkpoints.host_copy(obj))
    args = train.get_args_parser().parse_args(["--data_dir", tiny_data, "--out_dir", str(tmp_path / "run"),
                                               "--epochs", "2", "--batch_size", "4", "--quiet", "--width",
                                               "2", "--n_blocks", "1", "--device", "cpu"])
    history = train.main(args)
    assert history["best_epoch"] in (1, 2) and copies == []
    saved = torch.load(os.path.join(args.out_dir, "best_model.pt"), weights_only=True)
    assert {v.device.type for v in saved.values()} == {"cpu"}
