"""Behaviour specific to the Triton backend: determinism, launch counts, workspaces, 64-bit offsets.

These run on CPU tensors through Triton's interpreter (sizes kept small: it runs every program in
Python), and on CUDA where there is a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import require_backend
from reference import (
    DTYPE_SETS,
    assert_no_worse_than_torch,
    check_clip_against_torch,
    clone_params,
    grads,
    ideal_total_norm,
    make_params,
)

import fusedclip
from fusedclip import backends, engine, plan
from fusedclip.backends.base import DeviceWork
from fusedclip.norm_type import parse_norm_type

@pytest.fixture(params=[pytest.param("cpu", marks=pytest.mark.interpreter), pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> str:
    require_backend(request.param, "triton")
    return request.param


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch):
    """Chunks of 64 elements: small tensors span several chunks and programs."""
    monkeypatch.setattr(plan.PLANS, "chunk_elements", 64)
    plan.PLANS.clear()
    yield 64
    plan.PLANS.clear()


def _triton():
    return backends.get_backend("triton")


def _kernels():
    from fusedclip.backends import triton_kernels

    return triton_kernels


SHAPES = [(300,), (5, 13), (0,), (1,), (130,), (7, 9, 3), (64,)]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 0.0, 3.5])
def test_repeated_calls_are_bitwise_identical(device, small_chunks, norm_type):
    tensors = grads(make_params(SHAPES, DTYPE_SETS["all4"], device=device, seed=7))
    call = engine.prepare(tensors, "triton")
    spec = parse_norm_type(norm_type)
    results = []
    for _ in range(3):
        per_tensor = torch.empty(len(tensors), dtype=torch.float64, device=device)
        total, coef = engine.norm_and_coef(call, spec, 0.5, per_tensor=per_tensor)
        results.append((total, coef, per_tensor))
    for total, coef, per_tensor in results[1:]:
        assert torch.equal(total, results[0][0]) and torch.equal(coef, results[0][1])
        assert torch.equal(per_tensor, results[0][2])
    ideal = ideal_total_norm(tensors, norm_type)
    theirs = torch.nn.utils.get_total_norm([t.clone() for t in tensors if t.numel()], norm_type)
    assert_no_worse_than_torch(results[0][0], theirs, ideal, what="total", slack_ulps=4)


def test_tickets_are_zero_after_every_launch(device, small_chunks):
    """The last program resets the tickets: a cached workspace needs no memset before reuse."""
    tensors = grads(make_params(SHAPES, DTYPE_SETS["bf16+fp32"], device=device))
    call = engine.prepare(tensors, "triton")
    (_, work), = call.works
    for norm_type in (2.0, 0.0, math.inf):  # p = 0 and per_tensor use the per-tensor tickets
        per_tensor = torch.empty(len(tensors), dtype=torch.float64, device=device)
        engine.norm_and_coef(call, parse_norm_type(norm_type), 1.0, per_tensor=per_tensor)
    spaces = [v for k, v in work.plan.scratch.items() if k[0] == "triton-workspace"]
    assert len(spaces) == 1, "one workspace per plan and stream"
    assert int(spaces[0].tickets.count_nonzero()) == 0
    assert spaces[0].tickets.numel() == 1 + len(tensors)


@pytest.mark.parametrize("count,dtypes", [(1, "fp32"), (9, "all4"), (40, "bf16+fp32")])
def test_one_launch_per_pass(device, monkeypatch, count, dtypes):
    """clip_grad_norm_ is exactly two launches (norm, scale) for any tensor count and dtype mix."""
    kernels = _kernels()
    launches: list[str] = []
    for name in ("norm_kernel", "scale_kernel", "clamp_kernel"):
        kernel = getattr(kernels, name)
        original_run = kernel.run

        def counting_run(*args, _name=name, _run=original_run, **kwargs):
            launches.append(_name)
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counting_run)
    shapes = [(1 + (7 * i) % 50,) for i in range(count)]
    params = make_params(shapes, DTYPE_SETS[dtypes], device=device, zero_tensor=False)

    fusedclip.clip_grad_norm_(params, 0.01, backend="triton")
    assert launches == ["norm_kernel", "scale_kernel"]
    launches.clear()
    fusedclip.clip_grad_norm_(params, math.inf, backend="triton")  # unclipped: the scale kernel exits early
    assert launches == ["norm_kernel", "scale_kernel"]
    launches.clear()
    total = fusedclip.get_total_norm(grads(params), backend="triton")
    fusedclip.clip_grads_with_norm_(params, 0.5, total, backend="triton")
    assert launches == ["norm_kernel", "scale_kernel"]
    launches.clear()
    fusedclip.clip_grad_value_(params, 0.1, backend="triton")
    assert launches == ["clamp_kernel"]


def test_many_tensors_in_one_call(device):
    sizes = torch.randint(0, 40, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    params = make_params([(s,) for s in sizes], dtypes, device=device, seed=11)
    theirs = clone_params(params)
    before = [g.clone() for g in grads(params)]
    max_norm = float(ideal_total_norm(before, 2.0)) / 5
    ours = fusedclip.clip_grad_norm_(params, max_norm, backend="triton")
    ref = torch.nn.utils.clip_grad_norm_(theirs, max_norm)

    check_clip_against_torch(params, theirs, before, ours, ref, max_norm, 2.0)  # every element


def _far_chunk_tables(buffer: torch.Tensor, start: int, chunk_elements: int) -> plan.KernelTables:
    """Tables for one tensor of ``start + len(buffer)`` elements whose only chunk, at element
    ``start``, is ``buffer``: the kernels must carry 64-bit offsets to land on it."""
    address = buffer.data_ptr() - start * buffer.element_size()
    n = buffer.numel()
    code = plan.DTYPE_CODES[buffer.dtype]
    packed = torch.tensor([address, start + n, code, 0, 1, 0, start], dtype=torch.int64, device=buffer.device)
    return plan._slice_tables(packed, 1, 1, chunk_elements, start + n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("start", [2**33 + 64, 2**31 + 8, 2**32 - 64])
def test_chunk_starts_beyond_32_bits(device, dtype, start):
    buffer = (torch.randn(300, generator=torch.Generator().manual_seed(1)) * 3).to(device=device, dtype=dtype)
    original = buffer.clone()
    tables = _far_chunk_tables(buffer, start, chunk_elements=1024)
    holder = plan.build_plan([buffer], True).devices[0]
    work = DeviceWork(holder, [buffer])
    triton = _triton()

    total, coef, acc = triton.run_norm(work, tables, parse_norm_type(2.0), 1.0, torch.float64)
    expected = torch.linalg.vector_norm(original.double())
    assert float(total) == pytest.approx(float(expected), rel=1e-12)
    assert float(acc) == pytest.approx(float(expected) ** 2, rel=1e-12)
    total_inf, _, _ = triton.run_norm(work, tables, parse_norm_type(math.inf), None, torch.float64)
    assert float(total_inf) == float(original.abs().max())

    triton.launch_scale(work, tables, coef)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    scaled = (original.to(opmath) * coef.to(opmath)).to(dtype)
    assert torch.equal(buffer, scaled)
    triton.launch_clamp(work, tables, 0.01)
    assert torch.equal(buffer, scaled.clamp(-0.01, 0.01))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("offset", [1, 3])
def test_misaligned_views_match_aligned_copies_bitwise(device, dtype, offset):
    """A view off a 16-byte boundary takes the unhinted path; it must agree with the aligned one."""
    generator = torch.Generator().manual_seed(offset)
    buffer = torch.randn(offset + 1000, generator=generator).to(device=device, dtype=dtype)
    view = buffer[offset:]
    aligned = view.clone()
    assert view.data_ptr() % 16 != 0 and aligned.data_ptr() % 16 == 0
    for norm_type in (2.0, math.inf):
        assert torch.equal(
            fusedclip.get_total_norm([view], norm_type, backend="triton"),
            fusedclip.get_total_norm([aligned], norm_type, backend="triton"),
        )
    a, b = torch.nn.Parameter(torch.empty_like(view)), torch.nn.Parameter(torch.empty_like(view))
    a.grad, b.grad = view, aligned
    fusedclip.clip_grad_norm_([a], 1.0, backend="triton")
    fusedclip.clip_grad_norm_([b], 1.0, backend="triton")
    assert torch.equal(view, aligned)
    assert buffer[:offset].equal(torch.randn(offset + 1000, generator=torch.Generator().manual_seed(offset))
                                 .to(device=device, dtype=dtype)[:offset]), "bytes before the view changed"


@pytest.mark.parametrize("norm_type", [3.5, 0.5, -1.5, 7.0])
def test_general_p_is_accurate_across_magnitudes(device, norm_type):
    """The kernels' own pow (exp2/log2 with an exact split of the exponent) across 600 decades."""
    generator = torch.Generator().manual_seed(2)
    mantissas = torch.rand(200, generator=generator, dtype=torch.float64) + 0.5
    decades = torch.randint(-300, 300, (200,), generator=generator).double()
    if norm_type > 1:  # keep |x|**p finite
        decades = decades / (2 * norm_type)
    values = mantissas * torch.pow(10.0, decades)
    values[:3] = torch.tensor([5e-324, 2.5e-310, 1e-200], dtype=torch.float64)  # subnormals
    tensors = [values[:120].to(device), values[120:].to(device)]
    ours = fusedclip.get_total_norm(tensors, norm_type, backend="triton")
    theirs = torch.nn.utils.get_total_norm([t.cpu() for t in tensors], norm_type)
    assert_no_worse_than_torch(ours, theirs, ideal_total_norm(tensors, norm_type), what="total", slack_ulps=4)


@pytest.mark.parametrize("max_norm_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64])
def test_max_norm_tensor_on_the_device_is_read_by_the_kernel(device, max_norm_dtype):
    params = make_params([(40,), (3, 5)], [torch.float32], device=device, none_grad=False, zero_tensor=False)
    twin = clone_params(params)
    max_norm = torch.tensor(2, dtype=max_norm_dtype, device=device)
    a = fusedclip.clip_grad_norm_(params, max_norm, backend="triton")
    b = fusedclip.clip_grad_norm_(twin, 2.0, backend="triton")
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(grads(params), grads(twin)))


def test_device_reasons_name_the_interpreter():
    triton = _triton()
    if _kernels().interpreted():
        assert triton.device_reason(torch.device("cpu")) is None
        assert "TRITON_INTERPRET" in triton.device_reason(torch.device("cuda"))
    else:
        assert "TRITON_INTERPRET=1" in triton.device_reason(torch.device("cpu"))
    assert "meta" in triton.device_reason(torch.device("meta"))


def test_pow_split_is_exact():
    from fusedclip.backends.triton_backend import _from_bits, _split

    for value in (3.5, 1 / 3.5, -1 / 1.5, 0.1, 7.123456789, 1e-5):
        hi_bits, lo_bits = _split(value)
        hi, lo = _from_bits(hi_bits), _from_bits(lo_bits)
        assert hi + lo == value
        assert (hi_bits & 0xFFF) == 0, "hi keeps at most 41 significant bits"


@pytest.mark.parametrize("coef", [2.0, 1.0 + 2**-40, 0.25])
def test_scale_applies_every_coefficient_but_one(device, coef):
    """A coefficient above 1 (a grad scale folded in) is applied; only exactly 1 skips the pass."""
    tensors = grads(make_params([(300,), (5, 7)], DTYPE_SETS["all4"], device=device, zero_tensor=False))
    before = [t.clone() for t in tensors]
    call = engine.prepare(tensors, "triton")
    engine.scale_(call, torch.tensor(coef, dtype=torch.float64, device=device))
    for t, b in zip(tensors, before):
        opmath = torch.float64 if t.dtype == torch.float64 else torch.float32
        assert torch.equal(t, (b.to(opmath) * torch.tensor(coef, dtype=torch.float64).to(opmath)).to(t.dtype))
