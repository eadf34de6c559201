"""benchmarks/auto_gpu.py: its refusals and time box (fast); the CPU run itself is the slow dry run of
tests/test_gpu_session.py (the same code a GPU session runs)."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "auto_gpu.py"


@pytest.fixture(scope="module")
def ag():
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("auto_gpu_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.path[:] = saved
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_without_a_gpu_is_refused(ag, tmp_path, capsys):
    assert ag.main(["--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_unknown_model_or_variant_is_refused(ag, tmp_path, capsys):
    assert ag.main(["--device", "cpu", "--models", "resnet50,nope", "--out", str(tmp_path)]) == 2
    assert ag.main(["--device", "cpu", "--variants", "eager_fp32,jit", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "jit" in err


def test_time_box_interrupts_and_its_reason_survives_wrapping(ag):
    t0 = time.monotonic()
    with pytest.raises(ag.Skipped) as info:
        with ag.time_box(0.2, "compilation"):
            while True:
                sum(range(1000))
    assert time.monotonic() - t0 < 5
    try:  # torch.compile wraps the exception raised inside it: the time box's message is still the reason
        raise RuntimeError("backend='inductor' raised:") from info.value
    except RuntimeError as exc:
        assert ag._reason(exc) == "compilation did not finish within 0.2 s (--compile-timeout)"
    assert ag._reason(ValueError("first\n\nsecond\nthird")) == "ValueError: first second"


def test_a_graph_fixed_to_its_batch_is_captured_at_the_measured_inputs(ag):
    from graphopt.modelfile import load_model_file

    root = SCRIPT.parents[1]
    gpt = load_model_file(str(root / "benchmarks/models/gpt.py"))
    x = ag.measure_inputs("gpt", gpt, 3, None)
    assert ag.capture_inputs(gpt, x) is x  # its attention views (b, t, heads, d) at the example batch
    cnn = load_model_file(str(root / "benchmarks/models/resnet18.py"))
    x = ag.measure_inputs("resnet18", cnn, 3, 40)
    assert x[0].shape == (3, 3, 40, 40)
    assert ag.capture_inputs(cnn, x)[0].shape == cnn.example_inputs[0].shape  # verified at the small example
