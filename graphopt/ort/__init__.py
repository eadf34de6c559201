"""ONNX Runtime training for graphopt graphs (optional extra: ``pip install 'graphopt[ort]'``).

    import graphopt, graphopt.ort
    gm, report = graphopt.optimize(model, (x,), ["cleanup"])
    graphopt.ort.emit_ort_artifacts(gm, "out/ort", loss="cross_entropy",
                                    optimizer=graphopt.ort.OptimizerSpec("adamw", lr=1e-3))
    result = graphopt.ort.train("out/ort", (train_set, test_set), epochs=2, lr=1e-3, batch_size=32)
    result.backend.export_inference("out/model.onnx")
    result.backend.write_torch_folder("out/trained")      # graphopt.load("out/trained")

Importing this package does not import onnx or onnxruntime; the functions that need them raise
a MissingDependencyError naming the install command when they are missing.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["OrtTrainBackend", "OptimizerSpec", "emit_ort_artifacts", "emit_onnx_model", "export_onnx", "train",
           "TrainResult", "compare_training", "ParityResult", "LOSSES", "read_ort_manifest"]

_LAZY = {
    "OrtTrainBackend": "graphopt.ort.backend",
    "read_ort_manifest": "graphopt.ort.format",
    "OptimizerSpec": "graphopt.ort.spec",
    "LOSSES": "graphopt.ort.spec",
    "export_onnx": "graphopt.ort.export",
    "emit_ort_artifacts": "graphopt.ort.training_emit",
    "emit_onnx_model": "graphopt.ort.onnx_emit",
    "train": "graphopt.ort.train",
    "TrainResult": "graphopt.ort.train",
    "compare_training": "graphopt.ort.parity",
    "ParityResult": "graphopt.ort.parity",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'graphopt.ort' has no attribute {name!r}")
