"""Why the box head stays near the mean box on photos: train HW5Net on a few training photos
under one change at a time and see whether it fits their boxes (experiments/box_head.md).

    python experiments/box_head.py --data_dir DATA --out_dir OUT --variants report mse box_only no_head_bn
    python experiments/box_head.py --data_dir DATA --out_dir OUT --variants trunk_lr1e-4 frozen_trunk --epochs 30
    python experiments/box_head.py --data_dir DATA --out_dir OUT --head_only --epochs 40 --lrs 1e-3 1e-5
    python experiments/box_head.py --data_dir DATA --out_dir OUT --weights RUN/best_model.pt

A variant's photos' mean IoU is measured every --every epochs in eval mode, in train mode
and in eval mode with BatchNorm's statistics recomputed (OUT/VARIANT.json); --head_only
trains the box head alone on fixed features (OUT/head_only.jsonl); --weights measures a
trained model on the test split (OUT/trained_model.jsonl).
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
from checkpoints import load_checkpoint, load_model_state  # noqa: E402
from cli import HelpFormatter  # noqa: E402
from Dataset import MyCOCODataset  # noqa: E402
from devices import DeviceBatches  # noqa: E402
from network import ARCHITECTURE, build_model  # noqa: E402
from utils import box_iou_per_image, mean_box_baseline, order_boxes  # noqa: E402

# variant: its box loss; every variant trains with Adam 1e-3 (trunk_lr1e-4: the trunk at 1e-4),
# box_only without the class loss, frozen_trunk with the trunk at its initial weights.
VARIANTS = {"report": "ciou", "mse": "mse", "box_only": "ciou", "no_head_bn": "ciou", "trunk_lr1e-4": "ciou",
            "frozen_trunk": "ciou"}


def spread_px(boxes):
    """Standard deviation of each coordinate, in pixels."""
    return [round(v, 1) for v in (boxes.clamp(0, 1).std(0) * 256).tolist()]


def predict(model, batches, train_mode=False):
    """(class logits, ordered boxes) of every image; train mode runs on a copy, so that the
    model's BatchNorm running statistics stay as they were."""
    model = copy.deepcopy(model).train() if train_mode else model.eval()
    with torch.no_grad():
        outs = [model(b["image"]) for b in batches]
    return torch.cat([o[0] for o in outs]), order_boxes(torch.cat([o[1] for o in outs]))


def mean_iou(pred, boxes):
    return round(float(box_iou_per_image(pred, boxes).mean()), 4)


def recalibrated(model, batches):
    """A copy of model whose BatchNorm running statistics are the batches' average."""
    model = copy.deepcopy(model).train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    with torch.no_grad():
        for b in batches:
            model(b["image"])
    return model.eval()


def record(line, path):
    print(json.dumps(line), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def run(variant, data, args):
    torch.manual_seed(args.seed)
    model = build_model(ARCHITECTURE)
    if variant == "no_head_bn":
        model.bbox_head = nn.Sequential(*[nn.Identity() if isinstance(m, nn.BatchNorm1d) else m
                                          for m in model.bbox_head])
    params = heads = [*model.class_head.parameters(), *model.bbox_head.parameters()]
    if variant == "frozen_trunk":
        model.model.requires_grad_(False)
    elif variant == "trunk_lr1e-4":
        params = [{"params": heads}, {"params": list(model.model.parameters()), "lr": 1e-4}]
    else:
        params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.99))
    criterion_cls, criterion_box, _ = train.make_criteria(VARIANTS[variant])
    if variant == "box_only":
        criterion_cls = lambda logits, labels: logits.sum() * 0.0  # noqa: E731
    batches = DeviceBatches(data, 16, "cpu", torch.Generator().manual_seed(args.seed))
    fixed = DeviceBatches(data, 16, "cpu")
    curve = []
    for epoch in range(1, args.epochs + 1):
        train.train_one_epoch(model, batches, optimizer, criterion_cls, criterion_box, torch.device("cpu"),
                              epoch, single_backward=True, progress=False)
        if epoch % args.every == 0 or epoch == args.epochs:
            point = {"epoch": epoch}
            for name, (_, pred) in [("eval", predict(model, fixed)), ("train_mode", predict(model, fixed, True)),
                                    ("recalibrated", predict(recalibrated(model, fixed), fixed))]:
                point[name] = {"mean_iou": mean_iou(pred, data.boxes), "box_std_px": spread_px(pred)}
            curve.append(point)
            print(variant, json.dumps(point), flush=True)
    result = {"variant": variant, "n_images": len(data), "epochs": args.epochs, "seed": args.seed,
              "gt_box_std_px": spread_px(data.boxes), "mean_box_iou": round(mean_box_baseline(data.boxes, data.boxes), 4),
              "curve": curve}
    with open(os.path.join(args.out_dir, f"{variant}.json"), "w") as f:
        json.dump(result, f, indent=1)


def head_only(data, args):
    """The report's box head alone, CIoU, on the initial trunk's fixed features of the photos:
    whether the head and its optimizer can fit the boxes, at each --lrs rate. One line per
    rate in OUT/head_only.jsonl."""
    torch.manual_seed(args.seed)
    net = build_model(ARCHITECTURE)  # the trunk and the box head, as a run starts them
    trunk, initial_head = net.model.train(), net.bbox_head  # batch statistics, as the first step sees them
    del net
    with torch.no_grad():
        feats = torch.cat([torch.flatten(trunk(b["image"]), 1) for b in DeviceBatches(data, 16, "cpu")])
    _, criterion, _ = train.make_criteria("ciou")
    for lr in args.lrs:
        head = copy.deepcopy(initial_head)
        opt = torch.optim.Adam(head.parameters(), lr=lr, betas=(0.9, 0.99))
        g = torch.Generator().manual_seed(args.seed)
        curve = []
        for epoch in range(1, args.epochs + 1):
            head.train()
            for index in torch.randperm(len(data), generator=g).split(16):
                opt.zero_grad(set_to_none=True)
                criterion(order_boxes(head(feats[index])), data.boxes[index]).backward()
                opt.step()
            if epoch % args.every == 0 or epoch == args.epochs:
                head.eval()
                with torch.no_grad():
                    pred = order_boxes(head(feats))
                curve.append(mean_iou(pred, data.boxes))
        record({"lr": lr, "epochs": args.epochs, "every": args.every, "eval_mean_iou": curve,
                "box_std_px": spread_px(pred)}, os.path.join(args.out_dir, "head_only.jsonl"))


def trained_model(args):
    """A trained run's best_model.pt (--weights) on the whole test split: eval mode with
    BatchNorm's running statistics as saved, and recomputed over the training split."""
    model = build_model(ARCHITECTURE)
    load_model_state(model, load_checkpoint(args.weights), args.weights)
    train_set = MyCOCODataset(args.data_dir, train=True)
    test_set = MyCOCODataset(args.data_dir, train=False)
    test_batches = DeviceBatches(test_set, 64, "cpu")
    line = {"weights": args.weights, "gt_test_box_std_px": spread_px(test_set.boxes)}
    for name, m in [("saved", model), ("recalibrated", recalibrated(model, DeviceBatches(train_set, 64, "cpu")))]:
        logits, pred = predict(m, test_batches)
        line[f"{name}_test"] = {"accuracy": round(float((logits.argmax(1) == test_set.labels).float().mean()), 4),
                                "mean_iou": mean_iou(pred, test_set.boxes), "box_std_px": spread_px(pred)}
    record(line, os.path.join(args.out_dir, "trained_model.jsonl"))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", required=True, help="a dataset built by Dataset.py (required)")
    g.add_argument("--out_dir", required=True, help="where the results go (required)")
    g.add_argument("--n_images", type=int, default=64, help="training photos (every k-th one)")
    g = p.add_argument_group("trials")
    g.add_argument("--variants", nargs="+", default=["report"], choices=list(VARIANTS), help="one run each")
    g.add_argument("--epochs", type=int, default=40, help="epochs of each run")
    g.add_argument("--every", type=int, default=10, help="epochs between measurements")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order")
    g.add_argument("--head_only", action="store_true", help="train the box head alone instead (head_only())")
    g.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5], help="--head_only's rates")
    g.add_argument("--weights", help="a best_model.pt: measure it instead (trained_model())")
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
