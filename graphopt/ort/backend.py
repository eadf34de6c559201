"""Train ORT training artifacts written by ``--emit ort``: the ONNX Runtime training backend.

:class:`OrtTrainBackend` implements :class:`graphopt.bench.backend.TrainBackend` on top of
``onnxruntime.training.api`` (Module, Optimizer, CheckpointState): one optimizer step per
:meth:`train_step` at the learning rate given for that step, eval-mode loss and outputs from
:meth:`evaluate`, and the trained weights under the torch module's names from
:meth:`state_dict`. At the end, :meth:`export_inference` writes an inference ONNX model and
:meth:`write_torch_folder` a graphopt torch folder that ``graphopt.load`` reads.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from graphopt.bench.backend import TrainBackend
from graphopt.errors import ArtifactError, EmitError
from graphopt.ort._deps import require_ort, require_ort_training
from graphopt.ort.format import ORT_FORMAT, ORT_FORMAT_VERSION, TORCH_SUBFOLDER, read_ort_manifest

__all__ = ["ORT_FORMAT", "ORT_FORMAT_VERSION", "TORCH_SUBFOLDER", "OrtTrainBackend", "read_ort_manifest"]

log = logging.getLogger(__name__)

_STEPS_PROPERTY = "graphopt_steps"


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu").contiguous().numpy())


class OrtTrainBackend(TrainBackend):
    """Train an ``--emit ort`` folder with ONNX Runtime.

    ``threads``: ORT intra-op threads (None: ORT's default). ``checkpoint``: resume from a
    checkpoint saved with :meth:`save_checkpoint` instead of the folder's initial one.
    """

    name = "ort"

    def __init__(self, folder: str | Path, *, threads: int | None = None, checkpoint: str | Path | None = None,
                 verify_checksums: bool = True):
        require_ort_training("the ORT training backend")
        ort = require_ort()
        from onnxruntime.training.api import CheckpointState, Module, Optimizer

        self.folder = Path(folder)
        self.manifest = read_ort_manifest(self.folder, verify_checksums)
        art = self.manifest["artifacts"]
        ckpt = Path(checkpoint) if checkpoint is not None else self.folder / art["checkpoint"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        from graphopt.ort.artifacts import quiet_native_stderr

        try:
            with quiet_native_stderr():
                self._load(CheckpointState, Module, Optimizer, ckpt, art, opts)
        except ArtifactError:
            raise
        except Exception as exc:
            from graphopt.ort.export import explain_failure

            _, what = explain_failure(exc)
            raise ArtifactError(f"ONNX Runtime cannot load the training artifacts: {what}", where=str(self.folder),
                                fix="re-emit the folder with this graphopt/onnxruntime") from exc
        self._post_init()

    @classmethod
    def from_config(cls, module: Any, config: Any, *, loss: Any = None, example_inputs: Any = None) -> "OrtTrainBackend":
        """Factory of the harness's backend registry (``graphopt train --backend ort``).

        Emits ORT training artifacts for ``module`` into a temporary folder the backend owns, with
        ``config``'s optimizer mapped to ORT's (AdamW with torch's semantics, or plain SGD) and the
        model file's ``loss`` mapped to an ORT loss, then loads them.
        """
        import tempfile

        from graphopt.ort.training_emit import emit_ort_artifacts
        from graphopt.errors import OrtConfigError
        from graphopt.ort.spec import OptimizerSpec

        if str(getattr(config, "device", "cpu")) != "cpu":
            raise OrtConfigError("the ORT backend trains on the CPU build of onnxruntime-training",
                                 fix="use --device cpu, or --backend torch on a GPU")
        if config.optimizer not in ("adamw", "sgd"):
            raise OrtConfigError(f"optimizer '{config.optimizer}' is not available in ONNX Runtime training",
                                 fix="use --optimizer adamw or --optimizer sgd --momentum 0")
        spec = OptimizerSpec(name=config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                             momentum=config.momentum if config.optimizer == "sgd" else 0.0)
        tmp = tempfile.TemporaryDirectory(prefix="graphopt-ort-")
        folder = Path(tmp.name) / "artifacts"
        emit_ort_artifacts(module, folder, optimizer=spec, inputs=example_inputs, model_loss=loss)
        backend = cls(folder, threads=torch.get_num_threads())
        backend._tmp = tmp  # the artifacts live as long as the backend
        return backend

    def _load(self, CheckpointState: Any, Module: Any, Optimizer: Any, ckpt: Path, art: dict[str, str],
              opts: Any) -> None:
        self.state = CheckpointState.load_checkpoint(str(ckpt))
        self.module = Module(str(self.folder / art["training_model"]), self.state,
                             str(self.folder / art["eval_model"]), session_options=opts)
        self.optimizer = Optimizer(str(self.folder / art["optimizer_model"]), self.module)

    def _post_init(self) -> None:
        self.loss = self.manifest["loss"]
        self.output = self.manifest["output"]
        self.names: dict[str, str] = self.manifest["names"]
        self.bn: list[dict[str, Any]] = self.manifest.get("batchnorm", [])
        self.module.train()
        train_out = list(self.module.output_names())
        self._loss_idx = 0
        self._out_idx = train_out.index(self.output)
        self._bn_idx = [(train_out.index(s["mean_out"]), train_out.index(s["var_out"])) for s in self.bn]
        self.module.eval()
        self._eval_out_idx = list(self.module.output_names()).index(self.output)
        self.module.train()
        props = self.state.properties
        self.steps = int(props[_STEPS_PROPERTY]) if _STEPS_PROPERTY in props else 0
        self._nbt0: dict[str, int] | None = None

    # ------------------------------------------------------------------ TrainBackend
    def _feeds(self, inputs: Sequence[torch.Tensor] | torch.Tensor, target: torch.Tensor) -> list[np.ndarray]:
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        if len(inputs) != len(self.manifest["inputs"]):
            raise ValueError(f"expected {len(self.manifest['inputs'])} input tensor(s), got {len(inputs)}")
        target = target.long() if self.loss == "cross_entropy" else target.float()
        return [_np(t) for t in inputs] + [_np(target)]

    def train_step(self, inputs: Sequence[torch.Tensor], target: torch.Tensor, lr: float) -> float:
        feeds = self._feeds(inputs, target)
        self.module.train()
        outs = self.module(*feeds)
        self.optimizer.set_learning_rate(float(lr))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        batch = feeds[0].shape[0] if feeds[0].ndim else 1
        params = self.state.parameters
        for s, (im, iv) in zip(self.bn, self._bn_idx):
            new_var = outs[iv]
            n = batch * s["per_sample"] if s.get("per_sample") else None
            if n is not None and n > 1:  # ONNX updates with the biased batch variance, torch the unbiased one
                m = s["momentum"]
                old = params[s["var"]].data
                new_var = (m * old + (new_var - m * old) * (n / (n - 1))).astype(old.dtype)
            params[s["mean"]] = np.ascontiguousarray(outs[im])
            params[s["var"]] = np.ascontiguousarray(new_var)
        self.steps += 1
        return float(outs[self._loss_idx])

    def evaluate(self, inputs: Sequence[torch.Tensor], target: torch.Tensor) -> tuple[float, torch.Tensor]:
        feeds = self._feeds(inputs, target)
        self.module.eval()
        outs = self.module(*feeds)
        self.module.train()
        return float(outs[0]), torch.from_numpy(np.array(outs[self._eval_out_idx]))

    def _initial_counts(self) -> dict[str, int]:
        if self._nbt0 is None:
            from safetensors import safe_open

            self._nbt0 = {}
            wpath = self.folder / TORCH_SUBFOLDER / "weights.safetensors"
            with safe_open(str(wpath), framework="pt") as f:
                keys = set(f.keys())
                for s in self.bn:
                    k = s["num_batches_tracked"]
                    if k in keys:
                        self._nbt0[k] = int(f.get_tensor(k).item())
        return self._nbt0

    def state_dict(self) -> dict[str, torch.Tensor]:
        params = self.state.parameters
        sd = {tname: torch.from_numpy(np.array(params[oname].data)) for oname, tname in self.names.items()
              if oname in params}
        for k, v in self._initial_counts().items():
            sd[k] = torch.tensor(v + self.steps, dtype=torch.long)
        return sd

    # ------------------------------------------------------------------ after training
    def save_checkpoint(self, path: str | Path) -> Path:
        """Save the training state (weights, optimizer moments, step count) to resume from."""
        from onnxruntime.training.api import CheckpointState

        self.state.properties[_STEPS_PROPERTY] = int(self.steps)
        CheckpointState.save_checkpoint(self.state, str(path), include_optimizer_state=True)
        return Path(path)

    def export_inference(self, path: str | Path) -> Path:
        """Write the trained inference model (eval mode, no loss) as ONNX and check it."""
        import onnx

        path = Path(path)
        self.module.eval()
        try:
            self.module.export_model_for_inferencing(str(path), [self.output])
        finally:
            self.module.train()
        onnx.checker.check_model(str(path))
        return path

    def write_torch_folder(self, out: str | Path, *, force: bool = False, check: bool = True,
                           trust_code: bool = False) -> Path:
        """Write the trained weights back as a graphopt torch folder (``graphopt.load`` reads it).

        The module source is the emitted one; the weights are the trained ones. With ``check``,
        the folder is loaded and its eval outputs compared with ORT's on random inputs of the
        recorded shapes before it is moved into place.
        """
        from safetensors.torch import load_file, save_file

        from graphopt.emit.fs import atomic_folder, sha256_file
        from graphopt.emit.torch_folder import FORMAT, MANIFEST_FILE, WEIGHTS_FILE, load
        from graphopt.serialize import write_json

        src = self.folder / TORCH_SUBFOLDER
        manifest = json.loads((src / MANIFEST_FILE).read_text())
        tied = manifest.get("tied", {})
        weights = load_file(str(src / WEIGHTS_FILE))
        trained = self.state_dict()
        updated = 0
        for name, value in trained.items():
            key = tied.get(name, name)
            if key not in weights:
                raise EmitError(f"trained tensor '{name}' has no place in the torch folder", where=str(src),
                                fix="re-emit the ORT folder; do not mix folders of different runs")
            old = weights[key]
            if tuple(old.shape) != tuple(value.shape):
                raise EmitError(f"trained tensor '{name}' has shape {tuple(value.shape)}, the torch folder "
                                f"{tuple(old.shape)}", where=str(src))
            weights[key] = value.to(old.dtype).contiguous()
            updated += 1
        with atomic_folder(out, force) as tmp:
            files = {}
            for fname in manifest["files"]:  # module.py and graph.json as emitted, the trained weights
                if fname != WEIGHTS_FILE:
                    shutil.copyfile(src / fname, tmp / fname)
                    files[fname] = sha256_file(tmp / fname)
            save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
            files[WEIGHTS_FILE] = sha256_file(tmp / WEIGHTS_FILE)
            manifest["files"] = files
            import onnxruntime

            manifest["trained"] = {"backend": "onnxruntime-training", "onnxruntime_version": onnxruntime.__version__,
                                   "steps": self.steps, "tensors_updated": updated,
                                   "loss": self.loss, "optimizer": self.manifest["optimizer"]}
            write_json(tmp / MANIFEST_FILE, manifest)
            # artifacts this backend emitted itself (from_config) are trusted; others load without code
            net = load(tmp, trust_code=trust_code or getattr(self, "_tmp", None) is not None)
            if check:
                self._check_same(net, manifest)
        return Path(out)

    def _check_same(self, net: torch.nn.Module, manifest: dict[str, Any]) -> None:
        from graphopt.ort.spec import make_target
        from graphopt.verify import max_rel_error

        g = torch.Generator().manual_seed(0)
        inputs = []
        for spec in manifest.get("inputs", []):
            dtype = getattr(torch, spec["dtype"])
            shape = spec["shape"]
            inputs.append(torch.randn(shape, generator=g).to(dtype) if dtype.is_floating_point
                          else torch.zeros(shape, dtype=dtype))
        net.eval()
        with torch.no_grad():
            ref = net(*inputs)
        target = make_target(self.loss, ref.float(), g)
        _, out = self.evaluate(tuple(inputs), target)
        err = max_rel_error([out.float()], [ref.float()])
        tol = 1e-4 if all(p.dtype == torch.float32 for p in net.parameters()) and not self.manifest.get("half") else 2e-2
        if not math.isfinite(err) or err > tol:
            raise EmitError(f"the written-back torch module differs from the ORT model (max relative error "
                            f"{err:.2e} > {tol:g})", fix="report this bug")
