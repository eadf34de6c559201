"""The model-file convention and every way it can go wrong (one-line errors, exit 2)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from graphopt.errors import ModelFileError
from graphopt.modelfile import load_model_file

GOOD = """
import torch
from torch import nn

def model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

def other():
    return nn.Linear(4, 3)

def example_inputs():
    return torch.randn(2, 4)

def loss(out, target):
    return nn.functional.cross_entropy(out, target)
"""


def write(tmp_path, text, name="m.py"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_loads_model_inputs_and_loss(tmp_path):
    spec = load_model_file(write(tmp_path, GOOD))
    assert isinstance(spec.module, torch.nn.Sequential)
    assert len(spec.example_inputs) == 1 and spec.example_inputs[0].shape == (2, 4)  # tensor wrapped in a tuple
    assert spec.loss is not None and spec.data is None
    assert spec.factory == "model" and len(spec.sha256) == 64


def test_named_factory(tmp_path):
    p = write(tmp_path, GOOD)
    spec = load_model_file(f"{p}:other")
    assert isinstance(spec.module, torch.nn.Linear) and spec.factory == "other"


@pytest.mark.parametrize("text, fragment", [
    ("import torch\nx = 1 / 0\n", "m.py:2 `x = 1 / 0`: importing the model file failed: ZeroDivisionError"),
    ("import not_a_real_package_xyz\n", "ModuleNotFoundError"),
    ("def model(:\n", "SyntaxError"),
    ("import torch\ndef example_inputs():\n    return torch.randn(1)\n", "no function 'model()' defined"),
    ("import torch\ndef model():\n    raise ValueError('bad width')\ndef example_inputs():\n    return torch.randn(1)\n",
     "m.py:3 `raise ValueError('bad width')`: model() raised ValueError: bad width"),
    ("def model():\n    return 3\ndef example_inputs():\n    return 1\n", "model() returned int, not a torch.nn.Module"),
    ("import torch\ndef model():\n    return torch.nn.Linear(4, 2)\n", "no function 'example_inputs()' defined"),
    ("import torch\ndef model():\n    return torch.nn.Linear(4, 2)\ndef example_inputs():\n    return [1, 2]\n",
     "example_inputs() returned list"),
    ("import torch\ndef model():\n    return torch.nn.Linear(4, 2)\ndef example_inputs():\n    return torch.randn(2, 5)\n",
     "do not run through the model"),
])
def test_bad_model_files(tmp_path, text, fragment):
    p = write(tmp_path, text)
    with pytest.raises(ModelFileError) as info:
        load_model_file(p)
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg  # one line
    assert info.value.exit_code == 2


def test_missing_file_and_not_python(tmp_path):
    with pytest.raises(ModelFileError, match="model file not found"):
        load_model_file(tmp_path / "nope.py")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ModelFileError, match="not a Python file"):
        load_model_file(tmp_path / "m.txt")


def test_unknown_factory_lists_found_functions(tmp_path):
    p = write(tmp_path, GOOD)
    with pytest.raises(ModelFileError, match=r"no function 'nope\(\)'.*functions found: .*other"):
        load_model_file(f"{p}:nope")


def test_forward_failure_points_at_users_line(tmp_path):
    p = write(tmp_path, """
        import torch
        from torch import nn

        class Net(nn.Module):
            def forward(self, x):
                return x.view(3, -1, 7)

        def model():
            return Net()

        def example_inputs():
            return torch.randn(2, 5)
        """)
    with pytest.raises(ModelFileError, match=r"m.py:7 `return x.view\(3, -1, 7\)`"):
        load_model_file(p)
