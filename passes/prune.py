"""prune: structured channel pruning that shrinks tensors, or unstructured / 2:4 sparsity (APPROXIMATE).

- ``mode=structured``: channel groups from the dependency analysis
  (:mod:`graphopt.analysis.channels`) are ranked (:mod:`graphopt.prune.importance`) and the
  weights, biases and norm statistics are sliced (:mod:`graphopt.prune.structured`). The result
  must equal, exactly, the original with the same channels masked (the pass's ``reference``);
  the error against the unpruned model is checked against ``budget``.
- ``mode=unstructured`` / ``mode=2:4``: weights zeroed in place (:mod:`graphopt.prune.sparsity`),
  with ``keep_zero`` keeping them zero during fine-tuning (``weight * mask`` in the graph).

Every channel group is either pruned (a Rewrite) or declined with the reason (unknown op,
LayerNorm over channels, model output, ignored, nothing left after rounding ...).
"""

from __future__ import annotations

from torch import fx

from graphopt.errors import PassConfigError
from graphopt.ir import calibration_batches
from graphopt.pass_infra import Decline, Option, Pass, PassResult, Rewrite, Semantics


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
        "criterion": Option(str, "l1", "channel/weight importance", choices=("l1", "l2", "bn_scale", "taylor")),
        "scope": Option(str, "per_layer", "rank per group/layer, or globally", choices=("per_layer", "global")),
        "round_to": Option(int, 1, "structured: kept channel counts are multiples of this (8 for tensor cores)",
                           min=1),
        "min_channels": Option(int, 1, "structured: never keep fewer channels in a group", min=1),
        "max_ratio": Option(float, 0.9, "structured: never remove more than this share of one group",
                            min=0.0, max=0.99),
        "ignore": Option(list, [], "module globs never pruned (layers producing model outputs never are)"),
        "keep_zero": Option(bool, True, "sparsity modes: keep pruned weights at zero during fine-tuning"),
        "batches": Option(int, 4, "taylor: batches of calibration data for the gradients", min=1),
        "budget": Option(float, float("inf"), "max relative L2 output error vs the unpruned model "
                                              "(default: no limit; pruning before fine-tuning changes outputs)",
                         min=0.0),
    }

    def requires(self, gm: fx.GraphModule) -> None:
        c = self.config
        if c["mode"] != "structured" and c["criterion"] == "bn_scale":
            raise PassConfigError("criterion bn_scale ranks channels, not single weights",
                                  where=f"pass '{self.name}'", fix="use l1, l2 or taylor with mode=" + c["mode"])
        if c["mode"] != "structured" and c["macs"] is not None:
            raise PassConfigError("a MACs target needs mode=structured (zeroed weights do not cut dense MACs)",
                                  where=f"pass '{self.name}'", fix="give ratio= instead")

    def call(self, gm: fx.GraphModule) -> PassResult:
        c = self.config
        batches = list(calibration_batches(gm, c["batches"])) if c["criterion"] == "taylor" else None
        if c["mode"] == "structured":
            from graphopt.prune.structured import prune_structured

            r = prune_structured(gm, ratio=c["ratio"], macs=c["macs"], criterion=c["criterion"], scope=c["scope"],
                                 round_to=c["round_to"], min_channels=c["min_channels"], max_ratio=c["max_ratio"],
                                 ignore=c["ignore"], batches=batches)
            rewrites = [Rewrite(g.producers[0], f"kept {after}/{before} channels of "
                                + ", ".join(g.producers[:4]) + (" ..." if len(g.producers) > 4 else ""),
                                {"producers": g.producers, "before": before, "after": after})
                        for g, before, after in r.pruned]
            declined = [Decline(t, why) for t, why in r.declined]
            return PassResult(gm, bool(r.pruned), rewrites, declined, notes=r.notes, reference=r.reference)
        from graphopt.prune.sparsity import prune_sparse

        s = prune_sparse(gm, mode=c["mode"], ratio=c["ratio"], criterion=c["criterion"],
                         scope="per_layer" if c["scope"] == "per_layer" else "global", ignore=c["ignore"],
                         keep_zero=c["keep_zero"], batches=batches)
        return PassResult(gm, s.modified, [Rewrite(t, d, data) for t, d, data in s.rewrites],
                          [Decline(t, why) for t, why in s.declined], notes=s.notes, reference=s.reference)
