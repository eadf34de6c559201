"""Does ORT train what PyTorch trains? Checks at emit time and step-by-step comparisons.

- :func:`check_artifacts` (run by ``--emit ort`` before the folder is moved into place): on the
  example inputs, ORT's eval outputs vs the module's eval outputs, and ORT's training-mode loss
  and parameter gradients vs torch's.
- :func:`compare_training`: from the same initial weights and batches, N ORT optimizer steps and
  N torch steps (the torch optimizer with the same hyper-parameters); per-step losses and the
  final weights compared.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from graphopt.ort.spec import OptimizerSpec, make_target, torch_loss
from graphopt.verify import max_rel_error, rel_l2_error

__all__ = ["TOLERANCES", "check_artifacts", "compare_training", "ParityResult"]

# fp32 graphs / graphs with half casts inside: (outputs max rel err, loss rel err, gradients rel L2).
# The gradient bound catches gross errors (a wrong or missing gradient moves it to O(1)); ORT's
# float32 gradients are not bit-for-bit torch's: measured 3e-6 (resnet18, as accurate as torch's
# own float32) to 1e-2 (mobilenet_v2 at 64x64, batch 8) relative L2 from float64 torch.
TOLERANCES = {"float32": (1e-4, 1e-4, 5e-2), "mixed": (2e-2, 2e-2, 1e-1)}
# ORT's gradients may be this many times further from float64 than torch's own float32 gradients
GRAD_SLACK = 4.0


def _torch_grads(module: nn.Module, inputs: Sequence[torch.Tensor], target: torch.Tensor, loss: str,
                 dtype: torch.dtype | None) -> tuple[float, dict[str, torch.Tensor]]:
    """One training-mode forward/backward of a copy of ``module`` (in ``dtype`` if given)."""
    tmod = copy.deepcopy(module).train()
    xs = tuple(inputs)
    if dtype is not None:
        tmod = tmod.to(dtype)
        xs = tuple(x.to(dtype) if x.is_floating_point() else x for x in xs)
    out = tmod(*xs)
    t = target if not target.is_floating_point() or dtype is None else target.to(dtype)
    tloss = torch_loss(loss)(out if dtype is not None else out.float(), t)
    tloss.backward()
    grads = {n: p.grad.detach().double() for n, p in tmod.named_parameters() if p.requires_grad and p.grad is not None}
    return tloss.item(), grads


def check_artifacts(backend: Any, module: nn.Module, inputs: Sequence[torch.Tensor], *, half: bool,
                    has_dropout: bool) -> dict[str, Any]:
    """Compare an :class:`OrtTrainBackend` (fresh, untrained) with ``module`` on ``inputs``."""
    tol_out, tol_loss, tol_grad = TOLERANCES["mixed" if half else "float32"]
    inputs = tuple(inputs)
    g = torch.Generator().manual_seed(0)
    ref_mod = copy.deepcopy(module).eval()
    with torch.no_grad():
        ref = ref_mod(*inputs)
    target = make_target(backend.loss, ref.float(), g)
    eval_loss, out = backend.evaluate(inputs, target)
    result: dict[str, Any] = {
        "inputs": [list(t.shape) for t in inputs],
        "eval_outputs_max_rel_error": max_rel_error([out.float()], [ref.float()]),
        "eval_loss": eval_loss,
        "tolerances": {"outputs_max_rel": tol_out, "loss_rel": tol_loss, "gradients_rel_l2": tol_grad},
    }
    # training mode: loss and gradients of one forward/backward (no optimizer step)
    if has_dropout:
        result["train_check"] = "skipped: the graph has active dropout (random masks differ between runtimes)"
    else:
        try:
            tl, tgrads = _torch_grads(module, inputs, target, backend.loss, None)
            try:
                _, tgrads64 = _torch_grads(module, inputs, target, backend.loss, torch.float64)
            except Exception:  # e.g. a mixed-precision graph that pins some ops to float32
                tgrads64 = None
        except Exception as exc:  # e.g. BatchNorm with one value per channel
            result["train_check"] = f"skipped: torch cannot run a training step on these inputs ({exc})"
        else:
            feeds = backend._feeds(inputs, target)
            backend.module.train()
            outs = backend.module(*feeds)
            oloss = float(outs[0])
            params = backend.state.parameters
            og, tg, tg64 = [], [], []
            for oname, tname in backend.names.items():
                if tname not in tgrads or not params[oname].requires_grad:
                    continue
                grad = params[oname].grad
                if grad is not None:
                    og.append(torch.from_numpy(grad.copy()))
                    tg.append(tgrads[tname])
                    if tgrads64 is not None:
                        tg64.append(tgrads64[tname])
            backend.module.lazy_reset_grad()
            if tgrads64 is not None:
                ort_err, torch_err = rel_l2_error(og, tg64), rel_l2_error(tg, tg64)
            else:  # no float64 reference: compare with torch's float32 gradients
                ort_err, torch_err = rel_l2_error(og, tg), 0.0
                result["gradients_reference"] = "torch float32 (the graph does not run in float64)"
            result.update({"train_loss_ort": oloss, "train_loss_torch": tl,
                           "train_loss_rel_error": abs(oloss - tl) / max(abs(tl), 1e-12),
                           "gradients_compared": len(og),
                           # against float64 torch: how far ORT's float32 gradients are from exact, next
                           # to how far torch's own float32 gradients are (BatchNorm over few values per
                           # channel makes them ill-conditioned in float32 in both runtimes)
                           "gradients_rel_l2_error": ort_err, "torch_float32_gradients_rel_l2_error": torch_err,
                           "gradients_rel_l2_error_vs_torch_float32": rel_l2_error(og, tg),
                           "train_check": "compared"})
    ok = result["eval_outputs_max_rel_error"] <= tol_out
    if result["train_check"] == "compared":
        grad_budget = max(tol_grad, GRAD_SLACK * result["torch_float32_gradients_rel_l2_error"])
        result["gradients_budget"] = grad_budget
        ok = ok and result["train_loss_rel_error"] <= tol_loss and result["gradients_rel_l2_error"] <= grad_budget
    result["passed"] = bool(ok)
    return result


def _train_float64(gm: nn.Module, batches: list, optimizer: OptimizerSpec, lr: float, fn: Any,
                   loss: str) -> list[float]:
    ref64 = copy.deepcopy(gm).double().train()
    opt64 = optimizer.torch_optimizer(ref64.parameters())
    for group in opt64.param_groups:
        group["lr"] = lr
    losses = []
    for x, y in batches:
        opt64.zero_grad(set_to_none=True)
        out = ref64(*(t.double() if t.is_floating_point() else t for t in x))
        tl = fn(out, y.long() if loss == "cross_entropy" else y.double())
        tl.backward()
        opt64.step()
        losses.append(tl.item())
    return losses


@dataclass
class ParityResult:
    ort_losses: list[float]
    torch_losses: list[float]
    weights_max_abs_diff: float
    weights_rel_l2: float
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def max_abs_loss_diff(self) -> float:
        return max(abs(a - b) for a, b in zip(self.ort_losses, self.torch_losses))

    @property
    def max_rel_loss_diff(self) -> float:
        return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(self.ort_losses, self.torch_losses))

    def as_dict(self) -> dict[str, Any]:
        return {"ort_losses": self.ort_losses, "torch_losses": self.torch_losses,
                "max_abs_loss_diff": self.max_abs_loss_diff, "max_rel_loss_diff": self.max_rel_loss_diff,
                "weights_max_abs_diff": self.weights_max_abs_diff, "weights_rel_l2": self.weights_rel_l2,
                **self.notes}


def compare_training(module: nn.Module, batches: Iterable[tuple[Sequence[torch.Tensor], torch.Tensor]], *,
                     loss: str = "cross_entropy", optimizer: OptimizerSpec | None = None,
                     lr: float | None = None, folder: str | Path | None = None,
                     threads: int | None = 1, float64_reference: bool = True) -> ParityResult:
    """N ORT steps vs N torch steps from the same weights on the same ``(inputs, target)`` batches.

    ``module`` (an nn.Module or GraphModule; not modified) is captured and emitted as ORT artifacts
    into ``folder`` (a temporary folder by default). With ``float64_reference`` torch also trains a
    float64 copy: float32 training (in either runtime) drifts from exact arithmetic, fast where
    BatchNorm normalises over few values, and ``notes["torch_float32_drift"]`` (max relative loss
    difference float32 vs float64 torch) says how much of an ORT-vs-torch difference that explains.
    """
    import graphopt
    from graphopt.ort.training_emit import emit_ort_artifacts
    from graphopt.ort.backend import OrtTrainBackend

    optimizer = optimizer or OptimizerSpec()
    lr = optimizer.lr if lr is None else lr
    batches = [(tuple(x) if isinstance(x, (tuple, list)) else (x,), y) for x, y in batches]
    tmp = None
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="graphopt-parity-")
        folder = Path(tmp.name) / "ort"
    try:
        first = batches[0][0]
        gm = graphopt.capture(module, first)
        emit_ort_artifacts(gm, folder, loss=loss, optimizer=optimizer, inputs=first, force=True)
        backend = OrtTrainBackend(folder, threads=threads)
        ref = copy.deepcopy(gm).train()
        opt = optimizer.torch_optimizer(ref.parameters())
        for group in opt.param_groups:
            group["lr"] = lr
        fn = torch_loss(loss)
        ort_losses, torch_losses = [], []
        for x, y in batches:
            ort_losses.append(backend.train_step(x, y, lr))
            opt.zero_grad(set_to_none=True)
            out = ref(*x)
            tl = fn(out.float(), y.long() if loss == "cross_entropy" else y.float())
            tl.backward()
            opt.step()
            torch_losses.append(tl.item())
        notes: dict[str, Any] = {}
        if float64_reference:
            try:
                losses64 = _train_float64(gm, batches, optimizer, lr, fn, loss)
            except Exception as exc:  # e.g. a mixed-precision graph that pins some ops to float32
                notes["torch_float64_losses"] = None
                notes["float64_reference"] = f"unavailable: {type(exc).__name__}: {exc}"
            else:
                notes["torch_float64_losses"] = losses64
                notes["torch_float32_drift"] = max(abs(a - b) / abs(b) for a, b in zip(torch_losses, losses64))
                notes["ort_float32_drift"] = max(abs(a - b) / abs(b) for a, b in zip(ort_losses, losses64))
        trained = backend.state_dict()
        tsd = ref.state_dict()
        keys = [k for k in trained if k in tsd and tsd[k].is_floating_point()]
        wmax = max(float((trained[k].float() - tsd[k].float()).abs().max()) for k in keys)
        wrel = rel_l2_error([trained[k] for k in keys], [tsd[k] for k in keys])
        counts_ok = all(int(trained[k]) == int(tsd[k]) for k in trained if k in tsd and not tsd[k].is_floating_point())
        return ParityResult(ort_losses, torch_losses, wmax, wrel,
                            {**notes, "steps": len(batches), "tensors_compared": len(keys), "int_buffers_equal": counts_ok,
                             "optimizer": optimizer.as_dict(), "loss": loss})
    finally:
        if tmp is not None:
            tmp.cleanup()


_CRASH_PROBE = r"""
import sys
import numpy as np
import torch
from graphopt.ort.backend import OrtTrainBackend

folder, npz = sys.argv[1], sys.argv[2]
arrays = np.load(npz, allow_pickle=False)
inputs = tuple(torch.from_numpy(arrays[k]) for k in sorted(arrays.files))
backend = OrtTrainBackend(folder, threads=1, verify_checksums=False)
target = torch.zeros(inputs[0].shape[0], dtype=torch.long)
_, out = backend.evaluate(inputs, target)
if backend.loss != "cross_entropy":
    target = torch.zeros_like(out)
else:
    target = out.argmax(-1) if out.dim() > 1 else target
backend.train_step(inputs, target, 1e-3)
"""


def probe_for_crash(folder: Path, inputs: tuple[torch.Tensor, ...], where: str, timeout: float = 600) -> None:
    """Run one eval and one training step of the artifacts in a child process first.

    Some graphs make onnxruntime-training 1.19 crash natively (a segmentation fault in a gradient
    kernel, e.g. AveragePoolGrad for an adaptive average pool with output > 1 seen here), which
    would kill the user's process with no message. A crash in the child becomes a one-line error;
    any other failure is left to the in-process check, which explains it.
    """
    import signal
    import subprocess
    import sys
    import tempfile

    import numpy as np

    from graphopt.errors import EmitError

    with tempfile.TemporaryDirectory(prefix="graphopt-ort-probe-") as tmp:
        npz = Path(tmp) / "inputs.npz"
        np.savez(npz, **{f"x{i:03d}": t.detach().cpu().numpy() for i, t in enumerate(inputs)})
        try:
            proc = subprocess.run([sys.executable, "-c", _CRASH_PROBE, str(folder), str(npz)],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise EmitError(f"ONNX Runtime did not finish one training step in {timeout:.0f} s", where=where,
                            fix="use --emit onnx for inference, or train with --backend torch") from exc
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        import onnx

        ops = sorted({n.op_type for n in onnx.load(str(folder / "training_model.onnx"), load_external_data=False).graph.node
                      if n.op_type.endswith("Grad")})
        raise EmitError(f"onnxruntime-training crashed ({name}) running one training step of this graph "
                        f"(gradient operators: {', '.join(ops)})", where=where,
                        fix="this is an onnxruntime-training bug; --emit onnx and --backend torch are unaffected")
