"""Example model file: torchvision ResNet-18 (random weights, offline) at 224x224.

    graphopt inspect examples/resnet18.py
    graphopt optimize examples/resnet18.py -p channels_last -p cleanup -o out/
"""

import torch
import torch.nn.functional as F

from graphopt.zoo import torchvision_model


def model():
    return torchvision_model("resnet18", num_classes=10)


def example_inputs():
    return (torch.randn(8, 3, 224, 224),)


def loss(output, target):
    return F.cross_entropy(output, target)
