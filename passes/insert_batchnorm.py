"""insert_batchnorm: BatchNorm after every conv (optionally linear) not already normalised
(PRESERVING_AT_INIT: the eval-mode function is unchanged, exactly, eps included).

For each ``Conv1d/2d/3d`` / ``ConvTranspose*`` (and ``Linear`` with ``linear=true``, 2-D
outputs) whose output does not already feed a normalisation, a ``BatchNorm{1,2,3}d`` is inserted
right after it and the conv's bias ``c`` moves into the BatchNorm shift (a bias before BatchNorm
is redundant in training: the batch mean removes it). Initialisation, per channel:

- default (``calibrate=0``): ``running_mean = 0``, ``running_var = 1``,
  ``weight = sqrt(running_var + eps)``, ``bias = c``. In eval mode
  ``(z - 0) / sqrt(1 + eps) * sqrt(1 + eps) + c = z + c``: the original function, eps included.
  In train mode the layer standardises with batch statistics (that is the point of BatchNorm),
  so train-mode outputs differ from the original's.
- ``calibrate=N``: data-dependent init from N calibration batches (the model file's ``data()``
  when the pipeline was given one, else the example inputs): with the per-channel mean ``mu``
  and (biased) variance ``var`` of the conv output, ``running_mean = mu``,
  ``running_var = var``, ``weight = sqrt(var + eps)``, ``bias = mu + c``. Eval mode is still
  exactly the original; train mode is ``(z - mu_B) / sqrt(var_B + eps) * sqrt(var + eps) + mu + c``,
  which matches the original up to the batch's deviation from the calibration statistics.

``notes["train_mode_rel_l2_error"]``: relative L2 distance, on the example inputs, between the
rewritten and the original graph's train-mode outputs (same RNG seed, buffers restored).

Declined, with the reason: outputs already followed by a normalisation, convs called at more
than one place (shared weights), linear layers whose output is not 2-D (BatchNorm1d would
normalise the wrong axis), layers excluded by ``include``/``exclude`` globs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt import Decline, Option, Pass, PassResult, Rewrite, Semantics
from graphopt.ir import (add_module, candidate_sites, example_inputs, is_module, module_of, output_shape,
                         run_calibration, train_mode)
from graphopt.verify import rel_l2_error

__all__ = ["InsertBatchNorm"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_NORM_FUNCTIONS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm,
                   torch.batch_norm, torch.layer_norm, torch.group_norm, torch.instance_norm}
_BN_FOR_DIM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


_LAYOUT_METHODS = {"permute", "transpose", "contiguous", "view", "reshape", "flatten"}
_LAYOUT_FUNCTIONS = {torch.permute, torch.transpose, torch.reshape, torch.flatten}


def _norm_user(gm: fx.GraphModule, node: fx.Node, depth: int = 0) -> str | None:
    """A normalisation consuming ``node``, directly or through layout-only ops (ConvNeXt:
    conv -> permute -> LayerNorm)."""
    for user in node.users:
        if depth < 3 and ((user.op == "call_method" and user.target in _LAYOUT_METHODS)
                          or (user.op == "call_function" and user.target in _LAYOUT_FUNCTIONS)):
            found = _norm_user(gm, user, depth + 1)
            if found:
                return found
            continue
        if user.op == "call_module":
            mod = module_of(gm, user)
            if isinstance(mod, _NORM_MODULES) or "Norm" in type(mod).__name__:
                return f"{type(mod).__name__} ({user.target})"
        if user.op == "call_function" and user.target in _NORM_FUNCTIONS:
            return f"{user.target.__name__}"
    return None


def _train_mode_output(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], seed: int = 0) -> list[torch.Tensor]:
    """Train-mode outputs with a fixed RNG seed; buffers (BN statistics) and flags restored."""
    saved = {k: v.clone() for k, v in gm.named_buffers()}
    try:
        with train_mode(gm), torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            out = gm(*inputs)
    finally:
        with torch.no_grad():
            for k, v in gm.named_buffers():
                v.copy_(saved[k])
    flat = out if isinstance(out, (tuple, list)) else [out]
    return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _try_train_mode_output(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor] | str:
    try:
        return _train_mode_output(gm, inputs)
    except (RuntimeError, ValueError) as exc:  # e.g. BatchNorm on one value per channel in train mode
        return f"train mode does not run on the example inputs: {str(exc).splitlines()[0][:160]}"


class InsertBatchNorm(Pass):
    name = "insert_batchnorm"
    semantics = Semantics.PRESERVING_AT_INIT
    training = "changes"
    training_reason = "the inserted BatchNorms normalise with batch statistics in training (identity only in eval)"
    summary = "BatchNorm after convs (and linears) without one; identity in eval mode, conv bias folded in"
    options = {
        "linear": Option(bool, False, "also after nn.Linear layers with 2-D outputs (BatchNorm1d)"),
        "include": Option(list, [], "module-path globs to consider (empty: all)"),
        "exclude": Option(list, [], "module-path globs to skip"),
        "eps": Option(float, 1e-5, "BatchNorm eps", min=0.0),
        "momentum": Option(float, 0.1, "BatchNorm momentum", min=0.0, max=1.0),
        "calibrate": Option(int, 0, "calibration batches for a data-dependent init (train mode matches too)", min=0),
    }

    def call(self, gm: fx.GraphModule) -> PassResult:
        rewrites: list[Rewrite] = []
        types: tuple[type, ...] = _CONV + ((nn.Linear,) if self.config["linear"] else ())
        sites, declined = candidate_sites(gm, types, include=self.config["include"], exclude=self.config["exclude"])
        inputs = example_inputs(gm)
        train_before: list[torch.Tensor] | str | None = None
        inserted: list[tuple[str, str, torch.Tensor | None]] = []  # (layer, bn path, old bias)
        for site in sites:
            path, mod, nodes = site.path, site.module, site.nodes
            kind = type(mod).__name__
            if len(nodes) > 1:
                declined.append(Decline(path, f"{kind} called at {len(nodes)} places (shared weights): its bias "
                                              "cannot move into one BatchNorm"))
                continue
            node = nodes[0]
            norm = _norm_user(gm, node)
            if norm:
                declined.append(Decline(path, f"already followed by a normalisation: {norm}"))
                continue
            shape = output_shape(node)
            if isinstance(mod, nn.Linear):
                if shape is None or len(shape) != 2:
                    declined.append(Decline(path, f"Linear output has shape {shape}: BatchNorm1d normalises dim 1, "
                                                  "which is not the feature dim here"))
                    continue
                channels, dim = mod.out_features, 1
            else:
                channels, dim = mod.out_channels, len(mod.kernel_size)
            if train_before is None:
                train_before = _try_train_mode_output(gm, inputs)
            eps = self.config["eps"]
            ref = mod.weight
            bn = _BN_FOR_DIM[dim](channels, eps=eps, momentum=self.config["momentum"]).to(ref.device, ref.dtype)
            old_bias = mod.bias.detach().clone() if mod.bias is not None else None
            with torch.no_grad():
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0)
                bn.weight.fill_(math.sqrt(1.0 + eps))
                bn.bias.copy_(old_bias if old_bias is not None else torch.zeros(channels))
            mod.bias = None
            bn_path = add_module(gm, f"{path}_bn", bn)
            with gm.graph.inserting_after(node):
                bn_node = gm.graph.call_module(bn_path, (node,))
            node.replace_all_uses_with(bn_node, delete_user_cb=lambda u: u is not bn_node)
            bn_node.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "nn_module_stack")})
            inserted.append((path, bn_path, old_bias))
            rewrites.append(Rewrite(path, f"{type(bn).__name__}({channels}) inserted after {kind} as {bn_path}"
                                          + (", bias moved into its shift" if old_bias is not None else ""),
                                    {"bn": bn_path, "channels": channels, "bias_folded": old_bias is not None}))
        if not inserted:
            return PassResult(gm, False, rewrites, declined)
        gm.recompile()
        notes: dict[str, Any] = {"inserted": len(inserted), "calibration_batches": 0}
        if self.config["calibrate"] > 0:
            notes["calibration_batches"] = self._calibrate(gm, inserted)
        train_after = _try_train_mode_output(gm, inputs)
        if isinstance(train_before, list) and isinstance(train_after, list):
            notes["train_mode_rel_l2_error"] = rel_l2_error(train_after, train_before)
        else:
            notes["train_mode_rel_l2_error"] = None
            notes["train_mode_not_measured"] = train_after if isinstance(train_after, str) else train_before
        return PassResult(gm, True, rewrites, declined, notes=notes)

    def _calibrate(self, gm: fx.GraphModule, inserted: list[tuple[str, str, torch.Tensor | None]]) -> int:
        """Per-channel mean/variance of each new BatchNorm's input over the calibration batches
        (eval mode: the rewritten graph computes the original function there)."""
        stats: dict[str, list[Any]] = {}
        hooks = []
        for _, bn_path, _ in inserted:
            bn = gm.get_submodule(bn_path)

            def hook(module: nn.Module, args: tuple[Any, ...], key: str = bn_path) -> None:
                z = args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
                s = stats.setdefault(key, [0.0, 0.0, 0])
                s[0] = s[0] + z.sum(1)
                s[1] = s[1] + z.pow(2).sum(1)
                s[2] += z.shape[1]
            hooks.append(bn.register_forward_pre_hook(hook))
        try:
            batches = run_calibration(gm, self.config["calibrate"])
        finally:
            for h in hooks:
                h.remove()
        eps = self.config["eps"]
        for _, bn_path, old_bias in inserted:
            if bn_path not in stats:
                continue
            total, sq, n = stats[bn_path]
            mu = total / n
            var = (sq / n - mu.pow(2)).clamp_min(0.0)
            bn = gm.get_submodule(bn_path)
            c = old_bias.double() if old_bias is not None else torch.zeros_like(mu)
            with torch.no_grad():
                bn.running_mean.copy_(mu)
                bn.running_var.copy_(var)
                bn.weight.copy_((var + eps).sqrt())
                bn.bias.copy_(mu + c)
        return batches

    def ensures(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if is_module(gm, node, _CONV):
                users = list(node.users)
                if len(users) == 1 and users[0].op == "call_module" and str(users[0].target).endswith("_bn"):
                    assert module_of(gm, node).bias is None, f"{node.target}: bias not folded"
