"""Analyses over the IR: the cost model and graph views."""

from graphopt.analysis.cost import GraphCost, NodeCost, annotate, graph_cost
from graphopt.analysis.graph import to_networkx

__all__ = ["GraphCost", "NodeCost", "annotate", "graph_cost", "to_networkx"]
