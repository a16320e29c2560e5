"""Train one HW5Net: cross-entropy for the class plus CIoU or MSE for the box (report 3.4).

    python train.py --data_dir DATA --out_dir runs/ciou --loss ciou
    python train.py --data_dir DATA --out_dir runs/ciou --loss ciou --resume   # after an interruption

Defaults are the report's: Adam (lr 1e-3, betas 0.9/0.99), batch 16, 30 epochs, seed 0,
two backward calls (the first with retain_graph=True), and after every epoch the best
model kept by round(test accuracy, 3) + (1 - test box loss). OUT receives history.json,
best_model.pt and, while the run trains, checkpoint.pt (docs/runs.md).
"""
import argparse
import contextlib
import logging
import math
import os
import random
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from checkpoints import (CheckpointWriter, RunFiles, StopOnSigterm, best_weights, check_same_settings,
                         checkpoint_state, host_copy, load_checkpoint, restore, save)
from Dataset import MyCOCODataset
from devices import (DEVICE_HELP, DeviceBatches, NonFiniteGuard, accumulator_dtype, autocast, autocast_problem,
                     pick_device, release_freed_memory, reuse_freed_memory, set_gpu_options)
from files import HelpFormatter, UserError, command, held_lock, out_dir_problem, write_json
from network import ARCHITECTURE, HW5Net
from utils import CompleteIOULoss, box_iou_per_image, evaluation, order_boxes

log = logging.getLogger("train")

METRICS = ("cross_entropy", "box_loss", "accuracy", "mean_iou")
CHECK_EVERY = 20  # steps between the host's reads of the device: the skip check and the bar


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --loss: (box criterion, name); train_one_epoch and evaluation order the boxes first.
BOX_LOSSES = {"ciou": (CompleteIOULoss("mean", order=False), "CIoU"), "mse": (nn.MSELoss(), "MSE")}


def make_criteria(loss):
    """(class criterion, box criterion, loss name)."""
    return nn.CrossEntropyLoss(), *BOX_LOSSES[loss]


def make_optimizer(model, lr, betas):
    """The report's Adam, fused (one multi-tensor kernel) where the device has it."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):  # a device without the fused kernel
        return torch.optim.Adam(model.parameters(), lr=lr, betas=betas)


def drops_small_last_batch(n_images, batch_size):
    """Whether the epoch's last, partial batch is skipped: one image (BatchNorm cannot train
    on it) or under half a batch, whose BatchNorm1d gradients swing the run (docs/demo.md).
    A training set smaller than a batch is one batch, kept."""
    remainder = n_images % batch_size
    return remainder == 1 or (n_images > batch_size and 0 < 2 * remainder < batch_size)


class LearningRate:
    """The rate of each step: "constant" is the report's --lr; "cosine" rises linearly from
    0 over warmup_epochs, then falls along a half cosine to 0 at the last step. A function
    of the step alone, so a resumed run follows the same schedule."""

    def __init__(self, base_lr, schedule, epochs, steps_per_epoch, warmup_epochs=0.0):
        self.base_lr, self.schedule = base_lr, schedule
        self.total = epochs * steps_per_epoch
        self.warmup = round(warmup_epochs * steps_per_epoch) if schedule == "cosine" else 0

    def __call__(self, step):
        if self.schedule == "constant":
            return self.base_lr
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.base_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def check_training_args(args, device, n_train=None):
    """Options that cannot train (and a training set too small to), refused in one line
    before anything is written."""
    if args.batch_size < 2 or (n_train is not None and n_train < 2):
        images = f" with {n_train} training images" if n_train is not None else ""
        raise UserError(f"--batch_size {args.batch_size}{images}: BatchNorm needs at least 2 "
                        f"images a batch")
    for option in ("epochs", "eval_batch_size"):
        if getattr(args, option) < 1:
            raise UserError(f"--{option} must be at least 1, not {getattr(args, option)}")
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise UserError(f"--warmup_epochs must lie between 0 and --epochs ({args.epochs}), not "
                        f"{args.warmup_epochs}")
    if args.warmup_epochs and args.lr_schedule == "constant":
        raise UserError("--warmup_epochs goes with --lr_schedule cosine (the constant schedule has "
                        "no warm-up)")
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val_fraction must lie in [0, 1), not {args.val_fraction}")
    if args.amp and (problem := autocast_problem(device)):
        raise UserError(f"--amp: {problem}; run without --amp")


def train_one_epoch(model, batches, optimizer, criterion_cls, criterion_box, device, epoch, lr=None,
                    order=True, single_backward=False, amp=False, progress=True):
    """One pass over batches; lr (a LearningRate) sets each step's rate. Returns the running
    means over images (train mode, as the report logged them) and skipped_steps (steps with
    a non-finite loss or gradient: they changed nothing and are left out of the means). The
    host reads the device every CHECK_EVERY steps only (each step where Adam is not fused)."""
    model.train()
    guard = NonFiniteGuard(optimizer, device)
    acc = accumulator_dtype(device)
    sums = torch.zeros(5, device=device, dtype=acc)  # ce, box, correct, IoU (summed over images), images
    skipped = torch.zeros((), device=device)
    streak = torch.zeros((), device=device)  # skipped steps in a row
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not progress)
    for step, batch in enumerate(bar):
        images, labels, boxes = (batch[k].to(device, non_blocking=True) for k in ("image", "label", "bbox"))
        optimizer.zero_grad(set_to_none=True)
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr((epoch - 1) * len(batches) + step)
        with autocast(device, amp):
            logits, raw = model(images)
        logits, raw = logits.float(), raw.float()
        pred_box = order_boxes(raw) if order else raw
        ce = criterion_cls(logits, labels)
        box_loss = criterion_box(pred_box, boxes)
        if single_backward:
            (ce + box_loss).backward()  # the same gradients, one pass back through the trunk
        else:
            ce.backward(retain_graph=True)  # report Fig. 12
            box_loss.backward()
        found = guard.check(ce.detach() + box_loss.detach())
        guard.step()
        bs = labels.shape[0]
        with torch.no_grad():
            batch_sums = torch.cat([torch.stack([ce, box_loss]).to(acc) * bs,
                                    (logits.argmax(1) == labels).sum().to(acc).reshape(1),
                                    box_iou_per_image(pred_box, boxes).sum().to(acc).reshape(1),
                                    sums.new_full((1,), bs)])
            sums += batch_sums.masked_fill(found.bool(), 0)
            skipped += found
            streak.mul_(found).add_(found)
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == len(batches):
            means = (sums[:4] / sums[4]).tolist()  # the host sync
            n_streak = int(streak)
            if n_streak >= min(CHECK_EVERY, step + 1):
                raise UserError(f"non-finite loss or gradient in epoch {epoch}, {n_streak} step(s) in a "
                                f"row (the last: cross-entropy {ce.item()}, box loss {box_loss.item()}); "
                                f"none of them changed the weights. Stopped; OUT keeps the best model "
                                f"so far and the last checkpoint, if one was written (try a lower --lr)")
            bar.set_postfix(ce=f"{means[0]:.3f}", box=f"{means[1]:.3f}", acc=f"{means[2]:.3f}")
    means = (sums[:4] / sums[4]).tolist()
    return {**dict(zip(METRICS, means)), "skipped_steps": int(skipped)}


def selection_score(metrics):
    """The report's rule (Fig. 13): round(accuracy, 3) + (1 - box loss) of the split
    selected on; the highest wins, a tie keeps the earlier epoch."""
    return round(metrics["accuracy"], 3) + (1 - metrics["box_loss"])


def run_settings(args, device):
    """Every option as a JSON value (the architecture among them, so OUT alone says how to
    rebuild the model), the device, and the paths made absolute."""
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    settings["device"] = str(device)
    settings.update({k: os.path.abspath(settings[k]) for k in ("data_dir", "out_dir") if settings.get(k)})
    return settings


def train(model, train_set, test_set, out_dir, args, device, val_set=None, progress=True):
    """Train model for args.epochs, evaluating test_set (and val_set) after each epoch and
    keeping the best by the report's rule. Returns (model, history). With args.resume the
    run goes on from checkpoint.pt or, in an empty out_dir, starts (one command for the first
    start and every requeue); a finished run is returned as it is. out_dir is locked while
    the run writes; SIGTERM stops it after the epoch in progress, with a checkpoint."""
    files = RunFiles(out_dir)
    if files.holds_a_run() and not args.resume:
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it, or choose "
                        f"another --out_dir")
    check_training_args(args, device, len(train_set))
    os.makedirs(out_dir, exist_ok=True)
    with held_lock(os.path.join(out_dir, ".lock")), StopOnSigterm() as stop:
        return train_locked(model, train_set, test_set, files, args, device, val_set, progress, stop)


def train_locked(model, train_set, test_set, files, args, device, val_set, progress, stop):
    """train() once its folder is locked."""
    if stop.requested:  # in the process's previous run's last epoch
        stop.stop(f"before training {files.out_dir}")
    files.remove_partial_writes()
    seed_everything(args.seed)
    set_gpu_options(args.tf32, args.cudnn_benchmark)
    model.to(device)
    settings = run_settings(args, device)
    resuming = args.resume and os.path.exists(files.checkpoint)
    if args.resume and os.path.exists(files.history) and files.read_history()["finished"]:
        if done := files.finished(args.epochs, settings, model):
            return done
    elif not resuming:
        log.info("%s in %s", "starting again from epoch 1 (no checkpoint yet)"
                 if files.holds_a_run() else "starting a new run", files.out_dir)
    if device.type == "cpu" and not args.system_malloc and reuse_freed_memory():
        log.info("malloc keeps freed blocks for reuse (--system_malloc leaves it alone)")
    optimizer = make_optimizer(model, args.lr, (args.beta1, args.beta2))
    criterion_cls, criterion_box, loss_name = make_criteria(args.loss)
    generator = torch.Generator().manual_seed(args.seed)
    drop_last = drops_small_last_batch(len(train_set), args.batch_size)
    if drop_last:
        log.info("%d training images at batch %d: the last batch, of %d, is skipped each epoch",
                 len(train_set), args.batch_size, len(train_set) % args.batch_size)
    train_batches = DeviceBatches(train_set, args.batch_size, device, generator, args.augment, drop_last)
    lr = LearningRate(args.lr, args.lr_schedule, args.epochs, len(train_batches), args.warmup_epochs)
    eval_batches = {split: DeviceBatches(data, args.eval_batch_size, device)
                    for split, data in (("test", test_set), ("val", val_set)) if data is not None}
    select_on = "val" if val_set is not None else "test"
    history = {split: {m: [] for m in METRICS} for split in ["train", *eval_batches]}
    history.update(epoch_seconds=[], save_seconds=[], skipped_steps=[], best_epoch=None,
                   best_score=None, select_on=select_on, loss=loss_name)
    start_epoch = 1
    if resuming:
        ckpt = load_checkpoint(files.checkpoint)
        check_same_settings(ckpt["settings"], settings, files.checkpoint)
        if ckpt["epoch"] > args.epochs:
            raise UserError(f"{files.checkpoint} is at epoch {ckpt['epoch']}, past --epochs {args.epochs}")
        restore(ckpt, files.checkpoint, model, optimizer, generator, device)
        files.commit_best(ckpt)
        history, start_epoch = ckpt["history"], ckpt["epoch"] + 1
        log.info("continuing the run in %s after epoch %d", files.out_dir, ckpt["epoch"])
        del ckpt
    history.update(settings=settings, finished=False)
    log.info("training HW5Net with %s on %s: %d train, %d %s images, %d epochs, batch %d",
             loss_name, device, len(train_set), len(eval_batches[select_on].dataset), select_on,
             args.epochs, args.batch_size)
    writer = CheckpointWriter(files, background=device.type == "cuda")
    best_state = None  # the best epoch's weights, until best_model.pt has them
    since_checkpoint = time.perf_counter()
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            t0 = time.perf_counter()
            metrics = train_one_epoch(model, train_batches, optimizer, criterion_cls, criterion_box,
                                      device, epoch, lr, order=not args.raw_boxes,
                                      single_backward=args.single_backward, amp=args.amp, progress=progress)
            results = {"train": metrics}
            for split, data in eval_batches.items():
                _, results[split] = evaluation(model, data, criterion_cls, criterion_box, device,
                                               order=not args.raw_boxes, amp=args.amp)
            for split, res in results.items():
                for m in METRICS:
                    history[split][m].append(res[m])
            history["skipped_steps"].append(metrics["skipped_steps"])
            history["epoch_seconds"].append(round(time.perf_counter() - t0, 3))
            score = selection_score({m: history[select_on][m][-1] for m in METRICS})
            if history["best_score"] is None or score > history["best_score"]:
                history["best_score"], history["best_epoch"] = score, epoch
                best_state = best_weights(model)
            log_epoch(history, epoch, args.epochs, select_on)
            last = epoch == args.epochs
            due = time.perf_counter() - since_checkpoint >= 60 * args.checkpoint_minutes or stop.requested
            if (due and not last) or (last and args.keep_checkpoint):
                history["save_seconds"] += writer.wait()
                state = checkpoint_state(model, optimizer, epoch, history, generator, device, settings)
                writer.write(epoch, host_copy(state) if writer.background else state, best_state)
                best_state = None
                since_checkpoint = time.perf_counter()
            write_json(history, files.history)
            if stop.requested and not last:
                writer.wait()
                stop.stop(f"after epoch {epoch} of {args.epochs}, with a checkpoint")
        if best_state is not None:
            writer.write_best(args.epochs, best_state)
            best_state = None
        history["save_seconds"] += writer.wait()
    finally:  # an error or Ctrl-C: finish a write, keep the best weights so far
        if best_state is not None or writer.thread is not None:
            with contextlib.suppress(Exception):
                writer.wait()
                if best_state is not None:
                    save(host_copy(best_state), files.best)
    history["finished"] = True
    write_json(history, files.history)  # before the checkpoint goes: a finished run is never retrained
    if not args.keep_checkpoint and os.path.exists(files.checkpoint):
        os.remove(files.checkpoint)
    release_freed_memory()
    return model, history


def log_epoch(history, epoch, epochs, select_on):
    t, s, loss = history["train"], history[select_on], history["loss"]
    log.info("epoch %d/%d: train ce %.4f %s %.4f acc %.3f mIoU %.3f | %s ce %.4f %s %.4f acc %.3f "
             "mIoU %.3f | %.1fs%s", epoch, epochs, t["cross_entropy"][-1], loss, t["box_loss"][-1],
             t["accuracy"][-1], t["mean_iou"][-1], select_on, s["cross_entropy"][-1], loss,
             s["box_loss"][-1], s["accuracy"][-1], s["mean_iou"][-1], history["epoch_seconds"][-1],
             " (best)" if history["best_epoch"] == epoch else "")
    if history["skipped_steps"][-1]:
        log.warning("epoch %d: %d steps with a non-finite loss or gradient were skipped",
                    epoch, history["skipped_steps"][-1])


def build_model(args):
    return HW5Net(width=args.width, n_blocks=args.n_blocks, learnable_res=args.learnable_res)


def load_datasets(args, progress=True):
    """(train, test, val or None); with --val_fraction a seeded part of the training set is
    held out for selection (one decode: both parts index its images)."""
    train_set = MyCOCODataset(args.data_dir, train=True, progress=progress)
    val_set = None
    if args.val_fraction:
        perm = np.random.default_rng(args.seed).permutation(len(train_set.files))
        n_val = max(1, round(args.val_fraction * len(perm)))
        val_set = train_set.subset(sorted(train_set.files[i] for i in perm[:n_val]))
        train_set = train_set.subset(sorted(train_set.files[i] for i in perm[n_val:]))
    return train_set, MyCOCODataset(args.data_dir, train=False, progress=progress), val_set


def add_training_args(p):
    """One training run's options, in groups, shared with hw5_main.py; defaults are the report's."""
    g = p.add_argument_group("model")
    g.add_argument("--width", type=int, default=ARCHITECTURE["width"], help="HW5Net stem width")
    g.add_argument("--n_blocks", type=int, default=ARCHITECTURE["n_blocks"], help="residual blocks")
    g.add_argument("--learnable_res", action="store_true", help="conv3x3-BN skips (the report tried and dropped them)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=30, help="epochs (report Section 4)")
    g.add_argument("--batch_size", type=int, default=16, help="training batch size")
    g.add_argument("--eval_batch_size", type=int, default=64, help="evaluation batch size")
    g.add_argument("--beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--beta2", type=float, default=0.99, help="Adam beta2")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order")
    g.add_argument("--augment", action="store_true", help="random horizontal flip that moves the box")
    g.add_argument("--raw_boxes", action="store_true",
                   help="feed the box head's raw output to the loss and metric, as the report's code "
                        "(instead of ordering each coordinate pair first)")
    g.add_argument("--single_backward", action="store_true",
                   help="one backward of the summed loss instead of the report's two (same gradients)")
    g.add_argument("--val_fraction", type=float, default=0.0,
                   help="select the best epoch on this held-out part of the training set (0: on "
                        "the test set, as the report)")
    g = p.add_argument_group("schedule")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    g.add_argument("--lr_schedule", choices=("constant", "cosine"), default="constant",
                   help="constant: --lr throughout (the report's); cosine: linear warm-up over "
                        "--warmup_epochs, then a half cosine down to 0 at the last step")
    g.add_argument("--warmup_epochs", type=float, default=0.0, help="cosine: epochs of warm-up from 0 to --lr")
    g = p.add_argument_group("devices and speed")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast of the forward passes, on any device")
    g.add_argument("--tf32", action="store_true", help="CUDA: TF32 matrix products (the report's were float32)")
    g.add_argument("--cudnn_benchmark", action="store_true",
                   help="CUDA: cuDNN picks the fastest convolutions, not deterministically")
    g.add_argument("--system_malloc", action="store_true",
                   help="CPU: leave glibc's malloc alone (by default large freed blocks are reused; "
                        "same results, faster steps)")
    g = p.add_argument_group("run files")
    g.add_argument("--checkpoint_minutes", type=float, default=10.0,
                   help="write checkpoint.pt after an epoch once this many minutes have passed since "
                        "the last (0: every epoch)")
    g.add_argument("--keep_checkpoint", action="store_true",
                   help="keep checkpoint.pt (2.5 GB) when the run ends, to train it further later")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out_dir, or start it there if there is none")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def get_args_parser():
    p = argparse.ArgumentParser(description="Train one HW5Net (report Section 3.4).",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", required=True, help="dataset built by Dataset.py (required)")
    g.add_argument("--out_dir", required=True, help="where the run's files go (required)")
    g.add_argument("--loss", choices=sorted(BOX_LOSSES), default="ciou", help="box loss")
    return add_training_args(p)


def main(args):
    if problem := out_dir_problem(args.out_dir):
        raise UserError(problem)
    device = pick_device(args.device)
    check_training_args(args, device)
    train_set, test_set, val_set = load_datasets(args, progress=not args.quiet)
    seed_everything(args.seed)  # the initial weights come from the seed
    _, history = train(build_model(args), train_set, test_set, args.out_dir, args, device, val_set,
                       progress=not args.quiet)
    log.info("best epoch %s (score %.4f); outputs in %s", history["best_epoch"],
             history["best_score"], args.out_dir)
    return history


if __name__ == "__main__":
    command(lambda: main(get_args_parser().parse_args()), log)
