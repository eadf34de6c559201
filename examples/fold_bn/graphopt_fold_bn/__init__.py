"""fold_bn: eval-mode BatchNorm folded into the preceding convolution (a graphopt plugin).

``conv -> BatchNorm2d`` becomes one ``Conv2d`` with

    w' = w * gamma / sqrt(running_var + eps)            (per output channel)
    b' = (b - running_mean) * gamma / sqrt(running_var + eps) + beta

Semantics: the eval function is EXACT (checked by graphopt at the model's own weights and at a
randomized state, where BatchNorm statistics are not the identity). Training CHANGES: the
folded BatchNorm no longer normalises with batch statistics, and its parameters are gone.

Declined, with the reason: a BatchNorm whose input is not a ``Conv2d`` call, a conv whose
output has other users or whose module is called more than once, BatchNorms without running
statistics, and paths matching ``exclude``.

This file imports only public graphopt names: it is how any plugin pass is written.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from graphopt import Decline, Option, Pass, PassResult, Rewrite, Semantics
from graphopt.ir import module_of, name_matches, replace_module

__all__ = ["FoldBatchNorm", "fold_conv_bn"]


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d computing ``bn(conv(x))`` with ``bn`` in eval mode (arithmetic in float64)."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(b)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(b)
    scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    fused = fused.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(w * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_((b - bn.running_mean.double()) * scale + beta)
    fused.weight.requires_grad_(conv.weight.requires_grad)
    return fused


class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm2d into the preceding Conv2d."""

    name = "fold_bn"
    semantics = Semantics.EXACT
    training = "changes"
    training_reason = "the folded BatchNorm no longer normalises with batch statistics"
    summary = "eval-mode BatchNorm2d folded into the preceding Conv2d (one conv instead of conv + BN)"
    options = {"exclude": Option(list, [], "globs on BatchNorm module paths to leave alone")}

    def call(self, gm: fx.GraphModule) -> PassResult:
        rewrites: list[Rewrite] = []
        declined: list[Decline] = []
        param_map: dict[str, str | None] = {}
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        for node in list(gm.graph.nodes):
            bn = module_of(gm, node)
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            path = str(node.target)
            src = node.args[0] if node.args else None
            conv = module_of(gm, src) if isinstance(src, fx.Node) else None
            reason = None
            if name_matches(path, self.config["exclude"]):
                reason = "excluded"
            elif type(bn).forward is not nn.BatchNorm2d.forward:
                reason = f"{type(bn).__name__} has a forward of its own (e.g. an activation inside); not folded"
            elif not isinstance(conv, nn.Conv2d):
                reason = "its input is not a Conv2d call"
            elif len(src.users) > 1:
                reason = f"the conv's output has {len(src.users)} users"
            elif calls[str(src.target)] > 1 or calls[path] > 1:
                reason = "the conv or the BatchNorm module is called more than once"
            elif bn.running_mean is None or bn.running_var is None:
                reason = "no running statistics (track_running_stats=False)"
            if reason:
                declined.append(Decline(path, reason))
                continue
            conv_path = str(src.target)
            replace_module(gm, conv_path, fold_conv_bn(conv, bn))
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            # the conv's tensors are new values, not the original's: no counterpart
            param_map.update({f"{conv_path}.weight": None, f"{conv_path}.bias": None})
            rewrites.append(Rewrite(path, f"folded into {conv_path}"))
        if rewrites:
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(gm, bool(rewrites), rewrites, declined, notes={"folded": len(rewrites)},
                          param_map=param_map)
