"""unscale_and_clip_ against torch's recipe (unscale_ then clip_grad_norm_) with a CPU GradScaler."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedclip
from fusedclip import amp

INF_STEPS = {3, 7}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def _run(recipe, autocast_dtype, max_norm, steps=10, backend=None):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    gen = torch.Generator().manual_seed(1)
    norms, scales = [], []
    for step in range(steps):
        x = torch.randn(8, 16, generator=gen)
        y = torch.randn(8, 4, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast_dtype):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        if step in INF_STEPS:  # an overflow: the step must be skipped and the scale backed off
            next(model.parameters()).grad.view(-1)[3] = float("inf")
        if recipe == "torch":
            scaler.unscale_(optimizer)
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        else:
            norms.append(fusedclip.unscale_and_clip_(scaler, optimizer, max_norm, backend=backend))
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, norms, scales


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_unclipped_run_is_bit_identical_to_torchs_recipe(device_backend, autocast_dtype):
    device, backend = device_backend
    if device != "cpu":
        pytest.skip("GradScaler('cpu') test")
    ours, our_norms, our_scales = _run("fused", autocast_dtype, max_norm=1e9, backend=backend)
    theirs, their_norms, their_scales = _run("torch", autocast_dtype, max_norm=1e9)
    assert our_scales == their_scales
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b), "with power-of-two scales and no clipping, the same bits"
    for step, (a, b) in enumerate(zip(our_norms, their_norms)):
        if step in INF_STEPS:
            assert not torch.isfinite(a) and not torch.isfinite(b)
        else:
            torch.testing.assert_close(a, b, rtol=2e-6, atol=0)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_clipped_run_matches_torchs_recipe(device_backend, autocast_dtype):
    device, backend = device_backend
    if device != "cpu":
        pytest.skip("GradScaler('cpu') test")
    ours, our_norms, our_scales = _run("fused", autocast_dtype, max_norm=0.05, backend=backend)
    theirs, their_norms, their_scales = _run("torch", autocast_dtype, max_norm=0.05)
    assert our_scales == their_scales, "skipped steps and scale updates must be identical"
    for a, b in zip(ours.parameters(), theirs.parameters()):
        # the clip coefficient is rounded once instead of twice: a few fp32 ulps at most
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_disabled_scaler_just_clips():
    model = _model()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 16)
    for m in (model, twin):
        m(x).sum().backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ours = fusedclip.unscale_and_clip_(scaler, optimizer, 0.1)
    theirs = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
    torch.testing.assert_close(ours, theirs)


def test_misuse_raises_like_unscale_():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(2, 16)).sum()).backward()
    fusedclip.unscale_and_clip_(scaler, optimizer, 1.0)

    def snapshot():
        state = scaler._per_optimizer_states[id(optimizer)]
        return (
            [(p.detach().clone(), p.grad.clone()) for p in model.parameters()],
            state["stage"],
            {device: flag.clone() for device, flag in state["found_inf_per_device"].items()},
            scaler._scale.clone(),
            scaler._growth_tracker.clone(),
            copy.deepcopy(optimizer.state_dict()),
        )

    def assert_unchanged(before):
        tensors, stage, found_inf, scale, growth, optimizer_state = before
        for p, (data, grad) in zip(model.parameters(), tensors):  # bit for bit
            assert torch.equal(p.detach().view(torch.int32), data.view(torch.int32))
            assert torch.equal(p.grad.view(torch.int32), grad.view(torch.int32))
        state = scaler._per_optimizer_states[id(optimizer)]
        assert state["stage"] is stage
        assert state["found_inf_per_device"].keys() == found_inf.keys()
        assert all(torch.equal(state["found_inf_per_device"][d], f) for d, f in found_inf.items())
        assert torch.equal(scaler._scale, scale) and torch.equal(scaler._growth_tracker, growth)
        assert repr(optimizer.state_dict()) == repr(optimizer_state)

    before = snapshot()
    with pytest.raises(RuntimeError, match="already been called"):
        fusedclip.unscale_and_clip_(scaler, optimizer, 1.0)
    assert_unchanged(before)
    scaler.step(optimizer)
    before = snapshot()
    with pytest.raises(RuntimeError, match="after step"):
        fusedclip.unscale_and_clip_(scaler, optimizer, 1.0)
    assert_unchanged(before)
    scaler.update()


def test_fp16_grads_are_refused_like_torch():
    model = _model().half()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(2, 16).half()).float().sum()).backward()
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        fusedclip.unscale_and_clip_(scaler, optimizer, 1.0)
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)


def test_a_scale_below_one_still_unscales():
    """With grad_scale folded in, the coefficient can exceed 1: the scale pass must still run."""
    model = _model()
    twin = copy.deepcopy(model)
    opt, opt2 = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin))
    scalers = [torch.amp.GradScaler("cpu", init_scale=0.25) for _ in range(2)]
    for m, s in zip((model, twin), scalers):
        s.scale(m(torch.ones(2, 16)).sum()).backward()
    fusedclip.unscale_and_clip_(scalers[0], opt, 1e9)
    scalers[1].unscale_(opt2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)


# -- found_inf from the values, norms that overflow only while scaled ----------------------------


def _scaled_params(dtypes, exponents, scale, seed, poison=None):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for dtype, exponent in zip(dtypes, exponents):
        p = torch.nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64).to(dtype))
        big = torch.finfo(dtype).max
        p.grad = (torch.randn(6, generator=gen, dtype=torch.float64) * 10.0**exponent * scale).clamp(-big, big).to(dtype)
        params.append(p)
    if poison is not None:
        params[0].grad.view(-1)[0] = poison
    return params


def _unscale_and_clip_matches(dtypes, exponents, log2_scale, max_norm, norm_type, seed, *, poison=None, reference="torch", backend="cpu"):
    """unscale_and_clip_ + step against scaler.unscale_ + clip_grad_norm_ + step on identical copies.

    ``reference``: "torch" (torch's clip_grad_norm_) or "fusedclip" (fusedclip's, same backend).
    Checks the returned norm, the grads, whether the step was skipped (the new scale) and the parameters.
    """
    scale = 2.0**log2_scale
    ours = _scaled_params(dtypes, exponents, scale, seed, poison)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        b.grad = a.grad.clone()
    opts = [torch.optim.SGD(ps, lr=0.5, momentum=0.5) for ps in (ours, theirs)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1) for _ in range(2)]
    for s in scalers:
        s.scale(torch.ones(()))  # initialise the scale tensor as a backward pass would
    total = fusedclip.unscale_and_clip_(scalers[0], opts[0], max_norm, norm_type, backend=backend)
    scalers[1].unscale_(opts[1])
    clip = torch.nn.utils.clip_grad_norm_ if reference == "torch" else lambda *a: fusedclip.clip_grad_norm_(*a, backend=backend)
    expected = clip(theirs, max_norm, norm_type)
    for s, o in zip(scalers, opts):
        s.step(o)
        s.update()
    wide = all(d == torch.float64 for d in dtypes)
    rtol = 1e-12 if wide else 2e-6
    assert scalers[0].get_scale() == scalers[1].get_scale(), "found_inf differs: one step was skipped, the other not"
    torch.testing.assert_close(total, expected, rtol=rtol, atol=0, equal_nan=True)
    for a, b in zip(ours, theirs):
        tiny = torch.finfo(a.dtype).tiny
        torch.testing.assert_close(a.grad, b.grad, rtol=max(rtol, 2e-6), atol=tiny * 64, equal_nan=True)
        torch.testing.assert_close(a.detach(), b.detach(), rtol=max(rtol, 2e-6), atol=1e-7, equal_nan=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    log2_scale=st.integers(0, 30),
    max_norm=st.sampled_from([1e-3, 1.0, 1e200, math.inf]),
    norm_type=st.sampled_from([2.0, 1.0, 3.0, 8.0, math.inf]),
    poison=st.sampled_from([None, None, None, math.inf, -math.inf, math.nan]),
    seed=st.integers(0, 2**16),
)
def test_float64_grads_match_torchs_recipe_at_any_magnitude(data, log2_scale, max_norm, norm_type, poison, seed):
    """float64 grads up to 1e160 (squares of the scaled grads overflow float64 long before torch's
    unscaled ones do): the same skip decision, norm, grads and parameters as torch's recipe."""
    exponents = data.draw(st.lists(st.integers(-20, 160), min_size=1, max_size=3), label="exponents")
    dtypes = [torch.float64] * len(exponents)
    unscaled = [p.grad / 2.0**log2_scale for p in _scaled_params(dtypes, exponents, 2.0**log2_scale, seed)]
    # where torch's own sum of |x|^p overflows, fusedclip's norm may still be exact: compare with
    # torch's unscale_ followed by fusedclip's clip_grad_norm_ there
    exact_in_torch = poison is not None or bool(torch.isfinite(torch.nn.utils.get_total_norm(unscaled, norm_type)))
    _unscale_and_clip_matches(
        dtypes, exponents, log2_scale, max_norm, norm_type, seed, poison=poison, reference="torch" if exact_in_torch else "fusedclip"
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    log2_scale=st.integers(0, 24),
    norm_type=st.sampled_from([2.0, 4.0, 8.0, 30.0, 0.0, -2.0, -math.inf]),
    poison=st.sampled_from([None, None, math.inf, math.nan]),
    seed=st.integers(0, 2**16),
)
def test_mixed_dtypes_and_norm_orders_match_the_unscale_then_clip_recipe(data, log2_scale, norm_type, poison, seed):
    """Any dtype mix and order: the same as torch's unscale_ followed by fusedclip.clip_grad_norm_
    (torch's own norm overflows float32 sums where fusedclip's does not)."""
    dtypes = data.draw(st.lists(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), min_size=1, max_size=3))
    exponents = data.draw(st.lists(st.integers(-3, 30), min_size=len(dtypes), max_size=len(dtypes)))
    _unscale_and_clip_matches(dtypes, exponents, log2_scale, 0.5, norm_type, seed, poison=poison, reference="fusedclip")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_huge_float64_grads_are_not_reported_as_inf(backend):
    """Scaled float64 grads above ~1e154: no overflow in torch's unscale_, so no skipped step."""
    _unscale_and_clip_matches([torch.float64], [150], 16, 1.0, 2.0, 0, backend=backend)
    _unscale_and_clip_matches([torch.float32, torch.float64], [3, 150], 16, 1.0, 2.0, 0, backend=backend)


def _accumulator_only(norm, dtypes):
    """The deliberately broken rule: trust the accumulator of the scaled grads whatever the dtypes."""
    return norm.kind is amp.NormKind.MAX or (norm.kind is amp.NormKind.SUM_POW and 0 < norm.p <= 4)


def test_the_comparison_catches_found_inf_from_an_overflowing_accumulator(monkeypatch):
    case = dict(dtypes=[torch.float64], exponents=[150], log2_scale=16, max_norm=1.0, norm_type=2.0, seed=0)
    _unscale_and_clip_matches(**case)
    monkeypatch.setattr(amp, "_nonfinite_from_accumulator", _accumulator_only)
    monkeypatch.setattr(amp, "_scaled_sum_may_overflow", lambda norm, dtypes: False)
    with pytest.raises(AssertionError, match="found_inf differs"):
        _unscale_and_clip_matches(**case)


def test_the_comparison_catches_a_norm_of_the_overflowing_scaled_grads(monkeypatch):
    """found_inf right but the norm taken over the scaled grads: clipped to zero instead of to max_norm."""
    case = dict(dtypes=[torch.float64], exponents=[150], log2_scale=16, max_norm=1.0, norm_type=2.0, seed=0)
    monkeypatch.setattr(amp, "_scaled_sum_may_overflow", lambda norm, dtypes: False)
    with pytest.raises(AssertionError):
        _unscale_and_clip_matches(**case)


def test_bad_input_leaves_grads_and_scaler_alone():
    params = _scaled_params([torch.float64], [150], 2.0**16, 0)
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(torch.ones(()))
    before = [p.grad.clone() for p in params]
    state_before = dict(scaler._per_optimizer_states[id(opt)])
    for bad in (-1.0, math.nan, "1"):
        with pytest.raises((ValueError, TypeError)):
            fusedclip.unscale_and_clip_(scaler, opt, bad)
    with pytest.raises(ValueError):
        fusedclip.unscale_and_clip_(scaler, opt, 1.0, norm_type="fro")
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)
    assert scaler._per_optimizer_states[id(opt)] == state_before
