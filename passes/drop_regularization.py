"""drop_regularization: remove dropout, stochastic depth / drop-path and drop-block (EXACT in eval mode).

These ops only act in training mode; in eval mode each is the identity, so removing them
leaves the eval-mode function unchanged (verified EXACT, outputs and input gradients). Training
afterwards is deterministic and slightly cheaper (no random masks), without their
regularisation: use it for fine-tuning short schedules, benchmarking, or exporting.

Removed (each reported with what it was):

- modules: ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout``, and
  any module class named ``DropPath``, ``StochasticDepth``, ``DropBlock2d/3d`` (timm,
  torchvision, user code) that appears as a graph leaf;
- functions: ``F.dropout*``, ``F.alpha_dropout``, ``F.feature_alpha_dropout``,
  ``torch.dropout``/``torch.feature_dropout``/..., ``torchvision.ops.stochastic_depth``,
  ``torchvision.ops.drop_block2d/3d``;
- traced drop-path: ``x * new_empty(shape).bernoulli_(keep)[.div_(keep)]`` (timm's
  ``drop_path`` traced in training mode) together with the mask's computation;
- ``nn.MultiheadAttention(dropout=p)`` and the ``sdpa`` pass's ``ScaledDotProductAttention``: its
  attention dropout is set to 0.

Traced-through code bakes ``self.training`` in at capture time. A graph captured in train mode
therefore applies stochastic depth even in eval mode; such ops are reported as
``active in eval mode (captured in train mode)`` and the verification compares against the
graph with every random mask replaced by its eval-mode value (the pass's ``reference``).

Declined, with the reason: dropout hidden inside a leaf/opaque module (e.g.
``nn.TransformerEncoderLayer``), which is not in the graph.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt import Decline, Pass, PassResult, Rewrite, Semantics
from graphopt.ir import ScaledDotProductAttention, copy_graph, module_of

__all__ = ["DropRegularization"]

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_NAMED_MODULES = {"DropPath", "StochasticDepth", "DropBlock2d", "DropBlock3d", "DropBlock"}
# function -> (index of the probability argument, index of the `training` argument, kw names)
_DROPOUT_FUNCTIONS: dict[Any, tuple[int, int, str, str]] = {
    F.dropout: (1, 2, "p", "training"),
    F.dropout1d: (1, 2, "p", "training"),
    F.dropout2d: (1, 2, "p", "training"),
    F.dropout3d: (1, 2, "p", "training"),
    F.alpha_dropout: (1, 2, "p", "training"),
    F.feature_alpha_dropout: (1, 2, "p", "training"),
    torch.dropout: (1, 2, "p", "train"),
    torch.alpha_dropout: (1, 2, "p", "train"),
    torch.feature_dropout: (1, 2, "p", "train"),
    torch.feature_alpha_dropout: (1, 2, "p", "train"),
}
# torchvision functions, matched by module + name so torchvision is not imported here
_TV_FUNCTIONS: dict[tuple[str, str], tuple[int, int, str, str]] = {
    ("torchvision.ops.stochastic_depth", "stochastic_depth"): (1, 3, "p", "training"),
    ("torchvision.ops.drop_block", "drop_block2d"): (1, 4, "p", "training"),
    ("torchvision.ops.drop_block", "drop_block3d"): (1, 4, "p", "training"),
}
_BERNOULLI_METHODS = {"bernoulli_", "bernoulli"}
_SCALE_METHODS = {"div_", "div", "mul_", "mul"}
_MUL = {operator.mul, torch.mul}


def _fn_spec(target: Any) -> tuple[int, int, str, str] | None:
    if target in _DROPOUT_FUNCTIONS:
        return _DROPOUT_FUNCTIONS[target]
    key = (getattr(target, "__module__", ""), getattr(target, "__name__", ""))
    return _TV_FUNCTIONS.get(key)


def _where(node: fx.Node) -> str:
    """``module.path:node`` for a function node traced inside a module, else the node name."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        key, value = next(reversed(stack.items()))
        path = value[0] if isinstance(value, tuple) else key
        if path:
            return f"{path}:{node.name}"
    return node.name


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _is_scale(node: fx.Node) -> bool:
    """``t.div_(k)``, ``t / k``, ``t * k`` ... with a Python scalar ``k``."""
    return len(node.args) == 2 and isinstance(node.args[1], (int, float)) and (
        (node.op == "call_method" and node.target in _SCALE_METHODS)
        or (node.op == "call_function" and node.target in (operator.truediv, operator.mul, torch.div, torch.mul)))


def _mask_root(node: Any) -> fx.Node | None:
    """The ``bernoulli`` node a random mask is computed from, if ``node`` is such a mask."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 8:
        seen += 1
        if (node.op == "call_method" and node.target in _BERNOULLI_METHODS) or (
                node.op == "call_function" and node.target is torch.bernoulli):
            return node
        if _is_scale(node):
            node = node.args[0]
            continue
        return None
    return None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    out: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in out:
                out.add(a)
                stack.append(a)
    return out


def _inplace_users(root: fx.Node) -> list[fx.Node]:
    return [u for u in root.users if u.op == "call_method" and str(u.target).endswith("_")
            and u.args and u.args[0] is root]


def _leaf_dropouts(mod: nn.Module) -> list[str]:
    found = [name or "." for name, m in mod.named_modules() if isinstance(m, _DROPOUT_MODULES) and m.p > 0]
    found += [name or "." for name, m in mod.named_modules()
              if isinstance(m, nn.MultiheadAttention) and m.dropout > 0]
    return found


def _eval_reference(gm: fx.GraphModule) -> fx.GraphModule | None:
    """The graph's eval-mode function when it is random even in eval mode, else None.

    A copy of the graph in which every baked-in ``training=True`` becomes ``False`` and every
    traced drop-path mask ``bernoulli_(keep)`` becomes ``fill_(1)`` (with its ``div_(keep)``
    scaling turned into ``div_(1)``): the same graph structure, only the randomness switched
    off, independent of how the pass removes the ops.
    """
    hits: list[tuple[str, Any]] = []
    for node in gm.graph.nodes:
        if node.op == "call_function":
            spec = _fn_spec(node.target)
            if spec and _arg(node, spec[1], spec[3], None) is True:
                hits.append((node.name, spec))
        if (node.op == "call_method" and node.target in _BERNOULLI_METHODS) or (
                node.op == "call_function" and node.target is torch.bernoulli):
            hits.append((node.name, None))
    if not hits:
        return None
    ref = copy_graph(gm)
    by_name = {n.name: n for n in ref.graph.nodes}
    for name, spec in hits:
        node = by_name[name]
        if spec is not None:
            _, t_idx, _, t_kw = spec
            if t_kw in node.kwargs:
                node.kwargs = {**node.kwargs, t_kw: False}
            else:
                args = list(node.args)
                args[t_idx] = False
                node.args = tuple(args)
            continue
        stack = [node]
        while stack:  # the mask's scalings by the keep probability become scalings by 1
            for user in list(stack.pop().users):
                if _is_scale(user):
                    user.args = (user.args[0], 1.0)
                    stack.append(user)
        if node.op == "call_method" and node.target == "bernoulli_":
            node.target = "fill_"
            node.args, node.kwargs = (node.args[0], 1.0), {}
        else:  # out-of-place bernoulli -> a tensor of ones of the same shape
            with ref.graph.inserting_after(node):
                ones = ref.graph.call_function(torch.ones_like, (node.args[0],))
            node.replace_all_uses_with(ones)
            ref.graph.erase_node(node)
    ref.recompile()
    return ref


class DropRegularization(Pass):
    name = "drop_regularization"
    semantics = Semantics.EXACT
    training = "changes"
    training_reason = "dropout, stochastic depth and drop-block no longer act in training"
    summary = "remove dropout, stochastic depth / drop-path and drop-block (identity in eval mode)"
    options = {}

    def call(self, gm: fx.GraphModule) -> PassResult:
        rewrites: list[Rewrite] = []
        declined: list[Decline] = []
        reference = _eval_reference(gm)  # before any change: None unless random in eval mode
        removed: dict[str, int] = {}

        def note(kind: str) -> None:
            removed[kind] = removed.get(kind, 0) + 1

        erased: set[fx.Node] = set()
        for node in list(gm.graph.nodes):
            if node in erased:
                continue
            if node.op == "call_module":
                mod = module_of(gm, node)
                cls = type(mod).__name__
                if isinstance(mod, _DROPOUT_MODULES) or cls in _NAMED_MODULES:
                    p = getattr(mod, "p", getattr(mod, "drop_prob", getattr(mod, "drop_rate", None)))
                    node.replace_all_uses_with(node.args[0])
                    gm.graph.erase_node(node)
                    rewrites.append(Rewrite(str(node.target), f"removed {cls}(p={p})", {"kind": cls, "p": p}))
                    note(cls)
                elif isinstance(mod, nn.MultiheadAttention):
                    if mod.dropout > 0:
                        p = mod.dropout
                        mod.dropout = 0.0
                        rewrites.append(Rewrite(str(node.target), f"attention dropout {p} set to 0",
                                                {"kind": "MultiheadAttention.dropout", "p": p}))
                        note("MultiheadAttention.dropout")
                elif isinstance(mod, ScaledDotProductAttention):  # written by the sdpa pass
                    if mod.dropout_p > 0:
                        p, mod.dropout_p = mod.dropout_p, 0.0
                        rewrites.append(Rewrite(str(node.target), f"attention dropout {p} set to 0",
                                                {"kind": "ScaledDotProductAttention.dropout_p", "p": p}))
                        note("ScaledDotProductAttention.dropout_p")
                else:
                    inner = _leaf_dropouts(mod)
                    if inner:
                        declined.append(Decline(str(node.target), (
                            f"{cls} is a leaf (not traced into): its dropout ({', '.join(inner[:3])}) is not in "
                            "the graph and is left as is")))
                continue
            spec = _fn_spec(node.target) if node.op == "call_function" else None
            if spec is not None:
                p_idx, t_idx, p_kw, t_kw = spec
                p = _arg(node, p_idx, p_kw, 0.5)
                training = _arg(node, t_idx, t_kw, True if node.target in _DROPOUT_FUNCTIONS else None)
                fname = getattr(node.target, "__name__", str(node.target))
                state = ("active in eval mode (captured in train mode)" if training is True else
                         "follows the module's mode" if isinstance(training, fx.Node) else
                         "inactive (captured in eval mode)")
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                rewrites.append(Rewrite(_where(node), f"removed {fname}(p={p}), {state}",
                                        {"kind": fname, "p": p if isinstance(p, (int, float)) else str(p),
                                         "active_in_eval": bool(training is True)}))
                note(fname)
                continue
            if node.op in ("call_function", "call_method") and len(node.args) == 2 and (
                    (node.op == "call_function" and node.target in _MUL)
                    or (node.op == "call_method" and node.target == "mul")):
                a, b = node.args
                for x, m in ((a, b), (b, a)):
                    root = _mask_root(m)
                    if root is None or not isinstance(x, fx.Node):
                        continue
                    keep = root.args[1] if len(root.args) > 1 else None
                    node.replace_all_uses_with(x)
                    gm.graph.erase_node(node)
                    erased |= self._erase_mask(gm, root)
                    rewrites.append(Rewrite(_where(node), f"removed traced drop-path (keep probability {keep}), "
                                                       "active in eval mode (captured in train mode)",
                                            {"kind": "drop_path", "keep": keep, "active_in_eval": True}))
                    note("drop_path")
                    break
        modified = bool(rewrites)
        if modified:
            gm.delete_all_unused_submodules()
            gm.recompile()
        active = sum(1 for r in rewrites if r.data.get("active_in_eval"))
        return PassResult(gm, modified, rewrites, declined,
                          notes={"removed": removed, "removed_total": sum(removed.values()),
                                 "active_in_eval_mode": active},
                          reference=reference if modified else None,
                          reference_is_baseline=modified and reference is not None)

    @staticmethod
    def _erase_mask(gm: fx.GraphModule, root: fx.Node) -> set[fx.Node]:
        """Erase the mask computation that fed a removed multiplication (nothing else uses it)."""
        region = _ancestors(root) | {root} | set(_inplace_users(root))
        gone: set[fx.Node] = set()
        changed = True
        while changed:
            changed = False
            for n in reversed(list(gm.graph.nodes)):
                if n in region and not n.users and n.op not in ("placeholder", "output", "get_attr"):
                    gm.graph.erase_node(n)
                    region.discard(n)
                    gone.add(n)
                    changed = True
        return gone
