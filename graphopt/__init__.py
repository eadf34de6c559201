"""graphopt: compiler-style graph optimisation passes that make PyTorch models train faster.

    import graphopt
    gm, report = graphopt.optimize(model, (x,), ["channels_last", "cleanup"])
    graphopt.emit_torch_folder(gm, "out/", report=report)
    model2 = graphopt.load("out/")
"""

from __future__ import annotations

__version__ = "0.1.0"

from graphopt.analysis import GraphCost, NodeCost, annotate, to_networkx
from graphopt.capture import capture
from graphopt.emit import emit_torch_folder, load
from graphopt.errors import (
    ArtifactError, CaptureError, ConfigError, EmitError, GraphoptError, LaunchConfigError, ModelFileError,
    OrtConfigError, PassConfigError, PassError, PreconditionError, VerificationError,
)
from graphopt.manager import PassManager, PassRecord, PipelineReport, optimize
from graphopt.modelfile import ModelSpec, load_model_file
from graphopt.pass_infra import (
    Decline, Option, Pass, PassResult, Rewrite, Semantics, available_passes, build_pipeline, create_pass,
    get_pass, parse_pass_spec, register_pass,
)
from graphopt.verify import Verification
from graphopt.prune import prune_iterative, to_semi_structured  # noqa: E402  (pruning library)

__all__ = [
    "__version__",
    # capture + analysis
    "capture", "annotate", "to_networkx", "GraphCost", "NodeCost",
    # passes
    "Pass", "PassResult", "Rewrite", "Decline", "Semantics", "Option", "PassManager", "PassRecord",
    "PipelineReport", "Verification", "optimize", "register_pass", "available_passes", "get_pass",
    "create_pass", "build_pipeline", "parse_pass_spec",
    # pruning
    "prune_iterative", "to_semi_structured",
    # model files and artifacts
    "ModelSpec", "load_model_file", "emit_torch_folder", "load",
    # errors
    "GraphoptError", "ModelFileError", "CaptureError", "ConfigError", "PassConfigError", "LaunchConfigError",
    "OrtConfigError", "PreconditionError", "VerificationError", "PassError", "EmitError", "ArtifactError",
]


def __getattr__(name: str):
    """Pass classes by class name, e.g. ``graphopt.ChannelsLast`` (resolved through the registry)."""
    for cls in available_passes().values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
