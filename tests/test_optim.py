"""clip_and_step_: clipping folded into torch's fused optimizer step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedclip
from fusedclip import optim


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
    grads = [p.grad.clone() for p in model.parameters()]
    for optimizer in (torch.optim.AdamW(model.parameters()), torch.optim.RMSprop(model.parameters())):
        with pytest.raises(ValueError, match="fused=True"):
            fusedclip.clip_and_step_(optimizer, 1.0)
        assert not optimizer.state and not hasattr(optimizer, "grad_scale")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


@pytest.mark.parametrize("with_scaler", [False, True], ids=["plain", "scaler"])
def test_bad_arguments_leave_grads_parameters_and_state_alone(with_scaler):
    model, _ = _pair()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu") if with_scaler else None
    loss = model(torch.randn(2, 10)).sum()
    (scaler.scale(loss) if scaler else loss).backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    scaler_state = dict(scaler._per_optimizer_states[id(optimizer)]) if scaler else None
    for max_norm, norm_type in ((-1.0, 2.0), (math.nan, 2.0), ("1", 2.0), (1.0, "fro"), (1.0, None)):
        with pytest.raises((ValueError, TypeError)):
            fusedclip.clip_and_step_(optimizer, max_norm, norm_type, scaler=scaler)
    for p, (data, grad) in zip(model.parameters(), before):
        assert torch.equal(p.detach(), data) and torch.equal(p.grad, grad)
    assert not optimizer.state and not hasattr(optimizer, "grad_scale")
    if scaler:
        assert scaler._per_optimizer_states[id(optimizer)] == scaler_state


# -- coefficients a float32 grad_scale cannot carry ---------------------------------------------


_OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, fused=True),
}


def _params_with_grads(dtype, grad_exponents, seed):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for exponent in grad_exponents:
        p = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64).to(dtype))
        big = torch.finfo(dtype).max
        p.grad = (torch.randn(5, generator=gen, dtype=torch.float64) * 10.0**exponent).clamp(-big, big).to(dtype)
        params.append(p)
    return params


def _twins(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params], [p.grad.clone() for p in params]


def _clip_and_step_matches(optimizer_name, dtype, grad_exponents, max_norm, seed, *, reference="fusedclip", steps=2, backend="cpu"):
    """Run clip_and_step_ and clip-then-step on identical copies; assert the same grads and parameters.

    ``reference``: "fusedclip" (fusedclip.clip_grad_norm_ on the same backend, then step) or
    "torch" (torch.nn.utils.clip_grad_norm_, then step).
    """
    ours = _params_with_grads(dtype, grad_exponents, seed)
    theirs, grads = _twins(ours)
    opt_ours, opt_theirs = _OPTIMIZERS[optimizer_name](ours), _OPTIMIZERS[optimizer_name](theirs)
    tiny = torch.finfo(dtype).tiny
    for step in range(steps):
        if step:
            fresh = _params_with_grads(dtype, grad_exponents, seed + step)
            for a, b, f in zip(ours, theirs, fresh):
                a.grad, b.grad = f.grad.clone(), f.grad.clone()
        else:
            for b, g in zip(theirs, grads):
                b.grad = g.clone()
        total = fusedclip.clip_and_step_(opt_ours, max_norm, backend=backend)
        if reference == "torch":
            expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        else:
            expected = fusedclip.clip_grad_norm_(theirs, max_norm, backend=backend)
        opt_theirs.step()
        torch.testing.assert_close(total, expected, rtol=2e-6, atol=0, equal_nan=True)
        for a, b in zip(ours, theirs):  # the fused step writes the clipped grads back
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=tiny * 64, equal_nan=True)
            scale = float(b.detach().abs().max()) if torch.isfinite(b).all() else 1.0
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6 * scale, equal_nan=True)
        assert not hasattr(opt_ours, "grad_scale")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    optimizer_name=st.sampled_from(sorted(_OPTIMIZERS)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_clip_and_step_equals_clip_then_step_for_every_finite_input(optimizer_name, dtype, data, seed):
    """Norms far beyond float32's range, tiny and zero max_norm: the same update as clip-then-step."""
    top = 39 if dtype == torch.float32 else 300  # (grads are clamped to their dtype's largest value)
    exponents = data.draw(st.lists(st.integers(-30, top), min_size=1, max_size=3), label="grad exponents")
    max_norm = data.draw(
        st.one_of(
            st.just(0.0),
            st.just(math.inf),
            st.builds(lambda e, m: m * 10.0**e, st.integers(-320 if dtype == torch.float64 else -45, 30), st.floats(1, 9.9)),
        ),
        label="max_norm",
    )
    _clip_and_step_matches(optimizer_name, dtype, exponents, max_norm, seed)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    optimizer_name=st.sampled_from(sorted(_OPTIMIZERS)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    data=st.data(),
    max_norm_exponent=st.integers(-44, 3),
    seed=st.integers(0, 2**16),
)
def test_clip_and_step_equals_torchs_clip_then_step(optimizer_name, dtype, data, max_norm_exponent, seed):
    """Against torch itself, where torch's norm does not overflow (float32 squares overflow above
    ~1.8e19, float64 ones above ~1.3e154): norms beyond float32's range, tiny max_norm."""
    top = 5 if dtype == torch.float32 else 150
    grad_exponent = data.draw(st.integers(-5, top), label="grad exponent")
    _clip_and_step_matches(optimizer_name, dtype, [grad_exponent] * 2, 10.0**max_norm_exponent, seed, reference="torch")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norm_beyond_float32_range_still_updates(backend, dtype):
    """The case that zeroed the update: 1 / coef above float32's maximum."""
    exponent = 30 if dtype == torch.float32 else 60
    max_norm = 1e-12 if dtype == torch.float32 else 1.0
    _clip_and_step_matches("sgd", dtype, [exponent], max_norm, 0, backend=backend)
    ours = _params_with_grads(dtype, [exponent], 0)
    before = ours[0].detach().clone()
    fusedclip.clip_and_step_(torch.optim.SGD(ours, lr=1.0, fused=True), max_norm, backend=backend)
    moved = float((ours[0].detach() - before).double().norm())
    assert moved == pytest.approx(max_norm, rel=1e-4), "the update has the clipped norm, not zero"


def _naive_fold(coef, calls, dtypes):
    """The deliberately broken version: 1 / coef as float32 grad_scale whatever its size."""
    return coef.reciprocal().to(torch.float32)


def test_the_property_catches_a_grad_scale_that_overflows(monkeypatch):
    cases = [
        dict(optimizer_name="sgd", dtype=torch.float64, grad_exponents=[60], max_norm=1.0, seed=0),
        dict(optimizer_name="adam", dtype=torch.float64, grad_exponents=[60], max_norm=1.0, seed=0, reference="torch"),
        dict(optimizer_name="sgd", dtype=torch.float32, grad_exponents=[39, 39], max_norm=1.0, seed=0),  # norm > 3.4e38
    ]
    for case in cases:  # pass with the real code
        _clip_and_step_matches(**case)
    monkeypatch.setattr(optim, "fold_coefficient", _naive_fold)
    for case in cases:
        with pytest.raises(AssertionError):
            _clip_and_step_matches(**case)


def test_carried_coefficients_take_no_scale_pass_writes(monkeypatch):
    """In the usual case the scale pass gets factor 1 (a no-op for the kernels) and grad_scale 1 / coef."""
    seen = []
    real = fusedclip.ops.scale_
    monkeypatch.setattr(fusedclip.ops, "scale_", lambda call, coef: seen.append(coef.clone()) or real(call, coef))
    params = _params_with_grads(torch.float32, [0, 1], 3)
    opt = torch.optim.SGD(params, lr=0.1, fused=True)
    grad_scales = []
    real_step = opt.step
    monkeypatch.setattr(opt, "step", lambda *a, **k: grad_scales.append(opt.grad_scale.clone()) or real_step(*a, **k))
    total = fusedclip.clip_and_step_(opt, 0.5)
    assert [float(c) for c in seen] == [1.0]
    assert grad_scales[0].dtype == torch.float32
    assert float(grad_scales[0]) == pytest.approx(float(total) / 0.5, rel=1e-6)


def test_amp_scaler_with_float64_grads_beyond_float32_range():
    """clip_and_step_ with a GradScaler: huge float64 grads clip like unscale_ + clip_grad_norm_ + step."""
    ours = _params_with_grads(torch.float64, [150, 152], 4)
    theirs, grads = _twins(ours)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**16) for _ in range(2)]
    for s in scalers:
        s.scale(torch.ones(()))  # initialise the scale as a backward would
    for p, g in zip(ours, grads):
        p.grad = g * 2.0**16
    for p, g in zip(theirs, grads):
        p.grad = g * 2.0**16
    opt_ours = torch.optim.AdamW(ours, lr=1e-2, fused=True)
    opt_theirs = torch.optim.AdamW(theirs, lr=1e-2, fused=True)
    total = fusedclip.clip_and_step_(opt_ours, 1.0, scaler=scalers[0])
    scalers[1].unscale_(opt_theirs)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    scalers[1].step(opt_theirs)
    for s in scalers:
        s.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**16
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
        assert not torch.equal(a.detach(), b.detach().new_zeros(b.shape))
