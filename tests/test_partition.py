"""partition pass: cut analysis, balance, bytes, bubble; stages and device_map (no processes)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

import graphopt
from graphopt.dist import SequentialStages, device_map, split_stages
from graphopt.errors import PreconditionError
from graphopt.analysis.partition import CutPoint, analyze_cuts, choose_cuts, predicted_bubble
from graphopt.testing import assert_idempotent, run_pass


class TinyRes(nn.Module):
    """stem -> residual block (lin1, relu, lin2, + skip) -> relu -> head.

    Compute nodes in order: stem, lin1, relu, lin2, add, relu_1, head (6 cut positions);
    MACs at batch 8: stem 4096, lin1 8192, lin2 8192, head 1024.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.lin1 = nn.Linear(32, 32)
        self.lin2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.lin2(torch.relu(self.lin1(x)))
        return self.head(torch.relu(x))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyRes(), (torch.randn(8, 16),)


def _stages(gm):
    return [n.meta["stage"] for n in gm.graph.nodes]


def test_two_stages_cut_inside_residual_block_carries_skip(tiny):
    model, inputs = tiny
    before = graphopt.capture(model, inputs)
    gm, rec = run_pass("partition:stages=2", model, inputs)
    assert rec.modified and rec.verification.status == "passed"
    gm.graph.lint()
    assert gm.code == before.code  # exact: only annotations change
    plan = gm.meta["graphopt"]["partition"]
    # best bottleneck: cut after lin1 -> stages cost 4096+8192=12288 and 8192+1024=9216
    assert plan["stage_costs"] == [12288.0, 9216.0]
    assert plan["balance"] == pytest.approx(12288 / 10752)
    (cut,) = plan["cuts"]
    assert cut["after"] == "lin1"
    assert [t["name"] for t in cut["tensors"]] == ["stem", "lin1"]  # skip tensor carried with the branch
    assert cut["bytes"] == 2 * 8 * 32 * 4
    assert _stages(gm) == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert plan["stage_detail"][1]["inputs"] == ["stem", "lin1"]
    assert [r["target"] for r in rec.rewrites] == ["stage 0", "cut after lin1", "stage 1", "plan"]
    assert len(rec.declined) == 5 and all(d["reason"] for d in rec.declined)
    assert rec.notes["bubble"]["ideal"] == pytest.approx(1 / 5)


def test_max_crossing_one_cuts_only_between_blocks(tiny):
    model, inputs = tiny
    gm, rec = run_pass("partition:stages=2,max_crossing=1", model, inputs)
    plan = gm.meta["graphopt"]["partition"]
    (cut,) = plan["cuts"]
    assert len(cut["tensors"]) == 1
    assert cut["after"] == "stem"  # 4096 | 17408 beats 20480 | 1024 (after the block)
    reasons = {d["target"]: d["reason"] for d in rec.declined}
    assert "more than max_crossing=1" in reasons["cut after lin1"]


def test_slack_prefers_fewer_bytes():
    # two cut points with the same cost split; the second carries fewer bytes
    costs = [1.0, 1.0, 0.0, 1.0, 1.0]
    cuts = [CutPoint(0, "a", ["a"], 100), CutPoint(1, "b", ["b", "x"], 200), CutPoint(2, "c", ["c"], 50),
            CutPoint(3, "d", ["d"], 100)]
    chosen, best = choose_cuts(costs, cuts, 2, slack=0.0)
    assert best == 2.0 and chosen == [2]
    # a cheap cut whose bottleneck (3.0) is within 1.6 x 2.0 is taken with slack 0.6, not with 0.4
    cuts[0].bytes = 1
    assert choose_cuts(costs, cuts, 2, slack=0.6)[0] == [0]
    assert choose_cuts(costs, cuts, 2, slack=0.4)[0] == [2]


def test_bottleneck_is_optimal_against_brute_force():
    rng = random.Random(0)
    for trial in range(150):
        n = rng.randint(2, 9)
        costs = [float(rng.randint(0, 20)) for _ in range(n)]
        cuts = [CutPoint(k, f"n{k}", ["t"], rng.randint(1, 100)) for k in range(n - 1)]
        for c in cuts:
            if rng.random() < 0.3:
                c.reason = "invalid"
        valid = [c.index for c in cuts if c.valid]
        stages = rng.randint(1, len(valid) + 1)
        chosen, best = choose_cuts(costs, cuts, stages, slack=0.1)

        def segs(bounds):
            b = [-1] + list(bounds) + [n - 1]
            return [sum(costs[x + 1:y + 1]) for x, y in zip(b, b[1:])]

        brute = min(max(segs(c)) for c in itertools.combinations(valid, stages - 1))
        assert best == pytest.approx(brute), (trial, costs, valid, stages)
        assert len(chosen) == stages - 1 and all(c in valid for c in chosen) and chosen == sorted(chosen)
        assert max(segs(chosen)) <= brute * 1.1 + 1e-9
        # fewest bytes among the splits within the slack
        ok = [c for c in itertools.combinations(valid, stages - 1) if max(segs(c)) <= brute * 1.1 + 1e-9]
        by_bytes = {c.index: c.bytes for c in cuts}
        assert sum(by_bytes[c] for c in chosen) == min(sum(by_bytes[c] for c in combo) for combo in ok)


def test_predicted_bubble():
    assert predicted_bubble([1.0, 1.0, 1.0, 1.0], 4)["predicted"] == pytest.approx(3 / 7)
    assert predicted_bubble([1.0, 1.0], 8)["ideal"] == pytest.approx(1 / 9)
    b = predicted_bubble([3.0, 1.0], 2)  # step = (4 + 3) / 2 = 3.5; busy 4 of 7
    assert b["step_cost"] == pytest.approx(3.5) and b["predicted"] == pytest.approx(3 / 7)
    assert predicted_bubble([5.0], 4)["predicted"] == 0.0


def test_idempotent(tiny):
    model, inputs = tiny
    gm, _ = run_pass("partition:stages=3", model, inputs)
    assert_idempotent("partition:stages=3", gm, inputs)


def test_one_stage_has_no_cut(tiny):
    model, inputs = tiny
    gm, rec = run_pass("partition:stages=1", model, inputs)
    assert gm.meta["graphopt"]["partition"]["cuts"] == []
    assert set(_stages(gm)) == {0}
    assert gm.meta["graphopt"]["partition"]["balance"] == 1.0


def test_more_stages_than_cut_points_is_a_clear_error(tiny):
    model, inputs = tiny
    with pytest.raises(PreconditionError, match=r"8 stages need 7 cut points, but the graph has only 6"):
        run_pass("partition:stages=8", model, inputs)
    with pytest.raises(PreconditionError, match=r"only 3 places where at most 1 tensor\(s\) cross.*raise max_crossing"):
        run_pass("partition:stages=5,max_crossing=1", model, inputs)


def test_cli_more_stages_than_cut_points(tmp_path, capsys):
    from graphopt.cli import main

    f = tmp_path / "m.py"
    f.write_text("import torch\nfrom torch import nn\n"
                 "def model():\n    return nn.Sequential(nn.Linear(4, 4), nn.ReLU())\n"
                 "def example_inputs():\n    return (torch.randn(2, 4),)\n")
    code = main(["optimize", str(f), "-p", "partition:stages=3", "--emit", "pipeline", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "3 stages need 2 cut points, but the graph has only 1" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        x = self.a(x)  # the same weights again
        return self.c(x)


def test_shared_weights_stay_in_one_stage():
    torch.manual_seed(0)
    gm, rec = run_pass("partition:stages=2", Shared(), (torch.randn(4, 8),))
    reasons = {d["target"]: d["reason"] for d in rec.declined}
    assert "shared module/parameter 'a'" in reasons["cut after relu"]
    assert "shared module/parameter 'a'" in reasons["cut after b"]
    (cut,) = gm.meta["graphopt"]["partition"]["cuts"]
    assert cut["after"] == "a_1"  # the only place after both uses of `a`


class SizeUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        n = x.size(0)
        y = self.b(torch.relu(self.a(x)))
        return y.reshape(n, 2, 4)


def test_non_tensor_values_do_not_cross():
    torch.manual_seed(0)
    gm = graphopt.capture(SizeUser(), (torch.randn(4, 8),))
    compute, cuts = analyze_cuts(gm)
    assert compute[0] == "size"
    assert all("non-tensor value 'size'" in c.reason for c in cuts if c.index < len(compute) - 1)


@pytest.mark.parametrize("by", ["params", "memory", "time"])
def test_other_costs(small_cnn, by):
    model, inputs = small_cnn
    gm, rec = run_pass(f"partition:stages=2,by={by},repeats=2", model, inputs)
    plan = gm.meta["graphopt"]["partition"]
    assert plan["by"] == by and plan["unit"] in ("parameters", "bytes", "seconds")
    assert sum(plan["stage_costs"]) == pytest.approx(plan["total_cost"])
    assert all(c > 0 for c in plan["stage_costs"])
    if by == "params":
        assert plan["total_cost"] == sum(p.numel() for p in model.parameters())
    if by == "memory":
        params_bytes = sum(p.numel() * 4 for p in model.parameters())
        assert plan["total_cost"] >= 4 * params_bytes


def test_time_needs_a_device_that_exists(small_cnn):
    model, inputs = small_cnn
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(PreconditionError, match="CUDA is not available"):
        run_pass("partition:by=time,device=cuda", model, inputs)


def test_stages_chain_to_the_model_with_gradients(tiny):
    model, inputs = tiny
    gm, _ = run_pass("partition:stages=4", model, inputs)
    stages = split_stages(gm)
    assert len(stages) == 4
    # stage 1 passes the skip tensor through: it crosses cuts 1 and 2
    assert gm.meta["graphopt"]["partition"]["stage_detail"][1]["outputs"] == ["stem", "lin1"]
    chained = SequentialStages(stages)
    x = inputs[0].clone().requires_grad_(True)
    x2 = inputs[0].clone().requires_grad_(True)
    out, ref = chained(x), model(x2)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    got = dict(chained.named_parameters())
    for name, p in model.named_parameters():
        stage = next(s for s in range(4) if f"stages.{s}.{name}" in got)
        torch.testing.assert_close(got[f"stages.{stage}.{name}"].grad, p.grad)


def test_device_map_cpu(tiny):
    model, inputs = tiny
    gm, _ = run_pass("partition:stages=2", model, inputs)
    mp = device_map(gm, "cpu,cpu")
    assert [str(d) for d in mp.devices] == ["cpu", "cpu"]
    torch.testing.assert_close(mp(*inputs), model(*inputs))
    with pytest.raises(PreconditionError, match="3 devices given for 2 stages"):
        device_map(gm, ["cpu"] * 3)
    if not torch.cuda.is_available():
        with pytest.raises(PreconditionError, match="cuda:0 is not available"):
            device_map(gm, ["cpu", "cuda:0"])


@pytest.mark.gpu
def test_device_map_cuda(tiny):
    model, inputs = tiny
    gm, _ = run_pass("partition:stages=2", model, inputs)
    n = torch.cuda.device_count()
    mp = device_map(gm, [f"cuda:{0}", f"cuda:{min(1, n - 1)}"])
    out = mp(inputs[0].cuda())
    torch.testing.assert_close(out.cpu(), model(*inputs), rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in mp.parameters())


@pytest.mark.zoo
@pytest.mark.parametrize("name,stages", [("resnet18", 2), ("resnet18", 4), ("mobilenet_v2", 3)])
def test_real_architectures(zoo, name, stages):
    model = zoo(name, num_classes=10)
    inputs = (torch.randn(2, 3, 64, 64),)
    gm, rec = run_pass(f"partition:stages={stages}", model, inputs)
    plan = gm.meta["graphopt"]["partition"]
    assert len(plan["stage_costs"]) == stages
    # every split can reach mean + the most expensive single node; 2 stages of resnet18 reach 1.10
    biggest = max(n.meta["cost"].macs for n in gm.graph.nodes)
    assert max(plan["stage_costs"]) <= plan["total_cost"] / stages + biggest
    if stages == 2:
        assert plan["balance"] <= 1.10, plan["stage_costs"]
    assert all(len(c["tensors"]) <= 2 for c in plan["cuts"])
    stages_ = split_stages(gm)
    chained = SequentialStages(stages_).eval()
    with torch.no_grad():
        torch.testing.assert_close(chained(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
    _run_like_a_pipeline_stage(stages_)


def _run_like_a_pipeline_stage(stages):
    """PipelineStage hands a stage its inputs as leaves that require grad: forward + backward."""
    for st in stages[1:]:
        xs = [x.detach().clone().requires_grad_(True) for x in st.meta["graphopt"]["example_inputs"]]
        out = st.train()(*xs)
        outs = list(out) if isinstance(out, tuple) else [out]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        assert all(x.grad is not None for x in xs)


class InplaceAfterAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.relu = nn.ReLU(inplace=True)
        self.c = nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x)
        y = self.relu(y + self.b(y))
        return self.c(y)


def test_no_cut_before_an_in_place_write():
    torch.manual_seed(0)
    model, inputs = InplaceAfterAdd(), (torch.randn(4, 8),)
    gm, rec = run_pass("partition:stages=2,max_crossing=1", model, inputs)
    reasons = {d["target"]: d["reason"] for d in rec.declined}
    assert "'add' is modified in place after this point" in reasons["cut after add"]
    _run_like_a_pipeline_stage(split_stages(gm))
    gm, rec = run_pass("partition:stages=2,max_crossing=1,by=params", model, inputs)
    _run_like_a_pipeline_stage(split_stages(gm))


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("stages", [2, 4])
def test_resnet50_balance_by_macs(zoo, stages):
    model = zoo("resnet50")
    gm, rec = run_pass(f"partition:stages={stages}", model, (torch.randn(1, 3, 224, 224),), verify=False)
    assert gm.meta["graphopt"]["partition"]["balance"] <= 1.10


def test_profile_node_times(small_cnn):
    from graphopt.analysis.profile import _needs_grad, profile_node_times

    model, inputs = small_cnn
    gm = graphopt.capture(model, inputs)
    times = profile_node_times(gm, inputs, repeats=2)
    compute = [n.name for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    assert list(times) == compute
    assert all(t["forward"] > 0 and t["total"] == t["forward"] + t["backward"] for t in times.values())
    assert times["conv1"]["backward"] > 0  # weight gradient
    flags = _needs_grad(gm)
    assert flags["x"] is False and flags["conv1"] is True  # the model's input carries no gradient


class TwoInputs(nn.Module):
    """The second input is only used at the end: it must travel through stage 0."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x, bias):
        h = self.b(torch.relu(self.a(x)))
        return h + bias, h.sum()


def test_inputs_used_late_are_carried_and_tuple_outputs_kept():
    torch.manual_seed(0)
    model, inputs = TwoInputs(), (torch.randn(4, 8), torch.randn(4, 8))
    gm, _ = run_pass("partition:stages=2", model, inputs)
    plan = gm.meta["graphopt"]["partition"]
    assert plan["stage_detail"][0]["inputs"] == ["x", "bias"]
    assert "bias" in plan["stage_detail"][1]["inputs"]
    out = SequentialStages(split_stages(gm))(*inputs)
    ref = model(*inputs)
    assert isinstance(out, tuple) and len(out) == 2
    torch.testing.assert_close(out, ref)
