"""What tests share: a stand-in network for the training machinery (4x4 images, one linear
layer), DEVICE, the options of tiny runs, and the comparisons of two runs."""
import os
import shutil

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests that work on any device train on CUDA where torch can use it (as a GPU machine runs
# the suite), else on the CPU; a test that needs the CPU asks for it.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SMALL = ["--width", "2", "--n_blocks", "1"]  # a small HW5Net, where the network is not what is tested
# A tiny run of the whole experiment on the CPU.
TINY_TRAINING = ["--epochs", "1", "--batch_size", "4", "--quiet", *SMALL, "--device", "cpu"]
TINY_DEMO = ["--demo", "--n_train", "24", "--n_val", "12", *TINY_TRAINING]
# What differs between two runs of one command that only one of them stopped on the way: the
# timings, and the files written (a stopped run writes a checkpoint).
TIMINGS = ("wall_seconds", "earlier_wall_seconds", "train_seconds", "save_seconds", "epoch_seconds",
           "files_written")


class TinyNet(nn.Module):
    """forward(x [N, 3, 4, 4]) -> (class logits [N, 3], box [N, 4]), as HW5Net's."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 7)

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out[:, :3], out[:, 3:]


def train_args(data_dir, out_dir, *extra):
    """train.py's options for a run on DEVICE (a later --device wins)."""
    import train
    return train.get_args_parser().parse_args(["--data_dir", data_dir, "--out_dir", out_dir, "--batch_size",
                                               "4", "--quiet", "--device", DEVICE, *extra])


def hw5_args(*argv):
    """hw5_main.py's options, parsed and resolved as the command does."""
    import hw5_main
    return hw5_main.resolve_args(hw5_main.get_args_parser().parse_args(list(argv)))


def without_timings(obj):
    """What two runs of the same command must share: everything but timings and settings
    (paths, --resume)."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMINGS and k != "settings"}
    return [without_timings(v) for v in obj] if isinstance(obj, list) else obj


def linked_copy(src, dst):
    """A copy of a run folder whose files are hard links: cheap for multi-GB models. Change
    a file of the copy only by replacing it (outputs.write_json, os.remove), never in place."""
    shutil.copytree(src, dst, copy_function=os.link)
    return str(dst)
