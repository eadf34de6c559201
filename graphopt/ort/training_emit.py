"""``--emit ort``: ONNX Runtime training artifacts of the rewritten graph.

    out/
      training_model.onnx   forward + loss + gradient graph (outputs: loss, output, BN stats)
      eval_model.onnx       forward + loss in inference mode (outputs: loss, output)
      optimizer_model.onnx  AdamW (torch semantics) or SGD
      checkpoint            initial parameters (trainable and frozen)
      torch/                the same graph as a graphopt torch folder (module.py + weights):
                            where trained weights are written back (``write_torch_folder``)
      manifest.json         loss, optimizer, ONNX<->torch names, BatchNorm bookkeeping,
                            the emit-time parity check, passes, checksums

Train it with ``graphopt.ort.OrtTrainBackend(out)`` / ``graphopt.ort.train(out, data, ...)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx, nn

from graphopt.emit.base import EmitResult, Emitter
from graphopt.emit.fs import atomic_folder, check_output_folder, manifest_header, resolve_inputs, sha256_file
from graphopt.errors import EmitError
from graphopt.ir import eval_mode, tensor_specs
from graphopt.ort.format import (ARTIFACTS, CHECKPOINT, EVAL_MODEL, MANIFEST, OPTIMIZER_MODEL, ORT_FORMAT,
                                 ORT_FORMAT_VERSION, TORCH_SUBFOLDER, TRAINING_MODEL)
from graphopt.pass_infra import Option

__all__ = ["OrtEmitter", "emit_ort_artifacts", "check_summary", "summarize_check"]

def _optimizer_from(opts: dict[str, Any]) -> Any:
    from graphopt.ort.spec import OptimizerSpec

    return OptimizerSpec.create(opts.get("optimizer", "adamw"), lr=opts.get("lr"),
                                weight_decay=opts.get("weight_decay"), eps=opts.get("eps"),
                                betas=opts.get("betas"), momentum=opts.get("momentum"))


def _single_output(module: nn.Module, probe: Any, where: str) -> tuple[fx.GraphModule, torch.Tensor, dict[str, Any]]:
    """A model returning one tensor inside a dict / HuggingFace ``ModelOutput`` / tuple (``{"logits": t}``)
    trains on that tensor: the graph's output is flattened to it (the ONNX emitter's tensor order:
    a dict's values in key order). Returns the flattened copy, the tensor and what the manifest records.
    Several tensors (``loss`` and ``logits``, an encoder's hidden state ...) are refused, named: ORT's
    built-in losses take exactly one model output."""
    items: list[tuple[str, Any]]
    if isinstance(probe, dict):
        items = [(str(k), v) for k, v in probe.items()]
    elif isinstance(probe, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(probe)]
    else:
        items = []
    tensors = [(k, v) for k, v in items if isinstance(v, torch.Tensor)]
    if not isinstance(module, fx.GraphModule) or len(items) != 1 or len(tensors) != 1:
        what = (f"{type(probe).__name__} of {len(tensors)} tensors ({', '.join(k for k, _ in tensors)})"
                if tensors else type(probe).__name__)
        raise EmitError(f"ORT training needs a model with a single tensor output; this one returns {what}",
                        where=where, fix="return one tensor (the logits/prediction) from forward(), e.g. without "
                                         "labels (no loss output) and without extra hidden states")
    from graphopt.ir import copy_graph

    key = tensors[0][0]
    gm = copy_graph(module)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    res = out_node.args[0]
    node = res[key] if isinstance(res, dict) else res[int(key)]
    if not isinstance(node, fx.Node):
        raise EmitError("ORT training needs a model with a single tensor output", where=where,
                        fix="return one tensor (the logits/prediction) from forward()")
    out_node.args = (node,)
    gm.graph.lint()
    gm.recompile()
    return gm, tensors[0][1], {"from": type(probe).__name__, "key": key}


def _active_dropout(model: Any) -> bool:
    return any(n.op_type == "Dropout" for n in model.graph.node)


def emit_ort_artifacts(module: nn.Module, out: str | Path, *, loss: str | None = None, optimizer: Any = None,
                       inputs: Sequence[torch.Tensor] | None = None, force: bool = False, report: Any = None,
                       source: dict[str, Any] | None = None, model_loss: Any = None, opset: int | None = None,
                       check: bool = True) -> Path:
    """Write ORT training artifacts for ``module`` (a captured GraphModule, or any nn.Module).

    ``loss``: a name (see :data:`graphopt.ort.spec.LOSSES`) or None/"auto" (``model_loss``, the
    model file's function, mapped by behaviour; else cross-entropy). ``optimizer``: an
    :class:`~graphopt.ort.spec.OptimizerSpec` (default AdamW with torch's defaults). ``inputs``:
    example inputs (default: the graph's). The folder is written atomically; with ``check`` the
    emit-time parity check must pass or nothing is written.
    """
    from graphopt.ort._deps import require_ort_training
    from graphopt.ort.artifacts import build_training_artifacts
    from graphopt.ort.backend import OrtTrainBackend
    from graphopt.ort.export import DEFAULT_OPSET, has_half_casts
    from graphopt.ort.parity import check_artifacts
    from graphopt.ort.spec import OptimizerSpec, resolve_loss

    require_ort_training("--emit ort")
    check_output_folder(out, force)
    meta = module.meta.get("graphopt", {}) if isinstance(module, fx.GraphModule) else {}
    inputs = resolve_inputs(module, inputs, out)
    if not isinstance(module, fx.GraphModule):
        from graphopt.capture import capture

        module = capture(module, inputs)
        meta = module.meta["graphopt"]
    meta.setdefault("example_inputs", inputs)
    optimizer = optimizer or OptimizerSpec()
    with torch.no_grad(), eval_mode(module):
        probe = module(*inputs)
    flattened = None
    if not isinstance(probe, torch.Tensor):
        module, probe, flattened = _single_output(module, probe, str(out))
    loss_name = resolve_loss(loss, model_loss, probe)
    opset = opset or DEFAULT_OPSET
    import onnx
    import onnxruntime

    with atomic_folder(out, force) as tmp:
        facts = build_training_artifacts(module, inputs, tmp, loss=loss_name, optimizer=optimizer, opset=opset,
                                         where=str(out))
        model = onnx.load(str(tmp / TRAINING_MODEL), load_external_data=False)
        half = has_half_casts(model)
        dropout = _active_dropout(model)
        del model
        from graphopt.emit.torch_folder import emit_torch_folder

        emit_torch_folder(module, tmp / TORCH_SUBFOLDER, report=report, source=source)
        files = {}
        for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT):
            files[name] = sha256_file(tmp / name)

        manifest: dict[str, Any] = {
            **manifest_header(ORT_FORMAT, ORT_FORMAT_VERSION, meta, source),
            "onnx_version": onnx.__version__,
            "onnxruntime_version": onnxruntime.__version__,
            "example_inputs": tensor_specs(inputs),
            "artifacts": dict(ARTIFACTS),
            **facts,
            "half": half,
            "precision": meta.get("precision"),
            **({"output_flattened": flattened} if flattened else {}),
            "files": files,
        }
        if report is not None:
            manifest["verified"] = report.verified
            manifest["passes"] = [r.spec for r in report.records]
        from graphopt.ort.parity import probe_for_crash
        from graphopt.serialize import write_json

        write_json(tmp / MANIFEST, manifest)
        if check:
            probe_for_crash(tmp, inputs, where=str(out))
            backend = OrtTrainBackend(tmp, threads=1)
            result = check_artifacts(backend, module, inputs, half=half, has_dropout=dropout)
            del backend
            manifest["check"] = result
            write_json(tmp / MANIFEST, manifest)
            if not result["passed"]:
                raise EmitError("ONNX Runtime does not compute what the graph computes: " + summarize_check(result),
                                where=str(out), fix="report it with the model; --emit torch is unaffected")
    return Path(out)


def check_summary(check: dict[str, Any]) -> str:
    """One line for the CLI: the emit-time ORT-vs-PyTorch comparison."""
    verdict = "[green]matches PyTorch[/]" if check.get("passed") else "[red]DIFFERS from PyTorch[/]"
    return f"ORT training artifacts {verdict}: {summarize_check(check)}"


def summarize_check(check: dict[str, Any]) -> str:
    parts = [f"eval outputs max rel err {check['eval_outputs_max_rel_error']:.1e}"]
    if check.get("train_check") == "compared":
        parts.append(f"train loss rel err {check['train_loss_rel_error']:.1e}")
        parts.append(f"{check['gradients_compared']} gradients rel L2 err vs float64 {check['gradients_rel_l2_error']:.1e} "
                     f"(torch float32: {check['torch_float32_gradients_rel_l2_error']:.1e}, budget "
                     f"{check.get('gradients_budget', float('nan')):.1e})")
    else:
        parts.append(f"training check {check.get('train_check')}")
    return ", ".join(parts)


class OrtEmitter(Emitter):
    """``--emit ort``: ONNX Runtime training artifacts, checked against PyTorch before they are kept."""

    name = "ort"
    description = "ONNX Runtime training artifacts (training/eval/optimizer models, checkpoint, torch/ folder)"
    options = {
        "loss": Option(str, "auto", "cross_entropy | mse | l1 | bce_with_logits | auto (the model file's loss(), "
                                    "else cross_entropy)"),
        "optimizer": Option(str, "adamw", "adamw (torch.optim.AdamW semantics) | sgd (plain)"),
        "lr": Option(float, None, "default learning rate recorded for the runner (adamw 1e-3, sgd 0.01)",
                     nullable=True),
        "weight_decay": Option(float, None, "AdamW decoupled weight decay (torch default 0.01)", nullable=True),
        "eps": Option(float, None, "AdamW eps (torch default 1e-8)", nullable=True),
        "betas": Option(str, None, "AdamW betas as 'b1|b2' (torch default 0.9|0.999)", nullable=True),
        "momentum": Option(float, None, "SGD momentum: only 0 (ORT's SGD has none)", nullable=True),
        "opset": Option(int, None, "ONNX opset (default 17)", nullable=True),
    }

    def preflight(self, passes: Sequence[Any] = ()) -> None:
        """Before any work: the ``ort`` extra is installed and the options make sense."""
        from graphopt.ort._deps import require_ort_training

        require_ort_training("--emit ort")
        _optimizer_from(self.config)
        if self.config["loss"] not in (None, "auto"):
            from graphopt.ort.spec import resolve_loss

            resolve_loss(self.config["loss"], None, torch.zeros(1, 2))

    def emit(self, gm: fx.GraphModule, out: str | Path, *, report: Any = None, force: bool = False,
             source: dict[str, Any] | None = None, spec: Any = None) -> EmitResult:
        """``spec``: the model file's ModelSpec (its ``loss`` picks the loss when ``loss`` is auto)."""
        opts = self.config
        path = emit_ort_artifacts(gm, out, loss=opts["loss"], optimizer=_optimizer_from(opts), force=force,
                                  report=report, source=source, model_loss=getattr(spec, "loss", None),
                                  opset=opts["opset"])
        import json

        manifest = json.loads((path / MANIFEST).read_text())
        return EmitResult(path, self.name, check=manifest.get("check"))

    def summary(self, result: EmitResult) -> str:
        return check_summary(result.check) if result.check else ""
