"""The ``torch.export`` front end, normalised into the IR torch.fx symbolic tracing produces.

``torch.export.export(strict=False)`` runs the model's Python (so decorated forwards, shape checks
used as control flow and iterated tensors all work) and records ATen ops. Its graph is then
rewritten into the one IR every pass works on:

- parameters and buffers are ``get_attr`` nodes with their original names, on a GraphModule rooted
  at (a copy of) the original module: ``gm.get_submodule("bert.encoder.layer.0.attention")`` works;
- a standard layer (``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.LayerNorm``, ``nn.Embedding``,
  ``nn.Dropout``, ``nn.BatchNorm*``, activation modules) whose ATen op was recorded inside that module's own forward
  (``nn_module_stack``) on that module's own parameters becomes a ``call_module`` node again, so
  passes see Linear/LayerNorm/Embedding layers exactly as with fx. Nothing is decomposed: pre-dispatch
  export keeps ``aten.linear``/``aten.conv2d`` whole;
- ATen ops with a torch function of the same signature become that function (``aten.matmul`` ->
  ``torch.matmul``, ``aten.softmax.int`` -> ``torch.softmax``, ...), so pattern-matching passes see the
  same targets as in a symbolically traced graph; other ops stay ``torch.ops.aten.*`` calls;
- modules kept whole (:func:`leaf_paths`): drop-path / stochastic-depth / drop-block modules (timm,
  torchvision, user code: their forward depends on ``self.training``, which export would bake in),
  BatchNorm subclasses with a forward of their own (timm's ``BatchNormAct2d``: its activation is inside;
  the BatchNorm channel rule applies to them by class) and
  layers of the user's own with a registered channel rule (``register_channel_rule``: the user
  described them to the passes as layers) become ``call_module`` nodes, as with fx. Their forward is
  bracketed at export by two identity marker ops; the ops between the markers are replaced by the
  module call (a module whose ops escape the bracket, e.g. a buffer it writes, is left inlined);
- functional dropout is ``F.dropout`` reading the graph module's ``training`` flag instead of the value
  baked at export; ``aten.to.dtype`` is the ``.to(dtype)`` method;
- user inputs are placeholders named after the keyword (or forward parameter) they came from, in
  the order given; outputs keep their structure, with ``ModelOutput`` as a plain dict of its
  non-None fields (what :func:`graphopt.capture.plain_outputs` documents).

Why this rather than ``torch.export.unflatten``: unflatten rebuilds the module *tree* but every leaf
layer becomes an ``InterpreterModule`` running ATen ops (``nn.Linear`` is no longer an ``nn.Linear``)
and the graph is split per module, so passes would need a second code path. Re-mapping the flat
graph keeps one flat GraphModule with real layer modules, which is what every pass expects.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.errors import CaptureError
from graphopt.modelfile import user_frame

__all__ = ["export_capture", "ATEN_TO_TORCH", "leaf_paths"]

log = logging.getLogger(__name__)
aten = torch.ops.aten

# same argument names and order: a straight swap
ATEN_TO_TORCH: dict[Any, Any] = {
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.matmul.default: torch.matmul, aten.bmm.default: torch.bmm, aten.softmax.int: torch.softmax,
    aten.add.Tensor: torch.add, aten.sub.Tensor: torch.sub, aten.mul.Tensor: torch.mul,
    aten.div.Tensor: torch.div, aten.transpose.int: torch.transpose, aten.permute.default: torch.permute,
    aten.reshape.default: torch.reshape, aten.gelu.default: F.gelu, aten.tanh.default: torch.tanh,
    aten.relu.default: torch.relu, aten.silu.default: F.silu, aten.cat.default: torch.cat,
    aten.sigmoid.default: torch.sigmoid, aten.rsqrt.default: torch.rsqrt, aten.neg.default: torch.neg,
    aten.mean.dim: torch.mean, aten.pow.Tensor_Scalar: torch.pow, aten.flatten.using_ints: torch.flatten,
    aten.unsqueeze.default: torch.unsqueeze, aten.addmm.default: torch.addmm, aten.split.Tensor: torch.split,
    aten.masked_fill.Scalar: torch.masked_fill, aten.baddbmm.default: torch.baddbmm, aten.squeeze.dim: torch.squeeze, aten.where.self: torch.where,
}
_METHODS = {aten.view.default: "view", aten.contiguous.default: "contiguous", aten.expand.default: "expand",
            aten.to.dtype: "to"}  # aten.to.dtype(x, dtype, ...) is x.to(dtype, ...)


_ACTIVATIONS = {nn.GELU: aten.gelu.default, nn.ReLU: aten.relu.default, nn.SiLU: aten.silu.default,
                nn.Tanh: aten.tanh.default, nn.Sigmoid: aten.sigmoid.default}


def _innermost(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    # non-strict export names the root "" and children by their FQN; strict uses L['self'].a.b
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
    return path


def _param_is(root: nn.Module, node: Any, target: Any) -> bool:
    if target is None:
        return node is None
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    try:
        obj = root.get_parameter(node.target)
    except AttributeError:
        try:
            obj = root.get_buffer(node.target)
        except AttributeError:
            return False
    return obj is target


def _as_module_call(root: nn.Module, node: fx.Node) -> tuple[str, tuple[Any, ...]] | None:
    """``(module path, args)`` when ``node`` is exactly a standard layer's forward."""
    path = _innermost(node)
    if not path:
        return None
    try:
        mod = root.get_submodule(path)
    except AttributeError:
        return None
    if _own_forward(mod):
        return None  # a subclass with a forward of its own (timm's BatchNormAct2d): not the standard layer's op
    t, a = node.target, node.args
    kw = node.kwargs
    if isinstance(mod, nn.Linear) and t == aten.linear.default and not kw:
        if _param_is(root, a[1], mod.weight) and _param_is(root, a[2] if len(a) > 2 else None, mod.bias):
            return path, (a[0],)
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and t in (aten.conv1d.default, aten.conv2d.default,
                                                                      aten.conv3d.default) and not kw:
        if (mod.padding_mode == "zeros" and _param_is(root, a[1], mod.weight)
                and _param_is(root, a[2] if len(a) > 2 else None, mod.bias)):
            return path, (a[0],)
    if isinstance(mod, nn.LayerNorm) and t == aten.layer_norm.default and not kw:
        if (_param_is(root, a[2] if len(a) > 2 else None, mod.weight)
                and _param_is(root, a[3] if len(a) > 3 else None, mod.bias)
                and list(a[1]) == list(mod.normalized_shape) and (a[4] if len(a) > 4 else 1e-5) == mod.eps):
            return path, (a[0],)
    if isinstance(mod, nn.Embedding) and t == aten.embedding.default and not kw:
        pad = a[2] if len(a) > 2 else -1
        if (_param_is(root, a[0], mod.weight) and pad == (-1 if mod.padding_idx is None else mod.padding_idx)
                and mod.max_norm is None and not (len(a) > 4 and a[4])):
            return path, (a[1],)
    if isinstance(mod, nn.Dropout) and t == aten.dropout.default and a[1] == mod.p and not mod.inplace:
        return path, (a[0],)
    act = _ACTIVATIONS.get(type(mod))
    if act is not None and getattr(mod, "inplace", False):  # nn.SiLU(inplace=True) records aten.silu_
        act = getattr(getattr(aten, act._schema.name.split("::")[1] + "_", None), "default", None)
    if act is not None and t == act and len(a) == 1:
        if not isinstance(mod, nn.GELU) or kw.get("approximate", "none") == mod.approximate:
            return path, (a[0],)
    if (isinstance(mod, nn.modules.batchnorm._BatchNorm) and t == aten.batch_norm.default
            and _param_is(root, a[1], mod.weight) and _param_is(root, a[2], mod.bias)):
        return path, (a[0],)
    return None


_STANDARD = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.Embedding, nn.Dropout,
             nn.modules.batchnorm._BatchNorm, *_ACTIVATIONS)


def _own_forward(mod: nn.Module) -> bool:
    """A subclass of a standard layer that overrides its forward (timm's ``BatchNormAct2d``: batch norm,
    then an activation): its op is not the whole module, so it is never mapped to a call of it."""
    base = next((b for b in type(mod).__mro__ if b in _STANDARD), None)
    return base is not None and type(mod).forward is not base.forward


# ----------------------------------------------------------------------------- modules kept whole

_LEAF_CLASS_NAMES = {"DropPath", "StochasticDepth", "DropBlock2d", "DropBlock3d", "DropBlock"}
_MARKERS: dict[str, Any] = {}


def _markers() -> tuple[Any, Any]:
    """Identity ops (a copy: custom ops may not return an alias) that bracket a kept module at export."""
    if not _MARKERS:
        for name in ("leaf_enter", "leaf_exit"):
            @torch.library.custom_op(f"graphopt::{name}", mutates_args=())
            def marker(x: torch.Tensor, leaf: int) -> torch.Tensor:
                return x.clone()

            @marker.register_fake
            def _(x: torch.Tensor, leaf: int) -> torch.Tensor:
                return torch.empty_like(x)

            _MARKERS[name] = getattr(torch.ops.graphopt, name).default
    return _MARKERS["leaf_enter"], _MARKERS["leaf_exit"]


def leaf_paths(root: nn.Module) -> list[str]:
    """Submodules the export front end keeps as ``call_module`` nodes (outermost first; none nested)."""
    from graphopt.analysis.channels.rules import channel_rules

    rules = channel_rules()

    def own_rule(cls: type) -> bool:  # the rule was registered for a class outside torch (not via nn.Conv2d...)
        base = next((b for b in cls.__mro__ if b in rules), None)
        return base is not None and not base.__module__.startswith("torch.")

    out: list[str] = []
    for path, mod in root.named_modules():
        if not path or any(path.startswith(p + ".") for p in out):
            continue
        if type(mod).__name__ in _LEAF_CLASS_NAMES or own_rule(type(mod)) or (
                isinstance(mod, nn.modules.batchnorm._BatchNorm) and _own_forward(mod)):
            out.append(path)
    return out


@contextlib.contextmanager
def _bracketed(root: nn.Module, paths: list[str]) -> Iterator[None]:
    """Bracket each kept module's forward (one tensor in, one tensor out) with the marker ops."""
    enter, exit_ = _markers()
    patched: list[nn.Module] = []

    def wrap(mod: nn.Module, index: int) -> Any:
        forward = mod.forward

        def bracketed(*args: Any, **kwargs: Any) -> Any:
            if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
                return forward(*args, **kwargs)  # not a one-tensor call: traced through
            out = forward(enter(args[0], index))
            return exit_(out, index) if isinstance(out, torch.Tensor) else out
        return bracketed

    try:
        for i, path in enumerate(paths):
            mod = root.get_submodule(path)
            mod.forward = wrap(mod, i)
            patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward


def _collapse_leaves(graph: fx.Graph, paths: list[str]) -> list[str]:
    """Replace each bracketed region by a call of its module; returns the paths kept as modules."""
    enter, exit_ = _markers()
    kept: list[str] = []
    open_: dict[int, list[fx.Node]] = {}
    pairs: list[tuple[fx.Node, fx.Node]] = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is enter:
            open_.setdefault(node.args[1], []).append(node)
        elif node.op == "call_function" and node.target is exit_ and open_.get(node.args[1]):
            pairs.append((open_[node.args[1]].pop(), node))
    order = {n: i for i, n in enumerate(graph.nodes)}
    for start, end in pairs:
        # the module's ops: those that depend on its input and feed its output
        desc: set[fx.Node] = set()
        stack = [start]
        while stack:
            for u in stack.pop().users:
                if u not in desc and u is not end and order[u] < order[end]:
                    desc.add(u)
                    stack.append(u)
        anc: set[fx.Node] = set()
        stack = [end.args[0]] if isinstance(end.args[0], fx.Node) else []
        while stack:
            n = stack.pop()
            if n in anc or order[n] <= order[start]:
                continue
            anc.add(n)
            stack.extend(n.all_input_nodes)
        region = desc & anc
        # in-place ops on the module's tensors (bernoulli_, div_) act on the output through what they write
        grown = True
        while grown:
            grown = False
            for n in list(region) + [start]:
                for u in n.users:
                    if u in desc and u not in region and _writes_first_arg(u) and u.args[0] is n:
                        region.add(u)
                        grown = True
        escapes = any(u not in region and u is not end for n in region | {start} for u in n.users)
        path = paths[start.args[1]]
        if escapes:
            log.info("export: %s is not kept as a module (its ops are used outside it)", path)
            for marker in (end, start):
                marker.replace_all_uses_with(marker.args[0])
                graph.erase_node(marker)
            continue
        with graph.inserting_before(end):
            call = graph.call_module(path, (start.args[0],))
        call.meta.update({k: v for k, v in start.meta.items() if k in ("nn_module_stack", "stack_trace")})
        end.replace_all_uses_with(call)
        graph.erase_node(end)
        for n in sorted(region, key=order.__getitem__, reverse=True):
            graph.erase_node(n)
        graph.erase_node(start)
        for n in sorted(anc - region, key=order.__getitem__, reverse=True):  # e.g. views of its parameters
            if not n.users and n.op in ("call_function", "call_method", "get_attr") and not n.is_impure():
                graph.erase_node(n)
        kept.append(path)
    for node in list(graph.nodes):  # a region left open (should not happen): identity
        if node.op == "call_function" and node.target in (enter, exit_):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    return kept


def _writes_first_arg(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return bool(schema.arguments) and schema.arguments[0].alias_info is not None \
            and schema.arguments[0].alias_info.is_write
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def _structure(value: Any) -> Any:
    """Unflattened outputs (fx Nodes inside) with dict-like containers as plain dicts."""
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items() if v is not None}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_structure(v) for v in value)
    if isinstance(value, list):
        return [_structure(v) for v in value]
    return value


def export_capture(src: nn.Module, inputs: tuple[Any, ...], names: tuple[str, ...] | None) -> fx.GraphModule:
    """``torch.export`` ``src`` on ``inputs`` (keywords ``names`` when given) and normalise the graph."""
    from torch.export.graph_signature import InputKind, OutputKind
    from torch.utils._pytree import tree_unflatten

    args, kwargs = (inputs, {}) if names is None else ((), dict(zip(names, inputs)))
    import contextlib
    import io

    leaves = leaf_paths(src)
    sink = io.StringIO()  # on failure torch prints the partial graph; the error below says what matters
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    try:
        torch_log.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), _bracketed(src, leaves):
            ep = torch.export.export(src, args, kwargs, strict=False)
    except Exception as exc:
        log.debug("torch.export output:\n%s", sink.getvalue())
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"torch.export cannot capture {type(src).__name__}: {type(exc).__name__}: {msg[:200]}",
                           where=user_frame(exc),
                           fix="make forward()'s control flow independent of tensor values") from exc
    finally:
        torch_log.setLevel(level)
    sig = ep.graph_signature
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    spec_of = {s.arg.name: s for s in sig.input_specs if hasattr(s.arg, "name")}
    user_names = list(names) if names is not None else []
    placeholders: list[fx.Node] = []
    n_user = 0
    constants: dict[str, torch.Tensor] = {}

    for node in ep.graph.nodes:
        if node.op == "placeholder":
            spec = spec_of[node.name]
            if spec.kind == InputKind.USER_INPUT:
                name = user_names[n_user] if n_user < len(user_names) else node.name
                n_user += 1
                new = graph.placeholder(name)
                placeholders.append(new)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                new = graph.get_attr(spec.target)
            elif spec.kind in (InputKind.CONSTANT_TENSOR,):
                attr = "_graphopt_const_" + "".join(c if c.isalnum() else "_" for c in str(spec.target))
                constants[attr] = ep.constants[spec.target]
                new = graph.get_attr(attr)
            else:
                raise CaptureError(f"torch.export produced an input of kind {spec.kind.name} graphopt cannot map",
                                   fix="use --capture fx")
            new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
            env[node] = new
            continue
        if node.op == "output":
            flat = list(node.args[0])
            user = [env[a] if isinstance(a, fx.Node) else a for a, s in zip(flat, sig.output_specs)
                    if s.kind == OutputKind.USER_OUTPUT]
            for a, s in zip(flat, sig.output_specs):
                if s.kind == OutputKind.BUFFER_MUTATION:  # BatchNorm statistics and the like: write back
                    graph.call_function(torch.Tensor.copy_, (graph.get_attr(s.target), env[a]))
                elif s.kind not in (OutputKind.USER_OUTPUT,):
                    raise CaptureError(f"torch.export produced an output of kind {s.kind.name} graphopt cannot map",
                                       fix="use --capture fx")
            out = tree_unflatten(user, ep.call_spec.out_spec)
            graph.output(_structure(out))
            continue
        new = graph.node_copy(node, lambda n: env[n])
        env[node] = new
    for name, t in constants.items():
        src.register_buffer(name, t, persistent=True)
    if leaves:
        _collapse_leaves(graph, leaves)
    _normalise(graph, src)
    gm = fx.GraphModule(src, graph, type(src).__name__)
    gm.graph.lint()
    return gm


def _normalise(graph: fx.Graph, root: nn.Module) -> None:
    modules: dict[str, int] = {}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        hit = _as_module_call(root, node)
        if hit is not None:
            path, args = hit
            with graph.inserting_before(node):
                new = graph.call_module(path, args)
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            modules[path] = modules.get(path, 0) + 1
            continue
        if node.target == aten.dropout.default:
            with graph.inserting_before(node):
                flag = graph.create_node("get_attr", "training")
            node.args = (node.args[0], node.args[1], flag)
            node.target = F.dropout  # aten.dropout(input, p, train) is F.dropout(input, p, training)
            continue
        if node.target in ATEN_TO_TORCH:
            node.target = ATEN_TO_TORCH[node.target]
        elif node.target in _METHODS:
            node.op, node.target = "call_method", _METHODS[node.target]
    for node in list(graph.nodes):  # export's own dtype/device asserts on its inputs
        if node.op == "call_function" and node.target == aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)
    # get_attr nodes for parameters now read by call_module nodes are dead; stray unused get_attrs too
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    called = [p for p, n in modules.items() if n > 1]
    if called:
        log.info("modules called more than once: %s", ", ".join(called[:5]))
