"""torch.distributed runs with gloo on CPU, started by torchrun: each one compared with the
single-process training step on the same batch (float32 tolerance).

Every test has a hard timeout twice over: the launcher kills torchrun and its workers after
``RUN_TIMEOUT`` seconds, pytest fails the test after ``TEST_TIMEOUT``. A torchrun start costs
about 9 s on the CI machine, so the default suite runs two (pipeline, DDP); the rest are slow.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from graphopt.cli import main
from graphopt.dist.data import make_data
from graphopt.dist.launch import build_command, run_command
from graphopt.dist.pipeline import load_pipeline, read_pipeline_manifest
from tests.test_pipeline_emit import MODEL_FILE

pytestmark = pytest.mark.dist

RUN_TIMEOUT = 240
TEST_TIMEOUT = 300
LR = 0.05


def _emit(tmp_path, stages: int):
    f = tmp_path / "tiny.py"
    f.write_text(MODEL_FILE)
    out = tmp_path / f"pipe{stages}"
    assert main(["optimize", str(f), "-p", f"partition:stages={stages}", "--emit", "pipeline", "-o", str(out)]) == 0
    return out


def _reference(folder, batch_size: int = 8):
    """Loss and weights after one SGD step of the chained stages, one process, whole batch."""
    data = make_data(read_pipeline_manifest(folder), batch_size, seed=0)
    net = load_pipeline(folder)
    xs, y = data.batch(0)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    loss = data.loss_fn(net(*xs), y)
    loss.backward()
    opt.step()
    return loss.item(), net


def _check(save, folder, n_stages_saved: int):
    ref_loss, net = _reference(folder)
    metrics = json.loads((save / "metrics.json").read_text())
    assert metrics["losses"][0] == pytest.approx(ref_loss, rel=1e-6, abs=1e-7)
    if n_stages_saved == 0:
        got = load_file(str(save / "model.safetensors"))
        ref = net.state_dict()
        assert set(got) == set(ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k])
    else:
        initial = load_pipeline(folder)
        for i in range(n_stages_saved):
            got = load_file(str(save / f"stage{i}.safetensors"))
            ref = net.stages[i].state_dict()
            assert set(got) == set(ref)
            for k in ref:
                torch.testing.assert_close(got[k], ref[k])
                assert not torch.equal(got[k], initial.stages[i].state_dict()[k])  # the step did update it
    return metrics


@pytest.mark.timeout(TEST_TIMEOUT)
def test_pipeline_1f1b_step_matches_single_process(tmp_path, capfd):
    folder = _emit(tmp_path, 2)
    save = tmp_path / "trained"
    code = main(["launch", str(folder), "--schedule", "1f1b", "--microbatches", "2", "--steps", "1", "--lr", str(LR),
                 "--save", str(save), "--timeout", str(RUN_TIMEOUT)])
    out = capfd.readouterr().out
    assert code == 0, out
    assert "pipeline 2 stages x 1 replica(s), 1f1b, 2 microbatches, world 2, backend gloo" in out
    assert "data: SYNTHETIC" in out
    metrics = _check(save, folder, 2)
    assert metrics["world"] == 2 and metrics["microbatches"] == 2 and metrics["backend"] == "gloo"


@pytest.mark.timeout(TEST_TIMEOUT)
def test_ddp_step_matches_single_process(tmp_path):
    folder = _emit(tmp_path, 2)
    save = tmp_path / "trained"
    plan = build_command(folder, stages=1, replicas=2, steps=1, lr=LR, save=str(save))
    result = run_command(plan, timeout=RUN_TIMEOUT, capture=True)
    assert result.returncode == 0, result.stdout
    assert "data parallel, 2 replica(s)" in result.stdout
    _check(save, folder, 0)


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT)
def test_pipeline_gpipe_three_stages_with_pass_through(tmp_path):
    folder = _emit(tmp_path, 3)
    manifest = read_pipeline_manifest(folder)
    assert manifest["stages"][1]["outputs"] == ["stem", "lin1"]  # stem crosses two cuts
    save = tmp_path / "trained"
    plan = build_command(folder, schedule="gpipe", microbatches=4, steps=1, lr=LR, save=str(save))
    result = run_command(plan, timeout=RUN_TIMEOUT, capture=True)
    assert result.returncode == 0, result.stdout
    _check(save, folder, 3)


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT)
def test_pipeline_times_data_parallel(tmp_path):
    folder = _emit(tmp_path, 2)
    save = tmp_path / "trained"
    plan = build_command(folder, replicas=2, schedule="1f1b", microbatches=2, steps=1, lr=LR, save=str(save))
    assert plan.world == 4
    result = run_command(plan, timeout=RUN_TIMEOUT, capture=True)
    assert result.returncode == 0, result.stdout
    assert "pipeline 2 stages x 2 replica(s)" in result.stdout
    _check(save, folder, 2)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_pipeline_times_data_parallel_trains_several_steps_with_microbatches(tmp_path):
    """2 stages x 2 replicas with 2 microbatches for 3 steps (DDP's reducer used to assert at step 2,
    "rebuilt parameter indices"): every step's loss and the final weights equal 3 single-process
    SGD steps of the chained stages on the whole batch."""
    folder = _emit(tmp_path, 2)
    save = tmp_path / "trained"
    plan = build_command(folder, replicas=2, schedule="gpipe", microbatches=2, steps=3, lr=LR, save=str(save))
    result = run_command(plan, timeout=RUN_TIMEOUT, capture=True)
    assert result.returncode == 0, result.stdout
    data = make_data(read_pipeline_manifest(folder), 8, seed=0)
    net = load_pipeline(folder)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    ref = []
    for step in range(3):
        xs, y = data.batch(step)
        opt.zero_grad()
        loss = data.loss_fn(net(*xs), y)
        loss.backward()
        opt.step()
        ref.append(loss.item())
    metrics = json.loads((save / "metrics.json").read_text())
    assert metrics["losses"] == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert ref[2] < ref[0]
    for i in range(2):
        got = load_file(str(save / f"stage{i}.safetensors"))
        for k, v in net.stages[i].state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(TEST_TIMEOUT)
def test_corrupt_stage_stops_every_rank(tmp_path):
    """The file exists (so the pre-launch check passes) but cannot be read: the rank that loads
    it reports after the process group is up; every rank stops instead of waiting for it."""
    folder = _emit(tmp_path, 2)
    plan = build_command(folder, steps=1)
    (folder / "stage1" / "weights.safetensors").write_bytes(b"not safetensors")
    result = run_command(plan, timeout=RUN_TIMEOUT, capture=True)
    assert result.returncode != 0
    assert "rank 1 (stage 1) could not load its stage" in result.stdout
    assert "does not match the manifest's checksum" in result.stdout


@pytest.mark.gpu
@pytest.mark.timeout(TEST_TIMEOUT)
def test_pipeline_nccl_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (one per pipeline stage)")
    folder = _emit(tmp_path, 2)
    save = tmp_path / "trained"
    plan = build_command(folder, schedule="gpipe", microbatches=2, steps=1, lr=LR, save=str(save), device="cuda")
    result = run_command(plan, timeout=RUN_TIMEOUT, capture=True)
    assert result.returncode == 0, result.stdout
    assert "backend nccl" in result.stdout
    metrics = json.loads((save / "metrics.json").read_text())
    assert metrics["losses"][0] == pytest.approx(_reference(folder)[0], rel=1e-4)
