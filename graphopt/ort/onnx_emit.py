"""``--emit onnx``: an inference ONNX model of the rewritten graph, checked and compared.

    out/
      model.onnx      eval-mode graph (TorchScript exporter, dynamic batch axis, opset 17)
      manifest.json   versions, inputs/outputs, passes, onnx.checker result, and ORT inference
                      outputs compared with PyTorch's on the example inputs (and at batch 1)

The folder is written atomically, and only if ``onnx.checker`` passes and ONNX Runtime's outputs
match PyTorch's (max abs error / max abs output <= 1e-4 in float32, 2e-2 with half casts inside).
"""

from __future__ import annotations

import logging

import copy
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx, nn

from graphopt.emit.base import EmitResult, Emitter
from graphopt.emit.fs import atomic_folder, check_output_folder, manifest_header, resolve_inputs, sha256_file
from graphopt.errors import EmitError
from graphopt.pass_infra import Option

__all__ = ["OnnxEmitter", "emit_onnx_model", "check_summary", "MODEL_FILE", "ONNX_FORMAT"]

log = logging.getLogger(__name__)
ONNX_FORMAT = "graphopt.onnx"
MODEL_FILE = "model.onnx"
MANIFEST = "manifest.json"


def _outputs(module: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    m = copy.deepcopy(module).eval()
    with torch.no_grad():
        out = m(*inputs)
    return [out] if isinstance(out, torch.Tensor) else list(out.values()) if isinstance(out, dict) else list(out)


def _runs_at_batch_1(module: nn.Module, inputs: Sequence[torch.Tensor]) -> bool:
    """Whether the module runs on the first sample of the inputs (a dynamic batch axis makes sense)."""
    if not inputs or inputs[0].dim() == 0 or inputs[0].shape[0] <= 1:
        return True
    try:
        _outputs(module, tuple(t[:1] for t in inputs))
    except Exception:  # any failure: the graph is specialised to the example batch
        return False
    return True


def compare_with_ort(path: str | Path, module: nn.Module, inputs: Sequence[torch.Tensor],
                     input_names: Sequence[str]) -> dict[str, Any]:
    """ORT InferenceSession outputs vs the module's eval outputs: max abs err / max abs output."""
    from graphopt.ort._deps import require_ort
    from graphopt.verify import max_rel_error

    ort = require_ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    try:
        got = sess.run(None, {n: t.detach().cpu().contiguous().numpy() for n, t in zip(input_names, inputs)})
    except Exception as exc:  # the checked emit fails with this line, not a runtime traceback
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        return {"inputs": [list(t.shape) for t in inputs], "max_rel_error": float("inf"),
                "message": f"ONNX Runtime failed: {type(exc).__name__}: {(lines[-1] if lines else '')[:300]}"}
    ref = _outputs(module, inputs)
    if len(got) != len(ref):
        return {"max_rel_error": float("inf"), "message": f"{len(got)} outputs, torch has {len(ref)}"}
    err = max_rel_error([torch.from_numpy(g).float() for g in got], [r.float() for r in ref])
    return {"inputs": [list(t.shape) for t in inputs], "max_rel_error": err}


def emit_onnx_model(module: nn.Module, out: str | Path, *, inputs: Sequence[torch.Tensor] | None = None,
                    force: bool = False, report: Any = None, source: dict[str, Any] | None = None,
                    opset: int | None = None, dynamic_batch: bool = True) -> Path:
    """Write ``module`` (a GraphModule or any nn.Module; not modified) as an inference ONNX folder."""
    from graphopt.ort._deps import require_onnx, require_ort
    from graphopt.ort.export import DEFAULT_OPSET, export_onnx, has_half_casts

    onnx = require_onnx("--emit onnx")
    ort = require_ort("--emit onnx")
    check_output_folder(out, force)
    meta = module.meta.get("graphopt", {}) if isinstance(module, fx.GraphModule) else {}
    inputs = resolve_inputs(module, inputs, out)
    static_batch = None
    if dynamic_batch and not _runs_at_batch_1(module, inputs):
        # shapes baked into the graph (torch.export specialises view/reshape sizes to the example batch)
        dynamic_batch, static_batch = False, int(inputs[0].shape[0])
        log.info("%s: the graph does not run at batch 1 (batch size %d baked into its shapes); exported with a "
                 "static batch", out, static_batch)
    exported = export_onnx(module, inputs, training=False, opset=opset or DEFAULT_OPSET,
                           dynamic_batch=dynamic_batch, where=str(out))
    half = has_half_casts(exported.model)
    tol = 2e-2 if half or any(p.dtype != torch.float32 for p in module.parameters()) else 1e-4
    with atomic_folder(out, force) as tmp:
        onnx.save(exported.model, str(tmp / MODEL_FILE))
        onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
        checks = [compare_with_ort(tmp / MODEL_FILE, module, inputs, exported.input_names)]
        if dynamic_batch and inputs[0].dim() > 0 and inputs[0].shape[0] > 1:
            checks.append(compare_with_ort(tmp / MODEL_FILE, module, tuple(t[:1] for t in inputs),
                                           exported.input_names))
        worst = max(c["max_rel_error"] for c in checks)
        check = {"onnx_checker": "passed (full_check)", "runtime": f"onnxruntime {ort.__version__} CPU",
                 "ort_vs_torch": checks, "max_rel_error": worst, "tolerance": tol, "passed": worst <= tol}

        manifest: dict[str, Any] = {
            **manifest_header(ONNX_FORMAT, 1, meta, source),
            "onnx_version": onnx.__version__, "onnxruntime_version": ort.__version__,
            "opset": exported.opset, "dynamic_batch": dynamic_batch,
            **({"static_batch": static_batch, "static_batch_reason": "the graph does not run at batch 1: its "
                "shapes hold the example batch size (torch.export capture)"} if static_batch else {}),
            "inputs": [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                       for n, t in zip(exported.input_names, inputs)],
            "outputs": exported.output_names,
            "precision": meta.get("precision"),
            "files": {MODEL_FILE: sha256_file(tmp / MODEL_FILE)},
            "check": check,
        }
        if report is not None:
            manifest["verified"] = report.verified
            manifest["passes"] = [r.as_dict() for r in report.records]
        from graphopt.serialize import write_json

        write_json(tmp / MANIFEST, manifest)
        if not check["passed"]:
            failed = "; ".join(c["message"] for c in checks if c.get("message"))
            raise EmitError(f"ONNX Runtime's outputs differ from PyTorch's (max relative error {worst:.2e} > "
                            f"{tol:g}{'; ' + failed if failed else ''})", where=str(out),
                            fix="report it with the model; --emit torch is unaffected")
    return Path(out)


def check_summary(check: dict[str, Any]) -> str:
    """One line for the CLI: checker result and ORT-vs-PyTorch outputs."""
    verdict = "[green]match[/]" if check.get("passed") else "[red]DIFFER[/]"
    shapes = ", ".join("x".join(map(str, c["inputs"][0])) for c in check["ort_vs_torch"] if c.get("inputs"))
    return (f"onnx.checker passed; {check['runtime']} outputs {verdict} PyTorch's: max relative error "
            f"{check['max_rel_error']:.1e} (tolerance {check['tolerance']:g}; inputs {shapes})")


class OnnxEmitter(Emitter):
    """``--emit onnx``: an inference ONNX model, checked with onnx.checker and ONNX Runtime."""

    name = "onnx"
    description = "inference ONNX model (opset 17, dynamic batch), compared with PyTorch in ONNX Runtime"
    options = {
        "opset": Option(int, None, "ONNX opset (default 17)", nullable=True, min=7),
        "dynamic_batch": Option(bool, True, "dynamic batch axis"),
    }

    def preflight(self, passes: Sequence[Any] = ()) -> None:
        from graphopt.ort._deps import require_onnx, require_ort

        require_onnx("--emit onnx")
        require_ort("--emit onnx (checking the model with ONNX Runtime)")

    def emit(self, gm: fx.GraphModule, out: str | Path, *, report: Any = None, force: bool = False,
             source: dict[str, Any] | None = None, spec: Any = None) -> EmitResult:
        path = emit_onnx_model(gm, out, force=force, report=report, source=source, opset=self.config["opset"],
                               dynamic_batch=self.config["dynamic_batch"])
        from graphopt.serialize import read_json

        manifest = read_json(path / MANIFEST)
        return EmitResult(path, self.name, check=manifest.get("check"))

    def summary(self, result: EmitResult) -> str:
        return check_summary(result.check) if result.check else ""
