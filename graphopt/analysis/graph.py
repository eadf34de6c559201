"""networkx views of the IR, for the graph algorithms of later passes (pruning, partitioning)."""

from __future__ import annotations

import networkx as nx
from torch import fx

from graphopt.analysis.cost import NodeCost, module_summary

__all__ = ["to_networkx"]


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A DiGraph with one vertex per fx node (keyed by node name).

    Vertex attributes: ``node`` (the fx.Node), ``op``, ``target``, ``kind`` (module class or
    function name), ``shape``, ``macs``, ``params``, ``out_bytes``. Edge ``u -> v`` means v
    reads u's output; its ``bytes`` attribute is the size of that tensor.
    """
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        cost: NodeCost = node.meta.get("cost") or NodeCost()
        tm = node.meta.get("tensor_meta")
        shape = tuple(tm.shape) if hasattr(tm, "shape") else None
        g.add_node(node.name, node=node, op=node.op, target=str(node.target),
                   kind=module_summary(gm, node), shape=shape, macs=cost.macs,
                   params=cost.params, out_bytes=cost.out_bytes)
    for node in gm.graph.nodes:
        cost = node.meta.get("cost") or NodeCost()
        for user in node.users:
            g.add_edge(node.name, user.name, bytes=cost.out_bytes)
    return g
