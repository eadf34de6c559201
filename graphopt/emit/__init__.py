"""Emitters: turn a rewritten graph into artifacts. Each is a plug-in behind one protocol
(:class:`Emitter`), found through the entry-point group ``graphopt.emitters``:

- ``torch`` (here, always available): readable module source + graph.json + safetensors + manifest;
  :func:`load` rebuilds it without running code from the folder;
- ``onnx``, ``ort`` (:mod:`graphopt.ort`) and ``pipeline`` (:mod:`graphopt.dist.pipeline`).

This package depends on no other emitter: the ONNX Runtime and pipeline emitters live next to
what they need and use :mod:`graphopt.emit.fs` (output folders, manifests) from here.
"""

from __future__ import annotations

from graphopt.emit.base import (ENTRY_POINT_GROUP, EmitResult, Emitter, available_emitters, create_emitter,
                                emitter_names, get_emitter, register_emitter)
from graphopt.emit.torch_folder import TorchEmitter, emit_torch_folder, load

__all__ = ["Emitter", "EmitResult", "register_emitter", "available_emitters", "emitter_names", "get_emitter",
           "create_emitter", "ENTRY_POINT_GROUP", "TorchEmitter", "emit_torch_folder", "load"]
