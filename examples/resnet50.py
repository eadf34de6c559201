"""Example model file: torchvision ResNet-50 (random weights, offline), 1x3x224x224.

    graphopt inspect examples/resnet50.py        # ~4.09 GMACs, 25.56 M parameters
"""

import torch

from graphopt.zoo import torchvision_model


def model():
    return torchvision_model("resnet50")


def example_inputs():
    return (torch.randn(1, 3, 224, 224),)
