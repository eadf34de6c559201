"""Every command and snippet in README.md is executed here, so the README cannot drift from the code.

How the README is covered (the extraction is generic: a block added to the README is picked up):

- ```bash blocks: each line (``\\`` continuations joined, ``# comments`` removed) is a command. The
  commands of one block run in order in one fresh temporary folder (a block is a session: `launch
  out/` trains what the `optimize ... -o out/` line above wrote). Per command:
  * ``make X``: ``make -n X`` must succeed (the default suite must not build a venv or run itself);
    ``make demo``'s own commands run for real in a ``slow`` test.
  * ``graphopt ...``: run through ``graphopt.cli.main`` in the block's folder, which holds
    ``model.py`` (:data:`MODEL_FILE`, a small CNN following the README's model-file convention:
    ``model()``, ``example_inputs()`` (8x3x16x16), ``loss()``, ``data()`` (800 small images, so that
    ``--data auto`` trains in seconds; ``--data mnist`` lines use the built-in digits) and ``pipeline.toml`` (the README's TOML block). Synopsis notation
    is expanded: ``[...]`` groups run without and with their content, each of ``a|b|c`` runs, ``...``
    is dropped. An output folder (``-o X``) that an earlier line of the block wrote is removed first
    (each line is a standalone example). A ``graphopt launch DIR`` whose DIR is not a pipeline folder
    gets one first (``optimize model.py -p partition:stages=2 --emit pipeline -o DIR``, the README's
    own recipe).
  * reduced settings (only these arguments are rewritten): ``--epochs``/``--epochs-per-round`` 1
    (added when a training command has none), ``--steps`` at most 2, ``--warmup`` at most 1.
  * slow lines (:func:`is_slow`: ORT training artifacts, ``--data mnist``, ``prune-iterative``,
    torchrun) run in the ``slow`` test of their block (in order, with the lines writing the
    folders its launches read). In the
    default suite ``graphopt launch`` runs with ``--print-command`` appended (the folder, stages x
    replicas, microbatches and batch are all checked, no process is started). ``--device cuda``
    lines need a GPU (skipped without one).
  * ``python benchmarks/gpu_session.py ...`` (the GPU session's command): run with ``--check-args``
    appended: it plans its steps and checks each step's arguments against that script's argparse,
    running nothing (so it is checked without a GPU too).
  A command that exits non-zero fails the test with the README line, the command and its output.
- ```python blocks run with ``exec`` in a fresh temporary folder, in a namespace with what the
  README's prose assumes (:func:`_namespace`: ``model``, ``x``, ``y``, ``gm``, ``batches``,
  ``train_set``/``test_set`` = ``train_ds``/``test_ds``, ``m1``, ``m2``, ``loss_fn``, ``device_type``,
  ``make_optimizer``) on the same small CNN. Per-snippet context (:data:`SNIPPET_CONTEXT`): ORT
  training first emits ``out/ort`` with the README's command and uses ``(inputs, target)`` batches;
  ``cuda:`` snippets need two GPUs; ORT snippets are ``slow``. The model-file snippet (first line ``# model.py``) is written as
  ``model.py`` and must pass ``graphopt inspect``.
- ```toml blocks must load as pipeline files.
- inline commands in the prose (```graphopt SUBCOMMAND ...``` in backticks): the subcommand must
  exist and every option named must be one of its options (with a valid choice where it has
  choices); they are references, not run.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from graphopt.cli import cli, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HAS_CUDA = torch.cuda.is_available()

MODEL_FILE = textwrap.dedent('''
    """The README's model-file convention on a small CNN (3x16x16 inputs, 10 classes)."""
    import torch
    from torch import nn
    import torch.nn.functional as F


    class Unit(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.units = nn.Sequential(Unit(8), Unit(8), Unit(8))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.units(torch.relu(self.stem(x)))
            return self.fc(torch.flatten(self.pool(x), 1))


    def model():
        torch.manual_seed(0)
        return Net()


    def example_inputs():
        return (torch.randn(8, 3, 16, 16),)


    def loss(output, target):
        return F.cross_entropy(output, target)


    def data():  # 640 + 160 images whose class is the brightest of ten 4x4 patches (learnable, small)
        from torch.utils.data import TensorDataset

        g = torch.Generator().manual_seed(0)
        x = torch.randn(800, 3, 16, 16, generator=g) * 0.5
        y = torch.randint(0, 10, (800,), generator=g)
        for c in range(10):
            r, k = divmod(c, 4)
            x[y == c, :, r * 4:r * 4 + 4, k * 4:k * 4 + 4] += 1.5
        return TensorDataset(x[:640], y[:640]), TensorDataset(x[640:], y[640:])
''')


# -- extraction -------------------------------------------------------------------------------------
def blocks(lang: str) -> list[tuple[int, str]]:
    """(README line of the first body line, dedented body) of every ```lang block."""
    lines = README.read_text().splitlines()
    out = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\w+)\s*$", lines[i])
        if m:
            indent, body = len(m.group(1)), []
            j = i + 1
            while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
                body.append(lines[j][indent:])
                j += 1
            if m.group(2) == lang:
                out.append((i + 2, "\n".join(body)))
            i = j
        i += 1
    return out


def commands(first_line: int, text: str) -> list[tuple[int, list[str]]]:
    """(README line, tokens) per command of a bash block."""
    out, buf, start = [], "", None
    for k, line in enumerate(text.splitlines()):
        start = first_line + k if start is None else start
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        tokens = shlex.split(buf + line, comments=True)
        if tokens:
            out.append((start, tokens))
        buf, start = "", None
    return out


def _is_alternatives(tok: str) -> bool:
    parts = tok.split("|")
    return len(parts) > 1 and "=" not in tok and ":" not in tok and all(re.fullmatch(r"[\w.-]+", p) for p in parts)


def expand(tokens: list[str]) -> list[list[str]]:
    """Synopsis -> concrete commands: without / with the [optional] groups, every a|b alternative."""
    base, full, depth = [], [], 0
    for tok in tokens:
        opening, closing = tok.startswith("["), tok.endswith("]") and not tok.startswith("[[")
        t = tok[1:] if opening else tok
        t = t[:-1] if closing else t
        depth += opening
        if not depth:
            base.append(t)
        full.append(t)
        depth -= closing
    variants = [base] + ([full] if full != base else [])
    out: list[list[str]] = []
    for v in variants:
        v = [t for t in v if t not in ("...", "")]
        for combo in itertools.product(*[t.split("|") if _is_alternatives(t) else [t] for t in v]):
            if list(combo) not in out:
                out.append(list(combo))
    return out


TRAINING = {("train",), ("sweep", "depth"), ("sweep", "batch-size")}


def reduce(args: list[str]) -> list[str]:
    """The reduced settings of the module docstring (graphopt arguments, without 'graphopt')."""
    out = list(args)
    for i, a in enumerate(out[:-1]):
        nxt = out[i + 1]
        if a in ("--epochs", "--epochs-per-round"):
            warmup = float(out[out.index("--warmup-epochs") + 1]) if "--warmup-epochs" in out else 0.0
            out[i + 1] = str(min(int(nxt), 1 + math.ceil(warmup)))  # a warm-up must fit
        elif a == "--steps":
            out[i + 1] = str(min(int(nxt), 2))
        elif a == "--warmup":
            out[i + 1] = str(min(int(nxt), 1))
    trains = tuple(out[:1]) in TRAINING or tuple(out[:2]) in TRAINING or (out[:1] == ["bench"] and "--train" in out)
    if trains and not any(a == "--epochs" or a.startswith("--epochs=") for a in out):
        out += ["--epochs", "1"]
    return out


# -- running ------------------------------------------------------------------------------------------
def _out_arg(args: list[str]) -> str | None:
    for i, a in enumerate(args[:-1]):
        if a in ("-o", "--out"):
            return args[i + 1]
    return None


DEFAULT_OUT_SUFFIXES = ("_optimized", "_bench", "_sweep_depth", "_sweep_batch")


def _is_pipeline_folder(path: Path) -> bool:
    try:
        return json.loads((path / "manifest.json").read_text()).get("format") == "graphopt.pipeline"
    except (OSError, ValueError):
        return False


def run_graphopt(args: list[str], folder: Path, line: int, capfd, *, slow: bool) -> None:
    args = reduce(args)
    if "--device" in args and args[args.index("--device") + 1] == "cuda" and not HAS_CUDA:
        return  # a GPU line (the README says so); run where CUDA is available
    out = _out_arg(args)
    if out and (folder / out).exists():
        shutil.rmtree(folder / out)
    elif out is None:  # the default output folders (MODEL_bench/ ...) of earlier lines
        for p in folder.iterdir():
            if p.is_dir() and p.name.endswith(DEFAULT_OUT_SUFFIXES):
                shutil.rmtree(p)
    if args[0] == "launch":
        target = folder / args[1]
        if not _is_pipeline_folder(target):
            if target.exists():
                shutil.rmtree(target)
            assert main(["optimize", "model.py", "-p", "partition:stages=2", "--emit", "pipeline", "-o",
                         args[1]]) == 0, capfd.readouterr()
        if not slow and "--print-command" not in args:
            args = args + ["--print-command"]
        if "--timeout" not in args and "--print-command" not in args:
            args = args + ["--timeout", "240"]
    capfd.readouterr()
    code = main(args)
    captured = capfd.readouterr()
    assert code == 0, (f"README line {line}: `graphopt {shlex.join(args)}` exited {code}\n"
                       f"{captured.err[-3000:]}\n{captured.out[-3000:]}")


def _check_installed(cmd: list[str], line: int) -> None:
    """`pip install -e PATH`: PATH is a package of this repository and is installed (editable) here."""
    import tomllib
    from importlib import metadata

    paths = [cmd[i + 1] for i, t in enumerate(cmd[:-1]) if t == "-e"]
    assert paths, f"README line {line}: only `pip install -e PATH` lines are checked"
    for p in paths:
        project = tomllib.loads((ROOT / p / "pyproject.toml").read_text())["project"]["name"]
        try:
            metadata.distribution(project)
        except metadata.PackageNotFoundError:
            raise AssertionError(f"README line {line}: {project} ({p}) is not installed: `make setup` installs it")


def _bash_cases() -> list:
    cases = []
    for first, text in blocks("bash"):
        cmds = commands(first, text)
        if cmds:
            label = f"L{cmds[0][0]}-" + "_".join(t[0] + ("-" + t[1] if len(t) > 1 else "") for _, t in cmds[:1])
            cases.append(pytest.param(cmds, id=label))
    return cases


@pytest.fixture
def session(tmp_path, monkeypatch):
    (tmp_path / "model.py").write_text(MODEL_FILE)  # an earlier line's outputs are removed by run_graphopt
    # the README's example model files (examples/*.py), as a user's checkout has them
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("fold_bn", "__pycache__"))
    tomls = blocks("toml")
    if tomls:
        (tmp_path / "pipeline.toml").write_text(tomls[0][1])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def is_slow(cmd: list[str]) -> bool:
    """Lines that take tens of seconds even reduced: ONNX Runtime training artifacts (a parity probe
    in a child process), real MNIST training, iterative pruning, torchrun."""
    text = " ".join(cmd)
    return ("--emit ort" in text or "--backend ort" in text or "--data mnist" in text or "prune-iterative" in text
            or (cmd[1:2] == ["launch"] and "--print-command" not in cmd))


def _run_block(cmds, session, capfd, slow: bool) -> int:
    """Run a block's commands in order; without ``slow`` the slow lines are left out (launches
    become --print-command). Returns the number of slow lines run."""
    ran_slow = 0
    launch_dirs = {x[2].rstrip("/") for _, t in cmds for x in expand(t) if x[:2] == ["graphopt", "launch"]}
    for line, tokens in cmds:
        for cmd in expand(tokens):
            if slow and cmd[0] != "make" and not is_slow(cmd) and (_out_arg(cmd) or "").rstrip("/") not in launch_dirs:
                continue  # the slow run repeats only what its slow lines read (the rest ran in the default run)
            if cmd[0] == "make":
                r = subprocess.run(["make", "-n", *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
                assert r.returncode == 0, f"README line {line}: `make -n {' '.join(cmd[1:])}`: {r.stderr}"
                continue
            if cmd[:2] == ["pip", "install"]:  # an editable install `make setup` already made: check it is there
                _check_installed(cmd, line)
                continue
            if cmd[:3] == ["python", "-m", "pytest"]:  # a plugin's own tests, run for real in this venv
                r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *cmd[3:]], cwd=ROOT,
                                   capture_output=True, text=True, timeout=600)
                assert r.returncode == 0, f"README line {line}: `{shlex.join(cmd)}`:\n{r.stdout[-3000:]}"
                continue
            if cmd[:2] == ["python", "benchmarks/gpu_session.py"]:  # plans and checks its steps, runs nothing
                r = subprocess.run([sys.executable, *cmd[1:], "--check-args"], cwd=ROOT, capture_output=True,
                                   text=True, timeout=300)
                assert r.returncode == 0, f"README line {line}: `{shlex.join(cmd)} --check-args`:\n{r.stdout[-3000:]}" \
                                          f"{r.stderr[-2000:]}"
                continue
            assert cmd[0] == "graphopt", f"README line {line}: unknown command `{shlex.join(cmd)}` (teach " \
                                         "tests/test_readme.py how to run it)"
            if is_slow(cmd) and not slow and cmd[1] != "launch":
                continue
            ran_slow += is_slow(cmd)
            run_graphopt(cmd[1:], session, line, capfd, slow=slow)
    return ran_slow


@pytest.mark.parametrize("cmds", _bash_cases())
def test_readme_bash_block(cmds, session, capfd):
    _run_block(cmds, session, capfd, slow=False)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("cmds", [c for c in _bash_cases()
                                  if any(is_slow(x) for _, t in c.values[0] for x in expand(t) if x[0] == "graphopt")])
def test_readme_bash_block_with_its_slow_lines(cmds, session, capfd):
    """The block's slow lines (ORT, MNIST, iterative pruning, torchrun launches), in order, with the
    lines that write the folders its launches read."""
    assert _run_block(cmds, session, capfd, slow=True) > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_make_demo_commands_run(tmp_path):
    """`make demo`'s recipe (minus the venv set-up) in a copy of examples/, with this venv's tools."""
    # run from `make test-slow` (CI), this make is a sub-make: no "make[1]: Entering directory" lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    r = subprocess.run(["make", "--no-print-directory", "-n", "-W", ".venv/.installed", "demo"], cwd=ROOT,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    bindir = str(Path(sys.executable).parent)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip() and "pip install" not in ln
             and "-m venv" not in ln and not ln.startswith(("touch", "make["))]
    assert any("graphopt bench" in ln for ln in lines), r.stdout
    script = "\n".join(ln.replace(".venv/bin/", bindir + "/") for ln in lines)
    done = subprocess.run(["bash", "-o", "pipefail", "-ec", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=850)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    for p in ("out/resnet18/module.py", "out/resnet18-graph.png", "out/resnet18-bench/bench.json"):
        assert (tmp_path / p).is_file(), p


# -- python -------------------------------------------------------------------------------------------------
SNIPPET_CONTEXT = {
    # substring of a snippet: what it needs first
    'go.train("out/ort"': "ort",
    '"cuda:0", "cuda:1"': "two_gpus",
}


def _namespace(folder: Path) -> dict:
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    import graphopt
    from graphopt.modelfile import load_model_file

    spec = load_model_file(folder / "model.py")
    g = torch.Generator().manual_seed(0)

    def dataset(n):
        x = torch.randn(n, 3, 16, 16, generator=g)
        return TensorDataset(x, (x[:, 0].mean((1, 2)) * 40).long().clamp(0, 9).add(5).clamp(0, 9))

    train, test = dataset(256), dataset(64)
    x = spec.example_inputs[0]
    y = torch.randint(0, 10, (x.shape[0],), generator=g)
    model = spec.module
    gm, report = graphopt.optimize(model, (x,), ["cleanup"])
    return {"torch": torch, "nn": torch.nn, "F": F, "graphopt": graphopt, "model": model, "x": x, "y": y,
            "gm": gm, "report": report, "batches": [(x,)] * 4, "train_set": train, "test_set": test,
            "train_ds": train, "test_ds": test, "m1": load_model_file(folder / "model.py").module,
            "m2": load_model_file(folder / "model.py").module, "loss_fn": F.cross_entropy, "device_type": "cpu",
            "make_optimizer": lambda params: torch.optim.SGD(params, lr=0.01)}


def _python_cases() -> list:
    return [pytest.param(text, id=f"L{line}", marks=[pytest.mark.slow] if "graphopt.ort" in text else [])
            for line, text in blocks("python")]


@pytest.mark.parametrize("snippet", _python_cases())
def test_readme_python_block(snippet, session, capfd):
    if snippet.lstrip().startswith("# model.py"):  # the model-file convention itself
        (session / "readme_model.py").write_text(snippet)
        code = main(["inspect", "readme_model.py"])
        assert code == 0, capfd.readouterr().err
        return
    needs = {v for k, v in SNIPPET_CONTEXT.items() if k in snippet}
    if "two_gpus" in needs and (not HAS_CUDA or torch.cuda.device_count() < 2):
        pytest.skip("needs two CUDA devices")
    ns = _namespace(session)
    if "ort" in needs:
        pytest.importorskip("onnxruntime.training")
        assert main(["optimize", "model.py", "-p", "cleanup", "--emit", "ort", "-o", "out/ort"]) == 0, \
            capfd.readouterr().err
        ns["batches"] = [((ns["x"],), ns["y"])] * 2  # compare_training takes (inputs, target) batches
    exec(compile(snippet, "README.md snippet", "exec"), ns)


# -- toml and inline -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [pytest.param(t, id=f"L{n}") for n, t in blocks("toml")])
def test_readme_toml_block_is_a_pipeline(text, tmp_path):
    """A pipeline file builds; a pyproject excerpt (a plugin's entry points) names objects that load."""
    import tomllib
    from importlib import metadata

    from graphopt.pass_infra import build_pipeline

    doc = tomllib.loads(text)
    if "project" in doc:
        eps = doc["project"]["entry-points"]
        assert eps
        for group, items in eps.items():
            installed = {ep.name: ep for ep in metadata.entry_points(group=group)}
            for name, value in items.items():
                assert name in installed and installed[name].value == value, (group, name)
                installed[name].load()
        return
    f = tmp_path / "p.toml"
    f.write_text(text)
    assert [p.name for p in build_pipeline((), f)]


def _inline() -> list[tuple[int, list[str]]]:
    text = README.read_text()
    fenced = set()
    for m in re.finditer(r"```.*?```", text, flags=re.S):
        fenced.update(range(m.start(), m.end()))
    out = []
    for m in re.finditer(r"`(graphopt [a-z][^`]*)`", text):
        if m.start() not in fenced:
            out.append((text.count("\n", 0, m.start()) + 1, shlex.split(m.group(1).replace("\n", " "))))
    return out


def _resolve(tokens: list[str]):
    import click

    cmd, i = cli, 1
    while isinstance(cmd, click.Group) and i < len(tokens) and not tokens[i].startswith("-"):
        names = tokens[i].split("|")
        sub = [cmd.get_command(None, n) for n in names]  # type: ignore[arg-type]
        assert all(sub), f"unknown subcommand {tokens[i]}"
        cmd, i = sub[0], i + 1
    return cmd, tokens[i:]


@pytest.mark.parametrize("line, tokens", [pytest.param(n, t, id=f"L{n}") for n, t in _inline()])
def test_readme_inline_command_names_real_options(line, tokens):
    import click

    cmd, rest = _resolve(tokens)
    opts = {name: p for p in cmd.params if isinstance(p, click.Option) for name in p.opts + p.secondary_opts}
    for j, tok in enumerate(rest):
        if tok.startswith("-") and not re.fullmatch(r"-\d.*", tok):
            name = tok.split("=", 1)[0]
            assert name in opts, f"README line {line}: `{' '.join(tokens)}`: {cmd.name} has no option {name}"
            p = opts[name]
            if isinstance(p.type, click.Choice) and not p.is_flag:
                value = tok.split("=", 1)[1] if "=" in tok else (rest[j + 1] if j + 1 < len(rest) else None)
                if value is not None:
                    for v in value.split("|"):
                        assert v in p.type.choices, f"README line {line}: {name} {v} is not a choice"


def test_the_readme_is_actually_covered():
    """The extraction finds what is there (a parser that finds nothing would pass everything)."""
    n_cmds = sum(len(commands(f, t)) for f, t in blocks("bash"))
    assert n_cmds >= 25 and len(blocks("python")) >= 8 and len(blocks("toml")) >= 1 and len(_inline()) >= 5
    assert expand(["graphopt", "inspect", "model.py", "[--format", "table|json]", "[--draw", "graph.svg]"]) == [
        ["graphopt", "inspect", "model.py"],
        ["graphopt", "inspect", "model.py", "--format", "table", "--draw", "graph.svg"],
        ["graphopt", "inspect", "model.py", "--format", "json", "--draw", "graph.svg"]]
    assert reduce(["train", "model.py", "--epochs", "10"]) == ["train", "model.py", "--epochs", "1"]
    assert reduce(["sweep", "depth", "m.py"])[-2:] == ["--epochs", "1"]
