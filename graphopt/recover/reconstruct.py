"""Data-aware reconstruction after approximate rewrites, on calibration batches.

Every function here works layer by layer, in graph order, and sequentially: a layer's inputs
are taken from the *rewritten* model as already reconstructed up to that layer, its targets
from the *original* model's same layer on the same batches. So each fit also absorbs the error
the layers before it left (He et al. 2017, "Channel Pruning for Accelerating Very Deep Neural
Networks"; Luo et al. 2017, ThiNet; Frantar & Alistarh 2023, SparseGPT).

- :func:`reconstruct_structured`: after structured pruning, refit each layer whose input
  channels were removed (and, where its own outputs were pruned too, on its kept outputs) by
  ridge least squares against the original layer's outputs.
- :func:`reconstruct_separable`: after the depthwise-separable rewrite, fit the depthwise and
  pointwise weights to the original conv's outputs by alternating least squares (both steps
  closed form), starting from the SVD factorisation.
- :func:`refine_outputs`: after the layer-wise fits, a short regression of the whole rewritten
  model's outputs onto the original's on the same calibration batches (Adam on mean squared
  logit error, model in eval mode, no labels). Layer-wise least squares is optimal per layer but
  blind to what the layers after it (BatchNorm, ReLU, pooling) keep of its error; this step is
  not. Kept only when it lowers the calibration error.
- :func:`sparsegpt`: choose the 2:4 / unstructured mask and update the remaining weights from
  the layer's input Hessian ``X^T X`` (SparseGPT's column-by-column OBS update).

Each returns one :class:`LayerFit` per layer: relative L2 error of the layer's outputs against
the original's, before and after, measured on the calibration rows used for the fit.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.errors import PassConfigError

__all__ = ["LayerFit", "reconstruct_structured", "reconstruct_separable", "refine_outputs", "sparsegpt",
           "sparsegpt_layer",
           "layer_rows", "require_data", "NO_DATA_FIX"]

log = logging.getLogger(__name__)

NO_DATA_FIX = ("define data() in the model file, returning (train_dataset, test_dataset); "
               "reconstruct=N draws N input batches from the training set")


@dataclass
class LayerFit:
    layer: str
    error_before: float
    error_after: float
    rows: int
    method: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_data(gm: fx.GraphModule, pass_name: str) -> None:
    """Raise the one-line error when ``reconstruct`` is asked for without calibration data."""
    from graphopt.ir import graph_meta

    if graph_meta(gm).get("calibration_data") is None:
        raise PassConfigError("reconstruct=N needs calibration data and the model file has no data()",
                              where=f"pass '{pass_name}'", fix=NO_DATA_FIX)


# -- collecting rows -----------------------------------------------------------------------------

def _conv_rows(x: torch.Tensor, conv: nn.Conv2d, channels_last_kernel: bool = False) -> torch.Tensor:
    """im2col of ``x`` for ``conv`` (groups=1): [B*L, C_in*kh*kw] (or kernel-position-major)."""
    if conv.padding_mode != "zeros":
        raise ValueError("only zero padding")
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0, 0)
        else:  # "same" with stride 1
            pad = tuple((d * (k - 1)) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    u = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=pad, stride=conv.stride)  # B, C*kk, L
    b, ckk, length = u.shape
    if channels_last_kernel:
        kk = conv.kernel_size[0] * conv.kernel_size[1]
        u = u.reshape(b, -1, kk, length).transpose(1, 2).reshape(b, ckk, length)
    return u.transpose(1, 2).reshape(b * length, ckk)


def layer_rows(mod: nn.Module, x: torch.Tensor, kernel_major: bool = False) -> torch.Tensor:
    """The rows a linear layer multiplies with its weight matrix: [N, fan_in]."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(mod, nn.Conv2d):
        return _conv_rows(x, mod, kernel_major)
    raise TypeError(type(mod).__name__)


def _out_rows(mod: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])  # conv: [B*H*W, C_out]


def _capture(model: nn.Module, path: str, batches: Sequence[tuple[torch.Tensor, ...]], what: str) -> list[torch.Tensor]:
    """Input (``what='in'``) or output of submodule ``path`` on every batch (eval mode, no grad)."""
    from graphopt.ir import eval_mode

    got: list[torch.Tensor] = []
    mod = model.get_submodule(path)

    def hook(_m: nn.Module, args: Any, out: torch.Tensor) -> None:
        got.append((args[0] if what == "in" else out).detach())

    h = mod.register_forward_hook(hook)
    try:
        with eval_mode(model), torch.no_grad():
            for b in batches:
                model(*b)
    finally:
        h.remove()
    return got


def _pairs(original: nn.Module, rewritten: nn.Module, opath: str, rpath: str,
           batches: Sequence[tuple[torch.Tensor, ...]], max_rows: int, seed: int,
           out_keep: torch.Tensor | None = None, in_path: str | None = None,
           kernel_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (inputs of the rewritten layer) and targets (outputs of the original layer), subsampled."""
    xs = _capture(rewritten, in_path or rpath, batches, "in")
    ys = _capture(original, opath, batches, "out")
    rmod = rewritten.get_submodule(in_path or rpath)
    g = torch.Generator().manual_seed(seed)
    per = max(1, max_rows // max(len(xs), 1))
    rows, targets = [], []
    for x, y in zip(xs, ys):
        a = layer_rows(rmod, x, kernel_major).double()
        t = _out_rows(original.get_submodule(opath), y).double()
        if out_keep is not None:
            t = t[:, out_keep]
        if a.shape[0] > per:
            idx = torch.randperm(a.shape[0], generator=g)[:per]
            a, t = a[idx], t[idx]
        rows.append(a)
        targets.append(t)
    return torch.cat(rows), torch.cat(targets)


def _rel(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).norm() / target.norm().clamp_min(1e-30))


def _ridge(a: torch.Tensor, y: torch.Tensor, bias: bool, damp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """argmin ||[a 1] W - y||^2 + damp*mean(diag) ||W||^2, float64."""
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    h = a.T @ a
    lam = damp * float(h.diagonal().mean()) + 1e-12
    h.diagonal().add_(lam)
    sol = torch.linalg.solve(h, a.T @ y)  # [fan_in(+1), out]
    if bias:
        return sol[:-1].T, sol[-1]
    return sol.T, None


def _order(gm: nn.Module, paths: Iterable[str]) -> list[str]:
    wanted = set(paths)
    if isinstance(gm, fx.GraphModule):
        seen: list[str] = []
        for n in gm.graph.nodes:
            if n.op == "call_module" and n.target in wanted and n.target not in seen:
                seen.append(n.target)
        return seen + sorted(wanted - set(seen))
    return [n for n, _ in gm.named_modules() if n in wanted]


# -- structured pruning --------------------------------------------------------------------------

def _keep_out(result: Any, path: str) -> torch.Tensor | None:
    """Positions of the original output channels a pruned layer kept (None: all kept)."""
    from graphopt.prune.structured import _cols

    cg, plan = result.analysis, result.plan
    for m in cg.members:
        if m.rule is not None and m.target == path and m.kind in ("out", "coupled"):
            keep = _cols(cg.keep_positions(m.atoms, plan.removed), m.inner)
            return torch.as_tensor(keep, dtype=torch.long)
    return None


def reconstruct_structured(original: nn.Module, pruned: fx.GraphModule, result: Any,
                           batches: Sequence[tuple[torch.Tensor, ...]], *, max_rows: int = 16384,
                           damp: float = 1e-4, seed: int = 0) -> list[LayerFit]:
    """Refit (in place) every Conv2d (groups=1) / Linear of ``pruned`` whose input channels were
    removed, on its kept output channels, against ``original``'s same layer (least squares)."""
    fits: list[LayerFit] = []
    cands = []
    for path, mod in pruned.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or (isinstance(mod, nn.Conv2d) and mod.groups != 1):
            continue
        try:
            omod = original.get_submodule(path)
        except AttributeError:
            continue
        if type(omod) is not type(mod) or omod.weight.shape[1] == mod.weight.shape[1]:
            continue  # input channels intact: nothing of its input was lost
        cands.append(path)
    for path in _order(pruned, cands):
        mod = pruned.get_submodule(path)
        keep = _keep_out(result, path) if mod.weight.shape[0] != original.get_submodule(path).weight.shape[0] else None
        if keep is not None and len(keep) != mod.weight.shape[0]:
            log.warning("reconstruct: %s: kept channels do not match the weight; skipped", path)
            continue
        a, y = _pairs(original, pruned, path, path, batches, max_rows, seed, keep)
        w = mod.weight.detach().double().reshape(mod.weight.shape[0], -1)
        b = mod.bias.detach().double() if mod.bias is not None else None
        before = _rel(a @ w.T + (b if b is not None else 0), y)
        nw, nb = _ridge(a, y, b is not None, damp)
        after = _rel(a @ nw.T + (nb if nb is not None else 0), y)
        if after < before:
            with torch.no_grad():
                mod.weight.copy_(nw.reshape(mod.weight.shape).to(mod.weight.dtype))
                if nb is not None:
                    mod.bias.copy_(nb.to(mod.bias.dtype))
        else:
            after = before
        fits.append(LayerFit(path, before, after, a.shape[0], "least squares"))
        log.info("reconstruct %s: %.4f -> %.4f", path, before, after)
    return fits


# -- depthwise-separable -------------------------------------------------------------------------

def reconstruct_separable(original: nn.Module, rewritten: fx.GraphModule, pairs: Sequence[tuple[str, str, str]],
                          batches: Sequence[tuple[torch.Tensor, ...]], *, iterations: int = 8,
                          max_rows: int = 16384, damp: float = 1e-5, seed: int = 0) -> list[LayerFit]:
    """Fit each (original conv path, depthwise path, pointwise path) of ``rewritten`` in place to the
    original conv's outputs on real activations by alternating least squares."""
    fits: list[LayerFit] = []
    for opath, dpath, ppath in pairs:
        conv = original.get_submodule(opath)
        dw, pw = rewritten.get_submodule(dpath), rewritten.get_submodule(ppath)
        ci, co = conv.in_channels, conv.out_channels
        kk = conv.kernel_size[0] * conv.kernel_size[1]
        u, y = _pairs(original, rewritten, opath, dpath, batches, max_rows, seed, in_path=dpath)
        # u rows: im2col with the depthwise conv's geometry (same as the original conv): [N, ci*kk]
        u3 = u.reshape(-1, ci, kk)
        d = dw.weight.detach().double().reshape(ci, kk)
        p = pw.weight.detach().double().reshape(co, ci)
        bias = pw.bias.detach().double() if pw.bias is not None else None

        def predict(d: torch.Tensor, p: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            z = (u3 * d[None]).sum(-1)  # [N, ci]
            return z @ p.T + (b if b is not None else 0)

        before = _rel(predict(d, p, bias), y)
        utu = u.T @ u  # [(c,k), (c',k')]
        best = (before, d, p, bias)
        for _ in range(iterations):
            z = (u3 * d[None]).sum(-1)
            p, bias = _ridge(z, y, bias is not None, damp)
            # depthwise step: normal equations G = (P^T P) (x) per-channel-pair U^T U blocks
            ptp = p.T @ p  # [ci, ci]
            g = utu.reshape(ci, kk, ci, kk) * ptp[:, None, :, None]
            g = g.reshape(ci * kk, ci * kk)
            resid = y - (bias if bias is not None else 0)
            r = (u3 * (resid @ p)[:, :, None]).sum(0).reshape(-1)  # [ci*kk]
            lam = damp * float(g.diagonal().mean()) + 1e-12
            g.diagonal().add_(lam)
            d = torch.linalg.solve(g, r).reshape(ci, kk)
            err = _rel(predict(d, p, bias), y)
            if err < best[0]:
                best = (err, d.clone(), p.clone(), None if bias is None else bias.clone())
        after, d, p, bias = best
        with torch.no_grad():
            dw.weight.copy_(d.reshape(dw.weight.shape).to(dw.weight.dtype))
            pw.weight.copy_(p.reshape(pw.weight.shape).to(pw.weight.dtype))
            if bias is not None:
                pw.bias.copy_(bias.to(pw.bias.dtype))
        fits.append(LayerFit(opath, before, after, u.shape[0], f"alternating least squares ({iterations} rounds)"))
        log.info("reconstruct %s: %.4f -> %.4f", opath, before, after)
    return fits


# -- output regression ---------------------------------------------------------------------------

def _logits(out: Any) -> torch.Tensor:
    from graphopt.recover.distill import _first

    return _first(out).float()


def refine_outputs(original: nn.Module, rewritten: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]], *,
                   steps: int = 256, lr: float = 3e-3, params: Sequence[str] | None = None) -> LayerFit:
    """Regress ``rewritten``'s outputs onto ``original``'s on ``batches`` (in place): ``steps``
    Adam steps on the mean squared output error, both models in eval mode (BatchNorm running
    statistics fixed), cycling through the batches. ``params``: parameter-name prefixes to train
    (default: every floating-point parameter). Reverts when the calibration error does not drop."""
    from graphopt.ir import eval_mode

    batches = list(batches)
    with torch.no_grad(), eval_mode(original), eval_mode(rewritten):
        targets = [_logits(original(*b)) for b in batches]

    def error() -> float:
        with torch.no_grad(), eval_mode(rewritten):
            num = sum(float((_logits(rewritten(*b)) - t).pow(2).sum()) for b, t in zip(batches, targets))
        den = sum(float(t.pow(2).sum()) for t in targets)
        return (num / max(den, 1e-30)) ** 0.5

    named = [(n, p) for n, p in rewritten.named_parameters() if p.is_floating_point()
             and (params is None or any(n == q or n.startswith(q + ".") for q in params))]
    before = error()
    if not named or not batches or steps <= 0:
        return LayerFit("(outputs)", before, before, 0, "output regression (nothing to train)")
    saved = {n: p.detach().clone() for n, p in named}
    flags = {n: p.requires_grad for n, p in named}
    for _, p in named:
        p.requires_grad_(True)
    opt = torch.optim.Adam([p for _, p in named], lr=lr)
    rows = 0
    with eval_mode(rewritten), torch.enable_grad():
        for s in range(steps):
            i = s % len(batches)
            loss = (_logits(rewritten(*batches[i])) - targets[i]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rows += int(targets[i].shape[0])
    for n, p in named:
        p.grad = None
        p.requires_grad_(flags[n])
    after = error()
    if not after < before:
        with torch.no_grad():
            for n, p in named:
                p.copy_(saved[n])
        after = before
    log.info("output regression: %.4f -> %.4f", before, after)
    return LayerFit("(outputs)", before, after, rows, f"output regression (Adam, {steps} steps, lr {lr})")


# -- SparseGPT -----------------------------------------------------------------------------------

def sparsegpt_layer(w: torch.Tensor, h: torch.Tensor, *, sparsity: float = 0.5, n: int = 0, m: int = 0,
                    blocksize: int | None = None, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT on one weight matrix ``w`` [out, fan_in] given ``h = X^T X`` [fan_in, fan_in]:
    the pruned and updated weights (float64). ``n:m`` (e.g. 2:4): n zeros in every m consecutive
    columns; otherwise ``sparsity`` of each block's weights, chosen by OBS saliency. ``blocksize``
    (default: an eighth of the columns, 4 to 128, a multiple of 4): the unstructured mask is chosen
    per block, after the updates of the blocks before (adaptive mask selection)."""
    if blocksize is None:
        blocksize = min(128, max(4, (w.shape[1] // 8) // 4 * 4))
    w = w.double().clone()
    h = h.double().clone()
    cols = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(percdamp * float(h.diagonal().mean()))
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    hinv = torch.linalg.cholesky(hinv, upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        dg = hinv1.diagonal()
        if n == 0:
            tmp = w1 ** 2 / dg[None] ** 2
            k = int(tmp.numel() * sparsity)
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
            if k:
                mask1.view(-1)[tmp.reshape(-1).argsort()[:k]] = True
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(count):
            col = w1[:, i]
            d = hinv1[i, i]
            if n and i % m == 0:
                tmp = w1[:, i:i + m] ** 2 / dg[i:i + m][None] ** 2
                mask1.scatter_(1, i + torch.topk(tmp, n, dim=1, largest=False)[1], True)
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= e[:, None] @ hinv1[i, i:][None]
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


def sparsegpt(gm: fx.GraphModule, paths: Sequence[str], batches: Sequence[tuple[torch.Tensor, ...]], *,
              mode: str = "2:4", ratio: float = 0.5, reference: nn.Module | None = None,
              max_rows: int = 65536, seed: int = 0) -> list[LayerFit]:
    """Sparsify the Linear / Conv2d layers ``paths`` of ``gm`` in place, layer by layer (inputs
    from ``gm`` as sparsified so far), with SparseGPT. ``reference`` (default: a copy of ``gm``
    before any change) gives the target outputs of the reported errors."""
    import copy

    ref = reference if reference is not None else copy.deepcopy(gm)
    fits: list[LayerFit] = []
    for path in _order(gm, paths):
        mod = gm.get_submodule(path)
        conv = isinstance(mod, nn.Conv2d)
        if conv and mod.groups != 1:
            continue
        a, y = _pairs(ref, gm, path, path, batches, max_rows, seed, kernel_major=conv)
        w = mod.weight.detach()
        wm = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if conv else w.reshape(w.shape[0], -1)
        b = mod.bias.detach().double() if mod.bias is not None else 0
        h = a.T @ a
        mag = wm.double().clone()
        if mode == "2:4":
            g4 = mag.abs().reshape(mag.shape[0], -1, 4)
            low = g4.topk(2, dim=2, largest=False).indices
            mag = mag.reshape(mag.shape[0], -1, 4).scatter(2, low, 0.0).reshape(mag.shape)
        else:
            k = int(mag.numel() * ratio)
            if k:
                mag.view(-1)[mag.abs().reshape(-1).argsort()[:k]] = 0
        before = _rel(a @ mag.T + b, y)  # magnitude pruning of the same layer, for comparison
        nw = sparsegpt_layer(wm, h, sparsity=ratio, n=2 if mode == "2:4" else 0, m=4 if mode == "2:4" else 0)
        after = _rel(a @ nw.T + b, y)
        if conv:
            kh, kw = mod.kernel_size
            nw = nw.reshape(w.shape[0], kh, kw, -1).permute(0, 3, 1, 2)
        with torch.no_grad():
            mod.weight.copy_(nw.reshape(w.shape).to(w.dtype))
        fits.append(LayerFit(path, before, after, a.shape[0], f"SparseGPT {mode} (before: magnitude)"))
        log.info("sparsegpt %s: magnitude %.4f -> %.4f", path, before, after)
    return fits
