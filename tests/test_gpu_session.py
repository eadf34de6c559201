"""benchmarks/gpu_session.py: the budget and skip logic (fake steps), the steps' arguments against their
scripts' argparse, and (slow) the CPU dry run end to end through the same scripts a GPU session runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_session", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_session"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gs = _load()


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_budget_is_shared_and_the_rest_is_skipped_with_a_note(tmp_path):
    clock = FakeClock()
    calls = []
    spend = {"a": 100, "b": 400, "c": 10, "d": 10}

    def runner(step, out, timeout):
        calls.append((step.name, timeout))
        clock.t += min(spend[step.name], timeout)
        if spend[step.name] > timeout:
            step.status, step.detail = "timeout", f"killed after its limit of {timeout:.0f} s"
        else:
            step.status = "ok" if step.name != "c" else "failed"
        step.seconds = min(spend[step.name], timeout)

    steps = [gs.Step(n, ["-c", "pass"], limit) for n, limit in (("a", 150), ("b", 400), ("c", 60), ("d", 60))]
    doc = gs.run_session(steps, tmp_path, budget_s=450, min_step_s=20, clock=clock, runner=runner)
    # a gets its own limit; b gets what is left (350 < 400) and runs out; c and d find < 20 s left
    assert calls == [("a", 150), ("b", 350)]
    status = {s["name"]: s["status"] for s in doc["steps"]}
    assert status == {"a": "ok", "b": "timeout", "c": "skipped", "d": "skipped"}
    assert "session budget exhausted: 0 s of 450 s left" in doc["steps"][2]["detail"]
    md = (tmp_path / "summary.md").read_text()
    assert "| b | timeout | 350.0 | 400 |" in md and "| d | skipped |" in md
    assert json.loads((tmp_path / "session.json").read_text())["steps"][3]["status"] == "skipped"


def test_a_failing_step_does_not_stop_the_next(tmp_path):
    clock = FakeClock()

    def runner(step, out, timeout):
        if step.name == "boom":
            raise OSError("no such interpreter")
        clock.t += 5
        step.status, step.seconds = "ok", 5

    steps = [gs.Step("boom", ["-c", "pass"], 30), gs.Step("next", ["-c", "pass"], 30)]
    doc = gs.run_session(steps, tmp_path, budget_s=100, clock=clock, runner=runner)
    assert [s["status"] for s in doc["steps"]] == ["failed", "ok"]
    assert "could not run: OSError: no such interpreter" in doc["steps"][0]["detail"]


def test_real_processes_exit_codes_timeouts_and_the_process_group(tmp_path):
    """Real subprocesses: exit 0, a failure with its last lines, and a step that starts a grandchild and
    hangs: it is killed at the session's remaining budget, grandchild included; the last step is skipped."""
    pidfile = tmp_path / "grandchild.pid"
    hang = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    steps = [gs.Step("ok", ["-c", "print('fine')"], 30),
             gs.Step("fails", ["-c", "import sys; print('went wrong'); sys.exit(3)"], 30),
             gs.Step("hangs", ["-c", hang], 60),
             gs.Step("after", ["-c", "print('never')"], 30)]
    t0 = time.monotonic()
    doc = gs.run_session(steps, tmp_path, budget_s=4.0, min_step_s=1.0)
    assert time.monotonic() - t0 < 20
    st = {s["name"]: s for s in doc["steps"]}
    assert st["ok"]["status"] == "ok" and st["ok"]["returncode"] == 0
    assert st["fails"]["status"] == "failed" and "exit 3" in st["fails"]["detail"] and "went wrong" in st["fails"]["detail"]
    assert st["hangs"]["status"] == "timeout" and st["hangs"]["seconds"] < 6
    assert st["after"]["status"] == "skipped" and "budget exhausted" in st["after"]["detail"]
    assert "fine" in (tmp_path / "logs" / "ok.log").read_text()
    gpid = int(pidfile.read_text())
    for _ in range(50):  # the grandchild went with its process group
        try:
            import os

            os.kill(gpid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the hanging step's grandchild is still running")


@pytest.mark.parametrize("device,dry", [("cuda", False), ("cpu", True)])
def test_every_step_accepts_its_arguments(device, dry, tmp_path):
    steps = gs.plan(device, dry, tmp_path)
    assert [s.name for s in steps] == ["pytest_gpu", "auto_gpu", "precision_gpu", "transformers", "suite"]
    assert {s.name: gs.check_args(s) for s in steps} == {s.name: "" for s in steps}
    if device == "cuda":  # the limits fit the default budget, and everything lands in the one folder
        assert sum(s.limit_s for s in steps) <= gs.BUDGET_S
        assert all(str(tmp_path) in s.argv for s in steps if s.name != "pytest_gpu")


def test_a_wrong_argument_is_reported(tmp_path):
    err = gs.check_args(gs.Step("x", ["benchmarks/auto_gpu.py", "--device", "cuda", "--no-such-option"], 1))
    assert "unrecognized arguments: --no-such-option" in err
    assert gs.check_args(gs.Step("y", ["benchmarks/nope.py"], 1)) == "no such script: benchmarks/nope.py"


def test_pytest_step_collects_the_gpu_marked_files():
    files = gs.gpu_test_files()
    assert "tests/test_precision_gpu_bench.py" in files and "tests/test_gpu_session.py" not in files


def test_default_folder_is_under_OUT_when_set(monkeypatch):
    monkeypatch.setenv("OUT", "/tmp/device-out")
    assert gs.default_out("cuda", False, "NVIDIA H200") == Path("/tmp/device-out/benchmarks/results/nvidia-h200")
    monkeypatch.delenv("OUT")
    assert gs.default_out("cuda", False, "NVIDIA H200") == ROOT / "benchmarks" / "results" / "nvidia-h200"
    assert gs.default_out("cpu", True, "Some CPU") == ROOT / "out" / "gpu_session" / "some-cpu"


def test_cli_refusals(capsys):
    assert gs.main(["--device", "cpu"]) == 2  # the full settings are for a GPU
    assert "only as --dry-run" in capsys.readouterr().err
    assert gs.main(["--only", "nope", "--plan"]) == 2
    if not torch.cuda.is_available():
        assert gs.main(["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert gs.main(["--plan", "--only", "auto_gpu,suite"]) == 0
    out = capsys.readouterr().out
    assert "auto_gpu" in out and "precision_gpu" not in out


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cpu_dry_run_end_to_end(tmp_path):
    """The GPU session's own command on CPU with the tiniest settings: every step runs its script's CPU
    path (about 2 minutes on a loaded 2-core machine)."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--dry-run", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=390)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    doc = json.loads((tmp_path / "session.json").read_text())
    assert {s["name"]: s["status"] for s in doc["steps"]} == {
        "pytest_gpu": "ok", "auto_gpu": "ok", "precision_gpu": "ok", "transformers": "ok", "suite": "ok"}
    for f in ("auto_gpu.json", "auto_gpu.md", "precision.json", "transformers.json", "suite.md", "summary.md",
              "pytest_gpu.xml", "logs/auto_gpu.log"):
        assert (tmp_path / f).is_file(), f
    auto = json.loads((tmp_path / "auto_gpu.json").read_text())
    assert [m["model"] for m in auto["models"]] == ["resnet18", "gpt"]
    for m in auto["models"]:
        assert set(m["variants"]) == {"eager_fp32", "autocast_bf16", "autocast_fp16", "compile", "graphopt_auto"}
        for name, v in m["variants"].items():  # measured, or (torch.compile on CPU only) skipped with a reason
            assert "median_ms" in v or (name == "compile" and v["skipped"]), (m["model"], name, v)


def test_entry_point_shim_registers_what_pyproject_declares(tmp_path):
    """Without a pip install (the GPU machine gets a copy of the tree), the session writes a dist-info from
    pyproject.toml: the same passes, emitters and backends, loadable."""
    from importlib import metadata

    gs.entry_point_shim(tmp_path)
    (info,) = tmp_path.glob("graphopt-*.dist-info")
    dist = metadata.PathDistribution(info)
    assert dist.metadata["Name"] == "graphopt"
    eps = {(ep.group, ep.name): ep for ep in dist.entry_points}
    declared = {n for g, n in eps if g == "graphopt.passes"}
    assert {"channels_last", "cleanup", "mixed_precision", "sdpa", "prune", "partition"} <= declared
    assert ("graphopt.emitters", "torch") in eps and ("graphopt.backends", "torch") in eps
    import graphopt

    assert set(graphopt.available_passes()) >= declared  # the installed registry declares the same
    assert eps[("graphopt.passes", "channels_last")].load().name == "channels_last"
