"""unscale_and_clip_ against torch's recipe (unscale_ then clip_grad_norm_) with a CPU GradScaler."""

from __future__ import annotations

import copy

import pytest
import torch

import fusedclip

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
    with pytest.raises(RuntimeError, match="already been called"):
        fusedclip.unscale_and_clip_(scaler, optimizer, 1.0)
    scaler.step(optimizer)
    with pytest.raises(RuntimeError, match="after step"):
        fusedclip.unscale_and_clip_(scaler, optimizer, 1.0)
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
