"""HW5Net: a shared residual trunk with a class head and a box head (report Section 3.3).

    python network.py > model_sum.txt

prints the layer table and the hierarchical summary of report Fig. 5, then the number
of learnable layers (88) and of parameters (211,083,307).
"""
import argparse

import torch
from torch import nn
import torch.nn.functional as F

# The report's architecture; train.py's and predict.py's options default to it.
ARCHITECTURE = {"width": 8, "n_blocks": 5, "learnable_res": False}


class Block(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a skip (identity, or conv3x3-BN when
    learnable_res), then ReLU (report Figs. 6-7)."""

    def __init__(self, width, learnable_res=False):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(width, width, 3, 1, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, 1, 1),
            nn.BatchNorm2d(width),
        )
        self.learnable_res = learnable_res
        self.res_conv = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1),
                                      nn.BatchNorm2d(width)) if learnable_res else None

    def forward(self, x):
        skip = self.res_conv(x) if self.learnable_res else x
        return F.relu(self.conv(x) + skip)


class HW5Net(nn.Module):
    """Report Figs. 8-10. A 7x7 stem, four stride-2 convs (BN, no ReLU: as printed),
    n_blocks residual Blocks, then two heads on the 128x16x16 = 32768 flattened
    features. forward(x) -> (class logits [N, 3], box [N, 4])."""

    def __init__(self, in_channels=3, width=ARCHITECTURE["width"], n_blocks=ARCHITECTURE["n_blocks"],
                 learnable_res=ARCHITECTURE["learnable_res"], n_classes=3, image_size=256):
        super().__init__()
        model = [nn.ReflectionPad2d(3),
                 nn.Conv2d(in_channels, width, kernel_size=7, padding=0),
                 nn.BatchNorm2d(width),
                 nn.ReLU(True)]
        n_down = 4
        channels = width
        for k in range(n_down):
            model += [nn.Conv2d(width * 2 ** k, width * 2 ** (k + 1), kernel_size=3, stride=2, padding=1),
                      nn.BatchNorm2d(width * 2 ** (k + 1))]
            channels = width * 2 ** (k + 1)
        model += [Block(channels, learnable_res) for _ in range(n_blocks)]
        self.model = nn.Sequential(*model)
        features = channels * (image_size // 2 ** n_down) ** 2  # 128 * 16 * 16 = 32768
        self.class_head = nn.Sequential(
            nn.Linear(features, 1024), nn.BatchNorm1d(1024), nn.ReLU(True),
            nn.Linear(1024, 64), nn.BatchNorm1d(64), nn.ReLU(True),
            nn.Linear(64, n_classes),
        )
        self.bbox_head = nn.Sequential(
            nn.Linear(features, 5196), nn.BatchNorm1d(5196), nn.ReLU(True),
            nn.Linear(5196, 1024), nn.BatchNorm1d(1024), nn.ReLU(True),
            nn.Linear(1024, 256), nn.BatchNorm1d(256), nn.ReLU(True),
            nn.Linear(256, 64), nn.BatchNorm1d(64), nn.ReLU(True),
            nn.Linear(64, 4),
        )

    def forward(self, x):
        out = torch.flatten(self.model(x), 1)
        return self.class_head(out), self.bbox_head(out)


def build_model(settings, image_size=256):
    """The HW5Net of a run's settings: argparse's options, or the dict a run saved in its
    history.json (so that OUT alone rebuilds the model)."""
    s = settings if isinstance(settings, dict) else vars(settings)
    return HW5Net(width=s["width"], n_blocks=s["n_blocks"], learnable_res=s["learnable_res"],
                  image_size=image_size)


def model_summary(net, image_size=256):
    """The layer table followed by the hierarchical summary, as pytorch-model-summary
    prints them for a 1x3xSxS input (the report's table and Fig. 5). The net is put in
    eval mode for it: BatchNorm1d cannot train on a batch of one."""
    from pytorch_model_summary import summary
    was_training = net.training
    net.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=next(net.parameters()).device)
    with torch.no_grad():
        text = summary(net, x, show_input=False, show_hierarchical=True)
    net.train(was_training)
    return text


def count_parameters(net):
    """(number of parameter tensors, number of parameters)."""
    params = list(net.parameters())
    return len(params), sum(p.numel() for p in params)


def get_args_parser():
    p = argparse.ArgumentParser(description="Print HW5Net's model summary (report Fig. 5).")
    p.add_argument("--width", type=int, default=ARCHITECTURE["width"],
                   help=f"stem width (default: {ARCHITECTURE['width']})")
    p.add_argument("--n_blocks", type=int, default=ARCHITECTURE["n_blocks"],
                   help=f"residual blocks (default: {ARCHITECTURE['n_blocks']})")
    p.add_argument("--learnable_res", action="store_true", help="conv3x3-BN skips instead of identity")
    return p


def main(args):
    net = build_model(args)
    n_layers, n_params = count_parameters(net)
    print(model_summary(net))
    print(f"learnable layers (parameter tensors): {n_layers}")
    print(f"total parameters: {n_params:,}")
    return n_layers, n_params


if __name__ == "__main__":
    main(get_args_parser().parse_args())
