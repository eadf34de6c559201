"""A small BatchNorm CNN on scikit-learn's real 8x8 digits (offline), with data() for training,
calibration (reconstruct=N) and distillation: see README "Recovering accuracy"."""

import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.c1, self.b1 = nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w)
        self.c2, self.b2 = nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w)
        self.c3, self.b3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w)
        self.fc = nn.Linear(2 * w, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


def model():
    torch.manual_seed(0)
    return DigitsCNN()


def example_inputs():
    return (torch.randn(32, 1, 8, 8),)


def data():
    from graphopt.bench.data import load_builtin

    return load_builtin("digits")  # (train, test): 1,437 / 360 real digits
