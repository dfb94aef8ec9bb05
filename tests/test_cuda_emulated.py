"""The CUDA kernels (csrc/cuda/kernels.cu) on the CPU, through the CUDA-on-CPU shim of tests/cuda_shim.

The parity, property and layout suites already run the ``cpu-cuda`` case (conftest.py); this file
checks the shim itself (warp intrinsics against their definitions, per-block shared memory,
atomics under concurrency, seeded schedules, every kind of divergence reported, exact 16-bit
conversions) and the launch configurations the suites do not vary: SM counts, blocks per SM,
worker threads and schedules, a workspace reused with fresh data, many tensors, empty tensors.
tests/test_cuda_mutations.py proves these checks fail on planted kernel bugs.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import check_clip_against_torch, clone_params, grads, ideal_total_norm

import fusedclip
from fusedclip import plan

pytestmark = pytest.mark.emulated

SHIM = Path(__file__).resolve().parent / "cuda_shim"


# ---- the shim itself -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def selftest(cuda_shim_library):
    """Runs one of tests/cuda_shim/selftest.cu's kernels; returns the shim's error text or None."""
    from cuda_shim import builder

    path = builder.build((SHIM / "selftest.cu").read_text(), units=("runtime.cpp",), label="selftest")
    lib = ctypes.CDLL(str(path))
    int64s = [ctypes.c_int64] * 5
    lib.cuda_shim_selftest.argtypes = [ctypes.c_char_p, ctypes.c_int, *int64s, ctypes.c_char_p, ctypes.c_int]
    lib.cuda_shim_selftest.restype = ctypes.c_int
    lib.cuda_shim_configure_device.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.cuda_shim_set_seed.argtypes = [ctypes.c_uint64]
    lib.cuda_shim_set_workers.argtypes = [ctypes.c_int]
    lib.cuda_shim_configure_device(0, 4, 2)
    lib.cuda_shim_set_workers(3)

    def run(name: str, *buffers: torch.Tensor, width: int = 32) -> str | None:
        addresses = [b.data_ptr() for b in buffers] + [0] * (4 - len(buffers))
        error = ctypes.create_string_buffer(4096)
        if lib.cuda_shim_selftest(name.encode(), 0, *addresses, width, error, 4096) == 0:
            return None
        return error.value.decode()

    run.lib = lib  # type: ignore[attr-defined]
    return run


@pytest.mark.parametrize("width", [32, 16, 8, 4])
def test_warp_intrinsics_match_their_definitions(selftest, width):
    out = torch.zeros(64, 8, dtype=torch.int64)
    assert selftest("warp_intrinsics", out, width=width) is None
    for t in range(64):
        lane, base = t % 32, t // 32 * 32
        segment = lane // width * width

        def value(lane_: int) -> int:
            return 1000 + base + lane_

        expected = [
            value(segment + ((lane * 7 + 3) % 32) % width),
            value(lane + 5) if lane % width + 5 < width else value(lane),
            value(lane - 3) if lane % width >= 3 else value(lane),
            value(lane ^ 6) if (lane ^ 6) < segment + width else value(lane),  # later groups: own value
            sum(1 << k for k in range(0, 32, 3)),
            int(base == 32),  # thread 37 is in the second warp
            0,
            value(lane // 16 * 16 + 1),  # two half-warp groups with their own masks
        ]
        assert out[t].tolist() == expected, f"thread {t}, width {width}"


def test_shared_memory_is_per_block_and_atomics_are_atomic(selftest):
    counter, mismatches = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    assert selftest("shared_per_block", counter, mismatches) is None
    assert int(counter) == 64 * 256 * 4
    assert int(mismatches) == 0, "a block saw another block's __shared__ values"
    add, inc = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    cas, maximum = torch.zeros(1, dtype=torch.int64), torch.full((1,), -1, dtype=torch.int32)
    assert selftest("atomics", add, inc, cas, maximum) is None
    n = 64 * 256
    assert int(add) == n
    assert int(inc) == n % 100  # atomicInc(limit 99) counts 0..99 and wraps
    assert int(cas) == 64 * sum(range(1, 257))
    assert int(maximum) == n - 1


def test_schedules_follow_the_seed(selftest):
    def order(seed: int) -> list[int]:
        selftest.lib.cuda_shim_set_seed(seed)
        ticket, out = torch.zeros(1, dtype=torch.int32), torch.zeros(256, dtype=torch.int32)
        assert selftest("schedule_order", ticket, out) is None
        assert sorted(out.tolist()) == list(range(256))
        return out.tolist()

    first = order(11)
    assert order(11) == first, "one seed must give one schedule"
    assert order(12) != first and first != list(range(256)), "the schedule must be random, and follow the seed"


@pytest.mark.parametrize(
    "kernel, expected",
    [
        ("ballot_by_some_lanes", "__ballot_sync"),
        ("syncthreads_in_a_branch", "__syncthreads"),
        ("shuffle_against_ballot", "a divergent warp"),
        ("exit_before_syncthreads", "__syncthreads"),
        ("mask_without_own_lane", "does not name its own lane"),
        ("shuffle_from_lane_outside_mask", "which mask 0x0000ffff does not name"),
        ("misaligned_vector_load", "misaligned address"),
    ],
)
def test_each_kind_of_divergence_is_reported_not_hung(selftest, kernel, expected):
    buffer = torch.zeros(4096, dtype=torch.int32)
    error = selftest(kernel, buffer, buffer)
    assert error is not None, f"{kernel}: the shim accepted a broken kernel"
    assert expected in error, error
    assert selftest("well_behaved", buffer) is None, "a failed launch must not poison the next one"


def test_16_bit_conversions_are_bit_exact(cuda_shim_library):
    """The shim's cuda_fp16.h / cuda_bf16.h conversions against numpy and torch (NaN: 0x7fff, as cvt.rn)."""
    lib = cuda_shim_library
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    for kind, dtype in ((0, torch.float16), (1, torch.bfloat16)):  # every 16-bit pattern to float
        ours, theirs = lib.convert(kind, bits), bits.view(dtype).float()
        same = (ours.view(torch.int32) == theirs.view(torch.int32)) | (ours.isnan() & theirs.isnan())
        assert bool(same.all()), f"{dtype} -> float differs at bits {bits[~same][:5].tolist()}"

    gen = torch.Generator().manual_seed(3)
    finite16 = bits[torch.isfinite(bits.view(torch.float16))].view(torch.float16).double().unique()
    finite_bf = bits[torch.isfinite(bits.view(torch.bfloat16))].view(torch.bfloat16).double().unique()
    mid16 = (finite16[1:] + finite16[:-1]) / 2  # ties, exact in float and double
    mid_bf = (finite_bf[1:] + finite_bf[:-1]) / 2
    random_floats = torch.randint(-(2**31), 2**31, (1 << 18,), generator=gen, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 65504, 65519.99, 65520, 3.4e38])
    floats = torch.cat([random_floats.view(torch.float32), mid16.float(), mid_bf.float(), special])

    def nudged(ties: torch.Tensor) -> list[torch.Tensor]:  # just above and below each tie: no double rounding
        nudge = torch.exp2(torch.randint(-45, -20, ties.shape, generator=gen).double())
        return [ties * (1 + nudge), ties * (1 - nudge)]

    special = torch.tensor([1e-300, 1e300, 5e-324, 65519.999999, 65520.0, 1e-8, 2.0**-25, 2.0**-24 * 1.5])
    doubles = torch.cat([floats.double(), *nudged(mid16), *nudged(mid_bf), special])

    def check(kind: int, values: torch.Tensor, expected_bits: np.ndarray, what: str) -> None:
        ours = lib.convert(kind, values).numpy().view(np.uint16)
        nan = np.isnan(values.numpy())
        assert (ours[nan] == 0x7FFF).all(), f"{what}: NaN must become the canonical 0x7fff"
        wrong = (ours != expected_bits) & ~nan
        assert not wrong.any(), (
            f"{what} differs for {values.numpy()[wrong][:5]}: {ours[wrong][:5]} vs {expected_bits[wrong][:5]}"
        )

    with np.errstate(over="ignore", invalid="ignore"):
        to_half = floats.numpy().astype(np.float16).view(np.uint16), doubles.numpy().astype(np.float16).view(np.uint16)
    check(2, floats, to_half[0], "float -> half")
    check(3, floats, floats.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), "float -> bfloat16")
    check(4, doubles, to_half[1], "double -> half (rounded once)")
    # double -> bfloat16 rounded once: round to odd into float32, then to nearest even (exact)
    d = doubles.numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        f = d.astype(np.float32)
        u = f.view(np.uint32).copy()
        inexact = f.astype(np.float64) != d
        u[inexact & (np.abs(f.astype(np.float64)) > np.abs(d))] -= 1
        u[inexact] |= 1
    reference = ((u.astype(np.uint64) + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    check(5, doubles, reference, "double -> bfloat16 (rounded once)")


# ---- the kernels through the cuda backend ---------------------------------------------------------------


@pytest.fixture
def chunks_of_16k(monkeypatch: pytest.MonkeyPatch):
    """Plans with chunks of 16384 elements: _params' largest tensor spans two, each cut into up to 4 units."""
    monkeypatch.setattr(plan.PLANS, "chunk_elements", 16384)
    plan.PLANS.clear()
    yield
    plan.PLANS.clear()


def _params(seed: int, offset: int = 3) -> list[torch.nn.Parameter]:
    """Mixed dtypes; a tensor of two chunks (split into parts), odd sizes (tails), views at odd offsets (heads)."""
    gen = torch.Generator().manual_seed(seed)
    spec = [((20000,), torch.float32), ((3, 1111), torch.float16), ((5000,), torch.bfloat16), ((257,), torch.float64),
            ((1,), torch.float32), ((4, 9), torch.bfloat16)]  # fmt: skip
    params = []
    for shape, dtype in spec:
        param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        numel = math.prod(shape)
        flat = (torch.randn(numel + offset, generator=gen, dtype=torch.float64) * 3).to(dtype)
        param.grad = flat[offset:].view(shape)  # a dense view at an odd element offset
        params.append(param)
    return params


def _clip_and_check(params: list[torch.nn.Parameter], norm_type: float = 2.0) -> torch.Tensor:
    theirs = clone_params(params)
    before = [g.clone() for g in grads(params)]
    ideal = float(ideal_total_norm(before, norm_type))
    max_norm = ideal * 0.3
    torch_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    ours = fusedclip.clip_grad_norm_(params, max_norm, norm_type, backend="cuda")
    check_clip_against_torch(params, theirs, before, ours, torch_total, max_norm, norm_type)
    return ours


def test_the_kernels_really_run_in_the_shim(emulated_cuda, chunks_of_16k):
    before = emulated_cuda.library.stats()
    _clip_and_check(_params(0))
    after = emulated_cuda.library.stats()
    assert after["launches"] - before["launches"] == 2, "one norm launch and one scale launch"
    assert after["blocks"] - before["blocks"] > 4
    assert after["warp_ops"] > before["warp_ops"] and after["syncs"] > before["syncs"]
    assert after["failures"] == before["failures"]


@pytest.mark.parametrize(
    "norm_type, launches",
    [(2.0, 2), (1.0, 2), (0.0, 2), (math.inf, 2), (-math.inf, 2), (3.0, 3), (0.5, 3), (-1.0, 3)],
    ids=lambda v: f"{v:g}",
)
def test_launches_per_call_as_the_gpu_contract_states(emulated_cuda, chunks_of_16k, norm_type, launches):
    """The launch counts tests/test_gpu_contract.py asserts on a GPU, counted here by the shim: one
    norm launch and one scale launch, plus one norm-scale launch (max |x|) for a general p."""
    params = _params(1)
    before = emulated_cuda.library.stats()["launches"]
    fusedclip.clip_grad_norm_(params, 1e-3, norm_type, backend="cuda")
    assert emulated_cuda.library.stats()["launches"] - before == launches
    before = emulated_cuda.library.stats()["launches"]
    fusedclip.clip_grad_value_(params, 0.1, backend="cuda")
    assert emulated_cuda.library.stats()["launches"] - before == 1


@pytest.mark.parametrize("sms, blocks_per_sm", [(1, 1), (3, 2), (8, 1), (132, 4)])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 3.0])
def test_any_sm_count_and_occupancy(emulated_cuda, chunks_of_16k, sms, blocks_per_sm, norm_type):
    with emulated_cuda.sms(sms, blocks_per_sm):
        _clip_and_check(_params(sms), norm_type)


def test_same_bits_for_any_occupancy_worker_count_and_schedule(emulated_cuda, chunks_of_16k):
    """The norm kernel's order of reduction depends on the SM count only (the design's repeatability)."""
    lib = emulated_cuda.library
    reference = None
    try:
        for blocks_per_sm, workers, seed in [(1, 1, 1), (2, 3, 2), (4, 2, 3), (3, 4, 4)]:
            lib.set_workers(workers)
            lib.set_seed(seed)
            with emulated_cuda.sms(5, blocks_per_sm):
                params = _params(7)
                total = fusedclip.get_total_norm(grads(params), 2.0, backend="cuda")
                fusedclip.clip_grads_with_norm_(params, 1.0, total, backend="cuda")
            result = [total] + grads(params)
            if reference is None:
                reference = result
            else:
                assert all(torch.equal(a, b) for a, b in zip(result, reference))
    finally:
        lib.set_workers(3)


def test_a_reused_workspace_with_fresh_data_every_call(emulated_cuda, chunks_of_16k):
    """The self-resetting counters: every call on one plan's workspace sees its own data."""
    params = _params(1)
    for step in range(4):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad.copy_(torch.randn(p.grad.shape, generator=gen) * (step + 1))
        for norm_type in (2.0, 1.0):
            _clip_and_check(params, norm_type)


def test_many_tensors_and_per_tensor_norms(emulated_cuda, chunk_elements):
    """Hundreds of tensors (the final fold's groups of 32 and the block's warps), tensors wider than
    eight units (folded by a whole warp), per-tensor norms from the same launch."""
    gen = torch.Generator().manual_seed(5)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    sizes = [int(s) for s in torch.randint(1, 40, (300,), generator=gen)] + [1000, 3000]
    tensors = [(torch.randn(n, generator=gen, dtype=torch.float64)).to(dtypes[i % 4]) for i, n in enumerate(sizes)]
    for p in (2.0, math.inf, 0.0, 2.5):
        total, per_tensor = fusedclip.get_norms(tensors, p, backend="cuda")
        expected = torch.stack([torch.linalg.vector_norm(t.double(), p) for t in tensors])
        torch.testing.assert_close(per_tensor.double(), expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(total.double(), torch.linalg.vector_norm(expected, p), rtol=1e-6, atol=0)


def test_only_empty_tensors_still_write_the_results(emulated_cuda):
    params = [torch.nn.Parameter(torch.zeros(0)) for _ in range(3)]
    for p in params:
        p.grad = torch.zeros(0)
    total = fusedclip.clip_grad_norm_(params, 1.0, backend="cuda")
    assert total.item() == 0.0
