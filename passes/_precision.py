"""The machinery behind the ``mixed_precision`` and ``cast`` passes.

One forward sweep over the graph, in topological order, decides the dtype every node runs in
and inserts ``.to(dtype)`` casts where an op needs its inputs in another dtype. Dtypes are not
guessed from rules: each node is *executed* on the example inputs (eval mode, no grad) in the
dtypes the rewrite gives it, so type promotion, in-place ops and ops whose output dtype depends
on their inputs are exactly what torch does. An op that has no kernel for the low dtype on this
device is demoted to float32 (its inputs cast up) and recorded as declined with the error.

Op policy (torch.autocast's CUDA lists, which is what the speed is for):

- LOW ("lower_precision_fp" in autocast): conv1d/2d/3d, conv_transpose*, linear, matmul/@,
  mm, bmm, baddbmm, addmm, addbmm, addmv, mv, einsum, prelu, scaled_dot_product_attention,
  multi-head attention. Floating float32 inputs are cast to the low dtype; parameters stay
  float32 and are cast inside the graph (modules become the functional op on cast weights).
- FP32 (autocast's "fp32" list): softmax, log_softmax, softmin, layer_norm, group_norm,
  instance_norm, rms_norm, normalize, norm, sum, prod, cumsum, cumprod, exp, expm1, log*, pow,
  rsqrt, reciprocal, 1/x, softplus, cosine_similarity, cdist, dist, erfinv, acos/asin/cosh/sinh/tan
  and every loss. Half inputs are cast to float32; the output is float32.
- batch_norm: float32 parameters and statistics, half input and output (the mixed-dtype kernel
  computes in float32 internally) -- what autocast does; ``batchnorm=float32`` casts around it.
- everything else runs in the dtype its inputs have (torch's promotion: half op float32 ->
  float32), as under autocast.

The sweep inserts casts op by op (one per consumer and source, as autocast does at run time);
:func:`cleanup_casts` then merges duplicates (CSE), removes casts to the dtype a tensor already
has, lossless round trips (half -> float32 -> half) and lossy ones (float32 -> half -> float32:
the float32 value is used directly, which is more accurate) and dead casts, and counts what it did.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from graphopt.errors import PreconditionError, VerificationError
from graphopt.ir import graph_meta, name_matches, output_dtype
from graphopt.pass_infra import Decline, Rewrite
from graphopt.precision import PrecisionPolicy, get_policy

log = logging.getLogger(__name__)

HALF = (torch.float16, torch.bfloat16)
SHORT = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}

# ----------------------------------------------------------------------------- op policy

LOW_FUNCS: dict[Any, str] = {
    torch.conv1d: "conv1d", torch.conv2d: "conv2d", torch.conv3d: "conv3d",
    torch.conv_transpose1d: "conv_transpose1d", torch.conv_transpose2d: "conv_transpose2d",
    torch.conv_transpose3d: "conv_transpose3d", F.linear: "linear", torch.matmul: "matmul",
    operator.matmul: "matmul", torch.mm: "mm", torch.bmm: "bmm", torch.baddbmm: "baddbmm",
    torch.addmm: "addmm", torch.addbmm: "addbmm", torch.addmv: "addmv", torch.mv: "mv",
    torch.einsum: "einsum", F.prelu: "prelu", torch.prelu: "prelu", torch.chain_matmul: "chain_matmul",
    F.scaled_dot_product_attention: "scaled_dot_product_attention",
    F.multi_head_attention_forward: "multi_head_attention",
}
LOW_METHODS = {"matmul", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "mv", "__matmul__"}

FP32_FUNCS: dict[Any, str] = {
    torch.softmax: "softmax", F.softmax: "softmax", torch.log_softmax: "log_softmax",
    F.log_softmax: "log_softmax", F.softmin: "softmin", F.layer_norm: "layer_norm",
    torch.layer_norm: "layer_norm", F.group_norm: "group_norm", torch.group_norm: "group_norm",
    F.instance_norm: "instance_norm", F.normalize: "normalize", torch.norm: "norm",
    torch.linalg.vector_norm: "norm", torch.linalg.norm: "norm", torch.sum: "sum", torch.prod: "prod",
    torch.cumsum: "cumsum", torch.cumprod: "cumprod", torch.exp: "exp", torch.expm1: "expm1",
    torch.log: "log", torch.log10: "log10", torch.log1p: "log1p", torch.log2: "log2",
    torch.pow: "pow", operator.pow: "pow", torch.rsqrt: "rsqrt", torch.reciprocal: "reciprocal",
    F.softplus: "softplus", F.cosine_similarity: "cosine_similarity", torch.cosine_similarity: "cosine_similarity",
    torch.cdist: "cdist", torch.dist: "dist", torch.erfinv: "erfinv", torch.acos: "acos", torch.asin: "asin",
    torch.cosh: "cosh", torch.sinh: "sinh", torch.tan: "tan", torch.renorm: "renorm",
    F.cross_entropy: "cross_entropy", F.nll_loss: "nll_loss", F.mse_loss: "mse_loss", F.l1_loss: "l1_loss",
    F.smooth_l1_loss: "smooth_l1_loss", F.huber_loss: "huber_loss", F.kl_div: "kl_div",
    F.binary_cross_entropy: "binary_cross_entropy",
    F.binary_cross_entropy_with_logits: "binary_cross_entropy_with_logits",
    F.poisson_nll_loss: "poisson_nll_loss", F.cosine_embedding_loss: "cosine_embedding_loss",
    F.hinge_embedding_loss: "hinge_embedding_loss", F.margin_ranking_loss: "margin_ranking_loss",
    F.multilabel_margin_loss: "multilabel_margin_loss", F.multi_margin_loss: "multi_margin_loss",
    F.soft_margin_loss: "soft_margin_loss", F.triplet_margin_loss: "triplet_margin_loss",
}
if hasattr(F, "rms_norm"):
    FP32_FUNCS[F.rms_norm] = "rms_norm"
FP32_METHODS = {"softmax", "log_softmax", "norm", "sum", "prod", "cumsum", "cumprod", "exp", "expm1",
                "log", "log10", "log1p", "log2", "pow", "rsqrt", "reciprocal", "erfinv", "acos", "asin",
                "cosh", "sinh", "tan", "renorm", "__pow__", "__rpow__", "__rtruediv__", "__rdiv__"}
NORM_FUNCS = {"layer_norm", "group_norm", "instance_norm", "rms_norm"}

_NORM_MODULES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                                   nn.LocalResponseNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_FP32_MODULES: tuple[type, ...] = _NORM_MODULES + (
    nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softplus, nn.CosineSimilarity, nn.PairwiseDistance,
    nn.modules.loss._Loss)
_BN = nn.modules.batchnorm._BatchNorm
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FN = {nn.Conv1d: torch.conv1d, nn.Conv2d: torch.conv2d, nn.Conv3d: torch.conv3d}
_CONV_T_FN = {nn.ConvTranspose1d: torch.conv_transpose1d, nn.ConvTranspose2d: torch.conv_transpose2d,
              nn.ConvTranspose3d: torch.conv_transpose3d}
# modules that hold compute-heavy ops the rewrite does not reach inside
_OPAQUE_HEAVY: tuple[type, ...] = (nn.RNNBase, nn.RNNCellBase, nn.Transformer, nn.TransformerEncoder,
                                   nn.TransformerDecoder, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)

_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                 "bfloat16": torch.bfloat16}


def is_norm_module(mod: nn.Module) -> bool:
    return isinstance(mod, (_BN,) + _NORM_MODULES)


def _torch_nn_class(mod: nn.Module) -> bool:
    return type(mod).__module__.startswith("torch.nn")


def cast_target(node: fx.Node) -> torch.dtype | None:
    """The dtype a cast node converts to (``x.to(dt)``, ``x.float()``, ``x.type(dt)``), else None."""
    if node.op != "call_method":
        return None
    if node.target in _CAST_METHODS and len(node.args) == 1 and not node.kwargs:
        return _CAST_METHODS[node.target]
    if node.target in ("to", "type") and len(node.args) == 2 and isinstance(node.args[1], torch.dtype) \
            and set(node.kwargs) <= {"copy", "non_blocking"} and not node.kwargs.get("copy", False):
        return node.args[1]
    return None


def count_casts(gm: fx.GraphModule) -> int:
    """Cast nodes (``.to(dtype)``/``.float()``/``.half()``/...) in the graph."""
    return sum(1 for n in gm.graph.nodes if cast_target(n) is not None)


def _lossless(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every value of ``src`` is exactly representable in ``dst``."""
    if src == dst:
        return True
    if dst == torch.float64:
        return src in (torch.float32,) + HALF
    if dst == torch.float32:
        return src in HALF
    return False


def _is_ftensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip().splitlines()
    msg = s[0] if s else type(exc).__name__
    return (msg[:140] + "...") if len(msg) > 140 else msg


# ----------------------------------------------------------------------------- the sweep

@dataclass
class SweepResult:
    rewrites: list[Rewrite] = field(default_factory=list)
    declined: list[Decline] = field(default_factory=list)
    inserted: int = 0
    low_ops: dict[str, int] = field(default_factory=dict)
    fp32_ops: dict[str, int] = field(default_factory=dict)
    mixed_bn: int = 0
    param_casts: int = 0
    modules_converted: int = 0
    params_converted: int = 0
    changed: bool = False


class PrecisionSweep:
    """One rewrite of ``gm`` to ``mode`` ("mixed" or "half") in ``dtype``."""

    def __init__(self, gm: fx.GraphModule, dtype: torch.dtype, mode: str, *, batchnorm: str = "mixed",
                 keep_norms: bool = True, cast_outputs: bool = True, exclude: Sequence[str] = ()):
        self.gm = gm
        self.graph = gm.graph
        self.low = dtype
        self.mode = mode
        self.batchnorm = batchnorm
        self.keep_norms = keep_norms
        self.cast_outputs = cast_outputs
        self.exclude = list(exclude)
        self.env: dict[fx.Node, Any] = {}
        self.orig_dtype: dict[fx.Node, torch.dtype | None] = {n: output_dtype(n) for n in gm.graph.nodes}
        self.res = SweepResult()
        self.opaque = set(graph_meta(gm).get("opaque", {}))

    # ---------------------------------------------------------------- helpers
    def _exec(self, node: fx.Node) -> Any:
        args = fx.node.map_arg(node.args, lambda n: self.env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        raise AssertionError(node.op)

    def _new(self, op: str, target: Any, args: tuple, kwargs: dict | None = None, name: str | None = None,
             run: bool = True) -> fx.Node:
        node = self.graph.create_node(op, target, args, kwargs or {}, name=name)
        if run:
            self.env[node] = self._exec(node)
        return node

    def _cast_before(self, consumer: fx.Node, src: fx.Node, dtype: torch.dtype) -> fx.Node:
        with self.graph.inserting_before(consumer):
            c = self._new("call_method", "to", (src, dtype), name=f"{src.name}_{SHORT[dtype]}")
        self.res.inserted += 1
        return c

    def _cast_args(self, node: fx.Node, want: torch.dtype, from_dtypes: Iterable[torch.dtype]) -> int:
        """Cast every floating tensor input of ``node`` whose dtype is in ``from_dtypes`` to ``want``."""
        from_dtypes = tuple(from_dtypes)
        n = 0
        for src in list(dict.fromkeys(node.all_input_nodes)):
            v = self.env.get(src)
            if _is_ftensor(v) and v.dtype in from_dtypes and v.dtype != want:
                c = self._cast_before(node, src, want)
                node.replace_input_with(src, c)
                if src.op == "get_attr":
                    self.res.param_casts += 1
                n += 1
        return n

    def _run(self, node: fx.Node, what: str) -> bool:
        """Execute ``node``; without a kernel for a half input, demote it to float32 (returns True)."""
        try:
            self.env[node] = self._exec(node)
            return False
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            halves = [s for s in node.all_input_nodes if _is_ftensor(self.env.get(s)) and self.env[s].dtype in HALF]
            if not halves:
                raise
            reason = _first_line(exc)
        self._cast_args(node, torch.float32, HALF)
        self.env[node] = self._exec(node)
        self.res.declined.append(Decline(what, f"no {self._dname(self.low)} kernel on this device "
                                               f"({reason}): runs in float32"))
        return True

    @staticmethod
    def _dname(dtype: torch.dtype) -> str:
        return str(dtype).replace("torch.", "")

    def _label(self, node: fx.Node) -> str:
        return str(node.target) if node.op == "call_module" else node.name

    # ---------------------------------------------------------------- module conversion (mixed)
    def _attr(self, path: str, name: str) -> fx.Node | None:
        mod = self.gm.get_submodule(path)
        if getattr(mod, name, None) is None:
            return None
        return self._new("get_attr", f"{path}.{name}", (), name=f"{path.replace('.', '_')}_{name}")

    def _convert_module(self, node: fx.Node) -> list[fx.Node] | str:
        """Replace a LOW module call by its functional form on the module's own (float32)
        parameters. Returns the new nodes in order, or a reason not to."""
        mod = self.gm.get_submodule(node.target)
        path = str(node.target)
        if isinstance(mod, nn.MultiheadAttention):
            return self._convert_mha(node, mod)
        if len(node.args) != 1 or node.kwargs:
            return f"called with {len(node.args)} positional and {len(node.kwargs)} keyword arguments"
        x = node.args[0]
        new: list[fx.Node] = []
        with self.graph.inserting_before(node):
            if type(mod) in _CONV_FN:
                w, b = self._attr(path, "weight"), self._attr(path, "bias")
                new += [n for n in (w, b) if n is not None]
                padding: Any = mod.padding
                if mod.padding_mode != "zeros":
                    x = self._new("call_function", F.pad, (x, tuple(mod._reversed_padding_repeated_twice)),
                                  {"mode": mod.padding_mode}, name=f"{path.replace('.', '_')}_pad", run=False)
                    new.append(x)
                    padding = 0
                call = self._new("call_function", _CONV_FN[type(mod)],
                                 (x, w, b, mod.stride, padding, mod.dilation, mod.groups), name=node.name + "_lp", run=False)
            elif type(mod) in _CONV_T_FN:
                w, b = self._attr(path, "weight"), self._attr(path, "bias")
                new += [n for n in (w, b) if n is not None]
                call = self._new("call_function", _CONV_T_FN[type(mod)],
                                 (x, w, b, mod.stride, mod.padding, mod.output_padding, mod.groups, mod.dilation),
                                 name=node.name + "_lp", run=False)
            elif isinstance(mod, nn.Linear):
                w, b = self._attr(path, "weight"), self._attr(path, "bias")
                new += [n for n in (w, b) if n is not None]
                call = self._new("call_function", F.linear, (x, w, b), name=node.name + "_lp", run=False)
            elif isinstance(mod, nn.PReLU):
                w = self._attr(path, "weight")
                new.append(w)
                call = self._new("call_function", F.prelu, (x, w), name=node.name + "_lp", run=False)
            else:  # pragma: no cover - guarded by _is_low_module
                raise AssertionError(type(mod))
        new.append(call)
        node.replace_all_uses_with(call)
        self.graph.erase_node(node)
        return new

    def _convert_mha(self, node: fx.Node, mod: nn.MultiheadAttention) -> list[fx.Node] | str:
        names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                 "average_attn_weights", "is_causal"]
        if len(node.args) > len(names) or set(node.kwargs) - set(names):
            return "unrecognised arguments"
        bound = dict(zip(names, node.args))
        bound.update(node.kwargs)
        for k in ("query", "key", "value"):
            if not isinstance(bound.get(k), fx.Node):
                return f"'{k}' is not a tensor of the graph"
        if bound.get("key_padding_mask") is not None or bound.get("attn_mask") is not None:
            return "attention masks given (their dtype canonicalisation is not rewritten)"
        if bound.get("is_causal", False):
            return "is_causal=True (needs an attention mask)"
        if any(u.op != "call_function" or u.target is not operator.getitem or u.args[1] not in (0, 1)
               for u in node.users):
            return "its output tuple is used other than by indexing"
        path = str(node.target)
        q, k, v = bound["query"], bound["key"], bound["value"]
        batched = self.env[q].dim() == 3
        new: list[fx.Node] = []
        with self.graph.inserting_before(node):
            if mod.batch_first and batched:
                tr: dict[fx.Node, fx.Node] = {}
                for t in (q, k, v):
                    if t not in tr:
                        tr[t] = self._new("call_method", "transpose", (t, 1, 0), name=f"{t.name}_tbf", run=False)
                        new.append(tr[t])
                q, k, v = tr[q], tr[k], tr[v]
            attrs = {a: self._attr(path, a) for a in ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v",
                                                       "q_proj_weight", "k_proj_weight", "v_proj_weight")}
            attrs["out_w"] = self._attr(f"{path}.out_proj", "weight")
            attrs["out_b"] = self._attr(f"{path}.out_proj", "bias")
            new += [n for n in attrs.values() if n is not None]
            if mod.dropout > 0:
                # dropout follows the module's train()/eval() flag at run time (a get_attr on
                # the bool; created directly: Graph.get_attr warns for non-tensor attributes)
                training: Any = self.graph.create_node("get_attr", f"{path}.training", (), {},
                                                       name=f"{path.replace('.', '_')}_training")
                self.env[training] = self._exec(training)
                new.append(training)
            else:
                training = False
            kwargs = {"training": training, "need_weights": bound.get("need_weights", True),
                      "average_attn_weights": bound.get("average_attn_weights", True)}
            if not mod._qkv_same_embed_dim:
                kwargs.update(use_separate_proj_weight=True, q_proj_weight=attrs["q_proj_weight"],
                              k_proj_weight=attrs["k_proj_weight"], v_proj_weight=attrs["v_proj_weight"])
            call = self._new("call_function", F.multi_head_attention_forward,
                             (q, k, v, mod.embed_dim, mod.num_heads, attrs["in_proj_weight"], attrs["in_proj_bias"],
                              attrs["bias_k"], attrs["bias_v"], mod.add_zero_attn, mod.dropout,
                              attrs["out_w"], attrs["out_b"]), kwargs, name=node.name + "_lp", run=False)
            new.append(call)
            out0 = self._new("call_function", operator.getitem, (call, 0), name=node.name + "_out", run=False)
            new.append(out0)
            if mod.batch_first and batched:
                out0 = self._new("call_method", "transpose", (out0, 1, 0), name=node.name + "_out_bf", run=False)
                new.append(out0)
            weights = self._new("call_function", operator.getitem, (call, 1), name=node.name + "_weights", run=False)
            new.append(weights)
        for u in list(node.users):
            u.replace_all_uses_with(out0 if u.args[1] == 0 else weights)
            self.graph.erase_node(u)
        self.graph.erase_node(node)
        return new

    # ---------------------------------------------------------------- classification
    def _module_kind(self, node: fx.Node) -> tuple[str, str]:
        """(kind, op name) of a call_module node: low | bn | fp32 | decline | params | plain."""
        mod = self.gm.get_submodule(node.target)
        cls = type(mod).__name__
        path = str(node.target)
        if path in self.opaque or not _torch_nn_class(mod):
            return "decline", cls
        if isinstance(mod, _OPAQUE_HEAVY):  # pure half: their parameters are half, so they run in half
            return ("decline", cls) if self.mode == "mixed" else ("params", cls)
        if (type(mod) in _CONV_FN or type(mod) in _CONV_T_FN or isinstance(mod, (nn.Linear, nn.PReLU,
                                                                               nn.MultiheadAttention))):
            return "low", cls
        if isinstance(mod, _BN):
            return "bn", cls
        if isinstance(mod, _FP32_MODULES):
            return "fp32", cls
        if any(p.is_floating_point() for p in list(mod.parameters()) + list(mod.buffers())):
            return "params", cls
        return "plain", cls

    @staticmethod
    def _fn_kind(node: fx.Node, env: dict[fx.Node, Any]) -> tuple[str, str]:
        if node.op == "call_function":
            if node.target in LOW_FUNCS:
                return "low", LOW_FUNCS[node.target]
            if node.target in FP32_FUNCS:
                return "fp32", FP32_FUNCS[node.target]
            if node.target in (operator.truediv,) and node.args and not isinstance(node.args[0], fx.Node) \
                    and len(node.args) == 2 and isinstance(node.args[1], fx.Node):
                return "fp32", "rtruediv"
        elif node.op == "call_method":
            if node.target in LOW_METHODS:
                return "low", str(node.target)
            if node.target in FP32_METHODS:
                return "fp32", str(node.target)
        return "plain", ""

    # ---------------------------------------------------------------- the sweep
    def convert_parameters(self) -> None:
        """Pure half: parameters and floating buffers to the low dtype (norms kept float32 if asked;
        opaque modules keep float32)."""
        for path, mod in self.gm.named_modules():
            if path in self.opaque or any(path.startswith(o + ".") for o in self.opaque):
                continue
            if self.keep_norms and is_norm_module(mod):
                continue
            n = 0
            for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
                if t is not None and t.is_floating_point() and t.dtype == torch.float32:
                    t.data = t.data.to(self.low)
                    n += 1
            if n:
                self.res.params_converted += n
                self.res.rewrites.append(Rewrite(path or "<root>", f"{n} parameters/buffers stored in "
                                                                   f"{self._dname(self.low)}"))
        for path in sorted(self.opaque):
            self.res.declined.append(Decline(path, "opaque leaf (not traced): parameters kept float32"))

    def run(self, inputs: Sequence[torch.Tensor]) -> SweepResult:
        was_training = self.gm.training
        self.gm.eval()
        try:
            with torch.no_grad():
                self._sweep(list(inputs))
        finally:
            self.gm.train(was_training)
        return self.res

    def _sweep(self, inputs: list[torch.Tensor]) -> None:
        it = iter(inputs)
        for node in list(self.graph.nodes):
            if getattr(node, "_erased", False):  # replaced while converting an earlier module
                continue
            if node.op == "placeholder":
                self.env[node] = next(it)
                v = self.env[node]
                if self.mode == "half" and _is_ftensor(v) and v.dtype == torch.float32 and node.users:
                    if any(cast_target(u) == self.low for u in node.users) and len(node.users) == 1:
                        continue  # already converted (idempotent)
                    with self.graph.inserting_after(node):
                        c = self._new("call_method", "to", (node, self.low), name=f"{node.name}_{SHORT[self.low]}")
                    node.replace_all_uses_with(c, delete_user_cb=lambda u: u is not c)
                    self.res.inserted += 1
                    self.res.rewrites.append(Rewrite(node.name, f"input cast to {self._dname(self.low)}"))
                continue
            if node.op == "get_attr":
                self.env[node] = self._exec(node)
                continue
            if node.op == "output":
                self._outputs(node)
                continue
            if node.op == "call_module":
                self._visit_module(node)
            else:
                self._visit_function(node)
            if self.mode == "half":
                self._close_fp32(node)

    def _visit_module(self, node: fx.Node) -> None:
        kind, cls = self._module_kind(node)
        label = str(node.target)
        if kind == "low" and name_matches(label, self.exclude):
            self.res.declined.append(Decline(label, "excluded by the 'exclude' option: runs in float32"))
            kind = "params"
        if kind == "decline":
            why = ("opaque leaf (not traced)" if label in self.opaque else
                   f"{cls} is a leaf module whose internals the rewrite does not reach")
            self.res.declined.append(Decline(label, f"{why}: runs in float32"))
            if self.mode == "mixed" or label in self.opaque:
                self._cast_args(node, torch.float32, HALF)
            else:
                self._match_params(node)
            self._run(node, label)
            return
        if kind == "low" and self.mode == "mixed":
            new = self._convert_module(node)
            if isinstance(new, str):
                self.res.declined.append(Decline(label, f"{cls} not rewritten: {new}; runs in float32"))
                self._cast_args(node, torch.float32, HALF)
                self._run(node, label)
                return
            self.res.modules_converted += 1
            for n in new:
                if n.op == "call_function" and n.target in LOW_FUNCS:
                    casts = self._cast_args(n, self.low, (torch.float32,))
                    if self._run(n, label):
                        continue
                    self.res.low_ops[LOW_FUNCS[n.target]] = self.res.low_ops.get(LOW_FUNCS[n.target], 0) + 1
                    self.res.rewrites.append(Rewrite(label, f"{cls} -> {LOW_FUNCS[n.target]} in "
                                                            f"{self._dname(self.low)} on float32 parameters "
                                                            f"cast in the graph ({casts} casts)"))
                else:
                    self.env[n] = self._exec(n)
            return
        if kind == "bn":
            if self.mode == "half" and not self.keep_norms:
                self._match_params(node)
            elif self.batchnorm == "float32":
                if self._cast_args(node, torch.float32, HALF):
                    self.res.rewrites.append(Rewrite(label, f"{cls} kept float32 (input cast up)"))
                self.res.fp32_ops[cls] = self.res.fp32_ops.get(cls, 0) + 1
            else:
                v = self.env.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
                if _is_ftensor(v) and v.dtype in HALF:
                    self.res.mixed_bn += 1
            self._run(node, label)
            return
        if kind == "fp32":
            if self.mode == "mixed" or (self.keep_norms and isinstance(self.gm.get_submodule(node.target),
                                                                        _NORM_MODULES)):
                if self._cast_args(node, torch.float32, HALF):
                    self.res.rewrites.append(Rewrite(label, f"{cls} kept float32 (input cast up)"))
                self.res.fp32_ops[cls] = self.res.fp32_ops.get(cls, 0) + 1
            else:
                self._match_params(node)
            self._run(node, label)
            return
        if kind in ("params", "low"):  # low in half mode: its parameters are already half
            self._match_params(node)
            if kind == "low" and self.mode == "half":
                self.res.low_ops[cls] = self.res.low_ops.get(cls, 0) + 1
        self._run(node, label)

    def _match_params(self, node: fx.Node) -> None:
        """Cast floating inputs of a module to its parameters' dtype (it may not accept mixed)."""
        mod = self.gm.get_submodule(node.target)
        pd = next((t.dtype for t in list(mod.parameters()) + list(mod.buffers()) if t.is_floating_point()), None)
        if pd is None:
            return
        others = tuple(d for d in (torch.float32, torch.float16, torch.bfloat16) if d != pd)
        if self._cast_args(node, pd, others) and self.mode == "half":
            self.res.rewrites.append(Rewrite(str(node.target), f"input cast to {self._dname(pd)} "
                                                               "(the dtype of its parameters)"))

    def _visit_function(self, node: fx.Node) -> None:
        kind, op = self._fn_kind(node, self.env)
        label = node.name
        if cast_target(node) is not None:
            self._run(node, label)
            return
        if kind != "plain" and not any(_is_ftensor(self.env.get(s)) for s in node.all_input_nodes):
            kind = "plain"  # e.g. ``int ** -0.5`` on shapes: no floating tensor involved
        if kind == "low":
            casts = self._cast_args(node, self.low, (torch.float32,))
            if self._run(node, label):
                return
            self.res.low_ops[op] = self.res.low_ops.get(op, 0) + 1
            if casts:
                self.res.rewrites.append(Rewrite(label, f"{op} in {self._dname(self.low)} ({casts} inputs cast)"))
            return
        elif kind == "fp32" and (self.mode == "mixed" or (self.keep_norms and op in NORM_FUNCS)):
            wants = self.mode == "mixed" or any(
                _is_ftensor(self.env.get(s)) and self.env[s].dtype == torch.float32 for s in node.all_input_nodes)
            if wants:
                casts = self._cast_args(node, torch.float32, HALF)
                self.res.fp32_ops[op] = self.res.fp32_ops.get(op, 0) + 1
                if casts:
                    self.res.rewrites.append(Rewrite(label, f"{op} kept float32 ({casts} inputs cast up)"))
        self._run(node, label)

    def _close_fp32(self, node: fx.Node) -> None:
        """Pure half: a float32 activation (a kept-float32 norm, a promotion) goes back to half."""
        v = self.env.get(node)
        if not (_is_ftensor(v) and v.dtype == torch.float32) or cast_target(node) is not None:
            return
        users = [u for u in node.users if u.op != "output"]
        if not users or all(cast_target(u) == self.low for u in users):
            return
        with self.graph.inserting_after(node):
            c = self._new("call_method", "to", (node, self.low), name=f"{node.name}_{SHORT[self.low]}")
        for u in users:
            u.replace_input_with(node, c)
        self.res.inserted += 1

    def _outputs(self, node: fx.Node) -> None:
        if not self.cast_outputs:
            return
        srcs: list[fx.Node] = []
        fx.node.map_arg(node.args, lambda n: srcs.append(n) or n)
        for src in dict.fromkeys(srcs):
            v = self.env.get(src)
            want = self.orig_dtype.get(src) or torch.float32
            if _is_ftensor(v) and v.dtype != want and v.dtype in HALF:
                c = self._cast_before(node, src, want)
                node.replace_input_with(src, c)
                self.res.rewrites.append(Rewrite(src.name, f"output cast back to {self._dname(want)}"))


# ----------------------------------------------------------------------------- cleanup

def cleanup_casts(gm: fx.GraphModule, env: dict[fx.Node, Any] | None = None) -> dict[str, int]:
    """Remove redundant casts; returns counts by rule. ``env``: node values (for dtypes); the
    graph's ``tensor_meta`` is used where a value is missing."""
    env = env or {}

    def dtype_of(n: fx.Node) -> torch.dtype | None:
        v = env.get(n)
        if isinstance(v, torch.Tensor):
            return v.dtype
        return output_dtype(n)

    counts = {"same_dtype": 0, "round_trip_lossless": 0, "round_trip_lossy": 0, "cast_of_cast": 0,
              "duplicate": 0, "dead": 0}
    g = gm.graph
    changed = True
    while changed:
        changed = False
        seen: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
        for node in list(g.nodes):
            dt = cast_target(node)
            if dt is None or not isinstance(node.args[0], fx.Node):
                continue
            src = node.args[0]
            sdt = dtype_of(src)
            if not node.users:
                g.erase_node(node)
                counts["dead"] += 1
                changed = True
                continue
            if sdt == dt:
                node.replace_all_uses_with(src)
                g.erase_node(node)
                counts["same_dtype"] += 1
                changed = True
                continue
            inner = cast_target(src)
            if inner is not None and isinstance(src.args[0], fx.Node):
                orig = src.args[0]
                odt = dtype_of(orig)
                if odt == dt:  # x -> inner -> back to x's dtype
                    node.replace_all_uses_with(orig)
                    g.erase_node(node)
                    counts["round_trip_lossless" if _lossless(odt, inner) else "round_trip_lossy"] += 1
                    changed = True
                    continue
                if odt is not None and _lossless(odt, inner):  # x -> wider -> dt == x -> dt
                    node.args = (orig,) + tuple(node.args[1:])
                    counts["cast_of_cast"] += 1
                    changed = True
                    src = orig
            key = (src, dt)
            if key in seen:
                node.replace_all_uses_with(seen[key])
                g.erase_node(node)
                counts["duplicate"] += 1
                changed = True
                continue
            seen[key] = node
        for node in list(g.nodes):  # get_attr nodes orphaned by the rewrite
            if node.op == "get_attr" and not node.users:
                g.erase_node(node)
    return counts


# ----------------------------------------------------------------------------- policy / requires

def check_existing_policy(gm: fx.GraphModule, mode: str, dtype: str) -> None:
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
    name = str(dtype).replace("torch.", "")
    return PrecisionPolicy(mode=mode, dtype=name, loss_scaling="dynamic" if dtype == torch.float16 else None,
                           master_weights=mode == "half", fp32_ops=tuple(sorted(set(fp32_ops))))


# ----------------------------------------------------------------------------- verification

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


def _forward_backward(module: nn.Module, inputs: Sequence[torch.Tensor], *, double: bool = False,
                      autocast: torch.dtype | None = None, count_casts_: bool = False, seed: int = 0) -> _Run:
    """Eval-mode outputs and gradients (wrt floating inputs and trainable parameters) of
    ``<outputs, fixed random cotangent>``."""
    was = module.training
    module.eval()
    try:
        xs = [(x.double() if double and x.is_floating_point() else x).detach().clone() for x in inputs]
        for x in xs:
            if x.is_floating_point():
                x.requires_grad_(True)
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        counter = _runtime_cast_counter() if count_casts_ else None
        device = next((x.device.type for x in xs), "cpu")
        with torch.enable_grad():
            ctx = torch.autocast(device, dtype=autocast) if autocast is not None else _null()
            with ctx:
                if counter is not None:
                    with counter:
                        out = module(*xs)
                else:
                    out = module(*xs)
            flat = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            diff = [o for o in flat if o.requires_grad and o.is_floating_point()]
            gen = torch.Generator().manual_seed(seed)
            cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in diff]
            leaves = [x for x in xs if x.requires_grad] + [p for _, p in params]
            got = torch.autograd.grad(diff, leaves, cot, allow_unused=True) if diff else [None] * len(leaves)
        names = [f"input{i}" for i, x in enumerate(xs) if x.requires_grad] + [n for n, _ in params]
        grads = {n: g.detach() for n, g in zip(names, got) if g is not None}
        return _Run([o.detach() for o in flat if o.is_floating_point()], grads,
                    counter.n if counter is not None else None)
    finally:
        module.train(was)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def _rel_l2(a: Sequence[torch.Tensor], e: Sequence[torch.Tensor]) -> float:
    num = den = 0.0
    for x, y in zip(a, e):
        x64, y64 = x.double(), y.double()
        num += (x64 - y64).pow(2).sum().item()
        den += y64.pow(2).sum().item()
    if not math.isfinite(num):
        return float("inf")
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def _errors(run: _Run, ref: _Run) -> dict[str, float]:
    names = [n for n in ref.grads if n in run.grads and run.grads[n].shape == ref.grads[n].shape]
    return {"outputs": _rel_l2(run.outputs, ref.outputs),
            "grads": _rel_l2([run.grads[n] for n in names], [ref.grads[n] for n in names])}


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
        details["reference"] = f"float32 (float64 unavailable: {_first_line(exc)})"
        ref = _forward_backward(before, inputs)
    fp32 = _forward_backward(before, inputs)
    details["float32"] = _errors(fp32, ref) if details["reference"] == "float64" else {"outputs": 0.0, "grads": 0.0}
    details["graphopt"] = _errors(ours, ref)
    details["runtime_casts_per_forward"] = {"graphopt": ours.casts}
    try:
        ac = _forward_backward(before, inputs, autocast=dtype, count_casts_=True)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        details["autocast"] = {"skipped": f"torch.autocast({device!r}, {name}) fails here: {_first_line(exc)}"}
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


def low_dtype(name: str) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]


__all__ = ["PrecisionSweep", "cleanup_casts", "count_casts", "cast_target", "compare_with_references",
           "make_policy", "check_existing_policy", "low_dtype", "LOW_FUNCS", "FP32_FUNCS"]

