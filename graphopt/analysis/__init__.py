"""Analyses over the IR: the cost model, graph views and the channel analysis (with its rule registry)."""

from __future__ import annotations

from graphopt.analysis.channels import (
    ChannelGraph, ChannelGroup, ChannelRule, Relation, analyze_channels, channel_rule_for, register_channel_rule,
    unregister_channel_rule,
)
from graphopt.analysis.cost import GraphCost, NodeCost, annotate, graph_cost
from graphopt.analysis.graph import to_networkx

__all__ = ["GraphCost", "NodeCost", "annotate", "graph_cost", "to_networkx", "ChannelGraph", "ChannelGroup",
           "ChannelRule", "Relation", "analyze_channels", "channel_rule_for", "register_channel_rule",
           "unregister_channel_rule"]
