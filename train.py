"""Train one HW5Net: cross-entropy for the class plus CIoU or MSE for the box (report 3.4).

    python train.py --data_dir DATA --out_dir runs/ciou --loss ciou
    python train.py --data_dir DATA --out_dir runs/ciou --loss ciou --resume   # after an interruption

Defaults are the report's: Adam (lr 1e-3, betas 0.9/0.99), batch 16, 30 epochs, seed 0,
two backward calls (the first with retain_graph=True), and after every epoch the best
model kept by round(test accuracy, 3) + (1 - test box loss). OUT receives history.json,
best_model.pt and, while the run trains, checkpoint.pt (docs/runs.md).
"""
import argparse
import logging
import math
import os
import random
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from checkpoints import CheckpointWriter, RunFiles, checkpoint_state
from cli import HelpFormatter, Sigterm, UserError, command, out_dir_problem
from Dataset import load_splits
from devices import (DEVICE_HELP, DeviceBatches, NonFiniteGuard, accumulator_dtype, autocast, autocast_problem,
                     pick_device, release_freed_memory, reuse_freed_memory, set_gpu_options)
from network import ARCHITECTURE, build_model
from outputs import held_lock, write_json
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
    if args.tf32 and args.strict_fp32:
        raise UserError("--tf32 and --strict_fp32 contradict each other: give one")


class RunningMeans:
    """The epoch's per-image sums of METRICS, kept on the device so that no step waits for the
    host, and its skipped steps; a skipped step adds nothing to the sums."""

    def __init__(self, device):
        self.sums = torch.zeros(len(METRICS) + 1, device=device, dtype=accumulator_dtype(device))  # + images
        self.skipped = torch.zeros((), device=device)
        self.skipped_in_a_row = torch.zeros((), device=device)

    def add(self, cross_entropy, box_loss, correct, iou_sum, n_images, skipped):
        dtype = self.sums.dtype
        batch = torch.cat([torch.stack([cross_entropy, box_loss]).to(dtype) * n_images,
                           correct.to(dtype).reshape(1), iou_sum.to(dtype).reshape(1),
                           self.sums.new_full((1,), n_images)])
        self.sums += batch.masked_fill(skipped.bool(), 0)  # masked, not multiplied: NaN * 0 is NaN
        self.skipped += skipped
        self.skipped_in_a_row.mul_(skipped).add_(skipped)

    def means(self):
        return dict(zip(METRICS, (self.sums[:-1] / self.sums[-1]).tolist()))  # a host sync


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


def new_history(splits, select_on, loss_name):
    history = {split: {m: [] for m in METRICS} for split in splits}
    history.update(epoch_seconds=[], save_seconds=[], skipped_steps=[], best_epoch=None,
                   best_score=None, select_on=select_on, loss=loss_name)
    return history


def record_epoch(history, epoch, results, seconds):
    """The epoch's metrics into history, and the report's selection rule: True when this
    epoch is the best so far."""
    for split, metrics in results.items():
        for m in METRICS:
            history[split][m].append(metrics[m])
    history["skipped_steps"].append(results["train"]["skipped_steps"])
    history["epoch_seconds"].append(round(seconds, 3))
    score = selection_score(results[history["select_on"]])
    if history["best_score"] is None or score > history["best_score"]:
        history["best_score"], history["best_epoch"] = score, epoch
        return True
    return False


def train_one_epoch(model, batches, optimizer, criterion_cls, criterion_box, device, epoch, lr=None,
                    order=True, single_backward=False, amp=False, progress=True):
    """One pass over batches; lr (a LearningRate) sets each step's rate. Returns the running
    means over images (train mode, as the report logged them) and skipped_steps: steps with
    a non-finite loss or gradient, which changed nothing and are left out of the means. The
    host reads the device every CHECK_EVERY steps only."""
    model.train()
    guard = NonFiniteGuard(optimizer, device)
    running = RunningMeans(device)
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not progress)
    for step, batch in enumerate(bar):
        images, labels, boxes = batch["image"], batch["label"], batch["bbox"]  # on the device
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr((epoch - 1) * len(batches) + step)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            logits, raw_boxes = model(images)
        logits, raw_boxes = logits.float(), raw_boxes.float()
        pred_boxes = order_boxes(raw_boxes) if order else raw_boxes
        cross_entropy = criterion_cls(logits, labels)
        box_loss = criterion_box(pred_boxes, boxes)
        if single_backward:
            (cross_entropy + box_loss).backward()  # the same gradients, one pass back through the trunk
        else:
            cross_entropy.backward(retain_graph=True)  # report Fig. 12
            box_loss.backward()
        skipped = guard.check(cross_entropy.detach() + box_loss.detach())
        if guard.allows_step():
            optimizer.step()  # fused Adam holds `skipped` as found_inf: the weights and Adam stay as they were
        with torch.no_grad():
            running.add(cross_entropy, box_loss, (logits.argmax(1) == labels).sum(),
                        box_iou_per_image(pred_boxes, boxes).sum(), labels.shape[0], skipped)
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == len(batches):
            means = running.means()
            in_a_row = int(running.skipped_in_a_row)
            if in_a_row >= min(CHECK_EVERY, step + 1):
                raise UserError(f"non-finite loss or gradient in epoch {epoch}, {in_a_row} step(s) in a "
                                f"row (the last: cross-entropy {cross_entropy.item()}, box loss "
                                f"{box_loss.item()}); none of them changed the weights. Stopped; OUT keeps "
                                f"the best model so far and the last checkpoint, if one was written (try "
                                f"a lower --lr)")
            bar.set_postfix(ce=f"{means['cross_entropy']:.3f}", box=f"{means['box_loss']:.3f}",
                            acc=f"{means['accuracy']:.3f}")
    return {**running.means(), "skipped_steps": int(running.skipped)}


def train(model, train_set, test_set, out_dir, args, device, val_set=None, progress=True):
    """Train model for args.epochs, evaluating test_set (and val_set) after each epoch and
    keeping the best by the report's rule. Returns (model, history). With args.resume the
    run goes on from checkpoint.pt or, in an empty out_dir, starts (one command for the
    first start and every requeue); a finished run is returned as it is. After a SIGTERM
    the run stops after the epoch in progress, with a checkpoint (cli.Sigterm)."""
    files = RunFiles(out_dir)
    if files.holds_a_run() and not args.resume:
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it, or choose "
                        f"another --out_dir")
    check_training_args(args, device, len(train_set))
    os.makedirs(out_dir, exist_ok=True)
    with held_lock(os.path.join(out_dir, ".lock")):  # one process writes a run
        Sigterm.stop_here(f"before training {out_dir}")
        files.remove_partial_writes()
        seed_everything(args.seed)
        set_gpu_options(args.tf32, args.strict_fp32, args.cudnn_benchmark)
        model.to(device)
        settings = run_settings(args, device)
        if args.resume and (done := files.finished(args.epochs, settings, model)):
            return done
        if device.type == "cpu" and not args.system_malloc and reuse_freed_memory():
            log.info("malloc keeps freed blocks for reuse (--system_malloc leaves it alone)")
        optimizer = make_optimizer(model, args.lr, (args.beta1, args.beta2))
        criterion_cls, criterion_box, loss_name = make_criteria(args.loss)
        generator = torch.Generator().manual_seed(args.seed)  # the batch order, and --augment's flips
        train_batches = DeviceBatches(train_set, args.batch_size, device, generator, args.augment,
                                      drop_last=drops_small_last_batch(len(train_set), args.batch_size))
        lr = LearningRate(args.lr, args.lr_schedule, args.epochs, len(train_batches), args.warmup_epochs)
        eval_batches = {split: DeviceBatches(data, args.eval_batch_size, device)
                        for split, data in (("test", test_set), ("val", val_set)) if data is not None}
        select_on = "val" if val_set is not None else "test"
        history, start = files.start_or_resume(new_history(["train", *eval_batches], select_on, loss_name),
                                               settings, model, optimizer, generator, device)
        log.info("training HW5Net with %s on %s: %d train, %d %s images, %d epochs, batch %d", loss_name,
                 device, len(train_set), len(eval_batches[select_on].dataset), select_on, args.epochs,
                 args.batch_size)
        with CheckpointWriter(files, background=device.type == "cuda") as writer:
            for epoch in range(start, args.epochs + 1):
                t0 = time.perf_counter()
                results = {"train": train_one_epoch(
                    model, train_batches, optimizer, criterion_cls, criterion_box, device, epoch, lr,
                    order=not args.raw_boxes, single_backward=args.single_backward, amp=args.amp,
                    progress=progress)}
                for split, batches in eval_batches.items():
                    results[split] = evaluation(model, batches, criterion_cls, criterion_box, device,
                                                order=not args.raw_boxes, amp=args.amp)[1]
                if record_epoch(history, epoch, results, time.perf_counter() - t0):
                    writer.keep_best(model)
                log_epoch(history, epoch, args.epochs)
                last = epoch == args.epochs
                stopping = Sigterm.received and not last  # read once: a later SIGTERM waits an epoch
                if stopping or (not last and writer.due(args.checkpoint_minutes)) or (last and args.keep_checkpoint):
                    history["save_seconds"] += writer.wait()
                    writer.checkpoint(epoch, checkpoint_state(model, optimizer, epoch, history, generator,
                                                              device, settings))
                if stopping:
                    history["save_seconds"] += writer.wait()  # the checkpoint is on disk
                write_json(history, files.history)
                if stopping:
                    Sigterm.stop_here(f"after epoch {epoch} of {args.epochs} in {out_dir}, with a checkpoint")
            history["save_seconds"] += writer.close(args.epochs)
        history["finished"] = True
        write_json(history, files.history)  # before the checkpoint goes: a finished run is never retrained
        if not args.keep_checkpoint and os.path.exists(files.checkpoint):
            os.remove(files.checkpoint)
    release_freed_memory()
    return model, history


def log_epoch(history, epoch, epochs):
    train, chosen, loss = history["train"], history[history["select_on"]], history["loss"]
    log.info("epoch %d/%d: train ce %.4f %s %.4f acc %.3f mIoU %.3f | %s ce %.4f %s %.4f acc %.3f "
             "mIoU %.3f | %.1fs%s", epoch, epochs, train["cross_entropy"][-1], loss, train["box_loss"][-1],
             train["accuracy"][-1], train["mean_iou"][-1], history["select_on"], chosen["cross_entropy"][-1],
             loss, chosen["box_loss"][-1], chosen["accuracy"][-1], chosen["mean_iou"][-1],
             history["epoch_seconds"][-1], " (best)" if history["best_epoch"] == epoch else "")
    if history["skipped_steps"][-1]:
        log.warning("epoch %d: %d steps with a non-finite loss or gradient were skipped",
                    epoch, history["skipped_steps"][-1])


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
    g.add_argument("--tf32", action="store_true",
                   help="CUDA: TF32 matrix products too (by default, as in the report's run, only cuDNN's "
                        "convolutions use TF32)")
    g.add_argument("--strict_fp32", action="store_true",
                   help="CUDA: no TF32 anywhere, convolutions included (to compare with a CPU run)")
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
    train_set, test_set, val_set = load_splits(args.data_dir, args.val_fraction, progress=not args.quiet)
    seed_everything(args.seed)  # the initial weights come from the seed
    _, history = train(build_model(args), train_set, test_set, args.out_dir, args, device, val_set,
                       progress=not args.quiet)
    log.info("best epoch %s (score %.4f); outputs in %s", history["best_epoch"],
             history["best_score"], args.out_dir)
    return history


if __name__ == "__main__":
    command(lambda: main(get_args_parser().parse_args()), log, stops_on_sigterm=True)
