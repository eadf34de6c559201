"""Precision policies: what a graph's numerics need from whoever trains it.

A precision pass records a :class:`PrecisionPolicy` on the graph (``gm.meta["graphopt"]["precision"]``);
the torch emitter writes it into the manifest and ``graphopt.load`` keeps it
(``module.graphopt_manifest["precision"]``). The training harness reads it with
:func:`get_policy` and applies what it says:

- ``loss_scaling == "dynamic"`` (float16): ``torch.amp.GradScaler`` around the optimizer step;
- ``master_weights`` (pure half parameters): float32 master copies via :class:`MasterWeights`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from graphopt.errors import PreconditionError

__all__ = ["PrecisionPolicy", "get_policy", "set_policy", "needs_grad_scaler", "MasterWeights", "make_policy",
           "check_existing_policy", "low_dtype"]


@dataclass(frozen=True)
class PrecisionPolicy:
    mode: str  # "mixed" (float32 params, half compute inside the graph) | "half" (half params + activations)
    dtype: str  # "float16" | "bfloat16"
    loss_scaling: str | None = None  # "dynamic" for float16 graphs, None for bfloat16
    master_weights: bool = False  # keep float32 master copies of the parameters in training
    fp32_ops: tuple[str, ...] = field(default_factory=tuple)  # ops kept in float32

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fp32_ops"] = list(self.fp32_ops)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrecisionPolicy":
        d = dict(d)
        d["fp32_ops"] = tuple(d.get("fp32_ops", ()))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def get_policy(module: nn.Module) -> PrecisionPolicy | None:
    """The policy of a captured/rewritten GraphModule or of a module loaded with ``graphopt.load``."""
    raw = None
    meta = getattr(module, "meta", None)
    if isinstance(meta, dict):
        raw = meta.get("graphopt", {}).get("precision")
    if raw is None:
        manifest = getattr(module, "graphopt_manifest", None)
        if isinstance(manifest, dict):
            raw = manifest.get("precision")
    if raw is None:
        return None
    return raw if isinstance(raw, PrecisionPolicy) else PrecisionPolicy.from_dict(raw)


def set_policy(gm: nn.Module, policy: PrecisionPolicy | None) -> None:
    """Record ``policy`` on a GraphModule (stored as a plain dict so it serialises)."""
    gm.meta.setdefault("graphopt", {})["precision"] = policy.as_dict() if policy else None


def needs_grad_scaler(policy: PrecisionPolicy | None) -> bool:
    return policy is not None and policy.loss_scaling == "dynamic"


class MasterWeights:
    """float32 master copies of a half-precision module's trainable parameters.

    The optimizer (``self.optimizer``, built by ``optimizer_factory(masters)``) steps the float32
    masters; the half parameters are their rounded copies. One training step::

        loss.backward()                 # (scaled) half gradients on the module
        mw.sync_grads()                 # -> float32 gradients on the masters
        optimizer.step()                # or scaler.step(mw.optimizer); scaler.update()
        mw.sync_params()                # masters -> module parameters (rounded to half)
        mw.zero_grad()
    """

    def __init__(self, module: nn.Module, optimizer_factory: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.masters = [nn.Parameter(p.detach().float().clone()) for p in self.params]
        self.optimizer = optimizer_factory(self.masters)

    def sync_grads(self) -> None:
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.detach().float()

    @torch.no_grad()
    def sync_params(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.copy_(m.to(p.dtype))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self.optimizer.zero_grad(set_to_none=True)


def check_existing_policy(gm: fx.GraphModule, mode: str, dtype: str) -> None:
    """A precision pass's precondition: no other precision policy on the graph, no float64 parameters."""
    pol = get_policy(gm)
    if pol is not None and (pol.mode, pol.dtype) != (mode, dtype):
        raise PreconditionError(
            f"the graph already has a {pol.mode} {pol.dtype} precision policy",
            fix="apply one precision pass to the float32 model (re-capture it from the model file)")
    if pol is None:
        wide = next((n for n, p in gm.named_parameters() if p.dtype == torch.float64), None)
        if wide is not None:
            raise PreconditionError(f"parameter '{wide}' is float64",
                                    fix="precision passes rewrite float32 models; convert the model to float32")


def make_policy(mode: str, dtype: torch.dtype, fp32_ops: Iterable[str]) -> PrecisionPolicy:
    """The policy a precision pass records: dynamic loss scaling for float16, master weights for pure half."""
    name = str(dtype).replace("torch.", "")
    return PrecisionPolicy(mode=mode, dtype=name, loss_scaling="dynamic" if dtype == torch.float16 else None,
                           master_weights=mode == "half", fp32_ops=tuple(sorted(set(fp32_ops))))


def low_dtype(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16``, ``"bfloat16"`` -> ``torch.bfloat16``."""
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]
