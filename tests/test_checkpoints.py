"""checkpoints.py: a run's files load onto the CPU and then wherever the parameters are,
resume with every random state (after a kill, the uninterrupted history), keep the best
model consistent through any kill, and are written in the background on CUDA."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import train
from cli import UserError
from tiny import ROOT, SMALL, TinyNet, train_args, without_timings

CPU = torch.device("cpu")


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


def run_cli(data_dir, out_dir, *extra):
    # The CPU, since the kill is timed from an epoch's length; a small HW5Net, since what
    # is tested is where training stops and starts again, not the network.
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data_dir", data_dir, "--out_dir",
           out_dir, "--batch_size", "4", "--epochs", "3", "--device", "cpu", "--quiet",
           "--checkpoint_minutes", "0", *SMALL, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
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
        expected = without_timings(json.load(f))
    with open(os.path.join(killed, "history.json")) as f:
        got = without_timings(json.load(f))
    assert len(got["train"]["accuracy"]) == 3
    assert got == expected


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


def test_the_writer_writes_in_the_background_in_order_and_reports_failures(tmp_path):
    files = checkpoints.RunFiles(str(tmp_path / "run"))
    os.makedirs(files.out_dir)
    with checkpoints.CheckpointWriter(files, background=True) as writer:
        writer.keep_best(torch.nn.Linear(2, 1))
        writer.checkpoint(2, {"epoch": 2, "weights": torch.ones(3)})
        done = writer.wait()
        assert [(d["epoch"], d["file"], d["background"]) for d in done] == [
            (2, "best_model.pt", True), (2, "checkpoint.pt", True)]
        assert sorted(os.listdir(files.out_dir)) == ["best_model.pt", "checkpoint.pt"]
        ckpt = torch.load(files.checkpoint)
        assert ckpt["best_model_next"] == "best_model.pt.next2" and torch.equal(ckpt["weights"], torch.ones(3))
        os.rename(files.out_dir, str(tmp_path / "gone"))  # the folder disappears under the run
        writer.checkpoint(3, {"epoch": 3})
        with pytest.raises(UserError, match="writing a checkpoint in .*run failed: .*does not exist"):
            writer.wait()


def test_an_error_keeps_the_best_weights_waiting_in_memory(tmp_path):
    files = checkpoints.RunFiles(str(tmp_path))
    model = torch.nn.Linear(2, 1)
    with pytest.raises(RuntimeError, match="in epoch 2"):
        with checkpoints.CheckpointWriter(files, background=False) as writer:
            writer.keep_best(model)
            with torch.no_grad():
                model.weight.add_(1)  # training goes on: the kept copy does not change
            raise RuntimeError("in epoch 2")
    saved = torch.load(files.best, weights_only=True)
    assert torch.equal(saved["weight"] + 1, model.weight.detach())


def test_the_best_weights_are_kept_on_the_models_device_not_copied_to_the_host(tiny_data, tmp_path, monkeypatch):
    """A meta-device model stands in for a GPU's: its copy stays there (a host copy of a meta
    tensor fails). In training, an improving epoch makes no host copy; the writer makes one
    as it writes best_model.pt, with host tensors, so a plain torch.load works anywhere."""
    kept = checkpoints.best_weights(torch.nn.Linear(3, 2, device="meta"))
    assert {v.device.type for v in kept.values()} == {"meta"}
    copies = []
    monkeypatch.setattr(checkpoints, "host_copy", lambda obj: copies.append(obj) or obj)
    args = train.get_args_parser().parse_args(["--data_dir", tiny_data, "--out_dir", str(tmp_path / "run"),
                                               "--epochs", "2", "--batch_size", "4", "--quiet", *SMALL,
                                               "--device", "cpu"])
    history = train.main(args)
    assert history["best_epoch"] in (1, 2) and len(copies) == 1  # best_model.pt, once, at the end
    saved = torch.load(os.path.join(args.out_dir, "best_model.pt"), weights_only=True)
    assert {v.device.type for v in saved.values()} == {"cpu"}


def test_resume_errors(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out, exist_ok=True)
    settings = train.run_settings(train_args(tiny_data, out, "--resume"), torch.device("cpu"))
    torch.save({"model": {"foo": torch.zeros(1)}, "optimizer": {}, "epoch": 1, "history": {},
                "rng": {}, "settings": settings}, os.path.join(out, "checkpoint.pt"))
    with pytest.raises(UserError, match="different architecture"):
        train.main(train_args(tiny_data, out, "--resume"))
    with open(os.path.join(out, "checkpoint.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        train.main(train_args(tiny_data, out, "--resume"))
    os.remove(os.path.join(out, "checkpoint.pt"))
    with open(os.path.join(out, "history.json"), "w") as f:
        f.write('{"train": ')  # cut short
    with pytest.raises(UserError, match="history.json is missing or unreadable"):
        train.main(train_args(tiny_data, out, "--resume"))


@pytest.mark.slow
def test_a_finished_run_kept_with_its_checkpoint_trains_further_exactly(tiny_data, tmp_path):
    """--keep_checkpoint, then --resume with a larger --epochs, with --augment: the batch
    order and the flips of the later epochs are those of an uninterrupted run."""
    common = ["--augment", "--loss", "mse", *SMALL]
    full = train.main(train_args(tiny_data, str(tmp_path / "full"), "--epochs", "3", *common))
    part = str(tmp_path / "part")
    train.main(train_args(tiny_data, part, "--epochs", "1", "--keep_checkpoint", *common))
    resumed = train.main(train_args(tiny_data, part, "--epochs", "3", "--resume", *common))
    assert len(resumed["train"]["accuracy"]) == 3
    assert without_timings(resumed) == without_timings(full)
    assert not os.path.exists(os.path.join(part, "checkpoint.pt"))  # finished, not kept this time


def test_a_resume_with_other_settings_or_a_batch_of_one_is_refused(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    common = ["--loss", "mse", "--checkpoint_minutes", "0", *SMALL]
    train.main(train_args(tiny_data, out, "--epochs", "1", "--keep_checkpoint", *common))
    with pytest.raises(UserError, match=r"was written with --lr 0.001 \(now 0.01\); resume with the same"):
        train.main(train_args(tiny_data, out, "--epochs", "2", "--resume", "--lr", "0.01", *common))
    with pytest.raises(UserError, match="--batch_size 1.*BatchNorm needs at least 2"):
        train.main(train_args(tiny_data, str(tmp_path / "other"), "--batch_size", "1", *common))


@pytest.mark.slow
def test_a_cosine_run_resumes_on_its_schedule_and_refuses_other_epochs(tiny_data, tmp_path, monkeypatch):
    common = ["--loss", "mse", "--lr_schedule", "cosine", "--warmup_epochs", "0.5",
              "--checkpoint_minutes", "0", *SMALL]
    full = train.main(train_args(tiny_data, str(tmp_path / "full"), "--epochs", "3", *common))
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
        train.main(train_args(tiny_data, out, "--epochs", "3", *common))
    monkeypatch.setattr(train, "train_one_epoch", one_epoch)
    with pytest.raises(UserError, match=r"--epochs 3 \(now 4; --lr_schedule cosine"):
        train.main(train_args(tiny_data, out, "--epochs", "4", "--resume", *common))
    resumed = train.main(train_args(tiny_data, out, "--epochs", "3", "--resume", *common))
    assert without_timings(resumed) == without_timings(full)
    assert seen[0][0] < seen[0][-1] and max(map(max, seen)) == pytest.approx(1e-3)


def test_a_finished_run_is_not_reevaluated_under_other_settings(tiny_data, tmp_path):
    out = str(tmp_path / "run")
    train.main(train_args(tiny_data, out, "--epochs", "1", "--loss", "mse", *SMALL))
    with pytest.raises(UserError, match=r"--raw_boxes False \(now True\)"):
        train.main(train_args(tiny_data, out, "--epochs", "1", "--loss", "mse", "--resume", "--raw_boxes", *SMALL))
    train.main(train_args(tiny_data, out, "--epochs", "1", "--loss", "mse", "--resume", *SMALL))
