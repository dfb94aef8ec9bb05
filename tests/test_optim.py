"""clip_and_step_: clipping folded into torch's fused optimizer step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
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


def _naive_fold(coef, call, dtypes, foldable=True):
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


# -- grads that share memory, have gaps, or are laid out unlike their parameters -------------------
#
# The optimizer applies a folded coefficient to each grad as it reads it and writes the grad back as
# one flat run of memory: grads listed twice or overlapping would be scaled once per parameter
# instead of once per grad (torch's sequential semantics), and a grad with gaps (``buf[::2]``) would
# be read and written past its own elements. Such grads must take the scale pass, then a plain step.

_BUFFER_ELEMENTS = 40
_LAYOUT_KINDS = ("dense", "strided", "padded", "transposed", "expanded")
_LAYOUT_OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.5, fused=True),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, fused=True),
    "sgd-unfused": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
    "adam-unfused": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-unfused": lambda p: torch.optim.AdamW(p, lr=1e-2),
}


@st.composite
def _grad_layouts(draw):
    """Grads as views into a few shared buffers: (number of buffers, one entry per parameter)."""
    buffers = draw(st.integers(1, 3), label="buffers")
    entries = []
    for _ in range(draw(st.integers(1, 4), label="grads")):
        kinds = _LAYOUT_KINDS + (("shared",) if entries else ())
        kind = draw(st.sampled_from(kinds))
        if kind == "shared":  # the same grad tensor under a second parameter
            entries.append(("shared", draw(st.integers(0, len(entries) - 1))))
            continue
        rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 4))
        if kind == "dense":
            stride = (cols, 1)
        elif kind == "strided":  # x[:, ::step]
            step = draw(st.integers(2, 3))
            stride = (cols * step, step)
        elif kind == "padded":  # rows with a gap between them
            stride = (cols + draw(st.integers(1, 2)), 1)
        elif kind == "transposed":  # dense, permuted
            stride = (1, rows)
        else:  # expanded: rows share memory; refused like torch refuses to write it
            rows = max(rows, 2)
            stride = (0, 1)
        extent = 1 + sum((size - 1) * step for size, step in zip((rows, cols), stride))
        offset = draw(st.integers(0, _BUFFER_ELEMENTS - extent))
        param_like_grad = draw(st.booleans())  # a dense grad's parameter gets the grad's strides
        entries.append((kind, draw(st.integers(0, buffers - 1)), (rows, cols), stride, offset, param_like_grad))
    return buffers, entries


def _layout_world(layouts, dtype, seed, grad_scale=1.0):
    """Buffers, and parameters whose grads are views into them, built the same way every time."""
    count, entries = layouts
    gen = torch.Generator().manual_seed(seed)
    buffers = [(torch.randn(_BUFFER_ELEMENTS, generator=gen, dtype=torch.float64) * grad_scale).to(dtype) for _ in range(count)]
    covered = [torch.zeros(_BUFFER_ELEMENTS, dtype=torch.bool) for _ in range(count)]
    params, grads = [], []
    for entry in entries:
        if entry[0] == "shared":
            grad = grads[entry[1]]
            like_grad = False
        else:
            _, index, size, stride, offset, like_grad = entry
            grad = buffers[index].as_strided(size, stride, offset)
            covered[index].as_strided(size, stride, offset).fill_(True)
        values = torch.randn(grad.shape, generator=gen, dtype=torch.float64).to(dtype)
        if like_grad and fusedclip.plan.is_dense(grad):
            data = torch.empty_strided(grad.shape, grad.stride(), dtype=dtype).copy_(values)
        else:
            data = values
        param = torch.nn.Parameter(data)
        param.grad = grad
        params.append(param)
        grads.append(grad)
    return buffers, covered, params


def _refill(buffers, seed, grad_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    for buffer in buffers:
        buffer.copy_(torch.randn(buffer.shape, generator=gen, dtype=torch.float64) * grad_scale)


def _optimizer_state(optimizer):
    return [
        {key: (value.clone() if isinstance(value, torch.Tensor) else value) for key, value in optimizer.state[p].items()}
        for group in optimizer.param_groups
        for p in group["params"]
    ]


def _assert_close_state(ours, theirs, **tolerance):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                torch.testing.assert_close(a[key], b[key], **tolerance)
            else:
                assert a[key] == b[key]


def _outcome(fn):
    try:
        return fn(), None
    except (RuntimeError, ValueError) as error:
        return None, error


def _check_layout_step(layouts, optimizer_name, dtype, max_norm, backend, seed, with_scaler=False):
    """clip_and_step_ on one copy, the clip_grad_norm_ recipe then step() on another: the same
    outcome (or the same refusal with nothing changed), the same buffers (so the same clipped
    grads), parameters and optimizer state, and every buffer element outside the grads untouched."""
    amp_scale = 2.0**8 if with_scaler else 1.0
    ours, theirs = _layout_world(layouts, dtype, seed, amp_scale), _layout_world(layouts, dtype, seed, amp_scale)
    make = _LAYOUT_OPTIMIZERS[optimizer_name]
    opt_ours, opt_theirs = make(ours[2]), make(theirs[2])
    scalers = [torch.amp.GradScaler("cpu", init_scale=amp_scale, growth_interval=1000) for _ in range(2)] if with_scaler else None
    if scalers:
        for scaler in scalers:
            scaler.scale(torch.ones(()))  # the scale a backward would have set up
    for step in range(2):
        if step:
            _refill(ours[0], seed + step, amp_scale)
            _refill(theirs[0], seed + step, amp_scale)
        before = [buffer.clone() for buffer in ours[0]]
        params_before = [p.detach().clone() for p in ours[2]]
        state_before = _optimizer_state(opt_ours)

        def our_step():
            total = fusedclip.clip_and_step_(opt_ours, max_norm, backend=backend, scaler=scalers[0] if scalers else None)
            if scalers:
                scalers[0].update()
            return total

        def their_step():
            if scalers:
                total = fusedclip.unscale_and_clip_(scalers[1], opt_theirs, max_norm, backend=backend)
                scalers[1].step(opt_theirs)
                scalers[1].update()
                return total
            total = fusedclip.clip_grad_norm_(theirs[2], max_norm, backend=backend)
            opt_theirs.step()
            return total

        total, error = _outcome(our_step)
        assert not hasattr(opt_ours, "grad_scale")
        unfused = optimizer_name.endswith("-unfused")
        if error is not None:  # refused: nothing at all has changed
            if not unfused:
                _, expected_error = _outcome(their_step)
                assert expected_error is not None and type(expected_error) is type(error), (error, expected_error)
            else:
                assert isinstance(error, ValueError) and "fused=True" in str(error)
            for buffer, old in zip(ours[0], before):
                assert torch.equal(buffer, old)
            for p, old in zip(ours[2], params_before):
                assert torch.equal(p.detach(), old)
            _assert_close_state(_optimizer_state(opt_ours), state_before, rtol=0, atol=0)
            return
        assert not unfused, "clip_and_step_ takes only fused optimizers"
        expected = their_step()
        torch.testing.assert_close(total, expected, rtol=0, atol=0, equal_nan=True)
        for buffer, old, mask, reference in zip(ours[0], before, ours[1], theirs[0]):
            assert torch.equal(buffer[~mask], old[~mask]), "memory outside every grad was written"
            torch.testing.assert_close(buffer, reference, rtol=1e-5, atol=1e-6 * amp_scale)
        for a, b in zip(ours[2], theirs[2]):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
        _assert_close_state(_optimizer_state(opt_ours), _optimizer_state(opt_theirs), rtol=1e-5, atol=1e-6)
        if scalers:
            assert scalers[0].get_scale() == scalers[1].get_scale()


_LAYOUT_BACKENDS = [name for name, ok in fusedclip.available_backends("cpu").items() if ok is True and name in ("cpu", "torch")]

_layout_cases = dict(
    layouts=_grad_layouts(),
    optimizer_name=st.sampled_from(sorted(_LAYOUT_OPTIMIZERS)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    max_norm=st.one_of(st.sampled_from([0.0, 1e-3, 0.5, 2.0, 1e6]), st.floats(0.01, 10.0)),
    backend=st.sampled_from(_LAYOUT_BACKENDS),
    seed=st.integers(0, 2**16),
    with_scaler=st.booleans(),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_layout_cases)
def test_clip_and_step_equals_clip_then_step_for_every_grad_layout(layouts, optimizer_name, dtype, max_norm, backend, seed, with_scaler):
    """Shared grads, overlapping views, gaps, transposes, expand (refused), fused and unfused
    optimizers, with and without a GradScaler: clip_and_step_ does what the clip_grad_norm_ recipe
    then step() does, and writes no memory outside the grads."""
    _check_layout_step(layouts, optimizer_name, dtype, max_norm, backend, seed, with_scaler)


# the cases of the reports this property was written for, checked on every run
_SHARED = (1, [("dense", 0, (1, 4), (4, 1), 0, False), ("shared", 0)])
_OVERLAPPING = (1, [("dense", 0, (1, 4), (4, 1), 0, False), ("dense", 0, (1, 4), (4, 1), 2, False)])
_GAPS = (1, [("strided", 0, (1, 4), (8, 2), 0, False)])


@pytest.mark.parametrize("layouts", [_SHARED, _OVERLAPPING, _GAPS], ids=["shared", "overlapping", "gaps"])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("backend", _LAYOUT_BACKENDS)
def test_shared_and_gapped_grads_match_clip_then_step(layouts, optimizer_name, backend):
    _check_layout_step(layouts, optimizer_name, torch.float32, 1.0, backend, 0)


def test_dense_grads_laid_out_like_their_parameters_are_still_folded(monkeypatch):
    """The guard costs nothing where folding is safe: disjoint dense grads (a transposed one under a
    parameter with the same strides) are scaled by the optimizer, not by a separate pass."""
    layouts = (1, [("dense", 0, (2, 4), (4, 1), 0, False), ("transposed", 0, (3, 2), (1, 3), 10, True)])
    seen = []
    real = fusedclip.ops.scale_
    monkeypatch.setattr(fusedclip.ops, "scale_", lambda call, coef: seen.append(float(coef)) or real(call, coef))
    _, _, params = _layout_world(layouts, torch.float32, 0)
    total = fusedclip.clip_and_step_(torch.optim.SGD(params, lr=0.1, fused=True), 0.5)
    assert float(total) > 0.5 and seen == [1.0]  # the scale pass ran with factor 1: nothing written


def _always(value):
    return lambda *args, **kwargs: value


@pytest.mark.parametrize(
    "planted",
    [
        pytest.param({"grads_foldable": _always(True)}, id="always-fold"),
        pytest.param({"_grads_share_memory": _always(False)}, id="ignore-shared-memory"),
        pytest.param({"_laid_out_like": _always(True)}, id="ignore-layout"),
    ],
)
def test_the_layout_property_catches_a_fold_that_ignores_aliasing_or_gaps(monkeypatch, planted):
    """With a guard that folds where it must not, the property finds a counterexample."""
    for name, replacement in planted.items():
        monkeypatch.setattr(optim, name, replacement)

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # the first counterexample is enough
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(**_layout_cases)
    def prop(layouts, optimizer_name, dtype, max_norm, backend, seed, with_scaler):
        _check_layout_step(layouts, optimizer_name, dtype, max_norm, backend, seed, with_scaler)

    with pytest.raises(AssertionError):
        prop()


@pytest.mark.parametrize("layouts", [_SHARED, _OVERLAPPING, _GAPS], ids=["shared", "overlapping", "gaps"])
def test_compiled_clip_and_step_with_shared_and_gapped_grads(layouts):
    """Under torch.compile the layouts are judged while tracing and shared memory when the step
    runs: the same update as eager clip-then-step, and nothing outside the grads written."""
    torch._dynamo.reset()
    ours, theirs = _layout_world(layouts, torch.float32, 0), _layout_world(layouts, torch.float32, 0)
    opt_ours = torch.optim.SGD(ours[2], lr=0.5, momentum=0.9, fused=True)
    opt_theirs = torch.optim.SGD(theirs[2], lr=0.5, momentum=0.9, fused=True)
    before = [buffer.clone() for buffer in ours[0]]
    total = torch.compile(lambda: fusedclip.clip_and_step_(opt_ours, 1.0), backend="aot_eager")()
    expected = fusedclip.clip_grad_norm_(theirs[2], 1.0)
    opt_theirs.step()
    torch.testing.assert_close(total, expected, rtol=0, atol=0)
    for buffer, old, mask, reference in zip(ours[0], before, ours[1], theirs[0]):
        assert torch.equal(buffer[~mask], old[~mask])
        torch.testing.assert_close(buffer, reference, rtol=1e-6, atol=0)
    for a, b in zip(ours[2], theirs[2]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=0)
