"""The pipeline emitter: one torch folder per stage plus a pipeline manifest.

    out/
      manifest.json      format graphopt.pipeline: stages (folder, inputs, outputs, cost), the
                         partition plan (stage costs, balance, cut bytes, predicted bubble),
                         the model file (for loss()/data()), the model's inputs and outputs,
                         passes and verification
      stage0/            a torch folder (module.py + weights.safetensors + manifest.json)
      stage1/
      ...

Each stage is written by :func:`graphopt.emit.torch_folder.emit_torch_folder` (readable source,
safetensors, checked on reload). Before the folder is moved into place the stages are loaded
back, chained, and compared with the whole graph. ``graphopt launch out/`` trains it under
``torchrun``; :func:`load_pipeline` chains the stages in one process (optionally one device per
stage: ``device_map``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx, nn

from graphopt.dist.stages import SequentialStages, partition_plan, resolve_devices, split_stages
from graphopt.emit.base import EmitResult, Emitter
from graphopt.emit.fs import atomic_folder, check_output_folder, manifest_header, read_manifest
from graphopt.emit.torch_folder import MANIFEST_FILE, WEIGHTS_FILE, emit_torch_folder, load
from graphopt.errors import ArtifactError, EmitError, PassConfigError, PreconditionError
from graphopt.ir import eval_mode, tensor_specs

__all__ = ["PipelineEmitter", "emit_pipeline", "load_pipeline", "load_stage", "read_pipeline_manifest", "FORMAT",
           "FORMAT_VERSION"]

FORMAT = "graphopt.pipeline"
FORMAT_VERSION = 1


def emit_pipeline(gm: fx.GraphModule, out: str | Path, *, report: Any = None, force: bool = False,
                  source: dict[str, Any] | None = None) -> Path:
    """Write the stages of a partitioned graph (``-p partition:stages=N``) to ``out``."""
    from graphopt.serialize import write_json

    check_output_folder(out, force)
    try:
        plan = partition_plan(gm)
    except PreconditionError as exc:
        raise EmitError(exc.what, where="--emit pipeline", fix=exc.fix) from None
    meta = gm.meta.get("graphopt", {})
    inputs = meta.get("example_inputs")
    if inputs is None:
        raise EmitError("the graph has no example inputs", where="--emit pipeline",
                        fix="capture it with graphopt.capture/optimize")
    inputs = tuple(inputs)
    stages = split_stages(gm, inputs)
    with eval_mode(gm), torch.no_grad():
        reference = gm(*inputs)
    n = len(stages)
    with atomic_folder(out, force) as tmp:
        entries = []
        for i, stage in enumerate(stages):
            folder = f"stage{i}"
            ex = stage.meta["graphopt"]["example_inputs"]
            emit_torch_folder(stage, tmp / folder, source=source, check_inputs=ex,
                              extra={"pipeline_stage": {"index": i, "stages": n}})
            detail = plan["stage_detail"][i]
            with torch.no_grad():
                stage_out = stage.eval()(*ex)
            entries.append({
                "index": i, "folder": folder, "inputs": detail["inputs"], "outputs": detail["outputs"],
                "input_tensors": tensor_specs(ex), "output_tensors": tensor_specs(stage_out),
                "cost": detail["cost"], "macs": detail["macs"], "params": detail["params"],
                "param_bytes": detail["param_bytes"],
            })
        plan_public = {k: v for k, v in plan.items() if k != "assignment"}
        manifest: dict[str, Any] = {
            **manifest_header(FORMAT, FORMAT_VERSION, meta, source),
            "inputs": tensor_specs(inputs),
            "outputs": tensor_specs(reference),
            "output_is_tensor": isinstance(reference, torch.Tensor),
            "stages": entries,
            "partition": plan_public,
            "microbatches": plan["bubble"]["microbatches"],
        }
        if report is not None:
            manifest["verified"] = report.verified
            manifest["passes"] = [r.as_dict() for r in report.records]
        write_json(tmp / MANIFEST_FILE, manifest)
        chained = load_pipeline(tmp)
        _compare(reference, chained, inputs)
    return Path(out)


def _compare(reference: Any, chained: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    from torch.utils._pytree import tree_flatten

    from graphopt.verify import max_rel_error

    chained.eval()
    with torch.no_grad():
        got = chained(*inputs)
    a = [t for t in tree_flatten(reference)[0] if isinstance(t, torch.Tensor)]
    b = [t for t in tree_flatten(got)[0] if isinstance(t, torch.Tensor)]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise EmitError("the chained stages do not return the graph's outputs", fix="report this emitter bug")
    err = max_rel_error([y for y in b if y.is_floating_point()], [x for x in a if x.is_floating_point()])
    if err > 1e-5:
        raise EmitError(f"the chained stages differ from the graph (max relative error {err:.2e})",
                        fix="report this emitter bug")


def read_pipeline_manifest(folder: str | Path, *, check_files: bool = True) -> dict[str, Any]:
    """The pipeline manifest, after checking that every stage folder has its files."""
    folder = Path(folder)
    manifest = read_manifest(folder, fmt=FORMAT, version=FORMAT_VERSION, what="pipeline folder",
                             emit_hint="graphopt optimize MODEL.py -p partition:stages=N --emit pipeline -o OUT")
    if check_files:
        for entry in manifest.get("stages", []):
            sdir = folder / entry["folder"]
            for fname in (MANIFEST_FILE, WEIGHTS_FILE):
                if not (sdir / fname).is_file():
                    raise ArtifactError(f"stage {entry['index']} file {entry['folder']}/{fname} is missing",
                                        where=str(folder), fix="re-emit the pipeline folder")
    return manifest


def check_loads_without_code(folder: str | Path, manifest: dict[str, Any] | None = None) -> None:
    """Refuse (one line) a pipeline folder whose stages cannot be rebuilt without running their code."""
    import json

    from graphopt.emit.graph_json import GRAPH_FILE

    folder = Path(folder)
    manifest = manifest or read_pipeline_manifest(folder)
    for entry in manifest["stages"]:
        stage = json.loads((folder / entry["folder"] / MANIFEST_FILE).read_text())
        if GRAPH_FILE not in stage.get("files", {}):
            reason = stage.get("needs_code") or "written by a graphopt without graph.json"
            raise ArtifactError(f"stage {entry['index']} needs code to load ({reason}); the default load runs none",
                                where=str(folder), fix="pass --trust-code if you trust the folder's module.py "
                                                       "files, or re-emit the folder")


def load_stage(folder: str | Path, index: int, manifest: dict[str, Any] | None = None, *,
               trust_code: bool = False) -> nn.Module:
    """Stage ``index`` of a pipeline folder as an ``nn.Module`` (checksums verified; no code runs
    unless ``trust_code``: see :func:`graphopt.load`)."""
    folder = Path(folder)
    manifest = manifest or read_pipeline_manifest(folder)
    stages = manifest["stages"]
    if not 0 <= index < len(stages):
        raise ArtifactError(f"no stage {index} (the pipeline has {len(stages)})", where=str(folder))
    return load(folder / stages[index]["folder"], trust_code=trust_code)


def load_pipeline(folder: str | Path, devices: Sequence[str | torch.device] | str | None = None, *,
                  trust_code: bool = False) -> nn.Module:
    """All stages chained in one process (``devices``: one per stage, or ``"auto"``).

    The result has ``.graphopt_manifest`` (the pipeline manifest) and ``.stages``.
    """
    folder = Path(folder)
    manifest = read_pipeline_manifest(folder)
    mods = [load_stage(folder, i, manifest, trust_code=trust_code) for i in range(len(manifest["stages"]))]
    devs = resolve_devices(devices, len(mods)) if devices is not None else None
    net = SequentialStages(mods, devs)
    net.graphopt_manifest = manifest  # type: ignore[attr-defined]
    net.train()
    return net


class PipelineEmitter(Emitter):
    """``--emit pipeline``: one torch folder per stage of a partitioned graph, plus the plan."""

    name = "pipeline"
    description = "one torch folder per pipeline stage (needs -p partition:stages=N); train with graphopt launch"

    def preflight(self, passes: Sequence[Any] = ()) -> None:
        if not any(getattr(p, "name", None) == "partition" for p in passes):
            raise PassConfigError("the pipeline has no partition pass, so the graph would have no pipeline partition",
                                  where="--emit pipeline",
                                  fix="add -p partition:stages=2 (or N stages) as the last pass")

    def emit(self, gm: fx.GraphModule, out: str | Path, *, report: Any = None, force: bool = False,
             source: dict[str, Any] | None = None, spec: Any = None) -> EmitResult:
        path = emit_pipeline(gm, out, report=report, force=force, source=source)
        manifest = read_pipeline_manifest(path)
        return EmitResult(path, self.name, details={"stages": len(manifest["stages"])})

    def summary(self, result: EmitResult) -> str:
        return (f"{result.details.get('stages')} stages, each reloaded and chained: outputs match the graph; "
                f"train with `graphopt launch {result.path}`")
