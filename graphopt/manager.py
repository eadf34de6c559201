"""PassManager: run passes, verifying each rewrite, and record what happened.

``graphopt.pass_infra`` is what a pass author imports; this module is what runs them. Reports are
written as JSON by :mod:`graphopt.serialize` (``PipelineReport.to_json``).

For every pass: ``requires`` -> ``call`` -> ``ensures`` -> ``graph.lint()`` -> shape and cost
propagation -> the numeric check its semantics promise. A failed check stops the pipeline
with a :class:`VerificationError` naming the pass (the report so far is attached).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx, nn

from graphopt.analysis.cost import GraphCost, annotate, graph_cost
from graphopt.capture import capture
from graphopt.errors import GraphoptError, PassError, PreconditionError, VerificationError
from graphopt.ir import copy_graph, graph_meta
from graphopt.pass_infra import Pass, PassResult, as_passes
from graphopt.serialize import dumps
from graphopt.verify import Verification, verify_rewrite

__all__ = ["PassManager", "PassRecord", "PipelineReport", "optimize"]

log = logging.getLogger(__name__)


def _snapshot(cost: GraphCost) -> dict[str, int]:
    return {"nodes": cost.nodes, "params": cost.params, "trainable_params": cost.trainable_params,
            "macs": cost.macs}


@dataclass
class PassRecord:
    name: str
    spec: str
    options: dict[str, Any]
    semantics: str
    modified: bool
    time_s: float
    before: dict[str, int]
    after: dict[str, int]
    rewrites: list[dict[str, Any]] = field(default_factory=list)
    declined: list[dict[str, str]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    verification: Verification | None = None

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "verification"}
        d["verification"] = self.verification.as_dict() if self.verification else None
        return d


@dataclass
class PipelineReport:
    records: list[PassRecord]
    before: GraphCost
    after: GraphCost
    verified: bool

    def as_dict(self) -> dict[str, Any]:
        return {"verified": self.verified, "before": self.before.as_dict(),
                "after": self.after.as_dict(), "passes": [r.as_dict() for r in self.records]}

    def to_json(self, **kw: Any) -> str:
        """Strict JSON of :meth:`as_dict` (see :mod:`graphopt.serialize`)."""
        return dumps(self.as_dict(), **kw)

    def __getitem__(self, name: str) -> PassRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(name)




class PassManager:
    """Runs passes in order with verification (``verify=False`` skips the numeric checks;
    lint and shape propagation always run)."""

    def __init__(self, passes: Sequence[Pass | str], verify: bool | str = True,
                 on_pass: Callable[[PassRecord], None] | None = None):
        self.passes = as_passes(passes)
        # verify="train-step": also one optimizer step on original and rewrite, parameters compared
        self.train_step = verify == "train-step"
        self.verify = bool(verify)
        self.on_pass = on_pass

    def run(self, gm: fx.GraphModule, example_inputs: Iterable[torch.Tensor]) -> tuple[fx.GraphModule, PipelineReport]:
        inputs = tuple(example_inputs)
        meta = graph_meta(gm)
        meta["example_inputs"] = inputs
        start_cost: GraphCost = meta.get("cost") or annotate(gm, inputs)
        cost = start_cost
        records: list[PassRecord] = []
        for p in self.passes:
            try:
                p.requires(gm)
            except PreconditionError as exc:
                exc.where = exc.where or f"pass '{p.name}'"
                raise PreconditionError(exc.what, where=f"pass '{p.name}'", fix=exc.fix) from exc
            work = copy_graph(gm) if self.verify else gm
            t0 = time.perf_counter()
            try:
                result = p.call(work)
            except GraphoptError:
                raise
            except Exception as exc:
                raise PassError(f"pass '{p.name}' crashed: {type(exc).__name__}: {exc}",
                                fix="this is a bug in the pass; rerun with --debug and report it") from exc
            elapsed = time.perf_counter() - t0
            if not isinstance(result, PassResult):
                raise PassError(f"pass '{p.name}' returned {type(result).__name__}, not PassResult")
            new = result.gm
            new.meta.setdefault("graphopt", {})
            for k, v in meta.items():
                new.meta["graphopt"].setdefault(k, v)
            try:
                p.ensures(new)
                new.graph.lint()
                new.recompile()
                new_cost = annotate(new, inputs) if result.modified else cost
            except Exception as exc:
                raise PassError(f"pass '{p.name}' produced an invalid graph: {type(exc).__name__}: {exc}",
                                fix="rerun with --no-verify to inspect it, and report the bug") from exc
            new.meta["graphopt"]["cost"] = new_cost
            if not result.modified:
                ver = Verification("skipped", p.semantics.value, message="graph unchanged")
            elif not self.verify:
                ver = Verification("skipped", p.semantics.value, message="--no-verify")
            else:
                ver = verify_rewrite(p, gm, new, inputs, result, train_step=self.train_step,
                                     rerun=lambda g, p=p: _rerun(p, g))
            ver.training = p.training
            rec = PassRecord(
                name=p.name, spec=p.spec(), options=dict(p.config), semantics=p.semantics.value,
                modified=result.modified, time_s=elapsed, before=_snapshot(cost), after=_snapshot(new_cost),
                rewrites=[r.as_dict() for r in result.rewrites],
                declined=[d.as_dict() for d in result.declined], notes=result.notes, verification=ver,
            )
            records.append(rec)
            if self.on_pass:
                self.on_pass(rec)
            if not ver.ok:
                err = VerificationError(
                    f"pass '{p.name}' failed verification ({p.semantics.value}): "
                    + (ver.message or ver.summary()),
                    fix=("loosen its budget, exclude the offending layers, or use --no-verify to inspect"
                         if "budget" in p.options else "this is a bug in the pass (it does not keep its declared "
                         "semantics); exclude the offending layers or use --no-verify to inspect"),
                )
                err.report = PipelineReport(records, start_cost, new_cost, False)  # type: ignore[attr-defined]
                raise err
            gm, cost = new, new_cost
            meta = graph_meta(gm)
        verified = self.verify and all(r.verification and r.verification.status != "failed" for r in records)
        return gm, PipelineReport(records, start_cost, graph_cost(gm), verified)


def _rerun(p: Pass, gm: nn.Module) -> nn.Module:
    """The pass applied again to ``gm`` (the verifier's randomized original)."""
    result = p.call(copy_graph(gm))  # type: ignore[arg-type]
    result.gm.recompile()
    return result.gm


def optimize(module: nn.Module, example_inputs: Iterable[torch.Tensor] | torch.Tensor,
             passes: Sequence[Pass | str] | Pass | str, *, verify: bool | str = True,
             calibration_data: Iterable[Any] | None = None,
             on_pass: Callable[[PassRecord], None] | None = None) -> tuple[fx.GraphModule, PipelineReport]:
    """Capture ``module`` (unless it already is a captured GraphModule) and run ``passes``.

    ``passes``: Pass instances, ``"name:key=value"`` strings, or a mix. Returns the rewritten
    GraphModule (an ``nn.Module``; the caller's model is not modified) and the report.
    ``calibration_data``: input batches for data-dependent passes (calibration, importance).
    ``verify``: True (the checks the passes' semantics promise), False, or ``"train-step"`` (also
    one optimizer step on original and rewrite, parameters compared).
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs)
    gm = capture(module, inputs)
    if calibration_data is not None:
        graph_meta(gm)["calibration_data"] = calibration_data
    return PassManager(passes, verify=verify, on_pass=on_pass).run(gm, inputs)
