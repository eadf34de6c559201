"""The model-file convention.

A model file is a Python file that defines

- ``model()`` returning an ``nn.Module`` (``FILE.py:NAME`` picks another factory),
- ``example_inputs()`` returning a tensor, a tuple of tensors, or a dict of keyword inputs
  (HuggingFace style: ``{"input_ids": ..., "attention_mask": ...}``; the model is then called as
  ``model(**inputs)`` and seen positionally in the dict's order, see :class:`KeywordInputs`),
- optionally ``loss(output, target)`` and ``data()`` returning ``(train_dataset, test_dataset)``
  for the training benchmarks.

Every way this can go wrong ends in a one-line :class:`ModelFileError` that points at the
user's own source line. (This module is ``modelfile`` rather than DESIGN.md's ``load`` so that
it does not collide with the public function ``graphopt.load``.)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import linecache
import logging
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from graphopt.errors import ModelFileError
from graphopt.ir import eval_mode

__all__ = ["ModelSpec", "KeywordInputs", "plain_outputs", "load_model_file", "load_model_or_folder",
           "remember_source", "user_frame", "model_file_context"]

_IMPORTS_TORCHVISION = re.compile(r"^[ \t]*(?:import|from)[ \t]+[^\n#]*\b(?:torchvision|timm)\b", re.MULTILINE)


@contextlib.contextmanager
def model_file_context(path: Path, source: str | None = None) -> Any:
    """What importing (and calling) a model file needs, as ``python model.py`` would give it.

    - The file's folder is first on ``sys.path`` while the file is imported and its factories
      run, so ``from helpers import make`` finds ``helpers.py`` next to the model file
      (removed again afterwards; the imported modules stay loaded).
    - A file importing ``torchvision`` (or timm, which imports it) gets
      :func:`graphopt.zoo.import_torchvision` first: the PyPI torchvision wheel is a CUDA build
      whose compiled ops (``torchvision::nms``) do not exist on a CPU-only torch; the zoo import
      then replaces the two op-registration modules by empty ones, which classification models
      never use. A working torchvision is imported unchanged.
    """
    folder = str(path.resolve().parent)
    if source is not None and _IMPORTS_TORCHVISION.search(source) and "torchvision" not in sys.modules:
        try:
            from graphopt.zoo import import_torchvision

            import_torchvision()
        except Exception:  # not installed or still broken: the file's own import reports it
            pass
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)


def _exit_error(exc: SystemExit, path: Path, what: str) -> ModelFileError:
    loc = user_frame(exc, path) or path.name
    return ModelFileError(f"{what} called sys.exit({exc.code!r})", where=loc,
                          fix="a model file must define functions, not end the program: remove the exit")



def plain_outputs(value: Any) -> Any:
    """Outputs with HuggingFace ``ModelOutput`` (and other dict subclasses) as plain dicts of their
    non-None fields, recursively: the documented output structure of a captured graph."""
    if isinstance(value, dict):
        return {k: plain_outputs(v) for k, v in value.items() if v is not None}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(plain_outputs(v) for v in value)
    if isinstance(value, list):
        return [plain_outputs(v) for v in value]
    return value


class KeywordInputs(nn.Module):
    """A model called with keyword inputs (``model(**example_inputs())``), seen positionally in the
    order of ``names`` (what the rest of graphopt passes around), outputs as :func:`plain_outputs`.
    Capture unwraps it: the graph is rooted at ``model`` (original parameter names) and its
    placeholders are named after the keywords."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, *args: Any) -> Any:
        return plain_outputs(self.model(**dict(zip(self.names, args))))


@dataclass
class ModelSpec:
    """What a model file provides."""

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    path: Path | None = None
    factory: str = "model"
    loss: Callable[..., torch.Tensor] | None = None
    data: Callable[[], Any] | None = None
    sha256: str | None = None
    namespace: dict[str, Any] = field(default_factory=dict, repr=False)
    folder: Path | None = None  # set when loaded from a graphopt folder (load_model_or_folder)
    input_names: tuple[str, ...] | None = None  # keyword inputs: module is a KeywordInputs wrapper

    def calibration_batches(self) -> "CalibrationData":
        """Input batches (inputs only, no targets) from ``data()``'s training set, lazily."""
        return CalibrationData(self)


class CalibrationData:
    """Iterable of input tuples drawn from a model file's ``data()`` (built on first use)."""

    def __init__(self, spec: "ModelSpec"):
        self.spec = spec
        self._loader = None

    def __iter__(self):
        if self._loader is None:
            from torch.utils.data import DataLoader

            train = self.spec.data()[0]  # type: ignore[misc]
            batch = self.spec.example_inputs[0].shape[0] if self.spec.example_inputs[0].dim() else 1
            self._loader = DataLoader(train, batch_size=max(batch, 1), shuffle=False)
        for item in self._loader:
            x = item[0] if isinstance(item, (tuple, list)) else item
            yield (x,)

    def __deepcopy__(self, memo):
        return self


def user_frame(exc: BaseException, filename: str | Path | None = None) -> str | None:
    """``file:line `code``` of the deepest traceback frame in ``filename`` (or outside torch).

    Used to show the user *their* failing line rather than a frame deep inside torch.
    """
    tb = traceback.extract_tb(exc.__traceback__)
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        code = (exc.text or linecache.getline(exc.filename, exc.lineno)).strip()
        return f"{Path(exc.filename).name}:{exc.lineno} `{code}`"
    torch_dir = str(Path(torch.__file__).parent)
    graphopt_dir = str(Path(__file__).parent)
    chosen = None
    for fr in tb:
        if filename is not None:
            if Path(fr.filename).resolve() == Path(filename).resolve():
                chosen = fr
        elif not fr.filename.startswith((torch_dir, graphopt_dir, "<")):
            chosen = fr
    if chosen is None:
        return None
    code = (chosen.line or "").strip()
    return f"{Path(chosen.filename).name}:{chosen.lineno} `{code}`"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _as_inputs(value: Any, where: str) -> tuple[torch.Tensor, ...]:
    if isinstance(value, dict) and value and all(isinstance(k, str) and k.isidentifier() for k in value):
        bad = [k for k, v in value.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ModelFileError(f"example_inputs()['{bad[0]}'] is {type(value[bad[0]]).__name__}, not a tensor",
                                 where=where, fix="return only tensors (leave optional inputs out of the dict)")
        return tuple(value.values())
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise ModelFileError(
        f"example_inputs() returned {type(value).__name__}, not a tensor, a tuple of tensors or a dict of them",
        where=where,
        fix="return e.g. (torch.randn(8, 3, 224, 224),)",
    )


def _call(fn: Callable, path: Path, what: str) -> Any:
    try:
        with model_file_context(path):
            return fn()
    except SystemExit as exc:
        raise _exit_error(exc, path, what) from None
    except Exception as exc:  # the user's code failed: show their line
        loc = user_frame(exc, path) or path.name
        raise ModelFileError(f"{what} raised {_describe(exc)}", where=loc,
                             fix="fix the model file and run again") from exc


def load_model_file(spec: str | Path, *, check_forward: bool = True) -> ModelSpec:
    """Load ``FILE.py`` or ``FILE.py:factory`` and check that its inputs run through its model."""
    text = str(spec)
    factory = "model"
    if ":" in text and not Path(text).exists():
        text, factory = text.rsplit(":", 1)
        if not factory.isidentifier():
            raise ModelFileError(f"'{factory}' is not a valid function name", where=str(spec),
                                 fix="use FILE.py:NAME with NAME a function in the file")
    path = Path(text)
    if not path.exists():
        raise ModelFileError("model file not found", where=str(path), fix="check the path")
    if path.is_dir() or path.suffix != ".py":
        raise ModelFileError("not a Python file", where=str(path),
                             fix="pass a .py file that defines model() and example_inputs()")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    mod_name = f"graphopt_user_model_{digest[:12]}"
    ispec = importlib.util.spec_from_file_location(mod_name, path)
    if ispec is None or ispec.loader is None:  # pragma: no cover - defensive
        raise ModelFileError("cannot import file", where=str(path))
    module = importlib.util.module_from_spec(ispec)
    sys.modules[mod_name] = module  # dataclasses and pickling-free helpers need it
    try:
        with model_file_context(path, data.decode("utf-8", "replace")):
            ispec.loader.exec_module(module)
    except SystemExit as exc:
        sys.modules.pop(mod_name, None)
        raise _exit_error(exc, path, "the model file") from None
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        loc = user_frame(exc, path) or path.name
        raise ModelFileError(f"importing the model file failed: {_describe(exc)}", where=loc,
                             fix="fix the model file (is a package missing?) and run again") from exc
    ns = vars(module)
    fn = ns.get(factory)
    if not callable(fn):
        found = sorted(k for k, v in ns.items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == mod_name)
        raise ModelFileError(
            f"no function '{factory}()' defined",
            where=str(path),
            fix=f"define {factory}() returning an nn.Module, or pick one with {path.name}:NAME"
            + (f" (functions found: {', '.join(found)})" if found else ""),
        )
    net = _call(fn, path, f"{factory}()")
    if not isinstance(net, nn.Module):
        raise ModelFileError(f"{factory}() returned {type(net).__name__}, not a torch.nn.Module",
                             where=str(path), fix="return the model instance")
    ex = ns.get("example_inputs")
    if not callable(ex):
        raise ModelFileError("no function 'example_inputs()' defined", where=str(path),
                             fix="define example_inputs() returning a tuple of input tensors")
    raw = _call(ex, path, "example_inputs()")
    inputs = _as_inputs(raw, str(path))
    names = tuple(raw) if isinstance(raw, dict) else None
    if names is not None:
        net = KeywordInputs(net, names)
    loss = ns.get("loss")
    data_fn = ns.get("data")
    result = ModelSpec(
        module=net, example_inputs=inputs, path=path.resolve(), factory=factory,
        loss=loss if callable(loss) else None, data=data_fn if callable(data_fn) else None,
        sha256=digest, namespace=ns, input_names=names,
    )
    if check_forward:
        check_runs(net, inputs, where=f"{path.name}:{factory}()")
    return result


def check_runs(net: nn.Module, inputs: tuple[torch.Tensor, ...], where: str) -> None:
    """Run the model once (eval mode, no grad) and turn a failure into a one-line error."""
    try:
        with eval_mode(net), torch.no_grad():
            net(*inputs)
    except SystemExit as exc:
        raise _exit_error(exc, Path(where.split(":")[0]), "the model's forward()") from None
    except Exception as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs)
        loc = user_frame(exc) or where
        raise ModelFileError(
            f"example inputs [{shapes}] do not run through the model: {_describe(exc)}",
            where=loc, fix="make example_inputs() match what forward() expects",
        ) from exc


def _is_folder(text: str) -> bool:
    p = Path(text)
    return p.is_dir() and (p / "manifest.json").is_file()


def load_model_or_folder(spec: str | Path, *, trust_code: bool = False, check_forward: bool = True) -> ModelSpec:
    """``MODEL.py[:FACTORY]`` as :func:`load_model_file`, or a graphopt torch folder (from
    ``graphopt train -o`` / ``optimize -o``): its module (``graphopt.load``, no code run unless
    ``trust_code``) with the example inputs, ``data()`` and ``loss()`` of the model file it came
    from (the manifest's ``source``)."""
    text = str(spec)
    if not _is_folder(text):
        return load_model_file(spec, check_forward=check_forward)
    import json

    from graphopt.emit.torch_folder import load

    folder = Path(text)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"manifest.json cannot be read ({exc})", where=str(folder),
                             fix="re-create the folder with graphopt optimize -o / train -o") from exc
    source = manifest.get("source") or {}
    file = source.get("file")
    if not file:
        raise ModelFileError("the folder does not say which model file it came from (no source in manifest.json)",
                             where=str(folder), fix="re-create it with graphopt optimize -o or train -o")
    if not Path(file).is_file():
        raise ModelFileError(f"the folder's model file moved: expected {file}", where=str(folder),
                             fix="put the model file back at that path, or re-create the folder from its new place")
    base = load_model_file(f"{file}:{source.get('factory') or 'model'}", check_forward=False)
    if source.get("sha256") and base.sha256 != source["sha256"]:
        logging.getLogger(__name__).warning("%s changed since %s was written (data()/loss() are today's)",
                                            file, folder)
    net = load(folder, trust_code=trust_code)
    result = ModelSpec(module=net, example_inputs=base.example_inputs, path=base.path, factory=base.factory,
                       loss=base.loss, data=base.data, sha256=base.sha256, namespace=base.namespace,
                       folder=folder.resolve())
    if check_forward:
        check_runs(net, result.example_inputs, where=str(folder))
    return result


def remember_source(folder: str | Path, spec: ModelSpec) -> None:
    """Record in a torch folder's manifest the model file ``spec`` came from (for chaining)."""
    import json

    from graphopt.serialize import write_json

    path = Path(folder) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["source"] = {**(manifest.get("source") or {}), "file": str(spec.path), "sha256": spec.sha256,
                          "factory": spec.factory}
    write_json(path, manifest)
