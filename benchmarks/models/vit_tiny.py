"""A small ViT: timm ViT-Tiny (12 layers, width 192, 3 heads) on 32x32 images with 4x4 patches
(64 tokens), 10 classes, batch 8. data() is MNIST-5k resized to 3x32x32.

    graphopt bench benchmarks/models/vit_tiny.py -p cleanup
"""

import torch
from torch import nn

from graphopt.bench.data import adapt, load_builtin
from graphopt.zoo import timm_model


def model():
    torch.manual_seed(0)
    return timm_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10)


def example_inputs():
    return (torch.randn(8, 3, 32, 32),)


def loss(output, target):
    return nn.functional.cross_entropy(output, target)


def data():
    train, test = load_builtin("mnist")
    return adapt(train, (3, 32, 32)), adapt(test, (3, 32, 32))
