"""train.py on a tiny synthetic set: what a run writes, the loop's gradients and learning,
the report's selection rule, the schedules, the options it refuses, and SIGTERM's stop."""
import json
import logging
import os
import signal

import pytest
import torch

import cli
import devices
import train
from cli import UserError
from Dataset import MyCOCODataset, load_splits
from network import HW5Net
from tiny import DEVICE, SMALL, train_args, without_timings

args_for = train_args


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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_val_fraction_holds_out_part_of_the_training_set(tiny_data):
    args = train.get_args_parser().parse_args(
        ["--data_dir", tiny_data, "--out_dir", "unused", "--val_fraction", "0.25", "--augment"])
    train_set, test_set, val_set = load_splits(args.data_dir, args.val_fraction)
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




@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("val_fraction, best", [(None, 3), (0.25, 5)])
def test_the_report_rule_selects_the_best_epoch_and_best_model_pt_holds_its_weights(
        tiny_data, tmp_path, monkeypatch, val_fraction, best):
    extra = ["--val_fraction", str(val_fraction)] if val_fraction else []
    args = args_for(tiny_data, str(tmp_path / "run"), "--epochs", "5", "--loss", "mse", *SMALL, *extra)
    train_set, test_set, val_set = load_splits(args.data_dir, args.val_fraction)
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


def test_options_that_cannot_train_are_refused_before_anything_is_written(tiny_data, tmp_path):
    for extra, message in ((["--epochs", "0"], "--epochs must be at least 1"),
                           (["--eval_batch_size", "0"], "--eval_batch_size must be at least 1"),
                           (["--lr_schedule", "cosine", "--warmup_epochs", "-1"], "--warmup_epochs must lie"),
                           (["--lr_schedule", "cosine", "--epochs", "2", "--warmup_epochs", "3"], "--warmup_epochs must lie"),
                           (["--warmup_epochs", "1"], "goes with --lr_schedule cosine"),
                           (["--tf32", "--strict_fp32"], "--tf32 and --strict_fp32 contradict each other")):
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


def sigterm_in_epoch(epoch, monkeypatch):
    one_epoch = train.train_one_epoch

    def with_sigterm(model, batches, *a, **kw):
        return one_epoch(model, SigtermAfterFirstBatch(batches) if a[4] == epoch else batches, *a, **kw)
    monkeypatch.setattr(train, "train_one_epoch", with_sigterm)


def stopped(args, caplog):
    """train.py's command on args: its exit status and log."""
    caplog.clear()
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stop:
        cli.command(lambda: train.main(args), logging.getLogger("test"), stops_on_sigterm=True)
    return stop.value.code, caplog.text


@pytest.mark.slow
def test_sigterm_mid_epoch_then_the_same_command_gives_the_uninterrupted_history(tiny_data, tmp_path,
                                                                                   monkeypatch, caplog):
    """A Slurm preemption: the epoch in progress ends, a checkpoint is written (and its
    seconds recorded), the run stops with one line and status 75; the same command line (it
    started the run, in an empty folder) goes on and ends where the uninterrupted run ends."""
    def command(out):
        return args_for(tiny_data, out, "--epochs", "4", "--resume", *SMALL)

    whole = train.main(command(str(tmp_path / "whole")))
    out = str(tmp_path / "run")
    sigterm_in_epoch(2, monkeypatch)
    status, text = stopped(command(out), caplog)
    assert status == 75 and "starting a new run in" in text
    assert (f"stopped by SIGTERM after epoch 2 of 4 in {out}, with a checkpoint: the same command with --resume "
            f"goes on") in text
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["epoch"] == 2
    monkeypatch.undo()
    with caplog.at_level(logging.INFO):
        resumed = train.main(command(out))
    assert f"continuing the run in {out} after epoch 2" in caplog.text
    assert without_timings(resumed) == without_timings(whole) and resumed["finished"]
    assert (2, "checkpoint.pt") in [(w["epoch"], w["file"]) for w in resumed["save_seconds"]]


def test_a_sigterm_in_the_last_epoch_lets_the_run_finish_then_stops(tiny_data, tmp_path, monkeypatch, caplog):
    """No checkpoint is promised for the last epoch: the run finishes (history, best model),
    then the command stops with status 75, and the same command finds it finished."""
    args = args_for(tiny_data, str(tmp_path / "run"), "--epochs", "2", "--resume", *SMALL)
    sigterm_in_epoch(2, monkeypatch)
    status, text = stopped(args, caplog)
    assert status == 75 and "stopped by SIGTERM at the end of the run, with everything written" in text
    assert "with a checkpoint" not in text and sorted(os.listdir(args.out_dir)) == [".lock", "best_model.pt",
                                                                                    "history.json"]
    monkeypatch.undo()
    with caplog.at_level(logging.INFO):
        assert train.main(args)["finished"]
    assert "has finished its 2 epochs: nothing to train" in caplog.text
