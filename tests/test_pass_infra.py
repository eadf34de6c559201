"""Pass contract, options, pipeline specs, registry, PassManager and verification by semantics."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import graphopt
from graphopt.errors import PassConfigError, PassError, PreconditionError, VerificationError
from graphopt.pass_infra import (
    Option, Pass, PassResult, Rewrite, Semantics, build_pipeline, load_pipeline_file, parse_pass_spec,
)


class Scale(Pass):
    """Multiplies the output by `factor` (a deliberately function-changing rewrite)."""

    name = "test_scale"
    semantics = Semantics.APPROXIMATE
    options = {"factor": Option(float, 1.0, "output factor"), "budget": Option(float, 0.1, "rel error"),
               "flag": Option(bool, False, "a flag"), "layers": Option(list, [], "globs"),
               "mode": Option(str, "a", "mode", choices=("a", "b")), "k": Option(int, 1, "k", min=1, max=4)}

    def call(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        src = out.args[0]
        if self.config["factor"] == 1.0:
            return PassResult(gm, False)
        with gm.graph.inserting_before(out):
            mul = gm.graph.call_function(torch.mul, (src, self.config["factor"]))
        out.args = (mul,)
        gm.recompile()
        return PassResult(gm, True, [Rewrite("output", f"scaled by {self.config['factor']}")])


class ExactButWrong(Scale):
    name = "test_exact_wrong"
    semantics = Semantics.EXACT
    options = dict(Scale.options, factor=Option(float, 2.0, "f"))


class AtInitWrong(Scale):
    name = "test_at_init_wrong"
    semantics = Semantics.PRESERVING_AT_INIT
    options = dict(Scale.options, factor=Option(float, 2.0, "f"))


class Crashes(Pass):
    name = "test_crash"
    semantics = Semantics.EXACT

    def call(self, gm):
        raise ZeroDivisionError("boom")


class NeedsConv(Pass):
    name = "test_needs_conv"
    semantics = Semantics.EXACT

    def requires(self, gm):
        if not any(isinstance(m, nn.Conv2d) for m in gm.modules()):
            raise PreconditionError("the graph has no Conv2d")

    def call(self, gm):
        return PassResult(gm, False)


@pytest.fixture(autouse=True)
def _register():
    from graphopt.pass_infra import _registry

    for cls in (Scale, ExactButWrong, AtInitWrong, Crashes, NeedsConv):
        graphopt.register_pass(cls)
    yield
    for cls in (Scale, ExactButWrong, AtInitWrong, Crashes, NeedsConv):
        _registry.pop(cls.name, None)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval(), (torch.randn(5, 4),)


def test_option_parsing_from_strings():
    p = Scale(factor="1.5", flag="true", layers="a.*|b.*", mode="b", k="3")
    assert p.config == {"factor": 1.5, "budget": 0.1, "flag": True, "layers": ["a.*", "b.*"], "mode": "b", "k": 3}
    assert p.spec() == "test_scale:factor=1.5,flag=True,layers=a.*|b.*,mode=b,k=3"


@pytest.mark.parametrize("opts, fragment", [
    ({"nope": 1}, "unknown option 'nope' (valid options: factor (float), budget (float), flag (bool)"),
    ({"factor": "abc"}, "'abc' is not a valid float"),
    ({"flag": "maybe"}, "'maybe' is not a boolean"),
    ({"mode": "c"}, "choose one of a, b"),
    ({"k": "9"}, "9 is above the maximum 4"),
    ({"k": "0"}, "0 is below the minimum 1"),
    ({"k": "1.5"}, "'1.5' is not a valid int"),
])
def test_bad_options(opts, fragment):
    with pytest.raises(PassConfigError) as info:
        Scale(**opts)
    assert fragment in str(info.value)


def test_spec_strings_and_unknown_pass():
    assert parse_pass_spec("prune:ratio=0.5,mode=structured") == ("prune", {"ratio": "0.5", "mode": "structured"})
    assert parse_pass_spec(" cleanup ") == ("cleanup", {})
    with pytest.raises(PassConfigError, match="is not key=value"):
        parse_pass_spec("prune:ratio")
    with pytest.raises(PassConfigError, match="given twice"):
        parse_pass_spec("prune:a=1,a=2")
    with pytest.raises(PassConfigError, match=r"unknown pass 'nope' \(valid passes: .*channels_last.*cleanup"):
        build_pipeline(["nope"])


def test_toml_pipeline(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('[[pass]]\nname = "test_scale"\nfactor = 1.05\nlayers = ["x", "y"]\n\n[[pass]]\nname = "cleanup"\n')
    assert load_pipeline_file(f) == [("test_scale", {"factor": 1.05, "layers": ["x", "y"]}), ("cleanup", {})]
    passes = build_pipeline(["channels_last"], f)
    assert [p.name for p in passes] == ["test_scale", "cleanup", "channels_last"]
    assert passes[0].config["layers"] == ["x", "y"]
    (tmp_path / "bad.toml").write_text("[[pass]\n")
    with pytest.raises(PassConfigError, match="invalid TOML"):
        load_pipeline_file(tmp_path / "bad.toml")
    (tmp_path / "empty.toml").write_text("x = 1\n")
    with pytest.raises(PassConfigError, match=r"no \[\[pass\]\] tables"):
        load_pipeline_file(tmp_path / "empty.toml")
    with pytest.raises(PassConfigError, match="pipeline file not found"):
        load_pipeline_file(tmp_path / "missing.toml")


def test_approximate_pass_must_declare_budget():
    with pytest.raises(TypeError, match="must declare a 'budget' option"):
        class NoBudget(Pass):  # noqa: F841
            name = "x"
            semantics = Semantics.APPROXIMATE

            def call(self, gm):
                return PassResult(gm, False)


def test_builtin_passes_are_registered_through_entry_points():
    passes = graphopt.available_passes()
    assert passes["channels_last"].__module__ == "passes.channels_last"
    assert passes["cleanup"].__module__ == "passes.cleanup"
    assert graphopt.ChannelsLast is passes["channels_last"]


def test_approximate_within_budget_is_reported(mlp):
    module, inputs = mlp
    gm, report = graphopt.optimize(module, inputs, [Scale(factor=1.05)])
    rec = report["test_scale"]
    assert rec.modified and rec.verification.status == "passed"
    assert rec.verification.metric == "rel_l2_error"
    assert rec.verification.value == pytest.approx(0.05, rel=1e-4)
    assert rec.verification.limit == 0.1
    torch.testing.assert_close(gm(*inputs), module(*inputs) * 1.05)


def test_approximate_over_budget_fails_naming_the_pass(mlp):
    module, inputs = mlp
    with pytest.raises(VerificationError, match=r"pass 'test_scale' failed verification \(approximate\)") as info:
        graphopt.optimize(module, inputs, ["cleanup", "test_scale:factor=1.5"])
    assert info.value.exit_code == 1
    assert [r.name for r in info.value.report.records] == ["cleanup", "test_scale"]


@pytest.mark.parametrize("name, semantics", [("test_exact_wrong", "exact"), ("test_at_init_wrong", "at_init")])
def test_exact_and_at_init_catch_a_changed_function(mlp, name, semantics):
    module, inputs = mlp
    with pytest.raises(VerificationError, match=f"failed verification \\({semantics}\\)"):
        graphopt.optimize(module, inputs, [name])
    gm, report = graphopt.optimize(module, inputs, [name], verify=False)  # --no-verify
    assert report.records[0].verification.status == "skipped" and not report.verified


def test_unchanged_graph_skips_verification(mlp):
    module, inputs = mlp
    gm, report = graphopt.optimize(module, inputs, [Scale()])
    assert not report.records[0].modified
    assert report.records[0].verification.status == "skipped"


def test_crash_and_precondition_are_reported(mlp, small_cnn):
    module, inputs = mlp
    with pytest.raises(PassError, match="pass 'test_crash' crashed: ZeroDivisionError: boom"):
        graphopt.optimize(module, inputs, ["test_crash"])
    with pytest.raises(PreconditionError, match="pass 'test_needs_conv': the graph has no Conv2d"):
        graphopt.optimize(module, inputs, ["test_needs_conv"])
    graphopt.optimize(*small_cnn, ["test_needs_conv"])  # fine with a conv


def test_report_records_costs_time_and_serialises(small_cnn):
    module, inputs = small_cnn
    gm, report = graphopt.optimize(module, inputs, ["channels_last", "cleanup"])
    rec = report["channels_last"]
    assert rec.before["macs"] == rec.after["macs"] == report.before.macs
    assert rec.after["nodes"] == rec.before["nodes"] + 1
    assert rec.time_s >= 0
    doc = report.as_dict()
    assert doc["verified"] and doc["passes"][0]["verification"]["status"] == "passed"
    assert '"semantics": "exact"' in report.to_json()


def test_pass_manager_on_a_captured_graph(small_cnn):
    module, inputs = small_cnn
    gm = graphopt.capture(module, inputs)
    out, report = graphopt.PassManager(["channels_last"]).run(gm, inputs)
    assert isinstance(out, fx.GraphModule) and report.verified


def test_reports_are_strict_json_with_infinite_budgets(mlp):
    import json

    module, inputs = mlp
    _, report = graphopt.optimize(module, inputs, [Scale(factor=1.05, budget=float("inf"))])
    doc = json.loads(report.to_json(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert doc["passes"][0]["options"]["budget"] == "inf"
