"""Clipper modes against straightforward references written here, checkpoints, statistics."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip
from fusedclip import Clipper

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
        step, self.step = self.step, self.step + 1
        if step < self.warmup:
            if math.isfinite(total):
                self.seen.append(total)
            if step == self.warmup - 1:
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
        if step >= 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            clipper()
        finally:
            torch.cuda.set_sync_debug_mode("default")
