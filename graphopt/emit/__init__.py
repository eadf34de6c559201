"""Emitters: turn a rewritten graph into artifacts.

``torch`` (always available): readable module source + safetensors + manifest.
Other formats (``onnx``, ``ort``, ``pipeline``) register in :data:`EMITTERS` from their modules.
"""

from __future__ import annotations

from graphopt.emit.torch_folder import emit_torch_folder, load

__all__ = ["emit_torch_folder", "load", "EMITTERS"]

# name -> "module:function"; each function takes (gm, out, *, report, force, spec) -> Path
EMITTERS: dict[str, str] = {
    "torch": "graphopt.emit.torch_folder:emit_torch_folder",
    "pipeline": "graphopt.emit.pipeline:emit_pipeline",
    "onnx": "graphopt.emit.onnx:emit_onnx",
    "ort": "graphopt.emit.ort_training:emit_ort",
}
