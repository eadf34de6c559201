"""freeze: freeze parameters for transfer learning (EXACT: the function is unchanged).

Which parameters (``mode``):

- ``head`` (default): everything except the head. The head is the parametrised layer(s)
  nearest to each graph output (walking back from the output, the first module or
  parameter on each path: ``fc`` in ResNet, ``classifier.1`` in MobileNetV2, ``heads.head``
  in ViT), or the modules matching the ``head`` globs.
- ``stages``: the first ``stages`` stages. A stage is a group of parametrised modules with the
  same module-path prefix at ``stage_depth`` (``0``: the shallowest depth giving at least 4
  groups), in execution order; leading leaf modules before the first container (a ResNet's
  ``conv1``/``bn1``) form one "stem" stage. The report lists the stages.
- ``modules``: the modules matching the ``modules`` globs (a glob matches a module path or any
  of its ancestors: ``layer1`` and ``layer1.*`` both freeze all of ``layer1``).

``exclude`` globs are never frozen. Frozen parameters get ``requires_grad=False``; the torch
emitter writes them to ``FROZEN`` so the emitted module keeps them frozen, and no gradient is
computed for them (nor, where nothing trainable precedes them, for the activations below them:
backward does less work, see ``benchmarks/freeze_backward.py``).

BatchNorm in a frozen region (``bn=affine``, default) becomes a fixed affine op: a call of
``F.batch_norm(x, running_mean, running_var, weight, bias, training=False)`` on the module's own
(frozen) tensors, so train mode uses the running statistics and no longer updates them, as
transfer learning wants (torchvision's ``FrozenBatchNorm2d``). The state-dict keys stay the same
(minus ``num_batches_tracked``). ``bn=keep`` leaves BatchNorm modules as they are (frozen affine
parameters, but batch statistics in train mode and running stats still updated).

BatchNorm subclasses that tracing goes through (timm's ``BatchNormAct2d``) appear as
``F.batch_norm`` calls whose ``training`` flag was fixed at capture time: captured in eval mode
they already use running statistics in train mode too (a capture property, not this pass).

Declined, with the reason: BatchNorm inside an opaque (untraced) module, BatchNorm without
running statistics (``track_running_stats=False``), traced-through BatchNorm captured in train
mode (``training=True`` baked in: converting it would change the captured eval function).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import fx, nn

from graphopt import Decline, Option, Pass, PassResult, PreconditionError, Rewrite, Semantics
from graphopt.ir import graph_meta, name_matches, replace_module

__all__ = ["Freeze", "stages_of", "head_modules"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _owner(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def _ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _matches(path: str, globs: list[str]) -> bool:
    return any(name_matches(p, globs) for p in _ancestors(path)) if path else False


def _param_first_use(gm: fx.GraphModule) -> dict[str, int]:
    """Parameter name -> index of the first graph node that uses it."""
    names = [n for n, _ in gm.named_parameters()]
    first: dict[str, int] = {}
    index = {node: i for i, node in enumerate(gm.graph.nodes)}
    for i, node in enumerate(gm.graph.nodes):
        if node.op not in ("call_module", "get_attr"):
            continue
        if node.op == "get_attr":  # torch.export puts parameter reads at the top: the use is where it is read
            i = min((index[u] for u in node.users), default=i)
        t = str(node.target)
        for name in names:
            if name == t or name.startswith(t + "."):
                first[name] = min(first.get(name, i), i)
    for name in names:  # parameters of modules the graph never calls go last
        first.setdefault(name, len(gm.graph.nodes))
    return first


def stages_of(gm: fx.GraphModule, depth: int = 0) -> tuple[int, list[tuple[str, list[str]]]]:
    """(depth used, [(stage name, [parameter names])]) in execution order; see the module doc."""
    first = _param_first_use(gm)
    modules = dict(gm.named_modules())

    def groups_at(d: int) -> list[tuple[str, list[str]]]:
        groups: dict[str, list[str]] = {}
        for name in sorted(first, key=lambda n: first[n]):
            parts = name.split(".")
            key = ".".join(parts[:min(d, len(parts) - 1)]) or name
            groups.setdefault(key, []).append(name)
        return list(groups.items())

    if depth <= 0:
        max_depth = max((len(n.split(".")) - 1 for n in first), default=1)
        depth = 1
        while depth < max_depth and len(groups_at(depth)) < 4:
            depth += 1
    groups = groups_at(depth)
    def container(key: str) -> bool:  # has submodules with parameters of their own
        mod = modules.get(key)
        return mod is not None and any(any(True for _ in c.parameters()) for c in mod.children())

    is_container = [container(k) for k, _ in groups]
    lead = 0
    while lead < len(groups) and not is_container[lead]:
        lead += 1
    if 1 < lead < len(groups):  # leading leaf modules before the first container: one stem stage
        stem = [p for _, ps in groups[:lead] for p in ps]
        groups = [("stem(" + "+".join(k for k, _ in groups[:lead]) + ")", stem)] + groups[lead:]
    return depth, groups


def head_modules(gm: fx.GraphModule) -> list[str]:
    """Module paths (or parameter names) of the parametrised layers nearest to the outputs."""
    params = {n for n, _ in gm.named_parameters(remove_duplicate=False)}  # a tied head has its own name

    def owns_params(node: fx.Node) -> str | None:
        if node.op == "call_module":
            t = str(node.target)
            if any(p.startswith(t + ".") for p in params):
                return t
        if node.op == "get_attr" and str(node.target) in params:
            return _owner(str(node.target)) or str(node.target)
        return None

    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    heads: list[str] = []
    seen: set[fx.Node] = set()
    stack = list(out.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        owner = owns_params(node)
        if owner is not None:
            if owner not in heads:
                heads.append(owner)
            continue
        stack.extend(node.all_input_nodes)
    return heads


class Freeze(Pass):
    name = "freeze"
    semantics = Semantics.EXACT
    training = "changes"
    training_reason = "frozen parameters get no gradients; frozen BatchNorms normalise with running statistics"
    summary = "freeze parameters (all but the head, first K stages, or globs); frozen BN -> fixed affine"
    options = {
        "mode": Option(str, "head", "what to freeze: everything but the head, the first K stages, or globs",
                       choices=("head", "stages", "modules")),
        "stages": Option(int, 1, "mode=stages: how many stages to freeze, from the input side", min=1),
        "stage_depth": Option(int, 0, "module-path depth that defines a stage (0: auto, >= 4 stages)", min=0),
        "modules": Option(list, [], "mode=modules: module-path globs to freeze"),
        "head": Option(list, [], "mode=head: module-path globs of the head (default: detected)"),
        "exclude": Option(list, [], "module-path globs never frozen"),
        "bn": Option(str, "affine", "frozen BatchNorm: fixed affine op on running stats, or keep the module",
                     choices=("affine", "keep")),
    }

    def requires(self, gm: fx.GraphModule) -> None:
        if not any(True for _ in gm.parameters()):
            raise PreconditionError("the model has no parameters to freeze")
        mode = self.config["mode"]
        if mode == "modules":
            if not self.config["modules"]:
                raise PreconditionError("mode=modules needs module globs", fix="add modules=layer1|layer2")
            paths = [n for n, _ in gm.named_modules() if n]
            if not any(_matches(p, self.config["modules"]) for p in paths):
                raise PreconditionError(f"no module matches {'|'.join(self.config['modules'])}",
                                        fix="check the module paths with `graphopt inspect`")
        if mode == "stages":
            _, groups = stages_of(gm, self.config["stage_depth"])
            if self.config["stages"] >= len(groups):
                raise PreconditionError(
                    f"stages={self.config['stages']} would freeze everything: the model has {len(groups)} "
                    f"stages ({', '.join(k for k, _ in groups)})", fix="freeze fewer stages")

    def _frozen_params(self, gm: fx.GraphModule) -> tuple[set[str], dict[str, Any]]:
        mode = self.config["mode"]
        names = [n for n, _ in gm.named_parameters()]
        # a tied parameter (an LM head sharing the embedding) has one name here and others elsewhere:
        # a glob on any of its names selects it
        canon = {id(p): n for n, p in gm.named_parameters()}
        aliases: dict[str, list[str]] = {n: [] for n in names}
        for n, p in gm.named_parameters(remove_duplicate=False):
            aliases[canon[id(p)]].append(n)
        info: dict[str, Any] = {"mode": mode}
        if mode == "head":
            heads = self.config["head"]
            if heads:
                keep = {n for n in names if any(_matches(_owner(a), heads) or name_matches(a, heads)
                                                 for a in aliases[n])}
                if not keep:
                    raise PreconditionError(f"no parameter matches head={'|'.join(heads)}",
                                            fix="check the module paths with `graphopt inspect`")
                info["head"] = sorted({_owner(n) for n in keep})
            else:
                found = head_modules(gm)
                keep = {n for n in names if any(a in found or any(a.startswith(h + ".") for h in found)
                                                 for a in aliases[n])}
                info["head"] = found
            frozen = set(names) - keep
        elif mode == "stages":
            depth, groups = stages_of(gm, self.config["stage_depth"])
            k = self.config["stages"]
            frozen = {p for _, ps in groups[:k] for p in ps}
            info.update(stage_depth=depth, stages=[k_ for k_, _ in groups], frozen_stages=[k_ for k_, _ in groups[:k]])
        else:
            frozen = {n for n in names if any(_matches(_owner(a), self.config["modules"]) for a in aliases[n])}
        excl = self.config["exclude"]
        if excl:
            frozen = {n for n in frozen if not any(_matches(_owner(a), excl) or name_matches(a, excl)
                                                   for a in aliases[n])}
        return frozen, info

    def call(self, gm: fx.GraphModule) -> PassResult:
        frozen, info = self._frozen_params(gm)
        params = dict(gm.named_parameters())
        trainable_before = sum(p.numel() for p in params.values() if p.requires_grad)
        rewrites: list[Rewrite] = []
        declined: list[Decline] = []
        by_owner: dict[str, list[str]] = {}
        for name in sorted(frozen, key=list(params).index):
            if params[name].requires_grad:
                by_owner.setdefault(_owner(name), []).append(name)
        for owner, names in by_owner.items():
            count = 0
            for n in names:
                params[n].requires_grad_(False)
                count += params[n].numel()
            rewrites.append(Rewrite(owner or "<root>", f"froze {len(names)} parameter(s), {count} values",
                                    {"params": [n.rpartition(".")[2] for n in names], "values": count}))
        if self.config["bn"] == "affine":
            self._bn_to_affine(gm, frozen, rewrites, declined)
        trainable_after = sum(p.numel() for p in gm.parameters() if p.requires_grad)
        modified = bool(rewrites)
        if modified:
            graph_meta(gm)["frozen"] = sorted(n for n, p in gm.named_parameters() if not p.requires_grad)
            gm.recompile()
        notes = {**info, "trainable_params_before": trainable_before, "trainable_params_after": trainable_after,
                 "frozen_params": sum(p.numel() for p in gm.parameters() if not p.requires_grad),
                 "bn_to_affine": sum(1 for r in rewrites if r.data.get("kind") == "bn_affine")}
        return PassResult(gm, modified, rewrites, declined, notes=notes)

    def _bn_to_affine(self, gm: fx.GraphModule, frozen: set[str], rewrites: list[Rewrite],
                      declined: list[Decline]) -> None:
        opaque = set(graph_meta(gm).get("opaque", {}))
        called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        for path, mod in list(gm.named_modules()):
            if not isinstance(mod, _BN) or not mod.affine:
                continue
            if not {f"{path}.weight", f"{path}.bias"} <= frozen:
                continue
            if path not in called:
                if any(path.startswith(o + ".") for o in opaque):
                    declined.append(Decline(path, "inside an opaque (untraced) module: frozen, but its running "
                                                  "statistics still update in train mode"))
                continue
            if not mod.track_running_stats or mod.running_mean is None:
                declined.append(Decline(path, "no running statistics (track_running_stats=False): it has to "
                                              "normalise with batch statistics; parameters frozen only"))
                continue
            holder = nn.Module()
            holder.register_parameter("weight", mod.weight)
            holder.register_parameter("bias", mod.bias)
            holder.register_buffer("running_mean", mod.running_mean)
            holder.register_buffer("running_var", mod.running_var)
            replace_module(gm, path, holder)
            for node in [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == path]:
                with gm.graph.inserting_before(node):
                    attrs = [gm.graph.get_attr(f"{path}.{a}") for a in ("running_mean", "running_var", "weight", "bias")]
                    new = gm.graph.call_function(
                        F.batch_norm, (node.args[0], attrs[0], attrs[1]),
                        {"weight": attrs[2], "bias": attrs[3], "training": False, "momentum": 0.0, "eps": mod.eps})
                new.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "nn_module_stack")})
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
            rewrites.append(Rewrite(path, f"{type(mod).__name__} -> fixed affine batch_norm(training=False) on its "
                                          "running statistics (no longer updated)", {"kind": "bn_affine"}))
        # BatchNorm subclasses traced through (timm's BatchNormAct2d): F.batch_norm on get_attr tensors.
        # Capture reads their training flag at run time (a node); freezing fixes it to False.
        for node in gm.graph.nodes:
            if not (node.op == "call_function" and node.target is F.batch_norm):
                continue
            weight = node.kwargs.get("weight", node.args[3] if len(node.args) > 3 else None)
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and str(weight.target) in frozen):
                continue
            training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
            if isinstance(training, fx.Node):
                if "training" in node.kwargs:
                    node.kwargs = {**node.kwargs, "training": False}
                else:
                    node.args = node.args[:5] + (False,) + node.args[6:]
                rewrites.append(Rewrite(_owner(str(weight.target)), "traced-through BatchNorm -> fixed affine "
                                        "batch_norm(training=False) on its running statistics (no longer updated)",
                                        {"kind": "bn_affine"}))
                continue
            if training is True:
                declined.append(Decline(_owner(str(weight.target)), (
                    "traced-through BatchNorm that normalises with batch statistics in both modes (e.g. "
                    "track_running_stats=False); making it a fixed affine op would change its function. "
                    "Parameters frozen")))
