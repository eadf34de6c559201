"""benchmarks/precision_gpu.py: refuses without CUDA; runs end to end on a GPU (marked gpu)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "precision_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("precision_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_refuses_without_cuda(tmp_path, capsys):
    rc = _load().main(["--out", str(tmp_path / "r")])
    assert rc == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.gpu
@pytest.mark.slow
def test_runs_on_gpu(tmp_path):
    rc = _load().main(["--models", "resnet50", "--dtype", "bfloat16", "--batch", "8", "--steps", "3",
                       "--warmup", "1", "--no-verify", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "precision.json").read_text())
    assert {"eager_fp32", "autocast_bfloat16", "graphopt_bfloat16",
            "graphopt_bfloat16_channels_last"} <= set(res["models"]["resnet50"]["bfloat16"])
