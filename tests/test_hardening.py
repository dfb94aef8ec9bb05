"""Hostile inputs, memory safety, concurrency and scale: nothing is ever silently wrong."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from reference import check_clip_against_torch, clone_params, grads, make_params

import fusedclip
from fusedclip import plan

ROOT = Path(__file__).resolve().parents[1]


def test_meta_grads_behave_like_torch():
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in [(3,), (4, 2)]]
    for p in params:
        p.grad = torch.empty(p.shape, device="meta")
    theirs = torch.nn.utils.clip_grad_norm_(params, 1.0)
    ours = fusedclip.clip_grad_norm_(params, 1.0)
    assert ours.device.type == theirs.device.type == "meta"
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    fusedclip.clip_grad_value_(params, 0.5)


def test_complex_grads_get_torchs_result_and_kernels_refuse_them(device_backend):
    device, backend = device_backend
    params = [torch.nn.Parameter(torch.zeros(5, dtype=torch.complex64, device=device)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn(5, dtype=torch.complex64, device=device)
    twins = clone_params(params)
    if backend == "torch":
        torch.testing.assert_close(fusedclip.clip_grad_norm_(params, 0.3, backend=backend), torch.nn.utils.clip_grad_norm_(twins, 0.3))
        for a, b in zip(grads(params), grads(twins)):
            torch.testing.assert_close(a, b)
    else:
        before = [g.clone() for g in grads(params)]
        with pytest.raises(RuntimeError, match="complex64"):
            fusedclip.clip_grad_norm_(params, 0.3, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(grads(params), before))


def test_grads_resized_in_place_between_calls(device_backend):
    device, backend = device_backend
    params = make_params([(40,), (9,)], [torch.float32], device=device, none_grad=False, zero_tensor=False)
    fusedclip.clip_grad_norm_(params, 1.0, backend=backend)
    grad = params[0].grad
    grad.resize_(5000)  # same tensor object, new (larger) storage: the cached plan is stale
    grad.copy_(torch.randn(5000, device=device))
    params[0].data = torch.zeros(5000, device=device)
    twins = clone_params(params)
    before = [g.clone() for g in grads(params)]
    ours = fusedclip.clip_grad_norm_(params, 1.0, backend=backend)
    theirs = torch.nn.utils.clip_grad_norm_(twins, 1.0)
    check_clip_against_torch(params, twins, before, ours, theirs, 1.0, 2.0)
    grad.resize_(3)  # and smaller (the storage stays): only 3 elements may be touched now
    whole = torch.empty(0, device=device).set_(grad.untyped_storage(), 0, (5000,))
    whole[3:] = 777.0
    params[0].data = torch.zeros(3, device=device)
    fusedclip.clip_grad_norm_(params, 1e-3, backend=backend)
    fusedclip.clip_grad_value_(params, 1e-4, backend=backend)
    assert bool((whole[3:] == 777.0).all()), "elements beyond the resized grad were written"


@pytest.mark.parametrize("fresh_grads", [False, True], ids=["same-grads", "fresh-grads"])
def test_concurrent_calls_from_threads_on_disjoint_parameters(device_backend, fresh_grads):
    """Four threads clip four parameter sets of one layout; with fresh grads every call, every call
    also rebases the shared layout's plan onto its own addresses (see plan.PlanCache)."""
    device, backend = device_backend
    sets = [make_params([(300,), (17, 5), (1000,)], [torch.float32, torch.bfloat16], device=device, seed=s) for s in range(4)]
    expected = []
    for params in sets:
        twins = clone_params(params)
        expected.append((torch.nn.utils.clip_grad_norm_(twins, 0.5), [g.clone() for g in grads(twins)]))
    starts = [[g.clone() for g in grads(params)] for params in sets]
    failures: list[str] = []
    barrier = threading.Barrier(len(sets))

    def work(k: int) -> None:
        try:
            barrier.wait()
            for _ in range(3 if backend == "triton" else 25):
                for p, s in zip([p for p in sets[k] if p.grad is not None], starts[k]):
                    if fresh_grads:
                        p.grad = s.clone()
                    else:
                        p.grad.copy_(s)
                total = fusedclip.clip_grad_norm_(sets[k], 0.5, backend=backend)
                torch.testing.assert_close(total, expected[k][0], rtol=1e-5, atol=0)
                for g, e in zip(grads(sets[k]), expected[k][1]):
                    torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
        except BaseException as error:  # reported below: a thread's failure must fail the test
            failures.append(f"thread {k}: {error!r}")

    rebased_before = plan.PLANS.rebased
    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(sets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    if fresh_grads:
        assert plan.PLANS.rebased > rebased_before, "no call rebased a plan"


_PEAK_SCRIPT = r"""
import resource, sys, torch, fusedclip
backend = sys.argv[1]
torch.manual_seed(0)
params = []
for _ in range(8):
    p = torch.empty(16 * 2**20)  # never read: only its grad matters
    p.grad = torch.randn(16 * 2**20)  # 8 x 64 MiB of float32 grads
    params.append(p)
fusedclip.clip_grad_norm_(params[:1], 1.0, backend=backend)  # warm up code paths on a small set
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(2):
    fusedclip.clip_grad_norm_(params, 1e-3, backend=backend)
    fusedclip.clip_grad_value_(params, 1e-4, backend=backend)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024)
"""


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_no_copies_of_the_grads_are_made(backend):
    from conftest import require_backend

    require_backend("cpu", backend)
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, backend], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    growth_mib = int(result.stdout.strip().splitlines()[-1])
    assert growth_mib < 64, f"peak memory grew by {growth_mib} MiB over 512 MiB of grads: a copy was made"


def test_concurrent_calls_on_strided_grads_stage_into_buffers_of_their_own(device_backend):
    """Threads clipping non-dense grads of one layout at the same time: each call binds the cached
    plan to staging buffers of its own (plan.DevicePlan.bind), so no call sees another's data."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(11)
    starts = [torch.randn(40, 30, generator=gen).to(device) for _ in range(4)]
    expected = []
    for start in starts:
        twin = torch.nn.Parameter(torch.empty(40, 10, device=device))
        twin.grad = start.clone()[:, ::3]
        expected.append(torch.nn.utils.clip_grad_norm_([twin], 0.5))
        expected[-1] = (expected[-1], twin.grad.clone())
    failures: list[str] = []
    barrier = threading.Barrier(len(starts))

    def work(k: int) -> None:
        try:
            param = torch.nn.Parameter(torch.empty(40, 10, device=device))
            barrier.wait()
            for _ in range(2 if backend == "triton" else 15):
                base = starts[k].clone()  # a new base every call: the key changes, the layout does not
                param.grad = base[:, ::3]
                total = fusedclip.clip_grad_norm_([param], 0.5, backend=backend)
                torch.testing.assert_close(total, expected[k][0], rtol=1e-5, atol=0)
                torch.testing.assert_close(param.grad, expected[k][1], rtol=1e-5, atol=1e-7)
                untouched = torch.ones(30, dtype=torch.bool)
                untouched[::3] = False
                assert torch.equal(base[:, untouched.to(device)], starts[k][:, untouched.to(device)])
        except BaseException as error:  # reported below: a thread's failure must fail the test
            failures.append(f"thread {k}: {error!r}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(starts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert plan.PLANS.retained_bytes() <= plan.PLANS.table_bytes_bound(), "a cached plan kept staging memory"
