"""The paths a user takes (issue 16): model files as the README writes them, user errors as one
line with exit 2 and nothing written, Ctrl-C, progress in logs, readable tables and plots, the
benchmark target that must not overwrite committed results."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from graphopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
GRAPHOPT = str(Path(sys.executable).parent / "graphopt")

from graphopt.testing import SMALL_CNN_MODEL as MODEL  # noqa: E402  (the shipped model-file fixture)

# a small classifier with its own data: 4 classes that a linear model separates
DATA_MODEL = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4))

def example_inputs():
    return (torch.randn(8, 16),)

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 16, generator=g)
    y = x[:, :4].argmax(1)
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])
"""


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "model.py"
    p.write_text(textwrap.dedent(MODEL))
    return p


@pytest.fixture
def data_model(tmp_path):
    p = tmp_path / "dmodel.py"
    p.write_text(textwrap.dedent(DATA_MODEL))
    return p


def _one_line_exit_2(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


# -- model files ------------------------------------------------------------------------------------
def test_readme_model_file_with_import_torchvision_loads_in_a_fresh_process(tmp_path):
    """The README's model file (`import torch, torchvision`) on the pinned install, where plain
    `import torchvision` fails (CUDA wheel on a CPU torch): graphopt loads it (fresh process, so
    nothing imported torchvision before)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    f = tmp_path / "model.py"
    f.write_text(textwrap.dedent("""
        import torch, torchvision

        def model():
            return torchvision.models.resnet18(num_classes=10)

        def example_inputs():
            return (torch.randn(1, 3, 32, 32),)
    """))
    r = subprocess.run([GRAPHOPT, "inspect", str(f), "--format", "json"], capture_output=True, text=True,
                       timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model"].endswith("ResNet") and doc["params"] == 11_181_642


def test_model_file_imports_a_sibling_module(tmp_path):
    from graphopt.modelfile import load_model_file

    (tmp_path / "blocks_for_sibling_test.py").write_text("from torch import nn\n\ndef head(n):\n"
                                                         "    return nn.Linear(n, 3)\n")
    f = tmp_path / "model.py"
    f.write_text("import torch\nfrom blocks_for_sibling_test import head\n\n"
                 "def model():\n    return head(5)\n\ndef example_inputs():\n    return (torch.randn(2, 5),)\n")
    spec = load_model_file(f)
    assert spec.module(torch.ones(2, 5)).shape == (2, 3)
    assert str(tmp_path) not in sys.path  # the folder is on sys.path only while the file loads


@pytest.mark.parametrize("where", ["top", "factory"])
def test_sys_exit_in_model_file_is_one_line_exit_2(tmp_path, capsys, where):
    f = tmp_path / "model.py"
    body = "import sys, torch\nfrom torch import nn\n"
    body += "sys.exit(3)\n" if where == "top" else ""
    body += ("def model():\n" + ("    sys.exit(3)\n" if where == "factory" else "    return nn.Linear(2, 2)\n")
             + "def example_inputs():\n    return (torch.randn(1, 2),)\n")
    f.write_text(body)
    code = main(["inspect", str(f)])
    _one_line_exit_2(code, capsys.readouterr().err, "sys.exit(3)", "model.py:")


# -- user errors: one line, exit 2, nothing written ------------------------------------------------------
@pytest.mark.parametrize("value, fragment", [("nan", "'nan' is not a number"), ("NaN", "'nan' is not a number"),
                                             ("inf", "inf is above the maximum 0.99"),
                                             ("-inf", "-inf is below the minimum 0.0")])
def test_non_finite_option_values_are_refused(model_file, tmp_path, capsys, value, fragment):
    code = main(["optimize", str(model_file), "-p", f"prune:ratio={value}", "-o", str(tmp_path / "o")])
    _one_line_exit_2(code, capsys.readouterr().err, fragment, "ratio")
    assert not (tmp_path / "o").exists()


def test_nan_is_refused_everywhere_and_an_infinite_budget_stays_allowed():
    from graphopt.errors import PassConfigError
    from graphopt.pass_infra import Option

    assert Option(float, 0.1, "budget", min=0.0).parse("inf", "cast.budget") == math.inf  # no limit
    for opt in (Option(float, 0.1, "budget", min=0.0), Option(float, 1.0, "factor"), Option(list, [], "x", item=float)):
        with pytest.raises(PassConfigError, match="is not a number"):
            opt.parse("nan" if opt.type is float else "1.0|nan", "p.x")


@pytest.mark.parametrize("root", ["/proc", "/sys"])
def test_output_under_a_kernel_file_system_is_refused_before_work(model_file, capsys, root):
    code = main(["optimize", str(model_file), "-p", "cleanup", "-o", f"{root}/graphopt-out"])
    _one_line_exit_2(code, capsys.readouterr().err, f"{root} is a virtual kernel file system")
    assert "captured" not in capsys.readouterr().out


def test_report_into_a_missing_folder_is_refused_before_anything_is_written(model_file, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["optimize", str(model_file), "-p", "cleanup", "-o", str(out), "--report",
                 str(tmp_path / "nope" / "r.json")])
    _one_line_exit_2(code, capsys.readouterr().err, "folder of --report does not exist", "nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.py"]  # nothing written


def test_draw_into_a_missing_folder_is_refused_before_work(model_file, tmp_path, capsys):
    code = main(["inspect", str(model_file), "--draw", str(tmp_path / "nope" / "g.png")])
    captured = capsys.readouterr()
    _one_line_exit_2(code, captured.err, "folder of --draw does not exist")
    assert "GMACs" not in captured.out  # refused before the model was captured


def test_disk_full_is_one_line(model_file, tmp_path, capsys):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    code = main(["optimize", str(model_file), "-p", "cleanup", "-o", str(tmp_path / "o"), "--report", "/dev/full",
                 "--force"])
    _one_line_exit_2(code, capsys.readouterr().err, "/dev/full: could not write --report: No space left on device")


def test_oserror_mapping_names_the_path(monkeypatch, model_file, capsys):
    import graphopt.modelfile as mf

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/weights.safetensors")

    monkeypatch.setattr(mf, "load_model_file", full)
    code = main(["inspect", str(model_file)])
    _one_line_exit_2(code, capsys.readouterr().err, "/data/out/weights.safetensors: no space left on the device")


def test_bench_on_a_model_with_integer_outputs_is_one_line(tmp_path, capsys):
    f = tmp_path / "argmax.py"
    f.write_text("import torch\nfrom torch import nn\n\nclass M(nn.Module):\n    def __init__(self):\n"
                 "        super().__init__()\n        self.fc = nn.Linear(4, 3)\n"
                 "    def forward(self, x):\n        return self.fc(x).argmax(1)\n\n"
                 "def model():\n    return M()\n\ndef example_inputs():\n    return (torch.randn(2, 4),)\n")
    out = tmp_path / "b"
    code = main(["bench", str(f), "--steps", "2", "--warmup", "0", "-o", str(out)])
    _one_line_exit_2(code, capsys.readouterr().err, "int64", "floating-point")
    assert not out.exists()


def test_unknown_top_level_keys_in_a_pipeline_file_are_refused(model_file, tmp_path, capsys):
    cfg = tmp_path / "p.toml"
    cfg.write_text('verify = false\n\n[[pass]]\nname = "cleanup"\n')
    code = main(["optimize", str(model_file), "--config", str(cfg), "-o", str(tmp_path / "o")])
    _one_line_exit_2(code, capsys.readouterr().err, "unknown top-level key(s) 'verify'", "p.toml")
    assert not (tmp_path / "o").exists()


def test_train_backend_ort_with_sgd_momentum_is_refused_up_front(data_model, tmp_path, capsys, monkeypatch):
    import graphopt.modelfile as mf

    def never(*a, **k):  # refused before the model file is even loaded
        raise AssertionError("loaded the model file")

    monkeypatch.setattr(mf, "load_model_file", never)
    code = main(["train", str(data_model), "--backend", "ort", "-o", str(tmp_path / "run")])
    _one_line_exit_2(code, capsys.readouterr().err, "--momentum is 0.9", "--momentum 0", "--optimizer adamw")
    assert not (tmp_path / "run").exists()


def test_train_output_folder_parents_are_created(data_model, tmp_path, capsys):
    out = tmp_path / "runs" / "bn"
    code = main(["train", str(data_model), "--epochs", "1", "--batch-size", "32", "--lr", "0.1", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "train.json").read_text())["kind"] == "training"
    assert (out / "model" / "module.py").is_file()


# -- Ctrl-C ------------------------------------------------------------------------------------------------
def test_ctrl_c_exits_130_with_one_line(monkeypatch, model_file, capsys):
    import graphopt.modelfile as mf

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mf, "load_model_file", interrupted)
    code = main(["inspect", str(model_file)])
    err = capsys.readouterr().err
    assert code == 130
    assert err == "interrupted (Ctrl-C)\n"


def test_ctrl_c_during_training_exits_130_with_one_line_and_writes_nothing(data_model, tmp_path):
    """A real SIGINT once training has started (the first progress line is the signal to send it)."""
    import signal

    out = tmp_path / "runs" / "x"
    proc = subprocess.Popen([GRAPHOPT, "train", str(data_model), "--epochs", "500", "--batch-size", "8", "-o",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("dmodel epoch 1/500: step"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err == "interrupted (Ctrl-C)\n"
    assert not (tmp_path / "runs").exists()  # nothing written (its parent is made only when writing)


def test_optimize_makes_missing_parents_of_its_output_and_removes_them_on_failure(model_file, tmp_path, capsys,
                                                                                 monkeypatch):
    out = tmp_path / "a" / "b" / "out"
    assert main(["optimize", str(model_file), "-p", "cleanup", "-o", str(out)]) == 0
    assert (out / "module.py").is_file()
    import graphopt.emit.torch_folder as tf

    def broken(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tf, "emit_torch_folder", broken)
    capsys.readouterr()
    code = main(["optimize", str(model_file), "-p", "cleanup", "-o", str(tmp_path / "c" / "d" / "out")])
    _one_line_exit_2(code, capsys.readouterr().err, "no space left on the device")
    assert not (tmp_path / "c").exists()


# -- launch -------------------------------------------------------------------------------------------------
def test_launch_with_a_moved_model_file_is_one_line_naming_the_path(tmp_path, capsys):
    from tests.test_pipeline_emit import MODEL_FILE

    f = tmp_path / "tiny.py"
    f.write_text(MODEL_FILE)
    out = tmp_path / "pipe"
    assert main(["optimize", str(f), "-p", "partition:stages=2", "--emit", "pipeline", "-o", str(out)]) == 0
    f.rename(tmp_path / "moved.py")
    capsys.readouterr()
    code = main(["launch", str(out), "--steps", "1"])
    captured = capsys.readouterr()
    _one_line_exit_2(code, captured.err, str(f), "--model-file", "--synthetic")
    assert "starting torchrun" not in captured.out
    # the worker refuses too (a torchrun started by hand)
    from graphopt.dist.data import make_data
    from graphopt.dist.pipeline import read_pipeline_manifest
    from graphopt.errors import ModelFileError

    with pytest.raises(ModelFileError, match="is gone"):
        make_data(read_pipeline_manifest(out), 8)
    assert make_data(read_pipeline_manifest(out), 8, synthetic=True).synthetic


# -- progress, time budget, tables --------------------------------------------------------------------------
def test_train_prints_progress_lines_when_output_is_not_a_terminal(data_model, capsys):
    # 256 training samples, 10% validation -> 230, batch 23: 10 steps per epoch, a line every 2 steps
    code = main(["train", str(data_model), "--epochs", "2", "--batch-size", "23", "--lr", "0.1"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("dmodel epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["dmodel epoch 1/2"] * 5 + ["dmodel epoch 2/2"] * 5
    assert "step 2/10, loss" in lines[0] and "step 8/10" in lines[3]
    assert "10/10 steps, loss" in lines[4] and "test acc" in lines[4]


def test_max_time_is_checked_within_an_epoch(monkeypatch):
    """A fake clock (1 s per reading): a 5 s budget stops the run inside its first epoch."""
    from torch.utils.data import TensorDataset

    import graphopt.bench.train as tr

    clock = {"t": 0.0}

    def tick():
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(tr.time, "perf_counter", tick)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    y = x[:, :2].argmax(1)
    net = torch.nn.Linear(6, 2)
    res = tr.fit(net, (TensorDataset(x[:320], y[:320]), TensorDataset(x[320:], y[320:])),
                 tr.TrainConfig(epochs=3, batch_size=8, val_fraction=0.0, max_time_s=5.0))
    assert res.steps < 40  # one epoch is 40 steps
    assert res.stop_reason == "time budget 5 s"
    assert 5.0 <= res.train_time_s < 8.0


def test_tables_are_not_cut_to_80_columns_in_logs(model_file, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    code = main(["bench", str(model_file), "-p", "channels_last", "--steps", "2", "--warmup", "0", "--rounds", "1",
                 "-o", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert code == 0
    assert "…" not in out
    assert "original" in out and "rewritten" in out and "of peak" in out


# -- plots ----------------------------------------------------------------------------------------------------
def _png_title(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return im.text["Title"]


def test_bench_png_title_names_model_passes_device_batch_threads(model_file, tmp_path, capsys):
    out = tmp_path / "b"
    code = main(["bench", str(model_file), "-p", "channels_last", "-p", "cleanup", "--steps", "2", "--warmup", "0",
                 "--rounds", "1", "--batch-size", "3", "-o", str(out)])
    assert code == 0
    title = _png_title(out / "bench.png")
    assert title.startswith("model: original vs channels_last + cleanup - training step on cpu")
    assert "batch 3" in title and "1 thread(s)" in title and "`" not in title


def test_train_png_title_names_model_passes_device_batch(data_model, tmp_path, capsys):
    out = tmp_path / "t"
    code = main(["train", str(data_model), "-p", "cleanup", "--epochs", "1", "--batch-size", "32", "--lr", "0.1",
                 "-o", str(out), "--progress", "none"])
    assert code == 0, capsys.readouterr().err
    title = _png_title(out / "train.png")
    assert title.startswith("dmodel + cleanup: test accuracy vs training time - cpu")
    assert "batch 32" in title


def _fake_run(name, accs, times, cfg):
    from graphopt.bench.train import EpochRecord, TrainResult

    r = TrainResult(name, cfg)
    for i, (a, t) in enumerate(zip(accs, times)):
        r.history.append(EpochRecord(epoch=i + 1, step=(i + 1) * 10, lr=0.1, train_loss=2.3, val_loss=None,
                                     val_accuracy=None, test_loss=2.3, test_accuracy=a, epoch_time_s=t / (i + 1),
                                     train_time_s=t, wall_time_s=t))
    return r


def test_sweep_at_chance_crowns_no_best_and_its_plot_does_not_zoom_into_noise(tmp_path):
    from matplotlib import pyplot as plt

    from graphopt.bench import report as rep
    from graphopt.bench.sweep import SweepResult, chance_level, pick_best
    from graphopt.bench.train import TrainConfig

    cfg = TrainConfig(epochs=2)
    runs = {"depth-1": _fake_run("depth-1", [0.098, 0.099], [1.0, 2.0], cfg),
            "depth+0": _fake_run("depth+0", [0.1, 0.1], [1.5, 3.0], cfg),
            "depth+1": _fake_run("depth+1", [0.097, 0.1], [2.0, 4.0], cfg)}
    y = torch.arange(1000) % 10
    chance = chance_level((None, torch.utils.data.TensorDataset(torch.zeros(1000, 1), y)))
    assert chance == (0.1, 1000)
    best, crit = pick_best(runs, None, chance)
    assert best is None and "at chance accuracy" in crit
    # a variant clearly above chance is still crowned
    runs_ok = dict(runs, good=_fake_run("good", [0.5, 0.9], [1.0, 2.0], cfg))
    assert pick_best(runs_ok, None, chance)[0] == "good"

    rows = [{"variant": k, "final_test_accuracy": r.final["test_accuracy"], "train_time_s": r.train_time_s}
            for k, r in runs.items()]
    res = SweepResult("depth", runs, rows, best, crit, {}, {}, target_accuracy=0.97,
                      extra={"chance_accuracy": 0.1, "test_samples": 1000})
    captured = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, path, **kw):
        captured["fig"] = fig
        return real_savefig(fig, path, **kw)

    import matplotlib.figure

    orig = matplotlib.figure.Figure.savefig
    matplotlib.figure.Figure.savefig = spy
    try:
        rep.plot_sweep(res, tmp_path / "sweep.png")
    finally:
        matplotlib.figure.Figure.savefig = orig
    fig = captured["fig"]
    left, right = fig.axes[:2]
    for ax in (left, right):
        lo, hi = ax.get_ylim()
        assert hi - lo >= 0.1 or (lo <= 0.1 <= hi and hi >= 0.97)  # not 0.098-0.100
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "target accuracy 0.97" in labels
        assert any(t.startswith("chance") for t in labels)
    assert {"depth-1", "depth+0", "depth+1"} <= {t.get_text() for t in right.get_legend().get_texts()}
    assert not right.texts  # no point annotations that could overlap
    assert "at chance accuracy" in _png_title(tmp_path / "sweep.png")


def test_accuracy_limits_keep_a_minimum_span():
    from graphopt.bench.report import accuracy_limits

    lo, hi = accuracy_limits([0.098, 0.1, 0.099])
    assert hi - lo >= 0.1
    lo, hi = accuracy_limits([0.5, 0.9], target=0.97, chance=0.1)
    assert lo <= 0.1 and hi >= 0.97


def test_draw_shows_layer_names_and_skip_connections(tmp_path, capsys):
    f = tmp_path / "res.py"
    f.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
                self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            def forward(self, x):
                return x + self.conv2(torch.relu(self.conv1(x)))

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = nn.Conv2d(3, 4, 3, padding=1)
                self.block = Block()
            def forward(self, x):
                return self.block(self.stem(x))

        def model():
            return Net()

        def example_inputs():
            return (torch.randn(1, 3, 8, 8),)
    """))
    svg = tmp_path / "g.svg"
    assert main(["inspect", str(f), "--draw", str(svg)]) == 0
    text = svg.read_text()
    for name in ("stem (Conv2d)", "block.conv1 (Conv2d)", "block.conv2 (Conv2d)", "skip connection"):
        assert name in text
    assert text.count('id="skip-connection-') == 1  # stem -> add jumps over the block's convs


# -- make bench ------------------------------------------------------------------------------------------------
def test_make_bench_writes_to_an_uncommitted_folder():
    r = subprocess.run(["make", "-n", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "benchmarks/run_suite.py" in r.stdout and "benchmarks/results" not in r.stdout
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_suite_for_test", ROOT / "benchmarks" / "run_suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # writing into the committed results needs --update-results (refused before any work)
    assert mod.main(["--out", str(ROOT / "benchmarks" / "results" / "cpu"), "--only", "none"]) == 2
    ignored = subprocess.run(["git", "check-ignore", "-q", "out/bench/cpu/suite.json"], cwd=ROOT)
    assert ignored.returncode == 0  # the default output is not committed
