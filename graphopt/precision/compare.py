"""How a precision rewrite is judged: its error against a float64 reference, next to torch.autocast's.

Relative L2 errors (:func:`graphopt.verify.rel_l2_error`) of the outputs and of all gradients
(inputs and parameters, for a fixed random cotangent: :func:`graphopt.verify.run_with_grads`).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from graphopt.errors import VerificationError
from graphopt.ir import eval_mode
from graphopt.precision.ops import UNIT_ROUNDOFF, first_line
from graphopt.verify import rel_l2_error, run_with_grads

__all__ = ["compare_with_references"]


def _runtime_cast_counter() -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            if func is torch.ops.aten._to_copy.default:
                self.n += 1
            return func(*args, **(kwargs or {}))

    return _Count()


@dataclass
class _Run:
    outputs: list[torch.Tensor]
    grads: dict[str, torch.Tensor]
    casts: int | None = None


class _WithParams(nn.Module):
    """``module`` as a function of its inputs *and* its trainable parameters (so
    :func:`run_with_grads` returns parameter gradients too); the forward runs under ``contexts``."""

    def __init__(self, module: nn.Module, names: list[str], n_inputs: int, contexts: list[Any]) -> None:
        super().__init__()
        self.module = module
        self.names = names
        self.n_inputs = n_inputs
        self.contexts = contexts

    def forward(self, *args: torch.Tensor) -> Any:
        xs, ps = args[:self.n_inputs], args[self.n_inputs:]
        with contextlib.ExitStack() as stack:
            for c in self.contexts:
                stack.enter_context(c)
            return torch.func.functional_call(self.module, dict(zip(self.names, ps)), xs)


def _forward_backward(module: nn.Module, inputs: Sequence[torch.Tensor], *, double: bool = False,
                      autocast: torch.dtype | None = None, count_casts_: bool = False, seed: int = 0) -> _Run:
    """Eval-mode outputs and gradients (wrt floating inputs and trainable parameters) of
    ``<outputs, fixed random cotangent>``; optionally under ``torch.autocast`` and counting the
    casts one forward runs."""
    xs = [x.double() if double and x.is_floating_point() else x for x in inputs]
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    counter = _runtime_cast_counter() if count_casts_ else None
    device = next((x.device.type for x in xs), "cpu")
    contexts: list[Any] = [torch.autocast(device, dtype=autocast)] if autocast is not None else []
    if counter is not None:
        contexts.append(counter)
    wrapped = _WithParams(module, [n for n, _ in params], len(xs), contexts)
    with eval_mode(module):
        outs, grads = run_with_grads(wrapped, [*xs, *(p for _, p in params)], True, seed=seed)
    names = [f"input{i}" for i, x in enumerate(xs) if x.is_floating_point()] + [n for n, _ in params]
    floating = [g for v, g in zip([*xs, *(p for _, p in params)], grads or [None] * (len(xs) + len(params)))
                if v.is_floating_point()]
    return _Run([o for o in outs if o.is_floating_point()],
                {n: g for n, g in zip(names, floating) if g is not None},
                counter.n if counter is not None else None)


def _errors(run: _Run, ref: _Run) -> dict[str, float]:
    names = [n for n in ref.grads if n in run.grads and run.grads[n].shape == ref.grads[n].shape]
    return {"outputs": rel_l2_error(run.outputs, ref.outputs),
            "grads": rel_l2_error([run.grads[n] for n in names], [ref.grads[n] for n in names])}


def compare_with_references(before: nn.Module, after: nn.Module, inputs: Sequence[torch.Tensor],
                            dtype: torch.dtype, factor: float) -> dict[str, Any]:
    """Errors of graphopt's graph and of torch.autocast on ``before`` against a float64
    reference (relative L2 of outputs and of all gradients: inputs + parameters); raises
    :class:`VerificationError` when graphopt's error exceeds ``factor`` x autocast's (floored at
    the low dtype's unit roundoff)."""
    name = str(dtype).replace("torch.", "")
    device = next((x.device.type for x in inputs), "cpu")
    details: dict[str, Any] = {"dtype": name, "device": device, "autocast_factor": factor,
                               "metric": "relative L2 error vs the reference (outputs; gradients wrt "
                                         "inputs and parameters for a fixed random cotangent)"}
    ours = _forward_backward(after, inputs, count_casts_=True)
    ref: _Run | None = None
    try:
        ref = _forward_backward(copy.deepcopy(before).double(), inputs, double=True)
        details["reference"] = "float64"
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        details["reference"] = f"float32 (float64 unavailable: {first_line(exc)})"
        ref = _forward_backward(before, inputs)
    fp32 = _forward_backward(before, inputs)
    details["float32"] = _errors(fp32, ref) if details["reference"] == "float64" else {"outputs": 0.0, "grads": 0.0}
    details["graphopt"] = _errors(ours, ref)
    details["runtime_casts_per_forward"] = {"graphopt": ours.casts}
    try:
        ac = _forward_backward(before, inputs, autocast=dtype, count_casts_=True)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        details["autocast"] = {"skipped": f"torch.autocast({device!r}, {name}) fails here: {first_line(exc)}"}
        details["factor_check"] = "not applied (no autocast run to compare with)"
        return details
    details["autocast"] = _errors(ac, ref)
    details["runtime_casts_per_forward"]["autocast"] = ac.casts
    floor = UNIT_ROUNDOFF.get(dtype, 0.0)
    ratios: dict[str, float] = {}
    for key in ("outputs", "grads"):
        base = max(details["autocast"][key], floor)
        ratios[key] = details["graphopt"][key] / base if base > 0 else 0.0
    details["ratio_to_autocast"] = ratios
    details["factor_check"] = (f"graphopt error <= {factor} x max(autocast error, unit roundoff "
                               f"{floor:.2e}), for outputs and gradients")
    bad = [k for k, r in ratios.items() if not r <= factor]
    if bad:
        k = bad[0]
        raise VerificationError(
            f"{k}: graphopt's {name} error {details['graphopt'][k]:.2e} is {ratios[k]:.2f}x torch.autocast's "
            f"{details['autocast'][k]:.2e} (allowed {factor}x) against the {details['reference']} reference",
            fix="keep more ops in float32 (exclude=...) or raise autocast_factor")
    return details

