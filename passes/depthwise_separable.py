"""depthwise_separable: standard k x k convs -> depthwise k x k + pointwise 1x1 (APPROXIMATE).

A ``Conv2d(C_in, C_out, k, groups=1)`` becomes ``Conv2d(C_in, C_in, k, groups=C_in)`` (same
stride, padding, dilation, padding mode, no bias) followed by ``Conv2d(C_in, C_out, 1)`` that
carries the bias: MACs and parameters fall from ``C_out*C_in*k*k`` to ``C_in*k*k + C_out*C_in``
(about ``k*k`` times for wide layers: 7.9-8.9x for ResNet-50's 3x3 convs). The pair lives at the
conv's old path: ``layer1.0.conv2.dw`` / ``layer1.0.conv2.pw``.

Initialisation (``init``):

- ``factorize`` (default): the composition computes ``W_hat[o, c] = P[o, c] * D[c]``, so for each
  input channel ``c`` the best least-squares fit is the rank-1 truncated SVD of the slice
  ``W[:, c]`` reshaped ``[C_out, k*k]``: ``u*s`` becomes pointwise column ``c`` and ``v`` the
  depthwise kernel ``c``. Each layer's relative reconstruction error ``||W - W_hat|| / ||W||``
  is reported. It is the exact optimum for this structure; how small it is depends on the
  weights (random weights have no low-rank structure: ~0.8-0.9 per layer; trained 3x3 filters
  are far more correlated across output channels).
- ``random``: PyTorch's default init (training from scratch); the bias is still carried.

``between``: ``none`` (default); ``bn`` (BatchNorm2d between the two, MobileNet style,
initialised to the identity in eval mode: the output error is unchanged); ``bn_relu`` /
``bn_relu6`` (BatchNorm + ReLU/ReLU6). With an activation the pair is no longer linear, so the
BatchNorm is set, from ``calibrate`` batches, to map each depthwise channel's observed range
into the activation's linear region (``alpha_c * z + t_c`` inside ``[0, inf)`` / ``[0, 6]``) and
the pointwise conv undoes the scale and shift: the eval-mode function equals the factorised one on
values inside the calibrated range and is clipped outside it; the measured output error is
reported by verification as usual. In train mode BatchNorm uses batch statistics, so the
train-mode function differs.

Semantics: APPROXIMATE. ``budget`` bounds the relative L2 error of the network's eval outputs
against the original. Its default is unbounded (``inf``: the error is measured and reported, not a
failure), the rule for every pass whose purpose is to change the function and whose recovery is
training: the rewrite is an architecture change meant to be fine-tuned, and at random init the
factorised network's output moves by about its own size (ResNet-50 0.99, ConvNeXt 1.3; see
benchmarks/results/cpu/depthwise_separable_resnet50.md). Give a budget (e.g. ``budget=0.05``) to
use the rewrite as a drop-in approximation. ``check`` also measures the
same rewrite with ``init=random`` so the report states both errors.

Declined, with the reason: grouped/depthwise convs (already factorised), 1x1 convs (nothing to
separate), Conv1d/Conv3d/transposed convs, fewer than ``min_channels`` input channels, kernel
sizes not in ``kernel_sizes``, layers excluded by globs, layers where the pair would not be
smaller (``C_out`` of 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn

from graphopt import Option, Pass, PassResult, Rewrite, Semantics
from graphopt.ir import candidate_sites, copy_graph, output_shape, replace_module, run_calibration
from graphopt.verify import rel_l2_error, run_with_grads

__all__ = ["DepthwiseSeparable", "factorize"]


def factorize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(depthwise [C_in,1,kh,kw], pointwise [C_out,C_in,1,1], per-channel relative error [C_in])
    minimising ``||W - P (x) D||_F`` (rank-1 SVD of each input channel's [C_out, kh*kw] slice)."""
    co, ci, kh, kw = weight.shape
    m = weight.detach().double().permute(1, 0, 2, 3).reshape(ci, co, kh * kw)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    pw = (u[:, :, 0] * s[:, :1]).transpose(0, 1)  # [C_out, C_in]
    dw = vh[:, 0, :]  # [C_in, kh*kw]
    approx = pw.transpose(0, 1)[:, :, None] * dw[:, None, :]
    norms = m.flatten(1).norm(dim=1)
    err = (m - approx).flatten(1).norm(dim=1) / norms.clamp_min(1e-30)
    return (dw.reshape(ci, 1, kh, kw).to(weight.dtype), pw.reshape(co, ci, 1, 1).to(weight.dtype),
            err.to(torch.float64))


class DepthwiseSeparable(Pass):
    name = "depthwise_separable"
    semantics = Semantics.APPROXIMATE
    training = "same"
    summary = "k x k convs -> depthwise k x k + pointwise 1x1 (SVD-factorised init), ~k*k fewer MACs"
    options = {
        "budget": Option(float, float("inf"), "relative L2 error of the outputs allowed (default: measured and "
                                              "reported; the rewrite is meant to be fine-tuned)", min=0.0),
        "init": Option(str, "factorize", "factorize the original weights (rank-1 SVD per input channel) or "
                                         "PyTorch's random init", choices=("factorize", "random")),
        "between": Option(str, "none", "what goes between depthwise and pointwise (MobileNet: bn_relu)",
                          choices=("none", "bn", "bn_relu", "bn_relu6")),
        "include": Option(list, [], "module-path globs to rewrite (empty: all)"),
        "exclude": Option(list, [], "module-path globs to leave alone"),
        "min_channels": Option(int, 16, "rewrite only convs with at least this many input channels", min=1),
        "kernel_sizes": Option(list, [], "rewrite only these (square) kernel sizes (empty: any k > 1)", item=int),
        "reconstruct": Option(int, 0, "fit depthwise and pointwise weights to the original conv's outputs on N "
                                      "calibration batches from data() (alternating least squares; 0: off; "
                                      "between=none only)", min=0),
        "refine": Option(int, 256, "with reconstruct: then N Adam steps on the depthwise and pointwise weights "
                                   "regressing the model's outputs onto the original's on the same batches "
                                   "(0: off)", min=0),
        "calibrate": Option(int, 4, "between=bn_relu*: batches used to place the activation's linear region",
                            min=1),
    }

    def _candidate(self, path: str, mod: nn.Module) -> str | None:
        """The reason not to rewrite (before the include/exclude globs), or None."""
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            return "transposed convolution: not supported"
        if isinstance(mod, (nn.Conv1d, nn.Conv3d)):
            return f"{type(mod).__name__}: only Conv2d is rewritten"
        if mod.groups != 1:
            kind = "depthwise" if mod.groups == mod.in_channels else f"grouped (groups={mod.groups})"
            return f"{kind} conv: already factorised over channels"
        kh, kw = mod.kernel_size
        if kh * kw == 1:
            return "1x1 conv: nothing to separate"
        if mod.in_channels < self.config["min_channels"]:
            return (f"{mod.in_channels} input channels < min_channels={self.config['min_channels']} (one "
                    "depthwise filter per input channel would keep too little)")
        ks = self.config["kernel_sizes"]
        if ks and not (kh == kw and kh in ks):
            return f"kernel {kh}x{kw} not in kernel_sizes={'|'.join(map(str, ks))}"
        co, ci = mod.out_channels, mod.in_channels
        if ci * kh * kw + co * ci >= co * ci * kh * kw:
            return f"the pair would not be smaller ({ci * kh * kw + co * ci} >= {co * ci * kh * kw} weights)"
        return None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.config["between"] != "none":  # the second semantic axis depends on this option
            self.training, self.training_reason = "changes", "between=bn*: the inserted BatchNorms use batch statistics"

    def call(self, gm: fx.GraphModule) -> PassResult:
        rewrites: list[Rewrite] = []
        original = None
        if self.config["reconstruct"]:
            from graphopt.ir import copy_graph
            from graphopt.recover import require_data

            require_data(gm, self.name)
            original = copy_graph(gm)
        sites, declined = candidate_sites(gm, nn.modules.conv._ConvNd, include=self.config["include"],
                                          exclude=self.config["exclude"], reject=self._candidate)
        between = self.config["between"]
        eps = 1e-5
        done: list[dict[str, Any]] = []
        tot = {"macs_before": 0, "macs_after": 0, "params_before": 0, "params_after": 0}
        errors: list[float] = []
        for site in sites:
            path, conv, nodes = site.path, site.module, site.nodes
            co, ci = conv.out_channels, conv.in_channels
            kh, kw = conv.kernel_size
            dw = nn.Conv2d(ci, ci, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                           dilation=conv.dilation, groups=ci, bias=False, padding_mode=conv.padding_mode)
            pw = nn.Conv2d(ci, co, 1, bias=conv.bias is not None)
            dw, pw = dw.to(conv.weight.device, conv.weight.dtype), pw.to(conv.weight.device, conv.weight.dtype)
            layer_err = None
            with torch.no_grad():
                if self.config["init"] == "factorize":
                    d, p, per_channel = factorize(conv.weight)
                    dw.weight.copy_(d)
                    pw.weight.copy_(p)
                    w64 = conv.weight.detach().double()
                    approx = (p.double().reshape(co, ci, 1) * d.double().reshape(1, ci, kh * kw)).reshape(w64.shape)
                    layer_err = ((w64 - approx).norm() / w64.norm().clamp_min(1e-30)).item()
                    errors.append(layer_err)
                if conv.bias is not None:
                    pw.bias.copy_(conv.bias)
            holder = nn.Module()
            holder.add_module("dw", dw)
            bn = None
            if between != "none":
                bn = nn.BatchNorm2d(ci, eps=eps).to(conv.weight.device, conv.weight.dtype)
                with torch.no_grad():
                    bn.weight.fill_(math.sqrt(1.0 + eps))  # identity in eval mode (running stats 0 / 1)
                holder.add_module("bn", bn)
            holder.add_module("pw", pw)
            replace_module(gm, path, holder)
            for node in nodes:
                with gm.graph.inserting_before(node):
                    cur = gm.graph.call_module(f"{path}.dw", node.args[:1])
                    mid = cur
                    if bn is not None:
                        mid = gm.graph.call_module(f"{path}.bn", (cur,))
                    out = gm.graph.call_module(f"{path}.pw", (mid,))
                out.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "nn_module_stack")})
                node.replace_all_uses_with(out)
                gm.graph.erase_node(node)
            # cost: per call site, from the output shape
            oshape = output_shape(nodes[0]) or (1, co, 1, 1)
            positions = sum(int(math.prod(output_shape(n)[2:])) * output_shape(n)[0] for n in nodes
                            if output_shape(n) is not None) or int(math.prod(oshape[2:]))
            macs_b, macs_a = co * ci * kh * kw * positions, (ci * kh * kw + co * ci) * positions
            bias = co if conv.bias is not None else 0
            params_b = co * ci * kh * kw + bias
            params_a = ci * kh * kw + co * ci + bias + (2 * ci if bn is not None else 0)
            for k, v in zip(tot, (macs_b, macs_a, params_b, params_a)):
                tot[k] += v
            data = {"kernel": [kh, kw], "in_channels": ci, "out_channels": co, "macs_before": macs_b,
                    "macs_after": macs_a, "mac_reduction": round(macs_b / macs_a, 3), "params_before": params_b,
                    "params_after": params_a, "reconstruction_error": layer_err}
            done.append({"path": path, "bn": bn, "nodes": nodes})
            rewrites.append(Rewrite(path, (
                f"Conv2d({ci}, {co}, {kh}x{kw}) -> depthwise {kh}x{kw} + pointwise 1x1"
                + (f" with {between}" if between != "none" else "") + f": MACs / {macs_b / macs_a:.1f}"
                + (f", weight reconstruction error {layer_err:.3f}" if layer_err is not None else "")), data))
        if not done:
            return PassResult(gm, False, rewrites, declined)
        gm.recompile()
        notes: dict[str, Any] = {
            "layers": len(done), "init": self.config["init"], "between": between, **tot,
            "mac_reduction": round(tot["macs_before"] / max(tot["macs_after"], 1), 3),
            "param_reduction": round(tot["params_before"] / max(tot["params_after"], 1), 3),
        }
        if errors:
            notes["reconstruction_error"] = {"mean": sum(errors) / len(errors), "max": max(errors),
                                             "min": min(errors)}
        if between in ("bn_relu", "bn_relu6"):
            notes["calibration_batches"] = self._linear_region(gm, done, between)
        if original is not None:
            if between != "none":
                notes["reconstruction"] = f"not done: reconstruct needs between=none (got {between})"
            else:
                from graphopt.ir import calibration_batches
                from graphopt.recover import reconstruct_separable

                batches = list(calibration_batches(gm, self.config["reconstruct"]))
                fits = reconstruct_separable(original, gm, [(d["path"], f"{d['path']}.dw", f"{d['path']}.pw")
                                                            for d in done], batches)
                if self.config["refine"]:
                    from graphopt.recover import refine_outputs

                    fits.append(refine_outputs(original, gm, batches, steps=self.config["refine"],
                                               params=[f"{d['path']}.{k}" for d in done for k in ("dw", "pw")]))
                notes["reconstruction"] = [f.as_dict() for f in fits]
        return PassResult(gm, True, rewrites, declined, notes=notes)

    def _linear_region(self, gm: fx.GraphModule, done: list[dict[str, Any]], between: str) -> int:
        """Observe each depthwise output's range (eval mode, the pair is still linear), then set
        BN (alpha*z + t) so the range lands in the activation's linear region, compensate in the
        pointwise conv, and insert the activation."""
        lo: dict[str, torch.Tensor] = {}
        hi: dict[str, torch.Tensor] = {}
        hooks = []
        for d in done:
            def hook(module: nn.Module, args: Any, out: torch.Tensor, key: str = d["path"]) -> None:
                z = out.detach().transpose(0, 1).flatten(1)
                mn, mx = z.min(1).values, z.max(1).values
                lo[key] = torch.minimum(lo[key], mn) if key in lo else mn
                hi[key] = torch.maximum(hi[key], mx) if key in hi else mx
            hooks.append(gm.get_submodule(f"{d['path']}.dw").register_forward_hook(hook))
        try:
            batches = run_calibration(gm, self.config["calibrate"])
        finally:
            for h in hooks:
                h.remove()
        for d in done:
            path, bn = d["path"], d["bn"]
            if path not in lo:
                continue
            mn, mx = lo[path].double(), hi[path].double()
            span = (mx - mn).clamp_min(1e-6)
            if between == "bn_relu":
                alpha = torch.ones_like(mn)
                shift = torch.where(mn < 0, -mn + 0.05 * span, torch.zeros_like(mn))
            else:  # relu6: alpha*[mn, mx] + t inside [0.3, 5.75]
                alpha = 6.0 / (1.1 * span)
                shift = -alpha * mn + 0.3
            pw = gm.get_submodule(f"{path}.pw")
            with torch.no_grad():
                bn.weight.copy_(alpha * math.sqrt(1.0 + bn.eps))
                bn.bias.copy_(shift)
                w = pw.weight.double() / alpha.reshape(1, -1, 1, 1)
                correction = (w.flatten(1) * shift.reshape(1, -1)).sum(1)
                pw.weight.copy_(w)
                if pw.bias is None:
                    pw.bias = nn.Parameter(torch.zeros(pw.out_channels, dtype=pw.weight.dtype,
                                                       device=pw.weight.device))
                pw.bias.sub_(correction.to(pw.bias.dtype))
            holder = gm.get_submodule(path)
            act = nn.ReLU() if between == "bn_relu" else nn.ReLU6()
            holder.add_module("act", act)
            for node in list(gm.graph.nodes):
                if node.op == "call_module" and str(node.target) == f"{path}.bn":
                    with gm.graph.inserting_after(node):
                        a = gm.graph.call_module(f"{path}.act", (node,))
                    node.replace_all_uses_with(a, delete_user_cb=lambda u, a=a: u is not a)
        gm.recompile()
        return batches

    def check(self, before: fx.GraphModule, after: fx.GraphModule, inputs: tuple[torch.Tensor, ...],
              result: PassResult) -> dict[str, Any]:
        """The same rewrite with random init, for comparison (factorised init only)."""
        if self.config["init"] != "factorize":
            return {}
        alt = DepthwiseSeparable(**{**self.config, "init": "random"})
        with torch.random.fork_rng():
            torch.manual_seed(0)
            rnd = alt.call(copy_graph(before)).gm
        ref, _ = run_with_grads(before, inputs, False)
        fac, _ = run_with_grads(after, inputs, False)
        ran, _ = run_with_grads(rnd, inputs, False)
        return {"output_rel_l2_error_factorize": rel_l2_error(fac, ref),
                "output_rel_l2_error_random_init": rel_l2_error(ran, ref)}
