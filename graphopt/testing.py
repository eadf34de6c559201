"""Helpers to test a rewrite pass (built-in or plugin), shipped with the library.

The test template (after torch.fx's, onnxscript's and TVM's transform tests)::

    from graphopt.testing import run_pass, assert_exact, assert_graph_equal, count_modules

    def test_my_pass():
        model, x = SmallNet().eval(), (torch.randn(2, 3, 16, 16),)
        gm, rec = run_pass("my_pass", model, x)           # capture + PassManager (verified)
        assert rec.modified and count_modules(gm, nn.BatchNorm2d) == 0
        assert_graph_equal(gm, ExpectedNet(), x)           # before/expected structure
        assert_exact(gm, model, x)                         # outputs + input gradients, eval mode
        assert_idempotent("my_pass", gm, x)                # a second run changes nothing

``randomize_state`` gives a module random BatchNorm statistics, affine parameters and weights
at their own scale: an exact rewrite must hold for all weights, not only at a fresh init
(where BatchNorm is the identity and many bugs hide). ``write_model_file`` writes a model file
(the ``model()`` / ``example_inputs()`` convention of ``graphopt optimize``) into a folder.
"""

from __future__ import annotations

import difflib
import textwrap
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx, nn

from graphopt.verify import (
    Verification, _Checker, random_state, randomize_state, second_batch, tolerance_for,
)

__all__ = [
    "run_pass", "assert_exact", "randomize_state", "random_state", "second_batch", "graph_structure",
    "assert_graph_equal", "write_model_file", "SMALL_CNN_MODEL", "count_modules", "count_calls",
    "assert_idempotent", "outputs", "train_steps",
]


def run_pass(pass_or_spec: Any, module: nn.Module | fx.GraphModule, inputs: Sequence[torch.Tensor],
             verify: bool | str = True) -> tuple[fx.GraphModule, Any]:
    """Capture ``module`` (unless it is a GraphModule already) and run one pass through the
    PassManager, verified as its semantics promise; returns (graph, the pass's PassRecord)."""
    import graphopt

    gm, report = graphopt.optimize(module, tuple(inputs), [pass_or_spec], verify=verify)
    return gm, report.records[0]


def assert_exact(actual: nn.Module, expected: nn.Module, inputs: Sequence[torch.Tensor], *,
                 grads: bool = True, params: bool = False, train: bool = False, tol: float | None = None) -> None:
    """``actual`` computes what ``expected`` does on ``inputs``: outputs (max |a-e| / max |e|) and,
    with ``grads``, gradients wrt the floating inputs (relative L2 over all of them, confirmed in
    float64 on a mismatch); ``params``: parameter gradients matched by name; ``train``: in train
    mode (fixed RNG, random regularisers disabled; running statistics compared too).
    Raises AssertionError listing every check that failed."""
    ver = Verification("passed", "exact")
    inputs = tuple(inputs)
    limit = tol if tol is not None else tolerance_for(torch.float32)
    floating = any(isinstance(x, torch.Tensor) and x.is_floating_point() for x in inputs)
    _Checker(ver, expected, actual, {}).compare(
        "train" if train else "eval", expected, actual, inputs, train=train, grads=grads and (floating or params),
        params=params, out_metric="max_rel_error", out_limit=limit)
    if not ver.ok:
        raise AssertionError("not exact: " + "; ".join(ver.failures))


# ----------------------------------------------------------------------------- structure


def _target_key(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        extra = mod.extra_repr()
        return f"{type(mod).__name__}({extra})"
    if node.op == "call_function":
        t = node.target
        return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__qualname__', getattr(t, '__name__', str(t)))}"
    if node.op == "get_attr":
        val: Any = gm
        for part in str(node.target).split("."):
            val = getattr(val, part)
        return f"tensor{tuple(val.shape)}" if isinstance(val, torch.Tensor) else type(val).__name__
    if node.op == "call_method":
        return str(node.target)
    return ""


def graph_structure(gm: fx.GraphModule) -> list[str]:
    """One line per node: op, normalised target (module type and hyper-parameters, function,
    method, constant shape) and arguments as references to earlier nodes by position; node
    and module names are ignored (TVM's structural equality, for torch.fx graphs)."""
    index: dict[fx.Node, int] = {}
    lines = []

    def ref(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return f"%{index[a]}"
        if isinstance(a, (list, tuple)):
            return type(a)(ref(x) for x in a)
        if isinstance(a, dict):
            return {k: ref(v) for k, v in a.items()}
        return a

    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        args = ", ".join([repr(ref(a)) for a in node.args] + [f"{k}={ref(v)!r}" for k, v in node.kwargs.items()])
        lines.append(f"%{i} = {node.op} {_target_key(gm, node)}({args})")
    return lines


def assert_graph_equal(actual: fx.GraphModule, expected: nn.Module, inputs: Sequence[torch.Tensor] | None = None
                       ) -> None:
    """``actual`` has the op structure of ``expected`` (a GraphModule, or a module captured here
    with ``inputs``): the same ops in the same order on the same operands, names ignored.
    Raises AssertionError with a diff of the two structures."""
    if not isinstance(expected, fx.GraphModule):
        from graphopt.capture import capture

        if inputs is None:
            raise TypeError("assert_graph_equal needs inputs to capture a plain nn.Module")
        expected = capture(expected, tuple(inputs))
    a, e = graph_structure(actual), graph_structure(expected)
    if a != e:
        diff = "\n".join(difflib.unified_diff(e, a, "expected", "actual", lineterm="", n=1))
        raise AssertionError(f"graph structures differ:\n{diff}")


# ----------------------------------------------------------------------------- model files

SMALL_CNN_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def model():
    torch.manual_seed(0)
    return Net()


def example_inputs():
    return (torch.randn(2, 3, 16, 16),)
'''


def write_model_file(folder: str | Path, source: str = SMALL_CNN_MODEL, name: str = "model.py") -> Path:
    """Write a model file (``model()``, ``example_inputs()``; the small conv-BN-linear net by
    default) into ``folder`` (created); returns its path, ready for ``graphopt optimize``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(source).lstrip())
    return path


# ----------------------------------------------------------------------------- small helpers


def count_modules(gm: fx.GraphModule, types: type | tuple[type, ...]) -> int:
    """call_module nodes calling a module of ``types``."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), types))


def count_calls(gm: fx.GraphModule, target: Any) -> int:
    """call_function nodes with ``target`` or call_method nodes named ``target``."""
    return sum(1 for n in gm.graph.nodes if (n.op == "call_function" and n.target is target)
               or (n.op == "call_method" and n.target == target))


def assert_idempotent(pass_or_spec: Any, gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    """A second run of the pass on its own output changes nothing."""
    code = gm.code
    gm2, rec = run_pass(pass_or_spec, gm, inputs)
    assert not rec.modified, f"second run modified the graph: {rec.rewrites[:3]}"
    assert gm2.code == code


def outputs(module: nn.Module, inputs: Sequence[torch.Tensor]) -> Any:
    """Eval-mode outputs without gradients."""
    module.eval()
    with torch.no_grad():
        return module(*inputs)


def train_steps(module: nn.Module, inputs: Sequence[torch.Tensor], target: torch.Tensor, steps: int = 5,
                lr: float = 0.01) -> list[float]:
    """A few SGD steps on a fixed batch; returns the losses (they should fall)."""
    module.train()
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = module(*inputs)
        loss = (nn.functional.cross_entropy(out, target) if target.dtype == torch.long
                else nn.functional.mse_loss(out, target))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses

