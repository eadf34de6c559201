"""channels_last: run 4-D activations and conv weights in NHWC memory format (EXACT).

Convolutions, BatchNorm and pooling have faster NHWC kernels on tensor-core GPUs (cuDNN) and on
oneDNN CPUs. The rewrite changes only memory layout, never values:

- every 4-D graph input that reaches a convolution is converted with
  ``x.contiguous(memory_format=torch.channels_last)``; later ops propagate the format;
- every 4-D parameter/buffer of a Conv2d is stored channels_last, and the graph records
  ``memory_format = "channels_last"`` so the emitted module converts itself on construction.

Opaque (untraced) submodules are left exactly as they were: the pass cannot see what their code
does with memory layout (a ``view`` of a whole sample, a kernel written for NCHW), so their convs
keep their layout (declined) and every 4-D tensor entering them is made NCHW-contiguous again
(``x.contiguous()``, a copy at the boundary, recorded as a rewrite): inside, they compute exactly
what they computed before.

Declined: inputs that are not 4-D, graphs without a 2-D convolution (nothing to gain), convs
inside opaque submodules, convs whose weight is computed at run time (a parametrization such as
weight norm: there is no stored weight to convert).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import fx, nn

from graphopt import Decline, Option, Pass, PassResult, Rewrite, Semantics
from graphopt.ir import graph_meta, is_module, name_matches, output_shape


def _is_marker(node: fx.Node, fmt: torch.memory_format = torch.channels_last) -> bool:
    return (node.op == "call_method" and node.target == "contiguous"
            and node.kwargs.get("memory_format") is fmt)


def _owner(path: str, opaque: set[str]) -> str | None:
    """The opaque module ``path`` is (inside), else None."""
    return next((o for o in sorted(opaque) if path == o or path.startswith(o + ".")), None)


def _convertible(gm: fx.GraphModule, opaque: set[str],
                 exclude: list[str] | None = None) -> Iterator[tuple[str, nn.Conv2d, str | None]]:
    """Every Conv2d of ``gm`` with the reason not to convert it (None: convert)."""
    for path, mod in gm.named_modules():
        if not isinstance(mod, nn.Conv2d):
            continue
        owner = _owner(path, opaque)
        if exclude and name_matches(path, exclude):
            yield path, mod, "excluded by the 'exclude' option (weights keep their layout)"
        elif owner is not None:
            yield path, mod, (f"inside the opaque (untraced) module '{owner}': its layout is left as it was "
                              "(the pass cannot see how its code uses memory)")
        elif not isinstance(dict(mod.named_parameters(recurse=False)).get("weight"), nn.Parameter):
            yield path, mod, "weight computed at run time (a parametrization such as weight norm): nothing stored to convert"
        else:
            yield path, mod, None


class ChannelsLast(Pass):
    name = "channels_last"
    semantics = Semantics.EXACT
    training = "same"
    summary = "NHWC memory format for 4-D activations and conv weights (faster conv kernels)"
    options = {"exclude": Option(list, [], "conv module paths (globs) whose weights keep the NCHW layout, "
                                           "e.g. 'layer4.*' (a per-region layout decision)")}

    def call(self, gm: fx.GraphModule) -> PassResult:
        convs = [n for n in gm.graph.nodes if is_module(gm, n, nn.Conv2d)]
        convs += [n for n in gm.graph.nodes if n.op == "call_function"
                  and n.target is torch.nn.functional.conv2d]
        if not convs:
            return PassResult(gm, False, declined=[Decline(
                "graph", "no 2-D convolution: channels_last only speeds up conv/BN/pooling on NCHW tensors")])
        rewrites: list[Rewrite] = []
        declined: list[Decline] = []
        inputs_converted = 0
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
            inputs_converted += 1
        opaque = set(graph_meta(gm).get("opaque", {}))
        for node in [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) in opaque]:
            for arg in dict.fromkeys(node.all_input_nodes):
                shape = output_shape(arg)
                if shape is None or len(shape) != 4 or _is_marker(arg, torch.contiguous_format):
                    continue
                with gm.graph.inserting_before(node):
                    nchw = gm.graph.call_method("contiguous", (arg,), {"memory_format": torch.contiguous_format})
                node.replace_input_with(arg, nchw)
                nchw.meta.update({k: v for k, v in arg.meta.items() if k == "tensor_meta"})
                rewrites.append(Rewrite(str(node.target), f"input {arg.name} made NCHW-contiguous for the opaque "
                                                          "module (it runs as it did before)"))
        converted = 0
        for mod_name, mod, why in _convertible(gm, opaque, self.config["exclude"]):
            if why is not None:
                declined.append(Decline(mod_name, why))
                continue
            for pname, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
                    converted += 1
                    rewrites.append(Rewrite(f"{mod_name}.{pname}", "weight stored channels_last"))
        if rewrites:
            graph_meta(gm)["memory_format"] = "channels_last"
            excluded = [d.target for d in declined if d.reason.startswith("excluded by")]
            graph_meta(gm)["memory_format_kept"] = sorted(opaque | set(excluded))  # emitters leave these NCHW
            gm.recompile()
        return PassResult(gm, bool(rewrites), rewrites, declined,
                          notes={"inputs_converted": inputs_converted,
                                 "weights_converted": converted})

    def ensures(self, gm: fx.GraphModule) -> None:
        for path, mod, why in _convertible(gm, set(graph_meta(gm).get("opaque", {})), self.config["exclude"]):
            if why is None:
                assert mod.weight.is_contiguous(memory_format=torch.channels_last), f"{path}: conv weight not NHWC"
