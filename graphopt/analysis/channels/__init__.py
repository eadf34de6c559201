"""Channel dependency analysis: which channels must be pruned together, and where they live.

- :mod:`.ops`: tables of functions/methods by how they treat the channel axis;
- :mod:`.unionfind`: the union-find that ties channels together;
- :mod:`.graph`: the result (:class:`ChannelGraph`: groups, members to slice, constraints) and
  its MAC model;
- :mod:`.rules`: per-layer channel rules (propagation and slicing) and their registry;
- :mod:`.analyzer`: the pass over the graph (:func:`analyze_channels`).
"""

from __future__ import annotations

from graphopt.analysis.channels.analyzer import ChannelAnalysis, analyze_channels
from graphopt.analysis.channels.graph import (
    ChanInfo, ChannelGraph, ChannelGroup, Constraint, MacEntry, Member,
)
from graphopt.analysis.channels.rules import (
    ChannelRule, Relation, channel_rule_for, channel_rules, register_channel_rule, unregister_channel_rule,
)

__all__ = ["ChanInfo", "Member", "Constraint", "ChannelGroup", "ChannelGraph", "MacEntry", "ChannelAnalysis",
           "analyze_channels", "ChannelRule", "Relation", "register_channel_rule", "unregister_channel_rule",
           "channel_rule_for", "channel_rules"]
