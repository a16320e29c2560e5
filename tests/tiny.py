"""What tests share: a stand-in network for the training machinery (4x4 images, one linear
layer), and DEVICE."""
import torch
from torch import nn

# Tests that work on any device train on CUDA where torch can use it (as the GPU script runs
# the suite), else on the CPU; a test that needs the CPU asks for it.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class TinyNet(nn.Module):
    """forward(x [N, 3, 4, 4]) -> (class logits [N, 3], box [N, 4]), as HW5Net's."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 7)

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out[:, :3], out[:, 3:]
