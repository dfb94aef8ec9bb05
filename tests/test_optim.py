"""clip_and_step_: clipping folded into torch's fused optimizer step."""

from __future__ import annotations

import copy

import pytest
import torch

import fusedclip


def _pair(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3))
    return model, copy.deepcopy(model)


def _backward(models, x, y, scaler=None):
    for m in models:
        m.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(m(x), y) * 50
        (scaler.scale(loss) if scaler is not None else loss).backward()


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True),
], ids=["adamw", "adam", "sgd"])
@pytest.mark.parametrize("max_norm", [0.3, 1e9], ids=["clipped", "unclipped"])
def test_same_parameters_as_clip_then_step(make_optimizer, max_norm):
    ours, theirs = _pair()
    opt_ours, opt_theirs = make_optimizer(ours.parameters()), make_optimizer(theirs.parameters())
    gen = torch.Generator().manual_seed(2)
    for _ in range(6):
        x, y = torch.randn(16, 10, generator=gen), torch.randn(16, 3, generator=gen)
        _backward((ours, theirs), x, y)
        total = fusedclip.clip_and_step_(opt_ours, max_norm)
        expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
        opt_theirs.step()
        torch.testing.assert_close(total, expected, rtol=2e-6, atol=0)
        for a, b in zip(ours.parameters(), theirs.parameters()):  # the fused step writes the clipped grads
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not hasattr(opt_ours, "grad_scale")


def test_composes_with_amp_grad_scaler():
    ours, theirs = _pair(1)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-2, fused=True)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-2, fused=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in range(2)]
    gen = torch.Generator().manual_seed(3)
    for step in range(7):
        x, y = torch.randn(16, 10, generator=gen), torch.randn(16, 3, generator=gen)
        for model, scaler in zip((ours, theirs), scalers):
            model.zero_grad(set_to_none=True)
            scaler.scale(torch.nn.functional.mse_loss(model(x), y) * 50).backward()
            if step == 4:
                next(model.parameters()).grad.view(-1)[0] = float("nan")
        fusedclip.clip_and_step_(opt_ours, 0.5, scaler=scalers[0])
        scalers[0].update()
        scalers[1].unscale_(opt_theirs)
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
        scalers[1].step(opt_theirs)
        scalers[1].update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_non_fused_optimizer_is_refused():
    model, _ = _pair()
    model(torch.randn(2, 10)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    for optimizer in (torch.optim.AdamW(model.parameters()), torch.optim.RMSprop(model.parameters())):
        with pytest.raises(ValueError, match="fused=True"):
            fusedclip.clip_and_step_(optimizer, 1.0)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
