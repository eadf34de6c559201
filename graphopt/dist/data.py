"""Batches and loss for training an emitted pipeline folder.

Source of truth, in order:

1. the model file's ``data()`` (its training set) and ``loss(output, target)``; the file is
   found through the pipeline manifest (``source.file``) or given explicitly. Only the file's
   top level runs (its functions are looked up); ``model()`` is not called.
2. otherwise synthetic data: random inputs shaped like the example inputs (batch dimension
   replaced by the batch size) and random targets: class indices for 2-D outputs
   ``[N, classes]``, values shaped like the output otherwise. The loss is the model file's
   ``loss()`` if it has one, else cross-entropy (2-D outputs) or mean squared error.

Every rank builds the same global batch for the same step (seeded), then takes its replica's
rows: ``rows [r * B/R, (r+1) * B/R)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from graphopt.errors import ModelFileError

__all__ = ["TrainData", "make_data", "shard", "import_model_file"]

log = logging.getLogger(__name__)


def import_model_file(path: str | Path) -> dict[str, Any]:
    """The namespace of a model file (its top level runs; no factory is called)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError("model file not found", where=str(path), fix="give --model-file or use --synthetic")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    name = f"graphopt_user_model_{digest[:12]}"
    if name in sys.modules:
        return vars(sys.modules[name])
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - defensive
        raise ModelFileError("cannot import file", where=str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        from graphopt.modelfile import model_file_context

        with model_file_context(path, path.read_text(errors="replace")):  # sibling imports, torchvision
            spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        raise ModelFileError(f"importing the model file failed: {type(exc).__name__}: {exc}", where=str(path),
                             fix="fix the model file, or use --synthetic") from exc
    return vars(module)


@dataclass
class TrainData:
    """Global batches by step and the loss function, with a description of where they come from."""

    batch: Callable[[int], tuple[tuple[torch.Tensor, ...], torch.Tensor]]
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]
    data_source: str
    loss_source: str
    synthetic: bool


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _default_loss(output_info: list[dict[str, Any]]) -> tuple[Callable, str]:
    if len(output_info) == 1 and len(output_info[0]["shape"]) == 2 and output_info[0]["dtype"].startswith("float"):
        return F.cross_entropy, "cross_entropy (the model file defines no loss())"
    return F.mse_loss, "mse_loss (the model file defines no loss())"


def _synthetic(manifest: dict[str, Any], batch_size: int, seed: int) -> Callable[[int], tuple]:
    inputs = manifest["inputs"]
    outputs = manifest["outputs"]

    def batch(step: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        xs = []
        for info in inputs:
            shape = [batch_size] + list(info["shape"][1:])
            dt = _dtype(info["dtype"])
            if dt.is_floating_point:
                xs.append(torch.randn(shape, generator=gen).to(dt))
            else:
                xs.append(torch.randint(0, 10, shape, generator=gen, dtype=dt))
        out = outputs[0]
        if len(outputs) == 1 and len(out["shape"]) == 2 and out["dtype"].startswith("float"):
            target = torch.randint(0, out["shape"][1], (batch_size,), generator=gen)
        else:
            target = torch.randn([batch_size] + list(out["shape"][1:]), generator=gen).to(_dtype(out["dtype"]))
        return tuple(xs), target

    return batch


def _from_dataset(dataset: Any, batch_size: int, seed: int) -> Callable[[int], tuple]:
    from torch.utils.data import DataLoader

    n = len(dataset)
    if n < batch_size:
        raise ModelFileError(f"data() has {n} training samples, fewer than the batch size {batch_size}",
                             fix="use a smaller --batch-size")
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=gen)
    state: dict[str, Any] = {"it": None, "step": -1, "cache": None}

    def batches() -> Iterator[Any]:
        while True:
            yield from loader

    def batch(step: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        if state["it"] is None:
            state["it"] = batches()
        while state["step"] < step:  # steps are asked for in order; every rank draws the same sequence
            state["cache"] = next(state["it"])
            state["step"] += 1
        item = state["cache"]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ModelFileError("data()'s training set must yield (inputs..., target) pairs",
                                 fix="return datasets of (x, y), e.g. TensorDataset(x, y)")
        return tuple(item[:-1]), item[-1]

    return batch


def make_data(manifest: dict[str, Any], batch_size: int, *, seed: int = 0, synthetic: bool = False,
              model_file: str | Path | None = None) -> TrainData:
    """Batches and loss for a pipeline folder (see the module docstring)."""
    path = model_file or manifest.get("source", {}).get("file")
    ns: dict[str, Any] = {}
    note = ""
    if path:
        if Path(path).is_file():
            ns = import_model_file(path)
        elif model_file:
            raise ModelFileError("model file not found", where=str(path), fix="check --model-file")
        elif not synthetic:  # a moved model file must not silently become random data
            raise ModelFileError("the model file this folder was made from (for its loss() and data()) is gone",
                                 where=str(path), fix="give --model-file NEW_PATH, or --synthetic for random data")
        else:
            note = f" (model file {path} not found)"
    loss = ns.get("loss")
    data_fn = ns.get("data")
    if callable(loss):
        loss_fn, loss_source = loss, f"loss() of {Path(path).name}"
    else:
        loss_fn, loss_source = _default_loss(manifest["outputs"])
    if callable(data_fn) and not synthetic:
        try:
            train = data_fn()[0]
        except Exception as exc:
            raise ModelFileError(f"data() raised {type(exc).__name__}: {exc}", where=str(path),
                                 fix="fix data(), or use --synthetic") from exc
        return TrainData(_from_dataset(train, batch_size, seed), loss_fn,
                         f"data() of {Path(path).name} ({len(train)} training samples)", loss_source, False)
    why = "--synthetic" if synthetic else ("the model file defines no data()" if ns else "no model file" + note)
    return TrainData(_synthetic(manifest, batch_size, seed), loss_fn,
                     f"SYNTHETIC: random inputs shaped like the example inputs and random targets ({why})",
                     loss_source, True)


def shard(batch: tuple[tuple[torch.Tensor, ...], torch.Tensor], replica: int, replicas: int
          ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Rows of the global batch that ``replica`` trains on."""
    xs, y = batch
    if replicas == 1:
        return xs, y
    n = y.shape[0]
    per = n // replicas
    sl = slice(replica * per, (replica + 1) * per)
    return tuple(x[sl] for x in xs), y[sl]
