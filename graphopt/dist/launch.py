"""Build (and run) the ``torchrun`` command that trains an emitted pipeline folder.

torchrun is started as ``python -m torch.distributed.run`` with the current interpreter, so
the workers see the same environment. One machine: ``--standalone`` (a free rendezvous port is
picked). Several machines: the same command on every node with ``--nnodes N
--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB`` (torchrun's own rendezvous;
HOST is any one of the nodes, reachable from all).

Everything that can be checked without starting processes is checked here first (the folder
and its stage files, stages x replicas = world size, microbatches, batch size), so a bad
configuration is a one-line error rather than N failing processes.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.errors import GraphoptError, LaunchConfigError, ModelFileError

__all__ = ["LaunchPlan", "LaunchError", "build_command", "run_command"]


class LaunchError(GraphoptError):
    """The distributed run failed or had to be stopped (the ranks' own messages say why)."""

    exit_code = 1


@dataclass
class LaunchPlan:
    command: list[str]
    world: int
    nnodes: int
    nproc_per_node: int
    stages: int
    replicas: int
    microbatches: int
    batch_size: int
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)

    def shell(self) -> str:
        return shlex.join(self.command)


def build_command(folder: str | Path, *, stages: int | None = None, replicas: int = 1, schedule: str = "gpipe",
                  microbatches: int | None = None, steps: int = 10, batch_size: int | None = None, lr: float = 0.01,
                  optimizer: str = "sgd", momentum: float = 0.0, seed: int = 0, device: str = "auto",
                  save: str | None = None, synthetic: bool = False, model_file: str | None = None,
                  pg_timeout: float = 300.0, nnodes: int = 1, nproc_per_node: int | None = None,
                  node_rank: int | None = None, rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
                  rdzv_backend: str = "c10d", python: str | None = None, trust_code: bool = False) -> LaunchPlan:
    """The torchrun command for ``folder``, after checking the configuration."""
    from graphopt.dist.train import TrainConfig, check_config
    from graphopt.dist.pipeline import read_pipeline_manifest

    manifest = read_pipeline_manifest(folder)
    if not trust_code:  # refused here, not in every rank after torchrun started
        from graphopt.dist.pipeline import check_loads_without_code

        check_loads_without_code(folder, manifest)
    source = manifest.get("source", {}).get("file")
    if model_file and not Path(model_file).is_file():
        raise ModelFileError("model file not found", where=str(model_file), fix="check --model-file")
    if not model_file and not synthetic and source and not Path(source).is_file():
        raise ModelFileError("the model file this folder was made from (for its loss() and data()) is gone",
                             where=str(source), fix="give --model-file NEW_PATH, or --synthetic for random data")
    folder_stages = len(manifest["stages"])
    n_stages = stages if stages is not None else folder_stages
    if replicas < 1:
        raise LaunchConfigError("--replicas must be >= 1")
    world = n_stages * replicas
    if nnodes < 1:
        raise LaunchConfigError("--nnodes must be >= 1")
    if nproc_per_node is None:
        if world % nnodes:
            raise LaunchConfigError(f"{world} processes ({n_stages} stages x {replicas} replicas) do not split "
                                    f"evenly over {nnodes} nodes", fix="give --nproc-per-node, or change --replicas")
        nproc_per_node = world // nnodes
    if nproc_per_node * nnodes != world:
        raise LaunchConfigError(f"world size {nproc_per_node} x {nnodes} nodes = {nproc_per_node * nnodes} does not "
                                f"match {n_stages} stages x {replicas} replicas = {world}",
                                fix=f"use --nproc-per-node {world // nnodes if world % nnodes == 0 else '?'} "
                                    "or change --replicas")
    cfg = TrainConfig(folder=str(folder), stages=n_stages, replicas=replicas, schedule=schedule,
                      microbatches=microbatches, steps=steps, batch_size=batch_size, optimizer=optimizer)
    _, _, micro, batch = check_config(cfg, manifest, world)
    if nnodes > 1 and not rdzv_endpoint:
        raise LaunchConfigError("a multi-node run needs --rdzv-endpoint HOST:PORT",
                                fix="give the address of one node, reachable from all (e.g. node0:29400)")
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1 and not rdzv_endpoint:
        cmd += ["--standalone", "--nnodes=1"]
    else:
        cmd += [f"--nnodes={nnodes}", f"--rdzv-backend={rdzv_backend}", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id or 'graphopt'}"]
        if node_rank is not None:
            cmd.append(f"--node-rank={node_rank}")
    cmd += [f"--nproc-per-node={nproc_per_node}", "--max-restarts=0", "-m", "graphopt.dist.train",
            str(folder), "--stages", str(n_stages), "--replicas", str(replicas), "--schedule", schedule,
            "--microbatches", str(micro), "--steps", str(steps), "--batch-size", str(batch), "--lr", repr(lr),
            "--optimizer", optimizer, "--seed", str(seed), "--device", device, "--pg-timeout", repr(pg_timeout)]
    if momentum:
        cmd += ["--momentum", repr(momentum)]
    if save:
        cmd += ["--save", str(save)]
    if synthetic:
        cmd.append("--synthetic")
    if model_file:
        cmd += ["--model-file", str(model_file)]
    if trust_code:
        cmd.append("--trust-code")
    return LaunchPlan(cmd, world, nnodes, nproc_per_node, n_stages, replicas, micro, batch, manifest)


def run_command(plan: LaunchPlan, *, timeout: float | None = None, env: dict[str, str] | None = None,
                capture: bool = False) -> subprocess.CompletedProcess:
    """Run torchrun; on ``timeout`` kill its whole process group (torchrun and every worker).

    The processes are started in their own session, so the kill reaches exactly the processes
    this call started.
    """
    full_env = dict(os.environ if env is None else env)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    kw: dict[str, Any] = {"env": full_env, "start_new_session": True, "text": True}
    if capture:
        kw.update(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc = subprocess.Popen(plan.command, **kw)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        raise LaunchError(f"training did not finish within {timeout:.0f} s; torchrun and its workers were stopped",
                            fix="raise --timeout, or check the rank messages above for a stuck rank") from None
    except KeyboardInterrupt:
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(plan.command, proc.returncode, out, None)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return
            time.sleep(0.1)
