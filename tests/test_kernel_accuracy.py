"""The kernel backends' accuracy bound (``cpu``, ``cuda``, ``triton``), checked against a 200-bit
mpmath oracle (the helpers of ``test_torch_backend_accuracy``).

The bound has the torch backend's form: the returned total ``R`` of the exact norm ``T`` satisfies

    |R - T| <= 1/2 ulp_out(T') + m * u * max(1, 1/|p|) * |T|,   T' = |T| (1 + m u max(1, 1/|p|))

* p = 0, inf, -inf: m = 0, the result is correctly rounded (counts and max/min are exact, and the
  total is rounded once: float32 by a plain conversion, bf16/fp16 through a float32 rounded to odd
  or a direct double conversion, both the correctly rounded result).
* p = 1, 2 on the ``cpu`` backend when a float32, bf16 or fp16 grad is in the set: u = 2^-24,
  m = 14. Such data is summed in float32 blocks of 256 elements (each element into one of 32 lanes,
  8 deep, the lanes by a fixed 5-level tree): each term passes at most 13 float32 roundings (its
  square, 7 lane additions, 5 tree additions), so a block sum is within 13 u (1 + 13 u) of exact
  (all terms are >= 0). Block sums whose squares could have underflowed (sum below 1e-30) or that
  overflow are redone in float64; squares that underflow inside a kept block lose less than
  256 * 2^-149 in all, under 2^-40 of the block sum. Blocks, the float64 tails of chunks, chunks and
  grads are then added in float64: fewer than 2^28 such additions cost less than 2^-1 u. The
  square root halves the relative error and adds a float64 rounding. Float64 grads in the same set
  are summed as below, within (N + 2) 2^-53 of exact: also inside 14 u while N < 2^32.
* everything else, u = 2^-53: float64 grads on the ``cpu`` backend with p = 1, 2 (float64 lanes),
  every dtype with p = 1, 2 on ``cuda`` and ``triton`` (every element widened to float64 and summed
  there), and every other finite p on all three (the sum of ``(|x| / M)^p``, ``M`` the largest
  ``|x|`` for p > 0 and the smallest for p < 0, in float64):

  - p = 1, 2: m = N + 2, N the number of elements of all grads together. Every accumulation is a
    tree of float64 additions over the element terms (lanes, threads or programs, then chunks,
    units, blocks, tensors: the order differs per backend, the count does not), and adding an
    identity 0 is exact, so no term passes more than N - 1 roundings; plus the square and the
    square root. On large sets the chains are far shorter (16 float64 lanes per chunk on the
    ``cpu`` backend, 256 threads per unit on ``cuda``, the block width per program on ``triton``),
    but N bounds them all.
  - general p: m = N + 20. Each term ``(|x| / M)^p`` is within |p| u (the quotient's rounding) plus
    pow's error (at most 2 ulps, CUDA's documented bound; glibc's is below 1) of exact; the sum adds
    N - 1 roundings; the 1/p power divides the sum's relative error by |p| and adds its own
    (``cpu``/``cuda``: pow and one Newton step, whose error is (pow's error + 1 ulp) / |p| + 2 u;
    ``triton``: its exp2/log2 power with a double-word 1/p, within about (3.5 / |p| + 5) u); the
    product with ``M`` one more rounding. Collected, every term fits in (N + 20) u max(1, 1/|p|).
    Relative to ``M`` nothing overflows, but a quotient ``|x| / M`` below float64's normal range
    (2^-1022; for p < 0, above 2^1024) loses its term, which is negligible unless |p| is tiny: the
    bound holds when the non-zero ``|x|`` span less than 2^1022 (always for float32, bf16 and fp16
    grads, whose range is 2^277) or when |p| >= 0.1 (the lost terms then stay below N 2^-102).
    Float64 grads spanning more, with a tiny |p|, are outside it: see
    ``test_terms_beyond_float64s_range_relative_to_the_norm_scale``.

The total is then rounded once to the result dtype: the 1/2 ulp term.

The checks can fail: an implementation that rounds each per-tensor norm to the grad's dtype (torch's
``clip_grad_norm_`` for bf16/fp16), run through each backend's own norm launch, breaks the bound,
and so does a float32 running sum of the squares.
"""

from __future__ import annotations

import math

import mpmath
import numpy
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fusedclip
from fusedclip import plan
from fusedclip.backends import kernel_base

from conftest import BACKEND_CASES
from test_torch_backend_accuracy import DTYPES, MP_PREC, bound_violation, exact_norm, grad_sets

#: the kernel backends' (device, backend) cases; the GPU ones are skipped on machines without CUDA
KERNEL_CASES = [case for case in BACKEND_CASES if case.values[0][1] != "torch"]
ORDERS = [0.5, 1.0, 2.0, 3.0, -1.0, -0.3, math.inf, -math.inf, 0.0]
#: "mix": bf16 and float32 grads; "mix64": float32, bf16 and fp16 grads with one float64 grad, so the
#: total is returned in float64 and the accumulation of 16/32-bit data is seen beyond their precision
DTYPE_NAMES = ["fp32", "bf16", "fp16", "fp64", "mix", "mix64"]
MIX64 = [torch.float32, torch.bfloat16, torch.float16]
#: examples per (backend, dtype, order): the emulated CUDA and interpreted Triton kernels are slow per call
EXAMPLES = {"cpu": 12, "cuda": 4, "triton": 3}
SETTINGS = dict(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: the constants of m (see above): float32 blocks; float64 sums of p = 1, 2; general p
FLOAT32_BLOCK_M = 14
SUM_M_EXTRA = 2
GENERAL_M_EXTRA = 20


def relative_bound(grads: list[torch.Tensor], p: float, backend: str) -> mpmath.mpf:
    """``m * u * max(1, 1/|p|)`` of the module docstring for ``backend``."""
    with mpmath.workprec(MP_PREC):
        if p in (0.0, math.inf, -math.inf):
            return mpmath.mpf(0)
        scale = max(1, 1 / abs(mpmath.mpf(p)))
        if p in (1.0, 2.0) and backend == "cpu" and any(g.dtype != torch.float64 for g in grads):
            return FLOAT32_BLOCK_M * mpmath.ldexp(1, -24) * scale
        count = sum(g.numel() for g in grads)
        extra = SUM_M_EXTRA if p in (1.0, 2.0) else GENERAL_M_EXTRA
        return (count + extra) * mpmath.ldexp(1, -53) * scale


def kernel_violation(result: torch.Tensor, grads: list[torch.Tensor], p: float, backend: str) -> str | None:
    """None when ``result`` is within ``backend``'s bound of the exact norm, else a description."""
    return bound_violation(result, exact_norm(grads, p), relative_bound(grads, p, backend), f"{backend}, p={p}")


def result_dtype(grads: list[torch.Tensor]) -> torch.dtype:
    out = grads[0].dtype
    for g in grads[1:]:
        out = torch.promote_types(out, g.dtype)
    return out


def kernel_total(grads: list[torch.Tensor], p: float, backend: str, device: str) -> torch.Tensor:
    on_device = [g.to(device) for g in grads]
    return fusedclip.get_total_norm(on_device, p, backend=backend).cpu()


def check_set(grads: list[torch.Tensor], p: float, backend: str, device: str) -> None:
    result = kernel_total(grads, p, backend, device)
    assert result.dtype == result_dtype(grads)
    problem = kernel_violation(result, grads, p, backend)
    assert problem is None, problem


# ---- small sets: every dtype and order ------------------------------------------------------------


@st.composite
def kernel_grad_sets(draw, dtype_name: str):
    """The torch backend's strategy (1-5 grads of 1-64 elements over 8 binades, zeros and signs);
    "mix64": its float32 sets as float32, bf16 and fp16 grads in turn, and one float64 grad."""
    if dtype_name != "mix64":
        return draw(grad_sets(dtype_name))
    grads = [g.to(MIX64[index % 3]) for index, g in enumerate(draw(grad_sets("fp32")))]
    return grads + draw(grad_sets("fp64"))[:1]


@pytest.mark.parametrize("device_backend", KERNEL_CASES, indirect=True)
@pytest.mark.parametrize("p", ORDERS, ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_kernel_backend_meets_the_bound(device_backend, dtype_name, p):
    """1-5 grads of 1-64 elements over 8 binades, zeros and signs (the torch backend's strategy)."""
    device, name = device_backend

    @settings(max_examples=EXAMPLES[name], **SETTINGS)
    @given(grads=kernel_grad_sets(dtype_name))
    @example(grads=[torch.ones(3, dtype=DTYPES.get(dtype_name, torch.float32))])
    def check(grads):
        check_set(grads, p, name, device)

    check()


# ---- large sets: many blocks, chunks, units and programs ------------------------------------------


@st.composite
def large_sets(draw, dtype_name: str):
    """2-4 grads of 200-2600 elements (a few thousand in all; "mix64" adds a float64 grad): random
    magnitudes over 8 binades, or runs of one value (whose float32 rounding errors add up instead of
    cancelling)."""
    sizes = draw(st.lists(st.integers(200, 2600), min_size=2, max_size=4))
    seed = draw(st.integers(0, 2**16))
    equal = draw(st.booleans())
    generator = torch.Generator().manual_seed(seed)
    if dtype_name == "mix":
        dtypes = [torch.bfloat16 if index % 2 == 0 else torch.float32 for index in range(len(sizes))]
    elif dtype_name == "mix64":
        dtypes = [MIX64[index % 3] for index in range(len(sizes))] + [torch.float64]
        sizes.append(draw(st.integers(1, 300)))
    else:
        dtypes = [DTYPES[dtype_name]] * len(sizes)
    grads = []
    for dtype, n in zip(dtypes, sizes):
        if equal:
            values = torch.full((n,), 1.0 + torch.rand((), generator=generator, dtype=torch.float64).item())
        else:
            exponents = torch.randint(-4, 5, (n,), generator=generator).double()
            values = torch.randn(n, generator=generator, dtype=torch.float64) * torch.exp2(exponents)
        grads.append(values.to(dtype))
    return grads


@pytest.fixture(params=[plan.CHUNK_ELEMENTS, 1000], ids=["chunk-default", "chunk-1000"])
def chunk_size(request, monkeypatch):
    """The default chunks and chunks of 1000 elements (several per grad, each holding whole 256-element
    blocks and a tail)."""
    monkeypatch.setattr(plan.PLANS, "chunk_elements", request.param)
    plan.PLANS.clear()
    yield request.param
    plan.PLANS.clear()


LARGE_EXAMPLES = {"cpu": 8, "cuda": 3, "triton": 2}
#: the first grad of the fixed example (its second is float32): "mix64" returns float64 there
LARGE_EXAMPLE_DTYPES = {**DTYPES, "mix": torch.bfloat16, "mix64": torch.float64}


@pytest.mark.parametrize("device_backend", KERNEL_CASES, indirect=True)
@pytest.mark.parametrize("p", [1.0, 2.0], ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_kernel_backend_meets_the_bound_on_large_sets(device_backend, chunk_size, dtype_name, p):
    """p = 1, 2 over many float32 blocks, chunks (default and 1000 elements), CUDA units and Triton
    programs; a run of 4096 equal values beside 3000 others among the examples."""
    device, name = device_backend

    @settings(max_examples=LARGE_EXAMPLES[name], **SETTINGS)
    @given(grads=large_sets(dtype_name))
    @example(grads=[torch.full((4096,), 1.1).to(LARGE_EXAMPLE_DTYPES[dtype_name]), torch.full((3000,), 1.3)])
    def check(grads):
        check_set(grads, p, name, device)

    check()


# ---- the checks can fail ----------------------------------------------------------------------------


def random_sets(dtype: torch.dtype, magnitude: float, count: int):
    generator = torch.Generator().manual_seed(1234)
    for _ in range(count):
        yield [
            (torch.randn(int(n), generator=generator, dtype=torch.float64) * magnitude).to(dtype)
            for n in torch.randint(20, 200, (4,), generator=generator)
        ]


def round_per_tensor_norms(monkeypatch) -> None:
    """The planted bug: every norm launch returns the p-norm of its per-tensor norms, each rounded to
    its grad's dtype first (what torch.nn.utils.clip_grad_norm_ does for bf16 and fp16 grads)."""
    original = kernel_base.KernelBackend.run_norm

    def rounded(self, work, tables, norm, max_norm, out_dtype, per_tensor=None, grad_scale=None, norm_scale=None):
        norms = torch.empty(tables.num_tensors, dtype=torch.float64, device=work.device)
        _, coef, acc = original(self, work, tables, norm, max_norm, out_dtype, norms, grad_scale, norm_scale)
        norms = torch.stack([n.to(g.dtype).double() for n, g in zip(norms, work.grads)])
        return torch.linalg.vector_norm(norms, norm.p).to(out_dtype), coef, acc

    monkeypatch.setattr(kernel_base.KernelBackend, "run_norm", rounded)


#: (dtype, p, magnitude): magnitudes that keep the norms of ~400 elements in the dtype's normal range
PLANTED_CASES = [
    ("fp16", 1.0, 3.0),
    ("fp16", 2.0, 3.0),
    ("fp16", 3.0, 3.0),
    ("fp16", 0.5, 3.0 / 64),
    ("fp16", -1.0, 3.0),
    ("bf16", 1.0, 3.0),
    ("bf16", 2.0, 3.0),
    ("bf16", 0.5, 3.0),
    ("bf16", -0.3, 1e9),
]
#: the slow (emulated, interpreted) backends run three of them, on fewer sets
SLOW_PLANTED_CASES = [("fp16", 2.0, 3.0), ("bf16", 0.5, 3.0), ("bf16", -0.3, 1e9)]
#: random sets per backend, and how many of them the planted bug must fail on at least
PLANTED_SETS = {"cpu": (100, 8), "cuda": (8, 1), "triton": (8, 1)}


def planted_params():
    """(device and backend, dtype, p, magnitude) for every kernel case, marked as the case is."""
    for case in KERNEL_CASES:
        device_and_name = case.values[0]
        for dtype_name, p, magnitude in PLANTED_CASES if device_and_name[1] == "cpu" else SLOW_PLANTED_CASES:
            case_id = f"{dtype_name}-p{p:g}-{case.id}"
            yield pytest.param(device_and_name, dtype_name, p, magnitude, marks=case.marks, id=case_id)


@pytest.mark.parametrize(
    ("device_backend", "dtype_name", "p", "magnitude"), list(planted_params()), indirect=["device_backend"]
)
def test_the_bound_catches_per_tensor_rounding(device_backend, dtype_name, p, magnitude, monkeypatch):
    """The backend meets the bound on every random set; the same backend with its per-tensor norms
    rounded to the grads' dtype before they are combined breaks it on some."""
    device, name = device_backend
    count, needed = PLANTED_SETS[name]
    sets = list(random_sets(DTYPES[dtype_name], magnitude, count))
    for grads in sets:
        problem = kernel_violation(kernel_total(grads, p, name, device), grads, p, name)
        assert problem is None, problem
    round_per_tensor_norms(monkeypatch)
    caught = sum(kernel_violation(kernel_total(grads, p, name, device), grads, p, name) is not None for grads in sets)
    assert caught >= needed, f"per-tensor rounding broke the bound only {caught} times in {count}"


def float32_running_sum(grads: list[torch.Tensor], p: float) -> torch.Tensor:
    """A deliberately worse accumulation: every |x|^p added to one float32 running sum."""
    terms = numpy.concatenate([g.float().abs().pow(p).numpy().reshape(-1) for g in grads])
    total = numpy.cumsum(terms, dtype=numpy.float32)[-1]
    return torch.tensor(float(total), dtype=torch.float64).pow(1 / p).to(result_dtype(grads))


@pytest.mark.parametrize("bound_of", ["cpu", "cuda", "triton"])
@pytest.mark.parametrize("p", [1.0, 2.0], ids=lambda p: f"p{p:g}")
def test_the_bound_catches_a_float32_running_sum(bound_of, p):
    """float32 grads: a float32 running sum of 7096 terms breaks each backend's bound (the ``cpu``
    one, which allows for float32 blocks, too), on the set the large-set test passes there; the
    correctly rounded norm meets it."""
    grads = [torch.full((4096,), 1.1), torch.full((3000,), 1.3)]
    assert kernel_violation(float32_running_sum(grads, p), grads, p, bound_of) is not None
    correctly_rounded = torch.tensor(float(exact_norm(grads, p)), dtype=torch.float64).float()
    assert kernel_violation(correctly_rounded, grads, p, bound_of) is None


def test_the_bound_catches_a_few_ulps_beyond_it():
    """float64 grads, p = -0.3: the ``cpu`` backend's result is inside the bound, and the same result
    moved past the bound's edge by a few ulps is not."""
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(40, generator=generator, dtype=torch.float64) for _ in range(3)]
    result = kernel_total(grads, -0.3, "cpu", "cpu")
    assert kernel_violation(result, grads, -0.3, "cpu") is None
    exact = exact_norm(grads, -0.3)
    with mpmath.workprec(MP_PREC):
        edge = float(exact * (1 + relative_bound(grads, -0.3, "cpu")))
    beyond = torch.tensor(edge, dtype=torch.float64)
    for _ in range(3):
        beyond = torch.nextafter(beyond, torch.tensor(math.inf, dtype=torch.float64))
    assert kernel_violation(beyond, grads, -0.3, "cpu") is not None


@pytest.mark.parametrize("device_backend", KERNEL_CASES, indirect=True)
@pytest.mark.parametrize("p", [0.01, -0.01], ids=lambda p: f"p{p:g}")
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="general p is summed relative to the norm scale M; a term whose |x| / M leaves float64's "
    "range is dropped, which a tiny |p| does not make negligible",
)
def test_terms_beyond_float64s_range_relative_to_the_norm_scale(device_backend, p):
    """Outside the stated bound: float64 grads 1e-300 and 1e30 span 2^1096, so relative to the norm
    scale (1e30 for p > 0, 1e-300 for p < 0) the other value's quotient leaves float64's range and
    its term, 5e-4 of the sum for |p| = 0.01, is lost: the total comes back as 1e30 (1e-300) where
    the norm is 1.0514e30 (9.511e-301); torch.linalg.vector_norm gets it right."""
    device, name = device_backend
    grads = [torch.tensor([1e-300, 1e30], dtype=torch.float64)]
    problem = kernel_violation(kernel_total(grads, p, name, device), grads, p, name)
    assert problem is None, problem
