"""The configuration-error hierarchy: one ConfigError base; pass, launch and ORT problems under it."""

from __future__ import annotations

import pytest

import graphopt
from graphopt.cli import main
from graphopt.errors import (ConfigError, GraphoptError, LaunchConfigError, OrtConfigError, PassConfigError,
                             VerificationError)

MODEL = '''
import torch
from torch import nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

def example_inputs():
    return (torch.randn(8, 16),)
'''


def test_hierarchy_and_exports():
    for cls in (PassConfigError, LaunchConfigError, OrtConfigError):
        assert issubclass(cls, ConfigError) and issubclass(cls, GraphoptError) and cls.exit_code == 2
        assert getattr(graphopt, cls.__name__) is cls and cls.__name__ in graphopt.__all__
    assert graphopt.ConfigError is ConfigError and "ConfigError" in graphopt.__all__
    # launch and ORT problems are configuration errors, not pass-option errors
    assert not issubclass(LaunchConfigError, PassConfigError) and not issubclass(OrtConfigError, PassConfigError)
    assert not issubclass(VerificationError, ConfigError)
    err = LaunchConfigError("--replicas must be >= 1", where="launch", fix="use 1 or more")
    assert str(err) == "launch: --replicas must be >= 1 (use 1 or more)"


def test_pass_options_raise_pass_config_error():
    with pytest.raises(PassConfigError, match="unknown pass 'nope'"):
        graphopt.build_pipeline(["nope"])
    with pytest.raises(ConfigError, match="is not key=value"):  # a PassConfigError is a ConfigError
        graphopt.parse_pass_spec("prune:ratio")


def test_ort_spec_problems_are_ort_config_errors():
    from graphopt.ort.spec import OptimizerSpec, resolve_loss

    with pytest.raises(OrtConfigError, match="no momentum"):
        OptimizerSpec.create("sgd", momentum=0.9)
    with pytest.raises(ConfigError, match="unknown loss 'hinge'"):
        resolve_loss("hinge", None, None)


def test_launch_problems_are_launch_config_errors_exit_2(tmp_path, capsys):
    from graphopt.dist.launch import build_command

    model = tmp_path / "mlp.py"
    model.write_text(MODEL)
    folder = tmp_path / "pipe"
    assert main(["optimize", str(model), "-p", "partition:stages=2,repeats=1", "--emit", "pipeline",
                 "-o", str(folder)]) == 0
    with pytest.raises(LaunchConfigError, match="needs --rdzv-endpoint"):
        build_command(folder, replicas=2, nnodes=2)
    with pytest.raises(LaunchConfigError, match="--replicas must be >= 1"):
        build_command(folder, replicas=0)
    capsys.readouterr()
    assert main(["launch", str(folder), "--nnodes", "2", "--print-command"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --rdzv-endpoint" in err[0]
