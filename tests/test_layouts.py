"""Memory layouts every backend must handle: flat-buffer views, strided grads, aliases, reallocation."""

from __future__ import annotations

import pytest
import torch
from reference import check_clip_against_torch, clone_params, grads, ideal_total_norm, make_params

import fusedclip
from fusedclip import plan

SENTINEL = 12345.0


def _flat_buffer_params(device, dtype, sizes=(5, 0, 33, 1, 70), gap=3):
    """Parameters whose grads are views into one buffer, separated by sentinel-filled gaps."""
    total = sum(sizes) + gap * (len(sizes) + 1)
    buffer = torch.full((total,), SENTINEL, dtype=dtype, device=device)
    params, offset = [], gap
    gen = torch.Generator().manual_seed(3)
    for size in sizes:
        view = buffer[offset : offset + size]
        view.copy_(torch.randn(size, generator=gen).to(dtype))
        param = torch.nn.Parameter(torch.zeros(size, dtype=dtype, device=device))
        param.grad = view
        params.append(param)
        offset += size + gap
    return buffer, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_views_into_one_flat_buffer(device_backend, chunk_elements, dtype):
    device, backend = device_backend
    buffer, params = _flat_buffer_params(device, dtype)
    outside = buffer == SENTINEL
    theirs = clone_params(params)
    before = [g.clone() for g in grads(params)]
    max_norm = float(ideal_total_norm(before, 2.0)) / 3
    ours_total = fusedclip.clip_grad_norm_(params, max_norm, backend=backend)
    torch_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    check_clip_against_torch(params, theirs, before, ours_total, torch_total, max_norm, 2.0)
    assert bool((buffer[outside] == SENTINEL).all()), "bytes outside the views were modified"
    storage = buffer.untyped_storage().data_ptr()
    assert all(p.grad.untyped_storage().data_ptr() == storage for p in params), "grads must stay views"
    fusedclip.clip_grad_value_(params, 0.1, backend=backend)
    assert bool((buffer[outside] == SENTINEL).all())


def _strided_grads(device, dtype):
    gen = torch.Generator().manual_seed(5)
    def fresh(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return [
        fresh(12, 10).t(),  # dense, permuted: used in place
        fresh(12, 10)[:, ::3],  # gaps: staged
        fresh(4, 6, 5).permute(2, 0, 1),
        fresh(6, 8)[1:5, 2:7],  # gaps: staged
        fresh(2, 3, 4, 4).to(memory_format=torch.channels_last),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_grads_are_clipped_in_place(device_backend, chunk_elements, dtype):
    device, backend = device_backend
    params = []
    for g in _strided_grads(device, dtype):
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=dtype, device=device))
        p.grad = g
        params.append(p)
    objects = [p.grad for p in params]
    strides = [g.stride() for g in objects]
    before = [g.clone() for g in objects]
    for _ in range(2):  # the second call reuses the cached plan and its staging buffers
        for p, b in zip(params, before):
            p.grad.copy_(b)
        theirs = clone_params(params)
        max_norm = float(ideal_total_norm(before, 2.0)) / 2
        ours_total = fusedclip.clip_grad_norm_(params, max_norm, backend=backend)
        torch_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        check_clip_against_torch(params, theirs, before, ours_total, torch_total, max_norm, 2.0)
    assert all(p.grad is o for p, o in zip(params, objects)), "grads must be modified in place"
    assert [g.stride() for g in objects] == strides


def test_gaps_of_a_strided_grad_are_untouched(device_backend):
    device, backend = device_backend
    base = torch.randn(8, 9, device=device)
    snapshot = base.clone()
    param = torch.nn.Parameter(torch.zeros(8, 3, device=device))
    param.grad = base[:, ::3]
    fusedclip.clip_grad_norm_([param], 0.01, backend=backend)
    gaps = torch.ones(8, 9, dtype=torch.bool)
    gaps[:, ::3] = False
    assert torch.equal(base[gaps.to(device)], snapshot[gaps.to(device)])
    expected = snapshot[:, ::3] * (0.01 / (float(torch.linalg.vector_norm(snapshot[:, ::3].double())) + 1e-6))
    torch.testing.assert_close(param.grad, expected)


def test_a_grad_listed_twice_is_scaled_twice_like_torch(device_backend):
    device, backend = device_backend
    params = make_params([(20,), (9,)], [torch.float32], device=device, zero_tensor=False, none_grad=False)
    shared = torch.nn.Parameter(torch.zeros(20, device=device))
    shared.grad = params[0].grad  # the same grad object under two parameters (tied weights)
    listed = params + [shared]
    theirs = clone_params(params)
    theirs_shared = torch.nn.Parameter(torch.zeros(20, device=device))
    theirs_shared.grad = theirs[0].grad
    ours_total = fusedclip.clip_grad_norm_(listed, 0.5, backend=backend)
    torch_total = torch.nn.utils.clip_grad_norm_(theirs + [theirs_shared], 0.5)
    torch.testing.assert_close(ours_total, torch_total)
    for a, b in zip(grads(params), grads(theirs)):
        torch.testing.assert_close(a, b)


def test_reallocated_grads_are_never_written_through_stale_addresses(device_backend):
    device, backend = device_backend
    model = torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.ReLU(), torch.nn.Linear(9, 3)).to(device)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        dtype = torch.bfloat16 if step % 2 else torch.float32  # dtypes and addresses change too
        model.to(dtype)
        model.zero_grad(set_to_none=True)  # the previous grads are freed
        x = torch.randn(5, 7, generator=gen).to(device=device, dtype=dtype)
        model(x).float().pow(2).sum().mul(10 ** (step % 3)).backward()
        twin = clone_params(list(model.parameters()))
        before = [p.grad.clone() for p in model.parameters()]
        ours = fusedclip.clip_grad_norm_(model.parameters(), 0.3, backend=backend)
        theirs = torch.nn.utils.clip_grad_norm_(twin, 0.3)
        check_clip_against_torch(list(model.parameters()), twin, before, ours, theirs, 0.3, 2.0)


def test_same_layout_reuses_the_cached_plan(device_backend):
    device, backend = device_backend
    params = make_params([(30,), (4, 4)], [torch.float32], device=device, none_grad=False)
    fusedclip.clip_grad_norm_(params, 1.0, backend=backend)
    misses = plan.PLANS.misses
    for _ in range(3):
        fusedclip.clip_grad_norm_(params, 1.0, backend=backend)
    assert plan.PLANS.misses == misses
    params[0].grad = params[0].grad.clone()  # new memory: the key changes
    fusedclip.clip_grad_norm_(params, 1.0, backend=backend)
    assert plan.PLANS.misses == misses + 1
