"""channels_last: run 4-D activations and conv weights in NHWC memory format (EXACT).

Convolutions, BatchNorm and pooling have faster NHWC kernels on tensor-core GPUs (cuDNN) and on
oneDNN CPUs. The rewrite changes only memory layout, never values:

- every 4-D graph input that reaches a convolution is converted with
  ``x.contiguous(memory_format=torch.channels_last)``; later ops propagate the format;
- every 4-D parameter/buffer of a Conv2d is stored channels_last, and the graph records
  ``memory_format = "channels_last"`` so the emitted module converts itself on construction.

Declined: inputs that are not 4-D, graphs without a 2-D convolution (nothing to gain).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from graphopt.ir import graph_meta, output_shape
from graphopt.pass_infra import Decline, Pass, PassResult, Rewrite, Semantics


def _is_marker(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "contiguous"
            and node.kwargs.get("memory_format") is torch.channels_last)


class ChannelsLast(Pass):
    name = "channels_last"
    semantics = Semantics.EXACT
    training = "same"
    summary = "NHWC memory format for 4-D activations and conv weights (faster conv kernels)"
    options = {}

    def call(self, gm: fx.GraphModule) -> PassResult:
        convs = [n for n in gm.graph.nodes if n.op == "call_module"
                 and isinstance(gm.get_submodule(n.target), nn.Conv2d)]
        convs += [n for n in gm.graph.nodes if n.op == "call_function"
                  and n.target is torch.nn.functional.conv2d]
        if not convs:
            return PassResult(gm, False, declined=[Decline(
                "graph", "no 2-D convolution: channels_last only speeds up conv/BN/pooling on NCHW tensors")])
        rewrites: list[Rewrite] = []
        declined: list[Decline] = []
        for ph in [n for n in gm.graph.nodes if n.op == "placeholder"]:
            shape = output_shape(ph)
            if shape is None or len(shape) != 4:
                declined.append(Decline(ph.name, f"input is {len(shape) if shape else 'not a'}-D "
                                                 "tensor; channels_last applies to 4-D NCHW inputs"))
                continue
            if any(_is_marker(u) for u in ph.users):
                continue  # already converted (idempotent)
            with gm.graph.inserting_after(ph):
                cl = gm.graph.call_method("contiguous", (ph,), {"memory_format": torch.channels_last})
            ph.replace_all_uses_with(cl, delete_user_cb=lambda u: u is not cl)
            cl.meta.update({k: v for k, v in ph.meta.items() if k in ("tensor_meta", "cost")})
            rewrites.append(Rewrite(ph.name, f"input {tuple(shape)} converted to channels_last"))
        converted = 0
        for mod_name, mod in gm.named_modules():
            if not isinstance(mod, nn.Conv2d):
                continue
            for pname, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
                    converted += 1
                    rewrites.append(Rewrite(f"{mod_name}.{pname}", "weight stored channels_last"))
        if rewrites:
            graph_meta(gm)["memory_format"] = "channels_last"
            gm.recompile()
        return PassResult(gm, bool(rewrites), rewrites, declined,
                          notes={"inputs_converted": sum(1 for r in rewrites if "input" in r.detail),
                                 "weights_converted": converted})

    def ensures(self, gm: fx.GraphModule) -> None:
        for mod in gm.modules():
            if isinstance(mod, nn.Conv2d):
                assert mod.weight.is_contiguous(memory_format=torch.channels_last), "conv weight not NHWC"
