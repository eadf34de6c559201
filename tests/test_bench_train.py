"""Training harness pieces: schedules, early stopping, the loop, data, the torch backend's precision handling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from graphopt.bench import (EarlyStopping, TorchBackend, TrainConfig, create_backend, fit, fit_many, lr_schedule)
from graphopt.bench.data import Batches, adapt, load_builtin, split
from graphopt.capture import capture
from graphopt.errors import GraphoptError, PassConfigError
from graphopt.precision import PrecisionPolicy, get_policy, set_policy


# -- schedules ---------------------------------------------------------------------------------------
def _torch_lrs(make, steps, lr=0.1):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    s = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return out


def test_constant_schedule():
    assert lr_schedule("constant", 0.1, 5).lrs == (0.1,) * 5


def test_cosine_matches_torch_and_decays_to_min():
    s = lr_schedule("cosine", 0.1, 20, min_lr=0.001)
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=0.001), 20)
    assert s.lrs == pytest.approx(ref)
    assert s(0) == pytest.approx(0.1) and s.lrs[-1] < 0.002 and all(a >= b for a, b in zip(s.lrs, s.lrs[1:]))


def test_onecycle_rises_then_falls_and_peaks_at_base_lr():
    s = lr_schedule("onecycle", 0.2, 100, warmup_steps=25)
    peak = max(range(100), key=lambda i: s.lrs[i])
    assert 20 <= peak <= 26 and s.lrs[peak] == pytest.approx(0.2, rel=1e-3)
    assert s.lrs[0] < 0.02 and s.lrs[-1] < 1e-4


def test_step_schedule():
    s = lr_schedule("step", 1.0, 7, step_size=3, gamma=0.5)
    assert s.lrs == pytest.approx((1, 1, 1, 0.5, 0.5, 0.5, 0.25))


def test_warmup_is_linear_then_main_schedule():
    s = lr_schedule("cosine", 0.1, 20, warmup_steps=5, warmup_start_factor=0.2)
    assert s.lrs[:6] == pytest.approx([0.02, 0.036, 0.052, 0.068, 0.084, 0.1])
    assert all(a >= b for a, b in zip(s.lrs[5:], s.lrs[6:]))
    assert s(10**6) == s.lrs[-1]  # past the end: last value


@pytest.mark.parametrize("kw", [dict(name="nope"), dict(total_steps=0), dict(warmup_steps=10), dict(name="step")])
def test_schedule_errors(kw):
    args = dict(name="cosine", base_lr=0.1, total_steps=10) | kw
    with pytest.raises(PassConfigError):
        lr_schedule(args.pop("name"), args.pop("base_lr"), args.pop("total_steps"), **args)


# -- early stopping ----------------------------------------------------------------------------------
def test_early_stopping_max_mode():
    es = EarlyStopping(patience=2, mode="max")
    stops = [es.update(v) for v in (0.5, 0.6, 0.6, 0.55)]
    assert stops == [False, False, False, True]
    assert es.best == 0.6 and es.best_index == 1
    assert not es.update(0.7) and es.bad == 0 and es.best_index == 4  # an improvement resets the count


def test_early_stopping_min_mode_and_min_delta():
    es = EarlyStopping(patience=1, mode="min", min_delta=0.05)
    assert not es.update(1.0)
    assert es.update(0.97)  # not better by more than min_delta
    es2 = EarlyStopping(patience=3, mode="min")
    assert [es2.update(v) for v in (float("nan"), 2.0, 1.0)] == [False, False, False] and es2.best == 1.0


# -- data --------------------------------------------------------------------------------------------
def test_digits_split_is_stratified_and_standardised():
    tr, te = load_builtin("digits")
    assert tr.tensors[0].shape[1:] == (1, 8, 8) and len(tr) + len(te) == 1797
    counts = torch.bincount(te.tensors[1], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    assert abs(tr.tensors[0].mean().item()) < 1e-4 and abs(tr.tensors[0].std().item() - 1) < 1e-3


def test_mnist_5k():
    tr, te = load_builtin("mnist")
    assert (len(tr), len(te)) == (4000, 1000) and tr.tensors[0].shape[1:] == (1, 28, 28)
    assert torch.bincount(tr.tensors[1]).tolist() == [400] * 10


def test_adapt_resizes_and_repeats_channels():
    tr, _ = load_builtin("digits")
    a = adapt(tr, (3, 16, 16))
    assert a.tensors[0].shape == (len(tr), 3, 16, 16)
    assert torch.equal(a.tensors[0][:, 0], a.tensors[0][:, 2])
    with pytest.raises(GraphoptError):
        adapt(tr, (64,))  # not an image input


def test_batches_shuffle_is_seeded_and_drop_last():
    ds = TensorDataset(torch.arange(10).float().unsqueeze(1), torch.arange(10))
    b1 = [y.tolist() for _, y in Batches(ds, 3, shuffle=True, drop_last=True, seed=1)]
    b2 = [y.tolist() for _, y in Batches(ds, 3, shuffle=True, drop_last=True, seed=1)]
    assert b1 == b2 and len(b1) == 3 and all(len(b) == 3 for b in b1)
    assert sorted(sum(b1, [])) != list(range(9)) or b1 != [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    tr, va = split(ds, 0.2)
    assert len(tr) == 8 and len(va) == 2 and not set(tr.tensors[1].tolist()) & set(va.tensors[1].tolist())


# -- the loop ------------------------------------------------------------------------------------------
def _blobs(n=400, seed=0):
    """Linearly separable 4-class data: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    centers = torch.tensor([[3.0, 0], [0, 3.0], [-3.0, 0], [0, -3.0]])
    x = centers[y] + 0.5 * torch.randn(n, 2, generator=g)
    return TensorDataset(x[:300], y[:300]), TensorDataset(x[300:], y[300:])


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 4))


def test_fit_learns_and_records_history():
    r = fit(_mlp(), _blobs(), TrainConfig(epochs=3, batch_size=30, lr=0.1, schedule="cosine"))
    assert len(r.history) == 3 and r.stop_reason == "all epochs run"
    assert r.final["test_accuracy"] > 0.95
    assert r.steps == 3 * (270 // 30) and r.samples == r.steps * 30
    times = [h.train_time_s for h in r.history]
    assert all(b > a for a, b in zip(times, times[1:])) and all(h.wall_time_s >= h.train_time_s for h in r.history)
    lrs = [h.lr for h in r.history]
    assert lrs[0] > lrs[-1]  # cosine decays
    assert r.params == 2 * 16 + 16 + 16 * 4 + 4


def test_fit_stops_at_target_accuracy():
    r = fit(_mlp(), _blobs(), TrainConfig(epochs=20, batch_size=30, lr=0.1, target_accuracy=0.9, eval_every_steps=3))
    assert r.stop_reason.startswith("reached target")
    assert r.time_to_target_s == r.history[-1].train_time_s and r.epochs_to_target < 20
    assert r.history[-1].test_accuracy >= 0.9


def test_fit_early_stopping_with_patience():
    # lr 0: nothing improves after the first evaluation -> stops after 1 + patience evaluations
    r = fit(_mlp(), _blobs(), TrainConfig(epochs=50, batch_size=30, lr=1e-12, patience=2, monitor="val_loss",
                                          min_delta=1e-3))
    assert r.stop_reason.startswith("early stopping") and len(r.history) == 3 and r.best_epoch == 1


def test_fit_many_interleaves_and_uses_same_data_order():
    rs = fit_many({"a": _mlp(), "b": _mlp()}, _blobs(), TrainConfig(epochs=2, batch_size=30, lr=0.1))
    assert [h.train_loss for h in rs["a"].history] == pytest.approx([h.train_loss for h in rs["b"].history])


def test_wrong_number_of_classes_is_a_clear_error():
    net = nn.Sequential(nn.Linear(2, 3))
    with pytest.raises(GraphoptError, match="4 classes"):
        fit(net, _blobs(), TrainConfig(epochs=1))


def test_unknown_backend_and_bad_config():
    with pytest.raises(PassConfigError, match="unknown training backend"):
        create_backend("nope", _mlp(), TrainConfig())
    with pytest.raises(PassConfigError):
        TrainConfig(epochs=0)
    with pytest.raises(PassConfigError):
        TrainConfig(monitor="acc")


def test_divergence_is_reported():
    r = fit(_mlp(), _blobs(), TrainConfig(epochs=5, batch_size=30, lr=1e30))
    assert r.stop_reason.startswith("diverged")


# -- the torch backend and precision policies --------------------------------------------------------------
def _graph(dtype=None):
    m = _mlp()
    if dtype is not None:
        m = m.to(dtype)
    x = torch.randn(4, 2, dtype=dtype or torch.float32)
    return capture(m, (x,))


def test_backend_fp32_has_no_scaler_or_masters():
    be = TorchBackend(_mlp(), lr=0.1)
    assert be.scaler is None and be.master is None and be.policy is None


def test_backend_float16_mixed_policy_uses_grad_scaler():
    gm = _graph()
    set_policy(gm, PrecisionPolicy(mode="mixed", dtype="float16", loss_scaling="dynamic"))
    be = TorchBackend(gm, lr=0.1)
    assert isinstance(be.scaler, torch.amp.GradScaler) and be.master is None
    x, y = torch.randn(8, 2), torch.randint(0, 4, (8,))
    w0 = gm.get_submodule("0").weight.detach().clone()
    losses = [be.train_step((x,), y, 0.1) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert not torch.equal(w0, gm.get_submodule("0").weight)
    assert be.scaler.get_scale() > 0


def test_backend_half_policy_keeps_float32_master_weights():
    gm = _graph(torch.bfloat16)
    set_policy(gm, PrecisionPolicy(mode="half", dtype="bfloat16", master_weights=True))
    be = TorchBackend(gm, lr=0.1, momentum=0.0)
    assert be.master is not None and be.scaler is None
    assert all(m.dtype == torch.float32 for m in be.master.masters)
    w = gm.get_submodule("0").weight
    x, y = torch.randn(8, 2), torch.randint(0, 4, (8,))  # float32 inputs are cast to bfloat16
    be.train_step((x,), y, 0.1)
    assert w.dtype == torch.bfloat16
    master = be.master.masters[0]
    assert torch.equal(w, master.to(torch.bfloat16))  # half params are the rounded masters
    assert master.grad is None  # zeroed after the step
    loss, out = be.evaluate((x,), y)
    assert math.isfinite(loss) and out.dtype == torch.float32


def test_backend_float16_half_with_scaler_and_masters():
    gm = _graph(torch.float16)
    set_policy(gm, PrecisionPolicy(mode="half", dtype="float16", loss_scaling="dynamic", master_weights=True))
    assert get_policy(gm).loss_scaling == "dynamic"
    be = TorchBackend(gm, lr=0.05)
    assert be.master is not None and be.scaler is not None
    x, y = torch.randn(8, 2), torch.randint(0, 4, (8,))
    before = [m.detach().clone() for m in be.master.masters]
    for _ in range(2):
        assert math.isfinite(be.train_step((x,), y, 0.05))
    assert any(not torch.equal(a, b) for a, b in zip(before, be.master.masters))


def test_precision_fp32_override_ignores_policy():
    gm = _graph()
    set_policy(gm, PrecisionPolicy(mode="mixed", dtype="float16", loss_scaling="dynamic"))
    assert TorchBackend(gm, precision="fp32").scaler is None


def test_state_dict_is_trained_weights_on_cpu():
    r = fit(_mlp(), _blobs(), TrainConfig(epochs=1, batch_size=30, lr=0.1))
    sd = r.backend.state_dict()
    assert set(sd) == {"0.weight", "0.bias", "2.weight", "2.bias"} and all(v.device.type == "cpu" for v in sd.values())
