"""Depth variants as a graph rewrite: remove or repeat shape-preserving blocks.

A *block* is a submodule (not a leaf layer) with parameters whose nodes in the captured graph
(found through ``node.meta["nn_module_stack"]``) have exactly one input from outside the
block and exactly one output used outside it, with the output's shape and dtype equal to the
input's: a ResNet BasicBlock without downsampling, a ViT encoder layer, a conv-BN-ReLU unit of a
plain CNN. Blocks are grouped into *stages* by their parent module (``layer1``,
``encoder.layers``, ``features``): the level with the most such blocks is chosen first, and
blocks nested in (or containing) a chosen block are not chosen again.

``change_depth(gm, delta)``: per stage, ``delta < 0`` removes the last ``|delta|`` blocks (the
stage's input then flows straight to what followed them); ``delta > 0`` inserts ``delta``
copies of the stage's last block after it (fresh parameters via ``reset_parameters()`` with
``init="reset"``, copied weights with ``init="copy"``). The result is a re-annotated
GraphModule that trains like any other.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn

from graphopt.analysis.cost import annotate
from graphopt.capture import capture
from graphopt.errors import GraphoptError
from graphopt.ir import graph_meta, name_matches, output_dtype, output_shape

__all__ = ["Block", "find_blocks", "stages", "change_depth", "DepthChange"]

log = logging.getLogger(__name__)


@dataclass
class Block:
    path: str
    cls: str
    entry: fx.Node  # the node outside the block that feeds it
    exit: fx.Node  # the block's output node
    nodes: list[fx.Node]
    shape: tuple[int, ...]

    @property
    def stage(self) -> str:
        return self.path.rpartition(".")[0]

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "class": self.cls, "shape": list(self.shape), "nodes": len(self.nodes)}


def _paths(node: fx.Node) -> list[tuple[str, str]]:
    """(module path, original class name) of every module whose forward produced ``node``
    (GraphModule keeps the hierarchy but not the classes of container modules)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, val in stack.items():
        path = val[0] if isinstance(val, tuple) else key
        cls = val[1] if isinstance(val, tuple) and len(val) > 1 else None
        name = getattr(cls, "__name__", None) or (str(cls).rsplit(".", 1)[-1].strip("'>") if cls else "")
        out.append((str(path), name))
    return out


def _candidate(gm: fx.GraphModule, path: str, cls: str, nodes: list[fx.Node]) -> Block | None:
    try:
        mod = gm.get_submodule(path)
    except AttributeError:
        return None
    if not list(mod.children()) or not any(True for _ in mod.parameters()):
        return None  # a leaf layer, or nothing trainable
    members = set(nodes)
    # tensor inputs from outside (constants such as an optional attn_mask=None placeholder do not count)
    entries = {a for n in nodes for a in n.all_input_nodes
               if a not in members and a.op != "get_attr" and output_shape(a) is not None}
    exits = [n for n in nodes if any(u not in members for u in n.users)]
    if len(entries) != 1 or len(exits) != 1 or any(n.op in ("placeholder", "output") for n in nodes):
        return None
    entry, exit_ = next(iter(entries)), exits[0]
    shape_in, shape_out = output_shape(entry), output_shape(exit_)
    if shape_in is None or shape_in != shape_out or output_dtype(entry) != output_dtype(exit_):
        return None
    return Block(path, cls or type(mod).__name__, entry, exit_, nodes, shape_in)


def _depth(path: str) -> int:
    return 0 if not path else path.count(".") + 1


def find_blocks(gm: fx.GraphModule, globs: Sequence[str] | None = None) -> list[Block]:
    """Shape-preserving blocks, in graph order (``globs``: only module paths matching them)."""
    by_path: dict[str, list[fx.Node]] = {}
    classes: dict[str, str] = {}
    for node in gm.graph.nodes:
        for p, cls in _paths(node):
            by_path.setdefault(p, []).append(node)
            classes.setdefault(p, cls)
    cands = [b for p, ns in by_path.items() if p and (b := _candidate(gm, p, classes[p], ns)) is not None]
    # a container of repeated blocks (>= 2 direct children of one class that are blocks themselves,
    # e.g. a ResNet stage) is not a block: its children are
    kids: dict[str, dict[str, int]] = {}
    for b in cands:
        per_class = kids.setdefault(b.stage, {})
        per_class[b.cls] = per_class.get(b.cls, 0) + 1
    cands = [b for b in cands if max(kids.get(b.path, {}).values(), default=0) < 2]
    if globs:
        chosen = [b for b in cands if name_matches(b.path, globs)]
    else:
        groups: dict[str, list[Block]] = {}
        for b in cands:
            groups.setdefault(b.stage, []).append(b)
        chosen: list[Block] = []
        chosen_stages: list[str] = []

        def nested(a: str, b: str) -> bool:
            return a == b or a.startswith(b + ".") or b.startswith(a + ".")

        def inside(path: str, stage: str) -> bool:
            return stage == "" or path.startswith(stage + ".")

        # the level with most blocks first; nothing nested in a chosen block or inside a chosen
        # stage's other children (e.g. the depthwise unit inside a MobileNet inverted residual)
        for stage, blocks in sorted(groups.items(), key=lambda kv: (-len(kv[1]), -_depth(kv[0]), kv[0])):
            if any(nested(b.path, c.path) for b in blocks for c in chosen):
                continue
            if any(inside(stage + ".", s) for s in chosen_stages):
                continue
            chosen.extend(blocks)
            chosen_stages.append(stage)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(chosen, key=lambda b: order[b.exit])


def stages(blocks: Iterable[Block]) -> dict[str, list[Block]]:
    out: dict[str, list[Block]] = {}
    for b in blocks:
        out.setdefault(b.stage, []).append(b)
    return out


@dataclass
class DepthChange:
    delta: int
    blocks_before: int
    blocks_after: int
    removed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    stages: dict[str, int] = field(default_factory=dict)  # stage -> blocks after

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _remove(gm: fx.GraphModule, block: Block) -> None:
    block.exit.replace_all_uses_with(block.entry)
    for node in reversed(block.nodes):
        if node.users:
            raise GraphoptError(f"block {block.path} is used outside its output node {node.name}")
        gm.graph.erase_node(node)


def _reset(module: nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats") and callable(m.reset_running_stats):
            m.reset_running_stats()


def _repeat(gm: fx.GraphModule, block: Block, init: str) -> str:
    parent_path, _, leaf = block.path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    i = 1
    while hasattr(parent, f"{leaf}_r{i}"):
        i += 1
    new_leaf = f"{leaf}_r{i}"
    new_path = f"{parent_path}.{new_leaf}" if parent_path else new_leaf
    clone = copy.deepcopy(gm.get_submodule(block.path))
    if init == "reset":
        _reset(clone)
    parent.add_module(new_leaf, clone)

    def remap(target: Any) -> Any:
        if isinstance(target, str) and (target == block.path or target.startswith(block.path + ".")):
            return new_path + target[len(block.path):]
        return target

    env: dict[fx.Node, fx.Node] = {block.entry: block.exit}
    new_nodes: list[fx.Node] = []
    anchor = block.exit
    for node in block.nodes:
        with gm.graph.inserting_after(anchor):
            new = gm.graph.node_copy(node, lambda n: env.get(n, n))
        if new.op in ("call_module", "get_attr"):
            new.target = remap(new.target)
        stack = new.meta.get("nn_module_stack")
        if stack:
            new.meta["nn_module_stack"] = {remap(k): ((remap(v[0]),) + tuple(v[1:]) if isinstance(v, tuple) else v)
                                           for k, v in stack.items()}
        env[node] = new
        new_nodes.append(new)
        anchor = new
    new_exit = env[block.exit]
    members = set(new_nodes)
    block.exit.replace_all_uses_with(new_exit, delete_user_cb=lambda u: u not in members)
    return new_path


def change_depth(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], delta: int, *,
                 blocks: Sequence[str] | None = None, init: str = "reset") -> tuple[fx.GraphModule, DepthChange]:
    """A copy of ``model`` (captured if needed) with ``delta`` blocks removed (< 0) or added (> 0) per stage."""
    if init not in ("reset", "copy"):
        raise GraphoptError(f"unknown init '{init}'", fix="use reset or copy")
    gm = capture(model, example_inputs)
    found = find_blocks(gm, blocks)
    if not found:
        raise GraphoptError("no shape-preserving blocks found", where=type(model).__name__,
                            fix="depth sweeps need repeated blocks whose output has the input's shape "
                                "(or name them with blocks=GLOB)")
    groups = stages(found)
    change = DepthChange(delta, len(found), len(found))
    for stage, bs in groups.items():
        if delta < 0:
            for b in bs[len(bs) - min(-delta, len(bs)):][::-1]:
                _remove(gm, b)
                change.removed.append(b.path)
        elif delta > 0:
            last = bs[-1]
            for _ in range(delta):
                change.added.append(_repeat(gm, last, init))
        change.stages[stage or "<root>"] = max(0, len(bs) + delta)
    change.blocks_after = sum(change.stages.values())
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    graph_meta(gm)["cost"] = annotate(gm, tuple(example_inputs))
    graph_meta(gm)["depth_change"] = change.as_dict()
    return gm, change
