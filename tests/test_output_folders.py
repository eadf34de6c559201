"""--force cannot destroy the user's work; writes are atomic; interrupted or killed runs leave nothing.

Issue 16 item 1: ``graphopt optimize proj/model.py -o proj --force`` deleted the model's source, the
user's files and ``.git``; ``-o . --force`` crashed and left a hidden folder. Item 11: a killed run
left a temporary folder that nothing cleaned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import graphopt
from graphopt.cli import main
from graphopt.emit.fs import MARKER_NAME, atomic_folder, check_output_folder, remove_stale_temporaries
from graphopt.errors import EmitError

MODEL = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

def model():
    return Net()

def example_inputs():
    return (torch.randn(2, 3, 8, 8),)
"""

GRAPHOPT_MANIFEST = json.dumps({"format": "graphopt.torch_folder", "format_version": 1})


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (hidden ones included) with its content."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else "<dir>") for p in sorted(folder.rglob("*"))}


def refused(capsys, args: list[str], fragment: str) -> None:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err


@pytest.fixture
def project(tmp_path):
    """A user's project: the model file, notes, a repository."""
    proj = tmp_path / "proj"
    (proj / ".git").mkdir(parents=True)
    (proj / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (proj / "model.py").write_text(textwrap.dedent(MODEL))
    (proj / "notes.txt").write_text("my notes")
    return proj


def test_force_never_replaces_the_folder_holding_the_model(project, tmp_path, capsys):
    before = snapshot(project)
    refused(capsys, ["optimize", str(project / "model.py"), "-p", "cleanup", "-o", str(project), "--force"],
            "never replaces this folder: it holds the input file")
    assert snapshot(project) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]  # no temporary sibling either


def test_force_never_replaces_a_parent_of_the_model_even_one_graphopt_wrote(tmp_path, capsys):
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "model.py").write_text(textwrap.dedent(MODEL))
    (top / "manifest.json").write_text(GRAPHOPT_MANIFEST)  # looks like graphopt's, still refused
    before = snapshot(top)
    refused(capsys, ["optimize", str(top / "sub" / "model.py"), "-p", "cleanup", "-o", str(top), "--force"],
            "it holds the input file")
    assert snapshot(top) == before


def test_force_never_replaces_a_repository(project, tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "manifest.json").write_text(GRAPHOPT_MANIFEST)
    refused(capsys, ["optimize", str(project / "model.py"), "-p", "cleanup", "-o", str(repo), "--force"],
            "it is a repository (.git inside)")
    assert (repo / ".git").is_dir()


def test_force_refuses_a_folder_of_user_files(project, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    refused(capsys, ["optimize", str(project / "model.py"), "-p", "cleanup", "-o", str(out), "--force"],
            "--force replaces only a folder graphopt wrote")
    assert snapshot(out) == {"thesis.tex": b"years of work"}


def test_dot_with_force_refuses_and_leaves_nothing(project, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    refused(capsys, ["optimize", str(project / "model.py"), "-p", "cleanup", "-o", ".", "--force"],
            "it is the current folder")
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["proj", "work"]
    (work / "graph.json").write_text("{}")  # not even a folder graphopt wrote in the current folder
    refused(capsys, ["optimize", str(project / "model.py"), "-p", "cleanup", "-o", str(work), "--force"],
            "it is the current folder")


def test_home_and_root_are_never_replaced(project, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "manifest.json").write_text(GRAPHOPT_MANIFEST)
    (home / ".bashrc").write_text("export X=1")
    monkeypatch.setenv("HOME", str(home))
    refused(capsys, ["optimize", str(project / "model.py"), "-p", "cleanup", "-o", str(home), "--force"],
            "it is your home folder")
    assert (home / ".bashrc").read_text() == "export X=1"
    with pytest.raises(EmitError, match="it is the filesystem root"):
        check_output_folder("/", force=True)


def test_force_replaces_a_folder_graphopt_wrote(project, tmp_path, capsys):
    out = tmp_path / "out"
    model = str(project / "model.py")
    assert main(["optimize", model, "-p", "cleanup", "-o", str(out)]) == 0
    (out / "leftover.txt").write_text("from an earlier run")
    assert main(["optimize", model, "-p", "cleanup", "-o", str(out), "--force"]) == 0
    assert not (out / "leftover.txt").exists() and graphopt.load(out) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "proj"]


def test_folders_without_a_manifest_get_a_marker_so_force_may_replace_them(tmp_path):
    out = tmp_path / "bench"
    with atomic_folder(out) as tmp:
        (tmp / "bench.json").write_text("{}")
    assert json.loads((out / MARKER_NAME).read_text())["written_by"] == "graphopt"
    with atomic_folder(out, force=True) as tmp:
        (tmp / "bench.md").write_text("# again")
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, "bench.md"]


def test_ctrl_c_while_emitting_leaves_no_temporary_folder_and_the_old_folder_intact(project, tmp_path, capsys,
                                                                                      monkeypatch):
    out = tmp_path / "out"
    model = str(project / "model.py")
    assert main(["optimize", model, "-p", "cleanup", "-o", str(out)]) == 0
    before = snapshot(out)
    import graphopt.emit.torch_folder as tf

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tf, "save_file", interrupted)
    code = main(["optimize", model, "-p", "cleanup", "-o", str(out), "--force"])
    capsys.readouterr()
    assert code != 0
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "proj"]


def test_a_failed_final_rename_puts_the_previous_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("first")
    import graphopt.emit.fs as fs

    real_rename = os.rename

    def failing(src, dst):
        if ".graphopt-tmp-" in str(src):
            raise OSError("disk trouble")
        return real_rename(src, dst)

    monkeypatch.setattr(fs.os, "rename", failing)
    with pytest.raises(OSError, match="disk trouble"):
        with atomic_folder(out, force=True) as tmp:
            (tmp / "a.txt").write_text("second")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


KILLED = """
import os, signal, sys
from graphopt.emit.fs import atomic_folder
with atomic_folder(sys.argv[1]) as tmp:
    (tmp / "half.bin").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_next_run_removes_temporary_folders_of_a_killed_run(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", KILLED, str(out)], capture_output=True, timeout=120)
    assert res.returncode == -9
    stale = [p for p in tmp_path.iterdir() if ".graphopt-tmp-" in p.name]
    assert len(stale) == 1 and (stale[0] / "half.bin").exists() and not out.exists()
    # a temporary folder of a process that still runs (this one) is left alone
    alive = tmp_path / f".other.graphopt-tmp-{os.getppid()}-abc123"
    alive.mkdir()
    with atomic_folder(out) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "out"]
    assert remove_stale_temporaries(tmp_path) == []
