"""Training a precision-rewritten graph the way the harness must: the recorded policy decides
GradScaler (float16) and float32 master weights (pure half). This is the reference loop the
training harness (issue 8) implements."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import graphopt
from graphopt.precision import MasterWeights, get_policy, needs_grad_scaler


def train(model, batches, steps: int, lr: float = 0.05):
    """The policy-driven step: what the harness must call."""
    policy = get_policy(model)
    device = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device, enabled=needs_grad_scaler(policy))
    make_opt = lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)  # noqa: E731
    mw = MasterWeights(model, make_opt) if policy is not None and policy.master_weights else None
    opt = mw.optimizer if mw else make_opt([p for p in model.parameters() if p.requires_grad])
    model.train()
    losses, scales = [], []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        if mw:
            mw.sync_grads()  # half grads -> float32 master grads (still scaled)
        scaler.step(opt)  # unscales, skips the step on inf/NaN
        scaler.update()
        if mw:
            mw.sync_params()  # masters -> half parameters
            mw.zero_grad()
        else:
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        scales.append(scaler.get_scale() if scaler.is_enabled() else None)
    return losses, scales, mw


def _data(small_cnn):
    """One fixed batch whose labels a teacher derives from the input (learnable)."""
    model, (x,) = small_cnn
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(16, 3, 16, 16, generator=gen)
    ys = (xs.mean(dim=(2, 3)) @ torch.randn(3, 10, generator=gen)).argmax(1)
    return model, x, [(xs, ys)]


def _float32_losses(model, batches, steps):
    import copy

    ref = copy.deepcopy(model)
    losses, _, _ = train(ref, batches, steps)
    return losses


def test_mixed_float16_trains_with_grad_scaler(small_cnn):
    model, x, batches = _data(small_cnn)
    gm, _ = graphopt.optimize(model, (x,), ["mixed_precision"])
    losses, scales, mw = train(gm, batches, steps=12)
    assert mw is None and scales[0] is not None  # float16: dynamic loss scaling on
    assert losses[-1] < losses[0] * 0.8
    ref = _float32_losses(model, batches, 12)  # the same steps in float32
    assert max(abs(a - b) for a, b in zip(losses, ref)) < 0.05
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in gm.parameters())


def test_mixed_bfloat16_trains_without_scaler(small_cnn):
    model, x, batches = _data(small_cnn)
    gm, _ = graphopt.optimize(model, (x,), ["mixed_precision:dtype=bfloat16"])
    losses, scales, mw = train(gm, batches, steps=12)
    assert scales == [None] * 12 and mw is None
    assert losses[-1] < losses[0] * 0.8


def test_pure_half_trains_with_master_weights(small_cnn):
    model, x, batches = _data(small_cnn)
    gm, _ = graphopt.optimize(model, (x,), ["cast"])
    losses, scales, mw = train(gm, batches, steps=12)
    assert mw is not None and all(m.dtype == torch.float32 for m in mw.masters)
    assert losses[-1] < losses[0] * 0.8
    # the module's half parameters are the rounded masters
    for p, m in zip(mw.params, mw.masters):
        assert p.dtype in (torch.float16, torch.float32)
        assert torch.equal(p, m.to(p.dtype))


def test_master_weights_keep_updates_half_would_lose(small_cnn):
    """An update below half's resolution vanishes on a float16 weight, not on its master."""
    model, x, batches = _data(small_cnn)
    gm, _ = graphopt.optimize(model, (x,), ["cast"])
    w = gm.get_parameter("fc.weight")
    tiny = lambda params: torch.optim.SGD(params, lr=1e-6)  # noqa: E731
    mw = MasterWeights(gm, tiny)
    i = next(i for i, p in enumerate(mw.params) if p is w)
    before_half, before_master = w.detach().clone(), mw.masters[i].detach().clone()
    gm.train()
    F.cross_entropy(gm(batches[0][0]), batches[0][1]).backward()
    naive = (w.detach() - 1e-6 * w.grad).to(torch.float16)  # a plain SGD step on the half weight
    mw.sync_grads()
    mw.optimizer.step()
    mw.sync_params()
    master = mw.masters[i]
    assert torch.equal(naive, before_half)  # every update rounded away
    assert not torch.equal(master, before_master)  # the float32 master moved


def test_reloaded_folder_trains_by_its_manifest(tmp_path, small_cnn):
    model, x, batches = _data(small_cnn)
    gm, report = graphopt.optimize(model, (x,), ["cast:dtype=bfloat16"])
    graphopt.emit_torch_folder(gm, tmp_path / "out", report=report)
    loaded = graphopt.load(tmp_path / "out")
    policy = get_policy(loaded)
    assert policy.master_weights and not needs_grad_scaler(policy)
    losses, scales, mw = train(loaded, batches, steps=12)
    assert mw is not None and losses[-1] < losses[0] * 0.8
