"""graphopt.serialize (the one strict JSON writer), and every JSON the CLI writes parsed strictly.

A strict parser refuses the Infinity/NaN tokens Python's json module writes by default; graphopt
writes non-finite numbers as the strings "inf", "-inf" and "nan". The CLI tests put an unlimited
budget (prune's default) into every report so that a writer bypassing the serialiser shows.
"""

from __future__ import annotations

import enum
import json
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import graphopt
from graphopt.cli import main
from graphopt.errors import ArtifactError, EmitError
from graphopt.serialize import dumps, loads, number, read_json, to_jsonable, write_json


def strict_loads(text: str):
    """json.loads that fails on the non-standard constants (independent of graphopt.serialize)."""
    def refuse(token):
        raise AssertionError(f"non-strict JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


# -- the serialiser ---------------------------------------------------------------------------------
class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@dataclass
class Budget:
    name: str
    limit: float
    tags: tuple = ()
    nested: dict = field(default_factory=dict)


class WithAsDict:
    def __init__(self, value):
        self.value = value

    def as_dict(self):
        return {"value": self.value, "kind": "custom"}


def test_non_finite_floats_are_strings_everywhere():
    doc = {"budget": math.inf, "low": -math.inf, "err": math.nan, "ok": 0.25,
           "nested": [{"b": [1.0, math.inf]}], "tuple": (math.nan,)}
    text = dumps(doc)
    assert "Infinity" not in text and "NaN" not in text
    back = strict_loads(text)
    assert back == {"budget": "inf", "low": "-inf", "err": "nan", "ok": 0.25,
                    "nested": [{"b": [1.0, "inf"]}], "tuple": ["nan"]}
    assert number(back["budget"]) == math.inf and number(back["low"]) == -math.inf
    assert math.isnan(number(back["err"])) and number(back["ok"]) == 0.25 and number("infinite") == "infinite"


def test_tensors_dtypes_devices_numpy_and_paths():
    doc = {"t": torch.tensor([[1.0, math.inf], [-math.inf, 2.5]]), "s": torch.tensor(3),
           "f": torch.tensor(float("nan")), "b": torch.tensor([True, False]),
           "dtype": torch.float16, "device": torch.device("cpu"), "size": torch.Size([2, 3]),
           "np_f": np.float32(0.5), "np_i": np.int64(7), "np_inf": np.float64(np.inf),
           "np_a": np.array([[1, 2], [3, 4]], dtype=np.int16), "np_b": np.bool_(True),
           "path": Path("out") / "model.py"}
    if torch.cuda.is_available():
        doc["cuda"] = torch.ones(2, device="cuda")
    back = strict_loads(dumps(doc))
    assert back["t"] == [[1.0, "inf"], ["-inf", 2.5]] and back["s"] == 3 and back["f"] == "nan"
    assert back["b"] == [True, False] and back["dtype"] == "torch.float16" and back["device"] == "cpu"
    assert back["size"] == [2, 3] and back["np_f"] == 0.5 and back["np_i"] == 7 and back["np_inf"] == "inf"
    assert back["np_a"] == [[1, 2], [3, 4]] and back["np_b"] is True and back["path"] == str(Path("out/model.py"))
    assert isinstance(back["s"], int) and isinstance(back["np_i"], int)
    # a tensor with gradients is written by value
    w = torch.full((2,), 0.5, requires_grad=True)
    assert to_jsonable({"w": w * 2}) == {"w": [1.0, 1.0]}


def test_enums_sets_dataclasses_as_dict_and_keys():
    doc = {
        "color": Color.RED, "level": Level.HIGH, "set": {3, 1, 2}, "frozen": frozenset({"b", "a"}),
        "budget": Budget("prune", math.inf, tags=("x", Color.RED), nested={"eps": torch.tensor(0.5)}),
        "custom": [WithAsDict(math.nan), WithAsDict({"deep": Budget("d", 1.0)})],
        7: "int key", 2.5: "float key", Color.RED: "enum key", None: "null key", True: "bool key",
        math.inf: "inf key", ("a", 1): "tuple key",
    }
    back = strict_loads(dumps(doc))
    assert back["color"] == "red" and back["level"] == 3 and isinstance(back["level"], int)
    assert back["set"] == [1, 2, 3] and back["frozen"] == ["a", "b"]
    assert back["budget"] == {"name": "prune", "limit": "inf", "tags": ["x", "red"], "nested": {"eps": 0.5}}
    assert back["custom"] == [{"value": "nan", "kind": "custom"},
                              {"value": {"deep": {"name": "d", "limit": 1.0, "tags": [], "nested": {}}},
                               "kind": "custom"}]
    assert back["7"] == "int key" and back["2.5"] == "float key" and back["red"] == "enum key"
    assert back["null"] == "null key" and back["true"] == "bool key" and back["inf"] == "inf key"
    assert back["('a', 1)"] == "tuple key"
    # what JSON has no type for (and no as_dict) is written as str()
    assert to_jsonable({"fn": len}) == {"fn": str(len)}


def test_circular_reference_is_an_error():
    a: list = [1]
    a.append(a)
    with pytest.raises(ValueError, match="circular"):
        dumps(a)
    shared = [1, 2]
    assert strict_loads(dumps({"x": shared, "y": shared})) == {"x": [1, 2], "y": [1, 2]}  # shared, not circular


def test_dumps_options():
    assert dumps({"b": 1, "a": [1]}, indent=None, sort_keys=True) == '{"a": [1], "b": 1}'
    assert dumps({"a": 1}).startswith("{\n  ")


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "r.json"
    assert write_json(path, {"budget": math.inf}) == path
    assert strict_loads(path.read_text()) == {"budget": "inf"} and path.read_text().endswith("}\n")
    assert read_json(path) == {"budget": "inf"}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like open(): not a private temp file's 0600

    class Broken:
        def as_dict(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_json(path, {"x": Broken()})
    assert read_json(path) == {"budget": "inf"}  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary left behind
    write_json(path, [1, 2])
    assert read_json(path) == [1, 2] and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    with pytest.raises(EmitError, match="folder does not exist"):
        write_json(tmp_path / "missing" / "r.json", {})


def test_strict_reading(tmp_path):
    with pytest.raises(ValueError, match="'Infinity' is not JSON"):
        loads('{"a": Infinity}')
    with pytest.raises(ValueError, match="'NaN' is not JSON"):
        loads("[NaN]")
    assert loads('{"a": Infinity}', strict=False) == {"a": math.inf}  # files written by older versions
    bad = tmp_path / "old.json"
    bad.write_text('{"budget": -Infinity}')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_json(bad)
    assert read_json(bad, strict=False) == {"budget": -math.inf}
    with pytest.raises(ArtifactError, match="file not found"):
        read_json(tmp_path / "nope.json")


def test_pipeline_report_with_an_unlimited_budget_is_strict_json():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    _, report = graphopt.optimize(net, torch.randn(2, 3, 8, 8), ["prune:ratio=0.5"])
    doc = strict_loads(report.to_json())
    assert doc["passes"][0]["options"]["budget"] == "inf"
    assert doc["passes"][0]["verification"]["status"] in ("passed", "skipped")
    assert doc == strict_loads(dumps(report))  # a report is written the same through as_dict


def test_committed_benchmark_results_are_strict_json():
    root = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    files = sorted(root.rglob("*.json"))
    assert files
    for f in files:
        strict_loads(f.read_text())


# -- every JSON the CLI writes ----------------------------------------------------------------------
MODEL = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.bn = nn.BatchNorm2d(c)
        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.blocks = nn.Sequential(Block(8), Block(8))
            self.fc = nn.Linear(8, 4)
        def forward(self, x):
            return self.fc(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))

    def model():
        torch.manual_seed(0)
        return Net()

    def example_inputs():
        return (torch.randn(4, 1, 8, 8),)

    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(48, 1, 8, 8, generator=g)
        y = torch.randint(0, 4, (48,), generator=g)
        return TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:])
''')

TRAIN = ["--epochs", "1", "--batch-size", "16", "--progress", "none"]
PRUNE = ["-p", "prune:ratio=0.5"]  # its default budget is unlimited: an inf in every report


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "net.py"
    p.write_text(MODEL)
    return str(p)


def _run(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured


def _budgets(passes):
    return [p["options"]["budget"] for p in passes if p["name"] == "prune"]


def test_inspect_and_passes_json_on_stdout(model_file, capsys):
    doc = strict_loads(_run(capsys, ["inspect", model_file, "--format", "json"]).out)
    spec = graphopt.load_model_file(model_file)
    assert doc["macs"] == graphopt.capture(spec.module, spec.example_inputs).meta["graphopt"]["cost"].macs > 0
    doc = strict_loads(_run(capsys, ["passes", "--format", "json"]).out)
    assert doc["prune"]["options"]["budget"]["default"] == "inf"
    assert doc["cleanup"]["semantics"] == "exact"


def test_optimize_report_and_manifest(model_file, tmp_path, capsys):
    out, report = tmp_path / "o", tmp_path / "report.json"
    _run(capsys, ["optimize", model_file, *PRUNE, "-p", "cleanup", "-o", str(out), "--report", str(report)])
    doc = strict_loads(report.read_text())
    assert _budgets(doc["passes"]) == ["inf"] and doc["after"]["macs"] < doc["before"]["macs"]
    manifest = strict_loads((out / "manifest.json").read_text())
    assert _budgets(manifest["passes"]) == ["inf"]


def test_optimize_emit_pipeline_manifests(model_file, tmp_path, capsys):
    out = tmp_path / "pipe"
    _run(capsys, ["optimize", model_file, *PRUNE, "-p", "partition:stages=2,repeats=1", "--emit", "pipeline",
                  "-o", str(out)])
    manifests = sorted(out.rglob("manifest.json"))
    assert len(manifests) == 3  # the pipeline's and one per stage folder
    doc = strict_loads((out / "manifest.json").read_text())
    assert doc["format"] == "graphopt.pipeline" and len(doc["stages"]) == 2
    for m in manifests:
        strict_loads(m.read_text())


def test_bench_format_json_stdout_is_one_document(model_file, tmp_path, capsys):
    out = tmp_path / "b"
    captured = _run(capsys, ["bench", model_file, *PRUNE, "--steps", "1", "--warmup", "0", "--batch-size", "4",
                             "--format", "json", "-o", str(out)])
    doc = strict_loads(captured.out)  # the whole of stdout: no table before it
    assert doc["kind"] == "step_benchmark" and set(doc["variants"]) == {"original", "rewritten"}
    assert _budgets(doc["extra"]["pipeline"]["passes"]) == ["inf"]
    assert strict_loads((out / "bench.json").read_text()) == doc
    assert "rewrote with prune" in captured.err  # what a person reads goes to stderr


def test_bench_train_format_json(model_file, tmp_path, capsys):
    out = tmp_path / "t"
    captured = _run(capsys, ["bench", model_file, *PRUNE, "--train", *TRAIN, "--format", "json", "-o", str(out)])
    doc = strict_loads(captured.out)
    assert doc["kind"] == "time_to_accuracy" and set(doc["runs"]) == {"original", "rewritten"}
    assert _budgets(doc["pipeline"]["passes"]) == ["inf"]
    assert strict_loads((out / "train.json").read_text()) == doc


def test_train_output_folder(model_file, tmp_path, capsys):
    out = tmp_path / "r"
    _run(capsys, ["train", model_file, *PRUNE, *TRAIN, "-o", str(out)])
    doc = strict_loads((out / "train.json").read_text())
    assert doc["kind"] == "training" and _budgets(doc["pipeline"]["passes"]) == ["inf"]
    strict_loads((out / "model" / "manifest.json").read_text())


def test_prune_iterative_json(model_file, tmp_path, capsys):
    out = tmp_path / "p"
    _run(capsys, ["prune-iterative", model_file, "--rounds", "1", "--ratio-per-round", "0.25",
                  "--epochs-per-round", "1", "--batch-size", "16", "--progress", "none", "-o", str(out)])
    doc = strict_loads((out / "prune.json").read_text())
    assert doc["kind"] == "prune_iterative" and [_budgets(r["passes"]) for r in doc["passes"]] == [["inf"]]
    strict_loads((out / "model" / "manifest.json").read_text())


def test_sweep_json(model_file, tmp_path, capsys):
    _run(capsys, ["sweep", "batch-size", model_file, "--sizes", "8,16", *TRAIN, "-o", str(tmp_path / "s")])
    doc = strict_loads((tmp_path / "s" / "sweep.json").read_text())
    assert [r["batch_size"] for r in doc["rows"]] == [8, 16]
    _run(capsys, ["sweep", "depth", model_file, "--deltas=-1,0", *TRAIN, "-o", str(tmp_path / "d")])
    doc = strict_loads((tmp_path / "d" / "sweep.json").read_text())
    assert len(doc["rows"]) == 2


def test_launch_metrics_json(tmp_path):
    # what `graphopt launch --save` writes, without starting processes
    from graphopt.dist.train import Topology, _save

    topo = Topology(world=1, rank=0, local_rank=0, stages=1, replicas=1)
    _save(str(tmp_path / "save"), nn.Linear(2, 2), topo, {"losses": [1.0, math.nan], "best": math.inf})
    assert strict_loads((tmp_path / "save" / "metrics.json").read_text()) == {"losses": [1.0, "nan"], "best": "inf"}


@pytest.mark.ort
def test_emit_onnx_manifest_and_report(model_file, tmp_path, capsys):
    pytest.importorskip("onnxruntime.training")
    out = tmp_path / "onnx"
    _run(capsys, ["optimize", model_file, *PRUNE, "--emit", "onnx", "-o", str(out), "--report",
                  str(tmp_path / "r.json")])
    manifest = strict_loads((out / "manifest.json").read_text())
    assert _budgets(manifest["passes"]) == ["inf"] and manifest["check"]["passed"] is True
    assert strict_loads((tmp_path / "r.json").read_text())["emit"]["check"]["passed"] is True


@pytest.mark.ort
@pytest.mark.slow  # ORT training artifacts: a crash probe in a child process and a gradient check (~30 s)
def test_emit_ort_manifests(model_file, tmp_path, capsys):
    pytest.importorskip("onnxruntime.training")
    out = tmp_path / "ort"
    _run(capsys, ["optimize", model_file, *PRUNE, "--emit", "ort", "-o", str(out)])
    manifests = sorted(out.rglob("manifest.json"))
    assert manifests
    for m in manifests:
        strict_loads(m.read_text())
    budgets = [_budgets(strict_loads(m.read_text())["passes"]) for m in manifests
               if isinstance(strict_loads(m.read_text()).get("passes", [None])[0], dict)]
    assert ["inf"] in budgets  # the torch folder inside carries the pass records
