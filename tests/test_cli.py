"""The CLI through its runner: exit codes, output, files; logic is tested at library level."""

from __future__ import annotations

import json

import pytest
import torch

from graphopt.cli import main
from graphopt.testing import write_model_file


@pytest.fixture
def model_file(tmp_path):
    return write_model_file(tmp_path)


def test_optimize_writes_a_verified_folder(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    code = main(["optimize", str(model_file), "-p", "channels_last", "-p", "cleanup", "-o", str(out),
                 "--report", str(report)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "channels_last" in captured.out and "passed: max_rel_error" in captured.out
    assert "wrote" in captured.out and "verified" in captured.out
    assert (out / "module.py").exists()
    assert json.loads(report.read_text())["passes"][0]["name"] == "channels_last"


def test_optimize_with_toml_config_and_no_verify(model_file, tmp_path, capsys):
    cfg = tmp_path / "p.toml"
    cfg.write_text('[[pass]]\nname = "channels_last"\n')
    code = main(["optimize", str(model_file), "--config", str(cfg), "-o", str(tmp_path / "o"), "--no-verify"])
    assert code == 0
    assert "NOT verified" in capsys.readouterr().out


@pytest.mark.parametrize("args, fragment", [
    (["optimize", "missing.py", "-p", "cleanup"], "missing.py: model file not found"),
    (["optimize", "{model}", "-p", "nope"], "unknown pass 'nope'"),
    (["optimize", "{model}", "-p", "cleanup:bad=1"], "unknown option 'bad'"),
    pytest.param(["optimize", "{model}", "--device", "cuda"], "no CUDA device is available",  # auto mode
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
    (["optimize", "{model}", "-p", "cleanup", "--target-time", "0.5"], "belong to the automatic mode"),
    (["optimize", "{model}", "-p", "cleanup", "--emit", "zip"], "unknown --emit format 'zip'"),
    (["optimize", "{model}", "-p", "cleanup", "--config", "nope.toml"], "pipeline file not found"),
    (["inspect", "{model}", "--draw", "g.gif"], "cannot draw to '.gif'"),
])
def test_user_errors_are_one_line_exit_2(model_file, tmp_path, capsys, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    code = main([a.replace("{model}", str(model_file)) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not any(p.name.endswith("_optimized") for p in tmp_path.iterdir())  # no partial output


def test_existing_output_untouched_without_force(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["optimize", str(model_file), "-p", "cleanup", "-o", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_usage_error_exit_2(capsys):
    assert main(["optimize"]) == 2
    assert "Missing argument" in capsys.readouterr().err


def test_inspect_json_and_draw(model_file, tmp_path, capsys):
    png = tmp_path / "g.png"
    assert main(["inspect", str(model_file), "--format", "json", "--draw", str(png)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"macs", "params", "coverage", "nodes"} <= set(doc)
    assert doc["macs"] == 2 * 8 * 16 * 16 * 27 + 2 * 8 * 4 and doc["params"] == 224 + 16 + 36
    assert doc["coverage"] == 1.0
    conv = next(n for n in doc["nodes"] if n["name"] == "conv")
    assert conv["shape"] == [2, 8, 16, 16] and conv["dtype"] == "float32"
    assert png.read_bytes().startswith(b"\x89PNG")


def test_inspect_table_and_passes(model_file, capsys):
    assert main(["inspect", str(model_file)]) == 0
    out = capsys.readouterr().out
    assert "Conv2d" in out and "coverage: 100.0% of MACs" in out
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "channels_last" in out and "exact" in out
    assert main(["passes", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["cleanup"]["semantics"] == "exact"


def test_help_everywhere(capsys):
    for args in (["--help"], ["optimize", "--help"], ["inspect", "--help"], ["passes", "--help"]):
        assert main(args) == 0
    assert "Usage" in capsys.readouterr().out


def test_internal_error_is_exit_1(model_file, monkeypatch, capsys):
    import importlib

    capture_module = importlib.import_module("graphopt.capture")  # graphopt.capture is the function

    def boom(*a, **k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(capture_module, "capture", boom)
    assert main(["inspect", str(model_file)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("internal error: RuntimeError: simulated bug") and "Traceback" not in err
