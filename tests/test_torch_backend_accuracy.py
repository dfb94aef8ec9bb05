"""The torch backend's accuracy bound, checked against a 200-bit mpmath oracle.

The stated bound (README, deviation table): for a result dtype with unit roundoff ``u_out`` the
returned total ``R`` of the exact norm ``T`` satisfies

    |R - T| <= 1/2 ulp_out(T') + m * u * max(1, 1/|p|) * |T|,   T' = |T| (1 + m u max(1, 1/|p|))

* ``u = 2^-24`` where the backend accumulates in float32 (p = 1 and 2 for float32, bf16 and fp16
  grads), ``u = 2^-53`` where it accumulates in float64 (float64 grads; every other finite p, which
  is summed in float64 relative to the norm scale);
* ``m = n + k + 4``: ``n`` the most elements one reduction covers (a chunk of at most
  ``CPU_CHUNK_ELEMENTS`` on CPUs, here the largest grad), ``k`` the number of grads;
* p = 0, inf, -inf are exact before the one rounding (m = 0): the result is correctly rounded.

That is: the exact norm rounded once to the return dtype, up to the rounding error of a float32
(float64) sum of ``n`` terms. torch's own fp16 result carries a second error on top (every
per-tensor norm rounded to fp16), and the test shows that such an implementation fails.

bf16 grads on the CPU, p = 1 and 2 (when any grad of the set is bf16): the backend takes torch's
own per-tensor norms there (``_foreach_norm`` in bf16, float32 accumulation inside, each norm
rounded to bf16; bit-identical, tested below), combines them in float64 and rounds once. Each
per-tensor norm is then within ``(1 + m u)(1 + u_16) - 1`` of its exact value (``u_16 = 2^-8``, bf16's
unit roundoff; normal range), and a p-norm is monotone and homogeneous in its entries' magnitudes,
so the total obeys the bound above with the relative term

    e = (1 + m * u * max(1, 1/|p|)) * (1 + 2^-8) - 1,   u = 2^-24,

which torch's own bf16 total meets too (its float32 combination of the k norms fits in ``m``; tested
below). An implementation worse than torch, per-tensor sums accumulated in bf16, breaks it.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fusedclip
from fusedclip.backends.base import round_once

ORDERS = [0.5, 1.0, 2.0, 3.0, -1.0, math.inf, -math.inf, 0.0]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
MANTISSA = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11, torch.float64: 53}
MP_PREC = 200
#: bf16's unit roundoff: the per-tensor rounding the torch backend shares with torch on the CPU
BF16_UNIT = 2.0**-8


def exact_norm(grads: list[torch.Tensor], p: float) -> mpmath.mpf:
    """torch's definition (the p-norm of the per-tensor p-norms) in 200-bit arithmetic."""
    with mpmath.workprec(MP_PREC):
        values = [[abs(mpmath.mpf(float(v))) for v in g.reshape(-1).tolist()] for g in grads]
        if p == 0:
            return mpmath.mpf(sum(1 for vs in values if any(v != 0 for v in vs)))
        if p == math.inf:
            return max((max(vs) for vs in values if vs), default=mpmath.mpf(0))
        if p == -math.inf:
            return min(min(vs) for vs in values)
        flat = [v for vs in values for v in vs]
        if p < 0 and any(v == 0 for v in flat):
            return mpmath.mpf(0)  # a zero makes sum |x|^p infinite and the norm 0, as in torch
        return mpmath.fsum(v**p for v in flat) ** (1 / mpmath.mpf(p))


def ulp(value: mpmath.mpf, dtype: torch.dtype) -> mpmath.mpf:
    """The spacing of ``dtype`` at ``value``; below the normal range (subnormals, and 0) the
    spacing stays that of the smallest normal binade."""
    smallest_normal_exponent = int(math.log2(torch.finfo(dtype).tiny))
    with mpmath.workprec(MP_PREC):
        exponent = smallest_normal_exponent
        if value != 0:
            exponent = max(int(mpmath.floor(mpmath.log(abs(value), 2))), smallest_normal_exponent)
        return mpmath.ldexp(1, exponent - MANTISSA[dtype] + 1)


def stated_relative_bound(grads: list[torch.Tensor], p: float) -> mpmath.mpf:
    """The relative term of the README's bound for the torch backend (see the module docstring)."""
    with mpmath.workprec(MP_PREC):
        if p in (0.0, math.inf, -math.inf):
            relative = mpmath.mpf(0)
        else:
            float64_acc = all(g.dtype == torch.float64 for g in grads) or p not in (1.0, 2.0)
            u = mpmath.ldexp(1, -53 if float64_acc else -24)
            m = max(g.numel() for g in grads) + len(grads) + 4
            relative = m * u * max(1, 1 / abs(mpmath.mpf(p)))
            if not float64_acc and any(g.dtype == torch.bfloat16 for g in grads):
                relative = (1 + relative) * (1 + mpmath.mpf(BF16_UNIT)) - 1  # per-tensor norms in bf16
        return relative


def bound_violation(result: torch.Tensor, exact: mpmath.mpf, relative: mpmath.mpf, label: str) -> str | None:
    """None when ``result`` is within half an ulp (of its dtype, at the exact norm grown by the
    relative term) plus ``relative`` times the exact norm, else a description starting ``label``. An
    inf is accepted where that band reaches the dtype's overflow threshold (such a norm may round to
    inf)."""
    with mpmath.workprec(MP_PREC):
        bound = ulp(abs(exact) * (1 + relative), result.dtype) / 2 + relative * abs(exact)
        largest = mpmath.mpf(torch.finfo(result.dtype).max)
        if float(result) == math.inf and exact + bound >= largest + ulp(largest, result.dtype) / 2:
            return None
        error = abs(mpmath.mpf(float(result)) - exact)
        if error <= bound:
            return None
        return (
            f"{label}: |{float(result)!r} - {mpmath.nstr(exact, 20)}| = {mpmath.nstr(error, 5)}"
            f" > {mpmath.nstr(bound, 5)} ({mpmath.nstr(error / abs(exact) if exact else error, 5)} relative)"
        )


def violation(result: torch.Tensor, grads: list[torch.Tensor], p: float) -> str | None:
    """None when ``result`` is within the stated bound, else a description."""
    return bound_violation(result, exact_norm(grads, p), stated_relative_bound(grads, p), f"p={p}")


@st.composite
def grad_sets(draw, dtype_name: str):
    """1-5 non-empty grads of 1-64 elements, magnitudes over 8 binades, some zeros and signs."""
    count = draw(st.integers(1, 5))
    grads = []
    for index in range(count):
        if dtype_name == "mix":
            dtype = torch.bfloat16 if index % 2 == 0 else torch.float32
        else:
            dtype = DTYPES[dtype_name]
        n = draw(st.integers(1, 64))
        mantissas = draw(st.lists(st.floats(-2.0, 2.0, allow_nan=False, allow_subnormal=False), min_size=n, max_size=n))
        exponents = draw(st.lists(st.integers(-4, 4), min_size=n, max_size=n))
        values = [m * 2.0**e for m, e in zip(mantissas, exponents)]
        grads.append(torch.tensor(values, dtype=torch.float64).to(dtype))
    return grads


def torch_backend_total(grads: list[torch.Tensor], p: float) -> torch.Tensor:
    return fusedclip.get_total_norm([g.clone() for g in grads], p, backend="torch")


#: the smallest fp16 subnormal, twice: norms that round within fp16's subnormal range (found by
#: the search once; a spacing taken from the normal range made their correct rounding fail)
SUBNORMAL_FP16 = [torch.tensor([2.0**-24, 2.0**-24], dtype=torch.float16)]


@pytest.mark.parametrize("p", ORDERS, ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16", "fp16", "fp64", "mix"])
def test_torch_backend_meets_the_stated_bound(dtype_name, p):
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(grads=grad_sets(dtype_name))
    @example(grads=SUBNORMAL_FP16 if dtype_name == "fp16" else [torch.ones(3, dtype=DTYPES.get(dtype_name, torch.float32))])
    def check(grads):
        result = torch_backend_total(grads, p)
        expected_dtype = grads[0].dtype
        for g in grads[1:]:
            expected_dtype = torch.promote_types(expected_dtype, g.dtype)
        assert result.dtype == expected_dtype
        problem = violation(result, grads, p)
        assert problem is None, problem

    check()


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0], ids=lambda p: f"p{p:g}")
def test_a_norm_beyond_the_dtype_range_is_inf(p):
    """fp16 grads whose norm exceeds 65504 (found by the search for p = 0.5): inf is the correctly
    rounded total, and the oracle accepts it; the largest finite value is refused."""
    grads = [torch.full((4,), 60000.0, dtype=torch.float16)]
    result = torch_backend_total(grads, p)
    assert result.item() == math.inf
    assert violation(result, grads, p) is None
    assert violation(torch.tensor(65504.0, dtype=torch.float16), grads, p) is not None


def bf16_norm_terms(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norms the torch backend combines for a CPU total of bf16 ``grads``: torch's own
    per-tensor norms of the large grads (float32 accumulation, rounded to bf16), and the float32
    norms of rows of 1024 of the small ones laid end to end (zero-padded; one chunk: fewer than 1M
    elements of them)."""
    from fusedclip.backends.torch_backend import CPU_PACK_OWN_DTYPE_ELEMENTS, CPU_ROW_ELEMENTS

    large = [g for g in grads if g.numel() >= CPU_PACK_OWN_DTYPE_ELEMENTS]
    small = torch.cat([g.reshape(-1) for g in grads if g.numel() < CPU_PACK_OWN_DTYPE_ELEMENTS] + [grads[0].reshape(-1)[:0]])
    rows = torch.nn.functional.pad(small, (0, -small.numel() % CPU_ROW_ELEMENTS)).view(-1, CPU_ROW_ELEMENTS)
    large_norms = torch.stack(torch._foreach_norm(large, 2.0)).float() if large else torch.zeros(0)
    return torch.cat([large_norms, rows.float().norm(dim=1)])


@pytest.mark.parametrize("size", [300, 20_000], ids=["packed", "torchs-own"])
def test_clip_coefficient_comes_from_the_unrounded_total(size):
    """bf16 grads: the scaled grads equal float32(x) * float32(max_norm / (T + 1e-6)) rounded once
    per element, with T the float64 combination of the norms in ``bf16_norm_terms`` (small grads'
    rows, or torch's own per-tensor norms), never rounded to bf16 (torch computes the coefficient
    from the bf16-rounded total)."""
    torch.manual_seed(0)
    grads = [torch.randn(size).bfloat16() * 3 for _ in range(4)]
    params = []
    for g in grads:
        param = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        param.grad = g.clone()
        params.append(param)
    max_norm = 1.0
    total = fusedclip.clip_grad_norm_(params, max_norm, backend="torch")
    assert violation(total, grads, 2.0) is None
    unrounded = torch.linalg.vector_norm(bf16_norm_terms(grads).double())
    coef = (max_norm / (unrounded + 1e-6)).float()
    assert coef != (max_norm / (unrounded.bfloat16().double() + 1e-6)).float()
    for param, g in zip(params, grads):
        assert torch.equal(param.grad, (g.float() * coef).bfloat16())


def rounded_per_tensor_total(grads: list[torch.Tensor], p: float) -> torch.Tensor:
    """Worse than the stated bound for fp16 (any p) and for bf16 with p != 1, 2: torch's per-tensor
    norms, each rounded to the grad's dtype (what torch.nn.utils.clip_grad_norm_ does for
    bf16/fp16), then combined exactly."""
    norms = torch.stack([torch.linalg.vector_norm(g, p).double() for g in grads])
    out = grads[0].dtype
    for g in grads[1:]:
        out = torch.promote_types(out, g.dtype)
    return torch.linalg.vector_norm(norms, p).to(out)


def bf16_accumulated_total(grads: list[torch.Tensor], p: float) -> torch.Tensor:
    """A deliberately worse implementation than torch's: every per-tensor sum of |x|^p accumulated
    in bf16 (each partial sum rounded to bf16), then combined exactly."""
    norms = []
    for g in grads:
        acc = torch.zeros((), dtype=g.dtype)
        for term in g.abs().pow(p):
            acc = acc + term
        norms.append(acc.double() ** (1 / p))
    return torch.linalg.vector_norm(torch.stack(norms), p).to(grads[0].dtype)


def random_sets(dtype: torch.dtype, magnitude: float, count: int = 200):
    generator = torch.Generator().manual_seed(1234)
    for _ in range(count):
        yield [
            (torch.randn(int(n), generator=generator, dtype=torch.float64) * magnitude).to(dtype)
            for n in torch.randint(20, 200, (4,), generator=generator)
        ]


@pytest.mark.parametrize(
    ("dtype_name", "p"),
    [("fp16", 1.0), ("fp16", 2.0), ("fp16", 3.0), ("fp16", 0.5), ("bf16", 3.0), ("bf16", 0.5)],
    ids=lambda v: v if isinstance(v, str) else f"p{v:g}",
)
def test_the_bound_catches_per_tensor_rounding(dtype_name, p):
    """The check has teeth: where the backend accumulates without rounding per tensor (fp16; bf16
    with a general p, summed in float64), rounding each per-tensor norm to the grads' dtype breaks
    the bound on some of a few hundred random sets, while the torch backend meets it on all."""
    caught = 0
    magnitude = 3.0 if p >= 1 else 3.0 / 64  # p = 0.5 norms of ~400 elements: keep them inside fp16's range
    for grads in random_sets(DTYPES[dtype_name], magnitude):
        assert violation(torch_backend_total(grads, p), grads, p) is None
        if violation(rounded_per_tensor_total(grads, p), grads, p) is not None:
            caught += 1
    assert caught >= 10, f"the per-tensor-rounding implementation broke the bound only {caught} times in 200"


@pytest.mark.parametrize("p", [1.0, 2.0], ids=lambda p: f"p{p:g}")
def test_the_bf16_bound_is_torchs_own_and_catches_worse(p):
    """bf16, p = 1 and 2: torch's own clip_grad_norm_ total and the torch backend's meet the bound on
    every one of a few hundred random sets; per-tensor sums accumulated in bf16 break it."""
    caught = 0
    for grads in random_sets(torch.bfloat16, 3.0):
        assert violation(torch_backend_total(grads, p), grads, p) is None
        assert violation(torch.nn.utils.get_total_norm(grads, p, foreach=True), grads, p) is None
        if violation(bf16_accumulated_total(grads, p), grads, p) is not None:
            caught += 1
    assert caught >= 20, f"the bf16-accumulating implementation broke the bound only {caught} times in 200"


BF16_SHAPES = [(1000,), (3, 5), (0,), (1 << 21,) , (77, 13), (1,), (3_000_001,)]


@pytest.mark.parametrize("foreach", [None, True, False], ids=lambda f: f"foreach={f}")
@pytest.mark.parametrize("p", [1.0, 2.0], ids=lambda p: f"p{p:g}")
def test_bf16_per_tensor_norms_are_torchs_bits(p, foreach):
    """bf16 CPU grads (large tensors included, past the chunk and piece sizes): every per-tensor norm
    is bit-identical to torch._foreach_norm's, and the total is the float64 norm of those (p = 1) or
    of ``bf16_norm_terms`` (p = 2: small grads packed) rounded once (also with float32 grads in the
    set, whose norms stay float32-accumulated)."""
    generator = torch.Generator().manual_seed(7)
    grads = [torch.randn(shape, generator=generator).bfloat16() * 5 for shape in BF16_SHAPES]
    theirs = torch.stack(torch._foreach_norm(grads, p))
    terms = bf16_norm_terms(grads) if p == 2.0 else theirs
    total, per_tensor = fusedclip.get_norms([g.clone() for g in grads], p, backend="torch")
    assert torch.equal(per_tensor, theirs.to(per_tensor.dtype))
    assert total.dtype == torch.bfloat16
    assert torch.equal(total, round_once(torch.linalg.vector_norm(terms.double(), p), torch.bfloat16))
    params = []
    for g in grads:
        param = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        param.grad = g.clone()
        params.append(param)
    clipped_total = fusedclip.clip_grad_norm_(params, 1.0, p, foreach=foreach, backend="torch")
    assert torch.equal(clipped_total, total)

    extra = torch.randn(4099, generator=generator)
    mixed = [*grads, extra]
    total, per_tensor = fusedclip.get_norms([g.clone() for g in mixed], p, backend="torch")
    assert torch.equal(per_tensor[: len(grads)], theirs.to(per_tensor.dtype))
    assert torch.equal(per_tensor[-1], torch.linalg.vector_norm(extra, p))
    exact = torch.linalg.vector_norm(torch.cat([terms.double(), extra.double()]), p)
    assert abs(float(total) - float(exact)) <= 4 * 2**-24 * float(exact)


@st.composite
def bf16_packed_sets(draw):
    """bf16 grads for the CPU 2-norm's packing: up to 1500 small ones (some 2-d, transposed or
    strided views, some zero-size) that are packed into bf16 chunks (more than one chunk of 1M
    elements when many are large), mixed with up to two large ones that get torch's own norms, and
    a float32 grad now and then; magnitudes from 2^-20 to 2^20 per grad."""
    from fusedclip.backends.torch_backend import CPU_PACK_OWN_DTYPE_ELEMENTS

    seed = draw(st.integers(0, 2**16))
    small = draw(st.integers(1, 1500))
    largest = draw(st.sampled_from([64, 2048, CPU_PACK_OWN_DTYPE_ELEMENTS - 1]))
    large = draw(st.integers(0, 2))
    generator = torch.Generator().manual_seed(seed)
    grads = []
    for index in range(small + large):
        scale = 2.0 ** int(torch.randint(-20, 21, (), generator=generator))
        if index >= small:
            n = CPU_PACK_OWN_DTYPE_ELEMENTS + int(torch.randint(0, 30_000, (), generator=generator))
            grads.append((torch.randn(n, generator=generator) * scale).bfloat16())
            continue
        n = int(torch.randint(0, largest + 1, (), generator=generator))
        base = (torch.randn(2 * n + 2, generator=generator) * scale).bfloat16()
        kind = index % 4
        if kind == 1 and n >= 4:
            grads.append(base[: n // 2 * 2].view(2, -1).t())  # transposed
        elif kind == 2:
            grads.append(base[::2][:n])  # strided
        else:
            grads.append(base[:n])
    if draw(st.booleans()):
        grads.append(torch.randn(3000, generator=generator))
    return grads


def packed_bf16_violation(grads: list[torch.Tensor]) -> str | None:
    """The torch backend's CPU 2-norm of ``grads`` against its accuracy, the exact norm taken in
    float64 (its own error, under 2^-40 relative here, is far inside either bound): where every
    bf16 grad is packed (small), that of a float32 cascade (``4 + log2(n)`` float32 epsilons);
    otherwise the stated bound (torch's own bf16 norms for the large ones). Either way plus half an
    ulp of the result's dtype (bf16 when every grad is)."""
    from fusedclip.backends.torch_backend import CPU_PACK_OWN_DTYPE_ELEMENTS

    total = fusedclip.get_total_norm(grads, 2.0, backend="torch")
    exact = mpmath.mpf(torch.linalg.vector_norm(torch.cat([g.reshape(-1).double() for g in grads]), 2.0).item())
    bf16 = [g for g in grads if g.dtype == torch.bfloat16]
    if all(g.numel() < CPU_PACK_OWN_DTYPE_ELEMENTS for g in bf16):
        count = sum(g.numel() for g in grads)
        relative = (4 + mpmath.log(max(count, 1), 2)) * mpmath.ldexp(1, -23)
    else:
        relative = stated_relative_bound(grads, 2.0)
    return bound_violation(total, exact, relative, f"{len(grads)} grads")


def test_packed_bf16_chunks_meet_the_stated_bound():
    """Small bf16 CPU grads packed into bf16 chunks and normed by rows in float32: as accurate as a
    float32 cascade (never rounded to bf16 on the way), and within the stated bound beside large
    ones (torch's own bf16 norms), whatever the layout of the grads."""

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(grads=bf16_packed_sets())
    def check(grads):
        problem = packed_bf16_violation(grads)
        assert problem is None, problem

    check()


def test_the_packed_bf16_check_catches_worse_rows(monkeypatch):
    """The planted bugs: each packed row's squares summed in bf16 (every partial sum rounded), where
    torch's kernel accumulates in float32; and each row's norm rounded to bf16. A few thousand
    values of similar size (with one float32 grad, so that the total is float32) break the check
    with either."""
    from fusedclip.backends import torch_backend

    generator = torch.Generator().manual_seed(3)
    grads = [(torch.rand(700, generator=generator) + 1).bfloat16() for _ in range(4)] + [torch.ones(3)]
    assert packed_bf16_violation(grads) is None

    def summed_in_bf16(rows: torch.Tensor, out: torch.Tensor) -> None:
        total = torch.zeros(rows.shape[0], dtype=rows.dtype)
        for column in rows.t():
            total = total + column * column
        out.copy_(total.sqrt())

    def rounded_to_bf16(rows: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(torch.linalg.vector_norm(rows, 2.0, dim=1))  # bf16 in, bf16 out

    for planted in (summed_in_bf16, rounded_to_bf16):
        monkeypatch.setattr(torch_backend, "_row_norms", planted)
        assert packed_bf16_violation(grads) is not None, planted.__name__


def float32_chunk_violation(result: torch.Tensor, grads: list[torch.Tensor], p: float) -> str | None:
    """None when a float32 total is within ``4 + log2(n)`` float32 epsilons (relative) plus half an
    ulp of the exact total: what a cascade sum of each float32 chunk delivers, independent of how
    the grads are packed into chunks. A sum accumulated along the chunk exceeds it on large chunks.
    """
    exact = torch.linalg.vector_norm(torch.cat([g.reshape(-1).double() for g in grads]), p).item()
    count = sum(g.numel() for g in grads)
    bound = (4 + math.log2(count)) * 2.0**-23 * exact + 2.0**-24 * exact
    error = abs(float(result) - exact)
    if error <= bound:
        return None
    return f"p={p:g}, {len(grads)} grads, {count} elements: error {error / exact:.3g} relative > {bound / exact:.3g}"


@st.composite
def chunked_sets(draw):
    """float32 (first) and fp16 grads, up to ~3.4M elements in all: small grads packed together into
    chunks, large float32 ones reduced by rows where they lie, fp16 ones converted. float32 grads
    between CPU_DIRECT_ROWS_ELEMENTS and CPU_ROWS_ELEMENTS get torch's own per-tensor norm (its
    accuracy, see ``test_clip_grad_norm_is_never_farther_from_ideal_than_torch``), so they are not
    drawn here."""
    from fusedclip.backends import torch_backend

    packed_sizes = st.integers(1, torch_backend.CPU_DIRECT_ROWS_ELEMENTS - 1)
    row_sizes = st.integers(torch_backend.CPU_ROWS_ELEMENTS, torch_backend.CPU_ROWS_ELEMENTS + 300_000)
    first = draw(st.one_of(packed_sizes, row_sizes))
    specs = [(torch.float32, first)] + draw(
        st.lists(
            st.tuples(st.just(torch.float16), st.integers(1, 300_000)) | st.tuples(st.just(torch.float32), packed_sizes),
            max_size=7,
        )
    )
    small = draw(st.integers(0, 2000))  # how many small grads of 1-500 elements join them
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 500, (small,), generator=generator).tolist()
    grads = [torch.rand(n, generator=generator) + 1 for n in [specs[0][1], *sizes]]  # float32 first
    grads += [(torch.rand(n, generator=generator) + 1).to(dtype) for dtype, n in specs[1:]]
    return grads


@pytest.mark.parametrize("p", [1.0, 2.0], ids=lambda p: f"p{p:g}")
def test_cpu_float32_chunks_are_summed_as_accurately_as_a_cascade(p):
    """The torch backend's CPU path packs small grads into float32 chunks of up to 1M elements and
    reduces large float32 grads by rows where they lie: either way the total stays within
    log2(n) + 4 epsilons of the exact one, and never farther from it than torch's own total (which
    is exact per small tensor but not on large ones)."""

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(grads=chunked_sets())
    def check(grads):
        ours = fusedclip.get_total_norm(grads, p, backend="torch")
        assert ours.dtype == torch.float32
        problem = float32_chunk_violation(ours, grads, p)
        assert problem is None, problem
        theirs = torch.nn.utils.get_total_norm(grads, p)
        exact = torch.linalg.vector_norm(torch.cat([g.reshape(-1).double() for g in grads]), p).item()
        assert abs(float(ours) - exact) <= abs(float(theirs) - exact) + 2.0**-23 * exact

    check()


@pytest.mark.parametrize("p", [1.0, 2.0], ids=lambda p: f"p{p:g}")
def test_the_chunk_check_catches_a_sum_along_the_chunk(monkeypatch, p):
    """The planted bug: chunks reduced by accumulating along the whole chunk, as
    ``torch.linalg.vector_norm`` does on CPUs (p = 1: instead of the cascade sum; p = 2: rows as
    long as the chunk instead of short rows). A million equal values (their rounding errors add up
    along the chunk instead of cancelling) packed from a thousand small grads, and one large grad
    reduced where it lies, both break the check; the real backend passes on both."""
    from fusedclip.backends import torch_backend

    packed = [torch.full((1000,), 1.1) for _ in range(1000)]
    direct = [torch.full((1 << 20,), 1.1)]
    for grads in (packed, direct):
        assert float32_chunk_violation(fusedclip.get_total_norm(grads, p, backend="torch"), grads, p) is None
    if p == 1.0:
        monkeypatch.setattr(
            torch_backend, "_chunk_norm", lambda values, scratch, order: torch.linalg.vector_norm(values, order).double()
        )
    else:
        monkeypatch.setattr(torch_backend, "CPU_ROW_ELEMENTS", 1 << 20)
    for grads in (packed, direct):
        assert float32_chunk_violation(fusedclip.get_total_norm(grads, p, backend="torch"), grads, p) is not None


#: float32 sets whose float32 chunk sums overflow or underflow, and what they test
EXTREME_SETS = {
    "squares overflow": [torch.full((1000,), 3e19), torch.full((24,), -2e20)],
    "sum of |x| overflows": [torch.full((10,), 1e38)],
    "squares underflow": [torch.full((1000,), 1e-25), torch.full((10,), -3e-24)],
    "subnormal elements": [torch.full((5000,), 1e-41)],
    "tiny beside normal": [torch.full((1000,), 1e-20), torch.full((3,), 1e-10)],
}


def _extreme_violation(name: str, p: float) -> str | None:
    grads = EXTREME_SETS[name]
    exact = torch.linalg.vector_norm(torch.cat([g.double() for g in grads]), p).item()
    ours = fusedclip.get_total_norm([g.clone() for g in grads], p, backend="torch").item()
    limit = float(torch.finfo(torch.float32).max)
    if exact > limit:  # the norm itself does not fit in float32
        return None if ours == math.inf else f"{name}, p={p:g}: {ours!r} for a norm above float32's range"
    wanted = float(torch.tensor(exact, dtype=torch.float32))  # the exact norm rounded once
    count = sum(g.numel() for g in grads)
    if abs(ours - wanted) <= (4 + math.log2(count)) * 2.0**-24 * abs(wanted):  # a float32 cascade sum's error
        return None
    return f"{name}, p={p:g}: {ours!r}, exact {exact!r}"


@pytest.mark.parametrize("p", [1.0, 2.0], ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("name", list(EXTREME_SETS))
def test_cpu_chunks_that_float32_cannot_sum_are_redone_in_float64(name, p):
    """Squares above ~1.8e19 overflow float32 and squares below ~1e-19 underflow it: the CPU total is
    still the exact norm rounded once (float32 chunk sums that overflow or may have underflowed are
    redone in float64), where torch returns inf or 0."""
    problem = _extreme_violation(name, p)
    assert problem is None, problem


def test_the_extreme_check_catches_float32_only_sums(monkeypatch):
    """The planted bug: float32 chunk sums always trusted (no float64 redo)."""
    from fusedclip.backends import torch_backend

    monkeypatch.setattr(torch_backend, "_float32_sum_trusted", lambda value, count, p: True)
    caught = [(name, p) for name in EXTREME_SETS for p in (1.0, 2.0) if _extreme_violation(name, p) is not None]
    assert {name for name, _ in caught} >= {"squares overflow", "squares underflow", "subnormal elements"}, caught


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_packing_copies_every_layout_exactly(dtype):
    """The CPU path's packing copy (``_pack``) against ``cat`` of flattened float32 copies: one 0-d
    tensor alone (torch's ``_chunk_cat`` crashes on it), 0-d among others (it refuses those),
    strided, transposed and expanded views, 16-bit values converted exactly."""
    from fusedclip.backends.torch_backend import _pack

    base = torch.linspace(-3, 3, 64).to(dtype)
    cases = [
        [base[5]],
        [base[7], base[:3]],
        [base[::3], base.view(8, 8).t()],
        [base[:1].expand(9), base[10:20].view(2, 5)],
        [base.view(4, 16)[:, ::5], base[2]],
    ]
    for pieces in cases:
        expected = torch.cat([piece.reshape(-1).float() for piece in pieces])
        out = torch.full((expected.numel() + 3,), math.nan)  # the tail must stay untouched
        _pack(pieces, out[: expected.numel()])
        assert torch.equal(out[: expected.numel()], expected)
        assert out[expected.numel() :].isnan().all()


ZERO_D_SCRIPT = """
import torch, fusedclip
for dtype in (torch.bfloat16, torch.float32, torch.float16):
    for shapes in ([(), ()], [(), (), (3,)], [(256, 256), (), ()]):
        grads = [((torch.arange(max(1, torch.Size(s).numel()), dtype=torch.float64) % 97 + 1).reshape(s) / 7).to(dtype) for s in shapes]
        ours = fusedclip.get_total_norm(grads, 2.0, backend="torch")
        exact = torch.linalg.vector_norm(torch.cat([g.reshape(-1).double() for g in grads]))
        assert abs(float(ours) - float(exact)) <= 2**-7 * float(exact), (dtype, shapes, float(ours), float(exact))
print("ok")
"""


def test_sets_of_0d_grads_are_packed_without_crashing():
    """torch 2.13's ``_chunk_cat`` crashes the process when every piece it is given is 0-d: sets whose
    small grads are all scalars (a temperature, a logit scale) must still get their norm. Run in a
    child process, so that a crash fails this test instead of ending the test run."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", ZERO_D_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])
