"""cast: pure half precision -- parameters and activations in float16/bfloat16 (APPROXIMATE).

Every parameter and floating buffer is stored in the low dtype (norm layers keep float32 with
``keep_norms=true``, the default), floating graph inputs are cast down on entry and outputs back
to their original dtype on exit. Activations are half throughout: a float32 value that appears
inside the graph (a kept-float32 LayerNorm/GroupNorm, a float32 constant promoting an add) is
cast back to half right away; BatchNorm with float32 statistics takes and returns half
activations (its mixed kernel computes in float32). Opaque (untraced) modules keep float32
parameters and get float32 inputs.

Half parameters cannot be trained directly (updates smaller than half's resolution vanish): the
recorded policy says ``master_weights=true`` and the training harness keeps float32 master
copies (:class:`graphopt.precision.MasterWeights`); float16 also needs dynamic loss scaling.
Use ``mixed_precision`` unless memory for the parameters themselves matters.
"""

from __future__ import annotations

from torch import fx

from graphopt import Decline, Option, Pass, PassResult, Semantics
from graphopt.ir import graph_meta
from graphopt.precision import LOW_FUNCS, PrecisionPass, PrecisionSweep, is_norm_module


class Cast(PrecisionPass, Pass):
    name = "cast"
    mode = "half"
    semantics = Semantics.APPROXIMATE
    training = "same"
    summary = "pure float16/bfloat16: parameters and activations in half (norms float32 by default)"
    options = {
        "dtype": Option(str, "float16", "the half dtype", choices=("float16", "bfloat16")),
        "budget": Option(float, 0.1, "relative L2 output error allowed vs the float32 graph", min=0.0),
        "autocast_factor": Option(float, 4.0, "the error vs a float64 reference may be at most this many "
                                              "times torch.autocast's (outputs and gradients)", min=1.0),
        "keep_norms": Option(bool, True, "keep BatchNorm/LayerNorm/GroupNorm parameters and math in float32"),
        "cast_outputs": Option(bool, True, "cast half graph outputs back to their original dtype"),
    }

    def call(self, gm: fx.GraphModule) -> PassResult:
        dtype = self.dtype
        opaque = set(graph_meta(gm).get("opaque", {}))
        has_params = any(t.is_floating_point() for n, t in list(gm.named_parameters()) + list(gm.named_buffers())
                         if not any(n.startswith(o + ".") for o in opaque))
        heavy = any(n.op == "call_function" and n.target in LOW_FUNCS for n in gm.graph.nodes)
        if not has_params and not heavy:
            return PassResult(gm, False, declined=[Decline(
                "graph", "no floating parameters and no conv/linear/matmul/attention op: nothing to store or "
                         "compute in half")])
        sweep = PrecisionSweep(gm, dtype, "half", keep_norms=self.config["keep_norms"],
                               cast_outputs=self.config["cast_outputs"])
        sweep.convert_parameters()
        res, casts, modified = self.sweep(gm, sweep)
        kept = sorted({type(m).__name__ for m in gm.modules() if self.config["keep_norms"] and is_norm_module(m)})
        return self.finish(gm, res, modified, kept, modified or any(p.dtype == dtype for p in gm.parameters()), {
            "parameters_converted": res.params_converted,
            "float32_ops": dict(sorted(res.fp32_ops.items())),
            "batchnorm_mixed": res.mixed_bn,
            "casts": casts,
        })
