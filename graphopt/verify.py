"""Numeric checks that hold a rewrite to the promise its two semantic axes make.

A pass declares what its **eval function** does (``semantics``) and what **training** does
(``training = "same"`` or ``"changes"`` with a reason). What is checked:

================  ==============================================================================
EXACT, same       eval mode, the model's own weights, the example batch: outputs; eval mode at a
                  *randomized state* (random BatchNorm statistics and affine parameters, random
                  weights at their own scale) on one sample of a second, random batch: outputs (an
                  exact rewrite holds for all weights); train mode at the randomized state on that
                  sample (fixed RNG, random regularisers disabled): outputs, input and parameter
                  gradients, BatchNorm running statistics after the step.
EXACT, changes    eval mode at own weights (example batch): outputs; at the randomized state
                  (second batch): outputs and input gradients.
PRESERVING        eval-mode outputs at the given weights; training "same": train-mode outputs
_AT_INIT          and running statistics at the given weights.
APPROXIMATE       relative L2 error of the eval-mode outputs within the pass's ``budget``;
                  training "same": the train-mode outputs too.
================  ==============================================================================

How it stays cheap: every configuration is one run per graph, forward and backward only where
gradients are compared (outputs, input and parameter gradients come from one backward; in eval
mode the backward skips weight gradients). The own-weights outputs are those of the annotation
runs that capture and the pass manager make anyway (same seed; reused only while the graph's
code, tensors and the inputs are unchanged, and only for float32/64 graphs). An image model's
second batch is cropped to a quarter of each spatial side (not below 32): a sixteenth of the
work; only where the original cannot run at that size, or a check fails there, are the
randomized-state checks re-run at the example's size, and that result stands (a rewrite may
specialise to the example's shapes). The randomized state is drawn once and, when the pass did
not change any values, carried into the rewrite by name (else the pass is re-run on the
randomized original). Float32 results are compared as norms over whole tensors and tensor
sets (element-wise relative error is meaningless on near-zero quantities such as fresh running
means or bias gradients); only a mismatch is re-run in float64 to confirm it (graphs that
compute in half precision are lifted to float64 for that, casts included, so an exact rewrite
of a half-precision graph is judged against the original at the same precision). Every failed
check is listed in :attr:`Verification.failures`; none overwrites another.

Dropout on a 4-D tensor draws a different mask when the tensor is channels_last (equal in
distribution, not element-wise), so train-mode comparisons run with random regularisers
(dropout, stochastic depth, drop-path, drop-block) disabled in both graphs, and the record
says so.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from graphopt.errors import VerificationError

if TYPE_CHECKING:
    from graphopt.pass_infra import Pass, PassResult

__all__ = ["Verification", "verify_rewrite", "compare_outputs", "max_rel_error", "rel_l2_error",
           "tolerance_for", "run_with_grads", "randomize_state", "random_state", "second_batch",
           "train_step_check"]

log = logging.getLogger(__name__)

_TOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
GRAD_TOL_FACTOR = 10.0  # gradients go through twice the ops; allow one more digit
# Float32 gradients of two exact graphs differ where a rounding difference flips a ReLU mask
# near zero; BatchNorm's batch-statistic backward (train mode) amplifies that. Measured on
# ResNet-50 + channels_last, batch 1 and 2, own and random weights: eval <= 6e-3, train <= 5.3e-2
# (relative L2 of the worst tensor). Above these limits a mismatch is confirmed in float64.
EVAL_GRAD_TOL = 2e-2
TRAIN_GRAD_TOL = 1.5e-1
# A float64 gradient mismatch with equal outputs is arbitrated by central finite differences
# along the gradients' difference (step: this fraction of the perturbed tensors' norm): the
# rewrite passes when its derivative is within FD_TOL (of the difference's squared norm) of the
# finite difference, i.e. the original's backward is the wrong one (a framework bug).
FD_STEP = 1e-6
FD_TOL = 1e-2
_HALF = (torch.float16, torch.bfloat16)
RANDOM_SEED = 1234  # the randomized state and the second batch


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
    training: str = "same"
    checks: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def fail(self, message: str) -> None:
        """Record one failed check (all are kept; the message lists them in order)."""
        self.status = "failed"
        self.failures.append(message)
        self.message = "; ".join(self.failures)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"status": self.status, "semantics": self.semantics, "training": self.training}
        for k in ("metric", "value", "limit", "message"):
            v = getattr(self, k)
            if v not in (None, ""):
                d[k] = v
        if self.failures:
            d["failures"] = list(self.failures)
        if self.checks:
            d["checks"] = list(self.checks)
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


# ----------------------------------------------------------------------------- metrics


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


def _sq(t: torch.Tensor) -> float:
    t = t.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return float(torch.linalg.vector_norm(t).item()) ** 2


def rel_l2_error(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """||a - e|| / ||e|| over all tensors together."""
    num = den = 0.0
    for a, e in zip(actual, expected):
        num += _sq(a.detach().to(e.dtype) - e.detach()) if e.numel() else 0.0
        den += _sq(e) if e.numel() else 0.0
    if num != num:
        return float("inf")
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return (num ** 0.5) / (den ** 0.5)


def max_tensor_rel_l2(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """The worst tensor's ||a - e|| / ||e||, with ||e|| floored at 1% of the set's root-mean-square
    tensor norm (a near-zero tensor, such as a fresh bias gradient, says nothing relative to itself)."""
    pairs = [(a.detach().to(e.dtype), e.detach()) for a, e in zip(actual, expected) if e.numel()]
    if pairs and all(e.dtype in (torch.float32, torch.float64) and e.device == pairs[0][1].device
                     for _, e in pairs):
        # one difference alive at a time (a model's worth of them at once costs more in fresh pages
        # than the arithmetic), one host sync for all the norms
        nums = [float(n) ** 2 for n in torch.stack([torch.linalg.vector_norm(a - e).double()
                                                    for a, e in pairs]).tolist()]
        dens = [float(n) ** 2 for n in torch.stack([torch.linalg.vector_norm(e).double()
                                                    for _, e in pairs]).tolist()]
    else:
        nums = [_sq(a - e) for a, e in pairs]
        dens = [_sq(e) for _, e in pairs]
    if not nums:
        return 0.0
    if any(n != n for n in nums):
        return float("inf")
    floor = 1e-2 * (sum(dens) / len(dens)) ** 0.5
    if floor == 0.0:
        return 0.0 if sum(nums) == 0.0 else float("inf")
    return max(n ** 0.5 / max(d ** 0.5, floor) for n, d in zip(nums, dens))


def compare_outputs(after: list[torch.Tensor], before: list[torch.Tensor]) -> str | None:
    """A reason the two output lists cannot be compared, or None."""
    if len(after) != len(before):
        return f"the rewrite returns {len(after)} tensors, the original {len(before)}"
    for i, (a, b) in enumerate(zip(after, before)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(a.shape)}, the original {tuple(b.shape)}"
    return None


def _compute_dtype(before: nn.Module, after: nn.Module, outputs: Sequence[torch.Tensor]) -> torch.dtype:
    """The lowest precision either graph computes in (an exact rewrite of a half-precision graph
    is judged with the half-precision tolerance)."""
    found: set[torch.dtype] = set()
    for m in (before, after):
        found.update(t.dtype for t in m.parameters() if t.dtype in _HALF)
        found.update(t.dtype for t in m.buffers() if t.dtype in _HALF)
        graph = getattr(m, "graph", None)
        if graph is not None:
            for n in graph.nodes:
                for a in (*n.args, *n.kwargs.values()):
                    if isinstance(a, torch.dtype) and a in _HALF:
                        found.add(a)
    if torch.bfloat16 in found:
        return torch.bfloat16
    if torch.float16 in found:
        return torch.float16
    return outputs[0].dtype if outputs else torch.float32


# ----------------------------------------------------------------------------- state


def _is_norm_affine(module: nn.Module, leaf: str) -> bool:
    from torch.nn.modules.batchnorm import _NormBase

    return isinstance(module, (_NormBase, nn.GroupNorm, nn.LayerNorm)) and leaf in ("weight", "bias")


def random_state(module: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every floating parameter and buffer of ``module``, by name.

    BatchNorm statistics at trained-looking scales: running variances U(0.2, 3), a quarter of
    the channels log-uniform in [1e-4, 1e-2] (so ``eps`` matters there), running means ~ N(0, 0.5), scales
    ``sqrt(var) * U(0.5, 1.5)`` (so each channel's gain stays O(1) and deep networks stay finite)
    and shifts ~ N(0, 0.5). Other norm scales ~ U(0.5, 1.5), shifts ~ N(0, 0.5); every other
    tensor uniform with standard deviation ``s``, its own (its mean magnitude, or 0.1, when that
    is zero). Same strides and dtypes as the originals; integer buffers (``num_batches_tracked``)
    are left out.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    mods = dict(module.named_modules())
    named = list(module.named_parameters()) + list(module.named_buffers())
    variances: dict[str, torch.Tensor] = {}
    for name, t in named:  # BatchNorm variances first: the scales follow them
        if t.is_floating_point() and name.rpartition(".")[2] == "running_var":
            small = torch.exp(torch.empty(t.shape, dtype=torch.float64).uniform_(-9.2, -4.6, generator=gen))
            usual = torch.empty(t.shape, dtype=torch.float64).uniform_(0.2, 3.0, generator=gen)
            pick = torch.rand(t.shape, generator=gen) < 0.25
            variances[name.rpartition(".")[0]] = torch.where(pick, small, usual)
    for name, t in named:
        if not t.is_floating_point() or name in out:
            continue
        prefix, _, leaf = name.rpartition(".")
        owner = mods.get(prefix)
        shape = t.shape
        var = variances.get(prefix)
        if leaf == "running_var" and var is not None:
            v = var
        elif leaf == "running_mean":
            v = torch.randn(shape, generator=gen) * 0.5
        elif leaf == "weight" and var is not None and var.shape == shape:
            v = var.sqrt() * (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5)
        elif leaf == "bias" and var is not None:
            v = torch.randn(shape, generator=gen) * 0.5
        elif owner is not None and _is_norm_affine(owner, leaf):
            v = (torch.rand(shape, generator=gen) + 0.5) if leaf == "weight" else torch.randn(shape, generator=gen) * 0.5
        else:
            t32 = t.detach().reshape(-1)[:: max(1, t.numel() // 4096)].float()  # a sample gives the scale
            s = t32.std().item() if t32.numel() > 1 else 0.0
            if not s or s != s:
                s = t32.abs().mean().item() if t32.numel() else 0.0
            if not s or s != s:
                s = 0.1
            if t.dtype in (torch.float32, torch.float64):  # drawn in place: same strides, no copy
                out[name] = torch.empty_like(t.detach()).uniform_(-s * 3 ** 0.5, s * 3 ** 0.5, generator=gen)
                continue
            v = torch.empty(shape).uniform_(-s * 3 ** 0.5, s * 3 ** 0.5, generator=gen)  # std s, cheaper than normal
        new = torch.empty_like(t.detach())
        new.copy_(v)
        out[name] = new
    return out


def _swap_state(module: nn.Module, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put ``values`` into ``module``'s parameters/buffers without copying (``.data`` swaps);
    returns the previous tensors, to swap back."""
    old: dict[str, torch.Tensor] = {}
    for name, v in values.items():
        prefix, _, leaf = name.rpartition(".")
        owner = module.get_submodule(prefix) if prefix else module
        if leaf in owner._parameters and owner._parameters[leaf] is not None:
            p = owner._parameters[leaf]
            old[name] = p.data
            p.data = v
        elif leaf in owner._buffers and owner._buffers[leaf] is not None:
            old[name] = owner._buffers[leaf]
            owner._buffers[leaf] = v
    return old


def randomize_state(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give ``module`` a random state in place (see :func:`random_state`); returns it."""
    _swap_state(module, random_state(module, seed))
    return module


def second_batch(inputs: Sequence[Any], seed: int = RANDOM_SEED) -> tuple[Any, ...]:
    """A random batch like ``inputs``: floating tensors ~ N(mean, std) of the example's own
    statistics; anything else is reused."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x32 = x.detach().float()
            std = x32.std().item() if x32.numel() > 1 else 1.0
            std = std if std and std == std else 1.0
            mean = x32.mean().item() if x32.numel() else 0.0
            out.append((torch.randn(x.shape, generator=gen) * std + mean).to(x.dtype))
        else:
            out.append(x)
    return tuple(out)


def _second_sample(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """One sample of the second batch (the whole second batch when the batch dimension is not clear)."""
    batch = second_batch(inputs)
    return _slice1(batch) or batch


def _slice1(inputs: Sequence[Any]) -> tuple[Any, ...] | None:
    """The first sample of a batch (when every tensor input has a batch > 1), else None."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if not tensors or any(x.dim() == 0 or x.shape[0] < 2 for x in tensors):
        return None
    if len({x.shape[0] for x in tensors}) != 1:
        return None
    return tuple(x[:1] if isinstance(x, torch.Tensor) else x for x in inputs)


# ----------------------------------------------------------------------------- running


@dataclass
class _Run:
    outputs: list[torch.Tensor]
    input_grads: list[torch.Tensor | None]
    param_grads: dict[str, torch.Tensor | None]
    buffers: dict[str, torch.Tensor]


_RANDOM_MODULES = ("Dropout", "AlphaDropout", "FeatureAlphaDropout", "DropPath", "StochasticDepth",
                   "DropBlock", "ScaledDotProductAttention")  # the last: its attention dropout
_RANDOM_FUNCTIONS = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
                     "drop_path", "stochastic_depth", "drop_block2d", "drop_block3d", "bernoulli", "rand",
                     "rand_like", "randn", "randn_like", "randint", "randperm", "native_dropout")


def _is_random_module(m: nn.Module) -> bool:
    return any(type(m).__name__.startswith(k) for k in _RANDOM_MODULES)


def _random_function_nodes(module: nn.Module) -> list[fx.Node]:
    graph = getattr(module, "graph", None)
    if graph is None:
        return []
    out = []
    for n in graph.nodes:
        if n.op in ("call_function", "call_method"):
            name = getattr(n.target, "__name__", str(n.target)).rstrip("_")
            if name in _RANDOM_FUNCTIONS:
                out.append(n)
    return out


def _dropout_like(n: fx.Node) -> bool:
    name = getattr(n.target, "__name__", str(n.target)).rstrip("_")
    return name in ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
                    "drop_path", "stochastic_depth", "drop_block2d", "drop_block3d")


def _without_random_functions(module: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``module`` with functional dropout-like calls replaced by their input (the
    module itself when it has none)."""
    nodes = [n for n in _random_function_nodes(module) if _dropout_like(n)]
    if not nodes or not isinstance(module, fx.GraphModule):
        return module, 0
    from graphopt.ir import copy_graph

    gm = copy_graph(module)
    count = 0
    for n in list(gm.graph.nodes):
        if n.op in ("call_function", "call_method") and _dropout_like(n) and n.args:
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            count += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, count


class _mode:
    """Context manager: ``module`` in train or eval mode for one run, random regularisers quiet
    (train mode), running statistics restored afterwards; the module's flags are restored."""

    def __init__(self, module: nn.Module, train: bool, quiet_random: bool = True):
        self.module, self.train, self.quiet = module, train, quiet_random
        self.disabled: list[nn.Module] = []
        self.saved: dict[str, torch.Tensor] = {}
        self.was_training = module.training

    def __enter__(self) -> nn.Module:
        module = self.module
        module.train(self.train)
        if self.train:
            if self.quiet:
                self.disabled = [m for m in module.modules() if _is_random_module(m) and m.training]
                for m in self.disabled:
                    m.training = False
            self.saved = {k: b.detach().clone() for k, b in module.named_buffers()}
        return module

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved.items():
            prefix, _, leaf = k.rpartition(".")
            owner = self.module.get_submodule(prefix) if prefix else self.module
            owner._buffers[leaf].copy_(v)
        for m in self.disabled:
            m.training = True
        self.module.train(self.was_training)


def _forward(module: nn.Module, inputs: Sequence[Any], grads: bool, seed: int
             ) -> tuple[list[Any], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Inputs as run (floating ones requiring grad when ``grads``), flattened tensor outputs, the
    differentiable ones and their fixed random cotangents (the objective is <outputs, cotangents>)."""
    xs = [x.detach().clone().requires_grad_(grads and x.is_floating_point()) if isinstance(x, torch.Tensor)
          else x for x in inputs]
    with torch.set_grad_enabled(grads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = module(*xs)
    outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
    diff = [o for o in outs if o.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o.dtype) for o in diff]
    return xs, outs, diff, cot


def _run(module: nn.Module, inputs: Sequence[Any], *, train: bool, grads: bool, params: bool,
         seed: int = 0, quiet_random: bool = True) -> _Run:
    """Outputs (flattened), gradients of a fixed random cotangent wrt the floating inputs and (if
    ``params``) every trainable parameter, in eval or train mode with a fixed RNG. Train mode
    also returns the floating buffers after the step (running statistics); the module's flags
    and buffers are restored."""
    with _mode(module, train, quiet_random):
        named = [(k, p) for k, p in module.named_parameters() if p.requires_grad] if (grads and params) else []
        xs, outs, diff, cot = _forward(module, inputs, grads, seed)
        in_grads: list[torch.Tensor | None] = []
        pgrads: dict[str, torch.Tensor | None] = {}
        if grads and diff:
            leaves = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
            targets = leaves + [p for _, p in named]
            got = list(torch.autograd.grad(diff, targets, cot, allow_unused=True)) if targets else []
            it = iter(got[:len(leaves)])
            in_grads = [next(it) if isinstance(x, torch.Tensor) and x.requires_grad else None for x in xs]
            pgrads = {k: g for (k, _), g in zip(named, got[len(leaves):])}
        buffers = {k: b.detach().clone() for k, b in module.named_buffers() if b.is_floating_point()} if train else {}
        return _Run([o.detach() for o in outs], in_grads, pgrads, buffers)


def _objective(module: nn.Module, inputs: Sequence[Any], train: bool, seed: int = 0) -> float:
    """<outputs, the fixed random cotangents> of one run (the function :func:`_run` differentiates)."""
    with _mode(module, train):  # gradients enabled: which outputs are differentiable decides the objective
        _, _, diff, cot = _forward(module, inputs, True, seed)
        return float(sum((o.detach().double() * c.double()).sum() for o, c in zip(diff, cot)))


def run_with_grads(module: nn.Module, inputs: Sequence[torch.Tensor], grads: bool,
                   seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Eval-mode outputs (flattened) and, if ``grads``, d<outputs, fixed cotangent>/d inputs."""
    r = _run(module, inputs, train=False, grads=grads, params=False, seed=seed)
    return r.outputs, r.input_grads


def _recalled(module: nn.Module, inputs: Sequence[Any]) -> _Run | None:
    """The eval-mode outputs of ``module``'s last annotation run on ``inputs`` as a run without
    gradients (see :func:`graphopt.analysis.cost.annotated_outputs`), for graphs that compute in
    float32/64 (the annotation's counter runs some ops decomposed: fine at float32 rounding, not
    what a half-precision graph's kernels compute)."""
    from graphopt.analysis.cost import annotated_outputs

    out = annotated_outputs(module, inputs)
    if out is None:
        return None
    flat = [o.detach() for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
    if _compute_dtype(module, module, _floats(flat)) not in (torch.float32, torch.float64):
        return None
    return _Run(flat, [], {}, {})


def _to_float64(module: nn.Module) -> nn.Module:
    """A float64 copy; half-precision dtypes named in its graph (casts) become float64 too."""
    m = copy.deepcopy(module).double()
    graph = getattr(m, "graph", None)
    if graph is not None:
        changed = False
        for n in graph.nodes:
            if any(a in _HALF for a in list(n.args) + list(n.kwargs.values())):
                n.args = tuple(torch.float64 if a in _HALF else a for a in n.args)
                n.kwargs = {k: (torch.float64 if v in _HALF else v) for k, v in n.kwargs.items()}
                changed = True
        if changed:
            m.recompile()
    return m


# ----------------------------------------------------------------------------- matching


def _counterparts(before_names: set[str], after_names: Sequence[str],
                  mapping: dict[str, str | None]) -> tuple[list[tuple[str, str]], list[str]]:
    """(after name, before name) pairs, and after names without a counterpart (not mapped to None)."""
    pairs, unmatched = [], []
    for a in after_names:
        if a in mapping:
            b = mapping[a]
            if b is not None:
                pairs.append((a, b))
            continue
        if a in before_names:
            pairs.append((a, a))
        else:
            unmatched.append(a)
    return pairs, unmatched


def _derived_state(before: nn.Module, after: nn.Module, mapping: dict[str, str | None],
                   values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The rewrite's state at the original's randomized ``values``, when every floating tensor of
    the rewrite is a copy of an original tensor (same name or mapped, same shape, equal values);
    else None (the pass transformed values: it must be re-run)."""
    bstate = dict(before.named_parameters())
    bstate.update(dict(before.named_buffers()))
    out: dict[str, torch.Tensor] = {}
    astate = dict(after.named_parameters())
    astate.update(dict(after.named_buffers()))
    for name, t in astate.items():
        if not t.is_floating_point():
            continue
        src = mapping.get(name, name) if name in mapping else name
        if src is None or src not in bstate or src not in values:
            return None
        b = bstate[src]
        if b.shape != t.shape or not torch.equal(b.detach().to(t.dtype), t.detach()):
            return None
        v = values[src]
        if isinstance(t, nn.Parameter) and v.dtype == t.dtype and v.stride() == t.stride():
            out[name] = v  # parameters are only read: share; buffers (running statistics) get their own
            continue
        new = torch.empty_like(t.detach())
        new.copy_(v)
        out[name] = new
    return out


# ----------------------------------------------------------------------------- the checks


class _Checker:
    """Runs and compares configurations, recording every check in the Verification."""

    def __init__(self, ver: Verification, before: nn.Module, after: nn.Module, mapping: dict[str, str | None]):
        self.ver = ver
        self.before = before
        self.after = after
        self.mapping = mapping
        self.cache: dict[str, Any] = {}
        self._f64: tuple[Any, ...] | None = None  # the last float64 confirmation's modules, inputs and runs

    def record(self, check: str, metric: str, value: float, limit: float, note: str = "") -> bool:
        ok = value <= limit
        entry: dict[str, Any] = {"check": check, "metric": metric, "value": value, "limit": limit,
                                 "status": "passed" if ok else "failed"}
        if note:
            entry["note"] = note
        self.ver.checks.append(entry)
        if not ok:
            self.ver.fail(f"{check}: {metric} {value:.2e} > {limit:.1e}")
        return ok

    def compare(self, label: str, before: nn.Module, after: nn.Module, inputs: Sequence[Any], *, train: bool,
                grads: bool, params: bool, out_metric: str, out_limit: float,
                ref: _Run | None = None, new: _Run | None = None, stats: bool = True,
                check_outputs: bool = True) -> tuple[_Run, _Run] | None:
        """One configuration: run both graphs (unless given), compare outputs, gradients and (train
        mode) running statistics; confirm a float32 gradient/statistics mismatch in float64."""
        said = io.StringIO()  # fx prints a failing graph's generated code: noise when the failure is expected
        try:
            with contextlib.redirect_stderr(said):
                ref = ref or _run(before, inputs, train=train, grads=grads, params=params)
        except Exception as exc:  # the original cannot run this way (e.g. BatchNorm on 1 value)
            self.ver.checks.append({"check": label, "status": "skipped",
                                    "note": f"the original cannot run: {type(exc).__name__}: {exc}"[:200]})
            return None
        sys.stderr.write(said.getvalue())  # what a run that worked said (warnings) is the user's to see
        try:
            new = new or _run(after, inputs, train=train, grads=grads, params=params)
        except Exception as exc:
            self.ver.fail(f"{label}: the rewrite fails where the original runs: {type(exc).__name__}: {exc}"[:300])
            return None
        mismatch = compare_outputs(new.outputs, ref.outputs)
        if mismatch:
            self.ver.fail(f"{label}: {mismatch}")
            return None
        ints = [(a, b) for a, b in zip(new.outputs, ref.outputs) if not a.is_floating_point()]
        if not all(torch.equal(a, b) for a, b in ints):
            self.ver.fail(f"{label}: integer outputs differ")
        ref_f, new_f = _floats(ref.outputs), _floats(new.outputs)
        if any(not torch.isfinite(t).all() for t in new_f) and all(torch.isfinite(t).all() for t in ref_f):
            self.ver.fail(f"{label}: the rewrite produces inf/NaN outputs")
            return ref, new
        metric_fn = max_rel_error if out_metric == "max_rel_error" else rel_l2_error
        out_err = metric_fn(new_f, ref_f)
        want = grads or (train and stats)
        if out_metric == "max_rel_error":  # exact / at_init
            # float32 noise levels, or one more digit than a half-precision graph's output tolerance
            glim = max(out_limit * GRAD_TOL_FACTOR, TRAIN_GRAD_TOL if train else EVAL_GRAD_TOL)
        else:
            glim = out_limit
        groups = self._grad_groups(ref, new, grads, params, train and stats) if want else {}
        errs = {g: self._metric(g, vals) for g, (vals, _) in groups.items()}
        limits = {g: out_limit * GRAD_TOL_FACTOR if g == "running statistics" else glim for g in groups}
        failing = [g for g in groups if errs[g][0] > limits[g]]
        if check_outputs and out_err > out_limit:
            failing.insert(0, "outputs")
        confirm: dict[str, tuple[float, str]] = {}
        if failing and out_metric == "max_rel_error":
            # an exact rewrite matches in float64; a float32 mismatch there is rounding amplified
            # (ReLU masks flipping, BatchNorm over few values in train mode)
            confirm = self._confirm_float64(before, after, inputs, train, grads, params, failing)
        f64_limit = GRAD_TOL_FACTOR * tolerance_for(torch.float64)
        arbiter: dict[str, tuple[float, float]] = {}
        if confirm and not ("outputs" in confirm and confirm["outputs"][0] > f64_limit):
            # outputs equal, gradients not even in float64: which gradient is the function's?
            for g in ("input gradients", "parameter gradients"):
                if g in confirm and confirm[g][0] > f64_limit:
                    fd = self._finite_differences(g, train)
                    if fd is not None:
                        arbiter[g] = fd
        self._f64 = None
        if check_outputs:
            if "outputs" in confirm:
                val, metric = confirm["outputs"]
                self.record(f"{label}: outputs", metric, val, f64_limit,
                            note=f"float32 {out_metric} {out_err:.2e}; confirmed in float64")
            else:
                self.record(f"{label}: outputs", out_metric, out_err, out_limit)
        for g, (vals, note) in groups.items():
            if g in arbiter and arbiter[g][1] <= FD_TOL:
                e_ref, e_new = arbiter[g]
                self.record(f"{label}: {g}", "directional derivative vs finite differences (float64)", e_new,
                            FD_TOL, note=(
                                f"the two graphs' {g} differ ({confirm[g][1]} {confirm[g][0]:.2e}) but the "
                                f"original's are wrong: along their difference its autograd derivative is "
                                f"off the central finite difference by {e_ref:.2f}, the rewrite's by "
                                f"{e_new:.1e} (of the difference's squared norm): a framework bug in the "
                                "original's backward at this shape, which the rewrite does not hit"))
                self.ver.details.setdefault("original_gradient_wrong", []).append(f"{label}: {g}")
            elif g in confirm:
                val, metric = confirm[g]
                if g in arbiter:
                    note = "; ".join(filter(None, [note, (
                        f"finite differences (float64) along the gradients' difference: the original's "
                        f"derivative off by {arbiter[g][0]:.2f}, the rewrite's by {arbiter[g][1]:.2f}")]))
                self.record(f"{label}: {g}", metric, val, f64_limit,
                            note=(f"float32 {errs[g][1]} {errs[g][0]:.2e}; confirmed in float64"
                                  + (f"; {note}" if note else "")))
            else:
                self.record(f"{label}: {g}", errs[g][1], errs[g][0], limits[g], note)
        return ref, new

    @staticmethod
    def _metric(group: str, vals: tuple[list[torch.Tensor], list[torch.Tensor]]) -> tuple[float, str]:
        if group == "input gradients":
            return rel_l2_error(*vals), "rel_l2_error"
        return max_tensor_rel_l2(*vals), "max_tensor_rel_l2"

    def _grad_groups(self, ref: _Run, new: _Run, grads: bool, params: bool, train: bool
                     ) -> dict[str, tuple[tuple[list[torch.Tensor], list[torch.Tensor]], str]]:
        groups: dict[str, tuple[tuple[list[torch.Tensor], list[torch.Tensor]], str]] = {}
        if grads:
            pairs = [(a, b) for a, b in zip(new.input_grads, ref.input_grads) if a is not None and b is not None]
            if pairs:
                groups["input gradients"] = (([a for a, _ in pairs], [b for _, b in pairs]), "")
        if grads and params:
            a_list, b_list, note = self._pairs(ref.param_grads, new.param_grads, "parameter")
            if a_list:
                groups["parameter gradients"] = ((a_list, b_list), note)
        if train:
            a_list, b_list, note = self._pairs(ref.buffers, new.buffers, "buffer")
            if a_list:
                groups["running statistics"] = ((a_list, b_list), note)
        return groups

    def _pairs(self, ref: dict[str, torch.Tensor | None], new: dict[str, torch.Tensor | None], kind: str
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
        pairs, unmatched = _counterparts(set(ref), list(new), self.mapping)
        a_list, b_list = [], []
        matched_b = set()
        for a_name, b_name in pairs:
            if b_name not in ref:
                continue
            b, a = ref[b_name], new[a_name]
            if a is None and b is None:
                continue
            ref_t = b if b is not None else torch.zeros_like(a)  # type: ignore[arg-type]
            new_t = a if a is not None else torch.zeros_like(ref_t)
            if ref_t.shape != new_t.shape:
                self.ver.fail(f"{kind} '{a_name}' has shape {tuple(new_t.shape)}, its original '{b_name}' "
                              f"{tuple(ref_t.shape)}")
                continue
            a_list.append(new_t)
            b_list.append(ref_t)
            matched_b.add(b_name)
        lost = [k for k, v in ref.items() if k not in matched_b and v is not None and v.abs().sum().item() > 0
                and k not in self.mapping.values()]
        gained = [k for k in unmatched if new.get(k) is not None and new[k].abs().sum().item() > 0]  # type: ignore[union-attr]
        if lost:
            self.ver.fail(f"{kind} '{lost[0]}' of the original{f' (and {len(lost) - 1} more)' if len(lost) > 1 else ''}"
                          " has no counterpart in the rewrite (the pass may name it in PassResult.param_map)")
        if gained:
            self.ver.fail(f"the rewrite's {kind} '{gained[0]}'"
                          f"{f' (and {len(gained) - 1} more)' if len(gained) > 1 else ''} has no counterpart in "
                          "the original (the pass may name it in PassResult.param_map)")
        return a_list, b_list, f"{len(a_list)} {kind}s matched by name" + (
            " or the pass's param_map" if self.mapping else "")

    def _confirm_float64(self, before: nn.Module, after: nn.Module, inputs: Sequence[Any], train: bool,
                         grads: bool, params: bool, failing: list[str]) -> dict[str, tuple[float, str]]:
        """Re-run both graphs in float64; the float32 mismatch is rounding (ReLU masks flipping near
        zero) if it vanishes there. Returns the float64 errors of the ``failing`` groups."""
        try:
            b64, a64 = _to_float64(before), _to_float64(after)
            x64 = [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
            r64 = _run(b64, x64, train=train, grads=grads, params=params)
            n64 = _run(a64, x64, train=train, grads=grads, params=params)
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            log.debug("float64 confirmation unavailable: %s", exc)
            return {}
        self._f64 = (b64, a64, x64, r64, n64)
        groups = self._grad_groups(r64, n64, grads, params, train)
        out = {}
        if "outputs" in failing and not compare_outputs(n64.outputs, r64.outputs):
            out["outputs"] = (max_rel_error(_floats(n64.outputs), _floats(r64.outputs)), "max_rel_error (float64)")
        for g in failing:
            if g in groups:
                a, b = groups[g][0]
                metric = "max_rel_error (float64)" if g == "input gradients" else "max_tensor_rel_l2 (float64)"
                out[g] = (max_rel_error(a, b) if g == "input gradients" else max_tensor_rel_l2(a, b), metric)
        return out


    def _finite_differences(self, group: str, train: bool) -> tuple[float, float] | None:
        """Arbitrate a float64 gradient mismatch (``group``: input or parameter gradients) with the
        function itself: along d = (original's gradient - rewrite's), compare each graph's autograd
        derivative <g, d> with the central finite difference of its objective (float64). The two
        derivatives differ by exactly |d|^2, so the errors (relative to |d|^2) of the right one is
        ~0 and of the wrong one ~1. Returns (original's error, rewrite's error), or None."""
        if not getattr(self, "_f64", None):
            return None
        b64, a64, x64, r64, n64 = self._f64
        if group == "input gradients":
            sites = [(i, i, ga, gb) for i, (ga, gb) in enumerate(zip(n64.input_grads, r64.input_grads))
                     if ga is not None and gb is not None and ga.shape == gb.shape]
        else:
            pairs, _ = _counterparts(set(r64.param_grads), list(n64.param_grads), self.mapping)
            sites = []
            for a_name, b_name in pairs:
                gb, ga = r64.param_grads.get(b_name), n64.param_grads.get(a_name)
                if gb is None and ga is None:
                    continue
                gb = gb if gb is not None else torch.zeros_like(ga)  # type: ignore[arg-type]
                ga = ga if ga is not None else torch.zeros_like(gb)
                if ga.shape == gb.shape:
                    sites.append((b_name, a_name, ga, gb))
        if not sites:
            return None
        d = [gb - ga for _, _, ga, gb in sites]
        dd = float(sum((t * t).sum() for t in d))
        if not dd > 0:
            return None
        if group == "input gradients":
            scale = math.sqrt(float(sum((x64[i].detach() ** 2).sum() for i, _, _, _ in sites)))
        else:
            pb = dict(b64.named_parameters())
            scale = math.sqrt(float(sum((pb[k].detach() ** 2).sum() for k, _, _, _ in sites)))
        eps = FD_STEP * max(scale, 1e-3) / math.sqrt(dd)

        def objective(module: nn.Module, which: int, sign: float) -> float:
            if group == "input gradients":
                xs = list(x64)
                for (ib, ia, _, _), t in zip(sites, d):
                    xs[ib] = (x64[ib] + sign * eps * t).detach()
                return _objective(module, xs, train)
            params = dict(module.named_parameters())
            names = [site[which] for site in sites]
            with torch.no_grad():
                for n, t in zip(names, d):
                    params[n].add_(sign * eps * t)
            try:
                return _objective(module, x64, train)
            finally:
                with torch.no_grad():
                    for n, t in zip(names, d):
                        params[n].sub_(sign * eps * t)

        try:
            errors = []
            for module, which, grads in ((b64, 0, [gb for _, _, _, gb in sites]), (a64, 1, [ga for _, _, ga, _ in sites])):
                fd = (objective(module, which, 1.0) - objective(module, which, -1.0)) / (2 * eps)
                auto = float(sum((g * t).sum() for g, t in zip(grads, d)))
                errors.append(abs(auto - fd) / dd)
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            log.debug("finite differences unavailable: %s", exc)
            return None
        return errors[0], errors[1]


def _check_grads(before: nn.Module, after: nn.Module, inputs: Sequence[torch.Tensor],
                 ver: Verification, limit: float,
                 grads: tuple[list[torch.Tensor | None], list[torch.Tensor | None]] | None = None) -> dict[str, Any]:
    """Input gradients of both graphs in eval mode: relative L2 error in their own dtype, re-checked
    in float64 when that fails.

    Gradients of piecewise-linear networks (ReLU, max-pool) are discontinuous: a float32
    rounding difference of 1e-7 can flip a ReLU mask near zero and change a gradient element
    by O(1) (seen on ResNet-18 + channels_last: 0.2% relative L2, 2% max). In float64 such flips
    are vanishingly rare, so an exact rewrite matches there to ~1e-10; a real bug does not.
    """
    if not any(isinstance(x, torch.Tensor) and x.is_floating_point() for x in inputs):
        return {"input_grads": "not checked (no floating inputs)"}
    checker = _Checker(ver, before, after, {})
    n0 = len(ver.checks)
    checker.compare("eval", before, after, inputs, train=False, grads=True, params=False,
                    out_metric="max_rel_error", out_limit=limit, check_outputs=False)
    for c in ver.checks[n0:]:
        if c["check"].endswith("input gradients"):
            return {"input_grad_error": c["value"], "input_grad_metric": c["metric"]}
    return {"input_grads": "not checked (no floating inputs reach the outputs)"}


# ----------------------------------------------------------------------------- entry points


def verify_rewrite(pass_: "Pass", before: nn.Module, after: nn.Module,
                   inputs: Sequence[torch.Tensor], result: "PassResult", *,
                   rerun: Callable[[nn.Module], nn.Module] | None = None,
                   train_step: bool = False) -> Verification:
    """Check ``after`` against ``before`` as the pass's two semantic axes promise; never raises for
    a failed check (the caller decides), only returns the :class:`Verification`.

    ``rerun``: applies the pass to another module (the randomized original) when the rewrite's
    state cannot be derived from the original's by name. ``train_step``: also run one optimizer
    step on both and compare the parameters (:func:`train_step_check`).
    """
    if result.reference is not None and result.reference_is_baseline:
        # The original graph is random even in eval mode (training-mode randomness such as
        # stochastic depth baked in when it was traced in train mode), so no rewrite can equal
        # it; the pass's reference states its deterministic eval-mode function instead.
        ver = _verify_against(pass_, result.reference, after, inputs, result, None, train_step)
        ver.details["baseline"] = ("the pass's reference: the original graph is random in eval mode "
                                   "(training-mode randomness baked in at capture)")
        return ver
    return _verify_against(pass_, before, after, inputs, result, rerun, train_step)


def _verify_against(pass_: "Pass", before: nn.Module, after: nn.Module, inputs: Sequence[torch.Tensor],
                    result: "PassResult", rerun: Callable[[nn.Module], nn.Module] | None,
                    train_step: bool) -> Verification:
    from graphopt.pass_infra import Semantics

    sem = pass_.semantics
    training = getattr(pass_, "training", "same")
    mapping = dict(getattr(result, "param_map", None) or {})
    ver = Verification("passed", sem.value, training=training)
    checker = _Checker(ver, before, after, mapping)
    exact = sem is Semantics.EXACT
    same = training == "same"
    floating_in = any(isinstance(x, torch.Tensor) and x.is_floating_point() for x in inputs)

    # 1. eval mode, own weights, example batch (the primary figure of the record): outputs. They are
    # the annotation runs' (capture, after the pass) when those are still valid and both graphs
    # compute in float32/64; gradients are compared at the randomized state (2.) and in train mode (3.)
    ref, new = _recalled(before, inputs), _recalled(after, inputs)
    if ref is None or new is None:
        ref = _run(before, inputs, train=False, grads=False, params=False)
        new = _run(after, inputs, train=False, grads=False, params=False)
    mismatch = compare_outputs(new.outputs, ref.outputs)
    if mismatch:
        ver.fail(mismatch)
        return ver
    ref_f, new_f = _floats(ref.outputs), _floats(new.outputs)
    if any(not torch.isfinite(t).all() for t in new_f) and all(torch.isfinite(t).all() for t in ref_f):
        ver.fail("the rewrite produces inf/NaN outputs")
        return ver
    if not all(torch.equal(a, b) for a, b in zip(new.outputs, ref.outputs) if not a.is_floating_point()):
        ver.fail("integer outputs differ")
        return ver
    if sem is Semantics.APPROXIMATE:
        metric, limit = "rel_l2_error", float(pass_.budget if pass_.budget is not None else 0.0)
    else:
        metric, limit = "max_rel_error", tolerance_for(_compute_dtype(before, after, ref_f))
    n0 = len(ver.checks)
    checker.compare("eval, own weights, example batch", before, after, inputs, train=False,
                    grads=False, params=False, out_metric=metric, out_limit=limit, ref=ref, new=new)
    first = ver.checks[n0] if len(ver.checks) > n0 else None
    ver.metric, ver.limit = metric, limit
    ver.value = first["value"] if first and "value" in first else None

    # 2. exact: eval mode on (one sample of) a second batch at a randomized state and, where the pass
    # computed new values (so the randomized checks run the pass again, not the emitted rewrite), at
    # the model's own weights: outputs, input gradients and (training "same") parameter gradients
    if exact and (floating_in or same) and not _values_carried(checker, before, after, mapping):
        def own(b_in: Sequence[Any], label: str) -> None:
            checker.compare(label, before, after, b_in, train=False, grads=True, params=same,
                            out_metric=metric, out_limit=limit)

        second = _second_sample(inputs)
        _small_first(checker, second, "eval, own weights, second batch", own, second)
    if exact:
        _randomized_check(pass_, checker, before, after, inputs, mapping, rerun, floating_in, same,
                          metric, limit)

    # 3. training "same": train mode (fixed RNG, random regularisers disabled)
    if same:
        _train_check(checker, before, after, inputs, exact, floating_in, metric, limit, mapping, rerun, pass_)

    for c in ver.checks:  # the input-gradient figure of the record: the first check that compared them
        if c["check"].endswith("input gradients") and "value" in c:
            ver.details["input_grad_error"] = c["value"]
            ver.details["input_grad_metric"] = c["metric"]
            break

    # 4. the pass's own exact reference and its own checks
    if result.reference is not None:
        rout, _ = run_with_grads(result.reference, inputs, False)
        rmis = compare_outputs(new.outputs, rout)
        rerr = float("inf") if rmis else max_rel_error(new_f, _floats(rout))
        rlim = tolerance_for(new_f[0].dtype if new_f else torch.float32)
        ver.details["reference_max_rel_error"] = rerr
        if rerr > rlim:
            ver.fail(rmis or f"differs from the pass's exact reference: {rerr:.2e} > {rlim:.1e}")
    try:
        ver.details.update(pass_.check(before, after, tuple(inputs), result))
    except VerificationError as exc:
        ver.fail(str(exc))
    if train_step:
        ver.details["train_step"] = train_step_check(before, after, inputs, mapping, ver)
    return ver


def _randomized_check(pass_: "Pass", checker: _Checker, before: nn.Module, after: nn.Module,
                      inputs: Sequence[Any], mapping: dict[str, str | None],
                      rerun: Callable[[nn.Module], nn.Module] | None, grads: bool, params: bool,
                      metric: str, limit: float) -> None:
    """Eval mode at the randomized state: outputs, input gradients when ``grads`` (floating inputs)
    and parameter gradients when ``params`` (training "same": a pass that changes training, such
    as freeze, changes which parameters get gradients)."""
    batch = _second_sample(inputs)

    def check(b_in: Sequence[Any], label: str) -> None:
        with _randomized_pair(checker, before, after, mapping, rerun, label) as pair:
            if pair is not None:
                checker.compare(label, pair[0], pair[1], b_in, train=False, grads=grads or params,
                                params=params, out_metric=metric, out_limit=limit)

    _small_first(checker, batch, "eval, randomized state, second batch", check, batch)


SHRINK = 4  # the randomized-state checks run image models at a quarter of each spatial side ...
SMALL_SIDE = 32  # ... but not below this


def _shrunk(batch: Sequence[Any], factor: float = 1 / SHRINK) -> tuple[Any, ...] | None:
    """``batch`` cropped to ``factor`` of each spatial side (not below :data:`SMALL_SIDE`) when it is
    an image batch: every tensor floating, 4-D or 5-D, one spatial size. Else None."""
    tensors = [x for x in batch if isinstance(x, torch.Tensor)]
    if factor >= 1 or not tensors or any(not x.is_floating_point() or x.dim() not in (4, 5) for x in tensors):
        return None
    sides = {tuple(x.shape[2:]) for x in tensors}
    if len(sides) != 1:
        return None
    old = next(iter(sides))
    new = tuple(min(d, max(SMALL_SIDE, math.ceil(d * factor))) for d in old)
    if new == old:
        return None
    crop = (slice(None), slice(None)) + tuple(slice(0, d) for d in new)
    out = []
    for x in batch:
        if isinstance(x, torch.Tensor):
            last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            keeps_last = not x.is_contiguous() and x.is_contiguous(memory_format=last)
            x = x[crop].contiguous(memory_format=last if keeps_last else torch.contiguous_format)
        out.append(x)
    return tuple(out)


def _shape_text(batch: Sequence[Any]) -> str:
    return ", ".join("x".join(map(str, x.shape)) for x in batch if isinstance(x, torch.Tensor))


def _train_shrink(before: nn.Module, inputs: Sequence[Any]) -> float:
    """The spatial factor for the train-mode check on one sample: a quarter of each side, or more
    where a BatchNorm would then normalise over fewer than :data:`MIN_BATCH_VALUES` values per
    channel (batch statistics over so few values turn float32 rounding into large differences)."""
    few = _fewest_batch_values(before)
    if few is None:
        return 1 / SHRINK
    batch = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() >= 1), 1) or 1
    per_sample = few[1] / batch
    return max(1 / SHRINK, math.sqrt(MIN_BATCH_VALUES / per_sample)) if per_sample > 0 else 1.0


def _small_first(checker: _Checker, batch: Sequence[Any], label: str,
                 check: Callable[[Sequence[Any], str], None], fallback: Sequence[Any],
                 fallback_label: str | None = None, factor: float = 1 / SHRINK) -> None:
    """Run ``check`` on ``batch`` shrunk (:func:`_shrunk`: a sixteenth of an image model's work) and,
    only when the original cannot run there or a check fails there, again on ``fallback`` (whose
    result then stands: a rewrite may specialise to the example's shapes). Without a shrunk batch,
    ``check`` runs on ``fallback``."""
    small = _shrunk(batch, factor)
    fallback_label = fallback_label or label
    if small is None:
        check(fallback, fallback_label)
        return
    ver = checker.ver
    n0, failures, status, message = len(ver.checks), list(ver.failures), ver.status, ver.message
    with contextlib.redirect_stderr(io.StringIO()):  # fx prints the generated code of a graph that raises
        check(small, f"{label} ({_shape_text(small)})")
    added = ver.checks[n0:]
    cannot = [c for c in added if c.get("status") == "skipped" and "the original cannot run" in c.get("note", "")]
    if len(ver.failures) == len(failures) and not cannot:
        return
    why = (ver.failures[len(failures):] or [c["note"] for c in cannot])[0]
    del ver.checks[n0:]
    ver.failures[:] = failures
    ver.status, ver.message = status, message
    check(fallback, fallback_label)
    for c in ver.checks[n0:]:
        c["note"] = "; ".join(filter(None, [c.get("note", ""), f"at {_shape_text(small)}: {why}"[:240]]))


def _values_carried(checker: _Checker, before: nn.Module, after: nn.Module, mapping: dict[str, str | None]) -> bool:
    """Whether the randomized state carries into the rewrite by name (every floating tensor of the
    rewrite a copy of an original's); computes and caches that state. One random state for every
    check (same names in copies)."""
    cache = checker.cache
    if "values" not in cache:
        cache["values"] = random_state(before, RANDOM_SEED)
    key = ("derived", id(after))
    if key not in cache:
        cache[key] = _derived_state(before, after, mapping, cache["values"])
    return cache[key] is not None


class _randomized_pair:
    """Context manager: (original, rewrite) at the same random state (swapped in, swapped back)."""

    def __init__(self, checker: _Checker, before: nn.Module, after: nn.Module, mapping: dict[str, str | None],
                 rerun: Callable[[nn.Module], nn.Module] | None, label: str):
        self.c, self.before, self.after, self.mapping, self.rerun, self.label = (
            checker, before, after, mapping, rerun, label)
        self.old_b: dict[str, torch.Tensor] = {}
        self.old_a: dict[str, torch.Tensor] = {}

    def __enter__(self) -> tuple[nn.Module, nn.Module] | None:
        cache = self.c.cache
        _values_carried(self.c, self.before, self.after, self.mapping)
        values, derived = cache["values"], cache[("derived", id(self.after))]
        self.old_b = _swap_state(self.before, values)
        if derived is not None:
            self.old_a = _swap_state(self.after, derived)
            return self.before, self.after
        if self.rerun is None:
            self.c.ver.checks.append({"check": self.label, "status": "skipped",
                                      "note": "the pass transformed weights and cannot be re-run here"})
            return None
        try:
            again = cache.get("rerun") or self.rerun(self.before)
            cache["rerun"] = again
        except Exception as exc:
            self.c.ver.fail(f"{self.label}: re-running the pass on the randomized original failed: "
                            f"{type(exc).__name__}: {exc}"[:300])
            return None
        self.c.ver.details.setdefault("randomized_state", "the pass re-run on the randomized original "
                                                          "(it transforms weights)")
        return self.before, again

    def __exit__(self, *exc: Any) -> None:
        _swap_state(self.before, self.old_b)
        _swap_state(self.after, self.old_a)


MIN_BATCH_VALUES = 16  # train-mode BatchNorm statistics over fewer values per channel are ill-conditioned


def _fewest_batch_values(module: nn.Module) -> tuple[str, int] | None:
    """The BatchNorm (module or ``F.batch_norm`` in train mode) that normalises over the fewest values
    per channel on the captured example batch, and that count (from the graph's shape metadata)."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return None
    from torch.nn.modules.batchnorm import _BatchNorm

    worst: tuple[str, int] | None = None
    for n in graph.nodes:
        is_bn = (n.op == "call_module" and isinstance(module.get_submodule(str(n.target)), _BatchNorm)) or (
            n.op == "call_function" and getattr(n.target, "__name__", "") == "batch_norm")
        if not is_bn or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        tm = n.args[0].meta.get("tensor_meta")
        shape = getattr(tm, "shape", None)
        if shape is None or len(shape) < 2 or shape[1] == 0:
            continue
        count = int(torch.Size(shape).numel() // shape[1])
        if worst is None or count < worst[1]:
            worst = (str(n.target) if n.op == "call_module" else n.name, count)
    return worst


def _train_check(checker: _Checker, before: nn.Module, after: nn.Module, inputs: Sequence[Any], exact: bool,
                 floating_in: bool, metric: str, limit: float, mapping: dict[str, str | None],
                 rerun: Callable[[nn.Module], nn.Module] | None, pass_: "Pass") -> None:
    b, nb = _without_random_functions(before)
    a, na = _without_random_functions(after)
    mods = sum(1 for m in before.modules() if _is_random_module(m))
    if nb or na or mods:
        checker.ver.details["train_mode"] = (
            f"compared with random regularisers disabled in both graphs ({max(nb, na) + mods} sites): a "
            "channels_last tensor draws a different dropout mask (equal in distribution, not element-wise)")
    if not exact:
        few = _fewest_batch_values(before)
        if metric != "max_rel_error" and few is not None and few[1] < MIN_BATCH_VALUES:
            checker.ver.checks.append({
                "check": "train, own weights, example batch", "status": "skipped",
                "note": (f"BatchNorm '{few[0]}' normalises over {few[1]} values per channel on this batch: "
                         "batch statistics that ill-conditioned turn any approximation into a different "
                         "output; give a larger example batch to check train mode")})
            return
        # at_init: outputs and running statistics at the given weights; approximate: outputs
        checker.compare("train, own weights, example batch", b, a, inputs, train=True, grads=False, params=False,
                        out_metric=metric, out_limit=limit, stats=metric == "max_rel_error")
        return
    def check(batch: Sequence[Any], label: str) -> None:
        with _randomized_pair(checker, b, a, mapping, rerun if (b is before and a is after) else None,
                              label) as pair:
            if pair is not None:
                checker.compare(label, pair[0], pair[1], batch, train=True, grads=True, params=True,
                                out_metric=metric, out_limit=limit)

    # one sample of the second batch, shrunk (image models, as far as BatchNorm allows); else the example batch
    second = _second_sample(inputs)
    factor = _train_shrink(before, inputs)
    if _shrunk(second, factor) is not None:
        _small_first(checker, second, "train, randomized state, second batch", check, inputs,
                     "train, randomized state, example batch", factor)
    else:
        check(inputs, "train, randomized state, example batch")


def train_step_check(before: nn.Module, after: nn.Module, inputs: Sequence[Any],
                     mapping: dict[str, str | None] | None = None, ver: Verification | None = None,
                     lr: float = 0.1) -> dict[str, Any]:
    """One SGD step (loss: the fixed random projection of the outputs) on copies of both graphs in
    train mode; the updated parameters are compared by name (or ``mapping``). A failure is added
    to ``ver`` when given."""
    mapping = mapping or {}
    b, a = copy.deepcopy(before), copy.deepcopy(after)
    results = {}
    for tag, m in (("before", b), ("after", a)):
        r = _run(m, inputs, train=True, grads=True, params=True)
        with torch.no_grad():
            for k, p in m.named_parameters():
                g = r.param_grads.get(k)
                if g is not None:
                    p.sub_(lr * g)
        results[tag] = dict(m.named_parameters())
    pairs, _ = _counterparts(set(results["before"]), list(results["after"]), mapping)
    av = [results["after"][x].detach() for x, y in pairs if y in results["before"]]
    bv = [results["before"][y].detach() for x, y in pairs if y in results["before"]]
    err = rel_l2_error(av, bv)
    limit = GRAD_TOL_FACTOR * tolerance_for(torch.float32)
    if ver is not None and err > limit:
        ver.fail(f"one optimizer step: parameters differ: rel_l2_error {err:.2e} > {limit:.1e}")
    return {"optimizer": f"SGD lr={lr}", "params_compared": len(av), "rel_l2_error": err, "limit": limit}
