"""train.py on a tiny synthetic set: outputs, gradients, learning, resume after a kill."""
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import checkpoints
import devices
import train
from Dataset import MyCOCODataset
from network import HW5Net
from cli import UserError
from tiny import DEVICE, TinyNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args_for(data_dir, out_dir, *extra):
    """train.py's options on DEVICE (a later --device wins)."""
    return train.get_args_parser().parse_args(["--data_dir", data_dir, "--out_dir", out_dir, "--batch_size",
                                               "4", "--quiet", "--device", DEVICE, *extra])


SMALL = ["--width", "2", "--n_blocks", "1"]  # a small HW5Net where the network is not what is tested


def test_a_finished_run_keeps_best_model_and_history_with_its_settings(tiny_data, tmp_path):
    """No checkpoint.pt is left (2.5 GB for the full HW5Net); history.json holds the
    metrics and the settings, from which the best model can be rebuilt and loaded; the
    run is neither retrained nor overwritten, and cannot grow without a checkpoint."""
    out = str(tmp_path / "run")
    history = train.main(args_for(tiny_data, out, "--epochs", "2", "--loss", "mse", *SMALL))
    assert sorted(os.listdir(out)) == [".lock", "best_model.pt", "history.json"]
    with open(os.path.join(out, "history.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(history)) and saved["finished"] is True
    for split in ("train", "test"):
        for metric in train.METRICS:
            assert len(saved[split][metric]) == 2
    assert saved["loss"] == "MSE" and saved["select_on"] == "test" and saved["best_epoch"] in (1, 2)
    assert [w["file"] for w in saved["save_seconds"]] == ["best_model.pt"]  # once, at the end
    settings = saved["settings"]
    assert settings["loss"] == "mse" and settings["epochs"] == 2 and settings["device"] == DEVICE
    model = HW5Net(width=settings["width"], n_blocks=settings["n_blocks"], learnable_res=settings["learnable_res"])
    model.load_state_dict(torch.load(os.path.join(out, "best_model.pt"), weights_only=True))

    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        train.main(args_for(tiny_data, out, "--epochs", "2", *SMALL))
    mtime = os.path.getmtime(os.path.join(out, "best_model.pt"))
    with pytest.raises(UserError, match="was written with --loss mse .now ciou."):
        train.main(args_for(tiny_data, out, "--epochs", "2", "--resume", *SMALL))
    again = train.main(args_for(tiny_data, out, "--epochs", "2", "--loss", "mse", "--resume", *SMALL))
    assert again == saved and os.path.getmtime(os.path.join(out, "best_model.pt")) == mtime
    with pytest.raises(UserError, match="finished its 2 epochs and its checkpoint.pt was removed .*--keep_checkpoint"):
        train.main(args_for(tiny_data, out, "--epochs", "3", "--loss", "mse", "--resume", *SMALL))


def test_checkpoints_every_epoch_with_zero_minutes_and_none_in_a_short_run_by_default(tiny_data, tmp_path):
    every = train.main(args_for(tiny_data, str(tmp_path / "every"), "--epochs", "3", *SMALL,
                                "--checkpoint_minutes", "0", "--keep_checkpoint"))
    written = [(w["epoch"], w["file"]) for w in every["save_seconds"]]
    assert [w for w in written if w[1] == "checkpoint.pt"] == [(1, "checkpoint.pt"), (2, "checkpoint.pt"),
                                                              (3, "checkpoint.pt")]
    on_cuda = DEVICE.startswith("cuda")  # written in the background there, in the foreground on the CPU
    assert all(w["seconds"] >= 0 and w["background"] is on_cuda for w in every["save_seconds"])
    ckpt = torch.load(str(tmp_path / "every" / "checkpoint.pt"), weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["settings"]["loss"] == "ciou"
    default = train.main(args_for(tiny_data, str(tmp_path / "default"), "--epochs", "3", *SMALL))
    assert [w["file"] for w in default["save_seconds"]] == ["best_model.pt"]
    assert not os.path.exists(tmp_path / "default" / "checkpoint.pt")


def test_single_and_dual_backward_give_the_same_gradients():
    # float64, so that only the order of summation differs between the two. HW5Net at
    # 64x64 (the same layers, 4x4 features): the property does not depend on the size,
    # and the full net in float64 with two sets of gradients needs 12 GB.
    torch.manual_seed(0)
    model = HW5Net(image_size=64).train().double()
    images = torch.rand(4, 3, 64, 64, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    boxes = torch.tensor([[0.1, 0.1, 0.6, 0.7], [0.2, 0.3, 0.9, 0.8],
                          [0.0, 0.2, 0.5, 0.9], [0.3, 0.1, 0.7, 0.5]], dtype=torch.float64)
    criterion_cls, criterion_box, _ = train.make_criteria("ciou")

    def grads(single):
        model.zero_grad(set_to_none=True)
        logits, raw = model(images)
        ce = criterion_cls(logits, labels)
        box = criterion_box(raw, boxes)
        if single:
            (ce + box).backward()
        else:
            ce.backward(retain_graph=True)
            box.backward()
        return [p.grad.clone() for p in model.parameters()]

    dual, single = grads(False), grads(True)
    assert any(g.abs().sum() > 0 for g in dual[-2:])  # the box head got gradients
    for a, b in zip(dual, single):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = HW5Net()
    opt = train.make_optimizer(model, 1e-3, (0.9, 0.99))
    criterion_cls, criterion_box, _ = train.make_criteria("ciou")
    batch = {"image": torch.rand(4, 3, 256, 256), "label": torch.tensor([0, 1, 2, 0]),
             "bbox": torch.tensor([[0.1, 0.1, 0.6, 0.7], [0.2, 0.3, 0.9, 0.8],
                                   [0.0, 0.2, 0.5, 0.9], [0.3, 0.1, 0.7, 0.5]])}
    first = train.train_one_epoch(model, [batch], opt, criterion_cls, criterion_box,
                                  torch.device("cpu"), 1, progress=False)
    for epoch in range(2, 7):
        last = train.train_one_epoch(model, [batch], opt, criterion_cls, criterion_box,
                                     torch.device("cpu"), epoch, progress=False)
    assert last["cross_entropy"] < 0.5 * first["cross_entropy"]
    assert last["box_loss"] < first["box_loss"]


CPU = torch.device("cpu")


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


def test_resume_errors(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out, exist_ok=True)
    settings = train.run_settings(args_for(tiny_data, out, "--resume"), torch.device("cpu"))
    torch.save({"model": {"foo": torch.zeros(1)}, "optimizer": {}, "epoch": 1, "history": {},
                "rng": {}, "settings": settings}, os.path.join(out, "checkpoint.pt"))
    with pytest.raises(UserError, match="different architecture"):
        train.main(args_for(tiny_data, out, "--resume"))
    with open(os.path.join(out, "checkpoint.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        train.main(args_for(tiny_data, out, "--resume"))
    os.remove(os.path.join(out, "checkpoint.pt"))
    with open(os.path.join(out, "history.json"), "w") as f:
        f.write('{"train": ')  # cut short
    with pytest.raises(UserError, match="history.json is missing or unreadable"):
        train.main(args_for(tiny_data, out, "--resume"))


def run_cli(data_dir, out_dir, *extra):
    # The CPU, since the kill is timed from an epoch's length; a small HW5Net, since what
    # is tested is where training stops and starts again, not the network.
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data_dir", data_dir, "--out_dir",
           out_dir, "--batch_size", "4", "--epochs", "3", "--device", "cpu", "--quiet",
           "--checkpoint_minutes", "0", *SMALL, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def comparable(history):
    """What two runs must share: not timings, nor the settings (paths, --resume)."""
    return {k: v for k, v in history.items() if not k.endswith("_seconds") and k != "settings"}


def test_malloc_reuse_changes_nothing_but_speed(tiny_data, tmp_path):
    """The CPU's malloc tuning (on by default) against glibc's own (--system_malloc), each
    in its own process (mallopt lasts for the process): the same history and weights."""
    runs = {}
    for name, extra in (("reuse", ()), ("system", ("--system_malloc",))):
        out = str(tmp_path / name)
        proc = run_cli(tiny_data, out, *extra)
        assert proc.wait(timeout=600) == 0, proc.stdout.read()
        with open(os.path.join(out, "history.json")) as f:
            runs[name] = comparable(json.load(f)), torch.load(os.path.join(out, "best_model.pt"))
    assert runs["reuse"][0] == runs["system"][0]
    for k, v in runs["reuse"][1].items():
        assert torch.equal(v, runs["system"][1][k]), k


def test_resume_after_kill_reproduces_the_uninterrupted_history(tiny_data, tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    proc = run_cli(tiny_data, full)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()
    with open(os.path.join(full, "history.json")) as f:
        epoch_seconds = json.load(f)["epoch_seconds"]
    # Second run: SIGKILL inside epoch 2, a third of an epoch after the epoch-1 checkpoint
    # lands (an epoch's training steps take most of its time, on any machine).
    proc = run_cli(tiny_data, killed)
    ckpt = os.path.join(killed, "checkpoint.pt")
    deadline = time.time() + 300
    while not os.path.exists(ckpt) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(min(epoch_seconds[1:]) / 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    with open(os.path.join(killed, "history.json")) as f:
        assert len(json.load(f)["train"]["accuracy"]) == 1, "the kill should land in epoch 2"
    proc = run_cli(tiny_data, killed, "--resume")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    assert "continuing the run in" in output and "after epoch 1" in output
    with open(os.path.join(full, "history.json")) as f:
        expected = comparable(json.load(f))
    with open(os.path.join(killed, "history.json")) as f:
        got = comparable(json.load(f))
    assert len(got["train"]["accuracy"]) == 3
    assert got == expected


def test_a_finished_run_kept_with_its_checkpoint_trains_further_exactly(tiny_data, tmp_path):
    """--keep_checkpoint, then --resume with a larger --epochs, with --augment: the batch
    order and the flips of the later epochs are those of an uninterrupted run."""
    common = ["--augment", "--loss", "mse", *SMALL]
    full = train.main(args_for(tiny_data, str(tmp_path / "full"), "--epochs", "3", *common))
    part = str(tmp_path / "part")
    train.main(args_for(tiny_data, part, "--epochs", "1", "--keep_checkpoint", *common))
    resumed = train.main(args_for(tiny_data, part, "--epochs", "3", "--resume", *common))
    assert len(resumed["train"]["accuracy"]) == 3
    assert comparable(resumed) == comparable(full)
    assert not os.path.exists(os.path.join(part, "checkpoint.pt"))  # finished, not kept this time


def test_val_fraction_holds_out_part_of_the_training_set(tiny_data):
    args = train.get_args_parser().parse_args(
        ["--data_dir", tiny_data, "--out_dir", "unused", "--val_fraction", "0.25", "--augment"])
    train_set, test_set, val_set = train.load_datasets(args, progress=False)
    full = MyCOCODataset(tiny_data, train=True)
    assert not set(train_set.files) & set(val_set.files)
    assert sorted(train_set.files + val_set.files) == full.files
    assert len(val_set) == round(0.25 * len(full))
    for part in (train_set, val_set):
        for i in (0, len(part) - 1):
            j = full.files.index(part.files[i])
            assert torch.equal(part.images[i], full.images[j])
            assert torch.equal(part.boxes[i], full.boxes[j]) and part.labels[i] == full.labels[j]
    assert test_set.files == MyCOCODataset(tiny_data, train=False).files


def test_a_last_batch_of_one_image_is_skipped_not_a_crash(tiny_data, tmp_path):
    # BatchNorm1d cannot train on one image; the report's loop would stop here.
    n = len(MyCOCODataset(tiny_data, train=True))
    history = train.main(args_for(tiny_data, str(tmp_path / "run"), "--epochs", "1",
                                  "--batch_size", str(n - 1), "--loss", "mse"))
    assert len(history["train"]["accuracy"]) == 1 and history["best_epoch"] == 1


def test_a_last_batch_of_under_half_a_batch_is_skipped(tiny_data, tmp_path, monkeypatch):
    assert [train.drops_small_last_batch(n, 16) for n in (610, 3789, 609, 608, 615, 616)] == [
        True, False, True, False, True, False]  # 2, 13, 1, 0, 7 (under 8), 8 (kept) left over
    assert train.drops_small_last_batch(3, 2) and not train.drops_small_last_batch(6, 4)  # 1 of 2; 2 of 4
    assert not train.drops_small_last_batch(7, 16) and train.drops_small_last_batch(17, 16)  # one batch is kept
    # The demo's case: a last batch of 2 images is not trained on.
    n = len(MyCOCODataset(tiny_data, train=True))
    sizes = []
    one_epoch = train.train_one_epoch

    def counting(model, data, *a, **kw):
        sizes.extend(len(b["label"]) for b in data)
        return one_epoch(model, data, *a, **kw)

    monkeypatch.setattr(train, "train_one_epoch", counting)
    train.main(args_for(tiny_data, str(tmp_path / "run"), "--epochs", "1",
                        "--batch_size", str(n - 2), "--loss", "mse", *SMALL))
    assert sizes == [n - 2]


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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = FAULTS_SCRIPT.format(root=root)
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


# ---------------------------------------------------------------------------------
# Batches from device memory
# ---------------------------------------------------------------------------------
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
# Checkpoint files
# ---------------------------------------------------------------------------------
def test_commit_best_finds_the_checkpoints_best_model(tmp_path):
    """A kill between writing the checkpoint and renaming its best model: resuming puts
    that best model in place. A .next file no checkpoint names (a later write that did
    not finish) is removed, and best_model.pt stays."""
    files = checkpoints.RunFiles(str(tmp_path))
    torch.save({"w": torch.zeros(1)}, files.best)
    torch.save({"w": torch.ones(1)}, files.best_next(3))
    files.commit_best({"best_model_next": os.path.basename(files.best_next(3))})
    assert torch.load(files.best)["w"].item() == 1.0 and sorted(os.listdir(tmp_path)) == ["best_model.pt"]
    torch.save({"w": torch.full((1,), 2.0)}, files.best_next(5))
    files.commit_best({"epoch": 4})
    assert torch.load(files.best)["w"].item() == 1.0 and sorted(os.listdir(tmp_path)) == ["best_model.pt"]


def test_background_writer_writes_in_order_and_reports_failures(tmp_path):
    files = checkpoints.RunFiles(str(tmp_path / "run"))
    os.makedirs(files.out_dir)
    writer = checkpoints.CheckpointWriter(files, background=True)
    writer.write(2, {"epoch": 2, "weights": torch.ones(3)}, best_state={"w": torch.ones(2)})
    done = writer.wait()
    assert [(d["epoch"], d["file"], d["background"]) for d in done] == [
        (2, "best_model.pt", True), (2, "checkpoint.pt", True)]
    assert sorted(os.listdir(files.out_dir)) == ["best_model.pt", "checkpoint.pt"]
    ckpt = torch.load(files.checkpoint)
    assert ckpt["best_model_next"] == "best_model.pt.next2" and torch.equal(ckpt["weights"], torch.ones(3))
    os.rename(files.out_dir, str(tmp_path / "gone"))  # the folder disappears under the run
    writer.write(3, {"epoch": 3})
    with pytest.raises(UserError, match="writing a checkpoint in .*run failed: .*does not exist"):
        writer.wait()


def test_gpu_options_set_and_leave_the_report_defaults():
    """TF32 on and off again through one API: every flag torch (and torch.compile) reads
    agrees afterwards, and reading none of them raises (the legacy and new APIs mixed do)."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        devices.set_gpu_options()
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (False, True)
        devices.set_gpu_options(cudnn_benchmark=True)
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        for tf32 in (True, False, True, False):
            devices.set_gpu_options(tf32=tf32)
            assert matmul.allow_tf32 is tf32 and cudnn.allow_tf32 is tf32
            assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
            if hasattr(matmul, "fp32_precision"):  # the newer API says the same
                assert (matmul.fp32_precision == "tf32") is tf32 and (cudnn.conv.fp32_precision == "tf32") is tf32
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved
        torch.backends.cudnn.allow_tf32 = True  # torch's default, for the tests after this one


def test_a_resume_with_other_settings_or_a_batch_of_one_is_refused(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    common = ["--loss", "mse", "--checkpoint_minutes", "0", *SMALL]
    train.main(args_for(tiny_data, out, "--epochs", "1", "--keep_checkpoint", *common))
    with pytest.raises(UserError, match=r"was written with --lr 0.001 \(now 0.01\); resume with the same"):
        train.main(args_for(tiny_data, out, "--epochs", "2", "--resume", "--lr", "0.01", *common))
    with pytest.raises(UserError, match="--batch_size 1.*BatchNorm needs at least 2"):
        train.main(args_for(tiny_data, str(tmp_path / "other"), "--batch_size", "1", *common))


def test_a_run_stopped_by_an_error_keeps_its_best_model_and_no_partial_file(tiny_data, tmp_path, monkeypatch):
    """No checkpoint is due (default minutes), so the best weights wait in memory: an error
    in epoch 2 must not lose epoch 1's. A .tmp a killed write left is removed on resume."""
    out = str(tmp_path / "run")
    one_epoch = train.train_one_epoch

    def fails_in_epoch_2(*a, **kw):
        if a[6] == 2:
            raise UserError("stopped in epoch 2")
        return one_epoch(*a, **kw)

    after_epoch_1 = {}

    def fails_in_epoch_2_and_keeps_epoch_1(*a, **kw):
        result = fails_in_epoch_2(*a, **kw)
        after_epoch_1.update({k: v.cpu().clone() for k, v in a[0].state_dict().items()})
        return result

    monkeypatch.setattr(train, "train_one_epoch", fails_in_epoch_2_and_keeps_epoch_1)
    with pytest.raises(UserError, match="stopped in epoch 2"):
        train.main(args_for(tiny_data, out, "--epochs", "3", "--loss", "mse", *SMALL))
    assert sorted(os.listdir(out)) == [".lock", "best_model.pt", "history.json"]
    saved = torch.load(os.path.join(out, "best_model.pt"), weights_only=True)
    assert all(torch.equal(saved[k], after_epoch_1[k]) for k in after_epoch_1)  # epoch 1's weights
    monkeypatch.setattr(train, "train_one_epoch", one_epoch)
    with open(os.path.join(out, "checkpoint.pt.tmp"), "wb") as f:
        f.write(b"half a checkpoint")
    history = train.main(args_for(tiny_data, out, "--epochs", "3", "--loss", "mse", "--resume", *SMALL))
    assert len(history["train"]["accuracy"]) == 3  # started again: no checkpoint was written
    assert sorted(os.listdir(out)) == [".lock", "best_model.pt", "history.json"]


# Epoch by epoch (accuracy, box loss). On the test split epoch 3 wins: epoch 2's accuracy
# is higher only below the rule's rounding to 3 decimals, epoch 4 ties epoch 3 (the
# earlier is kept). The validation split's best is epoch 5; the training split's is 1.
CANNED = {"test": [(0.80, 0.50), (0.9004, 0.40), (0.9001, 0.3999), (0.9003, 0.3999), (0.70, 0.45)],
          "val": [(0.60, 0.50), (0.70, 0.50), (0.65, 0.45), (0.70, 0.45), (0.90, 0.30)],
          "train": [(1.00, 0.00), (0.50, 0.50), (0.50, 0.50), (0.50, 0.50), (0.50, 0.50)]}


@pytest.mark.parametrize("val_fraction, best", [(None, 3), (0.25, 5)])
def test_the_report_rule_selects_the_best_epoch_and_best_model_pt_holds_its_weights(
        tiny_data, tmp_path, monkeypatch, val_fraction, best):
    extra = ["--val_fraction", str(val_fraction)] if val_fraction else []
    args = args_for(tiny_data, str(tmp_path / "run"), "--epochs", "5", "--loss", "mse", *SMALL, *extra)
    train_set, test_set, val_set = train.load_datasets(args, progress=False)
    weights = {}  # epoch -> the weights evaluated after it

    def canned(split, epoch, **real):
        accuracy, box_loss = CANNED[split][epoch - 1]
        return {**real, "accuracy": accuracy, "box_loss": box_loss}

    one_epoch = train.train_one_epoch

    def train_then_canned(*a, **kw):
        return canned("train", a[6], **one_epoch(*a, **kw))

    def evaluation(model, data, *a, **kw):
        split = "test" if data.dataset is test_set else "val"
        epoch = len(weights) + 1 if split == "test" else len(weights)
        if split == "test":
            weights[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        return None, canned(split, epoch, cross_entropy=1.0, mean_iou=0.5)

    monkeypatch.setattr(train, "train_one_epoch", train_then_canned)
    monkeypatch.setattr(train, "evaluation", evaluation)
    model = train.build_model(args)
    _, history = train.train(model, train_set, test_set, args.out_dir, args, torch.device("cpu"),
                             val_set, progress=False)
    split = "val" if val_fraction else "test"
    assert history["select_on"] == split and history["best_epoch"] == best
    accuracy, box_loss = CANNED[split][best - 1]
    assert history["best_score"] == round(accuracy, 3) + (1 - box_loss)
    saved = torch.load(os.path.join(args.out_dir, "best_model.pt"), weights_only=True)
    assert all(torch.equal(saved[k], weights[best][k]) for k in saved)
    others = [e for e in weights if e != best]
    assert all(any(not torch.equal(saved[k], weights[e][k]) for k in saved) for e in others)


def test_selection_score_is_the_reports():
    assert train.selection_score({"accuracy": 0.8886, "box_loss": 0.25}) == pytest.approx(0.889 + 0.75)
    assert train.selection_score({"accuracy": 0.9004, "box_loss": 0.4}) == train.selection_score(
        {"accuracy": 0.9001, "box_loss": 0.4})


def test_learning_rate_schedules():
    constant = train.LearningRate(1e-3, "constant", epochs=4, steps_per_epoch=10)
    assert [constant(s) for s in (0, 17, 39)] == [1e-3] * 3
    cosine = train.LearningRate(1e-3, "cosine", epochs=4, steps_per_epoch=10, warmup_epochs=1)
    rates = [cosine(s) for s in range(40)]
    assert rates[:10] == pytest.approx([1e-4 * (s + 1) for s in range(10)])  # linear warm-up
    assert rates[10] == pytest.approx(1e-3)  # the peak, then down along a half cosine
    assert all(a > b for a, b in zip(rates[10:], rates[11:]))
    assert rates[25] == pytest.approx(0.5e-3) and rates[39] < 1e-5
    assert train.LearningRate(1e-3, "cosine", 2, 10)(0) == pytest.approx(1e-3)  # no warm-up


def test_a_cosine_run_resumes_on_its_schedule_and_refuses_other_epochs(tiny_data, tmp_path, monkeypatch):
    common = ["--loss", "mse", "--lr_schedule", "cosine", "--warmup_epochs", "0.5",
              "--checkpoint_minutes", "0", *SMALL]
    full = train.main(args_for(tiny_data, str(tmp_path / "full"), "--epochs", "3", *common))
    out = str(tmp_path / "stopped")
    one_epoch = train.train_one_epoch
    seen = []

    def stops_in_epoch_3(*a, **kw):
        seen.append([a[7](i) for i in range(len(a[1]))])
        if a[6] == 3:
            raise UserError("stopped in epoch 3")
        return one_epoch(*a, **kw)

    monkeypatch.setattr(train, "train_one_epoch", stops_in_epoch_3)
    with pytest.raises(UserError, match="stopped in epoch 3"):
        train.main(args_for(tiny_data, out, "--epochs", "3", *common))
    monkeypatch.setattr(train, "train_one_epoch", one_epoch)
    with pytest.raises(UserError, match=r"--epochs 3 \(now 4; --lr_schedule cosine"):
        train.main(args_for(tiny_data, out, "--epochs", "4", "--resume", *common))
    resumed = train.main(args_for(tiny_data, out, "--epochs", "3", "--resume", *common))
    assert comparable(resumed) == comparable(full)
    assert seen[0][0] < seen[0][-1] and max(map(max, seen)) == pytest.approx(1e-3)


def test_options_that_cannot_train_are_refused_before_anything_is_written(tiny_data, tmp_path):
    for extra, message in ((["--epochs", "0"], "--epochs must be at least 1"),
                           (["--eval_batch_size", "0"], "--eval_batch_size must be at least 1"),
                           (["--lr_schedule", "cosine", "--warmup_epochs", "-1"], "--warmup_epochs must lie"),
                           (["--lr_schedule", "cosine", "--epochs", "2", "--warmup_epochs", "3"], "--warmup_epochs must lie"),
                           (["--warmup_epochs", "1"], "goes with --lr_schedule cosine")):
        out = str(tmp_path / "run")
        with pytest.raises(UserError, match=message):
            train.main(args_for(tiny_data, out, *SMALL, *extra))
        assert not os.path.exists(out)


def test_amp_where_autocast_is_missing_stops_with_one_line(tiny_data, tmp_path, monkeypatch):
    """As on a Mac with torch < 2.6, whose MPS autocast warns and stays off."""
    assert devices.autocast_problem("cpu") is None
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False)
    assert "disabled on cpu" in devices.autocast_problem("cpu")
    with pytest.raises(UserError, match="--amp: bfloat16 autocast is disabled on cpu"):
        train.main(args_for(tiny_data, str(tmp_path / "run"), "--amp", *SMALL, "--device", "cpu"))


def test_a_finished_run_is_not_reevaluated_under_other_settings(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    train.main(args_for(tiny_data, out, "--epochs", "1", "--loss", "mse", *SMALL))
    with pytest.raises(UserError, match=r"--raw_boxes False \(now True\)"):
        train.main(args_for(tiny_data, out, "--epochs", "1", "--loss", "mse", "--resume", "--raw_boxes", *SMALL))
    train.main(args_for(tiny_data, out, "--epochs", "1", "--loss", "mse", "--resume", *SMALL))


class SigtermAfterFirstBatch:
    """An epoch's batches, with a SIGTERM to this process after the first: mid-epoch."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            yield batch
            if i == 0:
                os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_mid_epoch_then_the_same_command_gives_the_uninterrupted_history(tiny_data, tmp_path,
                                                                                   monkeypatch, caplog):
    """A Slurm preemption: the epoch in progress ends, a checkpoint is written, the run stops
    with one line; the same command line (it started the run, in an empty folder) goes on
    and ends where the uninterrupted run ends. Only timings differ."""
    def command(out):
        return args_for(tiny_data, out, "--epochs", "4", "--resume", *SMALL)

    whole = train.main(command(str(tmp_path / "whole")))
    one_epoch = train.train_one_epoch

    def sigterm_in_epoch_2(model, batches, *a, **kw):
        return one_epoch(model, SigtermAfterFirstBatch(batches) if a[4] == 2 else batches, *a, **kw)

    monkeypatch.setattr(train, "train_one_epoch", sigterm_in_epoch_2)
    out = str(tmp_path / "run")
    handler = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.INFO):
        with pytest.raises(UserError, match="stopped by SIGTERM after epoch 2 of 4, with a checkpoint: the "
                                            "same command with --resume goes on"):
            train.main(command(out))
    assert "starting a new run in" in caplog.text and signal.getsignal(signal.SIGTERM) is handler
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["epoch"] == 2
    monkeypatch.setattr(train, "train_one_epoch", one_epoch)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = train.main(command(out))
    assert f"continuing the run in {out} after epoch 2" in caplog.text

    def without_timings(history):
        return {k: v for k, v in history.items() if k not in ("epoch_seconds", "save_seconds", "settings")}
    assert without_timings(resumed) == without_timings(whole) and resumed["finished"]


def test_a_run_folder_is_locked_while_a_process_writes_there(tiny_data, tmp_path):
    """A second process into a held folder stops with one line; the lock goes with the run's
    end, and with a process killed holding it."""
    from outputs import held_lock
    out = tmp_path / "run"
    out.mkdir()
    lock = str(out / ".lock")
    holder = subprocess.Popen([sys.executable, "-c", "import outputs, sys, time\n"
                               f"with outputs.held_lock({lock!r}):\n print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=f"{out} is in use by another process .it holds {lock}.; wait"):
            train.main(args_for(tiny_data, str(out), "--epochs", "1", *SMALL))
    finally:
        holder.kill()
        holder.wait()
    train.main(args_for(tiny_data, str(out), "--epochs", "1", *SMALL))  # the killed holder's lock went with it
    with held_lock(lock):  # and the run's with its end
        pass


def test_a_sigterm_in_a_runs_last_epoch_stops_the_processs_next_run(tiny_data, tmp_path, monkeypatch):
    """hw5_main's CIoU model finishes its last epoch under a preemption: the MSE model then
    does not start (the request is the process's), and a later run, once it is answered, does."""
    one_epoch = train.train_one_epoch
    monkeypatch.setattr(train, "train_one_epoch",
                        lambda model, batches, *a, **kw: one_epoch(model, SigtermAfterFirstBatch(batches), *a, **kw))
    first = train.main(args_for(tiny_data, str(tmp_path / "ciou"), "--epochs", "1", *SMALL))
    assert first["finished"] and len(first["epoch_seconds"]) == 1
    monkeypatch.setattr(train, "train_one_epoch", one_epoch)
    with pytest.raises(UserError, match=f"stopped by SIGTERM before training {tmp_path / 'mse'}: the same command"):
        train.main(args_for(tiny_data, str(tmp_path / "mse"), "--epochs", "1", "--loss", "mse", *SMALL))
    assert not os.path.exists(tmp_path / "mse" / "history.json")
    assert train.main(args_for(tiny_data, str(tmp_path / "mse"), "--epochs", "1", "--loss", "mse", *SMALL))["finished"]
