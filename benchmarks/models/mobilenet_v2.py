"""torchvision mobilenet_v2 (random weights, offline), 10 classes, 64x64 inputs, batch 16.

Small images keep CPU steps short; data() is MNIST-5k resized to 3x64x64.

    graphopt bench benchmarks/models/mobilenet_v2.py -p channels_last
"""

import torch
from torch import nn

from graphopt.bench.data import adapt, load_builtin
from graphopt.zoo import torchvision_model


def model():
    torch.manual_seed(0)
    return torchvision_model("mobilenet_v2", num_classes=10)


def example_inputs():
    return (torch.randn(16, 3, 64, 64),)


def loss(output, target):
    return nn.functional.cross_entropy(output, target)


def data():
    train, test = load_builtin("mnist")
    return adapt(train, (3, 64, 64)), adapt(test, (3, 64, 64))
