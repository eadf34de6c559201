"""The training loop, written once against :class:`graphopt.bench.backend.TrainBackend`.

The loop owns everything that is not "take one optimizer step": the per-step learning rate
(:mod:`graphopt.bench.schedules`), evaluation on the validation and test sets, early stopping
on a validation metric with patience, stopping at a target accuracy, per-epoch metrics and
wall time, and progress display.

Time accounting: ``train_time_s`` counts only the training steps (data slicing included,
evaluation excluded, CUDA synchronised at each epoch end); ``wall_time_s`` counts everything.
Time-to-accuracy is reported on ``train_time_s``, so evaluation cost does not favour either
variant.

    result = fit(model, (train_ds, test_ds), TrainConfig(epochs=10, lr=0.05, schedule="cosine"))
    result.final["test_accuracy"], result.time_to_target_s
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from graphopt.bench.backend import TrainBackend, create_backend
from graphopt.bench.data import Batches, DataSplits, split
from graphopt.bench.schedules import Schedule, lr_schedule
from graphopt.errors import GraphoptError, PassConfigError

__all__ = ["TrainConfig", "EpochRecord", "TrainResult", "EarlyStopping", "Trainer", "fit", "fit_many",
           "make_splits"]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that defines a training run (all serialisable)."""

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    schedule: str = "constant"  # constant | cosine | onecycle | step
    warmup_epochs: float = 0.0
    step_epochs: float = 3.0  # step schedule: epochs between decays
    gamma: float = 0.1
    min_lr: float = 0.0
    patience: int | None = None  # early stopping: evaluations without improvement of `monitor`
    min_delta: float = 0.0
    monitor: str = "val_accuracy"  # val_accuracy | val_loss
    val_fraction: float = 0.1
    target_accuracy: float | None = None
    stop_at_target: bool = True
    max_time_s: float | None = None
    eval_every_steps: int | None = None  # None: evaluate once per epoch
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"  # auto (the graph's policy) | fp32
    compile: bool = False
    grad_clip: float | None = None
    backend: str = "torch"
    progress: str = "none"  # none | rich | tqdm | lines | auto (rich on a terminal, lines otherwise)

    def __post_init__(self) -> None:
        checks = [(self.epochs >= 1, "epochs must be >= 1"), (self.batch_size >= 1, "batch size must be >= 1"),
                  (self.lr > 0, "learning rate must be > 0"), (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
                  (self.monitor in ("val_accuracy", "val_loss"), "monitor must be val_accuracy or val_loss"),
                  (self.patience is None or self.patience >= 1, "patience must be >= 1"),
                  (self.target_accuracy is None or 0 < self.target_accuracy <= 1, "target accuracy must be in (0, 1]"),
                  (self.progress in ("none", "rich", "tqdm", "lines", "auto"), "progress must be none, rich, tqdm, lines or auto")]
        for ok, msg in checks:
            if not ok:
                raise PassConfigError(msg)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochRecord:
    """Metrics after one evaluation (normally one epoch)."""

    epoch: float  # fractional when evaluating every N steps
    step: int
    lr: float
    train_loss: float  # mean over the steps since the previous evaluation
    val_loss: float | None
    val_accuracy: float | None
    test_loss: float
    test_accuracy: float | None
    epoch_time_s: float  # training time of this epoch (or interval)
    train_time_s: float  # cumulative training time
    wall_time_s: float  # cumulative, including evaluation

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    name: str
    config: TrainConfig
    history: list[EpochRecord] = field(default_factory=list)
    stop_reason: str = "all epochs run"
    best_epoch: float | None = None
    best_value: float | None = None
    time_to_target_s: float | None = None
    epochs_to_target: float | None = None
    steps: int = 0
    samples: int = 0
    params: int = 0
    trainable_params: int = 0
    macs: int | None = None
    backend: TrainBackend | None = field(default=None, repr=False, compare=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1].as_dict() if self.history else {}

    @property
    def train_time_s(self) -> float:
        return self.history[-1].train_time_s if self.history else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_time_s if self.train_time_s else 0.0

    @property
    def best_test_accuracy(self) -> float | None:
        accs = [r.test_accuracy for r in self.history if r.test_accuracy is not None]
        return max(accs) if accs else None

    def summary(self) -> dict[str, Any]:
        f = self.final
        return {"name": self.name, "epochs": f.get("epoch"), "steps": self.steps, "stop_reason": self.stop_reason,
                "final_test_accuracy": f.get("test_accuracy"), "final_test_loss": f.get("test_loss"),
                "best_test_accuracy": self.best_test_accuracy, "best_epoch": self.best_epoch,
                "time_to_target_s": self.time_to_target_s, "epochs_to_target": self.epochs_to_target,
                "train_time_s": self.train_time_s, "wall_time_s": f.get("wall_time_s"),
                "samples_per_s": self.samples_per_s, "params": self.params,
                "trainable_params": self.trainable_params, "macs": self.macs, **self.extra}

    def as_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "config": self.config.as_dict(),
                "history": [r.as_dict() for r in self.history]}


class EarlyStopping:
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` evaluations."""

    def __init__(self, patience: int, mode: str = "max", min_delta: float = 0.0):
        if mode not in ("max", "min"):
            raise ValueError("mode must be 'max' or 'min'")
        self.patience = patience
        self.mode = mode
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_index: int | None = None
        self.bad = 0
        self.calls = 0

    def improved(self, value: float) -> bool:
        if self.best is None or math.isnan(self.best):
            return not math.isnan(value)
        return value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta

    def update(self, value: float) -> bool:
        """Record one evaluation; True when training should stop."""
        if self.improved(value):
            self.best, self.best_index, self.bad = value, self.calls, 0
        else:
            self.bad += 1
        self.calls += 1
        return self.bad >= self.patience


def make_splits(data: Any, config: TrainConfig, name: str = "data") -> DataSplits:
    """``(train, test)`` (or a :class:`DataSplits`) -> train/val/test with the config's validation fraction."""
    if isinstance(data, DataSplits):
        return data
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise GraphoptError("training data must be (train_dataset, test_dataset)",
                            fix="make data() return a pair of datasets")
    train, test = data
    tr, val = split(train, config.val_fraction, config.seed)
    return DataSplits(name, tr, val, test)


def _count(module: nn.Module) -> tuple[int, int]:
    seen: dict[int, nn.Parameter] = {id(p): p for p in module.parameters()}
    return (sum(p.numel() for p in seen.values()),
            sum(p.numel() for p in seen.values() if p.requires_grad))


def _accuracy(out: torch.Tensor, target: torch.Tensor) -> tuple[int, int] | None:
    if target.is_floating_point() or out.dim() != 2 or target.dim() != 1:
        return None
    return int((out.argmax(1) == target.cpu()).sum().item()), int(target.numel())


class Trainer:
    """One training run, advanced one epoch at a time (so several runs can be interleaved)."""

    def __init__(self, name: str, module: nn.Module, data: Any, config: TrainConfig, *,
                 loss: Callable[..., torch.Tensor] | None = None, backend: TrainBackend | None = None,
                 example_inputs: tuple[torch.Tensor, ...] | None = None, progress: Any = None):
        self.name = name
        self.config = config
        self.splits = make_splits(data, config)
        self.train_batches = Batches(self.splits.train, config.batch_size, shuffle=True, drop_last=True,
                                     seed=config.seed)
        eval_bs = max(config.batch_size, 256)
        self.val_batches = Batches(self.splits.val, eval_bs) if self.splits.val is not None else None
        self.test_batches = Batches(self.splits.test, eval_bs)
        self.steps_per_epoch = len(self.train_batches)
        total = self.steps_per_epoch * config.epochs
        self.schedule: Schedule = lr_schedule(
            config.schedule, config.lr, total, warmup_steps=int(round(config.warmup_epochs * self.steps_per_epoch)),
            min_lr=config.min_lr, step_size=max(1, int(round(config.step_epochs * self.steps_per_epoch))),
            gamma=config.gamma)
        params, trainable = _count(module)
        self.backend = backend or create_backend(config.backend, module, config, loss=loss,
                                                 example_inputs=example_inputs)
        self.result = TrainResult(name, config, params=params, trainable_params=trainable, backend=self.backend)
        self.stopper = (EarlyStopping(config.patience, "max" if config.monitor == "val_accuracy" else "min",
                                      config.min_delta) if config.patience else None)
        self.progress = progress
        self.step = 0
        self.epoch = 0
        self.done = False
        self._train_time = 0.0
        self._pending = 0.0  # training time since the last evaluation
        self._loss_sum, self._loss_n = 0.0, 0
        self._wall_start: float | None = None
        self.on_record: Callable[[Trainer, EpochRecord], None] | None = None  # called after each evaluation
        self._check_outputs()

    def _check_outputs(self) -> None:
        """Run one test batch before training so that a model/data mismatch is one clear error."""
        from graphopt.bench.data import num_classes

        inputs, target = next(iter(self.test_batches))
        classes = num_classes(self.splits.train)
        try:
            loss, out = self.backend.evaluate(inputs, target)
        except Exception as exc:
            hint = f" (the data has {classes} classes)" if classes else ""
            raise GraphoptError(f"the model does not run on the data: {type(exc).__name__}: {exc}{hint}",
                                where=self.name, fix="make the model's input and output match the data") from exc
        if classes and _accuracy(out, target) is not None and out.shape[1] < classes:
            raise GraphoptError(f"the model outputs {out.shape[1]} classes but the data has {classes}",
                                where=self.name,
                                fix="give the model a classifier with as many outputs as the data has classes")
        if not math.isfinite(loss):
            log.warning("%s: initial test loss is %s", self.name, loss)

    def _eval(self, batches: Batches | None) -> tuple[float | None, float | None]:
        if batches is None:
            return None, None
        total_loss, n, correct, counted = 0.0, 0, 0, 0
        for inputs, target in batches:
            loss, out = self.backend.evaluate(inputs, target)
            k = target.shape[0]
            total_loss += loss * k
            n += k
            acc = _accuracy(out, target)
            if acc is not None:
                correct += acc[0]
                counted += acc[1]
        return total_loss / max(n, 1), (correct / counted if counted else None)

    def _sync(self) -> None:
        dev = getattr(self.backend, "device", None)
        if isinstance(dev, torch.device) and dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def epochs(self) -> Iterator[EpochRecord]:
        while not self.done:
            yield from self.run_epoch()

    def run_epoch(self) -> list[EpochRecord]:
        """Train one epoch (evaluating every ``eval_every_steps`` or at its end); returns the records."""
        if self.done:
            return []
        cfg = self.config
        if self._wall_start is None:
            self._wall_start = time.perf_counter()
        records: list[EpochRecord] = []
        task = self.progress.start(self.name, self.epoch + 1, cfg.epochs, self.steps_per_epoch) if self.progress else None
        final_epoch = self.epoch + 1 == cfg.epochs
        t0 = time.perf_counter()
        for i, (inputs, target) in enumerate(self.train_batches):
            lr = self.schedule(self.step)
            loss = self.backend.train_step(inputs, target, lr)
            self.step += 1
            if not math.isfinite(loss):
                self._pending += self._elapsed(t0)
                self.result.stop_reason = "diverged (non-finite loss)"
                records.append(self._record(lr, loss))
                self.done = True
                break
            self.result.samples += target.shape[0]
            self._loss_sum += loss * target.shape[0]
            self._loss_n += target.shape[0]
            if task is not None:
                self.progress.advance(task, loss)
            last = i == self.steps_per_epoch - 1
            if (cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0) or \
                    (last and (not cfg.eval_every_steps or final_epoch)):
                self._pending += self._elapsed(t0)
                rec = self._record(lr, self._loss_sum / max(self._loss_n, 1))
                records.append(rec)
                if self._should_stop(rec):
                    self.done = True
                    break
                t0 = time.perf_counter()
            elif cfg.max_time_s is not None and \
                    self._train_time + self._pending + time.perf_counter() - t0 >= cfg.max_time_s:
                # the time budget is checked after every step, not only at evaluations
                self._pending += self._elapsed(t0)
                rec = self._record(lr, self._loss_sum / max(self._loss_n, 1))
                records.append(rec)
                self._should_stop(rec)
                self.done = True
                break
        else:
            self._pending += self._elapsed(t0) if cfg.eval_every_steps and self.step % cfg.eval_every_steps else 0.0
        if task is not None:
            self.progress.finish(task, records[-1] if records else None)
        self.epoch += 1
        if self.epoch >= cfg.epochs and not self.done:
            self.done = True
            self.result.stop_reason = "all epochs run"
        self.result.steps = self.step
        return records

    def _elapsed(self, t0: float) -> float:
        self._sync()
        return time.perf_counter() - t0

    def _record(self, lr: float, train_loss: float) -> EpochRecord:
        interval, self._pending = self._pending, 0.0
        self._train_time += interval
        self._loss_sum, self._loss_n = 0.0, 0
        val_loss, val_acc = self._eval(self.val_batches)
        test_loss, test_acc = self._eval(self.test_batches)
        rec = EpochRecord(epoch=round(self.step / self.steps_per_epoch, 4), step=self.step, lr=lr,
                          train_loss=train_loss, val_loss=val_loss, val_accuracy=val_acc,
                          test_loss=test_loss, test_accuracy=test_acc, epoch_time_s=interval,
                          train_time_s=self._train_time,
                          wall_time_s=time.perf_counter() - (self._wall_start or 0.0))
        self.result.history.append(rec)
        log.info("%s epoch %.2f: loss %.4f test acc %s", self.name, rec.epoch, train_loss, test_acc)
        if self.on_record is not None:  # e.g. the early-bird check, which may swap the backend
            self.on_record(self, rec)
        return rec

    def _should_stop(self, rec: EpochRecord) -> bool:
        cfg = self.config
        res = self.result
        if cfg.target_accuracy is not None and res.time_to_target_s is None and rec.test_accuracy is not None \
                and rec.test_accuracy >= cfg.target_accuracy:
            res.time_to_target_s = rec.train_time_s
            res.epochs_to_target = rec.epoch
            if cfg.stop_at_target:
                res.stop_reason = f"reached target accuracy {cfg.target_accuracy}"
                return True
        if self.stopper is not None:
            value = rec.val_accuracy if cfg.monitor == "val_accuracy" else rec.val_loss
            if value is None:  # no validation split or no accuracy: fall back to the test metric
                value = rec.test_accuracy if cfg.monitor == "val_accuracy" else rec.test_loss
            if value is None:
                value = rec.test_loss
                self.stopper.mode = "min"
            stop = self.stopper.update(value)
            if self.stopper.best_index is not None:
                res.best_epoch = res.history[self.stopper.best_index].epoch
                res.best_value = self.stopper.best
            if stop:
                res.stop_reason = (f"early stopping: {cfg.monitor} did not improve for {cfg.patience} evaluations "
                                   f"(best {self.stopper.best:.4f} at epoch {res.best_epoch})")
                return True
        if cfg.max_time_s is not None and rec.train_time_s >= cfg.max_time_s:
            res.stop_reason = f"time budget {cfg.max_time_s:.0f} s"
            return True
        return False


def _progress(kind: str) -> Any:
    if kind == "none":
        return None
    from graphopt.bench.progress import make_progress

    return make_progress(kind)


def fit(module: nn.Module, data: Any, config: TrainConfig | None = None, *, name: str = "model",
        loss: Callable[..., torch.Tensor] | None = None, example_inputs: tuple[torch.Tensor, ...] | None = None,
        backend: TrainBackend | None = None) -> TrainResult:
    """Train ``module`` (in place) on ``data`` = ``(train, test)`` datasets; returns the metrics history.

    The backend is ``config.backend`` ("torch": the module itself with a torch optimizer) unless
    one is given. The trained weights are ``result.backend.state_dict()``.
    """
    config = config or TrainConfig()
    progress = _progress(config.progress)
    try:
        trainer = Trainer(name, module, data, config, loss=loss, backend=backend, example_inputs=example_inputs,
                          progress=progress)
        for _ in trainer.epochs():
            pass
    finally:
        if progress is not None:
            progress.close()
    return trainer.result


def fit_many(modules: Mapping[str, nn.Module], data: Any, config: TrainConfig | Mapping[str, TrainConfig], *,
             loss: Callable[..., torch.Tensor] | None = None,
             example_inputs: tuple[torch.Tensor, ...] | None = None,
             on_epoch: Callable[[str, EpochRecord], None] | None = None) -> dict[str, TrainResult]:
    """Train several variants on the same data, interleaved epoch by epoch (round robin).

    Interleaving means a change of machine load during the run affects every variant alike.
    Each variant gets the same seed, so the same data order and the same validation split.
    """
    configs = {k: (config[k] if isinstance(config, Mapping) else config) for k in modules}
    first = next(iter(configs.values()))
    splits = make_splits(data, first)
    progress = _progress(first.progress)
    try:
        trainers = [Trainer(k, m, splits, configs[k], loss=loss, example_inputs=example_inputs, progress=progress)
                    for k, m in modules.items()]
        while any(not t.done for t in trainers):
            for t in trainers:
                for rec in t.run_epoch():
                    if on_epoch:
                        on_epoch(t.name, rec)
    finally:
        if progress is not None:
            progress.close()
    return {t.name: t.result for t in trainers}
