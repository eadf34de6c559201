"""``graphopt prune-iterative``: prune k% per round over N rounds, fine-tuning with the training
harness between rounds (issue 4, item 5)."""

from __future__ import annotations

from typing import Any

import click
from graphopt.cli._console import make_console
from rich.table import Table

from graphopt.cli import capture_option, cli
from graphopt.cli.bench import _check_float_outputs, _config, _out_folder, _train_options, load_data
from graphopt.serialize import dumps

console = make_console()


@cli.command(name="prune-iterative")
@click.argument("model_file", metavar="MODEL.py[:FACTORY]|FOLDER")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True)
@click.option("--ratio-per-round", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Structured: share of the remaining channels removed per round; "
                                      "sparsity: rounds reach 1-(1-r)^k zeros.")
@click.option("--prune", "prune_opts", default="", metavar="k=v,...",
              help="Other prune options, e.g. 'mode=structured,criterion=taylor,scope=global,round_to=8'.")
@click.option("--epochs-per-round", type=click.IntRange(1), default=1, show_default=True,
              help="Fine-tuning epochs after each round (--epochs is ignored).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@_train_options
@click.option("--no-verify", is_flag=True, help="Skip the numeric checks of each pruning round.")
@click.option("--distill", is_flag=True, help="Fine-tune each round by distillation from the trained unpruned "
                                              "model (round 0): KL on logits with --temperature.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="--distill: weight of the KL term.")
@click.option("--trust-code", is_flag=True, help="FOLDER: build the model from its module.py (runs its code).")
@click.option("-o", "--out", type=click.Path(file_okay=False),
              help="Write prune.json, prune.md and the final model (model/, a torch folder) here.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@capture_option
def prune_iterative_cmd(model_file: str, rounds: int, ratio_per_round: float, prune_opts: str, epochs_per_round: int,
                        batch_size: int, no_verify: bool, out: str | None, force: bool, distill: bool = False,
                        temperature: float = 4.0, alpha: float = 0.9, trust_code: bool = False, **kw: Any) -> None:
    """Prune MODEL.py in rounds, fine-tuning on real data between rounds.

    \b
    Example:
      graphopt prune-iterative cnn.py --rounds 3 --ratio-per-round 0.3 --prune criterion=l1 \\
          --data mnist --epochs-per-round 2 --optimizer adam --lr 1e-3 -o runs/pruned
    """
    from graphopt.analysis.cost import graph_cost
    from graphopt.bench import report as rep
    from graphopt.bench.train import fit
    from graphopt.emit.torch_folder import emit_torch_folder
    from graphopt.modelfile import load_model_or_folder
    from graphopt.pass_infra import parse_pass_spec
    from graphopt.prune import prune_iterative, removed_nothing

    _, opts = parse_pass_spec(f"prune:{prune_opts}" if prune_opts else "prune")
    out_path = _out_folder(out, "", force) if out else None
    spec = load_model_or_folder(model_file, trust_code=trust_code)
    _check_float_outputs(spec)
    data, desc = load_data(spec, kw["data_name"], spec.example_inputs)
    cfg = _config({**kw, "epochs": epochs_per_round}, batch_size)
    console.print(f"data: {desc}")
    rows: list[dict[str, Any]] = []
    base = fit(spec.module, data, cfg, name="round 0 (unpruned)", loss=spec.loss, example_inputs=spec.example_inputs)
    import graphopt

    cost0 = graphopt.capture(spec.module, spec.example_inputs).meta["graphopt"]["cost"]
    rows.append({"round": 0, "macs": cost0.macs, "params": cost0.params, **base.final})
    teacher = None
    if distill:
        import copy

        teacher = copy.deepcopy(spec.module)  # the trained, unpruned model teaches every round

    def finetune(gm: Any) -> None:
        if teacher is not None:
            from graphopt.recover.distill import DistillConfig, distill_fit

            res = distill_fit(gm, teacher, data, cfg, distill=DistillConfig(temperature=temperature, alpha=alpha),
                              name=f"round {len(rows)}", loss=spec.loss, example_inputs=spec.example_inputs)
        else:
            res = fit(gm, data, cfg, name=f"round {len(rows)}", loss=spec.loss, example_inputs=spec.example_inputs)
        cost = graph_cost(gm)
        rows.append({"round": len(rows), "macs": cost.macs, "params": cost.params, **res.final})
        console.print(f"round {rows[-1]['round']}: {cost.macs / 1e6:.1f} M MACs, {cost.params / 1e3:.1f} k params, "
                      f"test accuracy {res.final.get('test_accuracy')}")

    gm, reports = prune_iterative(spec.module, spec.example_inputs, rounds=rounds, ratio_per_round=ratio_per_round,
                                  finetune=finetune, verify=not no_verify, **opts)
    for row, report in zip(rows[1:], reports):  # a round that removed nothing says so
        why = removed_nothing(report.records[0])
        row["pruned"] = why is None
        if why:
            row["removed_nothing"] = why
    t = Table(header_style="bold", title="iterative pruning with fine-tuning", title_justify="left")
    for col in ("round", "MACs", "params", "test accuracy", "train time s", "pruned"):
        t.add_column(col, justify="right")
    for r in rows:
        acc = r.get("test_accuracy")
        pruned = "-" if "pruned" not in r else "yes" if r["pruned"] else "nothing removed"
        t.add_row(str(r["round"]), f"{r['macs'] / 1e6:.2f} M", f"{r['params'] / 1e3:.1f} k",
                  f"{acc:.4f}" if acc is not None else "-", f"{r.get('train_time_s', 0):.1f}", pruned)
    console.print(t)
    for r in rows:
        if r.get("removed_nothing"):
            click.echo(f"warning: round {r['round']} removed nothing: {r['removed_nothing']} "
                       "(use a larger --ratio-per-round or a smaller round_to)", err=True)
    if out_path is not None:
        doc = {"kind": "prune_iterative", "model_file": str(spec.path), "data": desc, "rounds": rows,
               "ratio_per_round": ratio_per_round, "prune_options": opts,
               "distill": {"temperature": temperature, "alpha": alpha} if distill else None, "config": cfg.__dict__,
               "passes": [r.as_dict() for r in reports]}
        md = "| round | MACs | params | test accuracy | pruned |\n|---:|---:|---:|---:|---|\n" + "".join(
            f"| {r['round']} | {r['macs']} | {r['params']} | {r.get('test_accuracy')} | "
            f"{'-' if 'pruned' not in r else 'yes' if r['pruned'] else 'nothing removed: ' + r['removed_nothing']} |\n"
            for r in rows)
        rep.write_outputs(out_path, {"prune.json": dumps(doc), "prune.md": md,
                                     "model": lambda p: emit_torch_folder(
                                         gm, p, report=reports[-1], source={"file": str(spec.path), "sha256": spec.sha256,
                                                                            "factory": spec.factory})}, force=force)
        console.print(f"[bold green]wrote[/] {out_path}/ (prune.json, prune.md, model/)")
