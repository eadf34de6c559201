"""ORT training artifacts (training, eval and optimizer models + checkpoint) for a module.

:func:`build_training_artifacts` writes, into an existing folder, what
``onnxruntime.training.artifacts.generate_artifacts`` produces, fixed so that it trains like
PyTorch, and returns the facts the runner needs (for the manifest):

- every parameter with ``requires_grad=False`` is a frozen parameter, every other float
  parameter is trained; buffers and constants are frozen;
- BatchNorm stays trainable (batch statistics in training) and its running statistics are
  kept up to date: the training model also outputs each BatchNorm's updated running mean and
  variance, which the runner copies back into the checkpoint state after every step (ORT does
  not write them back itself), corrected from ONNX's biased to torch's unbiased variance;
- the eval model's BatchNorm nodes (inference mode) lose the extra outputs ORT rejects;
- both models also output the network's output (``output``), so evaluation has logits.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from graphopt.errors import EmitError
from graphopt.ort._deps import require_ort_training
from graphopt.ort.export import DEFAULT_OPSET, explain_failure, export_onnx
from graphopt.ort.spec import OptimizerSpec

__all__ = ["TRAINING_MODEL", "EVAL_MODEL", "OPTIMIZER_MODEL", "CHECKPOINT", "build_training_artifacts"]

log = logging.getLogger(__name__)

TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
_LOSS_TYPES = {"cross_entropy": "CrossEntropyLoss", "mse": "MSELoss", "l1": "L1Loss",
               "bce_with_logits": "BCEWithLogitsLoss"}


def _check_dtypes(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            raise EmitError(f"parameter '{name}' is {str(p.dtype).replace('torch.', '')}: ONNX Runtime training "
                            "on CPU only trains float32 parameters",
                            fix="use a mixed-precision policy (float32 weights, half casts inside the graph) "
                                "instead of pure half weights, or freeze the parameter")


def _batchnorm_nodes(model: Any, names: dict[str, str]) -> list[dict[str, Any]]:
    """Training-mode BatchNorm nodes whose running statistics are initializers."""
    import onnx

    inits = {i.name for i in model.graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        shapes = {v.name: v.type.tensor_type.shape for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    except Exception:  # shape inference is a nicety here (the variance correction), never fatal
        shapes = {}
    stats: list[dict[str, Any]] = []
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or len(node.output) < 3:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if not attrs.get("training_mode", 0):
            continue
        mean, var = node.input[3], node.input[4]
        if mean not in inits or var not in inits or not node.output[1] or not node.output[2]:
            continue
        if mean in seen:
            raise EmitError(f"BatchNorm statistics '{names.get(mean, mean)}' are updated by more than one node "
                            "(a BatchNorm module called twice)", fix="use one BatchNorm module per call site")
        seen.add(mean)
        per_sample = None
        shape = shapes.get(node.input[0])
        if shape is not None and len(shape.dim) >= 2:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim[2:]]
            if all(d is not None for d in dims):
                per_sample = int(math.prod(dims)) if dims else 1
        stats.append({"node": node.name, "mean": mean, "var": var, "mean_out": node.output[1],
                      "var_out": node.output[2], "momentum": float(attrs.get("momentum", 0.9)),
                      "per_sample": per_sample,
                      "num_batches_tracked": names.get(mean, mean).rsplit(".", 1)[0] + ".num_batches_tracked"})
    return stats


def _expose_norm_statistics(model: Any) -> list[str]:
    """Give LayerNormalization nodes their optional Mean / InvStdDev outputs.

    torch.onnx writes ``LayerNormalization`` with its one required output; onnxruntime-training's
    gradient builder for it reads the saved statistics (outputs 1 and 2) and fails without them
    (``GradientBuilderBase::O ... i < node_->OutputDefs().size() was false``). The outputs are part of
    the operator's definition (opset 17), so adding them changes nothing the forward computes.
    Returns the names of the nodes changed."""
    changed = []
    for i, node in enumerate(model.graph.node):
        if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            base = (node.name or f"LayerNormalization_{i}").replace("/", "_").strip("_")
            node.output.extend([f"{base}__graphopt_mean", f"{base}__graphopt_inv_std"])
            changed.append(node.name or base)
    return changed


# ops whose ORT gradient reads outputs that are optional in ONNX (saved statistics, masks, indices)
_SAVED_OUTPUT_OPS = ("LayerNormalization", "BatchNormalization", "Dropout", "MaxPool", "GroupNormalization")


def _explain_missing_outputs(exc: BaseException, model: Any, opset: int) -> tuple[str, str] | None:
    """onnxruntime-training's gradient builder asserts ``i < node_->OutputDefs().size()`` without saying
    which node: name the first node whose gradient needs optional outputs that the node does not have."""
    text = str(exc)
    if not re.search(r"GradientBuilderBase::[OI]\(|OutputDefs\(\)\.size\(\)", text):
        return None
    import onnx

    lacking = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset)
        except Exception:
            continue
        if len([o for o in node.output if o]) < len(schema.outputs):
            lacking.append(node)
    if not lacking:
        return None
    known = [n for n in lacking if n.op_type in _SAVED_OUTPUT_OPS]
    node = (known or lacking)[0]
    return node.op_type, (f"onnxruntime-training cannot differentiate {node.op_type}: its gradient reads the "
                          f"node's optional outputs, which the exported node lacks (op at node "
                          f"{node.name or node.output[0]}); use the torch backend")


def _fix_eval_model(path: Path, bn_outputs: set[str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and len(node.output) > 1:
            del node.output[1:]
    keep = [o for o in model.graph.output if o.name not in bn_outputs]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, str(path))


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[list[str]]:
    """Silence ORT's C++ gradient-graph builder, which logs every transformer at INFO level to fd 2.

    Yields a list that receives the captured lines (for error messages) when the block ends.
    """
    lines: list[str] = []
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield lines
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            lines.extend(ln for ln in tmp.read().decode(errors="replace").splitlines()
                         if "[I:onnxruntime" not in ln and "[V:onnxruntime" not in ln)


def build_training_artifacts(module: nn.Module, inputs: Sequence[torch.Tensor], folder: str | Path, *,
                             loss: str, optimizer: OptimizerSpec, opset: int = DEFAULT_OPSET,
                             where: str = "ort") -> dict[str, Any]:
    """Write the artifacts into ``folder`` (which must exist); return the runner's facts."""
    require_ort_training("--emit ort")
    from onnxruntime.training import artifacts as ort_artifacts

    folder = Path(folder)
    _check_dtypes(module)
    exported = export_onnx(module, inputs, training=True, opset=opset, where=where)
    if len(exported.output_names) != 1:
        raise EmitError(f"the model has {len(exported.output_names)} outputs; ORT training with a built-in "
                        "loss needs exactly one", where=where, fix="return a single tensor from forward()")
    model = exported.model
    _expose_norm_statistics(model)
    names = exported.names
    inits = [i.name for i in model.graph.initializer]
    trainable_torch = {n for n, p in module.named_parameters() if p.requires_grad}
    requires_grad = [o for o, t in names.items() if t in trainable_torch]
    if not requires_grad:
        raise EmitError("the graph has no trainable parameters (all frozen?)", where=where,
                        fix="unfreeze some parameters to train it")
    frozen = [i for i in inits if i not in requires_grad]
    bn = _batchnorm_nodes(model, names)
    bn_outputs = [o for s in bn for o in (s["mean_out"], s["var_out"])]
    output = exported.output_names[0]
    loss_type = getattr(ort_artifacts.LossType, _LOSS_TYPES[loss])
    try:
        with quiet_native_stderr() as native_log:
            ort_artifacts.generate_artifacts(model, requires_grad=requires_grad, frozen_params=frozen,
                                             loss=loss_type, optimizer=optimizer.ort_block(),
                                             artifact_directory=str(folder),
                                             additional_output_names=[output] + bn_outputs)
        for line in native_log:
            log.debug("onnxruntime: %s", line)
    except Exception as exc:
        op, what = explain_failure(exc)
        if op is None:
            op, what = _explain_missing_outputs(exc, model, opset) or (op, what)
        raise EmitError(f"ONNX Runtime cannot build training artifacts for this graph: {what}", where=where,
                        fix=("rewrite or remove the layer that uses " + op) if op else
                        "rerun with --debug for ONNX Runtime's message") from exc
    _fix_eval_model(folder / EVAL_MODEL, set(bn_outputs))
    frozen_torch = sorted(n for n, p in module.named_parameters() if not p.requires_grad)
    return {
        "opset": opset,
        "inputs": exported.input_names,
        "output": output,
        "loss": loss,
        "optimizer": optimizer.as_dict(),
        "names": names,
        "trainable": sorted(names[o] for o in requires_grad),
        "frozen": frozen_torch,
        "batchnorm": bn,
    }
