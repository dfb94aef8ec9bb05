"""Clipper modes against straightforward references written here, checkpoints, statistics."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedclip
from fusedclip import Clipper, adaptive

from conftest import syncs_raise

SPIKES = {9: 40.0, 14: 25.0}  # steps whose grads are blown up (what adaptive modes must catch)
INF_STEP = 17


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(6, 10))
    model.add_module("act", torch.nn.Tanh())
    model.add_module("head", torch.nn.Linear(10, 3))
    return model.to(dtype)


def _set_grads(model, step, seed=0, inject_inf=False):
    gen = torch.Generator().manual_seed(1000 * seed + step)
    scale = SPIKES.get(step, 1.0)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)
    if inject_inf and step == INF_STEP:
        model.body.weight.grad[0, 0] = math.inf


def _norm64(grads):
    return float(torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads])))


# -- references ------------------------------------------------------------------------------


def _ref_autoclip(history, total, percentile):
    if math.isfinite(total):
        history.append(total)
    if not history:
        return math.inf
    return float(torch.quantile(torch.tensor(history, dtype=torch.float64), percentile / 100))


class _RefZClip:
    def __init__(self, alpha, z, warmup, max_norm):
        self.alpha, self.z, self.warmup, self.max_norm = alpha, z, warmup, max_norm
        self.seen, self.mean, self.var, self.step = [], 0.0, 0.0, 0

    def threshold(self, total):
        """The warm-up is the first ``warmup`` finite norms; non-finite norms change nothing."""
        if len(self.seen) < self.warmup:
            if math.isfinite(total):
                self.seen.append(total)
                if len(self.seen) == self.warmup:
                    self.mean = sum(self.seen) / len(self.seen)
                    self.var = sum((x - self.mean) ** 2 for x in self.seen) / len(self.seen)
            return self.max_norm
        std = math.sqrt(self.var)
        z = (total - self.mean) / (std + 1e-6)
        threshold = self.mean + self.z**2 / z * std if z > self.z else math.inf
        if math.isfinite(total):
            clipped = min(total, threshold)
            new_mean = self.alpha * self.mean + (1 - self.alpha) * clipped
            self.var = self.alpha * self.var + (1 - self.alpha) * (clipped - new_mean) ** 2
            self.mean = new_mean
        return threshold


def _ref_coef(total, threshold):
    if math.isinf(total) and total > 0:
        return 0.0
    return min(threshold / (total + 1e-6), 1.0)


# -- the modes -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["autoclip", "zclip"])
def test_adaptive_thresholds_match_the_reference(device_backend, mode):
    device, backend = device_backend
    model = _model().to(device)
    clipper = Clipper(model.named_parameters(), mode, percentile=25, warmup_steps=5, max_norm=100.0, backend=backend)
    history, zref = [], _RefZClip(0.97, 2.5, 5, 100.0)
    clipped_steps = 0
    for step in range(20):
        _set_grads(model, step, inject_inf=True)
        before = [p.grad.detach().double().cpu().clone() for p in model.parameters()]
        total = _norm64(before)
        threshold = _ref_autoclip(history, total, 25) if mode == "autoclip" else zref.threshold(total)
        coef = _ref_coef(total, threshold)
        clipped_steps += coef < 1
        returned = clipper()
        if math.isfinite(total):
            assert float(returned) == pytest.approx(total, rel=1e-6)
        for p, b in zip(model.parameters(), before):
            torch.testing.assert_close(p.grad.double().cpu(), b * coef, rtol=1e-6, atol=1e-12, equal_nan=True)
    summary = clipper.summary()
    assert summary["nonfinite_steps"] == 1
    assert summary["clipped_fraction"] == pytest.approx(clipped_steps / 20)
    if mode == "zclip":
        assert 0 < summary["clipped_fraction"] < 0.5, "ZClip should catch the spikes only"


def test_norm_mode_equals_clip_grad_norm_(device_backend):
    device, backend = device_backend
    model, twin = _model().to(device), _model().to(device)
    clipper = Clipper(model.named_parameters(), "norm", max_norm=2.0, backend=backend)
    for step in range(6):
        _set_grads(model, step)
        _set_grads(twin, step)
        ours = clipper()
        theirs = fusedclip.clip_grad_norm_(twin.parameters(), 2.0, backend=backend)
        assert torch.equal(ours, theirs)
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a.grad, b.grad)


def test_agc_matches_the_unit_wise_reference(device_backend):
    device, backend = device_backend
    model = _model().to(device)
    clipper = Clipper(model.named_parameters(), "agc", agc_clipping=0.05, backend=backend)
    for step in range(4):
        _set_grads(model, step)
        expected = {}
        for name, p in model.named_parameters():
            g, w = p.grad.double().cpu(), p.detach().double().cpu()
            if "head" in name:
                expected[name] = g.clone()
                continue
            rows = g.reshape(g.shape[0], -1) if g.dim() > 1 else g.reshape(1, -1)
            wrows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
            out = rows.clone()
            for r in range(rows.shape[0]):
                limit = max(float(wrows[r].norm()), 1e-3) * 0.05
                norm = float(rows[r].norm())
                if norm > limit:
                    out[r] = rows[r] * (limit / max(norm, 1e-6))
            expected[name] = out.reshape(g.shape)
        clipper()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad.double().cpu(), expected[name], rtol=1e-5, atol=1e-7)
    assert any("head" in name for name, _ in clipper.summary()["top_params"]), "head is excluded but still reported"


@pytest.mark.parametrize("mode", ["norm", "autoclip", "zclip", "agc"])
def test_state_dict_round_trip_continues_identically(device_backend, mode):
    device, backend = device_backend
    straight_model, resumed_model = _model().to(device), _model().to(device)
    straight = Clipper(straight_model.named_parameters(), mode, warmup_steps=4, history_size=8, backend=backend)
    first = Clipper(resumed_model.named_parameters(), mode, warmup_steps=4, history_size=8, backend=backend)
    for step in range(7):
        _set_grads(straight_model, step)
        _set_grads(resumed_model, step)
        straight()
        first()
    saved = first.state_dict()
    resumed = Clipper(resumed_model.named_parameters(), mode, warmup_steps=4, history_size=8, backend=backend)
    resumed.load_state_dict(saved)
    for step in range(7, 16):  # beyond the history size: the ring buffer wraps
        _set_grads(straight_model, step)
        _set_grads(resumed_model, step)
        a, b = straight(), resumed()
        assert torch.equal(a, b)
        for x, y in zip(straight_model.parameters(), resumed_model.parameters()):
            assert torch.equal(x.grad, y.grad)
    assert straight.summary() == resumed.summary()


def test_load_state_dict_rejects_another_mode():
    model = _model()
    with pytest.raises(ValueError, match="mode"):
        Clipper(model.parameters(), "zclip").load_state_dict(Clipper(model.parameters(), "autoclip").state_dict())


def test_summary_reports_top_parameters_by_gradient_norm():
    model = _model()
    clipper = Clipper(model.named_parameters(), "norm", max_norm=1e9, top_k=2)
    _set_grads(model, 0)
    model.head.bias.grad.mul_(1000)
    clipper()
    top = clipper.summary()["top_params"]
    assert top[0][0] == "head.bias"
    norms = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
    second = sorted(norms, key=norms.get, reverse=True)[1]
    assert top[1][0] == second and top[0][1] == pytest.approx(norms["head.bias"], rel=1e-6)


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="unknown Clipper mode"):
        Clipper(model.parameters(), "median")
    with pytest.raises(ValueError, match="percentile"):
        Clipper(model.parameters(), "autoclip", percentile=120)
    with pytest.raises(TypeError):
        Clipper([1, 2], "norm")


def test_get_norms_gives_total_and_per_tensor(device_backend):
    device, backend = device_backend
    tensors = [torch.randn(s, device=device) for s in [(5,), (3, 4), (0,), (7,)]]
    total, per_tensor = fusedclip.get_norms(tensors, backend=backend)
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm([t for t in tensors if t.numel()]))
    expected = torch.stack([torch.linalg.vector_norm(t) if t.numel() else torch.tensor(0.0, device=device) for t in tensors])
    torch.testing.assert_close(per_tensor, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["norm", "autoclip", "zclip", "agc"])
def test_no_mode_synchronises(mode):
    model = _model().cuda()
    clipper = Clipper(model.named_parameters(), mode, warmup_steps=2)
    for step in range(4):  # the first calls may build plans (host-to-device copies of tables)
        _set_grads(model, step)
        with syncs_raise(step >= 2):
            clipper()


# -- non-finite norms never enter the statistics ----------------------------------------------


_NORMS = st.one_of(
    st.floats(1e-3, 1e3),
    st.floats(1e3, 1e8),  # spikes
    st.sampled_from([math.inf, -math.inf, math.nan]),  # the grad's value; its norm is inf or NaN
)


class _RefStatistics:
    """Every statistic, computed over the finite norms only (non-finite steps skipped entirely)."""

    def __init__(self, mode, *, history_size, warmup_steps, percentile, max_norm, ema_decay, alpha=0.97, z=2.5):
        self.mode, self.history_size, self.percentile, self.ema_decay = mode, history_size, percentile, ema_decay
        self.finite, self.nonfinite, self.ema = [], 0, None
        self.zclip = _RefZClip(alpha, z, warmup_steps, max_norm)

    def step(self, total):
        """The threshold for this norm (None where the mode has no adaptive threshold)."""
        threshold = None
        if self.mode == "autoclip":
            window = (self.finite + [total] if math.isfinite(total) else self.finite)[-self.history_size :]
            threshold = float(torch.tensor(window, dtype=torch.float64).quantile(self.percentile / 100)) if window else math.nan
        elif self.mode == "zclip":
            threshold = self.zclip.threshold(total)
        if math.isfinite(total):
            self.ema = total if self.ema is None else self.ema * self.ema_decay + total * (1 - self.ema_decay)
            self.finite.append(total)
        else:
            self.nonfinite += 1
        return threshold

    def history(self):
        ring = [math.nan] * self.history_size
        for k, x in enumerate(self.finite):
            ring[k % self.history_size] = x
        return torch.tensor(ring, dtype=torch.float64)


def _close(a, b, what):
    if math.isnan(b):
        assert math.isnan(a), f"{what}: {a} != NaN"
    else:
        assert a == pytest.approx(b, rel=1e-9, abs=1e-300), f"{what}: {a} != {b}"


def _check_statistics(mode, values, *, warmup_steps=3, history_size=4, percentile=50.0, max_norm=5.0):
    """Feed one-element grads with these values (norm |value|) and compare every statistic after
    every step with the reference over the finite norms only; raises AssertionError otherwise."""
    param = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    clipper = Clipper(
        [param], mode, warmup_steps=warmup_steps, history_size=history_size, percentile=percentile, max_norm=max_norm, ema_decay=0.9
    )
    ref = _RefStatistics(mode, history_size=history_size, warmup_steps=warmup_steps, percentile=percentile, max_norm=max_norm, ema_decay=0.9)
    for step, value in enumerate(values):
        param.grad = torch.tensor([value], dtype=torch.float64)
        clipper()
        state = clipper.state
        total = float(state["last_norm"])
        threshold = ref.step(total)
        where = f"step {step} of {values}"
        assert int(state["finite_steps"]) == len(ref.finite), where
        assert int(state["nonfinite_steps"]) == ref.nonfinite, where
        if ref.ema is not None:
            _close(float(state["ema_norm"]), ref.ema, f"ema_norm at {where}")
        if mode == "autoclip":
            torch.testing.assert_close(state["history"], ref.history(), rtol=0, atol=0, equal_nan=True, msg=where)
            _close(float(state["threshold"]), threshold, f"threshold at {where}")
        if mode == "zclip":
            _close(float(state["mean"]), ref.zclip.mean, f"mean at {where}")
            _close(float(state["var"]), ref.zclip.var, f"var at {where}")
            _close(float(state["threshold"]), threshold, f"threshold at {where}")
        for key, value in state.items():
            if key not in ("last_norm", "param_norms", "threshold", "history", "warmup"):
                assert torch.isfinite(value).all(), f"{key} is not finite at {where}"
    return clipper


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(["norm", "autoclip", "zclip", "agc"]),
    values=st.lists(_NORMS, min_size=1, max_size=30),
    warmup_steps=st.integers(1, 5),
    history_size=st.integers(1, 6),
    percentile=st.sampled_from([0.0, 10.0, 50.0, 90.0, 100.0]),
)
def test_statistics_equal_those_over_the_finite_norms_only(mode, values, warmup_steps, history_size, percentile):
    _check_statistics(mode, values, warmup_steps=warmup_steps, history_size=history_size, percentile=percentile)


def test_zclip_after_a_warm_up_of_only_non_finite_norms_still_clips_a_spike():
    values = [math.inf, math.nan, math.inf] + [1.0, 1.1, 0.9, 1.0, 1.05, 0.95] + [1000.0]
    param = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    clipper = Clipper([param], "zclip", warmup_steps=3, max_norm=1e9)
    for value in values:
        param.grad = torch.tensor([value], dtype=torch.float64)
        clipper()
    assert float(param.grad.abs()) < 10, "the spike passed unclipped"
    assert clipper.summary()["nonfinite_steps"] == 3


def _zclip_threshold_by_steps(self, total):
    """The deliberately broken version: the warm-up counts steps and averages with nanmean."""
    finite = torch.isfinite(total)
    if self.steps < self.warmup_steps:
        warmup = self.state["warmup"]
        warmup[self.steps] = torch.where(finite, total, torch.full_like(total, math.nan))
        if self.steps == self.warmup_steps - 1:
            mean = torch.nanmean(warmup)
            self.state["mean"].copy_(mean)
            self.state["var"].copy_(torch.nanmean((warmup - mean) ** 2))
        return torch.full_like(total, self.max_norm)
    mean, var = self.state["mean"], self.state["var"]
    std = var.sqrt()
    z = (total - mean) / (std + 1e-6)
    threshold = torch.where(z > self.z_threshold, mean + (self.z_threshold**2 / z) * std, torch.full_like(total, math.inf))
    clipped = torch.minimum(total, threshold)
    new_mean = self.alpha * mean + (1 - self.alpha) * clipped
    new_var = self.alpha * var + (1 - self.alpha) * (clipped - new_mean) ** 2
    mean.copy_(torch.where(finite, new_mean, mean))
    var.copy_(torch.where(finite, new_var, var))
    return threshold


def _autoclip_threshold_by_steps(self, total):
    """The deliberately broken version: a non-finite norm takes a slot of the history."""
    history = self.state["history"]
    history[self.steps % self.history_size] = torch.where(torch.isfinite(total), total, torch.full_like(total, math.nan))
    return torch.nanquantile(history[: min(self.steps + 1, self.history_size)], self.percentile / 100.0)


_REAL_RECORD = Clipper._record


def _record_with_plain_ema(self, total, per_tensor, positions, coef):
    """The deliberately broken version: the EMA takes every norm, inf and NaN included."""
    before = self.state["ema_norm"].clone()
    _REAL_RECORD(self, total, per_tensor, positions, coef)
    self.state["ema_norm"].copy_(total if self.steps == 0 else before * self.ema_decay + total * (1 - self.ema_decay))


@pytest.mark.parametrize(
    "mode, broken, values",
    [
        ("zclip", ("_zclip_threshold", _zclip_threshold_by_steps), [math.inf] * 3 + [1.0, 1.2, 0.8, 500.0]),
        ("autoclip", ("_autoclip_threshold", _autoclip_threshold_by_steps), [1.0, math.inf, math.nan, math.inf, 2.0, 3.0]),
        ("agc", ("_record", _record_with_plain_ema), [1.0, math.inf, 2.0]),
    ],
    ids=["zclip-warmup", "autoclip-history", "ema"],
)
def test_the_property_catches_statistics_poisoned_by_non_finite_norms(monkeypatch, mode, broken, values):
    _check_statistics(mode, values)  # the real code passes
    name, replacement = broken
    monkeypatch.setattr(Clipper, name, replacement)
    with pytest.raises(AssertionError):
        _check_statistics(mode, values)


# -- a single tensor, as clip_grad_norm_ takes it -----------------------------------------------


def _single_tensor_clips_like_torch(shape, max_norm, seed):
    gen = torch.Generator().manual_seed(seed)
    ours = torch.nn.Parameter(torch.randn(shape, generator=gen))
    theirs = torch.nn.Parameter(ours.detach().clone())
    ours.grad = torch.randn(shape, generator=gen) * 10
    theirs.grad = ours.grad.clone()
    total = Clipper(ours, "norm", max_norm=max_norm)()
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    torch.testing.assert_close(total, expected, rtol=2e-6, atol=0)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=2e-6, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
    max_norm=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**16),
)
def test_a_single_tensor_is_clipped_as_clip_grad_norm_clips_it(shape, max_norm, seed):
    _single_tensor_clips_like_torch(shape, max_norm, seed)


@pytest.mark.parametrize("mode", ["norm", "autoclip", "zclip", "agc"])
def test_single_tensor_list_and_named_pairs_are_the_same_clipper(mode):
    results = []
    for wrap in (lambda p: p, lambda p: [p], lambda p: iter([("w", p)]), lambda p: [("w", p)]):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 3))
        clipper = Clipper(wrap(p), mode, warmup_steps=2, max_norm=1.0)
        assert len(clipper.named) == 1
        for step in range(4):
            p.grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(step)) * (1 + 10 * (step == 3))
            clipper()
        results.append((p.grad.clone(), clipper.summary()["last_norm"]))
    for grad, norm in results[1:]:
        assert torch.equal(grad, results[0][0]) and norm == results[0][1]


def _named_by_iterating(parameters):
    """The deliberately broken version: a tensor is iterated (its rows become the 'parameters')."""
    named = [(f"param{i}", item) for i, item in enumerate(parameters)]
    return named


def test_the_comparison_catches_a_tensor_iterated_by_rows(monkeypatch):
    _single_tensor_clips_like_torch((3, 4), 0.5, 0)
    monkeypatch.setattr(adaptive, "_named", _named_by_iterating)
    with pytest.raises(AssertionError):
        _single_tensor_clips_like_torch((3, 4), 0.5, 0)


def test_bad_parameters_are_refused_with_a_message():
    p = torch.nn.Parameter(torch.ones(2))
    for bad in ("weights", {"w": p}, 3, [p, 3], [("w", 3)]):
        with pytest.raises(TypeError):
            Clipper(bad)
    with pytest.raises(ValueError, match="at least one"):
        Clipper([])


# -- result dtypes: one promotion rule ----------------------------------------------------------

_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64, torch.complex128]


def _check_result_dtypes(dtypes, clip):
    """``clip(params)`` returns the total; it must have torch's dtype and value (clip_grad_norm_)."""
    gen = torch.Generator().manual_seed(len(dtypes))
    ours = [torch.nn.Parameter(torch.zeros(3, dtype=d)) for d in dtypes]
    theirs = [torch.nn.Parameter(torch.zeros(3, dtype=d)) for d in dtypes]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(3, generator=gen, dtype=torch.complex128 if a.is_complex() else torch.float64).to(a.dtype)
        b.grad = a.grad.clone()
    total = clip(ours)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1e9)
    assert total.dtype == expected.dtype, f"{dtypes}: {total.dtype} != torch's {expected.dtype}"
    torch.testing.assert_close(total, expected, rtol=1e-2, atol=0)


@settings(max_examples=40, deadline=None)
@given(dtypes=st.lists(st.sampled_from(_DTYPES), min_size=1, max_size=4), mode=st.sampled_from(["norm", "autoclip", "zclip", "agc"]))
def test_clipper_total_has_torchs_real_dtype(dtypes, mode):
    _check_result_dtypes(dtypes, lambda params: Clipper(params, mode, max_norm=1e9, agc_clipping=1e9)())


@settings(max_examples=40, deadline=None)
@given(dtypes=st.lists(st.sampled_from(_DTYPES), min_size=1, max_size=4))
def test_get_norms_per_tensor_dtype_is_the_real_result_dtype_at_least_float32(dtypes):
    tensors = [torch.randn(3, dtype=torch.complex128 if d.is_complex else torch.float64).to(d) for d in dtypes]
    total, per_tensor = fusedclip.get_norms(tensors)
    expected_total = torch.nn.utils.get_total_norm(tensors)
    assert total.dtype == expected_total.dtype
    assert per_tensor.dtype == torch.promote_types(expected_total.dtype, torch.float32)
    for t, norm in zip(tensors, per_tensor.double()):
        wanted = torch.linalg.vector_norm(t.to(torch.complex128 if t.is_complex() else torch.float64))
        wide = t.dtype in (torch.float64, torch.complex128)
        # complex grads send the call to the torch backend, whose bf16 CPU per-tensor norms are
        # torch's own (rounded to bf16, the README's documented exception)
        like_torch = t.dtype == torch.bfloat16 and any(o.is_complex() for o in tensors)
        rtol = 1e-12 if wide else 2.0**-8 if like_torch else 1e-6
        torch.testing.assert_close(norm, wanted, rtol=rtol, atol=0)


def test_the_dtype_check_catches_promotion_over_complex_dtypes():
    dtypes = [torch.complex64, torch.float32]
    _check_result_dtypes(dtypes, lambda params: Clipper(params, max_norm=1e9)())
    raw_promotion = functools.partial(functools.reduce, torch.promote_types)

    def broken(params):  # the deliberately broken rule: promote the grads' own dtypes
        return Clipper(params, max_norm=1e9)().to(raw_promotion([p.grad.dtype for p in params]))

    with pytest.raises(AssertionError, match="complex"):
        _check_result_dtypes(dtypes, broken)


@pytest.mark.parametrize("broken", [False, True])
def test_zclip_keeps_clipping_after_finite_norms_whose_squares_overflow(broken, monkeypatch):
    """float64 grads with max norms ~1e200 (a 2-norm of such grads overflows, as torch's does):
    squared deviations overflow float64, yet the variance stays finite (saturated) and a later spike
    is still clipped; the plain square is shown to fail."""
    if broken:
        monkeypatch.setattr(adaptive, "_saturate", lambda value: value)  # plain squares and sums
    param = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    clipper = Clipper([param], mode="zclip", warmup_steps=3, max_norm=1e300, norm_type=math.inf)
    gen = torch.Generator().manual_seed(0)
    for scale in [1e200, 3e200, 2e200, 9e199, 4e200, 2e200]:  # warm-up, then ordinary steps
        param.grad = torch.rand(4, generator=gen, dtype=torch.float64) * scale
        clipper()
    param.grad = torch.full((4,), 1e210, dtype=torch.float64)  # a spike: z far above the threshold
    clipper()
    spike_norm_after = float(param.grad.abs().max())
    # clipped to a finite threshold near the running norms: neither passed through nor zeroed
    clipped_sensibly = math.isfinite(float(clipper.state["var"])) and 0 < spike_norm_after < 1e205
    assert clipped_sensibly != broken  # an inf variance lets the spike through or zeroes it


# -- per-layout caches stay bounded ---------------------------------------------------------------


def _routed_run(mode, steps, cache_size=None):
    """A Clipper over 24 experts of which a varying half gets grads each step (an MoE-like run);
    returns (Clipper, every call's total and grads, the largest cache sizes seen)."""
    import random

    rng = random.Random(5)
    params = [torch.nn.Parameter(torch.full((3,), float(i + 1))) for i in range(24)]
    clipper = Clipper(params, mode=mode, max_norm=1.5, warmup_steps=3, history_size=5)
    outputs, largest = [], 0
    for step in range(steps):
        routed = rng.sample(range(24), 12) if step % 5 else list(range(12))  # some layouts recur
        for i, p in enumerate(params):
            p.grad = torch.full((3,), 0.3 * (step % 7 + 1) + 0.01 * i) if i in routed else None
        total = clipper()
        outputs.append((total, [None if p.grad is None else p.grad.clone() for p in params]))
        largest = max(largest, len(clipper._index_cache), len(getattr(clipper, "_layouts", {})))
    return clipper, outputs, largest


@pytest.mark.parametrize("mode", ["norm", "zclip", "adagc"])
def test_the_layout_caches_stay_bounded_and_results_do_not_depend_on_them(mode, monkeypatch):
    steps = 3 * adaptive._LAYOUT_CACHE_SIZE
    bounded, outputs, largest = _routed_run(mode, steps)
    assert largest <= adaptive._LAYOUT_CACHE_SIZE
    assert len(bounded._index_cache) == adaptive._LAYOUT_CACHE_SIZE  # full, and no more
    # the same run with caches too large to evict anything: the same totals, grads and state
    monkeypatch.setattr(adaptive, "_LAYOUT_CACHE_SIZE", 10 * steps)
    unbounded, reference, largest_unbounded = _routed_run(mode, steps)
    assert largest_unbounded > 2 * steps // 3  # (it would have grown: one entry per new layout)
    for (total, grads), (ref_total, ref_grads) in zip(outputs, reference):
        assert torch.equal(total, ref_total)
        assert all((g is None and r is None) or torch.equal(g, r) for g, r in zip(grads, ref_grads))
    for key, value in unbounded.state.items():
        assert torch.equal(bounded.state[key].nan_to_num(-1.0), value.nan_to_num(-1.0)), key


def test_the_bound_check_catches_an_unbounded_cache(monkeypatch):
    """The deliberately broken cache: entries added and never dropped."""

    def unbounded(cache, key, build):
        if key not in cache:
            cache[key] = build()
        return cache[key]

    monkeypatch.setattr(adaptive, "_cached", unbounded)
    _, _, largest = _routed_run("norm", 3 * adaptive._LAYOUT_CACHE_SIZE)
    assert largest > adaptive._LAYOUT_CACHE_SIZE


def _general_p_run(backend: str, mode: str, p: float) -> list[tuple[float, float]]:
    """Six steps of a Clipper of ``mode`` with norm order ``p`` on growing grads: (total, a clipped
    element) after each."""
    params = [torch.nn.Parameter(torch.zeros(10)) for _ in range(2)]
    clipper = Clipper(params, mode=mode, norm_type=p, max_norm=1.0, backend=backend)
    out = []
    for step in range(6):
        for index, param in enumerate(params):
            param.grad = torch.linspace(1.0, 2.0, 10) * 1000.0 * (step + 1) * (index + 1)
        total = clipper()
        out.append((float(total), float(params[1].grad[3])))
    return out


@pytest.mark.parametrize("p", [3.0, 0.5], ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("mode", ["norm", "zclip", "autoclip"])
def test_general_p_thresholds_are_the_same_on_both_cpu_backends(mode, p):
    """General p keeps its accumulator relative to a norm scale; the adaptive modes read their total
    from it (``total_from_accumulator``), so the scale must reach them from every backend: the
    torch backend's and the compiled one's runs agree (within float rounding)."""
    if fusedclip.available_backends("cpu")["cpu"] is not True:
        pytest.skip("the compiled cpu backend is not built here")
    ours, theirs = _general_p_run("torch", mode, p), _general_p_run("cpu", mode, p)
    for (total, element), (total_cpu, element_cpu) in zip(ours, theirs):
        assert total == pytest.approx(total_cpu, rel=1e-6)
        assert element == pytest.approx(element_cpu, rel=1e-5)


def test_the_general_p_check_catches_a_lost_norm_scale(monkeypatch):
    """The planted bug: the torch backend's result without its norm scale (as when ``finish_total``
    let the grad scale shadow it): zclip's threshold then follows a total a thousand times off."""
    from fusedclip.backends import torch_backend

    real = torch_backend.finish_total
    monkeypatch.setattr(torch_backend, "finish_total", lambda *args, **kwargs: real(*args, **kwargs)._replace(scale=None))
    ours, theirs = _general_p_run("torch", "zclip", 3.0), _general_p_run("cpu", "zclip", 3.0)
    assert any(a[1] != pytest.approx(b[1], rel=1e-5) for a, b in zip(ours, theirs))
