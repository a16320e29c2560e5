"""train.py on a tiny synthetic set: outputs, gradients, learning, resume after a kill."""
import json
import os
import platform
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import train
from Dataset import MyCOCODataset, build_dataset
from network import HW5Net
from train import TrainingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """About 14 train and 6 test images."""
    from synthetic_coco import make_synthetic_coco
    root = tmp_path_factory.mktemp("tiny")
    make_synthetic_coco(str(root / "coco"), n_train=16, n_val=8, seed=1)
    build_dataset(str(root / "coco"), str(root / "data"), workers=1, progress=False, figure=False)
    return str(root / "data")


def args_for(data_dir, out_dir, *extra):
    return train.get_args_parser().parse_args(
        ["--data_dir", data_dir, "--out_dir", out_dir, "--batch_size", "4", "--quiet", *extra])


def test_one_epoch_writes_history_checkpoint_and_best_model(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    history = train.main(args_for(tiny_data, out, "--epochs", "1", "--loss", "mse"))
    with open(os.path.join(out, "history.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(history))
    for split in ("train", "test"):
        for metric in train.METRICS:
            assert len(saved[split][metric]) == 1
    assert saved["best_epoch"] == 1 and saved["loss"] == "MSE" and saved["select_on"] == "test"
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["loss"] == "mse"
    model = HW5Net()
    model.load_state_dict(torch.load(os.path.join(out, "best_model.pt"), weights_only=True))
    with pytest.raises(TrainingError, match="already holds a run"):
        train.main(args_for(tiny_data, out, "--epochs", "1"))


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
    args = train.get_args_parser(add_help=False).parse_args([])
    opt = train.make_optimizer(model, args, torch.device("cpu"))
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


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 7)

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out[:, :3], out[:, 3:]


def test_non_finite_loss_stops_with_a_message():
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters())
    batch = {"image": torch.rand(2, 3, 4, 4), "label": torch.tensor([0, 1]), "bbox": torch.rand(2, 4)}
    nan_loss = lambda pred, target: (pred * float("nan")).mean()  # noqa: E731
    with pytest.raises(TrainingError, match="non-finite loss in epoch 3"):
        train.train_one_epoch(model, [batch], opt, nn.CrossEntropyLoss(), nan_loss,
                              torch.device("cpu"), 3, progress=False)


def test_resume_errors(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(TrainingError, match="no checkpoint at .*checkpoint.pt"):
        train.main(args_for(tiny_data, out, "--resume"))
    os.makedirs(out, exist_ok=True)
    torch.save({"model": {"foo": torch.zeros(1)}, "optimizer": {}, "epoch": 1, "history": {},
                "rng": {}}, os.path.join(out, "checkpoint.pt"))
    with pytest.raises(TrainingError, match="different architecture"):
        train.main(args_for(tiny_data, out, "--resume"))
    with open(os.path.join(out, "checkpoint.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(TrainingError, match="not a readable checkpoint"):
        train.main(args_for(tiny_data, out, "--resume"))


def run_cli(data_dir, out_dir, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data_dir", data_dir, "--out_dir",
           out_dir, "--batch_size", "4", "--epochs", "3", "--quiet", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def comparable(history):
    return {k: v for k, v in history.items() if k != "epoch_seconds"}


def test_resume_after_kill_reproduces_the_uninterrupted_history(tiny_data, tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    proc = run_cli(tiny_data, full)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()
    # Second run: SIGKILL shortly after the epoch-1 checkpoint lands, inside epoch 2.
    proc = run_cli(tiny_data, killed)
    ckpt = os.path.join(killed, "checkpoint.pt")
    deadline = time.time() + 300
    while not os.path.exists(ckpt) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    with open(os.path.join(killed, "history.json")) as f:
        assert len(json.load(f)["train"]["accuracy"]) == 1, "the kill should land in epoch 2"
    proc = run_cli(tiny_data, killed, "--resume")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    assert "resumed from" in output
    with open(os.path.join(full, "history.json")) as f:
        expected = comparable(json.load(f))
    with open(os.path.join(killed, "history.json")) as f:
        got = comparable(json.load(f))
    assert len(got["train"]["accuracy"]) == 3
    assert got == expected


def test_val_fraction_holds_out_part_of_the_training_set(tiny_data):
    args = train.get_args_parser().parse_args(
        ["--data_dir", tiny_data, "--out_dir", "unused", "--val_fraction", "0.25", "--augment"])
    train_set, test_set, val_set = train.load_datasets(args, progress=False)
    full = MyCOCODataset(tiny_data, train=True)
    assert not set(train_set.files) & set(val_set.files)
    assert sorted(train_set.files + val_set.files) == full.files
    assert len(val_set) == round(0.25 * len(full))
    assert train_set.augment and not val_set.augment and val_set._flip is None
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


def test_subset_of_every_file_shares_the_cache_and_drops_the_flip(tiny_data):
    # hw5_main evaluates the training split without augmentation through this.
    full = MyCOCODataset(tiny_data, train=True, augment=True)
    plain = full.subset(full.files, augment=False)
    assert plain.images.data_ptr() == full.images.data_ptr()  # no copy of the images
    assert plain.files == full.files and not plain.augment and plain._flip is None
    assert full.augment and full._flip is not None  # the original keeps its flip


FAULTS_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import train
applied = train.reuse_freed_memory() if sys.argv[1] == "reuse" else None
torch.ones(16 * 2 ** 20).sum()  # first touch: faults either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(16 * 2 ** 20).sum()  # 64 MB, allocated, touched, freed
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

kept = rss()
train.release_freed_memory()
print(applied, faults, kept - rss())
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
        faults[mode], released[mode] = int(out[-2]), int(out[-1])
        if mode == "reuse":
            assert out[0] == "True"
    pages = 5 * 64 * 2 ** 20 // os.sysconf("SC_PAGE_SIZE")
    assert faults["default"] > 0.8 * pages  # glibc maps each block anew
    assert faults["reuse"] < pages / 4  # at most one of the five blocks faults in again
    assert released["default"] < 16 * 2 ** 20  # nothing of that size was kept
    assert released["reuse"] > 48 * 2 ** 20  # the kept 64 MB block goes back
