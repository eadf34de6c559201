"""Loss and optimizer settings for ORT training, mapped to what torch does with the same settings."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from graphopt.errors import OrtConfigError

__all__ = ["LOSSES", "OptimizerSpec", "resolve_loss", "torch_loss", "make_target"]

# graphopt name -> (torch function, target kind)
LOSSES: dict[str, tuple[Callable[..., torch.Tensor], str]] = {
    "cross_entropy": (F.cross_entropy, "class"),
    "mse": (F.mse_loss, "like"),
    "l1": (F.l1_loss, "like"),
    "bce_with_logits": (F.binary_cross_entropy_with_logits, "prob"),
}


def torch_loss(name: str) -> Callable[..., torch.Tensor]:
    return LOSSES[name][0]


def make_target(name: str, output: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random target of the right kind for loss ``name`` and model output ``output``."""
    kind = LOSSES[name][1]
    if kind == "class":
        return torch.randint(0, output.shape[1], (output.shape[0],) + tuple(output.shape[2:]), generator=generator)
    if kind == "prob":
        return torch.rand(output.shape, generator=generator)
    return torch.randn(output.shape, generator=generator)


def resolve_loss(loss: str | None, model_loss: Callable[..., Any] | None, output: torch.Tensor) -> str:
    """The loss to train with: ``loss`` if given, else the one the model file's ``loss`` computes.

    The model file's function is identified by behaviour: it is evaluated on random outputs and
    targets and compared with each loss ORT implements (mean reduction). Without either, a
    2-D+ float output trains with cross-entropy.
    """
    if loss not in (None, "", "auto"):
        if loss not in LOSSES:
            raise OrtConfigError(f"unknown loss '{loss}'", fix="choose one of " + ", ".join(LOSSES))
        return loss
    if model_loss is None:
        return "cross_entropy"
    g = torch.Generator().manual_seed(0)
    out = torch.randn(output.shape, generator=g, dtype=torch.float32)
    for name, (fn, _) in LOSSES.items():
        ok = True
        for _ in range(2):
            target = make_target(name, out, g)
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = model_loss(out, target)
                    ref = fn(out, target)
                ok = isinstance(got, torch.Tensor) and got.numel() == 1 and torch.allclose(
                    got.float().reshape(()), ref.float(), rtol=1e-5, atol=1e-6)
            except Exception:
                ok = False
            if not ok:
                break
        if ok:
            return name
    raise OrtConfigError("the model file's loss() is none of the losses ONNX Runtime training implements "
                         "(" + ", ".join(LOSSES) + ", mean reduction, no label smoothing or class weights)",
                         fix="pass the one to train with: --emit-option loss=cross_entropy (or mse, l1, "
                             "bce_with_logits)")


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer both runtimes implement identically.

    ``adamw``: torch.optim.AdamW semantics (decoupled weight decay applied before the update, eps
    added to the bias-corrected sqrt(v)); ORT's AdamW op runs in ``adam_mode=0`` with torch's
    defaults (eps 1e-8, weight_decay 0.01), not ORT's own (eps 1e-6, weight_decay 0, HF mode).
    ``sgd``: plain SGD (ORT's SGD has no momentum, dampening, Nesterov or weight decay).
    ``lr`` is the default learning rate for the runner; the runner sets it at every step.
    """

    name: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "sgd"):
            raise OrtConfigError(f"unknown optimizer '{self.name}' for ORT training", fix="choose adamw or sgd")
        if self.lr <= 0:
            raise OrtConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.name == "sgd" and self.momentum:
            raise OrtConfigError("ONNX Runtime's SGD has no momentum", fix="use momentum=0 or optimizer=adamw")
        if self.name == "sgd" and self.weight_decay not in (0, 0.0, None):
            raise OrtConfigError("ONNX Runtime's SGD has no weight decay",
                                 fix="use weight_decay=0 or optimizer=adamw")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise OrtConfigError(f"betas must be in [0, 1), got {self.betas}")

    @classmethod
    def create(cls, name: str = "adamw", **kw: Any) -> "OptimizerSpec":
        """Torch defaults for the chosen optimizer, overridden by ``kw`` (``None`` values ignored)."""
        kw = {k: v for k, v in kw.items() if v is not None}
        if name == "sgd":
            kw.setdefault("weight_decay", 0.0)
            kw.setdefault("lr", 0.01)
        if "betas" in kw:
            b = kw["betas"]
            if isinstance(b, str):
                b = [float(x) for x in b.split("|")]
            kw["betas"] = (float(b[0]), float(b[1]))
        return cls(name=name, **kw)

    def torch_optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The torch optimizer that takes the same steps."""
        params = [p for p in params if p.requires_grad]
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

    def ort_block(self) -> Any:
        """The onnxblock optimizer for ``generate_artifacts``."""
        from onnxruntime.training import artifacts, onnxblock
        from onnxruntime.training.onnxblock.optim.optim import AdamWOptimizer

        if self.name == "sgd":
            return artifacts.OptimType.SGD

        class TorchAdamW(AdamWOptimizer):  # ORT's op, in torch.optim.AdamW's mode
            def _build_optimizer_node(self, input_names, output_name, node_name, node_attributes):  # type: ignore[override]
                return super()._build_optimizer_node(input_names, output_name, node_name,
                                                     dict(node_attributes, adam_mode=0))

        block = onnxblock.optim.AdamW(bias_correction=True, betas=self.betas, eps=self.eps,
                                      weight_decay=self.weight_decay)
        block._adamw = TorchAdamW(bias_correction=True, betas=self.betas, eps=self.eps,
                                  weight_decay=self.weight_decay)
        return block

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        if self.name == "adamw":
            d["ort_adam_mode"] = 0
        else:
            d.pop("betas"), d.pop("eps")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OptimizerSpec":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)
