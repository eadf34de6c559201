"""Pipeline stages from a partitioned graph, and in-process model parallelism (``device_map``).

:func:`split_stages` turns a graph annotated by the ``partition`` pass into one
``GraphModule`` per stage with ``torch.fx.passes.split_module``, then gives every stage the
*sequential* interface a pipeline needs:

- stage 0 takes the model's inputs; stage ``i > 0`` takes, positionally, the tuple stage
  ``i-1`` returns;
- a non-last stage returns a tuple of every value still needed later, in graph order,
  including values it only passes through (a residual skip tensor that crosses two cuts);
- the last stage returns what the model returns.

(``split_module`` alone wires a value from stage 0 straight into stage 2; a pipeline can only
send to the next stage, hence the pass-through.)

:class:`SequentialStages` chains the stages in one process, each on its own device if asked:
that is ``device_map`` model parallelism for a model that does not fit one GPU.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module

from graphopt.analysis.cost import annotate
from graphopt.analysis.profile import COMPUTE_OPS
from graphopt.errors import PreconditionError
from graphopt.ir import eval_mode, node_values, tensor_specs

__all__ = ["partition_plan", "split_stages", "stage_example_inputs", "SequentialStages", "device_map",
           "resolve_devices"]

_TAG = "graphopt_src_name"


def partition_plan(gm: fx.GraphModule) -> dict[str, Any]:
    """The plan the ``partition`` pass recorded, checked against the graph as it is now."""
    plan = gm.meta.get("graphopt", {}).get("partition") if hasattr(gm, "meta") else None
    if not plan:
        raise PreconditionError("the graph has no pipeline partition",
                                fix="run the partition pass first, e.g. -p partition:stages=2")
    last = 0
    for node in gm.graph.nodes:
        stage = node.meta.get("stage", plan.get("assignment", {}).get(node.name))
        if stage is None:
            raise PreconditionError(f"node '{node.name}' has no stage: the graph changed after partitioning",
                                    fix="put the partition pass last in the pipeline")
        if node.op in COMPUTE_OPS:
            if stage < last:
                raise PreconditionError(f"node '{node.name}' goes back to stage {stage} after stage {last}",
                                        fix="put the partition pass last in the pipeline")
            last = stage
        node.meta["stage"] = stage
    return plan


def stage_example_inputs(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> list[tuple[Any, ...]]:
    """Each stage's inputs when the whole graph runs on ``inputs`` (eval mode, no grad)."""
    plan = partition_plan(gm)
    with eval_mode(gm):
        values = node_values(gm, inputs)
    return [tuple(values[name] for name in d["inputs"]) for d in plan["stage_detail"]]


def split_stages(gm: fx.GraphModule, inputs: Sequence[torch.Tensor] | None = None) -> list[fx.GraphModule]:
    """One GraphModule per stage (see the module docstring for the interface).

    ``inputs``: the model's example inputs (default: the graph's); used to annotate every stage
    with shapes and costs and to store its own example inputs in its meta.
    """
    plan = partition_plan(gm)
    n_stages = int(plan["stages"])
    details = plan["stage_detail"]
    orig = {n.name: n for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        node.meta[_TAG] = node.name
    try:
        split = split_module(gm, gm, lambda node: int(node.meta["stage"]))
    finally:
        for node in gm.graph.nodes:
            node.meta.pop(_TAG, None)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    meta = gm.meta.get("graphopt", {})
    if inputs is None:
        inputs = meta.get("example_inputs")
    examples = stage_example_inputs(gm, inputs) if inputs is not None else [None] * n_stages

    stages: list[fx.GraphModule] = []
    for i in range(n_stages):
        sub: fx.GraphModule = getattr(split, f"submod_{i}")
        graph = fx.Graph()
        env: dict[str, fx.Node] = {}
        for name in details[i]["inputs"]:
            ph = graph.placeholder(name)
            ph.meta = {k: v for k, v in orig[name].meta.items() if k in ("tensor_meta", "cost", "val_shape")}
            env[name] = ph
        val_map: dict[fx.Node, fx.Node] = {}
        for node in sub.graph.nodes:
            src = node.meta.get(_TAG)
            if node.op == "placeholder":
                val_map[node] = env[src]
            elif node.op == "output":
                continue
            else:
                new = graph.node_copy(node, lambda a: val_map[a])
                new.meta.pop(_TAG, None)
                val_map[node] = new
                if src is not None:
                    env[src] = new
        if i == n_stages - 1:
            result = fx.node.map_arg(out_node.args[0], lambda a: env[a.name])
        else:
            result = tuple(env[name] for name in details[i]["outputs"])
        graph.output(result)
        graph.lint()
        stage = fx.GraphModule(sub, graph, f"Stage{i}")
        smeta = stage.meta.setdefault("graphopt", {})
        called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
        src_class = meta.get("source_class", "Model")
        smeta.update({
            "source_class": f"{src_class}Stage{i}",
            "opaque": {k: v for k, v in meta.get("opaque", {}).items() if k in called},
            "memory_format": meta.get("memory_format"),
            "precision": meta.get("precision"),
            "stage": {"index": i, "stages": n_stages, "inputs": details[i]["inputs"],
                      "outputs": details[i]["outputs"]},
        })
        stage.train(gm.training)
        if examples[i] is not None:
            ex = tuple(examples[i])
            smeta["example_inputs"] = ex
            smeta["inputs"] = tensor_specs(ex)
            smeta["cost"] = annotate(stage, ex)
        stages.append(stage)
    return stages


def resolve_devices(devices: Iterable[str | torch.device] | str, n: int) -> list[torch.device]:
    """``"auto"``: stage i on ``cuda:(i % device_count)`` (CPU without CUDA); or an explicit list
    of n devices."""
    if isinstance(devices, str):
        if devices != "auto":
            devices = [d.strip() for d in devices.split(",") if d.strip()]
        elif torch.cuda.is_available():
            return [torch.device(f"cuda:{i % torch.cuda.device_count()}") for i in range(n)]
        else:
            return [torch.device("cpu")] * n
    out = [torch.device(d) for d in devices]
    if len(out) != n:
        raise PreconditionError(f"{len(out)} devices given for {n} stages", fix=f"give {n} devices, or 'auto'")
    for d in out:
        if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
            raise PreconditionError(f"device {d} is not available", where="device_map",
                                    fix="list devices this machine has (torch.cuda.device_count())")
    return out


class SequentialStages(nn.Module):
    """The stages chained in one process; stage ``i`` runs on ``devices[i]``.

    Activations move to the next stage's device (differentiably), so ``loss.backward()`` and
    any optimizer work as on one device. Outputs stay on the last stage's device.
    """

    def __init__(self, stages: Sequence[nn.Module], devices: Sequence[torch.device | str | None] | None = None):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.devices = [torch.device(d) if d is not None else None for d in (devices or [None] * len(stages))]
        if len(self.devices) != len(self.stages):
            raise PreconditionError(f"{len(self.devices)} devices for {len(self.stages)} stages")
        for stage, dev in zip(self.stages, self.devices):
            if dev is not None:
                stage.to(dev)

    def forward(self, *inputs: Any) -> Any:
        xs: tuple[Any, ...] = inputs
        out: Any = None
        last = len(self.stages) - 1
        for i, (stage, dev) in enumerate(zip(self.stages, self.devices)):
            if dev is not None:
                xs = tuple(x.to(dev) if isinstance(x, torch.Tensor) else x for x in xs)
            out = stage(*xs)
            if i < last:
                xs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return out


def device_map(model: fx.GraphModule | Sequence[nn.Module], devices: Iterable[str | torch.device] | str = "auto"
               ) -> SequentialStages:
    """Model parallelism in one process: a partitioned graph (or its stages) placed on devices.

    ``devices``: one per stage (``["cuda:0", "cuda:1"]``), ``"cuda:0,cuda:1"``, or ``"auto"``
    (stage i on GPU ``i % device_count``; CPU when there is no GPU). Stages run one after the
    other (no pipelining): this is for a model whose weights and activations do not fit one
    device, not for speed.
    """
    stages = split_stages(model) if isinstance(model, fx.GraphModule) else list(model)
    return SequentialStages(stages, resolve_devices(devices, len(stages)))
