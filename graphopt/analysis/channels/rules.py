"""Channel rules: one object per layer type says how its channels relate and how it is sliced.

A rule couples the two halves of structured pruning, as Torch-Pruning's custom-layer pruners do
(``get_in_channels`` / ``get_out_channels`` / ``prune_in_channels`` / ``prune_out_channels``):

- **propagation** (used by :func:`graphopt.analysis.analyze_channels`): :meth:`ChannelRule.relation`
  says whether the layer's output channels are its input channels (``coupled``: BatchNorm,
  depthwise conv, activations), new channels made from all of its inputs (``independent``: conv,
  linear; ``groups > 1`` adds "equal removal per group"), or something the analysis must not
  follow (``blocked``, with the reason). ``in_axis`` / ``out_axis`` say where the channels are,
  :meth:`check` may refuse one call (LayerNorm over the channel axis, a pool over channels).
- **slicing** (used by :mod:`graphopt.prune`): :meth:`prune` drops the removed positions from the
  parameters and buffers listed by :meth:`out_params` / :meth:`in_params` and updates the
  constructor attributes (:meth:`set_out_channels` / :meth:`set_in_channels`); :meth:`score`
  gives importance per channel and :meth:`mask_in_channels` builds the masked reference the
  pruned graph must equal.

Rules are looked up by the module's type along its MRO, so a subclass inherits its base's rule.
A layer type without a rule that touches a tracked channel blocks its group, with the reason.
Register your own with :func:`register_channel_rule` (a plugin does it at import time)::

    class ScaleRule(ChannelRule):            # y = x * self.scale[None, :, None, None]
        def out_params(self, module):
            return {"scale": 0}
    register_channel_rule(MyScale, ScaleRule())
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import fx, nn

from graphopt.errors import PassConfigError

if TYPE_CHECKING:
    from graphopt.analysis.channels.graph import ChanInfo

__all__ = ["Relation", "ChannelRule", "replace_tensor", "register_channel_rule", "unregister_channel_rule",
           "channel_rule_for", "channel_rule_for_name", "channel_rules", "ConvRule", "LinearRule", "BatchNormRule", "GroupNormRule",
           "LayerNormRule", "LayerNormChannelsRule", "EmbeddingRule", "TransposedLinearRule", "PassThroughRule", "PReLURule", "PoolRule", "FlattenRule", "SoftmaxRule", "BlockedRule"]

log = logging.getLogger(__name__)

ScoreFn = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Relation:
    """How a layer's output channels relate to its input channels (see the module docstring).

    ``kind``: ``coupled`` | ``independent`` | ``blocked``. ``groups`` (independent): equal removal
    in each of that many consecutive blocks of the input and of the output channels (grouped
    conv). ``units`` (coupled): channels go in whole consecutive units, ``units`` of them
    (GroupNorm's groups). ``reason`` (blocked): why, ``{name}`` is replaced by the layer's name.
    """

    kind: str
    groups: int = 1
    units: int | None = None
    reason: str = ""

    @classmethod
    def coupled(cls, units: int | None = None) -> "Relation":
        return cls("coupled", units=units)

    @classmethod
    def independent(cls, groups: int = 1) -> "Relation":
        return cls("independent", groups=groups)

    @classmethod
    def blocked(cls, reason: str) -> "Relation":
        return cls("blocked", reason=reason)


def replace_tensor(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``mod`` by ``value`` (same kind, same flags)."""
    old = getattr(mod, name)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value.detach().clone().contiguous(), requires_grad=old.requires_grad))
    else:
        mod.register_buffer(name, value.detach().clone().contiguous(),
                            persistent=name not in getattr(mod, "_non_persistent_buffers_set", set()))


def _index(keep: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(keep), dtype=torch.long)


class ChannelRule:
    """How one layer type relates its channels and how it is sliced (see the module docstring).

    The defaults describe a *coupled* layer with nothing to slice (an activation). Override:

    - ``in_axis`` / ``out_axis``: the axis of the input / output carrying channels (negative:
      from the end; ``None``: any axis, for coupled layers that act elementwise);
    - ``accepts_flattened``: the input may carry each channel as several consecutive features
      (``flatten -> Linear``); ``in`` indices given to :meth:`prune_in_channels` are then features;
    - ``norm_scale``: the per-channel scale parameter the ``bn_scale`` criterion ranks by;
    - :meth:`relation`, :meth:`get_in_channels` / :meth:`get_out_channels`, :meth:`check`;
    - :meth:`out_params` / :meth:`in_params` (``{name: axis}``) and :meth:`set_out_channels` /
      :meth:`set_in_channels`; the default :meth:`prune`, :meth:`score` and
      :meth:`mask_in_channels` work from them. Override those for layouts that need more
      (grouped convolutions).
    - :meth:`propagate`: full control over the analysis of one call (returns the output's
      channel info); ``NotImplemented`` (the default) uses the above.
    """

    in_axis: int | None = None
    out_axis: int | None = None
    accepts_flattened: bool = False
    norm_scale: str | None = None
    functional: str | None = None  # "addmm": the layer is traced as torch.addmm(bias, x, weight) on its own tensors

    # -- propagation
    def relation(self, module: nn.Module) -> Relation:
        return Relation.coupled()

    def get_in_channels(self, module: nn.Module) -> int | None:
        """The input width the layer expects (checked against the tracked tensor), or None."""
        return None

    def get_out_channels(self, module: nn.Module) -> int | None:
        return None

    def check(self, module: nn.Module, x: "ChanInfo") -> str | None:
        """A reason this call cannot be followed (the group is then not pruned), or None."""
        return None

    def propagate(self, analysis: Any, node: fx.Node, module: nn.Module) -> Any:
        """Advanced: analyse the call yourself (see :class:`FlattenRule`); ``NotImplemented`` = default."""
        return NotImplemented

    # -- slicing
    def out_params(self, module: nn.Module) -> dict[str, int]:
        """Parameters/buffers sliced with the output channels (coupled: the channels): name -> axis."""
        return {}

    def in_params(self, module: nn.Module) -> dict[str, int]:
        """Parameters/buffers sliced with the input channels (independent layers): name -> axis."""
        return {}

    def set_out_channels(self, module: nn.Module, n: int) -> None:
        """Update constructor attributes after the output channels were cut to ``n``."""

    def set_in_channels(self, module: nn.Module, n: int) -> None:
        """Update constructor attributes after the input channels were cut to ``n``."""

    def slices(self, module: nn.Module) -> bool:
        """Whether pruning this layer's channels changes anything in it."""
        return bool(self.out_params(module) or self.in_params(module))

    def _present(self, module: nn.Module, params: dict[str, int]) -> dict[str, int]:
        return {k: a for k, a in params.items() if isinstance(getattr(module, k, None), torch.Tensor)}

    def prune_out_channels(self, module: nn.Module, keep: np.ndarray) -> None:
        """Keep only output channels ``keep`` (sorted positions)."""
        for name, axis in self._present(module, self.out_params(module)).items():
            replace_tensor(module, name, getattr(module, name).detach().index_select(axis, _index(keep)))
        self.set_out_channels(module, len(keep))

    def prune_in_channels(self, module: nn.Module, keep: np.ndarray) -> None:
        """Keep only input channels (features, for flattened inputs) ``keep``."""
        for name, axis in self._present(module, self.in_params(module)).items():
            replace_tensor(module, name, getattr(module, name).detach().index_select(axis, _index(keep)))
        self.set_in_channels(module, len(keep))

    def prune(self, module: nn.Module, out_keep: np.ndarray | None, in_keep: np.ndarray | None) -> None:
        """Slice the layer; ``None`` leaves that side whole. Coupled layers get the same ``keep`` twice."""
        coupled = self.relation(module).kind == "coupled"
        if out_keep is not None:
            self.prune_out_channels(module, out_keep)
        if in_keep is not None and not coupled:
            self.prune_in_channels(module, in_keep)

    def score(self, module: nn.Module, role: str, fn: ScoreFn, prefix: str, norms_only: bool = False
              ) -> torch.Tensor | None:
        """Importance per position of the ``out`` / ``in`` / ``coupled`` channels (features for a
        flattened input): ``fn(param_name, tensor)`` summed over every other axis, over the
        parameters (not buffers) the channels slice. ``norms_only``:
        only :attr:`norm_scale` (the ``bn_scale`` criterion); None when nothing scores."""
        if norms_only:
            if self.norm_scale is None or role == "in":
                return None
            t = getattr(module, self.norm_scale, None)
            return fn(f"{prefix}{self.norm_scale}", t) if isinstance(t, torch.Tensor) else None
        params = self._present(module, self.in_params(module) if role == "in" else self.out_params(module))
        out = None
        for name, axis in params.items():
            t = getattr(module, name)
            if not isinstance(t, nn.Parameter) or not t.is_floating_point():
                continue  # buffers (running statistics) carry no importance
            s = fn(f"{prefix}{name}", t).movedim(axis, 0)
            s = s.reshape(s.shape[0], -1).sum(1)
            out = s if out is None else out + s
        return out

    def mask_in_channels(self, module: nn.Module, positions: np.ndarray) -> None:
        """Masked reference: make input channels (features) ``positions`` contribute nothing."""
        for name, axis in self._present(module, self.in_params(module)).items():
            getattr(module, name).data.index_fill_(axis, _index(positions), 0)


# ----------------------------------------------------------------------------- registry

_RULES: dict[type, ChannelRule] = {}


def register_channel_rule(layer_type: type, rule: ChannelRule, *, replace: bool = True) -> None:
    """Use ``rule`` for ``layer_type`` and its subclasses (unless they have their own rule).

    Replaces an earlier rule for the same type (a warning is logged) unless ``replace=False``.
    """
    if not isinstance(layer_type, type) or not issubclass(layer_type, nn.Module):
        raise PassConfigError(f"register_channel_rule needs an nn.Module subclass, got {layer_type!r}",
                              where="graphopt.analysis.register_channel_rule", fix="pass the layer class")
    if not isinstance(rule, ChannelRule):
        raise PassConfigError(f"rule for {layer_type.__name__} is not a ChannelRule instance ({rule!r})",
                              where="graphopt.analysis.register_channel_rule",
                              fix="subclass graphopt.analysis.ChannelRule and pass an instance")
    if layer_type in _RULES:
        if not replace:
            raise PassConfigError(f"{layer_type.__name__} already has a channel rule",
                                  where="graphopt.analysis.register_channel_rule", fix="pass replace=True")
        log.warning("channel rule for %s replaced by %s", layer_type.__name__, type(rule).__name__)
    _RULES[layer_type] = rule


def unregister_channel_rule(layer_type: type) -> ChannelRule | None:
    """Remove the rule registered for exactly ``layer_type``; returns it (None if there was none)."""
    return _RULES.pop(layer_type, None)


# rules for layer types of libraries graphopt does not import, by qualified class name
_RULES_BY_NAME: dict[str, ChannelRule] = {}


def channel_rule_for(module: nn.Module | type) -> ChannelRule | None:
    """The rule for a module (or type): the first registered type along its MRO, or None."""
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        rule = _RULES.get(base) or _RULES_BY_NAME.get(f"{base.__module__}.{base.__qualname__}")
        if rule is not None:
            return rule
    return None


def channel_rule_for_name(qualname: str) -> ChannelRule | None:
    """The rule registered for a class of another library by its qualified name (a module captured by
    torch.export is a plain container; its class is only known by name)."""
    return _RULES_BY_NAME.get(qualname)


def channel_rules() -> dict[type, ChannelRule]:
    """A copy of the registry (layer type -> rule)."""
    return dict(_RULES)


# ----------------------------------------------------------------------------- built-in rules


class PassThroughRule(ChannelRule):
    """Elementwise layers (activations, dropout, Identity): channel ``i`` in is channel ``i`` out."""


class PReLURule(ChannelRule):
    """PReLU: elementwise; with one slope per channel (``num_parameters > 1``) the slopes are sliced."""

    def check(self, module: nn.Module, x: "ChanInfo") -> str | None:
        if module.num_parameters > 1 and (x.dim != 1 or x.inner != 1):
            return "its per-channel slopes apply on axis 1, not the channel axis"
        return None

    def out_params(self, module: nn.Module) -> dict[str, int]:
        return {"weight": 0} if module.num_parameters > 1 else {}

    def set_out_channels(self, module: nn.Module, n: int) -> None:
        module.num_parameters = n


class ConvRule(ChannelRule):
    """Conv1d/2d/3d: independent (grouped: equal removal per group); depthwise: coupled."""

    in_axis = 1
    out_axis = 1

    def relation(self, module: nn.Module) -> Relation:
        g, cin, cout = module.groups, module.in_channels, module.out_channels
        if g > 1 and g == cin == cout:
            return Relation.coupled()
        if g > 1 and g == cin:
            return Relation.blocked(f"depthwise conv {{name}} has a channel multiplier ({cout // cin}); "
                                    "not supported")
        return Relation.independent(groups=g)

    def get_in_channels(self, module: nn.Module) -> int:
        return module.in_channels

    def get_out_channels(self, module: nn.Module) -> int:
        return module.out_channels

    def out_params(self, module: nn.Module) -> dict[str, int]:
        return {"weight": 0, "bias": 0}

    def in_params(self, module: nn.Module) -> dict[str, int]:
        return {"weight": 1} if module.groups == 1 else {}

    def set_out_channels(self, module: nn.Module, n: int) -> None:
        if self.relation(module).kind == "coupled":  # depthwise: one channel set
            module.in_channels = module.groups = n
        module.out_channels = n

    def set_in_channels(self, module: nn.Module, n: int) -> None:
        module.in_channels = n

    def prune(self, module: nn.Module, out_keep: np.ndarray | None, in_keep: np.ndarray | None) -> None:
        g = module.groups
        if g == 1 or self.relation(module).kind == "coupled":
            return super().prune(module, out_keep, in_keep)
        w = module.weight.detach()
        cout, in_g = w.shape[0], w.shape[1]
        out_keep = np.arange(cout) if out_keep is None else np.asarray(out_keep)
        in_keep = np.arange(in_g * g) if in_keep is None else np.asarray(in_keep)
        out_g = cout // g
        parts, counts_o, counts_i = [], set(), set()
        for q in range(g):
            oq = out_keep[(out_keep >= q * out_g) & (out_keep < (q + 1) * out_g)]
            iq = in_keep[(in_keep >= q * in_g) & (in_keep < (q + 1) * in_g)] - q * in_g
            counts_o.add(len(oq))
            counts_i.add(len(iq))
            parts.append(w[_index(oq)][:, _index(iq)])
        if len(counts_o) != 1 or len(counts_i) != 1:
            raise RuntimeError(f"uneven pruning across the groups of a grouped conv: {counts_o}, {counts_i}")
        replace_tensor(module, "weight", torch.cat(parts, 0))
        if module.bias is not None:
            replace_tensor(module, "bias", module.bias.detach()[_index(out_keep)])
        module.out_channels, module.in_channels = len(out_keep), len(in_keep)

    def score(self, module: nn.Module, role: str, fn: ScoreFn, prefix: str, norms_only: bool = False
              ) -> torch.Tensor | None:
        if role != "in" or module.groups == 1 or norms_only:
            return super().score(module, role, fn, prefix, norms_only)
        g = module.groups
        w = fn(f"{prefix}weight", module.weight)
        cout, in_g = w.shape[0], w.shape[1]
        return w.reshape(g, cout // g, in_g, -1).sum((1, 3)).reshape(-1)

    def mask_in_channels(self, module: nn.Module, positions: np.ndarray) -> None:
        g = module.groups
        w = module.weight.data
        cout, in_g = w.shape[0], w.shape[1]
        out_g = cout // g
        for p in positions:
            q, j = divmod(int(p), in_g)
            w[q * out_g:(q + 1) * out_g, j] = 0


class LinearRule(ChannelRule):
    """Linear: independent; reads channels on the last axis, flattened channels as column blocks."""

    in_axis = -1
    out_axis = -1
    accepts_flattened = True

    def relation(self, module: nn.Module) -> Relation:
        return Relation.independent()

    def get_in_channels(self, module: nn.Module) -> int:
        return module.in_features

    def get_out_channels(self, module: nn.Module) -> int:
        return module.out_features

    def out_params(self, module: nn.Module) -> dict[str, int]:
        return {"weight": 0, "bias": 0}

    def in_params(self, module: nn.Module) -> dict[str, int]:
        return {"weight": 1}

    def set_out_channels(self, module: nn.Module, n: int) -> None:
        module.out_features = n

    def set_in_channels(self, module: nn.Module, n: int) -> None:
        module.in_features = n


class TransposedLinearRule(ChannelRule):
    """A linear layer with its weight stored ``[in, out]`` (HuggingFace's ``Conv1D`` in GPT-2), traced
    as ``torch.addmm(self.bias, x2d, self.weight)`` on its own parameters (``functional``): the
    analysis treats that call as the layer (independent, channels on the last axis)."""

    in_axis = -1
    out_axis = -1
    functional = "addmm"

    def relation(self, module: nn.Module) -> Relation:
        return Relation.independent()

    def get_in_channels(self, module: nn.Module) -> int:
        return module.weight.shape[0]

    def get_out_channels(self, module: nn.Module) -> int:
        return module.weight.shape[1]

    def out_params(self, module: nn.Module) -> dict[str, int]:
        return {"weight": 1, "bias": 0}

    def in_params(self, module: nn.Module) -> dict[str, int]:
        return {"weight": 0}

    def set_out_channels(self, module: nn.Module, n: int) -> None:
        if hasattr(module, "nf"):
            module.nf = n

    def set_in_channels(self, module: nn.Module, n: int) -> None:
        if hasattr(module, "nx"):
            module.nx = n


class BatchNormRule(ChannelRule):
    """BatchNorm: coupled on axis 1; affine parameters and running statistics are sliced."""

    in_axis = 1
    norm_scale = "weight"

    def get_in_channels(self, module: nn.Module) -> int:
        return module.num_features

    def out_params(self, module: nn.Module) -> dict[str, int]:
        return {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0}

    def set_out_channels(self, module: nn.Module, n: int) -> None:
        module.num_features = n


class GroupNormRule(ChannelRule):
    """GroupNorm: coupled on axis 1; channels go in whole groups."""

    in_axis = 1
    norm_scale = "weight"

    def relation(self, module: nn.Module) -> Relation:
        return Relation.coupled(units=module.num_groups)

    def get_in_channels(self, module: nn.Module) -> int:
        return module.num_channels

    def out_params(self, module: nn.Module) -> dict[str, int]:
        return {"weight": 0, "bias": 0}

    def set_out_channels(self, module: nn.Module, n: int) -> None:
        unit = module.num_channels // module.num_groups
        module.num_channels, module.num_groups = n, n // unit


class LayerNormRule(ChannelRule):
    """LayerNorm: elementwise along other axes. Normalising over the channel axis (the hidden width
    of a transformer) is declined by default (removing channels changes the statistics, so the
    pruned model would not equal the masked one); with the analysis's ``hidden`` option a LayerNorm
    over the last axis alone is followed and sliced (:class:`LayerNormChannelsRule`: weight, bias,
    ``normalized_shape``): an approximate rewrite, its statistics are then over the kept channels."""

    def check(self, module: nn.Module, x: "ChanInfo") -> str | None:
        if x.dim >= x.ndim - len(module.normalized_shape):
            return ("normalizes over the channel axis: removing channels changes its statistics, so the pruned "
                    "model would not equal the masked one; prune:hidden=true slices it (approximate: the "
                    "statistics are then over the kept channels)")
        return None

    def propagate(self, analysis: Any, node: fx.Node, module: nn.Module) -> Any:
        from graphopt.analysis.channels.graph import ChanInfo, Member

        x = analysis.val(node.args[0]) if len(node.args) == 1 and not node.kwargs else None
        if not getattr(analysis, "hidden", False) or not isinstance(x, ChanInfo) \
                or x.dim < x.ndim - len(module.normalized_shape):
            return NotImplemented  # the default: declined over the channels, followed over other axes
        if not (x.inner == 1 and len(module.normalized_shape) == 1 and x.dim == x.ndim - 1
                and module.normalized_shape[0] == len(x.atoms)):
            analysis.block(x.atoms, f"LayerNorm '{node.target}' normalizes over the channels and other axes "
                                    f"(normalized_shape {tuple(module.normalized_shape)}): not sliced")
            return x
        target = str(node.target)
        if analysis._tracked_call(analysis.mod_coupled, target, node, x.atoms):
            analysis.members.append(Member("coupled", target, node.name, x.atoms, rule=_LN_CHANNELS))
        analysis.approx.append((x.atoms, f"LayerNorm '{target}' normalizes over the kept channels"))
        return x


class LayerNormChannelsRule(ChannelRule):
    """A LayerNorm over the channel (last) axis, sliced with the hidden width: weight, bias and
    ``normalized_shape`` (see :class:`LayerNormRule`)."""

    def out_params(self, module: nn.Module) -> dict[str, int]:
        return {"weight": 0, "bias": 0}

    def set_out_channels(self, module: nn.Module, n: int) -> None:
        module.normalized_shape = (n,)


_LN_CHANNELS = LayerNormChannelsRule()


class EmbeddingRule(ChannelRule):
    """nn.Embedding: its output width (``embedding_dim``, the last axis) is new channels made from
    indices: an independent producer whose weight columns are sliced. Its width is the hidden width
    of a transformer, so it is only pruned with the analysis's ``hidden`` option (otherwise its
    channels are blocked, with the reason)."""

    out_axis = -1

    def relation(self, module: nn.Module) -> Relation:
        return Relation.independent()

    def get_out_channels(self, module: nn.Module) -> int:
        return module.embedding_dim

    def out_params(self, module: nn.Module) -> dict[str, int]:
        return {"weight": 1}

    def set_out_channels(self, module: nn.Module, n: int) -> None:
        module.embedding_dim = n

    def propagate(self, analysis: Any, node: fx.Node, module: nn.Module) -> Any:
        from graphopt.analysis.channels.graph import ChanInfo

        if analysis.tracked(node) or len(node.args) != 1 or node.kwargs:
            return analysis.unknown(node, "an embedding reads indices, not channels") if analysis.tracked(node) \
                else None
        target = str(node.target)
        cost = node.meta.get("cost")
        out = analysis.producer(node, module, self, self.relation(module), target, None,
                                int(cost.macs) if cost is not None else 0)
        if isinstance(out, ChanInfo) and not getattr(analysis, "hidden", False):
            analysis.block(out.atoms, f"Embedding '{target}' makes the hidden width (the residual stream); "
                                      "prune:hidden=true prunes it")
        return out


class PoolRule(ChannelRule):
    """Pooling over the trailing spatial axes: channel-wise."""

    def __init__(self, spatial: int):
        self.spatial = spatial

    def check(self, module: nn.Module, x: "ChanInfo") -> str | None:
        return "pools over the channel axis" if x.dim >= x.ndim - self.spatial else None


class SoftmaxRule(ChannelRule):
    """Softmax/LogSoftmax: channel-wise unless taken over the channel axis."""

    def check(self, module: nn.Module, x: "ChanInfo") -> str | None:
        d = module.dim
        if d is None or (d + x.ndim if d < 0 else d) == x.dim:
            return "normalizes over the channel axis"
        return None


class FlattenRule(ChannelRule):
    """nn.Flatten: moves the channel axis (each channel becomes a block of features)."""

    def propagate(self, analysis: Any, node: fx.Node, module: nn.Module) -> Any:
        x = analysis.val(node.args[0]) if len(node.args) == 1 and not node.kwargs else None
        if x is None:
            return analysis.unknown(node, "unexpected arguments") if analysis.tracked(node) else None
        return analysis.flatten(node, x, module.start_dim, module.end_dim)


class BlockedRule(ChannelRule):
    """A layer whose channels are never pruned; ``reason`` says why (``{name}``: the layer)."""

    def __init__(self, reason: str):
        self.reason = reason

    def relation(self, module: nn.Module) -> Relation:
        return Relation.blocked(self.reason)


def _register_builtins() -> None:
    conv = ConvRule()
    for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        register_channel_rule(t, conv)
    register_channel_rule(nn.Linear, LinearRule())
    bn = BatchNormRule()
    for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        register_channel_rule(t, bn)
    register_channel_rule(nn.GroupNorm, GroupNormRule())
    register_channel_rule(nn.LayerNorm, LayerNormRule())
    register_channel_rule(nn.Embedding, EmbeddingRule())
    same = PassThroughRule()
    for t in (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish, nn.Tanh, nn.LeakyReLU,
              nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
              nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout):
        register_channel_rule(t, same)
    register_channel_rule(nn.PReLU, PReLURule())
    for spatial, types in ((1, (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)),
                           (2, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)),
                           (3, (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d))):
        rule = PoolRule(spatial)
        for t in types:
            register_channel_rule(t, rule)
    register_channel_rule(nn.Flatten, FlattenRule())
    soft = SoftmaxRule()
    register_channel_rule(nn.Softmax, soft)
    register_channel_rule(nn.LogSoftmax, soft)
    _RULES_BY_NAME["transformers.pytorch_utils.Conv1D"] = TransposedLinearRule()
    register_channel_rule(nn.MultiheadAttention, BlockedRule(
        "attention heads of nn.MultiheadAttention {name} are not pruned: its embed_dim is both the head width "
        "sum and its input/output width, so heads cannot go without narrowing the residual stream, nor the "
        "residual stream (prune:hidden=true) without changing its heads"))


_register_builtins()
