"""Numeric checks that hold a rewrite to the promise its semantics make.

- EXACT: outputs *and* gradients wrt the (floating) inputs equal the original's within the
  dtype's tolerance (max abs difference relative to the reference's max magnitude).
- PRESERVING_AT_INIT: outputs equal right after the rewrite (same tolerance).
- APPROXIMATE: the relative L2 error of the outputs is measured and must stay within the
  pass's ``budget``.

All checks run in eval mode (deterministic: no dropout, BatchNorm uses running stats) with
gradients enabled only where needed; the modules' training flags and buffers are restored.
A pass may add a ``reference`` module that the rewrite must match exactly, and its own
``check`` measurements. When the original graph is itself random in eval mode (training-mode
randomness baked in by tracing in train mode), a pass may set ``reference_is_baseline``: the
semantic check then compares with the reference instead (recorded in the verification details).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from graphopt.errors import VerificationError

if TYPE_CHECKING:
    from graphopt.pass_infra import Pass, PassResult

__all__ = ["Verification", "verify_rewrite", "compare_outputs", "max_rel_error", "rel_l2_error",
           "tolerance_for", "run_with_grads"]

_TOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
GRAD_TOL_FACTOR = 10.0  # gradients go through twice the ops; allow one more digit
_HALF = (torch.float16, torch.bfloat16)


def tolerance_for(dtype: torch.dtype) -> float:
    return _TOL.get(dtype, 1e-4)


@dataclass
class Verification:
    status: str  # "passed" | "failed" | "skipped"
    semantics: str
    metric: str | None = None
    value: float | None = None
    limit: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def as_dict(self) -> dict[str, Any]:
        d = {"status": self.status, "semantics": self.semantics}
        for k in ("metric", "value", "limit", "message"):
            v = getattr(self, k)
            if v not in (None, ""):
                d[k] = v
        if self.details:
            d["details"] = self.details
        return d

    def summary(self) -> str:
        if self.status == "skipped":
            return f"skipped ({self.message})" if self.message else "skipped"
        if self.value is None:
            return self.status
        return f"{self.status}: {self.metric} {self.value:.2e} <= {self.limit:.1e}" if self.ok else (
            f"FAILED: {self.metric} {self.value:.2e} > {self.limit:.1e}")


def _floats(values: Sequence[Any]) -> list[torch.Tensor]:
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]


def max_rel_error(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """max |a - e| / max |e| over all tensors (0 when both are empty)."""
    worst = 0.0
    for a, e in zip(actual, expected):
        e64, a64 = e.detach().double(), a.detach().double()
        scale = e64.abs().max().item() if e64.numel() else 0.0
        diff = (a64 - e64).abs().max().item() if e64.numel() else 0.0
        if diff != diff:  # NaN
            return float("inf")
        worst = max(worst, diff / max(scale, 1e-12))
    return worst


def rel_l2_error(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """||a - e|| / ||e|| over all tensors together."""
    num = den = 0.0
    for a, e in zip(actual, expected):
        e64, a64 = e.detach().double(), a.detach().double()
        num += (a64 - e64).pow(2).sum().item()
        den += e64.pow(2).sum().item()
    if num != num:
        return float("inf")
    return (num ** 0.5) / max(den ** 0.5, 1e-12)


def run_with_grads(module: nn.Module, inputs: Sequence[torch.Tensor], grads: bool,
                   seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Eval-mode outputs (flattened) and, if ``grads``, d<outputs, fixed cotangent>/d inputs."""
    was_training = module.training
    module.eval()
    try:
        xs = [x.detach().clone().requires_grad_(grads and x.is_floating_point()) for x in inputs]
        with torch.set_grad_enabled(grads):
            out = module(*xs)
        flat, _ = tree_flatten(out)
        outs = [o for o in flat if isinstance(o, torch.Tensor)]
        in_grads: list[torch.Tensor | None] = []
        diff = [o for o in outs if o.requires_grad]
        if grads and diff:
            gen = torch.Generator().manual_seed(seed)
            cot = [torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o.dtype) for o in diff]
            leaves = [x for x in xs if x.requires_grad]
            got = torch.autograd.grad(diff, leaves, cot, allow_unused=True) if leaves else ()
            it = iter(got)
            in_grads = [next(it) if x.requires_grad else None for x in xs]
        return [o.detach() for o in outs], in_grads
    finally:
        module.train(was_training)


def compare_outputs(after: list[torch.Tensor], before: list[torch.Tensor]) -> str | None:
    """A reason the two output lists cannot be compared, or None."""
    if len(after) != len(before):
        return f"the rewrite returns {len(after)} tensors, the original {len(before)}"
    for i, (a, b) in enumerate(zip(after, before)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(a.shape)}, the original {tuple(b.shape)}"
    return None


def _has_half(module: nn.Module) -> bool:
    if any(t.dtype in _HALF for t in list(module.parameters()) + list(module.buffers())):
        return True
    graph = getattr(module, "graph", None)
    if graph is not None:
        for node in graph.nodes:
            if any(a in _HALF for a in list(node.args) + list(node.kwargs.values())):
                return True
    return False


def _check_grads(before: nn.Module, after: nn.Module, inputs: Sequence[torch.Tensor],
                 ver: Verification, limit: float,
                 grads: tuple[list[torch.Tensor | None], list[torch.Tensor | None]] | None = None) -> dict[str, Any]:
    """Input gradients of both graphs: relative L2 error in their own dtype, re-checked in float64
    when that fails.

    Gradients of piecewise-linear networks (ReLU, max-pool) are discontinuous: a float32
    rounding difference of 1e-7 can flip a ReLU mask near zero and change a gradient element
    by O(1) (seen on ResNet-18 + channels_last: 0.2% relative L2, 2% max). In float64 such flips
    are vanishingly rare, so an exact rewrite matches there to ~1e-10; a real bug does not.
    Graphs holding half-precision casts are judged in their own dtype only.
    """
    import copy

    if not any(x.is_floating_point() for x in inputs):
        return {"input_grads": "not checked (no floating inputs)"}
    # first in the graphs' own dtype (cheap); only a mismatch there is re-checked in float64
    if grads is None:
        _, ref_g = run_with_grads(before, inputs, True)
        _, new_g = run_with_grads(after, inputs, True)
    else:
        ref_g, new_g = grads
    pairs = [(a, b) for a, b in zip(new_g, ref_g) if a is not None and b is not None]
    if not pairs:
        return {"input_grads": "not checked (no floating inputs reach the outputs)"}
    gerr, glim, metric = rel_l2_error(*zip(*pairs)), limit * GRAD_TOL_FACTOR, "rel_l2_error"
    if gerr > glim and not (_has_half(before) or _has_half(after)):
        try:
            b64, a64 = copy.deepcopy(before).double(), copy.deepcopy(after).double()
            x64 = [x.double() if x.is_floating_point() else x for x in inputs]
            _, ref_g = run_with_grads(b64, x64, True)
            _, new_g = run_with_grads(a64, x64, True)
            pairs = [(a, b) for a, b in zip(new_g, ref_g) if a is not None and b is not None]
            gerr = max_rel_error(*zip(*pairs))
            glim, metric = 10 * tolerance_for(torch.float64), "max_rel_error (float64)"
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    if gerr > glim:
        ver.status = "failed"
        ver.message = f"input gradients differ: {metric} {gerr:.2e} > {glim:.1e}"
    return {"input_grad_error": gerr, "input_grad_metric": metric}


def verify_rewrite(pass_: "Pass", before: nn.Module, after: nn.Module,
                   inputs: Sequence[torch.Tensor], result: "PassResult") -> Verification:
    """Check ``after`` against ``before`` as ``pass_.semantics`` promises; never raises for a
    failed check (the caller decides), only returns the :class:`Verification`."""
    if result.reference is not None and result.reference_is_baseline:
        # The original graph is random even in eval mode (training-mode randomness such as
        # stochastic depth baked in when it was traced in train mode), so no rewrite can equal
        # it; the pass's reference states its deterministic eval-mode function instead.
        ver = _verify_against(pass_, result.reference, after, inputs, result)
        ver.details["baseline"] = ("the pass's reference: the original graph is random in eval mode "
                                   "(training-mode randomness baked in at capture)")
        return ver
    return _verify_against(pass_, before, after, inputs, result)


def _verify_against(pass_: "Pass", before: nn.Module, after: nn.Module,
                    inputs: Sequence[torch.Tensor], result: "PassResult") -> Verification:
    from graphopt.pass_infra import Semantics

    sem = pass_.semantics
    want_grads = sem is Semantics.EXACT
    ref_out, ref_grads = run_with_grads(before, inputs, want_grads)
    new_out, new_grads = run_with_grads(after, inputs, want_grads)
    mismatch = compare_outputs(new_out, ref_out)
    if mismatch:
        return Verification("failed", sem.value, message=mismatch)
    ref_f, new_f = _floats(ref_out), _floats(new_out)
    details: dict[str, Any] = {}
    nonfinite = any(not torch.isfinite(t).all() for t in new_f) and all(torch.isfinite(t).all() for t in ref_f)
    if nonfinite:
        return Verification("failed", sem.value, message="the rewrite produces inf/NaN outputs")
    ints_equal = all(torch.equal(a, b) for a, b in zip(new_out, ref_out) if not a.is_floating_point())
    if not ints_equal:
        return Verification("failed", sem.value, message="integer outputs differ")

    if sem is Semantics.APPROXIMATE:
        value = rel_l2_error(new_f, ref_f)
        limit = float(pass_.budget if pass_.budget is not None else 0.0)
        ver = Verification("passed" if value <= limit else "failed", sem.value, "rel_l2_error", value, limit)
    else:
        dtype = ref_f[0].dtype if ref_f else torch.float32
        limit = tolerance_for(dtype)
        value = max_rel_error(new_f, ref_f)
        ver = Verification("passed" if value <= limit else "failed", sem.value, "max_rel_error", value, limit)
        if want_grads:
            details.update(_check_grads(before, after, inputs, ver, limit, (ref_grads, new_grads)))

    if result.reference is not None:
        rout, _ = run_with_grads(result.reference, inputs, False)
        rmis = compare_outputs(new_out, rout)
        rerr = float("inf") if rmis else max_rel_error(new_f, _floats(rout))
        rlim = tolerance_for(new_f[0].dtype if new_f else torch.float32)
        details["reference_max_rel_error"] = rerr
        if rerr > rlim:
            ver.status = "failed"
            ver.message = rmis or f"differs from the pass's exact reference: {rerr:.2e} > {rlim:.1e}"
    try:
        details.update(pass_.check(before, after, tuple(inputs), result))
    except VerificationError as exc:
        ver.status = "failed"
        ver.message = str(exc)
    ver.details.update(details)
    return ver
