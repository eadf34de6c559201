"""The training worker ``torchrun`` starts for an emitted pipeline folder.

    python -m torch.distributed.run --standalone --nproc-per-node 4 \\
        -m graphopt.dist.train OUT/ --schedule 1f1b --microbatches 8 --replicas 2

(``graphopt launch OUT/ ...`` builds and runs this command.) Rank layout for S stages and R
replicas (world size must be S x R): ``stage = rank % S``, ``replica = rank // S``. Ranks of
one replica form a pipeline (``torch.distributed.pipelining``: ``PipelineStage`` with
``ScheduleGPipe`` or ``Schedule1F1B``); ranks holding the same stage form a data-parallel group
whose gradients are averaged with one all-reduce per step (DDP's reducer assumes one forward per
backward, which several microbatches break). Plain data parallel (one stage) uses
``DistributedDataParallel``. ``--stages 1`` trains the chained stages without a pipeline
(pure data parallel). NCCL on GPU (one GPU per local rank), gloo on CPU.

Failure handling: configuration errors are found before any process group exists (every
rank raises the same error, nothing waits); stage loading errors are exchanged with one
``all_gather_object`` so that every rank stops with the failing rank's message; every
collective has the ``--pg-timeout``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import torch
import torch.distributed as dist
from torch import nn

from graphopt.errors import ArtifactError, GraphoptError, LaunchConfigError

__all__ = ["TrainConfig", "Topology", "check_config", "train", "main", "SCHEDULES"]

log = logging.getLogger(__name__)
SCHEDULES = ("gpipe", "1f1b")


@dataclass
class TrainConfig:
    folder: str
    stages: int | None = None  # None: the folder's stage count; 1: no pipeline
    replicas: int | None = None  # None: world size / stages
    schedule: str = "gpipe"
    microbatches: int | None = None  # None: the folder's (from partition:microbatches)
    steps: int = 10
    batch_size: int | None = None  # global batch; None: the example inputs' batch
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    save: str | None = None
    synthetic: bool = False
    model_file: str | None = None
    pg_timeout: float = 300.0
    log_every: int = 1
    trust_code: bool = False  # load stage folders that need code (runs their module.py)


@dataclass
class Topology:
    world: int
    rank: int
    local_rank: int
    stages: int
    replicas: int

    @property
    def stage(self) -> int:
        return self.rank % self.stages

    @property
    def replica(self) -> int:
        return self.rank // self.stages

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def reports(self) -> bool:
        """The rank that prints and writes metrics: last stage of replica 0."""
        return self.is_last and self.replica == 0


def check_config(cfg: TrainConfig, manifest: dict[str, Any], world: int) -> tuple[int, int, int, int]:
    """(stages, replicas, microbatches, batch_size) after checking them; raises LaunchConfigError.

    Pure: no process group, so every rank (and the launcher, before starting torchrun)
    finds the same error at once.
    """
    folder_stages = len(manifest["stages"])
    stages = cfg.stages if cfg.stages is not None else folder_stages
    if stages not in (1, folder_stages):
        raise LaunchConfigError(
            f"--stages {stages} but the folder has {folder_stages} stages", where=cfg.folder,
            fix=f"use --stages {folder_stages} (or 1: no pipeline), or re-emit with -p partition:stages={stages}")
    if cfg.replicas is not None:
        replicas = cfg.replicas
        if replicas < 1:
            raise LaunchConfigError("--replicas must be >= 1")
        if stages * replicas != world:
            raise LaunchConfigError(
                f"world size {world} does not match {stages} stages x {replicas} replicas = {stages * replicas}",
                fix=f"start {stages * replicas} processes (torchrun --nproc-per-node x --nnodes)")
    else:
        if world % stages:
            raise LaunchConfigError(f"world size {world} is not a multiple of the {stages} stages",
                                    fix=f"start a multiple of {stages} processes")
        replicas = world // stages
    if cfg.schedule not in SCHEDULES:
        raise LaunchConfigError(f"unknown schedule '{cfg.schedule}'", fix="use gpipe or 1f1b")
    micro = cfg.microbatches if cfg.microbatches is not None else int(manifest.get("microbatches", 1))
    if stages == 1:
        micro = 1
    if micro < 1:
        raise LaunchConfigError("--microbatches must be >= 1")
    if cfg.schedule == "1f1b" and stages > 1 and micro < stages:
        raise LaunchConfigError(f"1F1B needs at least as many microbatches as stages ({micro} < {stages})",
                                fix=f"use --microbatches {stages} or more, or --schedule gpipe")
    batch = cfg.batch_size if cfg.batch_size is not None else int(manifest["inputs"][0]["shape"][0])
    if batch % (replicas * micro):
        raise LaunchConfigError(
            f"batch size {batch} is not divisible by {replicas} replica(s) x {micro} microbatch(es)",
            fix=f"use --batch-size a multiple of {replicas * micro}")
    if cfg.steps < 1:
        raise LaunchConfigError("--steps must be >= 1")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise LaunchConfigError(f"unknown optimizer '{cfg.optimizer}'", fix="use sgd or adamw")
    return stages, replicas, micro, batch


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LaunchConfigError("--device cuda but CUDA is not available", fix="use --device cpu")
        return torch.device(f"cuda:{local_rank}")
    return dev


def _optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _groups(topo: Topology) -> tuple[Any, Any]:
    """(pipeline group of this rank, data-parallel group of this rank); every rank creates every group."""
    s, r = topo.stages, topo.replicas
    pp = dp = None
    if s > 1 and r > 1:
        for rep in range(r):
            g = dist.new_group([rep * s + i for i in range(s)])
            if rep == topo.replica:
                pp = g
        for i in range(s):
            g = dist.new_group([rep * s + i for rep in range(r)])
            if i == topo.stage:
                dp = g
    elif s > 1:
        pp = dist.group.WORLD
    elif r > 1:
        dp = dist.group.WORLD
    return pp, dp


def _load_module(cfg: TrainConfig, manifest: dict[str, Any], topo: Topology) -> nn.Module:
    from graphopt.dist.pipeline import load_pipeline, load_stage

    if topo.stages == 1:
        return load_pipeline(cfg.folder, trust_code=cfg.trust_code)
    return load_stage(cfg.folder, topo.stage, manifest, trust_code=cfg.trust_code)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def train(cfg: TrainConfig) -> dict[str, Any]:
    """One rank's training run (inside torchrun). Returns the metrics (losses on the last stage)."""
    from graphopt.dist.data import make_data, shard
    from graphopt.dist.pipeline import read_pipeline_manifest

    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise LaunchConfigError("not started by torchrun (WORLD_SIZE/RANK are not set)",
                                fix="use `graphopt launch FOLDER ...` or `torchrun ... -m graphopt.dist.train FOLDER`")
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    manifest = read_pipeline_manifest(cfg.folder)  # every stage's files present, on every rank
    stages, replicas, micro, batch = check_config(cfg, manifest, world)
    topo = Topology(world, rank, local_rank, stages, replicas)
    device = _device(cfg, local_rank)
    data = make_data(manifest, batch, seed=cfg.seed, synthetic=cfg.synthetic, model_file=cfg.model_file)
    torch.manual_seed(cfg.seed)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.pg_timeout))
    try:
        pp_group, dp_group = _groups(topo)
        err = None
        module: nn.Module | None = None
        try:
            module = _load_module(cfg, manifest, topo).to(device)
        except GraphoptError as exc:
            err = str(exc)
        except Exception as exc:  # a corrupt file: every rank must hear of it, not wait for it
            err = f"{type(exc).__name__}: {exc}"
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (rank, topo.stage, err))
        bad = [g for g in gathered if g[2]]
        if bad:
            r, s, msg = bad[0]
            raise ArtifactError(f"rank {r} (stage {s}) could not load its stage: {msg}")
        assert module is not None
        module.train()
        if replicas > 1 and stages == 1:  # plain data parallel: DDP (one forward, one backward per step)
            kw: dict[str, Any] = {"process_group": dp_group}
            if device.type == "cuda":
                kw["device_ids"] = [device.index]
            module = nn.parallel.DistributedDataParallel(module, **kw)
        opt = _optimizer(cfg, [p for p in module.parameters() if p.requires_grad])
        schedule = None
        if stages > 1:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            pstage = PipelineStage(module, topo.stage, stages, device, group=pp_group)
            cls = ScheduleGPipe if cfg.schedule == "gpipe" else Schedule1F1B
            schedule = cls(pstage, n_microbatches=micro, loss_fn=data.loss_fn)
        if topo.reports:
            mode = (f"pipeline {stages} stages x {replicas} replica(s), {cfg.schedule}, {micro} microbatches"
                    if stages > 1 else f"data parallel, {replicas} replica(s)")
            click.echo(f"graphopt train: {mode}, world {world}, backend {backend}, device {device.type}, "
                  f"global batch {batch}")
            click.echo(f"  data: {data.data_source}")
            click.echo(f"  loss: {data.loss_source}")

        losses: list[float] = []
        times: list[float] = []
        for step in range(cfg.steps):
            xs, y = shard(data.batch(step), topo.replica, replicas)
            xs = tuple(x.to(device) for x in xs)
            y = y.to(device)
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step_loss: torch.Tensor | None = None
            if schedule is None:
                out = module(*xs)
                loss = data.loss_fn(out, y)
                loss.backward()
                step_loss = loss.detach()
            elif topo.is_first:
                schedule.step(*xs)
            elif topo.is_last:
                mb_losses: list[torch.Tensor] = []
                schedule.step(target=y, losses=mb_losses)
                step_loss = torch.stack([torch.as_tensor(v).detach() for v in mb_losses]).mean()
            else:
                schedule.step()
            if replicas > 1 and stages > 1:
                _average_gradients(module, dp_group, replicas)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            if topo.is_last and step_loss is not None:
                if replicas > 1:
                    step_loss = step_loss.clone()
                    dist.all_reduce(step_loss, group=dp_group)
                    step_loss /= replicas
                losses.append(float(step_loss))
                if topo.reports and (step % cfg.log_every == 0 or step == cfg.steps - 1):
                    click.echo(f"  step {step + 1}/{cfg.steps}  loss {losses[-1]:.6f}  {times[-1] * 1000:.1f} ms")
        metrics: dict[str, Any] = {
            "config": asdict(cfg), "world": world, "stages": stages, "replicas": replicas, "microbatches": micro,
            "batch_size": batch, "backend": backend, "device": device.type, "losses": losses,
            "step_times_s": times, "median_step_s": statistics.median(times),
            "samples_per_s": batch / statistics.median(times), "data": data.data_source, "loss": data.loss_source,
            "synthetic_data": data.synthetic,
        }
        if cfg.save:
            _save(cfg.save, _unwrap(module), topo, metrics)
        dist.barrier()
        if topo.reports:
            click.echo(f"trained {cfg.steps} steps: loss {losses[0]:.6f} -> {losses[-1]:.6f}, median step "
                  f"{metrics['median_step_s'] * 1000:.1f} ms, {metrics['samples_per_s']:.1f} samples/s")
        return metrics
    finally:
        dist.destroy_process_group()


def _average_gradients(module: nn.Module, group: Any, replicas: int) -> None:
    """Average the stage's gradients over the ranks holding the same stage (one all-reduce).

    A pipeline stage runs one forward per microbatch before its backwards; DDP's reducer expects
    one forward per backward and asserts from the second step on ("rebuilt parameter indices")
    when there are several microbatches, so pipeline x data parallel averages explicitly.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= replicas
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _save(folder: str, module: nn.Module, topo: Topology, metrics: dict[str, Any]) -> None:
    """Replica 0 writes each stage's trained weights; the reporting rank writes metrics.json."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if topo.replica == 0:
        state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
        name = "model.safetensors" if topo.stages == 1 else f"stage{topo.stage}.safetensors"
        save_file(state, str(out / name))
    if topo.reports:
        from graphopt.serialize import write_json

        write_json(out / "metrics.json", metrics)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m graphopt.dist.train",
                                description="Train an emitted pipeline folder (started by torchrun).")
    p.add_argument("folder")
    p.add_argument("--stages", type=int)
    p.add_argument("--replicas", type=int)
    p.add_argument("--schedule", choices=SCHEDULES, default="gpipe")
    p.add_argument("--microbatches", type=int)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--save")
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--model-file")
    p.add_argument("--pg-timeout", type=float, default=300.0)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--trust-code", action="store_true")
    a = p.parse_args(argv)
    return TrainConfig(**{k.replace("-", "_"): v for k, v in vars(a).items()})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    rank = os.environ.get("RANK", "?")
    try:
        train(cfg)
        return 0
    except GraphoptError as exc:
        click.echo(f"error: [rank {rank}] {exc}", err=True)
        return exc.exit_code


def _exit_now(code: int) -> None:
    """Leave the rank without running the C++ static destructors.

    After the process group is destroyed, a rank that exits normally can still abort in native teardown
    ("terminate called without an active exception", SIGABRT, no Python frame): a communication thread
    is still joinable when its owner's static destructor runs. It happens in 1 run in 7 on a loaded
    2-core machine with 4 gloo ranks, after all the work is done and saved, and torchrun then reports
    the whole job as failed. Everything a rank writes is flushed and closed before this point.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    # argparse's usage errors (SystemExit 2) come before any process group and exit normally
    try:
        _code = main()
    except Exception:  # an unexpected error keeps its traceback (torchrun shows it per rank)
        import traceback

        traceback.print_exc()
        _code = 1
    _exit_now(_code)
