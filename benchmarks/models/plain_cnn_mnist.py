"""A deep plain CNN for MNIST: no BatchNorm, no skip connections (the textbook case where
inserting BatchNorm and residuals should make training easier).

stem conv (stride 2) -> 4 x [conv3x3-ReLU] at 16 channels, 14x14 -> conv (stride 2) ->
4 x [conv3x3-ReLU] at 32 channels, 7x7 -> global average pool -> linear. 11 conv/linear layers.

    graphopt train benchmarks/models/plain_cnn_mnist.py --epochs 5
    graphopt sweep depth benchmarks/models/plain_cnn_mnist.py --deltas=-2,0,2
"""

import torch
from torch import nn

from graphopt.bench.data import load_builtin


class ConvBlock(nn.Module):
    """conv3x3 + ReLU at constant width: the shape-preserving unit."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


class PlainCNN(nn.Module):
    def __init__(self, blocks: int = 4, widths=(16, 32), classes: int = 10):
        super().__init__()
        c1, c2 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(*[ConvBlock(c1) for _ in range(blocks)])
        self.down = nn.Sequential(nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(*[ConvBlock(c2) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def model():
    torch.manual_seed(0)
    return PlainCNN()


def example_inputs():
    return (torch.randn(32, 1, 28, 28),)


def loss(output, target):
    return nn.functional.cross_entropy(output, target)


def data():
    return load_builtin("mnist")
