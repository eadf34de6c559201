"""--emit pipeline, load_pipeline, the launch command and its checks (no processes started)."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch

import graphopt
from graphopt.cli import main
from graphopt.dist.data import make_data, shard
from graphopt.dist.launch import build_command
from graphopt.dist.train import TrainConfig, train
from graphopt.dist.pipeline import load_pipeline, read_pipeline_manifest
from graphopt.errors import ArtifactError, LaunchConfigError, PassConfigError
from tests.test_partition import TinyRes

MODEL_FILE = f'''
import torch
from torch import nn
import torch.nn.functional as F


{inspect.getsource(TinyRes)}

def model():
    torch.manual_seed(0)
    return TinyRes()


def example_inputs():
    return (torch.randn(8, 16),)


def loss(output, target):
    return F.cross_entropy(output, target)
'''

CONV_FILE = '''
import torch
from torch import nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 2))

def example_inputs():
    return (torch.randn(2, 3, 8, 8),)
'''


@pytest.fixture
def model_file(tmp_path):
    f = tmp_path / "tiny.py"
    f.write_text(MODEL_FILE)
    return f


@pytest.fixture
def folder(tmp_path, model_file):
    out = tmp_path / "pipe"
    assert main(["optimize", str(model_file), "-p", "partition:stages=2", "--emit", "pipeline", "-o", str(out)]) == 0
    return out


def _spec(model_file):
    return graphopt.load_model_file(str(model_file))


def test_emit_writes_one_torch_folder_per_stage(folder, model_file):
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "stage0", "stage1"]
    m = json.loads((folder / "manifest.json").read_text())
    assert m["format"] == "graphopt.pipeline" and m["verified"] is True
    assert [s["inputs"] for s in m["stages"]] == [["x"], ["stem", "lin1"]]
    assert [s["outputs"] for s in m["stages"]] == [["stem", "lin1"], ["head"]]
    assert m["stages"][1]["input_tensors"] == [{"shape": [8, 32], "dtype": "float32"}] * 2
    assert m["outputs"] == [{"shape": [8, 4], "dtype": "float32"}]
    assert m["partition"]["balance"] == pytest.approx(12288 / 10752)
    assert m["source"]["file"] == str(model_file.resolve())
    src = (folder / "stage0" / "module.py").read_text()
    assert "class OptimizedTinyResStage0(nn.Module)" in src and "return (stem, lin1)" in src
    stage1 = graphopt.load(folder / "stage1")  # each stage is an ordinary torch folder
    assert stage1.graphopt_manifest["pipeline_stage"] == {"index": 1, "stages": 2}
    spec = _spec(model_file)
    net = load_pipeline(folder)
    x = spec.example_inputs[0]
    torch.testing.assert_close(net(x), spec.module(x))


def test_emit_needs_a_partition(tmp_path, model_file, capsys):
    code = main(["optimize", str(model_file), "-p", "cleanup", "--emit", "pipeline", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "no pipeline partition" in err and "-p partition:stages=2" in err
    assert not (tmp_path / "o").exists()


def test_partition_must_be_the_last_pass(tmp_path, capsys):
    f = tmp_path / "conv.py"
    f.write_text(CONV_FILE)
    code = main(["optimize", str(f), "-p", "partition:stages=2", "-p", "channels_last", "--emit", "pipeline",
                 "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "put the partition pass last" in err


def test_missing_stage_file_is_a_clear_error(folder, capsys):
    (folder / "stage1" / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"stage 1 file stage1/weights.safetensors is missing"):
        load_pipeline(folder)
    assert main(["launch", str(folder), "--print-command"]) == 2
    assert "stage 1 file stage1/weights.safetensors is missing" in capsys.readouterr().err


def test_not_a_pipeline_folder(tmp_path, model_file, capsys):
    out = tmp_path / "t"
    assert main(["optimize", str(model_file), "-p", "cleanup", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["launch", str(out)]) == 2
    assert "not a pipeline folder" in capsys.readouterr().err


def test_print_command(folder, capsys):
    assert main(["launch", str(folder), "--schedule", "1f1b", "--microbatches", "2", "--steps", "3",
                 "--print-command"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=2" in cmd and "--max-restarts=0" in cmd
    i = cmd.index("graphopt.dist.train")
    assert cmd[i - 1] == "-m" and cmd[i + 1] == str(folder)
    assert cmd[cmd.index("--schedule") + 1] == "1f1b" and cmd[cmd.index("--microbatches") + 1] == "2"


def test_multi_node_command(folder):
    plan = build_command(folder, replicas=2, nnodes=2, rdzv_endpoint="node0:29400", rdzv_id="job7")
    assert plan.world == 4 and plan.nproc_per_node == 2
    assert "--standalone" not in plan.command
    for flag in ("--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400", "--rdzv-id=job7",
                 "--nproc-per-node=2"):
        assert flag in plan.command
    with pytest.raises(LaunchConfigError, match="needs --rdzv-endpoint"):
        build_command(folder, replicas=2, nnodes=2)


@pytest.mark.parametrize("kw,message", [
    ({"nproc_per_node": 3}, r"world size 3 x 1 nodes = 3 does not match 2 stages x 1 replicas = 2"),
    ({"stages": 4}, r"--stages 4 but the folder has 2 stages"),
    ({"replicas": 3}, r"batch size 8 is not divisible by 3 replica\(s\) x 4 microbatch\(es\)"),
    ({"schedule": "1f1b", "microbatches": 1}, r"1F1B needs at least as many microbatches as stages"),
    ({"replicas": 3, "nnodes": 4}, r"6 processes \(2 stages x 3 replicas\) do not split evenly over 4 nodes"),
])
def test_bad_launch_configurations(folder, kw, message):
    with pytest.raises(LaunchConfigError, match=message):
        build_command(folder, **kw)


def test_worker_entry_point_exit_codes(folder, tmp_path):
    """`python -m graphopt.dist.train` ends through os._exit (a rank must not abort in C++ teardown after
    its work is done): the exit code and the one-line error still come through, and a missing argument
    is argparse's exit 2."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "graphopt.dist.train", str(folder)], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not started by torchrun" in lines[0], r.stderr
    r = subprocess.run([sys.executable, "-m", "graphopt.dist.train"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "required: folder" in r.stderr


def test_worker_refuses_a_world_that_does_not_match(folder, monkeypatch):
    # what every rank does first: no process group exists yet, so nobody can wait for anybody
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(LaunchConfigError, match="not started by torchrun"):
        train(TrainConfig(folder=str(folder)))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(LaunchConfigError, match=r"world size 3 does not match 2 stages x 1 replicas = 2"):
        train(TrainConfig(folder=str(folder), replicas=1))
    with pytest.raises(LaunchConfigError, match=r"world size 3 is not a multiple of the 2 stages"):
        train(TrainConfig(folder=str(folder)))
    shutil.rmtree(folder / "stage0")
    with pytest.raises(ArtifactError, match="stage 0 file stage0/manifest.json is missing"):
        train(TrainConfig(folder=str(folder)))


def test_synthetic_data_when_the_model_file_has_no_data(folder):
    manifest = read_pipeline_manifest(folder)
    data = make_data(manifest, 8, seed=3)
    assert data.synthetic and data.data_source.startswith("SYNTHETIC")
    assert data.loss_source == "loss() of tiny.py"
    (x,), y = data.batch(0)
    (x2,), y2 = data.batch(0)
    assert x.shape == (8, 16) and y.dtype == torch.long and int(y.max()) < 4
    torch.testing.assert_close(x, x2) and torch.testing.assert_close(y, y2)
    assert not torch.equal(data.batch(1)[0][0], x)
    (xs,), ys = shard(((x,), y), 1, 2)
    torch.testing.assert_close(xs, x[4:])


def test_model_file_data_is_used(tmp_path):
    f = tmp_path / "withdata.py"
    f.write_text(MODEL_FILE + '''

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return ds, ds
''')
    out = tmp_path / "p"
    assert main(["optimize", str(f), "-p", "partition:stages=2", "--emit", "pipeline", "-o", str(out)]) == 0
    data = make_data(read_pipeline_manifest(out), 8)
    assert not data.synthetic and data.data_source == "data() of withdata.py (40 training samples)"
    (x,), y = data.batch(0)
    assert x.shape == (8, 16) and y.shape == (8,)
    assert make_data(read_pipeline_manifest(out), 8, synthetic=True).synthetic
