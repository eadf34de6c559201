"""One rule for the default budget of approximate passes (README, "Passes").

A pass whose purpose is to change the function, and whose recovery is training (pruning, depthwise
factorisation, residual gates that are not the identity), has an unbounded default budget: the
error is measured and reported, never a failure by default. A numerics-only pass (mixed_precision,
cast) promises the same function up to rounding and has a finite default budget.
"""

from __future__ import annotations

import math

import pytest
import torch

import graphopt
from graphopt import Semantics
from graphopt.testing import run_pass

NUMERICS_ONLY = {"mixed_precision": 0.05, "cast": 0.1}


def _approximate_passes() -> dict[str, type]:
    out = {}
    for name, cls in graphopt.available_passes().items():
        if "budget" in cls.options and cls.__module__.startswith("passes."):
            out[name] = cls
    return out


def test_every_builtin_approximate_pass_follows_the_rule():
    passes = _approximate_passes()
    assert {"prune", "depthwise_separable", "insert_residual", "mixed_precision", "cast"} <= set(passes)
    for name, cls in passes.items():
        default = cls.options["budget"].default
        if name in NUMERICS_ONLY:
            assert default == NUMERICS_ONLY[name], name
        else:
            assert math.isinf(default), f"{name}: default budget {default}, the rule says inf"
    # insert_residual is APPROXIMATE only with the gates that change the function
    assert graphopt.get_pass("insert_residual")(gate="rezero").semantics is Semantics.APPROXIMATE


@pytest.mark.zoo
@pytest.mark.parametrize("name,px", [("timm:convnext_atto", 64), ("convnext_tiny", 64),
                                     ("timm:tf_efficientnetv2_b0", 64)])
def test_depthwise_separable_default_budget_reports_the_error(zoo, name, px):
    """At random init the factorised network's output moves by about its own size (ConvNeXt: 1.3):
    with the default budget that is reported, not a failure."""
    torch.manual_seed(0)
    model = zoo(name).eval()
    x = torch.randn(1, 3, px, px)
    gm, rec = run_pass("depthwise_separable", model, (x,))
    ver = rec.verification
    assert rec.modified and ver.status == "passed" and math.isinf(ver.limit)
    assert 0.5 < ver.value < 5.0  # measured and reported: the function changed, as the pass intends
    assert rec.notes["mac_reduction"] > 1.0
    assert torch.isfinite(gm(x)).all()


@pytest.mark.slow
@pytest.mark.zoo
def test_depthwise_separable_default_budget_on_maxvit(zoo):
    torch.manual_seed(0)
    model = zoo("maxvit_t").eval()
    x = torch.randn(1, 3, 224, 224)
    _, rec = run_pass("depthwise_separable", model, (x,))
    assert rec.verification.status == "passed" and math.isinf(rec.verification.limit)
    assert rec.verification.value > 0.5


def test_insert_residual_default_budget_is_unbounded_for_function_changing_gates():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
                                 torch.nn.Conv2d(4, 4, 3, padding=1)).eval()
    x = torch.randn(2, 4, 8, 8)
    _, rec = run_pass("insert_residual:gate=none", module, (x,))
    assert rec.modified and rec.verification.status == "passed" and math.isinf(rec.verification.limit)
    assert rec.verification.value > 0.1  # y = f(x) + x: the change is measured and reported
