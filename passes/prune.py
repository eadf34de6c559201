"""prune: structured channel pruning that shrinks tensors, or unstructured / 2:4 sparsity (APPROXIMATE).

- ``mode=structured``: channel groups from the dependency analysis
  (:func:`graphopt.analysis.analyze_channels`, with its per-layer channel rules) are ranked and
  the weights, biases and norm statistics are sliced by those rules
  (:func:`graphopt.prune.prune_structured`). The result must equal, exactly, the original with
  the same channels masked (the pass's ``reference``); the error against the unpruned model is
  checked against ``budget``.
- ``mode=unstructured`` / ``mode=2:4``: weights zeroed in place (:func:`graphopt.prune.prune_sparse`),
  with ``keep_zero`` keeping them zero during fine-tuning (``weight * mask`` in the graph).

Every channel group is either pruned (a Rewrite) or declined with the reason (an op or layer the
rules cannot follow, LayerNorm over channels, model output, excluded, nothing left after rounding ...).
``hidden=true`` also prunes a transformer's hidden width (embeddings, residual adds, LayerNorm /
RMSNorm over the channels sliced): approximate, so such a group has no exact masked reference and the
result is checked against the original within ``budget``.
The option ``ignore`` is the old name of ``exclude``: still accepted, reported as renamed.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import fx

from graphopt import Decline, Option, Pass, PassResult, Rewrite, Semantics
from graphopt.errors import PassConfigError
from graphopt.ir import calibration_batches
from graphopt.prune import prune_sparse, prune_structured

log = logging.getLogger(__name__)

RENAMED = {"ignore": "exclude"}  # old option name -> new


class Prune(Pass):
    name = "prune"
    semantics = Semantics.APPROXIMATE
    training = "same"
    summary = "structured channel pruning (smaller tensors) or unstructured / 2:4 sparsity"
    options = {
        "mode": Option(str, "structured", "structured (remove channels) | unstructured | 2:4 (zero weights)",
                       choices=("structured", "unstructured", "2:4")),
        "ratio": Option(float, 0.5, "structured: share of channels removed (per group, or of all groups "
                                    "with scope=global); sparsity modes: share of weights zeroed", min=0.0, max=0.99),
        "macs": Option(float, None, "structured: keep this share of the MACs instead of a ratio (e.g. 0.5)",
                       min=0.01, max=1.0, nullable=True),
        "criterion": Option(str, "l1", "channel/weight importance; reconstruction (structured): keep the channels "
                                        "whose loss the next layers' least-squares refit compensates worst, greedy "
                                        "on calibration batches (ThiNet-style)",
                            choices=("l1", "l2", "bn_scale", "taylor", "reconstruction")),
        "scope": Option(str, "per_layer", "rank per group/layer, or globally", choices=("per_layer", "global")),
        "sequential": Option(bool, False, "criterion=reconstruction, scope=per_layer: choose the groups in graph "
                                          "order, each on the inputs of the model with the earlier groups pruned "
                                          "and their consumers refit, against the original outputs (ThiNet / He "
                                          "et al. 2017)"),
        "round_to": Option(int, 1, "structured: kept channel counts are multiples of this (8 for tensor cores)",
                           min=1),
        "min_channels": Option(int, 1, "structured: never keep fewer channels in a group", min=1),
        "max_ratio": Option(float, 0.9, "structured: never remove more than this share of one group",
                            min=0.0, max=0.99),
        "hidden": Option(bool, False, "structured: also prune the hidden width of transformers (embeddings, residual "
                                      "adds, LayerNorm/RMSNorm over the channels sliced; approximate: the norms' "
                                      "statistics are then over the kept channels)"),
        "exclude": Option(list, [], "module globs never pruned (layers producing model outputs never are); "
                                    "old name: ignore"),
        "keep_zero": Option(bool, True, "sparsity modes: keep pruned weights at zero during fine-tuning"),
        "batches": Option(int, 4, "taylor: batches of calibration data for the gradients; reconstruction: "
                                  "batches for the selection when reconstruct=0", min=1),
        "reconstruct": Option(int, 0, "refit on N calibration batches from data() (0: off): structured: least "
                                      "squares of each consumer layer on the kept channels; sparsity modes: "
                                      "SparseGPT mask + weight update", min=0),
        "refine": Option(int, 0, "with reconstruct (structured): then N Adam steps regressing the pruned model's "
                                 "outputs onto the original's on the same batches (0: off; the layer-wise least "
                                 "squares alone left 0.06 logit error on MNIST, which 256 steps did not lower)",
                         min=0),
        "budget": Option(float, float("inf"), "max relative L2 output error vs the unpruned model "
                                              "(default: no limit; pruning before fine-tuning changes outputs)",
                         min=0.0),
    }

    def __init__(self, **options: Any) -> None:
        self.renamed: dict[str, str] = {}
        for old, new in RENAMED.items():
            if old not in options:
                continue
            if new in options:
                raise PassConfigError(f"option '{old}' was renamed to '{new}' and both are given",
                                      where=f"pass '{self.name}'", fix=f"give only '{new}'")
            options = {(new if k == old else k): v for k, v in options.items()}
            self.renamed[old] = new
            log.warning("pass 'prune': option '%s' was renamed to '%s' (the old name still works)", old, new)
        super().__init__(**options)

    def requires(self, gm: fx.GraphModule) -> None:
        c = self.config
        if c["mode"] != "structured" and c["criterion"] == "bn_scale":
            raise PassConfigError("criterion bn_scale ranks channels, not single weights",
                                  where=f"pass '{self.name}'", fix="use l1, l2 or taylor with mode=" + c["mode"])
        if c["mode"] != "structured" and c["hidden"]:
            raise PassConfigError("hidden=true prunes the hidden width (channels): it needs mode=structured",
                                  where=f"pass '{self.name}'", fix="drop hidden=true or use mode=structured")
        if c["mode"] != "structured" and c["criterion"] == "reconstruction":
            raise PassConfigError("criterion reconstruction ranks channels, not single weights",
                                  where=f"pass '{self.name}'", fix="use reconstruct=N (SparseGPT) with mode=" + c["mode"])
        if c["sequential"] and (c["mode"] != "structured" or c["criterion"] != "reconstruction"
                                or c["scope"] != "per_layer"):
            raise PassConfigError("sequential=true is a way of choosing channels with criterion=reconstruction, "
                                  "mode=structured, scope=per_layer (the per-group counts must not depend on the "
                                  "scores)", where=f"pass '{self.name}'",
                                  fix="add criterion=reconstruction with scope=per_layer, or drop sequential=true")
        if c["mode"] != "structured" and c["macs"] is not None:
            raise PassConfigError("a MACs target needs mode=structured (zeroed weights do not cut dense MACs)",
                                  where=f"pass '{self.name}'", fix="give ratio= instead")

    def call(self, gm: fx.GraphModule) -> PassResult:
        c = self.config
        rec = c["reconstruct"]
        batches = None
        if c["criterion"] == "taylor":
            batches = list(calibration_batches(gm, c["batches"]))
        elif c["criterion"] == "reconstruction":
            batches = list(calibration_batches(gm, rec or c["batches"]))
        calib = original = None
        if rec:
            from graphopt.ir import copy_graph
            from graphopt.recover import require_data

            require_data(gm, self.name)
            calib = list(calibration_batches(gm, rec))
            original = copy_graph(gm)
        renamed = {"renamed_options": [f"'{o}' is now '{n}'" for o, n in self.renamed.items()]} if self.renamed else {}
        if c["mode"] == "structured":
            r = prune_structured(gm, ratio=c["ratio"], macs=c["macs"], criterion=c["criterion"], scope=c["scope"],
                                 round_to=c["round_to"], min_channels=c["min_channels"], max_ratio=c["max_ratio"],
                                 exclude=c["exclude"], batches=batches, hidden=c["hidden"],
                                 sequential=c["sequential"])
            rewrites = [Rewrite(g.producers[0], f"kept {after}/{before} channels of "
                                + ("the hidden width (residual stream) of " if g.approximate else "")
                                + ", ".join(g.producers[:4]) + (" ..." if len(g.producers) > 4 else ""),
                                {"producers": g.producers, "before": before, "after": after,
                                 **({"hidden_width": True, "modules": g.modules} if g.approximate else {})})
                        for g, before, after in r.pruned]
            declined = [Decline(t, why) for t, why in r.declined]
            reference = r.reference
            if rec and r.pruned:
                from graphopt.recover import reconstruct_structured

                fits = reconstruct_structured(original, r.gm, r, calib)
                if c["refine"]:
                    from graphopt.recover import refine_outputs

                    fits.append(refine_outputs(original, r.gm, calib, steps=c["refine"]))
                r.notes["reconstruction"] = [f.as_dict() for f in fits]
                reference = None  # refit weights: no longer the masked original
            return PassResult(r.gm, bool(r.pruned), rewrites, declined, notes={**r.notes, **renamed},
                              reference=reference)
        scope = "per_layer" if c["scope"] == "per_layer" else "global"
        fits = None
        if rec:
            from graphopt.ir import copy_graph
            from graphopt.recover import sparsegpt

            probe = prune_sparse(copy_graph(gm), mode=c["mode"], ratio=c["ratio"], criterion="l1",
                                 scope="per_layer", exclude=c["exclude"], keep_zero=False)
            called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
            paths = [t for t, _, _ in probe.rewrites if t in called]
            fits = sparsegpt(gm, paths, calib, mode=c["mode"], ratio=c["ratio"], reference=original)
            scope = "per_layer"  # the masks are SparseGPT's, per layer
        s = prune_sparse(gm, mode=c["mode"], ratio=c["ratio"], criterion=c["criterion"],
                         scope=scope, exclude=c["exclude"], keep_zero=c["keep_zero"], batches=batches)
        if fits is not None:
            s.notes["reconstruction"] = [f.as_dict() for f in fits]
        return PassResult(gm, s.modified, [Rewrite(t, d, data) for t, d, data in s.rewrites],
                          [Decline(t, why) for t, why in s.declined], notes={**s.notes, **renamed},
                          reference=s.reference)
