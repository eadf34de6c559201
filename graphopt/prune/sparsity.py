"""Unstructured and 2:4 semi-structured sparsity for conv and linear weights.

Masks are computed from weight scores (``|w|`` for l1/l2, ``|w * dL/dw|`` for taylor), per
layer or globally, and *baked into the weights* (pruned entries become 0). With
``keep_zero=True`` they stay zero during fine-tuning, as plain graph code that survives
emission: the layer's call becomes ``F.conv2d(x, weight * mask, bias, ...)`` (or ``F.linear``)
with the boolean mask a buffer of a ``prune_masks`` container, so gradients of pruned entries
are zero and the effective weight stays sparse whatever the optimizer does.

2:4 (``mode="2:4"``): in every run of 4 consecutive input channels (per output channel and
kernel position) the 2 smallest are zeroed: the pattern NVIDIA sparse tensor cores run. On
CUDA, :func:`to_semi_structured` swaps 2:4 ``nn.Linear`` weights for
``torch.sparse.to_sparse_semi_structured`` tensors where the shapes and dtype allow; on CPU
the masks stay dense (no sparse kernels), and the pass's report says so.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.ir import name_matches
from graphopt.prune.structured import copy_graph_module

__all__ = ["MaskedWeight", "SparsityResult", "find_masked_weights", "prune_sparse", "sparsity_of",
           "to_semi_structured", "MASKS_MODULE"]

log = logging.getLogger(__name__)
MASKS_MODULE = "prune_masks"
_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_MASKABLE_FN = (F.conv1d, F.conv2d, F.conv3d, F.linear)


@dataclass
class MaskedWeight:
    """A conv/linear weight the sparsity modes act on."""

    module: str  # path of the module owning ``weight``
    node: fx.Node
    mask: str | None = None  # get_attr path of the mask when already masked in the graph
    mod: nn.Module | None = None
    in_axis: int = 1  # the weight's input-channel axis (0 for ``addmm(bias, x, weight[in, out])``)

    @property
    def weight_path(self) -> str:
        return f"{self.module}.weight"


@dataclass
class SparsityResult:
    gm: fx.GraphModule
    reference: fx.GraphModule | None
    modified: bool
    rewrites: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    declined: list[tuple[str, str]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


def find_masked_weights(gm: fx.GraphModule) -> list[MaskedWeight]:
    """Conv/linear layers: module calls, and functional calls whose weight is already
    ``get_attr(W) * get_attr(mask)`` (the form ``keep_zero`` leaves)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and type(mod) in (
                    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear):
                out.append(MaskedWeight(str(node.target), node, None, mod))
        elif node.op == "call_function" and node.target in _MASKABLE_FN and len(node.args) >= 2:
            w = node.args[1]
            if (isinstance(w, fx.Node) and w.op == "call_function" and w.target is operator.mul
                    and len(w.args) == 2 and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in w.args)):
                wpath, mpath = str(w.args[0].target), str(w.args[1].target)
                if wpath.endswith(".weight") and mpath.startswith(MASKS_MODULE + "."):
                    mpath_mod = wpath[: -len(".weight")]
                    out.append(MaskedWeight(mpath_mod, node, mpath, gm.get_submodule(mpath_mod)))
        elif node.op == "call_function" and node.target is torch.addmm and len(node.args) == 3 and not node.kwargs:
            mw = _addmm_weight(gm, node)
            if mw is not None:
                out.append(mw)
    return out


def _addmm_weight(gm: fx.GraphModule, node: fx.Node) -> MaskedWeight | None:
    """``torch.addmm(layer.bias, x, layer.weight)`` (HF's Conv1D, weight ``[in, out]``), or with
    ``layer.weight * mask`` after ``keep_zero``."""
    b, w = node.args[0], node.args[2]
    mask = None
    if (isinstance(w, fx.Node) and w.op == "call_function" and w.target is operator.mul and len(w.args) == 2
            and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in w.args)
            and str(w.args[1].target).startswith(MASKS_MODULE + ".")):
        mask, w = str(w.args[1].target), w.args[0]
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target).endswith(".weight")
            and isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    path = str(w.target)[: -len(".weight")]
    if str(b.target) != f"{path}.bias":
        return None
    mod = gm.get_submodule(path)
    if not isinstance(getattr(mod, "weight", None), torch.Tensor) or mod.weight.dim() != 2:
        return None
    return MaskedWeight(path, node, mask, mod, in_axis=0)


def sparsity_of(module: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros per conv/linear-like ``weight`` (>= 2-D) and overall."""
    per, zeros, total = {}, 0, 0
    for name, p in module.named_parameters():
        if name.endswith("weight") and p.dim() >= 2:
            z = int((p == 0).sum())
            per[name] = z / p.numel()
            zeros += z
            total += p.numel()
    per["__total__"] = zeros / total if total else 0.0
    return per


def _two_four_eligible(mw: MaskedWeight) -> str | None:
    w = mw.mod.weight
    in_per_group = w.shape[mw.in_axis]
    if in_per_group % 4:
        return f"{in_per_group} input channels per group is not a multiple of 4 (2:4 needs runs of 4)"
    return None


def _two_four_mask(score: torch.Tensor, in_axis: int = 1) -> torch.Tensor:
    """Keep the 2 largest of every 4 consecutive input channels (dim ``in_axis``)."""
    s = score.movedim(in_axis, -1)
    shape = s.shape
    s4 = s.reshape(-1, 4)
    top = s4.topk(2, dim=1).indices
    m = torch.zeros_like(s4, dtype=torch.bool).scatter_(1, top, True)
    return m.reshape(shape).movedim(-1, in_axis).contiguous()


def _keep_lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    flat = score.reshape(-1)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(flat, k, largest=False, sorted=False).indices
        mask[idx] = False
    return mask.reshape(score.shape)


def prune_sparse(gm: fx.GraphModule, *, mode: str = "unstructured", ratio: float = 0.5, criterion: str = "l1",
                 scope: str = "global", exclude: list[str] | None = None, keep_zero: bool = True,
                 batches: list[tuple[torch.Tensor, ...]] | None = None, loss_fn: Any = None,
                 ignore_output_layer: bool = True, ignore: list[str] | None = None) -> SparsityResult:
    """Zero weights of ``gm`` in place (unstructured ``ratio`` of all target weights, or 2:4).

    Existing zeros stay zero (a second run with the same ratio changes nothing).
    ``exclude``: module globs left dense (``ignore`` is its old name, still accepted).
    ``ignore_output_layer``: leave layers whose result is a model output (the classifier) dense.
    """
    from graphopt.prune.structured import renamed_exclude
    from graphopt.prune.importance import element_scores, gradients

    if criterion == "bn_scale":
        raise ValueError("bn_scale ranks channels, not weights")
    exclude = renamed_exclude(exclude, ignore, "prune_sparse")
    res = SparsityResult(gm, None, False)
    outputs = set()
    for n in gm.graph.nodes:
        if n.op == "output":
            outputs = {a for a in n.all_input_nodes}
    targets: list[MaskedWeight] = []
    for mw in find_masked_weights(gm):
        if name_matches(mw.module, exclude):
            res.declined.append((mw.module, "excluded by the 'exclude' option (formerly 'ignore')"))
        elif ignore_output_layer and mw.node in outputs:
            res.declined.append((mw.module, "produces the model output (the classifier is kept dense; "
                                            "list it in no option to change this)"))
        elif mode == "2:4" and (why := _two_four_eligible(mw)):
            res.declined.append((mw.module, why))
        else:
            targets.append(mw)
    res.notes = {"mode": mode, "criterion": criterion, "scope": scope if mode == "unstructured" else "2:4",
                 "layers": len(targets), "keep_zero": keep_zero}
    if not targets:
        return res
    grads = gradients(gm, batches or [], loss_fn) if criterion == "taylor" else None
    score_fn = element_scores(criterion, grads)
    old_masks: dict[str, torch.Tensor] = {}
    scores: dict[str, torch.Tensor] = {}
    for mw in targets:
        w = mw.mod.weight.detach()
        s = score_fn(mw.weight_path, w)
        old = (w != 0)
        if mw.mask is not None:
            old &= gm.get_buffer(mw.mask).bool()
        old_masks[mw.module] = old
        scores[mw.module] = torch.where(old, s, torch.full_like(s, -1.0))  # pruned stay pruned
    masks: dict[str, torch.Tensor] = {}
    if mode == "2:4":
        for mw in targets:
            masks[mw.module] = _two_four_mask(scores[mw.module], mw.in_axis) & old_masks[mw.module]
    elif scope == "per_layer":
        for mw in targets:
            s = scores[mw.module]
            k = max(int(s.numel() * ratio), int((~old_masks[mw.module]).sum()))
            masks[mw.module] = _keep_lowest_k(s, k) & old_masks[mw.module]
    else:
        flat = torch.cat([scores[mw.module].reshape(-1) for mw in targets])
        already = int(sum(int((~old_masks[mw.module]).sum()) for mw in targets))
        keep = _keep_lowest_k(flat, max(int(flat.numel() * ratio), already))
        start = 0
        for mw in targets:
            n = scores[mw.module].numel()
            masks[mw.module] = keep[start:start + n].reshape(scores[mw.module].shape) & old_masks[mw.module]
            start += n
    reference = copy_graph_module(gm)
    total = zero = 0
    for mw in targets:
        m = masks[mw.module]
        w = mw.mod.weight
        changed_w = bool(((w != 0) & ~m).any())
        need_mask = keep_zero and mw.mask is None
        mask_changed = mw.mask is not None and not torch.equal(gm.get_buffer(mw.mask).bool(), m)
        with torch.no_grad():
            reference.get_submodule(mw.module).weight.mul_(m.to(w.dtype))
            w.mul_(m.to(w.dtype))
        total += m.numel()
        zero += int((~m).sum())
        detail = f"{100.0 * (~m).float().mean().item():.1f}% of weights zero"
        if mw.mask is not None and mask_changed:
            gm.get_buffer(mw.mask).copy_(m)
            detail += " (mask updated)"
        elif need_mask:
            why = _functionalize(gm, mw, m)
            if why:
                res.declined.append((mw.module, f"zeros baked in but not kept during training: {why}"))
            else:
                detail += "; mask kept during training (weight * mask)"
        if changed_w or need_mask or mask_changed:
            res.modified = True
            res.rewrites.append((mw.module, detail, {"sparsity": float((~m).float().mean())}))
    res.notes["sparsity"] = zero / total if total else 0.0
    if mode == "2:4":
        res.notes["sparse_kernels"] = (
            "dense 2:4 masks on CPU: sparse tensor-core kernels need CUDA; after loading on a GPU call "
            "graphopt.prune.to_semi_structured(model) (nn.Linear layers; emit with keep_zero=false)"
            if not torch.cuda.is_available() else
            "dense 2:4 masks in the graph; call graphopt.prune.to_semi_structured(model) on the loaded model")
    if res.modified:
        gm.recompile()
        res.reference = reference
    return res


def _functionalize(gm: fx.GraphModule, mw: MaskedWeight, mask: torch.Tensor) -> str | None:
    """Replace ``module(x)`` by ``F.conv/linear(x, weight * mask, bias, ...)`` with a mask buffer."""
    mod, node = mw.mod, mw.node
    if node.op == "call_function" and node.target is torch.addmm:
        g = gm.graph
        with g.inserting_before(node):
            m = g.get_attr(f"{MASKS_MODULE}.{_mask_buffer(gm, mw, mask)}")
            node.args = (node.args[0], node.args[1], g.call_function(operator.mul, (node.args[2], m)))
        return None
    if len(node.args) != 1 or node.kwargs:
        return "unexpected call arguments"
    if isinstance(mod, nn.Linear):
        fn, extra = F.linear, ()
    else:
        if mod.padding_mode != "zeros":
            return f"padding_mode={mod.padding_mode!r}"
        fn = _CONV_FN[type(mod)]
        extra = (mod.stride, mod.padding, mod.dilation, mod.groups)
    bname = _mask_buffer(gm, mw, mask)
    g = gm.graph
    with g.inserting_before(node):
        w = g.get_attr(mw.weight_path)
        m = g.get_attr(f"{MASKS_MODULE}.{bname}")
        wm = g.call_function(operator.mul, (w, m))
        b = g.get_attr(f"{mw.module}.bias") if mod.bias is not None else None
        new = g.call_function(fn, (node.args[0], wm, b, *extra))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "cost", "val_shape")})
    node.replace_all_uses_with(new)
    g.erase_node(node)
    return None


def _mask_buffer(gm: fx.GraphModule, mw: MaskedWeight, mask: torch.Tensor) -> str:
    """A new buffer of the ``prune_masks`` container holding ``mask``; returns its name."""
    if not hasattr(gm, MASKS_MODULE):
        gm.add_module(MASKS_MODULE, nn.Module())
    container = gm.get_submodule(MASKS_MODULE)
    bname = mw.module.replace(".", "__") + "__weight"
    while hasattr(container, bname):
        bname += "_"
    container.register_buffer(bname, mask.clone())
    return bname


def to_semi_structured(module: nn.Module) -> dict[str, str]:
    """On CUDA: replace 2:4-sparse ``nn.Linear`` weights by semi-structured sparse tensors.

    Returns ``{layer: "converted" | reason}``. Needs CUDA, fp16/bf16 weights (cast the model
    first) and shapes the kernels accept; anything else is left dense with the reason.
    """
    out: dict[str, str] = {}
    if not torch.cuda.is_available():
        return {"*": "not converted: torch.sparse semi-structured kernels need CUDA"}
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError:  # pragma: no cover
        return {"*": "not converted: this torch has no to_sparse_semi_structured"}
    for name, mod in module.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight
        if not w.is_cuda:
            out[name] = "weight not on CUDA"
            continue
        if w.dtype not in (torch.float16, torch.bfloat16):
            out[name] = f"dtype {w.dtype} (2:4 kernels take float16/bfloat16)"
            continue
        groups = (w.detach() != 0).reshape(w.shape[0], -1, 4).sum(-1)
        if w.shape[1] % 4 or bool((groups > 2).any()):
            out[name] = "weight is not 2:4 sparse"
            continue
        try:
            mod.weight = nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=w.requires_grad)
            out[name] = "converted"
        except Exception as exc:  # shape/arch limits are only known to the kernel
            out[name] = f"not converted: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return out
