"""HW5Net: a shared residual trunk with a class head and a box head (report Section 3.3).

    python network.py --out runs/model_sum.txt

writes the layer table and the hierarchical summary of report Fig. 5 and prints the
number of learnable layers (88) and of parameters (211,083,307).
"""
import argparse

import torch
from torch import nn
import torch.nn.functional as F

from utils import write_text


class _LinearCPU(torch.autograd.Function):
    """y = x W^T + b for a 2-D x, computed as (W x^T)^T + b. For the heads' skinny
    products (16 rows against a 32768-wide weight) MKL reads the weight about 1.4x
    faster in this orientation: 48 ms instead of 67 ms for the 5196x32768 layer on 2
    cores. The sums are the same up to float reassociation. The backward is nn.Linear's."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.mm(weight, x.t()).t().contiguous()
        return torch.addmm(bias.unsqueeze(1), weight, x.t()).t().contiguous()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = grad.mm(weight) if need_x else None
        grad_w = grad.t().mm(x) if need_w else None
        grad_b = grad.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """nn.Linear with the same parameters, state_dict and name in the summary; on the CPU
    (2-D input, no autocast) its product runs through _LinearCPU. Elsewhere it is
    nn.Linear."""

    def forward(self, x):
        if x.device.type != "cpu" or x.dim() != 2 or torch.is_autocast_enabled("cpu"):
            return super().forward(x)
        return _LinearCPU.apply(x, self.weight, self.bias)


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

    def __init__(self, in_channels=3, width=8, n_blocks=5, learnable_res=False, n_classes=3,
                 image_size=256):
        assert n_blocks >= 0
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
            Linear(features, 1024), nn.BatchNorm1d(1024), nn.ReLU(True),
            Linear(1024, 64), nn.BatchNorm1d(64), nn.ReLU(True),
            Linear(64, n_classes),
        )
        self.bbox_head = nn.Sequential(
            Linear(features, 5196), nn.BatchNorm1d(5196), nn.ReLU(True),
            Linear(5196, 1024), nn.BatchNorm1d(1024), nn.ReLU(True),
            Linear(1024, 256), nn.BatchNorm1d(256), nn.ReLU(True),
            Linear(256, 64), nn.BatchNorm1d(64), nn.ReLU(True),
            Linear(64, 4),
        )

    def forward(self, x):
        out = torch.flatten(self.model(x), 1)
        return self.class_head(out), self.bbox_head(out)


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
    p = argparse.ArgumentParser(description="Write HW5Net's model summary (report Fig. 5).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="model_sum.txt", help="summary file to write")
    p.add_argument("--width", type=int, default=8, help="stem width")
    p.add_argument("--n_blocks", type=int, default=5, help="residual blocks")
    p.add_argument("--learnable_res", action="store_true", help="conv3x3-BN skips instead of identity")
    return p


def main(args):
    net = HW5Net(width=args.width, n_blocks=args.n_blocks, learnable_res=args.learnable_res)
    write_text(model_summary(net), args.out)
    n_layers, n_params = count_parameters(net)
    print(f"learnable layers (parameter tensors): {n_layers}")
    print(f"total parameters: {n_params:,}")
    print(f"summary written to {args.out}")
    return n_layers, n_params


if __name__ == "__main__":
    main(get_args_parser().parse_args())
