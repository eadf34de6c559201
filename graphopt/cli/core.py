"""The core verbs: optimize, inspect, passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from graphopt.cli._console import make_console
from rich.table import Table

from graphopt.cli import capture_option, cli
from graphopt.cli.auto import auto_options
from graphopt.emit.base import emitter_names
from graphopt.errors import EmitError, PassConfigError
from graphopt.serialize import dumps, read_json, write_json

console = make_console()


@cli.command(context_settings={"max_content_width": 100})
@click.argument("model_file", metavar="MODEL.py[:FACTORY]|FOLDER")
@click.option("-p", "--pass", "pass_specs", multiple=True, metavar="PASS[:k=v,...]",
              help="A pass and its options; repeat for a pipeline (order matters). List values use '|'.")
@click.option("--trust-code", is_flag=True, help="FOLDER: build the model from its module.py (runs its code).")
@click.option("--config", type=click.Path(dir_okay=False), help="TOML pipeline file ([[pass]] tables); runs before -p passes.")
@click.option("-o", "--out", type=click.Path(file_okay=False), help="Output folder [default: MODEL_optimized].")
@click.option("--emit", "emit_format", default="torch", show_default=True,
              help="Artifact format: " + ", ".join(emitter_names()) + " (entry-point group graphopt.emitters).")
@click.option("--emit-option", "emit_options", multiple=True, metavar="KEY=VALUE",
              help="An option of the emitter, repeatable (--emit ort: loss=, optimizer=adamw|sgd, lr=, "
                   "weight_decay=, eps=, betas='b1|b2'; --emit onnx: opset=, dynamic_batch=).")
@click.option("--no-verify", is_flag=True, help="Skip the numeric checks (lint and shape propagation still run).")
@click.option("--verify", "verify_extra", type=click.Choice(["train-step"]), default=None,
              help="Also run one optimizer step on original and rewrite and compare the parameters.")
@click.option("--force", is_flag=True, help="Replace an output folder graphopt wrote (never the model's folder or "
              "one above it, a repository, the current folder, home or /).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Also write the pipeline report as JSON here.")
@auto_options
@capture_option
def optimize(model_file: str, pass_specs: tuple[str, ...], config: str | None, out: str | None, emit_format: str,
             emit_options: tuple[str, ...], no_verify: bool, force: bool, report_path: str | None,
             verify_extra: str | None = None, trust_code: bool = False, **auto_kw: object) -> None:
    """Capture MODEL.py, run the passes with verification, and emit the optimised model.
    Without -p/--config: automatic mode (candidates decided by measuring the training step).

    \b
    Example:
      graphopt optimize model.py -p channels_last -p cleanup -o out/
      graphopt optimize model.py -p prune:ratio=0.5,mode=structured --emit onnx -o out/
      graphopt optimize trained/model -p prune:macs=0.5,reconstruct=8 -o pruned/   (a folder from train -o)
      graphopt optimize model.py --device cpu --time-budget 120 --report r.json -o out/
    """
    from graphopt.cli._paths import check_out_file, check_out_folder, made_parents, write_text
    from graphopt.emit.base import create_emitter
    from graphopt.manager import PassManager
    from graphopt.modelfile import load_model_or_folder
    from graphopt.pass_infra import build_pipeline
    from graphopt.report import pass_table, print_coverage, summary_table

    auto = not pass_specs and not config
    if not auto and any(auto_kw.get(k) is not None for k in ("target_time", "max_error", "time_budget")):
        raise PassConfigError("--target-time/--max-error/--time-budget belong to the automatic mode",
                              fix="drop -p/--config to let graphopt choose, or drop these options")
    passes = [] if auto else build_pipeline(pass_specs, config)
    if auto:  # an unusable device is a user error before any work
        import torch

        from graphopt.bench.torch_backend import resolve_device

        auto_kw["device"] = str(resolve_device(auto_kw.get("device") or ("cuda" if torch.cuda.is_available()
                                                                          else "cpu")))
    options: dict[str, str] = {}
    for item in emit_options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PassConfigError(f"--emit-option '{item}' is not KEY=VALUE", fix="e.g. --emit-option loss=mse")
        options[key.strip()] = value.strip()
    emitter = create_emitter(emit_format, options)  # unknown format or options: refused here
    emitter.preflight(passes)  # missing packages, impossible pipelines: before any work
    model_path = model_file.rsplit(":", 1)[0] if not Path(model_file).exists() else model_file
    out_path = Path(out) if out else Path(f"{Path(model_path).stem}_optimized")
    check_out_folder(out_path, force, create_parents=True, protect=[model_path])
    if report_path:
        check_out_file(report_path, "--report")
    if report_path and Path(report_path).exists() and not force:
        raise EmitError("report file exists", where=report_path, fix="choose another --report path or pass --force")
    spec = load_model_or_folder(model_file, trust_code=trust_code)
    from graphopt.capture import capture
    from graphopt.ir import graph_meta

    with console.status("capturing"):
        gm = capture(spec.module, spec.example_inputs)
    cost = graph_meta(gm)["cost"]
    _print_capture(gm)
    console.print(f"captured {graph_meta(gm)['source_class'].rsplit('.', 1)[-1]}: {cost.nodes} nodes, {cost.macs / 1e9:.3f} GMACs, "
                  f"{cost.params / 1e6:.3f} M params")
    if cost.coverage["opaque"]:
        print_coverage(console, cost)
    if spec.data is not None:
        graph_meta(gm)["calibration_data"] = spec.calibration_batches()
    auto_report = None
    if auto:
        from graphopt.cli.auto import run_auto

        gm, report, auto_report = run_auto(console, spec, gm, report_path=report_path, out_path=out_path,
                                           **auto_kw)  # type: ignore[arg-type]
    else:
        verify: bool | str = False if no_verify else (verify_extra or True)
        manager = PassManager(passes, verify=verify, on_pass=lambda rec: console.print(pass_table(rec)))
        gm, report = manager.run(gm, spec.example_inputs)
    console.print(summary_table(report))
    with console.status(f"emitting {emit_format}"), made_parents(out_path):
        result = emitter.emit(gm, out_path, report=report, force=force, spec=spec,
                              source={"file": str(spec.path), "sha256": spec.sha256, "factory": spec.factory})
    line = emitter.summary(result)
    if line:
        console.print(line)
    emit_check = result.check
    path = result.path
    if report_path:
        doc = report.as_dict()
        if auto_report is not None:
            doc["auto"] = auto_report.as_dict()
        from graphopt.capture import capture_summary

        doc["capture"] = capture_summary(gm) | {"coverage": cost.coverage["fraction"]}
        if emit_check:
            doc["emit"] = {"format": emit_format, "check": emit_check}
        write_text(report_path, dumps(doc), "--report")
    verdict = "verified" if report.verified else "NOT verified (--no-verify)"
    console.print(f"[bold green]wrote[/] {path}/ ({emit_format}, {verdict})")


def _print_capture(gm: Any) -> None:
    """The front end used and why, notes (caches disabled), and the eager check (a mismatch loudly)."""
    from graphopt.capture import capture_lines

    for text, warn in capture_lines(gm):
        if warn:
            console.print(f"[bold red]{text}[/]")
            click.echo(text, err=True)
        else:
            console.print(text)


@cli.command()
@click.argument("model_file", metavar="MODEL.py[:FACTORY]")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--all-nodes", is_flag=True, help="Table: also list nodes without MACs or parameters.")
@click.option("--draw", type=click.Path(dir_okay=False), help="Draw the graph to FILE.svg / FILE.png / FILE.pdf.")
@capture_option
def inspect(model_file: str, fmt: str, all_nodes: bool, draw: str | None) -> None:
    """What a model costs: per-layer shapes, MACs, params, coverage of the capture."""
    from graphopt.capture import capture, capture_summary
    from graphopt.modelfile import load_model_file
    from graphopt.report import draw_graph, layer_rows, layer_table, print_coverage

    if draw and Path(draw).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise PassConfigError(f"cannot draw to '{Path(draw).suffix}'", where=draw, fix="use .png, .svg or .pdf")
    if draw:
        from graphopt.cli._paths import check_out_file

        check_out_file(draw, "--draw")
    spec = load_model_file(model_file)
    gm = capture(spec.module, spec.example_inputs)
    cost = gm.meta["graphopt"]["cost"]
    if fmt == "json":
        doc = {"model": gm.meta["graphopt"]["source_class"], "inputs": gm.meta["graphopt"]["inputs"],
               "macs": cost.macs, "backward_macs_estimate": cost.backward_macs, "params": cost.params,
               "trainable_params": cost.trainable_params, "activation_bytes": cost.activation_bytes,
               "coverage": cost.coverage["fraction"], "coverage_detail": cost.coverage,
               "capture": capture_summary(gm), "nodes": layer_rows(gm)}
        click.echo(dumps(doc))
    else:
        console.print(layer_table(gm, cost, all_nodes))
        console.print(f"forward {cost.macs / 1e9:.3f} GMACs (backward ~{cost.backward_macs / 1e9:.3f}), "
                      f"{cost.params / 1e6:.3f} M params ({cost.trainable_params / 1e6:.3f} M trainable), "
                      f"activations {cost.activation_bytes / 2**20:.1f} MiB")
        print_coverage(console, cost)
        _print_capture(gm)
    if draw:
        draw_graph(gm, draw)
        if fmt == "table":
            console.print(f"drew {draw}")


@cli.command(name="passes")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def list_passes(fmt: str) -> None:
    """Every registered pass with its semantics, options and defaults."""
    from graphopt.pass_infra import available_passes

    passes = available_passes()
    if fmt == "json":
        doc = {name: {"semantics": cls.semantics.value, "training": cls.training,
                      "training_reason": cls.training_reason, "summary": cls.summary,
                      "options": {k: {"type": o.describe(), "default": o.default, "help": o.help}
                                  for k, o in cls.options.items()}} for name, cls in passes.items()}
        click.echo(dumps(doc))
        return
    t = Table(header_style="bold", show_lines=True)
    t.add_column("pass")
    t.add_column("semantics")
    t.add_column("training")
    t.add_column("what it does / options (default)", overflow="fold")
    for name, cls in passes.items():
        opts = "\n".join(f"  [cyan]{k}[/]={o.default!r} ({o.describe()}): {o.help}" for k, o in cls.options.items())
        training = cls.training + (f": {cls.training_reason}" if cls.training_reason else "")
        t.add_row(name, cls.semantics.value, training, cls.summary + (("\n" + opts) if opts else ""))
    console.print(t)
