"""One GPU session, one command: every prepared GPU benchmark and the gpu-marked tests, each step with
its own time limit, the whole run inside a wall-clock budget (default 7.5 minutes).

    python benchmarks/gpu_session.py --device cuda                 # what a session lent a GPU runs
    python benchmarks/gpu_session.py --device cpu --dry-run        # the same steps, tiniest settings, CPU
    python benchmarks/gpu_session.py --device cuda --plan          # print the steps; run nothing
    python benchmarks/gpu_session.py --device cuda --check-args    # + check every step's arguments against
                                                                   #   its script's argparse (no GPU needed)

Steps, in order (``--only a,b`` selects): ``pytest_gpu`` (``pytest -m gpu`` on the test files holding
gpu-marked tests), ``auto_gpu`` (benchmarks/auto_gpu.py: automatic mode vs autocast / compile / eager),
``precision_gpu`` (benchmarks/precision_gpu.py), ``transformers`` (benchmarks/transformers.py: sdpa,
pruning, freezing of two transformers) and ``suite`` (benchmarks/run_suite.py, quick, training-step
sections). Each runs as its own process with its own time limit (killed past it, with its process
group) and its output in ``logs/<step>.log``; a failing step is recorded and the next one runs. Before
each step the remaining budget is checked: a step gets at most what is left, and when less than
``--min-step`` seconds are left the remaining steps are skipped with a note. A dry run on CPU runs every
step's own CPU path (the gpu-marked tests are collected and skipped there).

Everything is written under ``--out`` (default: ``$OUT/benchmarks/results/<device>/`` when the
environment has ``$OUT``, else ``benchmarks/results/<device>/``; a dry run: ``out/gpu_session/<device>/``),
``<device>`` being the slug of ``torch.cuda.get_device_name()`` (``nvidia-h200``): each step's results,
``logs/``, ``session.json`` and ``summary.md`` (per step: status, seconds, limit, command), rewritten after
every step so that a session cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 450.0  # 7.5 minutes: a session's device time is 15 minutes, machine start and copies included
MIN_STEP_S = 20.0


@dataclass
class Step:
    """One command of the session. ``argv[0]`` is a script path relative to the repository (run with this
    Python), or ``-m`` (a module)."""

    name: str
    argv: list[str]
    limit_s: float
    note: str = ""  # what a reader of the summary should know (e.g. a CPU dry run's limits)
    status: str = "pending"
    seconds: float = 0.0
    returncode: int | None = None
    detail: str = ""
    files: list[str] = field(default_factory=list)

    def command(self, python: str = "python") -> list[str]:
        return [python, *self.argv]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "command": " ".join(self.command()), "limit_s": self.limit_s, "status": self.status,
                "seconds": round(self.seconds, 1), "returncode": self.returncode, "detail": self.detail,
                "note": self.note, "files": self.files}


def gpu_test_files() -> list[str]:
    """Test files holding gpu-marked tests (collecting only these keeps the step short)."""
    out = []
    for p in sorted((ROOT / "tests").glob("test_*.py")):
        text = p.read_text(errors="replace")
        if re.search(r"mark\.gpu\b", text):
            out.append(str(p.relative_to(ROOT)))
    return out


def plan(device: str, dry_run: bool, out: Path) -> list[Step]:
    """The session's steps with their settings and time limits (seconds; their sum fits the default
    budget on CUDA: a step that runs over its limit is cut, not the session)."""
    o = str(out)
    pytest = Step("pytest_gpu", ["-m", "pytest", *gpu_test_files(), "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                 "-o", "addopts=-ra", "--junitxml", f"{o}/pytest_gpu.xml"], 60,
                  note="the repository's gpu-marked tests (without a GPU they are all skipped)")
    if device == "cuda" and not dry_run:
        return [
            pytest,
            Step("auto_gpu", ["benchmarks/auto_gpu.py", "--device", "cuda", "--models", "gpt,resnet50",
                              "--out", o], 180,
                 note="the GPT-style decoder, then ResNet-50 (batch 64, 224x224); automatic mode budget 45 s and "
                      "torch.compile 90 s per model; results written after each model"),
            Step("precision_gpu", ["benchmarks/precision_gpu.py", "--device", "cuda", "--models", "resnet50,vit_b_16",
                                   "--dtype", "both", "--batch", "64", "--steps", "20", "--warmup", "5", "--out", o], 90,
                 note="results written after each model"),
            Step("transformers", ["benchmarks/transformers.py", "--device", "cuda", "--batch", "16", "--seq", "128",
                                  "--rounds", "10", "--out", o], 45),
            Step("suite", ["benchmarks/run_suite.py", "--device", "cuda", "--quick", "--only", "steps", "--models",
                           "resnet50,mobilenet_v2,vit_tiny", "--update-results", "--out", o], 60,
                 note="training-step sections only (every registered pipeline on the model files' small inputs)"),
        ]
    # dry run: the same scripts with the tiniest settings (on CPU: a check of the code path, not a measurement);
    # ResNet-18 stands in for ResNet-50 (the same torchvision code; float16 convolutions take seconds on a CPU)
    return [
        pytest,
        Step("auto_gpu", ["benchmarks/auto_gpu.py", "--device", device, "--quick", "--models", "resnet18,gpt",
                          "--compile-timeout", "8", "--auto-budget", "8", "--out", o], 100,
             note="tiny settings; torch.compile time-boxed to 8 s" if device == "cpu" else "tiny settings"),
        Step("precision_gpu", ["benchmarks/precision_gpu.py", "--device", device, "--models", "resnet18",
                               "--dtype", "bfloat16", "--batch", "2", "--image", "32", "--steps", "1", "--warmup", "1",
                               "--out", o], 60,
             note="resnet18 bfloat16 only, batch 2 at 32x32"),
        Step("transformers", ["benchmarks/transformers.py", "--device", device, "--batch", "2", "--seq", "16",
                              "--rounds", "1", "--out", o], 60),
        Step("suite", ["benchmarks/run_suite.py", "--device", device, "--quick", "--only", "steps", "--models",
                       "plain_cnn_mnist", "--update-results", "--out", o], 60),
    ]


# -- running ------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)])
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_step(step: Step, out: Path, timeout: float, python: str = sys.executable) -> None:
    """Run one step as its own process group with ``timeout``; fill its status, seconds and detail."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{step.name}.log"
    before = {p: p.stat().st_mtime for p in out.rglob("*") if p.is_file()}
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(step.command())}  (limit {timeout:.0f} s)\n")
        f.flush()
        proc = subprocess.Popen(step.command(python), cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            step.returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            step.returncode = None
    step.seconds = time.monotonic() - t0
    text = log.read_text(errors="replace")
    if step.returncode is None:
        step.status, step.detail = "timeout", f"killed after its limit of {timeout:.0f} s"
    elif step.returncode == 0:
        step.status = "ok"
    else:
        step.status = "failed"
        step.detail = f"exit {step.returncode}: " + " / ".join(ln.strip() for ln in text.splitlines()[-3:] if ln.strip())[-400:]
    step.files = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                        if p.is_file() and p != log and not p.name.startswith(".")
                        and before.get(p) != p.stat().st_mtime and p.name not in ("summary.md", "session.json"))


def run_session(steps: list[Step], out: Path, *, budget_s: float = BUDGET_S, min_step_s: float = MIN_STEP_S,
                header: dict[str, Any] | None = None, python: str = sys.executable,
                clock: Callable[[], float] = time.monotonic,
                runner: Callable[[Step, Path, float], None] | None = None) -> dict[str, Any]:
    """Run ``steps`` in order inside ``budget_s`` (each gets ``min(limit, what is left)``; below
    ``min_step_s`` left, the rest are skipped); writes session.json and summary.md after every step."""
    out.mkdir(parents=True, exist_ok=True)
    run = runner or (lambda s, o, t: run_step(s, o, t, python))
    t0 = clock()
    doc: dict[str, Any] = {**(header or {}), "budget_s": budget_s, "min_step_s": min_step_s,
                           "steps": [s.as_dict() for s in steps]}

    def write() -> None:
        doc["wall_s"] = round(clock() - t0, 1)
        doc["steps"] = [s.as_dict() for s in steps]
        (out / "session.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out / "summary.md").write_text(summary_markdown(doc))

    write()
    for s in steps:
        left = budget_s - (clock() - t0)
        if left < min_step_s:
            s.status = "skipped"
            s.detail = (f"session budget exhausted: {max(left, 0):.0f} s of {budget_s:.0f} s left "
                        f"(< {min_step_s:.0f} s)")
            print(f"=== {s.name}: skipped ({s.detail})", flush=True)
            continue
        limit = min(s.limit_s, left)
        print(f"=== {s.name} (limit {limit:.0f} s, {left:.0f} s of the budget left): {' '.join(s.command())}",
              flush=True)
        try:
            run(s, out, limit)
        except Exception as exc:  # noqa: BLE001 - the session goes on
            s.status, s.detail = "failed", f"could not run: {type(exc).__name__}: {exc}"
        print(f"--- {s.name}: {s.status} in {s.seconds:.1f} s" + (f" ({s.detail})" if s.detail else ""), flush=True)
        if s.status in ("failed", "timeout"):
            tail = _tail(out / "logs" / f"{s.name}.log")
            if tail:
                print(tail, flush=True)
        write()
    write()
    return doc


def summary_markdown(doc: dict[str, Any]) -> str:
    lines = [f"# GPU session: {doc.get('device', '?')}", "",
             f"<!-- generated by benchmarks/gpu_session.py -->", "",
             f"Mode: {doc.get('mode', '?')}; torch {doc.get('torch', '?')}"
             + (f", CUDA {doc['cuda']}" if doc.get("cuda") else "") + f"; started {doc.get('date', '?')}; "
             f"wall {doc.get('wall_s', 0):.0f} s of a {doc['budget_s']:.0f} s budget.", ""]
    if doc.get("passes") is not None:
        lines += [f"graphopt {doc.get('graphopt', '?')}, registered passes: {', '.join(doc['passes']) or 'NONE'}"
                  + (f" ({doc['entry_points']})" if doc.get("entry_points", "installed") != "installed" else "") + ".", ""]
    if doc.get("packages"):
        missing = [k for k, v in doc["packages"].items() if not v]
        lines += [f"Packages: {', '.join(k for k, v in doc['packages'].items() if v)} present"
                  + (f"; missing: {', '.join(missing)}" if missing else "") + ".", ""]
    lines += ["| step | status | seconds | limit s | detail | command |", "|---|---|---:|---:|---|---|"]
    for s in doc["steps"]:
        detail = "; ".join(x for x in (s["detail"], s["note"]) if x).replace("|", "/")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['limit_s']:.0f} | {detail} | "
                     f"`{s['command']}` |")
    lines.append("")
    files = [(s["name"], f) for s in doc["steps"] for f in s.get("files", [])]
    if files:
        lines += ["Files written: " + ", ".join(f"`{f}` ({n})" for n, f in files) + ".", ""]
    lines += ["Logs: `logs/<step>.log` (each step's full output).", ""]
    return "\n".join(lines)


# -- arguments of the steps ---------------------------------------------------------------------------
class _Accepted(Exception):
    pass


def check_args(step: Step) -> str:
    """'' when the step's script accepts its arguments (its own argparse, called in this process with
    ``parse_args`` stopped right after parsing: nothing runs), else argparse's message."""
    import argparse as _ap
    import runpy

    if step.argv[0] == "-m":
        return "" if step.argv[1] == "pytest" and all((ROOT / a).is_file() for a in step.argv[2:]
                                                       if a.endswith(".py")) else f"unknown module step {step.argv[:2]}"
    script = ROOT / step.argv[0]
    if not script.is_file():
        return f"no such script: {step.argv[0]}"
    orig = _ap.ArgumentParser.parse_args

    def parse(self: Any, args: Any = None, namespace: Any = None) -> Any:
        orig(self, args, namespace)
        raise _Accepted

    err = io.StringIO()
    saved_path = list(sys.path)
    _ap.ArgumentParser.parse_args = parse  # type: ignore[method-assign]
    try:
        mod = runpy.run_path(str(script), run_name="_gpu_session_check")
        with contextlib.redirect_stderr(err):
            mod["main"](list(step.argv[1:]))
    except _Accepted:
        return ""
    except SystemExit as exc:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
    finally:
        _ap.ArgumentParser.parse_args = orig  # type: ignore[method-assign]
        sys.path[:] = saved_path
    return "its main() returned without parsing arguments"


# -- entry point --------------------------------------------------------------------------------------
def entry_point_shim(folder: Path) -> Path:
    """A ``graphopt-<version>.dist-info`` (METADATA + entry_points.txt from pyproject.toml) in ``folder``: on
    a machine where the repository is not pip-installed (the GPU machine gets a copy of the working tree),
    putting ``folder`` on the path registers the built-in passes, emitters and backends exactly as an
    install would, without pip. Parsed by hand: the GPU machine's Python may predate tomllib."""
    text = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)
    sections: list[str] = []
    current = None
    for line in text.splitlines():
        head = re.match(r'^\[project\.entry-points\."([^"]+)"\]\s*$', line)
        if head:
            current = head.group(1)
            sections.append(f"[{current}]")
            continue
        if line.startswith("["):
            current = None
            continue
        m = re.match(r'^\s*([\w.-]+)\s*=\s*"([^"]+)"', line)
        if current and m:
            sections.append(f"{m.group(1)} = {m.group(2)}")
    info = folder / f"graphopt-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: graphopt\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("\n".join(sections) + "\n")
    return folder


def ensure_registered() -> str:
    """When graphopt's entry points are not installed, register them through :func:`entry_point_shim` (for
    this process and, through PYTHONPATH, for every step); returns what was done ('' when nothing)."""
    import importlib
    from importlib import metadata

    if any(True for _ in metadata.entry_points(group="graphopt.passes")):
        return ""
    import tempfile

    shim = entry_point_shim(Path(tempfile.mkdtemp(prefix="graphopt-entry-points-")))
    sys.path.append(str(shim))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(shim)) if p)
    importlib.invalidate_caches()
    return f"graphopt is not installed here: its entry points were registered from pyproject.toml ({shim})"


def _header(device: str, dry_run: bool) -> dict[str, Any]:
    import importlib.util

    import torch

    doc: dict[str, Any] = {"mode": ("dry run" if dry_run else "full") + f" on {device}", "torch": torch.__version__,
                           "python": platform.python_version(),
                           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if device == "cuda" and torch.cuda.is_available():
        doc.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    else:
        sys.path.insert(0, str(ROOT))
        from benchmarks._common import cpu_name

        doc["device"] = cpu_name()
    doc["packages"] = {m: bool(importlib.util.find_spec(m)) for m in ("torchvision", "timm", "transformers",
                                                                       "pytest", "pytest_timeout", "psutil")}
    try:
        doc["entry_points"] = ensure_registered() or "installed"
        import graphopt

        doc["graphopt"] = graphopt.__version__
        doc["passes"] = list(graphopt.available_passes())
    except Exception as exc:  # noqa: BLE001 - reported in the preflight
        doc["graphopt_error"] = f"{type(exc).__name__}: {exc}"
        doc["passes"] = []
    return doc


def default_out(device: str, dry_run: bool, name: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if dry_run:
        return ROOT / "out" / "gpu_session" / slug
    base = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT
    return base / "benchmarks" / "results" / slug


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="every step with the tiniest settings (a path check)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (see the module docstring)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="wall-clock budget of the whole session, seconds")
    ap.add_argument("--min-step", type=float, default=MIN_STEP_S,
                    help="skip the remaining steps when fewer seconds than this are left")
    ap.add_argument("--only", default="", help="comma-separated step names (pytest_gpu,auto_gpu,precision_gpu,"
                                               "transformers,suite)")
    ap.add_argument("--plan", action="store_true", help="print the steps and their limits; run nothing")
    ap.add_argument("--check-args", action="store_true",
                    help="check every step's arguments against its script's argparse; run nothing (no GPU needed)")
    args = ap.parse_args(argv)
    if args.plan or args.check_args:
        out = args.out or Path("<out>")
    else:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device is available (a CPU check of the same path: "
                  "--device cpu --dry-run; of the arguments: --check-args)", file=sys.stderr)
            return 2
        name = torch.cuda.get_device_name(0) if args.device == "cuda" else _header("cpu", True)["device"]
        out = (args.out or default_out(args.device, args.dry_run, name)).resolve()
    steps = plan(args.device, args.dry_run, out)
    names = [s.name for s in steps]
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in names]
    if unknown:
        print(f"error: unknown step(s) {', '.join(unknown)}; steps: {', '.join(names)}", file=sys.stderr)
        return 2
    if only:
        steps = [s for s in steps if s.name in only]
    if args.device == "cpu" and not args.dry_run:
        print("error: --device cpu runs only as --dry-run (the full settings are sized for a GPU)", file=sys.stderr)
        return 2
    if args.device == "cpu":
        for s in steps:
            if s.name == "precision_gpu":
                s.note += "; on CPU: float32 vs autocast vs graphopt's graph, a path check (no fast half kernels)"
    total = sum(s.limit_s for s in steps)
    if args.plan or args.check_args:
        bad = 0
        print(f"{len(steps)} steps, limits summing to {total:.0f} s, budget {args.budget:.0f} s:")
        for s in steps:
            verdict = ""
            if args.check_args:
                err = check_args(s)
                bad += bool(err)
                verdict = "  [arguments ok]" if not err else f"  [REJECTED: {err}]"
            print(f"  {s.name:14s} {s.limit_s:4.0f} s  python {' '.join(s.argv)}{verdict}")
        return 1 if bad else 0
    header = _header(args.device, args.dry_run)
    if not header["passes"]:
        print("error: graphopt has no registered passes (" + header.get("graphopt_error", "its entry points are "
              "missing") + "): run `pip install --no-deps --no-build-isolation -e .` in the repository first",
              file=sys.stderr)
        return 3
    print(f"GPU session on {header['device']} ({header['mode']}): {len(steps)} steps, budget {args.budget:.0f} s, "
          f"results in {out}", flush=True)
    doc = run_session(steps, out, budget_s=args.budget, min_step_s=args.min_step, header=header)
    print(summary_markdown(doc))
    print(f"wrote {out / 'summary.md'}")
    return 0 if all(s["status"] in ("ok", "skipped") and "budget" not in s["detail"] for s in doc["steps"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
