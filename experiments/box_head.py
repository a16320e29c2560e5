"""Why the box head stands near the mean box on photos: train HW5Net on a few training
photos under one change at a time and see whether it can fit their boxes.

    python experiments/box_head.py --data_dir DATA --out_dir OUT --variants report mse

For each variant the training photos' mean IoU is measured three ways after every
--every epochs: in eval mode (BatchNorm's running statistics, as evaluation() and the
report measure), in train mode (each batch's own statistics, as the loss saw them), and
in eval mode after the running statistics are recomputed over the photos (a pass with
a cumulative average). OUT/VARIANT.json gets the curves and the spread of the boxes.

    python experiments/box_head.py --data_dir DATA --out_dir OUT --head_only
    python experiments/box_head.py --data_dir DATA --out_dir OUT --weights RUN/ciou/best_model.pt

train the box head alone on fixed trunk features (head_only), and measure a trained
model with its BatchNorm statistics as saved and recomputed (trained_model).
"""
import argparse
import copy
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from Dataset import MyCOCODataset  # noqa: E402
from checkpoints import load_checkpoint  # noqa: E402
from devices import DeviceBatches  # noqa: E402
from network import HW5Net  # noqa: E402
from utils import box_iou_per_image, order_boxes  # noqa: E402

# name: (box loss, lr, what changes). "report" is the report's recipe.
VARIANTS = {
    "report": ("ciou", 1e-3, "the report's recipe: CIoU, Adam 1e-3"),
    "mse": ("mse", 1e-3, "MSE box loss"),
    "lr1e-4": ("ciou", 1e-4, "CIoU, Adam 1e-4"),
    "no_head_bn": ("ciou", 1e-3, "CIoU, the box head's BatchNorm1d layers removed"),
    "box_only": ("ciou", 1e-3, "CIoU, no class loss (the box loss alone trains the trunk)"),
    "head_lr1e-4": ("ciou", 1e-3, "CIoU, Adam 1e-4 for the box head, 1e-3 elsewhere"),
    "trunk_lr1e-4": ("ciou", 1e-3, "CIoU, Adam 1e-4 for the trunk, 1e-3 for the heads"),
    "frozen_trunk": ("ciou", 1e-3, "CIoU, the trunk's weights frozen at their initial values "
                     "(its BatchNorm still on each batch's statistics)"),
}


def make_model(variant, seed):
    torch.manual_seed(seed)
    model = HW5Net()
    if variant == "frozen_trunk":
        model.model.requires_grad_(False)
    if variant == "no_head_bn":
        model.bbox_head = nn.Sequential(*[nn.Identity() if isinstance(m, nn.BatchNorm1d) else m
                                          for m in model.bbox_head])
    return model


def make_optimizer(model, variant, lr):
    slow = {"head_lr1e-4": model.bbox_head, "trunk_lr1e-4": model.model}.get(variant)
    if slow is not None:
        ids = {id(p) for p in slow.parameters()}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return torch.optim.Adam([{"params": rest, "lr": lr}, {"params": list(slow.parameters()), "lr": 1e-4}],
                                betas=(0.9, 0.99))
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.99))


class NoClassLoss(nn.Module):
    def forward(self, logits, labels):
        return logits.sum() * 0.0


def boxes_of(model, batches, mode):
    """Ordered predicted boxes of every image, in eval or train mode, BatchNorm's running
    statistics left as they were."""
    saved = copy.deepcopy({k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k})
    model.train(mode == "train")
    with torch.no_grad():
        preds = torch.cat([order_boxes(model(b["image"])[1]) for b in batches])
    model.load_state_dict(saved, strict=False)
    model.eval()
    return preds


def recalibrated(model, batches):
    """A copy of model whose BatchNorm running statistics are the photos' average."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b["image"])
    model.eval()
    return model


def measure(model, batches, boxes):
    out = {}
    for name, preds in [("eval", boxes_of(model, batches, "eval")),
                        ("train_mode", boxes_of(model, batches, "train")),
                        ("recalibrated", boxes_of(recalibrated(model, batches), batches, "eval"))]:
        out[name] = {"mean_iou": round(float(box_iou_per_image(preds, boxes).mean()), 4),
                     "box_std_px": [round(v, 1) for v in (preds.clamp(0, 1).std(0) * 256).tolist()]}
    return out


def run(variant, data, args):
    loss, lr, what = VARIANTS[variant]
    model = make_model(variant, args.seed)
    optimizer = make_optimizer(model, variant, lr)
    criterion_cls, criterion_box, _ = train.make_criteria(loss)
    if variant == "box_only":
        criterion_cls = NoClassLoss()
    batches = DeviceBatches(data, 16, "cpu", torch.Generator().manual_seed(args.seed))
    fixed = DeviceBatches(data, 16, "cpu")
    curve = []
    for epoch in range(1, args.epochs + 1):
        metrics = train.train_one_epoch(model, batches, optimizer, criterion_cls, criterion_box,
                                        torch.device("cpu"), epoch, single_backward=True, progress=False)
        if epoch % args.every == 0 or epoch == args.epochs:
            point = {"epoch": epoch, "train_loop_mean_iou": round(metrics["mean_iou"], 4),
                     "accuracy_train_loop": round(metrics["accuracy"], 4), **measure(model, fixed, data.boxes)}
            curve.append(point)
            print(variant, json.dumps(point), flush=True)
    result = {"variant": variant, "what": what, "n_images": len(data), "epochs": args.epochs,
              "seed": args.seed, "gt_box_std_px": [round(v, 1) for v in (data.boxes.std(0) * 256).tolist()],
              "curve": curve}
    with open(os.path.join(args.out_dir, f"{variant}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def head_only(data, args):
    """The box head alone on the initial trunk's fixed features of the photos: whether
    the head and its optimizer can fit the boxes, at each --lrs rate, with CIoU and MSE,
    with and without its BatchNorm1d layers. One line per run in OUT/head_only.jsonl."""
    torch.manual_seed(args.seed)
    trunk = HW5Net().model.train()  # batch statistics, as the first training step sees them
    with torch.no_grad():
        feats = torch.cat([torch.flatten(trunk(b["image"]), 1) for b in DeviceBatches(data, 16, "cpu")])
    boxes = data.boxes
    for loss in ("ciou", "mse"):
        for bn in (True, False):
            for lr in args.lrs:
                torch.manual_seed(args.seed)
                head = make_model("report" if bn else "no_head_bn", args.seed).bbox_head
                opt = torch.optim.Adam(head.parameters(), lr=lr, betas=(0.9, 0.99))
                _, criterion, _ = train.make_criteria(loss)
                g = torch.Generator().manual_seed(args.seed)
                curve = []
                for epoch in range(1, args.epochs + 1):
                    head.train()
                    for index in torch.randperm(len(boxes), generator=g).split(16):
                        opt.zero_grad(set_to_none=True)
                        criterion(order_boxes(head(feats[index])), boxes[index]).backward()
                        opt.step()
                    if epoch % args.every == 0 or epoch == args.epochs:
                        head.eval()
                        with torch.no_grad():
                            pred = order_boxes(head(feats))
                        curve.append(round(float(box_iou_per_image(pred, boxes).mean()), 4))
                line = {"loss": loss, "head_bn": bn, "lr": lr, "epochs": args.epochs,
                        "every": args.every, "eval_mean_iou": curve,
                        "box_std_px": [round(v, 1) for v in (pred.clamp(0, 1).std(0) * 256).tolist()]}
                print(json.dumps(line), flush=True)
                with open(os.path.join(args.out_dir, "head_only.jsonl"), "a") as f:
                    f.write(json.dumps(line) + "\n")


def trained_model(args):
    """A trained run's best_model.pt (--weights) on the whole test split: eval mode as
    saved, and with BatchNorm's running statistics recomputed over the training split."""
    model = HW5Net()
    model.load_state_dict(load_checkpoint(args.weights))
    train_set = MyCOCODataset(args.data_dir, train=True)
    test_set = MyCOCODataset(args.data_dir, train=False)
    train_batches, test_batches = DeviceBatches(train_set, 64, "cpu"), DeviceBatches(test_set, 64, "cpu")
    line = {"weights": args.weights}
    for name, m in [("saved", model), ("recalibrated", recalibrated(model, train_batches))]:
        for split, batches, data in [("train", train_batches, train_set), ("test", test_batches, test_set)]:
            m.eval()
            with torch.no_grad():
                outs = [m(b["image"]) for b in batches]
            pred = order_boxes(torch.cat([o[1] for o in outs]))
            acc = float((torch.cat([o[0] for o in outs]).argmax(1) == data.labels).float().mean())
            line[f"{name}_{split}"] = {
                "accuracy": round(acc, 4), "mean_iou": round(float(box_iou_per_image(pred, data.boxes).mean()), 4),
                "box_std_px": [round(v, 1) for v in (pred.clamp(0, 1).std(0) * 256).tolist()]}
    line["gt_test_box_std_px"] = [round(v, 1) for v in (test_set.boxes.std(0) * 256).tolist()]
    print(json.dumps(line), flush=True)
    with open(os.path.join(args.out_dir, "trained_model.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", required=True, help="a dataset built by Dataset.py (its train split)")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--variants", nargs="+", default=["report"], choices=sorted(VARIANTS))
    p.add_argument("--n_images", type=int, default=64, help="training photos (every k-th one)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--every", type=int, default=10, help="epochs between measurements")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head_only", action="store_true", help="train the box head alone (head_only())")
    p.add_argument("--weights", help="a best_model.pt: measure it as trained_model() says")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5], help="--head_only's rates")
    return p


def main(args):
    os.makedirs(args.out_dir, exist_ok=True)
    if args.weights:
        return trained_model(args)
    full = MyCOCODataset(args.data_dir, train=True)
    data = full.subset(full.files[::len(full) // args.n_images][:args.n_images])
    if args.head_only:
        return head_only(data, args)
    for variant in args.variants:
        run(variant, data, args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
