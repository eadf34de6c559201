"""A declarative description of a GraphModule (``graph.json``), and the code-free rebuild from it.

The torch folder's ``module.py`` is there to be read; loading it would run whatever it holds. The
default :func:`graphopt.load` instead rebuilds the module from ``graph.json`` (the idea of
safetensors applied to code), which holds only data:

- ``modules``: the module tree, parents first. A module the graph calls is built from its class
  and constructor arguments; the class must be on the allowlist (``torch.nn`` and graphopt's
  own modules). Every other module is a plain ``nn.Module`` container.
- ``tensors``: parameters and buffers that live directly on containers (shape, dtype).
- ``tied``, ``frozen``, ``dtypes``, ``memory_format``: as in the manifest.
- ``nodes``: the fx graph (placeholder, get_attr, call_function, call_method, call_module,
  output) with structured arguments (node references, literals, dtypes, devices, slices).
  ``call_function`` targets are qualified names on an allowlist (tensor operators of ``torch``,
  ``torch.nn.functional``, ``torch.ops.aten``, ``operator`` arithmetic, ``math``, a few
  builtins such as ``getattr`` and ``len``, and graphopt's own versions of a few library functions
  torch.fx keeps opaque, see :mod:`graphopt.emit.graph_ops`); ``call_method`` targets are public
  tensor methods.

The rebuild resolves every name against these allowlists before anything runs, and refuses
(:class:`NeedsCode`) anything else: a folder that needs code is loaded only with
``trust_code=True``. torch.fx then generates ``forward`` from the checked graph.
"""

from __future__ import annotations

import builtins
import importlib
import keyword
import math
import operator
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.emit.graph_ops import EQUIVALENTS

__all__ = ["GRAPH_FILE", "GRAPH_FORMAT_VERSION", "NeedsCode", "describe", "rebuild"]

GRAPH_FILE = "graph.json"
GRAPH_FORMAT_VERSION = 1


class NeedsCode(Exception):
    """The graph (or a description) uses something outside the allowlists; the message says what."""


# ----------------------------------------------------------------------------- allowlists

_OPERATOR = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs", "invert",
             "and_", "or_", "xor", "lshift", "rshift", "not_", "eq", "ne", "lt", "le", "gt", "ge", "getitem",
             "setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior",
             "ixor", "contains", "is_", "is_not", "truth", "index", "concat"}
_BUILTINS = {"getattr", "len", "min", "max", "abs", "int", "float", "bool", "round", "tuple", "list", "range",
             "slice", "sum", "all", "any", "divmod", "pow"}
_TORCH_EXTRA = {"_assert", "sym_int", "sym_float", "sym_max", "sym_min", "sym_not"}
# names that read or write files, or load code, are refused even where a namespace is allowed
_DENY_WORDS = ("file", "save", "load", "pickle", "jit", "hub", "import", "print", "compile", "set_default")
_DENY_METHODS = {"apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook", "backward",
                 "share_memory_", "untyped_storage", "storage", "pin_memory", "record_stream"}
_MODULE_PREFIXES = ("torch.nn.", "graphopt.")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# module and tensor names: torch.fx writes non-identifiers into generated code inside quotes without
# escaping them, so only a plain character set is accepted (letters, digits, _ and -)
_PATH_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")
_PLACEHOLDER = re.compile(r"^\*{0,2}[A-Za-z_][A-Za-z0-9_]*$")


def _denied(name: str) -> bool:
    low = name.lower()
    return any(w in low for w in _DENY_WORDS)


def _torch_function_ok(name: str) -> bool:
    if _denied(name):
        return False
    if name in _TORCH_EXTRA:
        return True
    if name.startswith("_"):
        return False
    import torch.functional as TF

    return hasattr(torch._C._VariableFunctions, name) or name in getattr(TF, "__all__", ())


def _public_function_of(module: Any, name: str) -> bool:
    return not name.startswith("_") and not _denied(name) and callable(getattr(module, name, None)) \
        and not isinstance(getattr(module, name), type)


def function_name(fn: Any) -> str:
    """The allowlisted qualified name of a call_function target; :class:`NeedsCode` otherwise."""
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        ns = getattr(fn, "namespace", None)
        op_name = fn._schema.name.split("::", 1)[-1] if hasattr(fn, "_schema") else ""
        if ns == "aten" and not _denied(op_name):
            overload = getattr(fn, "_overloadname", None) if isinstance(fn, torch._ops.OpOverload) else None
            return f"torch.ops.aten.{op_name}" + (f".{overload or 'default'}" if overload is not None else "")
        raise NeedsCode(f"the graph calls the operator {fn}, which is not on the allowlist")
    name = getattr(fn, "__name__", None)
    if isinstance(name, str):
        if name in _OPERATOR and getattr(operator, name, None) is fn:
            return f"operator.{name}"
        if name in _BUILTINS and getattr(builtins, name, None) is fn:
            return f"builtins.{name}"
        if getattr(math, name, None) is fn and _public_function_of(math, name):
            return f"math.{name}"
        if getattr(F, name, None) is fn and _public_function_of(F, name):
            return f"torch.nn.functional.{name}"
        if getattr(torch._C._nn, name, None) is fn and not name.startswith("_") and not _denied(name):
            return f"torch._C._nn.{name}"
        if getattr(torch, name, None) is fn and _torch_function_ok(name):
            return f"torch.{name}"
    qual = f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', None) or repr(fn)}"
    if qual in EQUIVALENTS:
        return EQUIVALENTS[qual]
    raise NeedsCode(f"the graph calls {qual}, which is not on the allowlist")


def resolve_function(qualname: str) -> Any:
    """The function an allowlisted qualified name stands for; :class:`NeedsCode` for any other name."""
    if not isinstance(qualname, str):
        raise NeedsCode(f"call_function target {qualname!r} is not a name")
    mod, _, name = qualname.rpartition(".")
    fn: Any = None
    if mod == "operator" and name in _OPERATOR:
        fn = getattr(operator, name)
    elif mod == "builtins" and name in _BUILTINS:
        fn = getattr(builtins, name)
    elif mod == "math" and _public_function_of(math, name):
        fn = getattr(math, name)
    elif mod == "torch.nn.functional" and _public_function_of(F, name):
        fn = getattr(F, name)
    elif mod == "torch._C._nn" and _NAME.match(name) and not name.startswith("_") and not _denied(name):
        fn = getattr(torch._C._nn, name, None)
    elif mod == "torch" and _torch_function_ok(name):
        fn = getattr(torch, name, None)
    elif qualname in EQUIVALENTS.values():
        import graphopt.emit.graph_ops as ops

        fn = getattr(ops, name)
    elif qualname.startswith("torch.ops.aten."):
        parts = qualname.split(".")[3:]
        if 1 <= len(parts) <= 2 and all(_NAME.match(p) for p in parts) and not _denied(parts[0]):
            packet = getattr(torch.ops.aten, parts[0], None)
            fn = packet if len(parts) == 1 or packet is None else getattr(packet, parts[1], None)
    if fn is None or not callable(fn):
        raise NeedsCode(f"call_function target '{qualname}' is not on the allowlist")
    return fn


def _module_class_name(cls: type) -> str:
    name = f"{cls.__module__}.{cls.__qualname__}"
    if not cls.__module__.startswith(_MODULE_PREFIXES) or "<locals>" in cls.__qualname__:
        raise NeedsCode(f"module class {name} is not on the allowlist (torch.nn and graphopt's own modules)")
    return name


def resolve_module_class(qualname: str) -> type[nn.Module]:
    if not isinstance(qualname, str) or not qualname.startswith(_MODULE_PREFIXES):
        raise NeedsCode(f"module class {qualname!r} is not on the allowlist (torch.nn and graphopt's own modules)")
    mod_name, _, cls_name = qualname.rpartition(".")
    if not all(_NAME.match(p) for p in qualname.split(".")):
        raise NeedsCode(f"module class {qualname!r} is not a qualified name")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise NeedsCode(f"module class {qualname}: {exc}") from exc
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise NeedsCode(f"{qualname} is not an nn.Module class")
    return cls


def _check_path(path: Any, what: str) -> str:
    if not isinstance(path, str) or not path or not all(_PATH_PART.match(p) and not p.startswith("__")
                                                        for p in path.split(".")):
        raise NeedsCode(f"{what} {path!r} is not a module path")
    return path


def _check_method(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.startswith("_") or name in _DENY_METHODS \
            or _denied(name) or not hasattr(torch.Tensor, name):
        raise NeedsCode(f"call_method target {name!r} is not a public tensor method on the allowlist")
    return name


# ----------------------------------------------------------------------------- values

_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
                   "channels_last_3d": torch.channels_last_3d, "preserve_format": torch.preserve_format}
_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) and _NAME.match(name) else None
    if not isinstance(dt, torch.dtype):
        raise NeedsCode(f"{name!r} is not a torch dtype")
    return dt


def encode(v: Any) -> Any:
    """A JSON value for an fx argument; every JSON object is a tagged value."""
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, torch.Size):
        return {"size": [encode(x) for x in v]}
    if isinstance(v, tuple):
        return {"tuple": [encode(x) for x in v]}
    if isinstance(v, list):
        return [encode(x) for x in v]
    if isinstance(v, dict):
        return {"dict": [[encode(k), encode(x)] for k, x in v.items()]}
    if isinstance(v, slice):
        return {"slice": [encode(v.start), encode(v.stop), encode(v.step)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).replace("torch.", "")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.memory_format):
        name = next((k for k, f in _MEMORY_FORMATS.items() if f == v), None)
        if name is not None:
            return {"memory_format": name}
    if isinstance(v, torch.layout):
        name = next((k for k, f in _LAYOUTS.items() if f == v), None)
        if name is not None:
            return {"layout": name}
    if isinstance(v, complex):
        return {"complex": [v.real, v.imag]}
    raise NeedsCode(f"an argument of type {type(v).__name__} cannot be described as data")


def decode(v: Any, env: dict[str, fx.Node]) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [decode(x, env) for x in v]
    if not isinstance(v, dict) or len(v) != 1:
        raise NeedsCode(f"malformed value {str(v)[:60]!r}")
    (tag, x), = v.items()
    if tag == "node":
        if x not in env:
            raise NeedsCode(f"reference to unknown node {x!r}")
        return env[x]
    if tag == "float" and x in ("inf", "-inf", "nan"):
        return float(x)
    if tag == "size" and isinstance(x, list):
        return torch.Size([decode(i, env) for i in x])
    if tag == "tuple" and isinstance(x, list):
        return tuple(decode(i, env) for i in x)
    if tag == "dict" and isinstance(x, list):
        return {decode(k, env): decode(i, env) for k, i in x}
    if tag == "slice" and isinstance(x, list) and len(x) == 3:
        return slice(*(decode(i, env) for i in x))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "dtype":
        return _dtype(x)
    if tag == "device" and isinstance(x, str):
        return torch.device(x)
    if tag == "memory_format" and x in _MEMORY_FORMATS:
        return _MEMORY_FORMATS[x]
    if tag == "layout" and x in _LAYOUTS:
        return _LAYOUTS[x]
    if tag == "complex" and isinstance(x, list) and len(x) == 2:
        return complex(float(x[0]), float(x[1]))
    raise NeedsCode(f"unknown value tag {tag!r}")


# ----------------------------------------------------------------------------- describe / rebuild

def describe(gm: fx.GraphModule, class_name: str, facts: dict[str, Any], ctor_kwargs: Any) -> dict[str, Any]:
    """The ``graph.json`` document of ``gm``; :class:`NeedsCode` when part of it is not data.

    ``facts``: what :func:`~graphopt.emit.torch_folder.generate_source` found (tied, frozen, dtypes,
    memory format); ``ctor_kwargs(module)``: the constructor arguments of a called module.
    """
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise NeedsCode(f"the graph uses a custom calling convention ({type(gm.graph._codegen).__name__})")
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    modules: list[dict[str, Any]] = []
    tensors: list[dict[str, Any]] = []

    def walk(path: str, module: nn.Module) -> None:
        nonpersistent = getattr(module, "_non_persistent_buffers_set", set())
        for pname, p in module.named_parameters(recurse=False):
            if p is not None:
                tensors.append({"owner": path, "name": pname, "kind": "parameter", "shape": list(p.shape),
                                "dtype": str(p.dtype).replace("torch.", "")})
        for bname, b in module.named_buffers(recurse=False):
            if b is not None:
                tensors.append({"owner": path, "name": bname, "kind": "buffer", "shape": list(b.shape),
                                "dtype": str(b.dtype).replace("torch.", ""),
                                "persistent": bname not in nonpersistent})
        for cname, child in module.named_children():
            cpath = f"{path}.{cname}" if path else cname
            if cpath in called:
                modules.append({"path": cpath, "class": _module_class_name(type(child)),
                                "kwargs": {k: encode(v) for k, v in ctor_kwargs(child).items()}})
            else:
                modules.append({"path": cpath, "class": None})
                walk(cpath, child)

    walk("", gm)
    nodes = []
    for n in gm.graph.nodes:
        target: Any = n.target
        if n.op == "call_function":
            target = function_name(n.target)
        elif not isinstance(target, str):
            raise NeedsCode(f"node {n.name} ({n.op}) has a non-name target")
        nodes.append({"op": n.op, "name": n.name, "target": target, "args": encode(tuple(n.args)),
                      "kwargs": {k: encode(v) for k, v in n.kwargs.items()}})
    return {"format": "graphopt.graph", "format_version": GRAPH_FORMAT_VERSION, "class_name": class_name,
            "modules": modules, "tensors": tensors, "tied": facts["tied"], "frozen": facts["frozen"],
            "dtypes": facts["dtypes"], "memory_format": facts["memory_format"],
            "memory_format_kept": facts.get("memory_format_kept", []), "nodes": nodes}


def _owner(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def rebuild(doc: dict[str, Any]) -> fx.GraphModule:
    """The GraphModule ``doc`` (a ``graph.json`` document) describes, with uninitialised weights.

    Every class, function and method name is checked against the allowlists before use;
    :class:`NeedsCode` says what is outside them.
    """
    if not isinstance(doc, dict) or doc.get("format") != "graphopt.graph":
        raise NeedsCode("graph.json is not a graphopt graph description")
    if doc.get("format_version", 0) > GRAPH_FORMAT_VERSION:
        raise NeedsCode(f"graph.json was written by a newer graphopt (format {doc.get('format_version')})")
    class_name = doc.get("class_name")
    if not isinstance(class_name, str) or not _NAME.match(class_name) or keyword.iskeyword(class_name):
        raise NeedsCode(f"class name {class_name!r} is not an identifier")
    root = nn.Module()
    for m in doc.get("modules", []):
        path = _check_path(m.get("path"), "module")
        parent, _, leaf = path.rpartition(".")
        if m.get("class") is None:
            child = nn.Module()
        else:
            cls = resolve_module_class(m["class"])
            kwargs = {k: decode(v, {}) for k, v in (m.get("kwargs") or {}).items()}
            if not all(isinstance(k, str) and _NAME.match(k) for k in kwargs):
                raise NeedsCode(f"module {path}: constructor argument names are not identifiers")
            try:
                child = cls(**kwargs)
            except Exception as exc:
                raise NeedsCode(f"module {path}: {m['class']}(**kwargs) fails: {type(exc).__name__}: {exc}") from exc
        _owner(root, parent).add_module(leaf, child)
    for t in doc.get("tensors", []):
        owner = _owner(root, _check_path(t["owner"], "owner") if t["owner"] else "")
        name = t["name"]
        if not isinstance(name, str) or not _PATH_PART.match(name) or name.startswith("__"):
            raise NeedsCode(f"tensor name {name!r} is not a plain name")
        empty = torch.empty(tuple(int(s) for s in t["shape"]), dtype=_dtype(t["dtype"]))
        if t["kind"] == "parameter":
            owner.register_parameter(name, nn.Parameter(empty, requires_grad=empty.is_floating_point()
                                                        or empty.is_complex()))
        else:
            owner.register_buffer(name, empty, persistent=bool(t.get("persistent", True)))
    for name, dtype in (doc.get("dtypes") or {}).items():
        _check_path(name, "tensor")
        t = root.get_parameter(name) if name in dict(root.named_parameters()) else root.get_buffer(name)
        t.data = t.data.to(_dtype(str(dtype).replace("torch.", "")))
    for alias, source in (doc.get("tied") or {}).items():  # shared weights stay shared
        parent, _, leaf = _check_path(alias, "tied parameter").rpartition(".")
        setattr(_owner(root, parent), leaf, root.get_parameter(_check_path(source, "tied parameter")))
    for name in doc.get("frozen") or []:
        root.get_parameter(_check_path(name, "frozen parameter")).requires_grad_(False)
    if doc.get("memory_format") == "channels_last":
        root.to(memory_format=torch.channels_last)
        for path in doc.get("memory_format_kept") or []:  # modules that keep the layout they had
            root.get_submodule(_check_path(path, "module")).to(memory_format=torch.contiguous_format)

    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for n in doc.get("nodes", []):
        op, name, target = n.get("op"), n.get("name"), n.get("target")
        if not isinstance(name, str) or not _NAME.match(name) or keyword.iskeyword(name) or name in env:
            raise NeedsCode(f"node name {name!r} is not a fresh identifier")
        if op == "placeholder":
            if not isinstance(target, str) or not _PLACEHOLDER.match(target):
                raise NeedsCode(f"placeholder {target!r} is not an identifier")
        elif op in ("get_attr", "call_module"):
            target = _check_path(target, op)
        elif op == "call_method":
            target = _check_method(target)
        elif op == "call_function":
            target = resolve_function(target)
        elif op != "output":
            raise NeedsCode(f"unknown node kind {op!r}")
        args = decode(n.get("args", {"tuple": []}), env)
        kwargs = decode({"dict": [[k, v] for k, v in (n.get("kwargs") or {}).items()]}, env)
        if not isinstance(args, tuple) or not all(isinstance(k, str) and _NAME.match(k) for k in kwargs):
            raise NeedsCode(f"node {name}: malformed arguments")
        if target is builtins.getattr and (len(args) < 2 or not isinstance(args[1], str) or args[1].startswith("_")):
            raise NeedsCode(f"node {name}: getattr of a private or computed attribute")
        # torch.fx may rename a node that shadows a builtin ("input" -> "input_1"); references are by node
        env[name] = graph.create_node(op, target if op != "output" else "output", args, kwargs, name=name)
    graph.lint()
    gm = fx.GraphModule(root, graph, class_name)
    # GraphModule copies only what the graph references: adopt the whole tree (unused weights included)
    for cname, child in root.named_children():
        gm.add_module(cname, child)
    for pname, p in root.named_parameters(recurse=False):
        gm.register_parameter(pname, p)
    for bname, b in root.named_buffers(recurse=False):
        gm.register_buffer(bname, b, persistent=bname not in root._non_persistent_buffers_set)
    return gm
