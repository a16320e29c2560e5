"""The report's training and evaluation loop, transcribed as printed (report 6.2-6.4), the
yardstick of bench_train.py and bench_process.py. Only what is needed to run it is fixed:
the names that did not exist, the dataset as a torch Dataset instead of an nn.Module,
paths as arguments. Everything that costs time is kept: skimage.io.imread per item, a
default DataLoader, torch.optim.Adam's default implementation, two backward calls,
per-batch .item() calls, the per-sample box_iou(...).item() loop of mIoU, and evaluation
without torch.no_grad().

Not for training models (see train.py). As a command it runs the report's train() as a
whole process, seeded as the report's __main__; each epoch trains, evaluates the test
split and saves OUT/best_model when the report's score improves, nothing else:

    python benchmarks/reference.py --data_dir DATA --out_dir OUT --epoch 2
"""
import argparse
import os
import pickle
import random
import sys

import numpy as np
import torch
import torchvision.transforms as tvn
from skimage import io
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import box_iou, complete_box_iou_loss

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import HelpFormatter  # noqa: E402
from network import ARCHITECTURE, build_model  # noqa: E402


class ReferenceCOCODataset(torch.utils.data.Dataset):
    """Report Fig. 1."""

    def __init__(self, data, label_map, data_dir, train=True):
        self.files = list(data.keys())
        self.data = data
        self.label_map = label_map
        self.path = os.path.join(data_dir, "train_data" if train else "test_data")
        self.transforms = tvn.Compose([tvn.ToTensor()])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        img_file = self.files[item]
        img = io.imread(os.path.join(self.path, img_file))
        img = self.transforms(img)
        label = self.label_map[self.data[img_file]["category_id"]]
        [x1, y1, w, h] = self.data[img_file]["bbox"]
        x2, y2 = x1 + w, y1 + h
        return {"image": img, "label": torch.tensor(label),
                "bbox": torch.tensor([x1 / 255, y1 / 255, x2 / 255, y2 / 255])}


class mIoU(nn.Module):  # noqa: N801 (the report's name)
    def forward(self, output, target):
        if output.shape[0] == 1:
            return box_iou(output, target.unsqueeze(0))
        mean_loss = 0
        batch_size = output.shape[0]
        for i in range(batch_size):
            mean_loss += (1 - box_iou(output[i].unsqueeze(0), target[i].unsqueeze(0)).item()) / batch_size
        return mean_loss


class CompleteIOULoss(nn.Module):
    def __init__(self, reduction="none"):
        super().__init__()
        self.reduction = reduction

    def forward(self, output, target):
        return complete_box_iou_loss(output, target, self.reduction)


def update_cm(preds, target, cm):
    preds = preds.detach().cpu().numpy()
    target = target.detach().cpu().numpy()
    for i in range(len(preds)):
        cm[target[i], preds[i]] += 1
    return cm


def make_loaders(data_dir, batch_size=16):
    """The report's (train, test) DataLoaders over a DATA built by Dataset.py."""
    dicts = []
    for name in ("train_data.pkl", "test_data.pkl", "inv_map.pkl"):
        with open(os.path.join(data_dir, name), "rb") as f:
            dicts.append(pickle.load(f))
    train_dict, test_dict, inv_map = dicts
    return (DataLoader(ReferenceCOCODataset(train_dict, inv_map, data_dir, train=True),
                       batch_size=batch_size, shuffle=True),
            DataLoader(ReferenceCOCODataset(test_dict, inv_map, data_dir, train=False),
                       batch_size=batch_size, shuffle=True))


def make_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))


def train_epoch(model, train_loader, optimizer, criterion1, criterion2, device):
    """One epoch of the report's train() (its TRAIN PART)."""
    train_size = len(train_loader)
    run_cross_loss = run_reg_loss = run_iou_loss = run_acc = 0.0
    model.train()
    for i, data in enumerate(train_loader):
        img, bbox, label = data["image"], data["bbox"], data["label"]
        img, bbox, label = img.to(device), bbox.to(device), label.to(device)
        optimizer.zero_grad()
        output = model(img)
        pred_cat, pred_bbox = output[0], output[1]
        cross_loss = criterion1(pred_cat, label)
        cross_loss.backward(retain_graph=True)
        reg_loss = criterion2(pred_bbox, bbox)
        reg_loss.backward()
        optimizer.step()
        _, pred = torch.max(pred_cat, 1)
        acc = torch.eq(pred, label).float().mean().item()
        miou_loss = mIoU()(pred_bbox, bbox)
        run_cross_loss += cross_loss.item()
        run_reg_loss += reg_loss.item()
        run_iou_loss += miou_loss
        run_acc += acc
    return {"cross-entropy": run_cross_loss / train_size, "reg_loss": run_reg_loss / train_size,
            "miou_loss": run_iou_loss / train_size, "accuracy": run_acc / train_size}


def evaluation(model, test_loader, criterion1, criterion2, device):
    """The report's evaluation(): eval mode, no torch.no_grad()."""
    cm = np.zeros((3, 3))
    run_cross_loss = run_reg_loss = run_iou_loss = run_acc = 0.0
    test_size = len(test_loader)
    model.eval()
    for i, data in enumerate(test_loader):
        img, bbox, label = data["image"], data["bbox"], data["label"]
        img, bbox, label = img.to(device), bbox.to(device), label.to(device)
        output = model(img)
        pred_cat, pred_bbox = output[0], output[1]
        cross_loss = criterion1(pred_cat, label)
        reg_loss = criterion2(pred_bbox, bbox)
        _, pred = torch.max(pred_cat, 1)
        acc = torch.eq(pred, label).float().mean().item()
        miou_loss = mIoU()(pred_bbox, bbox)
        cm = update_cm(pred, label, cm)
        run_cross_loss += cross_loss.item()
        run_reg_loss += reg_loss.item()
        run_iou_loss += miou_loss
        run_acc += acc
    return cm, {"cross-entropy": run_cross_loss / test_size, "reg_loss": run_reg_loss / test_size,
                "miou_loss": run_iou_loss / test_size, "accuracy": run_acc / test_size}


def train(model, data_dir, out_dir, num_epochs):
    """The report's train() (Figs. 11-13): the CIoU model, best model saved as it goes."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    train_loader, test_loader = make_loaders(data_dir)
    criterion1, criterion2 = nn.CrossEntropyLoss(), CompleteIOULoss("mean")
    optimizer = make_optimizer(model)
    max_model_score = 0
    for epoch in range(1, num_epochs + 1):
        train_epoch(model, train_loader, optimizer, criterion1, criterion2, device)
        _, results = evaluation(model, test_loader, criterion1, criterion2, device)
        model_score = round(results["accuracy"], 3) + (1 - results["reg_loss"])
        print(f"[epoch {epoch}/{num_epochs}] test accuracy {results['accuracy']:.3f}")
        if model_score > max_model_score:
            torch.save(model.state_dict(), os.path.join(out_dir, "best_model"))
            print("best model is saved...")
            max_model_score = model_score


def get_args_parser():
    parser = argparse.ArgumentParser(description="The report's training loop as a whole process.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data_dir", required=True, help="a dataset built by Dataset.py (required)")
    parser.add_argument("--out_dir", required=True, help="where best_model goes (required)")
    parser.add_argument("--epoch", default=15, type=int, help="epochs (the report's default)")
    return parser


def main(args):
    seed = 0
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed(seed)
    np.random.seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    os.makedirs(args.out_dir, exist_ok=True)
    train(build_model(ARCHITECTURE), args.data_dir, args.out_dir, args.epoch)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
