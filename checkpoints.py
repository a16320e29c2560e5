"""A training run's files in OUT (checkpoint.pt, best_model.pt, history.json): saving and
loading them on any device, every random-number state, the background writer, and the
checks that a resumed run is the run that was started."""
import contextlib
import copy
import logging
import os
import random
import threading
import time

import numpy as np
import torch

from cli import UserError
from outputs import atomic_write, read_json

log = logging.getLogger("checkpoints")

# The settings that decide a run's course: a resumed run must have the same (a new training
# option that changes the course belongs here too).
TRAJECTORY = ("loss", "lr", "beta1", "beta2", "batch_size", "seed", "augment", "raw_boxes",
              "single_backward", "val_fraction", "width", "n_blocks", "learnable_res", "amp",
              "lr_schedule", "warmup_epochs")
# How an optimizer runs, not what it has learnt: a checkpoint written with fused Adam on
# one device resumes on a device without it.
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path):
    """A checkpoint's (or best_model.pt's) contents with every tensor on the CPU, whatever
    device wrote it: the RNG states must be CPU tensors, and load_state_dict moves weights
    and Adam's moments to their parameters' device."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except Exception as e:  # a truncated or foreign file: say which, not where in torch
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None


def load_model_state(model, state, path):
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"{path} holds weights of a different architecture than {type(model).__name__} "
                        f"with these settings (width, n_blocks, learnable_res must match the run "
                        f"that wrote it)") from None


def host_copy(obj):
    """obj (dicts, lists, tuples of tensors and plain values) with every tensor copied to
    host memory: a snapshot that training does not change (a sync point on CUDA)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return copy.deepcopy(obj)


def best_weights(model):
    """A copy of model's weights in its own device's memory, which training does not change:
    the best epoch's, kept without a blocking copy to the host until they are written."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _device_rng(device):
    """(get_state, set_state) of the training device's own generator; None on the CPU."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return (lambda: torch.cuda.get_rng_state(index)), (lambda s: torch.cuda.set_rng_state(s, index))
    if device.type == "mps":
        return torch.mps.get_rng_state, torch.mps.set_rng_state
    return None


def rng_state(generator, device):
    """Every generator a run draws from, as CPU tensors and plain values: torch's, the
    batch generator's, Python's, numpy's and the device's own (key "cuda" or "mps")."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "loader": generator.get_state(),
             "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if own := _device_rng(device):
        state[device.type] = own[0]().cpu()
    return state


def set_rng_state(state, generator, device):
    """Restore rng_state(); the device's own generator when the same kind of device wrote it."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    s = state["numpy"]
    np.random.set_state(("MT19937", s["key"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                         s["cached_gaussian"]))
    if (own := _device_rng(device)) and device.type in state:
        own[1](state[device.type])


def checkpoint_state(model, optimizer, epoch, history, generator, device, settings):
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "history": history, "rng": rng_state(generator, device), "settings": settings}


def restore(ckpt, path, model, optimizer, generator, device):
    """A checkpoint loaded onto the CPU back into the model, Adam and every generator."""
    load_model_state(model, ckpt["model"], path)
    groups = [{**saved, **{k: current[k] for k in IMPLEMENTATION_FLAGS if k in current}}
              for saved, current in zip(ckpt["optimizer"]["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**ckpt["optimizer"], "param_groups": groups})
    set_rng_state(ckpt["rng"], generator, device)


def check_same_settings(saved, settings, path):
    """Refuse to go on with a run (saved: its settings) under other TRAJECTORY settings."""
    changed = [f"--{k} {saved[k]} (now {settings[k]})" for k in TRAJECTORY if saved[k] != settings[k]]
    if saved["lr_schedule"] != "constant" and saved["epochs"] != settings["epochs"]:
        changed.append(f"--epochs {saved['epochs']} (now {settings['epochs']}; --lr_schedule "
                       f"{saved['lr_schedule']} decays over the run's epochs)")
    if changed:
        raise UserError(f"{path} was written with " + ", ".join(changed) + "; resume with the same "
                        "settings, or start a new run in another --out_dir")


class RunFiles:
    """The files of one training run in OUT, and what they say about it."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.checkpoint = os.path.join(out_dir, "checkpoint.pt")
        self.best = os.path.join(out_dir, "best_model.pt")
        self.history = os.path.join(out_dir, "history.json")

    def best_next(self, epoch):
        """Where a checkpoint's best model waits until the checkpoint is on disk."""
        return f"{self.best}.next{epoch}"

    def holds_a_run(self):
        return os.path.exists(self.checkpoint) or os.path.exists(self.history)

    def read_history(self):
        return read_json(self.history, "the history.json a training run writes")

    def remove_partial_writes(self):
        """Temporary files a killed run left (a checkpoint's is 2.5 GB), and a best model
        waiting for a checkpoint that was never written."""
        no_checkpoint = not os.path.exists(self.checkpoint)
        for name in os.listdir(self.out_dir):
            if name.endswith(".tmp") or (no_checkpoint and name.startswith("best_model.pt.next")):
                os.remove(os.path.join(self.out_dir, name))

    def commit_best(self, ckpt):
        """After a resume: the checkpoint's best model, if it still waited under its .next
        name, takes best_model.pt's place; a later one, of an unwritten checkpoint, goes."""
        mine = ckpt.get("best_model_next")
        if mine and os.path.exists(os.path.join(self.out_dir, mine)):
            os.replace(os.path.join(self.out_dir, mine), self.best)
        prefix = os.path.basename(self.best) + ".next"
        for name in os.listdir(self.out_dir):
            if name.startswith(prefix):
                os.remove(os.path.join(self.out_dir, name))

    def finished(self, epochs, settings, model):
        """--resume of a run whose last epoch is done: (model with its best weights, history)
        with nothing trained or written; None when the run has not finished, or when a kept
        checkpoint trains it further."""
        if not os.path.exists(self.history) or not (history := self.read_history())["finished"]:
            return None
        done = len(history["epoch_seconds"])
        if epochs > done:
            if os.path.exists(self.checkpoint):
                return None
            raise UserError(f"{self.out_dir} finished its {done} epochs and its checkpoint.pt was "
                            f"removed (kept only with --keep_checkpoint): it cannot train to --epochs "
                            f"{epochs}; start a new run with --keep_checkpoint, or leave --epochs at {done}")
        check_same_settings(history["settings"], {**settings, "epochs": history["settings"]["epochs"]},
                            self.history)
        if os.path.exists(self.checkpoint) and not settings["keep_checkpoint"]:
            os.remove(self.checkpoint)  # left by a run killed between its last two writes
        log.info("%s has finished its %d epochs: nothing to train", self.out_dir, done)
        load_model_state(model, load_checkpoint(self.best), self.best)
        return model, history

    def start_or_resume(self, history, settings, model, optimizer, generator, device):
        """(history, first epoch): a new run's, or with checkpoint.pt every state restored and
        the epochs after it to train."""
        if not os.path.exists(self.checkpoint):
            log.info("%s in %s", "starting again from epoch 1 (no checkpoint yet)" if self.holds_a_run()
                     else "starting a new run", self.out_dir)
            return {**history, "settings": settings, "finished": False}, 1
        ckpt = load_checkpoint(self.checkpoint)
        check_same_settings(ckpt["settings"], settings, self.checkpoint)
        if ckpt["epoch"] > settings["epochs"]:
            raise UserError(f"{self.checkpoint} is at epoch {ckpt['epoch']}, past --epochs {settings['epochs']}")
        restore(ckpt, self.checkpoint, model, optimizer, generator, device)
        self.commit_best(ckpt)
        history = ckpt["history"]
        if os.path.exists(self.history):  # it also lists the checkpoint's own write
            history["save_seconds"] = self.read_history()["save_seconds"]
        log.info("continuing the run in %s after epoch %d", self.out_dir, ckpt["epoch"])
        return {**history, "settings": settings, "finished": False}, ckpt["epoch"] + 1


class CheckpointWriter:
    """Writes checkpoints, each with the best model found since the last, and the best model
    at the end, under temporary names, timing every file. The best epoch's weights wait in
    the device's memory until then. With background (CUDA) a host snapshot is written while
    training goes on; on the CPU a writing thread would compete with training for the
    cores, so writes are synchronous. Leaving the `with` on an error keeps the best weights.

    Order on disk: the best model under a .next name, the checkpoint (which names it),
    then the rename to best_model.pt; a kill between two leaves a consistent run."""

    def __init__(self, files, background):
        self.files, self.background = files, background
        self.thread, self.error, self.done, self.best = None, None, [], None
        self.last_write = time.perf_counter()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None and (self.best is not None or self.thread is not None):
            with contextlib.suppress(Exception):  # an error or Ctrl-C: keep the best weights so far
                self.wait()
                if self.best is not None:
                    save(host_copy(self.best), self.files.best)

    def keep_best(self, model):
        self.best = best_weights(model)

    def due(self, minutes):
        return time.perf_counter() - self.last_write >= 60 * minutes

    def checkpoint(self, epoch, state):
        """Write state (and the best model waiting) as the checkpoint of epoch."""
        self.wait()
        best, self.best = self.best, None
        if best is not None:
            state["best_model_next"] = os.path.basename(self.files.best_next(epoch))
        if self.background:
            self.thread = threading.Thread(target=self._write, args=(epoch, host_copy(state), best),
                                           name="checkpoint-writer")
            self.thread.start()
        else:
            self._write(epoch, state, best)
            self._raise()
        self.last_write = time.perf_counter()

    def close(self, epoch):
        """The run's end: the best model waiting, straight to best_model.pt; returns the
        timings of the writes not yet returned, once all have finished."""
        done = self.wait()
        if self.best is not None:
            self._timed(epoch, host_copy(self.best), self.files.best)
            self.best = None
        return done + self.wait()

    def wait(self):
        """Wait for a write in progress; returns (and forgets) the finished writes' timings."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self._raise()
        done, self.done = self.done, []
        return done

    def _raise(self):
        if self.error is not None:
            error, self.error = self.error, None
            raise UserError(f"writing a checkpoint in {self.files.out_dir} failed: {error}")

    def _timed(self, epoch, obj, path):
        t0 = time.perf_counter()
        save(obj, path)
        self.done.append({"epoch": epoch, "file": os.path.basename(path).split(".next")[0],
                          "seconds": round(time.perf_counter() - t0, 3),
                          "background": self.background and threading.current_thread() is self.thread})

    def _write(self, epoch, checkpoint, best):
        try:
            if best is not None:
                self._timed(epoch, host_copy(best), self.files.best_next(epoch))
            self._timed(epoch, checkpoint, self.files.checkpoint)
            if best is not None:
                os.replace(self.files.best_next(epoch), self.files.best)
        except Exception as e:  # a full disk, a lost mount: raised in the training thread
            self.error = f"{type(e).__name__}: {e}"
