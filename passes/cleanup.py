"""cleanup: remove dead code and identity operations (EXACT).

Removed:
- nodes whose result is unused and that have no side effect (in-place ops are kept),
- ``nn.Identity`` modules, ``Dropout`` with ``p == 0`` (module or functional),
- ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0`` with a Python scalar,
- ``view``/``reshape``/``flatten`` whose output shape equals the input shape,
- ``.to(dtype)``/``.float()``/``.half()``/``.type(dtype)`` casts to the dtype the tensor already has,
- submodules nothing calls any more.

Declined, with the reason: ``Dropout`` with ``p > 0`` (active in training: use
``drop_regularization``).
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from graphopt import Decline, Pass, PassResult, Rewrite, Semantics
from graphopt.ir import module_of, output_dtype, output_shape

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_SHAPE_OPS_METHOD = {"view", "reshape", "flatten"}
_SHAPE_OPS_FN = {torch.reshape, torch.flatten}
_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                 "bfloat16": torch.bfloat16}
_NEUTRAL = {operator.mul: 1, operator.truediv: 1, operator.add: 0, operator.sub: 0}


def is_side_effect_free(node: fx.Node) -> bool:
    """Stricter than fx's ``Node.is_impure``: in-place methods/functions count as effects."""
    if node.op in ("placeholder", "output"):
        return False
    if node.is_impure():
        return False
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return False
    if node.op == "call_function" and node.target in (operator.setitem, operator.iadd, operator.imul,
                                                       operator.isub, operator.itruediv):
        return False
    return True


def _identity_input(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node | None, str | None, str | None]:
    """(input node, what) if ``node`` computes the identity of its input; (None, None, reason) to
    record a decline; (None, None, None) otherwise."""
    if node.op == "call_module":
        mod = module_of(gm, node)
        if isinstance(mod, nn.Identity) and node.args:
            return node.args[0], "nn.Identity", None
        if isinstance(mod, _DROPOUTS):
            if mod.p == 0:
                return node.args[0], f"{type(mod).__name__}(p=0)", None
            return None, None, (f"{type(mod).__name__}(p={mod.p}) is active in training; "
                                "use the drop_regularization pass to remove it")
        return None, None, None
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if src is None:
        return None, None, None
    if node.op == "call_function" and node.target is torch.nn.functional.dropout:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        if p == 0:
            return src, "dropout(p=0)", None
        return None, None, None
    if node.op == "call_function" and node.target in _NEUTRAL and len(node.args) == 2:
        other = node.args[1]
        if type(other) in (int, float) and other == _NEUTRAL[node.target]:
            return src, f"{node.target.__name__} by {other}", None
        return None, None, None
    same_shape = output_shape(node) is not None and output_shape(node) == output_shape(src)
    if same_shape and ((node.op == "call_method" and node.target in _SHAPE_OPS_METHOD)
                       or (node.op == "call_function" and node.target in _SHAPE_OPS_FN)):
        return src, f"{getattr(node.target, '__name__', node.target)} to the same shape", None
    if node.op == "call_method":
        src_dtype = output_dtype(src)
        target_dtype = None
        if node.target in _CAST_METHODS and len(node.args) == 1 and not node.kwargs:
            target_dtype = _CAST_METHODS[node.target]
        elif node.target in ("to", "type") and len(node.args) == 2 and isinstance(node.args[1], torch.dtype) \
                and set(node.kwargs) <= {"copy"} and not node.kwargs.get("copy", False):
            target_dtype = node.args[1]
        if target_dtype is not None and src_dtype == target_dtype:
            return src, f"cast to {str(target_dtype).replace('torch.', '')} (already that dtype)", None
    return None, None, None


class Cleanup(Pass):
    name = "cleanup"
    semantics = Semantics.EXACT
    training = "same"
    summary = "remove dead code, identity ops (Identity, p=0 dropout, no-op casts/reshapes) and unused modules"
    options = {}

    def call(self, gm: fx.GraphModule) -> PassResult:
        rewrites: list[Rewrite] = []
        declined: list[Decline] = []
        for node in list(gm.graph.nodes):
            src, what, reason = _identity_input(gm, node)
            if reason:
                declined.append(Decline(str(node.target), reason))
            if src is None:
                continue
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            rewrites.append(Rewrite(node.name, f"removed identity: {what}"))
        changed = True
        while changed:
            changed = False
            for node in reversed(list(gm.graph.nodes)):
                if not node.users and is_side_effect_free(node):
                    gm.graph.erase_node(node)
                    rewrites.append(Rewrite(node.name, "removed dead code"))
                    changed = True
        before = {n for n, _ in gm.named_modules()}
        gm.delete_all_unused_submodules()
        for name in sorted(before - {n for n, _ in gm.named_modules()}):
            rewrites.append(Rewrite(name, "removed unused submodule"))
        if rewrites:
            gm.recompile()
        return PassResult(gm, bool(rewrites), rewrites, declined,
                          notes={"removed": len(rewrites)})
