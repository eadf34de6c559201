"""The PyTorch emitter: a folder with readable module source, a graph description, safetensors
weights and a manifest.

    out/
      module.py            standalone source to read: ``import torch`` (+ the imports the graph
                           itself calls, listed in the manifest), one nn.Module class
      graph.json           the same graph as data (modules, tensors, nodes; see graph_json)
      weights.safetensors  parameters and buffers (no pickle)
      manifest.json        versions, passes + options, verification, costs, policies, checksums

:func:`load` checks the files against the manifest's checksums (they catch corruption, not
tampering), then rebuilds the module from ``graph.json`` and the weights: it runs no code from
the folder. ``load(folder, trust_code=True)`` imports ``module.py`` instead (a folder whose
graph calls something outside the allowlists, e.g. a class of another package, has no
``graph.json`` and needs it). Both ways are loaded and compared with the graph before the folder
is moved into place, so a folder that exists is a folder that loads.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib.util
import inspect
import json
import keyword
import re
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import fx, nn

from graphopt.emit.base import EmitResult, Emitter
from graphopt.emit.fs import atomic_folder, manifest_header, read_manifest, sha256_file
from graphopt.emit.graph_json import GRAPH_FILE, NeedsCode, describe, rebuild
from graphopt.errors import ArtifactError, EmitError

__all__ = ["TorchEmitter", "emit_torch_folder", "load", "generate_source", "FORMAT", "FORMAT_VERSION",
           "MODULE_FILE", "GRAPH_FILE", "WEIGHTS_FILE", "MANIFEST_FILE"]

FORMAT = "graphopt.torch_folder"
FORMAT_VERSION = 1
MODULE_FILE = "module.py"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
_NONPERSISTENT = "__nonpersistent__."


# ----------------------------------------------------------------------------- constructors

def _mha_kwargs(m: nn.MultiheadAttention) -> dict[str, Any]:
    return {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "dropout": m.dropout,
            "bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None,
            "add_zero_attn": m.add_zero_attn, "kdim": m.kdim, "vdim": m.vdim, "batch_first": m.batch_first}


def _rnn_kwargs(m: nn.RNNBase) -> dict[str, Any]:
    """nn.LSTM / nn.GRU / nn.RNN take ``*args, **kwargs``: their arguments are the module's own attributes."""
    kwargs: dict[str, Any] = {"input_size": m.input_size, "hidden_size": m.hidden_size}
    defaults = {"num_layers": 1, "bias": True, "batch_first": False, "dropout": 0.0, "bidirectional": False}
    if isinstance(m, nn.LSTM):
        defaults["proj_size"] = 0
    if isinstance(m, nn.RNN):
        defaults["nonlinearity"] = "tanh"
    for name, default in defaults.items():
        v = getattr(m, name)
        if v != default or type(v) is not type(default):
            kwargs[name] = v
    return kwargs


_SPECIAL_KWARGS = {nn.MultiheadAttention: _mha_kwargs, nn.LSTM: _rnn_kwargs, nn.GRU: _rnn_kwargs,
                   nn.RNN: _rnn_kwargs}
_LITERALS = (bool, int, float, str, type(None))


def _literal(v: Any) -> bool:
    if isinstance(v, _LITERALS) or isinstance(v, torch.dtype):
        return True
    if isinstance(v, (tuple, list)):
        return all(_literal(x) for x in v)
    return False


def _ctor_kwargs(m: nn.Module) -> dict[str, Any]:
    cls = type(m)
    for special, fn in _SPECIAL_KWARGS.items():
        if cls is special:
            return fn(m)
    sig = inspect.signature(cls.__init__)
    kwargs: dict[str, Any] = {}
    for pname, param in list(sig.parameters.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or pname in ("device", "dtype"):
            continue
        if hasattr(m, pname):
            v = getattr(m, pname)
            if isinstance(v, torch.Tensor) or (v is None and isinstance(param.default, bool)):
                v = v is not None  # e.g. bias=True/False for Conv/Linear/LayerNorm
        elif param.default is not param.empty:
            continue
        else:
            raise EmitError(f"cannot tell constructor argument '{pname}' of {cls.__name__}")
        if not _literal(v):
            if param.default is not param.empty:
                continue
            raise EmitError(f"constructor argument '{pname}' of {cls.__name__} is {type(v).__name__}")
        if param.default is not param.empty and _literal(param.default) and v == param.default \
                and type(v) is type(param.default):
            continue
        kwargs[pname] = v
    return kwargs


def _fmt(v: Any) -> str:
    if isinstance(v, torch.dtype):
        return str(v)
    return repr(v)


class _Imports:
    """Names the generated file needs, each with its import line."""

    def __init__(self) -> None:
        self.lines: dict[str, str] = {}
        self.external: set[str] = set()

    def cls_ref(self, cls: type) -> str:
        if cls.__module__.startswith("torch.nn") and getattr(nn, cls.__name__, None) is cls:
            return f"nn.{cls.__name__}"
        if "<locals>" in cls.__qualname__ or cls.__module__.startswith("graphopt_user_model_"):
            raise EmitError(f"class {cls.__qualname__} is defined in the model file or inside a function, "
                            "not in an importable package, so standalone code cannot construct it",
                            fix="make the model fully traceable (no opaque modules) or move the class "
                                "into an installed package")
        alias = f"{cls.__module__.replace('.', '_')}_{cls.__qualname__.replace('.', '_')}"
        self.lines[alias] = f"from {cls.__module__} import {cls.__qualname__} as {alias}"
        self.external.add(cls.__module__.split(".")[0])
        return alias

    def add_global(self, name: str, obj: Any) -> None:
        if name in ("torch", "nn") or name in self.lines:
            return
        if getattr(builtins, name, None) is obj:
            return
        if isinstance(obj, float):
            self.lines[name] = f'{name} = float("{obj}")'
        elif obj is type(None):
            self.lines[name] = "NoneType = type(None)"
        elif isinstance(obj, ModuleType):
            self.lines[name] = f"import {obj.__name__} as {name}"
            self._note(obj.__name__)
        elif getattr(obj, "__module__", None) == "typing" or isinstance(obj, typing._SpecialForm):
            self.lines[name] = f"from typing import {getattr(obj, '_name', None) or obj.__name__} as {name}"
        elif hasattr(obj, "__module__") and hasattr(obj, "__qualname__") and "<locals>" not in obj.__qualname__:
            if obj.__module__.startswith("graphopt_user_model_"):
                raise EmitError(f"the graph calls {obj.__qualname__}, a function of the model file",
                                fix="move it into an importable package or make it a torch op")
            mod = obj.__module__
            if mod == "torch" and getattr(torch, obj.__qualname__, None) is obj:
                self.lines[name] = f"{name} = torch.{obj.__qualname__}"
            else:
                self.lines[name] = f"from {mod} import {obj.__qualname__} as {name}"
                self._note(mod)
        else:
            raise EmitError(f"the graph refers to {name!r} ({type(obj).__name__}), which cannot be written as source")

    def _note(self, module: str) -> None:
        top = module.split(".")[0]
        if top not in ("torch", "builtins", "math", "operator", "typing"):
            self.external.add(top)


def _path_expr(path: str) -> str:
    if not path:
        return "self"
    parts = path.split(".")
    if all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        return "self." + path
    return f"self.get_submodule({path!r})"


def _tensor_decl(t: torch.Tensor) -> str:
    return f"torch.empty({tuple(t.shape)!r}, dtype={t.dtype})"


def generate_source(gm: fx.GraphModule, class_name: str, header: str = "") -> tuple[str, dict[str, Any]]:
    """Python source for ``gm`` and facts the manifest needs (tied params, frozen, imports)."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    imports = _Imports()
    init: list[str] = []

    def build(path: str, module: nn.Module) -> None:
        for pname, p in module.named_parameters(recurse=False):
            if p is None:
                continue
            init.append(f"{_path_expr(path)}.register_parameter({pname!r}, nn.Parameter({_tensor_decl(p)}))")
        nonpersistent = getattr(module, "_non_persistent_buffers_set", set())
        for bname, b in module.named_buffers(recurse=False):
            if b is None:
                continue
            extra = ", persistent=False" if bname in nonpersistent else ""
            init.append(f"{_path_expr(path)}.register_buffer({bname!r}, {_tensor_decl(b)}{extra})")
        for cname, child in module.named_children():
            cpath = f"{path}.{cname}" if path else cname
            if cpath in called:
                try:
                    ref = imports.cls_ref(type(child))
                    kwargs = _ctor_kwargs(child)
                except EmitError as exc:
                    raise EmitError(f"module '{cpath}' ({type(child).__name__}): {exc.what}",
                                    fix=exc.fix or "report it: this module type needs a constructor rule") from exc
                ctor = f"{ref}({', '.join(f'{k}={_fmt(v)}' for k, v in kwargs.items())})"
                _check_ctor(cpath, child, ctor, imports)
            else:
                ctor = "nn.Module()"
            if path == "" and cname.isidentifier() and not keyword.iskeyword(cname):
                init.append(f"self.{cname} = {ctor}")
            else:
                init.append(f"{_path_expr(path)}.add_module({cname!r}, {ctor})")
            if cpath not in called:
                build(cpath, child)

    build("", gm)

    # tied (shared) parameters: construct separately, then re-tie
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        if id(p) in seen and seen[id(p)] != name:
            tied[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    frozen = [n for n, p in gm.named_parameters() if not p.requires_grad]
    default = torch.get_default_dtype()
    retype = {n: str(t.dtype) for n, t in list(gm.named_parameters()) + list(gm.named_buffers())
              if t.is_floating_point() and t.dtype != default}
    meta = gm.meta.get("graphopt", {})
    channels_last = meta.get("memory_format") == "channels_last"

    pc = gm.graph.python_code(root_module="self")
    body = pc.src
    for gname, obj in pc.globals.items():
        if re.search(rf"\b{re.escape(gname)}\b", body):
            imports.add_global(gname, obj)
    wraps = [ln for ln in body.splitlines() if ln.startswith("torch.fx._symbolic_trace.wrap(")]
    body = "\n".join(ln for ln in body.splitlines() if ln not in wraps)
    body = "\n".join(("    " + line) if line.strip() else "" for line in body.strip("\n").splitlines())

    out = [header.rstrip(), "import torch", "import torch.nn as nn"]
    out += sorted(imports.lines.values())
    if wraps:  # keep the emitted module re-traceable by torch.fx exactly as captured
        out += [""] + wraps
    out += ["", ""]
    if frozen:
        out.append(f"FROZEN = {json.dumps(frozen, indent=4)}")
    if tied:
        out.append(f"TIED = {json.dumps(tied, indent=4)}")
    if retype:
        out.append("DTYPES = {\n" + "".join(f"    {k!r}: {v},\n" for k, v in retype.items()) + "}")
    if frozen or tied or retype:
        out += ["", ""]
    out.append(f"class {class_name}(nn.Module):")
    out.append("    def __init__(self):")
    out.append("        super().__init__()")
    out += [f"        {line}" for line in init]
    if retype:
        out.append("        for name, dtype in DTYPES.items():")
        out.append("            t = self.get_parameter(name) if name in dict(self.named_parameters()) else self.get_buffer(name)")
        out.append("            t.data = t.data.to(dtype)")
    if tied:
        out.append("        for alias, source in TIED.items():  # shared weights stay shared")
        out.append("            parent, _, leaf = alias.rpartition('.')")
        out.append("            setattr(self.get_submodule(parent), leaf, self.get_parameter(source))")
    if frozen:
        out.append("        for name in FROZEN:  # frozen by graphopt (transfer learning)")
        out.append("            self.get_parameter(name).requires_grad_(False)")
    if channels_last:
        out.append("        self.to(memory_format=torch.channels_last)")
        for path in meta.get("memory_format_kept", []):  # opaque modules keep the layout they had
            out.append(f"        self.get_submodule({path!r}).to(memory_format=torch.contiguous_format)")
    out.append("")
    out.append(body)
    out.append("")
    facts = {"tied": tied, "frozen": frozen, "dtypes": retype, "imports": sorted(imports.external),
             "memory_format": "channels_last" if channels_last else "contiguous",
             "memory_format_kept": list(meta.get("memory_format_kept", [])) if channels_last else []}
    return "\n".join(out), facts


def _check_ctor(path: str, module: nn.Module, ctor: str, imports: _Imports) -> None:
    ns: dict[str, Any] = {"torch": torch, "nn": nn}
    for line in imports.lines.values():
        exec(line, ns)  # noqa: S102 - our own import lines
    try:
        rebuilt = eval(ctor, ns)  # noqa: S307 - our own generated constructor
    except Exception as exc:
        raise EmitError(f"module '{path}': generated constructor `{ctor}` fails: {exc}") from exc
    same_state = [(k, tuple(v.shape)) for k, v in rebuilt.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in module.state_dict().items()]
    if repr(rebuilt) != repr(module) or not same_state:
        raise EmitError(f"module '{path}': generated constructor `{ctor}` does not rebuild {repr(module)[:80]}",
                        fix="report it: this module type needs a constructor rule")


# ----------------------------------------------------------------------------- emit / load

def _class_name(gm: fx.GraphModule) -> str:
    src = gm.meta.get("graphopt", {}).get("source_class", "")
    base = src.rsplit(".", 1)[-1] if src else type(gm).__name__
    base = re.sub(r"\W", "_", base) or "Model"
    if not base[0].isalpha():
        base = "M" + base
    return f"Optimized{base[0].upper()}{base[1:]}"


def _weights(gm: fx.GraphModule, tied: dict[str, str]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    state = gm.state_dict(keep_vars=False)
    for k, v in state.items():
        if k in tied:
            continue
        tensors[k] = v.detach().to("cpu").contiguous()
    for mname, mod in gm.named_modules():
        for bname in getattr(mod, "_non_persistent_buffers_set", set()):
            b = getattr(mod, bname, None)
            if isinstance(b, torch.Tensor):
                key = f"{mname}.{bname}" if mname else bname
                tensors[_NONPERSISTENT + key] = b.detach().to("cpu").contiguous()
    return tensors


def emit_torch_folder(gm: fx.GraphModule, out: str | Path, *, report: Any = None, force: bool = False,
                      source: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                      check_inputs: tuple[torch.Tensor, ...] | None = None) -> Path:
    """Write ``gm`` as a torch folder at ``out`` (atomically) and return the path.

    ``report``: the PipelineReport (passes, verification, costs) for the manifest.
    ``check_inputs``: inputs to compare the reloaded module with ``gm`` (default: the graph's
    example inputs); a mismatch aborts and leaves nothing behind.
    """
    from graphopt import __version__

    class_name = _class_name(gm)
    header = (f'"""{class_name}: generated by graphopt {__version__} (torch {torch.__version__}).\n\n'
              f"Load with `graphopt.load(folder)`, or import this file and\n"
              f"`model.load_state_dict(safetensors.torch.load_file('weights.safetensors'))`.\n\"\"\"\n")
    source_code, facts = generate_source(gm, class_name, header)
    try:
        graph_doc: dict[str, Any] | None = describe(gm, class_name, facts, _ctor_kwargs)
        needs_code = None
    except NeedsCode as exc:
        graph_doc, needs_code = None, str(exc)
    meta = gm.meta.get("graphopt", {})
    with atomic_folder(out, force) as tmp:
        (tmp / MODULE_FILE).write_text(source_code)
        files = {MODULE_FILE: sha256_file(tmp / MODULE_FILE)}
        if graph_doc is not None:
            (tmp / GRAPH_FILE).write_text(json.dumps(graph_doc, indent=1))
            files[GRAPH_FILE] = sha256_file(tmp / GRAPH_FILE)
        tensors = _weights(gm, facts["tied"])
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        files[WEIGHTS_FILE] = sha256_file(tmp / WEIGHTS_FILE)
        cost = meta.get("cost")
        manifest: dict[str, Any] = {
            **manifest_header(FORMAT, FORMAT_VERSION, meta, source),
            "class_name": class_name,
            "inputs": meta.get("inputs", []),
            "files": files,
            "declarative": needs_code is None,
            "needs_code": needs_code,
            "imports": facts["imports"],
            "frozen": facts["frozen"],
            "tied": facts["tied"],
            "dtypes": facts["dtypes"],
            "memory_format": facts["memory_format"],
            "precision": meta.get("precision"),
            "opaque": [{"module": k, **v} for k, v in meta.get("opaque", {}).items()],
            "cost": cost.as_dict() if cost is not None else None,
        }
        if report is not None:
            manifest["verified"] = report.verified
            manifest["cost_before"] = report.before.as_dict()
            manifest["passes"] = [r.as_dict() for r in report.records]
        if extra:
            manifest.update(extra)
        from graphopt.serialize import write_json

        write_json(tmp / MANIFEST_FILE, manifest)
        # the folder must load (both ways) and compute what the graph computes before it is moved into place
        reloaded = [load(tmp, trust_code=True)]  # our own module.py, written just now
        if graph_doc is not None:
            reloaded.append(load(tmp))
        inputs = check_inputs if check_inputs is not None else meta.get("example_inputs")
        if inputs is not None:
            for net in reloaded:
                _check_same(gm, net, tuple(inputs))
    return Path(out)


class TorchEmitter(Emitter):
    """``--emit torch`` (the default): readable module source, graph.json, safetensors, manifest."""

    name = "torch"
    description = "graphopt torch folder: module.py (to read), graph.json + weights.safetensors (graphopt.load)"

    def emit(self, gm: fx.GraphModule, out: str | Path, *, report: Any = None, force: bool = False,
             source: dict[str, Any] | None = None, spec: Any = None) -> EmitResult:
        path = emit_torch_folder(gm, out, report=report, force=force, source=source)
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        return EmitResult(path, self.name, details={"needs_code": manifest.get("needs_code")})

    def summary(self, result: EmitResult) -> str:
        reason = result.details.get("needs_code")
        if reason:
            return (f"note: graphopt.load needs trust_code=True for this folder (it runs module.py): {reason}")
        return ""


def _check_same(gm: fx.GraphModule, reloaded: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    from graphopt.verify import max_rel_error, run_with_grads

    a, _ = run_with_grads(gm, inputs, False)
    b, _ = run_with_grads(reloaded, inputs, False)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise EmitError("the emitted module's outputs do not have the graph's shapes",
                        fix="report this emitter bug")
    err = max_rel_error([y for y in b if y.is_floating_point()], [x for x in a if x.is_floating_point()])
    if err > 1e-5:
        raise EmitError(f"the emitted module differs from the graph (max relative error {err:.2e})",
                        fix="report this emitter bug")


def _read_manifest(folder: Path) -> dict[str, Any]:
    return read_manifest(folder, fmt=FORMAT, version=FORMAT_VERSION, what="graphopt torch folder",
                         emit_hint="graphopt optimize -o")


def _from_graph(folder: Path) -> nn.Module:
    try:
        doc = json.loads((folder / GRAPH_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{GRAPH_FILE} is not valid JSON ({exc})", where=str(folder), fix="re-emit the folder") from exc
    try:
        return rebuild(doc)
    except NeedsCode as exc:
        raise ArtifactError(f"rebuilding this model needs code ({exc}); the default load runs none", where=str(folder),
                            fix="pass trust_code=True (CLI: --trust-code) if you trust the folder's module.py, "
                                "or re-emit the folder") from None
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise ArtifactError(f"{GRAPH_FILE} does not describe a model ({type(exc).__name__}: {exc})", where=str(folder),
                            fix="re-emit the folder") from exc


def _from_code(folder: Path, manifest: dict[str, Any]) -> nn.Module:
    """Import the folder's module.py (trust_code=True: this runs the file)."""
    if "torchvision" in manifest.get("imports", []):
        from graphopt.zoo import import_torchvision
        import_torchvision()
    code = (folder / MODULE_FILE).read_text()
    mod_name = "graphopt_emitted_" + hashlib.sha256(code.encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(mod_name, folder / MODULE_FILE)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        cls = getattr(module, manifest["class_name"])
        return cls()
    except Exception as exc:
        raise ArtifactError(f"{MODULE_FILE} does not build the model: {type(exc).__name__}: {exc}",
                            where=str(folder), fix="re-emit the folder (is a package it imports missing?)") from exc


def load(folder: str | Path, *, verify_checksums: bool = True, trust_code: bool = False) -> nn.Module:
    """Rebuild the module a torch folder holds. No pickle, and by default no code from the folder.

    The files are checked against the manifest's checksums (corruption; not tampering: whoever can
    change the files can change the manifest). The module is then rebuilt from ``graph.json``,
    whose classes and functions are checked against allowlists (``torch.nn``, tensor operators,
    graphopt's own modules): nothing in the folder is executed. ``trust_code=True`` imports the
    folder's ``module.py`` instead, running whatever it holds: only for folders you trust.
    The module is in training mode with the manifest at ``module.graphopt_manifest``.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    files = manifest.get("files", {})
    wanted = [MODULE_FILE if trust_code else GRAPH_FILE, WEIGHTS_FILE]
    for fname in [f for f in files if f not in wanted] + wanted:
        fpath = folder / fname
        if fname == GRAPH_FILE and fname not in files:
            reason = manifest.get("needs_code") or "the folder was written by a graphopt without graph.json"
            raise ArtifactError(f"rebuilding this model needs code ({reason}); the default load runs none",
                                where=str(folder), fix="pass trust_code=True (CLI: --trust-code) if you trust the "
                                "folder's module.py, or re-emit the folder")
        if not fpath.is_file():
            raise ArtifactError(f"{fname} is missing", where=str(folder), fix="re-emit the folder")
        if verify_checksums and files.get(fname) and sha256_file(fpath) != files[fname]:
            raise ArtifactError(f"{fname} does not match the manifest's checksum (modified or corrupt)",
                                where=str(folder), fix="re-emit the folder, or load(..., verify_checksums=False)")
    net = _from_code(folder, manifest) if trust_code else _from_graph(folder)
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{WEIGHTS_FILE} cannot be read ({exc})", where=str(folder),
                            fix="re-emit the folder") from exc
    nonpersistent = {k[len(_NONPERSISTENT):]: v for k, v in tensors.items() if k.startswith(_NONPERSISTENT)}
    state = {k: v for k, v in tensors.items() if not k.startswith(_NONPERSISTENT)}
    tied = manifest.get("tied", {})
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc)[:200])
        raise ArtifactError(f"weights do not match the code: {first}", where=str(folder),
                            fix="re-emit the folder; do not mix files of different runs") from exc
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})")
        raise ArtifactError(f"weights do not match the code: {', '.join(parts)}", where=str(folder),
                            fix="re-emit the folder; do not mix files of different runs")
    for name, value in nonpersistent.items():
        parent, _, leaf = name.rpartition(".")
        owner = net.get_submodule(parent) if parent else net
        getattr(owner, leaf).copy_(value)
    net.graphopt_manifest = manifest  # type: ignore[attr-defined]
    net.train()
    return net
