"""devices.py in training, each path tested on the CPU: batches read from the device's
memory, the running sums Apple MPS can hold, bfloat16 autocast (--amp), the non-finite
step skipped on the device, and glibc's malloc kept from refaulting freed blocks."""
import json
import math
import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import devices
import train
import utils
from Dataset import MyCOCODataset
from network import HW5Net
from cli import UserError
from tiny import ROOT, SMALL, TinyNet, without_timings

CPU = torch.device("cpu")


@pytest.mark.slow
def test_malloc_reuse_changes_nothing_but_speed(tiny_data, tmp_path):
    """The CPU's malloc tuning (on by default) against glibc's own (--system_malloc), each
    in its own process (mallopt lasts for the process): the same history and weights."""
    runs = {}
    for name, extra in (("reuse", ()), ("system", ("--system_malloc",))):
        out = str(tmp_path / name)
        subprocess.run([sys.executable, "train.py", "--data_dir", tiny_data, "--out_dir", out, "--batch_size", "4",
                        "--epochs", "2", "--device", "cpu", "--quiet", *SMALL, *extra], cwd=ROOT, check=True)
        with open(os.path.join(out, "history.json")) as f:
            runs[name] = without_timings(json.load(f)), torch.load(os.path.join(out, "best_model.pt"))
    assert runs["reuse"][0] == runs["system"][0]
    for k, v in runs["reuse"][1].items():
        assert torch.equal(v, runs["system"][1][k]), k


FAULTS_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import devices
applied = devices.reuse_freed_memory() if sys.argv[1] == "reuse" else None
torch.ones(16 * 2 ** 20).sum()  # first touch: faults either way
faults = []  # per cycle of a 64 MB block allocated, touched and freed
for cycle in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2 ** 20).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

kept = rss()
devices.release_freed_memory()
print(applied, ",".join(map(str, faults)), kept - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc only")
def test_reuse_freed_memory_stops_refaulting_and_release_hands_back():
    """A freed 64 MB block comes back without faulting its pages in again, and
    release_freed_memory hands the kept block back to the kernel."""
    code = FAULTS_SCRIPT.format(root=ROOT)
    faults, released = {}, {}
    for mode in ("default", "reuse"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        faults[mode] = [int(f) for f in out[-2].split(",")]
        released[mode] = int(out[-1])
        if mode == "reuse":
            assert out[0] == "True"
    block = 64 * 2 ** 20 // os.sysconf("SC_PAGE_SIZE")  # pages
    assert all(f > 0.8 * block for f in faults["default"]), faults  # glibc maps each block anew
    # Reused: most cycles fault nothing in. (Where the first blocks land depends on which
    # threads' arenas the import made, so a few may still fault.)
    assert sum(f < block / 4 for f in faults["reuse"]) >= 6, faults
    assert released["default"] < 16 * 2 ** 20, released  # nothing of that size was kept
    assert released["reuse"] > 48 * 2 ** 20, released  # the kept 64 MB block goes back


def test_device_batches_in_order_are_the_datasets_items(tiny_data):
    data = MyCOCODataset(tiny_data, train=True)
    batches = list(devices.DeviceBatches(data, 4, CPU))
    assert len(batches) == math.ceil(len(data) / 4)
    items = [data[i] for i in range(len(data))]
    for key in ("image", "label", "bbox"):
        torch.testing.assert_close(torch.cat([b[key] for b in batches]), torch.stack([it[key] for it in items]),
                                   rtol=0, atol=0)
    assert batches[0]["image"].dtype == torch.float32


def test_device_batches_shuffle_and_flip_from_the_generator_alone(tiny_data):
    """Each epoch shows every image once, in an order (and with flips) drawn from the
    generator: the same generator state gives the same epoch; a flip mirrors image and
    box as torchvision's horizontal flip of an image and its BoundingBoxes does."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as TF
    data = MyCOCODataset(tiny_data, train=True)
    generator = torch.Generator().manual_seed(0)
    batches = devices.DeviceBatches(data, 4, CPU, generator=generator, augment=True, drop_last=True)
    assert len(batches) == len(data) // 4
    state = generator.get_state()
    first = list(batches)
    generator.set_state(state)
    torch.manual_seed(123)  # the global generator plays no part
    again = list(batches)
    for a, b in zip(first, again):
        assert all(torch.equal(a[k], b[k]) for k in ("image", "label", "bbox"))
    assert not torch.equal(torch.cat([b["label"] for b in first]), data.labels[:len(data) // 4 * 4])
    def mirrored(i):
        box = tv_tensors.BoundingBoxes(data.boxes[i][None] * 256, format="XYXY", canvas_size=(256, 256))
        return {"image": TF.horizontal_flip(data[i]["image"]), "label": data.labels[i],
                "bbox": TF.horizontal_flip(box).as_subclass(torch.Tensor)[0] / 256}

    n_flipped = 0
    for batch in first:
        for image, label, box in zip(batch["image"], batch["label"], batch["bbox"]):
            i = next(j for j in range(len(data)) if torch.equal(data[j]["image"], image)
                     or torch.equal(mirrored(j)["image"], image))
            flipped = not torch.equal(data[i]["image"], image)
            expected = mirrored(i) if flipped else data[i]
            n_flipped += flipped
            assert torch.equal(expected["image"], image) and int(expected["label"]) == int(label)
            torch.testing.assert_close(expected["bbox"], box)
    assert 0 < n_flipped < len(first) * 4


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


class IgnoresFoundInf(torch.optim.Adam):
    """A fused Adam that steps whatever found_inf says (as MPS's in some torch releases)."""

    def step(self, closure=None):
        self.__dict__.pop("found_inf", None)
        return super().step(closure)


def test_the_device_side_skip_is_used_only_where_the_kernel_honours_it():
    assert devices.skips_on_the_device(torch.optim.Adam, "cpu") is True
    assert devices.skips_on_the_device(IgnoresFoundInf, "cpu") is False
    model = TinyNet()
    optimizer = IgnoresFoundInf(model.parameters(), fused=True)
    guard = devices.NonFiniteGuard(optimizer, CPU)
    assert not guard.on_device  # so the flag is read on the host, and the step skipped there
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    assert guard.check(torch.tensor(1.0)) == 1 and not guard.allows_step()
    fused = devices.NonFiniteGuard(torch.optim.Adam(model.parameters(), fused=True), CPU)
    assert fused.on_device and fused.allows_step()  # fused Adam on the CPU skips on the device


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
    assert not ops.written & grads and ops.written == {guard.nonfinite.untyped_storage().data_ptr()}
    assert float(found) == (bad is not None)
    assert float(guard.check(torch.tensor(float("nan")))) == 1  # a non-finite loss alone


def tiny_batch(seed, nan=False):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(4, 2, generator=g) * 0.5
    batch = {"image": torch.rand(4, 3, 4, 4, generator=g), "label": torch.tensor([0, 1, 2, 1]),
             "bbox": torch.cat([xy, xy + 0.3], dim=1)}
    if nan:
        batch["image"][1, 0, 0, 0] = float("nan")
    return batch


def tiny_run(batches, fused=True, model=None, criterion_box=None, amp=False):
    torch.manual_seed(0)
    model = model or TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=fused)
    res = train.train_one_epoch(model, batches, opt, nn.CrossEntropyLoss(),
                                criterion_box or train.make_criteria("ciou")[1], CPU, 1, amp=amp,
                                progress=False)
    return model, opt, res


@pytest.mark.parametrize("fused, honoured", [(True, True), (False, True), (True, False)],
                         ids=["fused Adam, device-side", "plain Adam, host check",
                              "fused Adam that ignores found_inf, host check"])
def test_a_non_finite_step_leaves_weights_and_adam_as_they_were(fused, honoured, monkeypatch):
    """A NaN in one batch: that step is skipped and counted; the run ends exactly where a
    run without that batch ends (weights, Adam's moments and step count, metrics)."""
    if not honoured:  # as MPS's fused kernel in some torch releases: the guard reads the host
        monkeypatch.setattr(devices, "skips_on_the_device", lambda *a: False)
    good1, bad, good2 = tiny_batch(1), tiny_batch(2, nan=True), tiny_batch(3)
    model, opt, res = tiny_run([good1, bad, good2], fused)
    clean_model, clean_opt, clean_res = tiny_run([good1, good2], fused)
    assert res["skipped_steps"] == 1 and clean_res["skipped_steps"] == 0
    for p, q in zip(model.parameters(), clean_model.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], clean_opt.state[q][key]), key
    for m in train.METRICS:
        assert res[m] == pytest.approx(clean_res[m], rel=1e-12), m


def flat_box_net():
    """TinyNet whose box is (0.1, 0.5, 0.7, 0.5) for every image: zero height."""
    net = TinyNet()
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.copy_(torch.tensor([0.0, 0, 0, 0.1, 0.5, 0.7, 0.5]))
    return net


def test_a_nan_gradient_under_a_finite_loss_never_reaches_the_weights():
    """torchvision's CIoU on a zero-height box: a finite loss (1.1) and a NaN gradient. Every
    step of this one-step epoch is skipped, so the run stops, the weights untouched."""
    from torchvision.ops import complete_box_iou_loss as torchvision_ciou
    net = flat_box_net()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(UserError, match="non-finite loss or gradient in epoch 1, 1 step"):
        tiny_run([tiny_batch(1)], model=net,
                 criterion_box=lambda p, t: torchvision_ciou(p, t, reduction="mean"))
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_non_finite_steps_in_a_row_stop_the_run_with_a_message():
    """Checked every CHECK_EVERY (20) steps: it stops at the first check that finds them all
    skipped, without running the rest of the epoch."""
    batches = [tiny_batch(2, nan=True)] * 25
    net = TinyNet()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(UserError, match="epoch 1, 20 step.s. in a row .*none of them changed the weights"):
        tiny_run(batches, model=net)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16 autocast"])
def test_degenerate_boxes_train_with_finite_loss_and_gradients(amp):
    """The training path with our CIoU: a zero-height box head (what bfloat16 ties give)
    trains without a skipped step, every loss and gradient finite."""
    net, _, res = tiny_run([tiny_batch(1), tiny_batch(2)], model=flat_box_net(), amp=amp)
    assert res["skipped_steps"] == 0
    assert all(math.isfinite(res[m]) for m in train.METRICS)
    for p in net.parameters():
        assert torch.isfinite(p).all() and torch.isfinite(p.grad).all()
