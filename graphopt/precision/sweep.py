"""The precision sweep behind the ``mixed_precision`` and ``cast`` passes.

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
:func:`graphopt.precision.cleanup_casts` then merges duplicates (CSE), removes casts to the dtype a tensor already
has, lossless round trips (half -> float32 -> half) and lossy ones (float32 -> half -> float32:
the float32 value is used directly, which is more accurate) and dead casts, and counts what it did.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.errors import PreconditionError
from graphopt.ir import eval_mode, graph_meta, name_matches, output_dtype
from graphopt.pass_infra import Decline, Rewrite
from graphopt.precision.ops import (FP32_FUNCS, FP32_METHODS, HALF, LOW_FUNCS, LOW_METHODS, NORM_FUNCS, SHORT,
                                    _BN, _CONV_FN, _CONV_T_FN, _FP32_MODULES, _NORM_MODULES, _OPAQUE_HEAVY,
                                    cast_target, first_line, is_ftensor, is_norm_module, torch_nn_class)

__all__ = ["PrecisionSweep", "SweepResult"]


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
            if is_ftensor(v) and v.dtype in from_dtypes and v.dtype != want:
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
            halves = [s for s in node.all_input_nodes if is_ftensor(self.env.get(s)) and self.env[s].dtype in HALF]
            if not halves:
                raise
            reason = first_line(exc)
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
        if path in self.opaque or not torch_nn_class(mod):
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
        with eval_mode(self.gm), torch.no_grad():
            self._sweep(list(inputs))
        return self.res

    @staticmethod
    def _placeholder(node: fx.Node, it: Iterator[Any]) -> Any:
        """The value of a graph input, as ``fx.Interpreter`` binds it: the next example input, the
        rest of them for ``*args``, else the argument's default (timm's ViT: ``attn_mask=None``)."""
        if str(node.target).startswith("*"):
            return list(it)
        try:
            return next(it)
        except StopIteration:
            if node.args:
                return node.args[0]
            raise PreconditionError(f"graph input '{node.target}' has no example input and no default",
                                    fix="give every forward() argument an example input") from None

    def _sweep(self, inputs: list[torch.Tensor]) -> None:
        it = iter(inputs)
        for node in list(self.graph.nodes):
            if getattr(node, "_erased", False):  # replaced while converting an earlier module
                continue
            if node.op == "placeholder":
                self.env[node] = self._placeholder(node, it)
                v = self.env[node]
                if self.mode == "half" and is_ftensor(v) and v.dtype == torch.float32 and node.users:
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
                if is_ftensor(v) and v.dtype in HALF:
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
        if kind != "plain" and not any(is_ftensor(self.env.get(s)) for s in node.all_input_nodes):
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
                is_ftensor(self.env.get(s)) and self.env[s].dtype == torch.float32 for s in node.all_input_nodes)
            if wants:
                casts = self._cast_args(node, torch.float32, HALF)
                self.res.fp32_ops[op] = self.res.fp32_ops.get(op, 0) + 1
                if casts:
                    self.res.rewrites.append(Rewrite(label, f"{op} kept float32 ({casts} inputs cast up)"))
        self._run(node, label)

    def _close_fp32(self, node: fx.Node) -> None:
        """Pure half: a float32 activation (a kept-float32 norm, a promotion) goes back to half."""
        v = self.env.get(node)
        if not (is_ftensor(v) and v.dtype == torch.float32) or cast_target(node) is not None:
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
            if is_ftensor(v) and v.dtype != want and v.dtype in HALF:
                c = self._cast_before(node, src, want)
                node.replace_input_with(src, c)
                self.res.rewrites.append(Rewrite(src.name, f"output cast back to {self._dname(want)}"))

