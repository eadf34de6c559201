"""The PyTorch training backend: an ``nn.Module`` + a ``torch.optim`` optimizer on one device.

It applies the graph's precision policy (:mod:`graphopt.precision`):

- float16 graphs (``loss_scaling == "dynamic"``): ``torch.amp.GradScaler`` scales the loss and
  skips steps whose gradients overflow;
- pure-half graphs (``master_weights``): the optimizer steps float32 master copies
  (:class:`graphopt.precision.MasterWeights`) and the half parameters are refreshed from them;
  floating inputs are cast to the half dtype.

The loss is always computed in float32 (``loss_fn(output.float(), target)``).
"""

from __future__ import annotations

from pathlib import Path

import logging
from typing import Any, Callable

import torch
from torch import nn

from graphopt.bench.backend import TrainBackend
from graphopt.errors import GraphoptError, PassConfigError
from graphopt.ir import eval_mode
from graphopt.precision import MasterWeights, PrecisionPolicy, get_policy, needs_grad_scaler

__all__ = ["TorchBackend", "OPTIMIZERS", "build_optimizer", "default_loss", "resolve_device"]

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")


def default_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer class targets, mean squared error otherwise."""
    if not target.is_floating_point():
        return nn.functional.cross_entropy(output, target)
    return nn.functional.mse_loss(output, target)


def resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GraphoptError("--device cuda requested but no CUDA device is available",
                            fix="use --device cpu, or run on a machine with a GPU")
    if dev.type not in ("cpu", "cuda"):
        raise PassConfigError(f"unsupported device '{device}'", fix="use cpu or cuda")
    return dev


def build_optimizer(name: str, params: Any, *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                    nesterov: bool = False, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise PassConfigError(f"unknown optimizer '{name}'", fix="choose one of " + ", ".join(OPTIMIZERS))


class TorchBackend(TrainBackend):
    name = "torch"

    def __init__(self, module: nn.Module, *, loss: Callable[..., torch.Tensor] | None = None,
                 optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, device: str | torch.device = "cpu",
                 precision: str | PrecisionPolicy | None = "auto", compile: bool = False,
                 grad_clip: float | None = None):
        self.device = resolve_device(device)
        self.module = module.to(self.device)
        self.module.train()
        self.loss_fn = loss or default_loss
        if precision == "auto":
            self.policy = get_policy(module)
        elif precision in (None, "fp32", "float32"):
            self.policy = None
        elif isinstance(precision, PrecisionPolicy):
            self.policy = precision
        else:
            raise PassConfigError(f"unknown precision '{precision}'", fix="use auto (the graph's policy) or fp32")
        self.grad_clip = grad_clip
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        if not trainable:
            raise GraphoptError("the model has no trainable parameters", fix="unfreeze some parameters")

        def factory(params: Any) -> torch.optim.Optimizer:
            return build_optimizer(optimizer, params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                   nesterov=nesterov)

        half_params = any(p.dtype in (torch.float16, torch.bfloat16) for p in trainable)
        self.master: MasterWeights | None = None
        if (self.policy is not None and self.policy.master_weights) or half_params:
            self.master = MasterWeights(self.module, factory)
            self.optimizer = self.master.optimizer
        else:
            self.optimizer = factory(trainable)
        self.scaler = torch.amp.GradScaler(self.device.type) if needs_grad_scaler(self.policy) else None
        self.input_dtype = (self.policy.torch_dtype if self.policy is not None and self.policy.mode == "half"
                            else (trainable[0].dtype if half_params else None))
        self.runner: Callable[..., Any] = torch.compile(self.module) if compile else self.module
        self.steps = 0
        self.skipped_steps = 0

    @classmethod
    def from_config(cls, module: nn.Module, config: Any, *, loss: Callable[..., torch.Tensor] | None = None,
                    example_inputs: Any = None) -> "TorchBackend":
        """Factory used by the backend registry (``config`` is a :class:`graphopt.bench.TrainConfig`)."""
        backend = cls(module, loss=loss, optimizer=config.optimizer, lr=config.lr, momentum=config.momentum,
                      weight_decay=config.weight_decay, nesterov=config.nesterov, device=config.device,
                      precision=config.precision, compile=config.compile, grad_clip=config.grad_clip)
        backend.example_inputs = tuple(example_inputs) if example_inputs is not None else None
        return backend

    example_inputs: tuple[torch.Tensor, ...] | None = None

    def write_torch_folder(self, out: str | Path, *, force: bool = False) -> Path:
        """The trained model as a graphopt torch folder (``graphopt.load`` reads it)."""
        import copy

        from torch import fx

        import graphopt

        module = copy.deepcopy(self.module).to("cpu")
        inputs = tuple(t.cpu() for t in self.example_inputs) if self.example_inputs is not None else None
        if isinstance(module, fx.GraphModule) and "graphopt" in module.meta:
            gm = module
            inputs = inputs or module.meta["graphopt"].get("example_inputs")
        else:
            if inputs is None:
                raise GraphoptError("no example inputs to capture the trained model with",
                                    fix="build the backend with example_inputs=")
            gm = graphopt.capture(module, inputs)
        return graphopt.emit_torch_folder(gm, out, force=force, check_inputs=inputs)

    # -- data movement -------------------------------------------------------------------------
    def prepare(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor
                ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Inputs/target on the device (and in the graph's half dtype for pure-half graphs)."""
        nb = self.device.type == "cuda"
        out = []
        for t in inputs:
            t = t.to(self.device, non_blocking=nb)
            if self.input_dtype is not None and t.is_floating_point():
                t = t.to(self.input_dtype)
            out.append(t)
        return tuple(out), target.to(self.device, non_blocking=nb)

    # -- the step --------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor, lr: float | None = None) -> torch.Tensor:
        """One training step on already-prepared tensors; returns the loss tensor (no host sync)."""
        if lr is not None:
            self.set_lr(lr)
        if self.master is None:
            self.optimizer.zero_grad(set_to_none=True)
        out = self.runner(*inputs)
        loss = self.loss_fn(out.float() if out.is_floating_point() else out, target)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.master is not None:
            self.master.sync_grads()
        if self.grad_clip:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            params = self.master.masters if self.master is not None else self.optimizer.param_groups[0]["params"]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scaler.get_scale() < scale:
                self.skipped_steps += 1
        else:
            self.optimizer.step()
        if self.master is not None:
            self.master.sync_params()
            self.master.zero_grad()
        self.steps += 1
        return loss.detach()

    def train_step(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor, lr: float) -> float:
        inputs, target = self.prepare(inputs, target)
        return float(self.step(inputs, target, lr).item())

    @torch.no_grad()
    def evaluate(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> tuple[float, torch.Tensor]:
        inputs, target = self.prepare(inputs, target)
        with eval_mode(self.module):
            out = self.runner(*inputs)
            out = out.float() if out.is_floating_point() else out
            loss = self.loss_fn(out, target)
        return float(loss.item()), out.detach().cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    # -- measurement helpers -----------------------------------------------------------------------
    def persistent_bytes(self) -> dict[str, int]:
        """Bytes held between steps: parameters + buffers (+ float32 masters) and optimizer state."""
        seen: set[int] = set()

        def nbytes(ts: Any) -> int:
            total = 0
            for t in ts:
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
            return total

        model = nbytes(list(self.module.parameters()) + list(self.module.buffers()))
        if self.master is not None:
            model += nbytes(self.master.masters)
        state = nbytes(v for s in self.optimizer.state.values() for v in s.values())
        return {"model": model, "optimizer_state": state}
