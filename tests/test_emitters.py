"""Emitters and training backends are plug-ins: found through a registry, never hard-coded."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.bench import backend as backends
from graphopt.cli import main
from graphopt.emit import base as emit_base
from graphopt.emit import EmitResult, Emitter, create_emitter, emitter_names, get_emitter, register_emitter
from graphopt.emit.fs import atomic_folder
from graphopt.errors import PassConfigError
from graphopt.pass_infra import Option

from graphopt.testing import write_model_file


@pytest.fixture
def model_file(tmp_path):
    return write_model_file(tmp_path)  # the CLI tests' model file (graphopt.testing.SMALL_CNN_MODEL: conv, bn, fc)


class NodeStats(Emitter):
    """A plug-in emitter as a user package would write it: counts of node kinds as JSON."""

    name = "node_stats"
    description = "node counts per op kind"
    options = {"indent": Option(int, 2, "JSON indentation", min=0), "ops": Option(list, [], "only these op kinds")}
    preflight_calls: list[list[str]] = []

    def preflight(self, passes=()):
        NodeStats.preflight_calls.append([p.name for p in passes])

    def emit(self, gm, out, *, report=None, force=False, source=None, spec=None):
        counts: dict[str, int] = {}
        for n in gm.graph.nodes:
            if not self.config["ops"] or n.op in self.config["ops"]:
                counts[n.op] = counts.get(n.op, 0) + 1
        with atomic_folder(out, force) as tmp:
            (tmp / "stats.json").write_text(json.dumps({"counts": counts, "passes": [r.name for r in report.records],
                                                        "model": source["file"]}, indent=self.config["indent"]))
        return EmitResult(Path(out), self.name, details={"nodes": sum(counts.values())})

    def summary(self, result):
        return f"node_stats: {result.details['nodes']} nodes counted"


@pytest.fixture
def registered():
    NodeStats.preflight_calls.clear()
    register_emitter(NodeStats)
    yield NodeStats
    emit_base.unregister_emitter("node_stats")


def test_builtin_emitters_come_from_entry_points():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="graphopt.emitters")}
    assert {"torch", "onnx", "ort", "pipeline"} <= set(eps)
    for name in ("torch", "onnx", "ort", "pipeline"):
        cls = get_emitter(name)
        assert issubclass(cls, Emitter) and cls.name == name
        assert f"{cls.__module__}:{cls.__qualname__}" == eps[name]


def test_cli_uses_an_emitter_registered_at_run_time(registered, model_file, tmp_path, capsys):
    out = tmp_path / "stats"
    code = main(["optimize", str(model_file), "-p", "cleanup", "--emit", "node_stats", "--emit-option", "indent=0",
                 "--emit-option", "ops=call_module|placeholder", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads((out / "stats.json").read_text())
    assert doc["counts"] == {"placeholder": 1, "call_module": 3}  # conv, bn, fc (cleanup changes nothing here)
    assert doc["passes"] == ["cleanup"] and doc["model"] == str(model_file)
    assert (out / "stats.json").read_text() == json.dumps(doc, indent=0)  # indent=0 was parsed as an int
    assert "node_stats: 4 nodes counted" in captured.out and "wrote" in captured.out
    assert registered.preflight_calls == [["cleanup"]]
    assert "node_stats" in emitter_names()


def test_emitter_options_are_typed_and_checked_before_any_work(registered, model_file, tmp_path, capsys):
    code = main(["optimize", str(model_file), "-p", "cleanup", "--emit", "node_stats", "--emit-option", "indent=-1",
                 "-o", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "below the minimum" in err and err.count("\n") == 1
    code = main(["optimize", str(model_file), "-p", "cleanup", "--emit", "node_stats", "--emit-option", "nope=1",
                 "-o", str(tmp_path / "b")])
    out = capsys.readouterr()
    assert code == 2 and "unknown --emit-option 'nope' for --emit node_stats" in out.err
    assert "captured" not in out.out  # refused before the model was even loaded
    assert registered.preflight_calls == []
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_entry_point_emitter_is_found(monkeypatch, model_file, tmp_path):
    """A package's entry point (here a fake one pointing at the built-in torch emitter class)."""
    real = emit_base._registry.entry_points()
    fake = metadata.EntryPoint(name="torch_copy", value="graphopt.emit.torch_folder:TorchEmitter",
                               group="graphopt.emitters")
    monkeypatch.setattr(emit_base._registry, "entry_points", lambda: {**real, "torch_copy": fake})
    try:
        assert "torch_copy" in emitter_names()
        assert main(["optimize", str(model_file), "-p", "cleanup", "--emit", "torch_copy", "-o",
                     str(tmp_path / "o")]) == 0
        assert graphopt.load(tmp_path / "o").graphopt_manifest["format"] == "graphopt.torch_folder"
    finally:
        emit_base.unregister_emitter("torch_copy")


def test_a_broken_entry_point_is_one_line(monkeypatch):
    fake = metadata.EntryPoint(name="broken", value="no_such_package.emitters:Thing", group="graphopt.emitters")
    monkeypatch.setattr(emit_base._registry, "entry_points", lambda: {"broken": fake})
    with pytest.raises(PassConfigError, match="emitter 'broken' is installed but failed to load: ModuleNotFound"):
        get_emitter("broken")
    assert "broken" not in emit_base.available_emitters()


def test_pipeline_emit_without_partition_is_refused_before_any_pass(model_file, tmp_path, capsys, monkeypatch):
    import graphopt.manager as manager

    def boom(*a, **k):
        raise AssertionError("a pass ran")

    monkeypatch.setattr(manager.PassManager, "run", boom)
    code = main(["optimize", str(model_file), "-p", "cleanup", "--emit", "pipeline", "-o", str(tmp_path / "p")])
    captured = capsys.readouterr()
    assert code == 2
    assert "--emit pipeline: the pipeline has no partition pass" in captured.err
    assert "-p partition:stages=2" in captured.err
    assert "captured" not in captured.out and not (tmp_path / "p").exists()
    with pytest.raises(PassConfigError, match="no partition pass"):
        create_emitter("pipeline").preflight([])


def test_torch_emitter_takes_no_options():
    with pytest.raises(PassConfigError, match="unknown --emit-option 'opset' for --emit torch"):
        create_emitter("torch", {"opset": "17"})
    assert create_emitter("onnx", {"dynamic_batch": "false", "opset": "13"}).config == {"opset": 13,
                                                                                       "dynamic_batch": False}


# ----------------------------------------------------------------------------- training backends

def test_builtin_backends_come_from_entry_points():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="graphopt.backends")}
    assert {"torch", "ort"} <= set(eps) and {"torch", "ort"} <= set(backends.backend_names())
    from graphopt.bench.torch_backend import TorchBackend

    assert backends.get_backend("torch") == TorchBackend.from_config
    assert not hasattr(backends, "BACKENDS")


def test_a_backend_registered_at_run_time_trains(small_cnn):
    from graphopt.bench.torch_backend import TorchBackend
    from graphopt.bench.train import TrainConfig

    made = []

    def factory(module, config, *, loss=None, example_inputs=None):
        made.append(config.lr)
        return TorchBackend.from_config(module, config, loss=loss, example_inputs=example_inputs)

    backends.register_backend("mine", factory)
    try:
        module, inputs = small_cnn
        b = backends.create_backend("mine", module, TrainConfig(lr=0.05, optimizer="sgd"))
        loss0 = b.train_step(inputs, torch.tensor([1, 2]), 0.05)
        loss1 = b.train_step(inputs, torch.tensor([1, 2]), 0.05)
        assert made == [0.05] and loss1 < loss0
        assert "mine" in backends.backend_names()
    finally:
        backends.unregister_backend("mine")
    with pytest.raises(PassConfigError, match="unknown training backend 'nope'.*torch"):
        backends.create_backend("nope", None, None)
