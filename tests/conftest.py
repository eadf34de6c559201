from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_num_threads(1)  # stable and fast on the 2-core CI machines (ENV-NOTES.md)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu") is not None:  # the marker: item.keywords also holds name parts
                item.add_marker(skip)


@pytest.fixture
def zoo():
    """Build a real architecture offline: zoo('resnet18') or zoo('timm:efficientnet_b0')."""
    from graphopt import zoo as _zoo

    def build(spec: str, **kw):
        torch.manual_seed(0)
        return _zoo.build(spec, **kw).eval()

    return build


class SmallCNN(nn.Module):
    """conv-bn-relu x2, pool, linear: a minimal realistic CNN."""

    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture
def small_cnn():
    torch.manual_seed(0)
    return SmallCNN().eval(), (torch.randn(2, 3, 16, 16),)
