"""`graphopt launch`: train an emitted pipeline folder under torchrun."""

from __future__ import annotations

import click
from graphopt.cli._console import make_console
from rich.table import Table

from graphopt.cli import cli

console = make_console()


def plan_table(manifest: dict) -> Table:
    from graphopt.report import human

    part = manifest.get("partition", {})
    unit = part.get("unit", "")
    t = Table(title=f"pipeline: {len(manifest['stages'])} stages by {part.get('by')} "
                    f"(balance max/mean {part.get('balance', float('nan')):.3f})",
              title_justify="left", header_style="bold")
    for col, just in (("stage", "right"), ("nodes", "left"), ("cost", "right"), ("share", "right"),
                      ("params", "right"), ("receives", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    total = part.get("total_cost") or 1.0
    details = part.get("stage_detail", [])
    for i, st in enumerate(manifest["stages"]):
        d = details[i] if i < len(details) else {}
        recv = ", ".join(f"{x['name']} {'x'.join(map(str, x['shape'] or []))}" for x in
                         (part["cuts"][i - 1]["tensors"] if i > 0 else [])) or "model inputs"
        cost = st["cost"]
        cost_s = f"{cost * 1000:.2f} ms" if unit == "seconds" else human(cost)
        t.add_row(str(i), f"{d.get('first', '?')} .. {d.get('last', '?')} ({d.get('nodes', '?')})", cost_s,
                  f"{cost / total * 100:.1f}%", human(st["params"]), recv)
    b = part.get("bubble", {})
    if b:
        t.caption = (f"{part.get('cut_bytes_total', 0)} bytes cross the cuts per batch; predicted bubble "
                     f"{b['predicted'] * 100:.1f}% at {b['microbatches']} microbatches (balanced: "
                     f"{b['ideal'] * 100:.1f}%)")
    return t


@cli.command(context_settings={"max_content_width": 100})
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--stages", type=int, help="Pipeline stages: the folder's count [default], or 1 for plain data "
              "parallel over the chained stages.")
@click.option("--replicas", type=int, default=1, show_default=True,
              help="Data-parallel replicas (DDP); world size = stages x replicas.")
@click.option("--schedule", type=click.Choice(["gpipe", "1f1b"]), default="gpipe", show_default=True)
@click.option("--microbatches", type=int, help="Microbatches per step [default: the partition's].")
@click.option("--steps", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, help="Global batch [default: the example inputs' batch].")
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--momentum", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if available, NCCL; else CPU, gloo), cpu, cuda.")
@click.option("--save", type=click.Path(file_okay=False), help="Write trained weights (stageK.safetensors) and metrics.json here.")
@click.option("--synthetic", is_flag=True, help="Random data even if the model file has data().")
@click.option("--model-file", type=click.Path(dir_okay=False), help="Model file for loss()/data() [default: the one the folder was made from].")
@click.option("--nnodes", type=int, default=1, show_default=True, help="Machines (run the same command on each).")
@click.option("--nproc-per-node", type=int, help="Processes per machine [default: world size / nnodes].")
@click.option("--node-rank", type=int, help="This machine's rank (optional with c10d rendezvous).")
@click.option("--rdzv-endpoint", help="Multi-node rendezvous HOST:PORT (one of the nodes).")
@click.option("--rdzv-id", help="Multi-node job id (the same on every node).")
@click.option("--pg-timeout", type=float, default=300.0, show_default=True, help="Timeout of each collective (s).")
@click.option("--timeout", type=float, help="Stop the whole run after this many seconds.")
@click.option("--print-command", is_flag=True, help="Print the torchrun command instead of running it.")
@click.option("--trust-code", is_flag=True, help="Load stage folders that need code (imports their module.py: "
              "only for folders you trust). Without it, stages are rebuilt from graph.json and no code runs.")
def launch(folder: str, stages: int | None, replicas: int, schedule: str, microbatches: int | None, steps: int,
           batch_size: int | None, lr: float, optimizer: str, momentum: float, seed: int, device: str,
           save: str | None, synthetic: bool, model_file: str | None, nnodes: int, nproc_per_node: int | None,
           node_rank: int | None, rdzv_endpoint: str | None, rdzv_id: str | None, pg_timeout: float,
           timeout: float | None, print_command: bool, trust_code: bool) -> None:
    """Train a pipeline folder (`optimize -p partition:stages=N --emit pipeline`) under torchrun.

    \b
    Examples:
      graphopt launch out/ --schedule 1f1b --microbatches 8           # one process per stage
      graphopt launch out/ --replicas 2                               # pipeline x data parallel
      graphopt launch out/ --stages 1 --replicas 4                    # data parallel only (DDP)
      graphopt launch out/ --nnodes 2 --rdzv-endpoint node0:29400 --rdzv-id job1   # on each node
      graphopt launch out/ --print-command
    """
    from graphopt.dist.launch import LaunchError, build_command, run_command

    plan = build_command(folder, stages=stages, replicas=replicas, schedule=schedule, microbatches=microbatches,
                         steps=steps, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
                         seed=seed, device=device, save=save, synthetic=synthetic, model_file=model_file,
                         pg_timeout=pg_timeout, nnodes=nnodes, nproc_per_node=nproc_per_node, node_rank=node_rank,
                         rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, trust_code=trust_code)
    if print_command:
        click.echo(plan.shell())
        return
    console.print(plan_table(plan.manifest))
    console.print(f"starting torchrun: {plan.world} processes ({plan.stages} stage(s) x {plan.replicas} "
                  f"replica(s)) on {plan.nnodes} node(s)")
    console.print(f"[dim]{plan.shell()}[/]")
    result = run_command(plan, timeout=timeout)
    if result.returncode != 0:
        raise LaunchError(f"training failed (torchrun exit code {result.returncode})",
                            fix="see the rank messages above")
