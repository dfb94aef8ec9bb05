"""patch_torch(): torch's names route through fusedclip; what a patch cannot reach is documented."""

from __future__ import annotations

import torch
import torch.nn.utils
from torch.nn.utils import clip_grad_norm_ as bound_before_patching

import fusedclip
from fusedclip import engine


def _train(steps=4, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(5)
    norms = []
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(10, 6, generator=gen)).pow(2).mean().mul(100).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))  # torch's name
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.05)
        optimizer.step()
    return model, norms


def test_patch_routes_torch_names_through_fusedclip(monkeypatch):
    calls = []
    real_prepare = engine.prepare
    monkeypatch.setattr(engine, "prepare", lambda *a, **k: calls.append(1) or real_prepare(*a, **k))
    reference, reference_norms = _train()
    assert not calls
    with fusedclip.patch_torch() as patch:
        assert fusedclip.is_patched() and patch is not None
        assert torch.nn.utils.clip_grad_norm_ is fusedclip.clip_grad_norm_
        assert torch.nn.utils.get_total_norm is fusedclip.get_total_norm
        assert torch.nn.utils.clip_grads_with_norm_ is fusedclip.clip_grads_with_norm_
        assert torch.nn.utils.clip_grad.clip_grad_norm_ is fusedclip.clip_grad_norm_
        patched, patched_norms = _train()
    assert calls, "the training loop did not reach fusedclip"
    assert not fusedclip.is_patched()
    for a, b in zip(patched_norms, reference_norms):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0)
    for a, b in zip(patched.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_unpatch_restores_torch_and_is_idempotent():
    original = torch.nn.utils.clip_grad_norm_
    fusedclip.patch_torch()
    fusedclip.patch_torch()  # twice: still one original remembered
    fusedclip.unpatch_torch()
    fusedclip.unpatch_torch()
    assert torch.nn.utils.clip_grad_norm_ is original
    assert torch.nn.utils.clip_grad.clip_grad_norm_ is original


def test_patch_with_a_backend_passes_it_on(monkeypatch):
    seen = []
    real_prepare = engine.prepare
    monkeypatch.setattr(engine, "prepare", lambda grads, backend=None, foreach=None: seen.append(backend) or real_prepare(grads, backend, foreach))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with fusedclip.patch_torch(backend="torch"):
        torch.nn.utils.clip_grad_norm_([p], 1.0)
    assert seen == ["torch"]


def test_names_bound_before_patching_are_not_reached():
    """The documented limit: `from torch.nn.utils import clip_grad_norm_` at import time keeps torch's."""
    with fusedclip.patch_torch():
        assert bound_before_patching is not fusedclip.clip_grad_norm_
        assert torch.nn.utils.clip_grad_norm_ is fusedclip.clip_grad_norm_
