"""The ``--emit ort`` folder format: file names, format name and version, manifest keys.

The writer (:mod:`graphopt.ort.training_emit`) and the reader (:mod:`graphopt.ort.backend`)
both use this module, so the format is defined once::

    out/
      training_model.onnx   forward + loss + gradient graph
      eval_model.onnx       forward + loss in inference mode
      optimizer_model.onnx  AdamW (torch semantics) or SGD
      checkpoint            initial parameters
      torch/                the same graph as a graphopt torch folder
      manifest.json         format, artifacts (role -> file), loss, optimizer, names, batchnorm, files
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graphopt.emit.fs import read_manifest, sha256_file
from graphopt.errors import ArtifactError

__all__ = ["ORT_FORMAT", "ORT_FORMAT_VERSION", "MANIFEST", "TRAINING_MODEL", "EVAL_MODEL", "OPTIMIZER_MODEL",
           "CHECKPOINT", "TORCH_SUBFOLDER", "ARTIFACTS", "MANIFEST_KEYS", "read_ort_manifest"]

ORT_FORMAT = "graphopt.ort_training"
ORT_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
TORCH_SUBFOLDER = "torch"
# manifest["artifacts"]: role -> file name
ARTIFACTS = {"training_model": TRAINING_MODEL, "eval_model": EVAL_MODEL, "optimizer_model": OPTIMIZER_MODEL,
             "checkpoint": CHECKPOINT, "torch_folder": TORCH_SUBFOLDER}
# keys the reader needs (written by the emitter, most from build_training_artifacts' facts)
MANIFEST_KEYS = ("artifacts", "inputs", "loss", "output", "names", "optimizer", "files")


def read_ort_manifest(folder: str | Path, verify_checksums: bool = True) -> dict[str, Any]:
    """The manifest of an ``--emit ort`` folder, after checking its files against their checksums."""
    folder = Path(folder)
    manifest = read_manifest(folder, fmt=ORT_FORMAT, version=ORT_FORMAT_VERSION, what="ORT training folder",
                             emit_hint="graphopt optimize --emit ort")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"manifest.json lacks {', '.join(missing)}", where=str(folder), fix="re-emit the folder")
    for fname, digest in manifest.get("files", {}).items():
        fpath = folder / fname
        if not fpath.is_file():
            raise ArtifactError(f"{fname} is missing", where=str(folder), fix="re-emit the folder")
        if verify_checksums and sha256_file(fpath) != digest:
            raise ArtifactError(f"{fname} does not match the manifest's checksum (modified or corrupt)",
                                where=str(folder), fix="re-emit the folder")
    return manifest
