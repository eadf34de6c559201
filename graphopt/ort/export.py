"""Export a (rewritten) module to ONNX with the TorchScript exporter, the way ORT training needs it.

What matters (ENV-NOTES.md): ``dynamo=False`` (the dynamo exporter ignores ``training=`` and folds
BatchNorm), ``training=TrainingMode.TRAINING`` and no constant folding for a trainable graph, and a
deep copy of the module, because the exporter runs a forward pass that moves BatchNorm running
statistics. The exporter also writes those moved statistics into the initializers, so the
initializers are reset to the module's own values afterwards.
"""

from __future__ import annotations

import copy
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.errors import EmitError
from graphopt.ort._deps import require_onnx

__all__ = ["DEFAULT_OPSET", "ExportedGraph", "export_onnx", "explain_failure", "has_half_casts", "input_names_for",
           "output_names_for"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17  # well inside what onnxruntime(-training) 1.19 implements and differentiates


@dataclass
class ExportedGraph:
    """An exported ONNX model (``onnx.ModelProto``) plus how its tensors relate to the torch module."""

    model: Any
    input_names: list[str]
    output_names: list[str]
    names: dict[str, str] = field(default_factory=dict)  # ONNX initializer -> torch state_dict name
    training: bool = False
    opset: int = DEFAULT_OPSET


def input_names_for(n: int) -> list[str]:
    return ["input"] if n == 1 else [f"input_{i}" for i in range(n)]


def output_names_for(n: int) -> list[str]:
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


_PATTERNS = [
    (re.compile(r"Exporting the operator '([^']+)' to ONNX opset version (\d+) is not supported"),
     lambda m: (m.group(1), f"torch.onnx cannot export operator {m.group(1)} (opset {m.group(2)})")),
    (re.compile(r"gradient builder has not been registered: (\S+) for node (\S*)"),
     lambda m: (m.group(1), f"ONNX Runtime has no gradient for operator {m.group(1)} (node {m.group(2).rstrip('|').strip()})")),
    (re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'"),
     lambda m: (m.group(1), f"ONNX Runtime (CPU) has no kernel for operator {m.group(1)}-{m.group(2)} with these "
                            f"input types (node {m.group(3)})")),
    (re.compile(r"(?:Unsupported|unsupported) (?:ONNX )?op(?:erator)?[: ]+'?([\w:.]+)'?"),
     lambda m: (m.group(1), f"unsupported operator {m.group(1)}")),
]


def explain_failure(exc: BaseException) -> tuple[str | None, str]:
    """(operator, one-line description) for an export / artifact-generation / session failure."""
    text = str(exc)
    for pattern, fmt in _PATTERNS:
        m = pattern.search(text)
        if m:
            return fmt(m)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[-1] if lines else ""
    return None, f"{type(exc).__name__}: {first[:300]}"


def has_half_casts(model: Any) -> bool:
    """Whether an ONNX model casts to float16/bfloat16 anywhere (mixed precision inside the graph)."""
    from onnx import TensorProto

    half = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
    for node in model.graph.node:
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i in half:
                    return True
    return False


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    """The output tensors in order: a tensor, a tuple/list of tensors, or a dict of tensors (a
    HuggingFace ``ModelOutput`` as captured: the exporter flattens it in key order)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return list(out)
    if isinstance(out, dict) and out and all(isinstance(o, torch.Tensor) for o in out.values()):
        return list(out.values())
    raise EmitError(f"the model returns {type(out).__name__}; ONNX export needs a tensor, a tuple or a dict of "
                    "tensors", fix="return tensors from forward()")


class TorchHardtanh(nn.Module):
    """hardtanh/ReLU6 written so that ORT differentiates it exactly as torch does.

    Both export to ONNX ``Clip``, whose ORT gradient passes at the bounds (``lo <= x <= hi``);
    torch's hardtanh/relu6 gradient does not (``lo < x < hi``). The difference matters: a channel
    that is constant within a batch (e.g. dead after a ReLU) comes out of BatchNorm as exactly
    ``beta = 0``; ORT then sends gradient back through it, which BatchNorm's backward amplifies
    by 1/sqrt(eps). This form has the same forward values and torch's gradient mask (the
    comparisons and the constants carry no gradient).
    """

    def __init__(self, min_val: float = -1.0, max_val: float = 1.0):
        super().__init__()
        self.min_val = float(min_val)
        self.max_val = float(max_val)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hardtanh_exact(x, self.min_val, self.max_val)


def hardtanh_exact(x: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0) -> torch.Tensor:
    inside = (x > min_val) & (x < max_val)
    edge = torch.where(x <= min_val, torch.full_like(x, min_val), torch.full_like(x, max_val))
    return torch.where(inside, x, edge)


def _hardtanh_args(node: Any) -> tuple[Any, float, float] | None:

    args = list(node.args) + [None] * 3
    if node.target in (F.relu6, torch.nn.functional.relu6):
        return args[0], 0.0, 6.0
    if node.target is F.hardtanh:
        lo = node.kwargs.get("min_val", args[1] if args[1] is not None else -1.0)
        hi = node.kwargs.get("max_val", args[2] if args[2] is not None else 1.0)
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
            return args[0], float(lo), float(hi)
    return None


def batch_norm_fixed(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                     weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     eps: float = 1e-5) -> torch.Tensor:
    """``F.batch_norm(..., training=False)`` as explicit elementwise ops.

    torch.onnx's TorchScript exporter in ``TrainingMode.TRAINING`` exports every batch_norm as a
    training-mode BatchNormalization, including those a graph fixed to its running statistics
    (``freeze``'s frozen BatchNorms): ORT would then normalise them with batch statistics."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return x * scale.reshape(shape) + shift.reshape(shape)


_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _fixed_batch_norm_args(node: Any) -> dict[str, Any] | None:
    if node.target is not F.batch_norm:
        return None
    bound = dict(zip(_BN_ARGS, node.args))
    bound.update(node.kwargs)
    if bound.get("training", False) is not False:
        return None
    return bound


def prepare_for_ort_training(module: nn.Module) -> int:
    """Rewrite (in place) what ORT differentiates differently from torch; returns how many sites."""
    from torch import fx

    count = 0
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Hardtanh) and not isinstance(child, TorchHardtanh):
            parent_name, _, leaf = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, leaf, TorchHardtanh(child.min_val, child.max_val))
            count += 1
    if isinstance(module, fx.GraphModule):
        changed = False
        for node in list(module.graph.nodes):
            if node.op != "call_function":
                continue
            bn = _fixed_batch_norm_args(node)
            if bn is not None:
                node.target = batch_norm_fixed
                node.args = (bn["input"], bn["running_mean"], bn["running_var"], bn.get("weight"), bn.get("bias"),
                             bn.get("eps", 1e-5))
                node.kwargs = {}
                changed = True
                count += 1
                continue
            parsed = _hardtanh_args(node)
            if parsed is None:
                continue
            x, lo, hi = parsed
            node.target = hardtanh_exact
            node.args = (x, lo, hi)
            node.kwargs = {}
            changed = True
            count += 1
        if changed:
            module.recompile()
    return count


def export_onnx(module: nn.Module, inputs: Sequence[torch.Tensor], *, training: bool, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, where: str = "onnx export") -> ExportedGraph:
    """Export ``module`` (not modified) to an in-memory ONNX model.

    ``training=True``: training-mode graph (BatchNorm uses batch statistics and emits its updated
    running statistics, Dropout active), nothing folded, every parameter an initializer under its
    torch name. ``training=False``: an inference graph (eval mode, constants folded).
    """
    onnx = require_onnx()
    inputs = tuple(inputs)
    work = copy.deepcopy(module)
    work.train(training)
    if training:
        prepare_for_ort_training(work)
    originals = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=False).items()}
    with torch.no_grad():
        probe = copy.deepcopy(module).train(False)(*inputs)
    n_out = len(_flat_outputs(probe))
    in_names, out_names = input_names_for(len(inputs)), output_names_for(n_out)
    if isinstance(probe, dict):  # keyword outputs keep their names (``logits``)
        out_names = [str(k) for k in probe]
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in in_names + out_names}
    buf = io.BytesIO()
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(work, inputs, buf, dynamo=False, training=mode, do_constant_folding=not training,
                              opset_version=opset, input_names=in_names, output_names=out_names,
                              dynamic_axes=dynamic_axes, export_params=True, keep_initializers_as_inputs=False)
    except Exception as exc:
        op, what = explain_failure(exc)
        raise EmitError(f"the graph cannot be exported to ONNX: {what}", where=where,
                        fix=("rewrite or remove the layer that uses " + op) if op else
                        "rerun with --debug for the exporter's traceback") from exc
    model = onnx.load_from_string(buf.getvalue())
    names = _restore_initializers(model, module, originals, training)
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:
        raise EmitError(f"the exported ONNX model does not pass onnx.checker: {exc}", where=where,
                        fix="report this exporter problem with the model") from exc
    return ExportedGraph(model, in_names, out_names, names, training, opset)


def _restore_initializers(model: Any, module: nn.Module, originals: dict[str, torch.Tensor],
                          training: bool) -> dict[str, str]:
    """Reset initializers to the module's values (the export's forward moved BN stats) and map names.

    Returns ONNX initializer name -> torch state_dict name. A trainable parameter the graph uses
    under another name is matched by value; one that cannot be matched is an error for training
    graphs (its trained value could not be written back).
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    names: dict[str, str] = {}
    for name, init in inits.items():
        if name in originals:
            ref = originals[name]
            arr = numpy_helper.to_array(init)
            if tuple(arr.shape) != tuple(ref.shape):
                continue
            if training:
                init.CopyFrom(numpy_helper.from_array(ref.cpu().contiguous().numpy(), name))
            names[name] = name
    if not training:
        return names
    used = {i for n in model.graph.node for i in n.input}
    unmatched = [i for i in inits if i not in names]
    for pname, p in module.named_parameters():
        if not p.requires_grad or pname in names.values():
            continue
        ref = p.detach().cpu().numpy()
        hits = [i for i in unmatched if numpy_helper.to_array(inits[i]).shape == ref.shape
                and (numpy_helper.to_array(inits[i]) == ref).all()]
        if len(hits) == 1:
            names[hits[0]] = pname
            unmatched.remove(hits[0])
        elif hits:
            raise EmitError(f"parameter '{pname}' appears in the ONNX graph under an ambiguous name",
                            fix="report this exporter problem with the model")
        else:
            log.info("parameter %s is not used by the exported graph", pname)
    # initializers the graph does not reference are dropped by the exporter already; keep only used
    return {k: v for k, v in names.items() if k in used}
