"""mixed_precision: compute-heavy ops in float16/bfloat16 inside the graph (APPROXIMATE).

The rewrite torch.autocast does at run time, done once on the graph so it can be read,
shipped and trained without a context manager:

- conv, linear, matmul/bmm, scaled-dot-product and multi-head attention run in the low dtype;
  their float32 inputs are cast down at the boundary of the low-precision region;
- parameters stay float32 (they are the master weights): ``nn.Conv2d``/``nn.Linear``/
  ``nn.MultiheadAttention`` calls become the functional op on ``weight.to(dtype)`` inside
  the graph, so the optimizer steps float32 weights and the cast's backward returns float32
  gradients;
- softmax, log-softmax, layer/group norm, reductions, losses, exp/log/pow stay float32 (their
  half inputs are cast up); BatchNorm keeps float32 statistics and parameters and takes the
  half activation directly (the mixed kernel computes in float32), as under autocast;
- elementwise, pooling and shape ops run in whatever dtype reaches them, so a conv-BN-ReLU
  chain stays in half between convolutions and a float32 residual stream stays float32;
- graph outputs are cast back to their original dtype (autocast would return half).

A cleanup removes redundant casts; the report counts casts inserted and removed. float16
graphs record that they need dynamic loss scaling (``torch.amp.GradScaler``); bfloat16 does not.
See :mod:`graphopt.precision.sweep` for the op lists and how they differ from torch.autocast.
"""

from __future__ import annotations

from torch import fx

from graphopt import Decline, Option, Pass, PassResult, Semantics
from graphopt.ir import graph_meta
from graphopt.precision import PrecisionPass, PrecisionSweep

DEFAULT_BUDGET = 0.05


class MixedPrecision(PrecisionPass, Pass):
    name = "mixed_precision"
    mode = "mixed"
    semantics = Semantics.APPROXIMATE
    training = "same"
    summary = "conv/linear/matmul/attention in float16 or bfloat16 with float32 master weights, casts in the graph"
    options = {
        "dtype": Option(str, "float16", "the low-precision dtype", choices=("float16", "bfloat16")),
        "budget": Option(float, DEFAULT_BUDGET, "relative L2 output error allowed vs the float32 graph",
                         min=0.0),
        "autocast_factor": Option(float, 2.0, "graphopt's error vs a float64 reference may be at most this "
                                              "many times torch.autocast's (outputs and gradients)", min=1.0),
        "batchnorm": Option(str, "mixed", "mixed: half activations in/out, float32 statistics (autocast); "
                                          "float32: cast around BatchNorm", choices=("mixed", "float32")),
        "cast_outputs": Option(bool, True, "cast half graph outputs back to their original dtype"),
        "exclude": Option(list, [], "module paths (globs) kept in float32, e.g. 'fc|layer4.*'"),
    }

    def call(self, gm: fx.GraphModule) -> PassResult:
        dtype = self.dtype
        res, casts, modified = self.sweep(gm, PrecisionSweep(
            gm, dtype, "mixed", batchnorm=self.config["batchnorm"], cast_outputs=self.config["cast_outputs"],
            exclude=self.config["exclude"]))
        if not res.low_ops:
            res.declined.append(Decline("graph", "no conv, linear, matmul or attention op: nothing gains "
                                                 "from low precision"))
        return self.finish(gm, res, modified, res.fp32_ops, modified or bool(res.low_ops), {
            "low_precision_ops": dict(sorted(res.low_ops.items())),
            "float32_ops": dict(sorted(res.fp32_ops.items())),
            "batchnorm_mixed": res.mixed_bn,
            "modules_to_functional": res.modules_converted,
            "casts": {**casts, "parameter_casts": res.param_casts},
        })

    def ensures(self, gm: fx.GraphModule) -> None:
        for name, p in gm.named_parameters():
            assert p.dtype != self.dtype, f"parameter {name} is not float32 any more"
        assert graph_meta(gm).get("precision") is not None or not any(
            n.op == "call_method" and n.target == "to" for n in gm.graph.nodes), "casts without a policy"
