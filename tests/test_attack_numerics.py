"""Attacks on two numerics promises, against an exact oracle, for every backend available here.

1. Applying the clip coefficient. The kernel backends multiply float32/bfloat16/float16 grads by
   ``float32(coef)`` when ``coef`` is a normal float32 (torch's result), and otherwise (a small
   ``max_norm`` against grads near 3e38 makes ``coef`` fall below 2^-126, where ``float32(coef)``
   keeps only a few bits, or becomes 0) by the exact product rounded once. The oracle rounds the
   exact rational ``x * coef`` to the grad's dtype (round to nearest even, gradual underflow,
   overflow to inf) with ``fractions.Fraction``: bit-exact expectations, not tolerances.
2. General p (1e4 .. 1e308, -1e4, tiny, moderate p with values near 3e38 or 1e-40): the total is
   compared with the exact p-norm evaluated by mpmath at 160 bits (better than float64), within
   the error bound of a float64 computation relative to the max (min for p < 0), plus one unit in
   the last place of the result dtype.

Each property is also run against a deliberately broken version (the coefficient rounded to
float32 before use; ``|x|^p`` summed unscaled) and must fail there: the checks can fail.

The ``torch`` backend is held to the same promises on the CPU, where it reads the coefficient (on
other devices it applies the exact product to aliased grads only, see its ``scale_``); aliased grads,
which the kernel backends hand to it one tensor at a time, are checked on every CPU backend.
"""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import fusedclip
from fusedclip import engine
from fusedclip.backends import base
from fusedclip.norm_type import parse_norm_type

from conftest import BACKEND_CASES

CPU_CASES = [case for case in BACKEND_CASES if case.values[0][0] == "cpu"]
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
#: examples per backend: the interpreted and emulated kernels are slow per call
EXAMPLES = {"torch": 30, "cpu": 40, "triton": 10, "cuda": 12}

# (significand bits, smallest normal exponent, largest exponent) of each grad dtype
FORMATS = {
    torch.float64: (53, -1022, 1023),
    torch.float32: (24, -126, 127),
    torch.bfloat16: (8, -126, 127),
    torch.float16: (11, -14, 15),
}
FLOAT_MIN_NORMAL = 2.0**-126
FLOAT_MAX = float(torch.finfo(torch.float32).max)


# ---- the exact oracle of rounding ------------------------------------------------------------------


def round_exact(value: Fraction, dtype: torch.dtype, negative: bool = False) -> float:
    """``value`` (exact) rounded once to ``dtype``: nearest, ties to even, gradual underflow, overflow
    to inf. ``negative`` gives a zero its sign (a Fraction has none)."""
    bits, emin, emax = FORMATS[dtype]
    sign = -1.0 if value < 0 or (value == 0 and negative) else 1.0
    a = abs(value)
    if a == 0:
        return math.copysign(0.0, sign)
    e = a.numerator.bit_length() - a.denominator.bit_length()  # 2^e <= a < 2^(e + 2)
    if Fraction(2) ** e > a:
        e -= 1
    e = max(e, emin)
    quantum = Fraction(2) ** (e - bits + 1)
    steps, rest = divmod(a, quantum)
    if rest * 2 > quantum or (rest * 2 == quantum and steps % 2 == 1):
        steps += 1
    result = steps * quantum
    if result >= Fraction(2) ** (emax + 1):
        return sign * math.inf
    return sign * float(result)  # exact: every such value is a float64


def test_round_exact_agrees_with_torch_on_representable_roundings() -> None:
    torch.manual_seed(1)
    values = torch.randn(2000, dtype=torch.float64) * torch.exp2(torch.randint(-160, 130, (2000,)).double())
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        # torch rounds float64 -> float32 once (float32 -> 16-bit types from float32 values once)
        source = values if dtype is torch.float32 else values.float().double()
        source = source[torch.isfinite(source)]
        want = source.to(dtype).double().tolist()
        got = [round_exact(Fraction(v), dtype, v < 0) for v in source.tolist()]
        assert got == want


# ---- grads of any magnitude ------------------------------------------------------------------------


def values_of(dtype: torch.dtype, tiny_fraction: float = 0.25):
    """Finite values of ``dtype`` from its smallest subnormal to its largest, log-uniform in binade."""
    bits, emin, emax = FORMATS[dtype]
    lowest = emin - bits + 1  # exponent of the smallest subnormal

    def build(sign: int, exponent: int, mantissa: int) -> float:
        value = math.ldexp(1.0 + mantissa / 2**20, exponent)
        value = float(torch.tensor(value, dtype=torch.float64).to(dtype).double())
        if not math.isfinite(value):
            value = float(torch.finfo(dtype).max)
        return sign * value

    return st.builds(
        build, st.sampled_from([-1, 1]), st.integers(lowest, emax), st.integers(0, 2**20 - 1)
    )


def grads_of(dtype: torch.dtype, max_elements: int = 24):
    return st.lists(st.lists(values_of(dtype), min_size=1, max_size=max_elements), min_size=1, max_size=3)


def max_norms():
    """max_norm from 1e-45 to 1e3, log-uniform (plus a few exact edge values)."""
    return st.one_of(
        st.floats(-45.0, 3.0).map(lambda e: 10.0**e),
        st.sampled_from([1e-45, 1.4e-45, 1e-38, 1.1754943508222875e-38, 1e-5, 1e-3]),
    )


def representable(values: list[list[float]], dtype: torch.dtype) -> list[list[float]]:
    """The values as ``dtype`` holds them (rounded; beyond its range: its largest finite value)."""
    top = float(torch.finfo(dtype).max)
    rounded = [torch.tensor(row, dtype=torch.float64).clamp(-top, top).to(dtype).double().tolist() for row in values]
    return [[max(min(v, top), -top) for v in row] for row in rounded]


def make_params(values: list[list[float]], dtype: torch.dtype) -> list[torch.nn.Parameter]:
    params = []
    for row in values:
        param = torch.nn.Parameter(torch.zeros(len(row), dtype=dtype))
        param.grad = torch.tensor(row, dtype=torch.float64).to(dtype)
        params.append(param)
    return params


# ---- property 1: the coefficient is applied exactly ----------------------------------------------


def coefficient_is_wide(coef: float) -> bool:
    """True when the kernel backends apply ``coef`` as the exact product (outside float32's normal range)."""
    a = abs(coef)
    return a > 0 and (a < FLOAT_MIN_NORMAL or (FLOAT_MAX < a < math.inf))


def expected_scaled(x: float, coef: float, dtype: torch.dtype) -> float:
    """What fusedclip promises for ``x * coef`` (both exact values) in ``dtype``."""
    negative = (x < 0 or math.copysign(1.0, x) < 0) != (coef < 0)
    if dtype is torch.float64:
        return round_exact(Fraction(x) * Fraction(coef), dtype, negative)
    if coefficient_is_wide(coef):
        return round_exact(Fraction(x) * Fraction(coef), dtype, negative)
    # a normal float32 coefficient: the float32 product (torch's result), then the grad's dtype
    coef32 = float(torch.tensor(coef, dtype=torch.float64).float())
    product = round_exact(Fraction(x) * Fraction(coef32), torch.float32, negative)
    if dtype is torch.float32 or not math.isfinite(product):
        return product
    return round_exact(Fraction(product), dtype, product < 0 or math.copysign(1.0, product) < 0)


def clip_with_norm(values, dtype, max_norm: float, total: float, backend: str) -> tuple[float, list[list[float]]]:
    """Runs clip_grads_with_norm_ with a float64 total; returns the coefficient it must have used
    (computed here in float64 exactly as the backends do) and the scaled grads."""
    params = make_params(values, dtype)
    fusedclip.clip_grads_with_norm_(params, max_norm, torch.tensor(total, dtype=torch.float64), backend=backend)
    coef = float(base.clip_coefficient(torch.tensor(total, dtype=torch.float64), max_norm))  # the same float64 ops
    return coef, [p.grad.double().tolist() for p in params]


def check_scaled(values, dtype, coef: float, got: list[list[float]]) -> None:
    for row, got_row in zip(values, got):
        for x, y in zip(row, got_row):
            want = expected_scaled(x, coef, dtype)
            assert math.copysign(1.0, y) == math.copysign(1.0, want) and y == want, (
                f"{dtype}: {x!r} * {coef!r} gave {y!r}, the correctly rounded result is {want!r}"
            )


@pytest.mark.parametrize("device_backend", CPU_CASES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_coefficient_applied_exactly(device_backend, dtype) -> None:
    """Grads near 3e38 (and everything down to subnormal) clipped to max_norm down to 1e-45."""
    _, name = device_backend

    @settings(max_examples=EXAMPLES[name], **SETTINGS)
    @given(values=grads_of(dtype), max_norm=max_norms(), headroom=st.floats(0.0, 1.0))
    @example(values=[[3e38, -2.9e38, 1e-45]], max_norm=1e-3, headroom=0.0)
    @example(values=[[3e38, -3e38, 1.5e38]], max_norm=1e-5, headroom=0.0)
    @example(values=[[3.4e38, 1.0, -7e37]], max_norm=1e-45, headroom=0.0)
    def run(values, max_norm, headroom) -> None:
        values = representable(values, dtype)
        exact = float(exact_norm(values, 2.0))
        total = exact * (1.0 + headroom)  # any total above the true norm clips
        coef, got = clip_with_norm(values, dtype, max_norm, total, name)
        check_scaled(values, dtype, coef, got)

    run()


def _double_rounding_trap(dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(x, c): x of ``dtype``, c a float64 below 2^-126, with x * c just above the midpoint between 0
    and the smallest subnormal of ``dtype``. Rounded to float64 first, the product lands on the
    midpoint itself and then rounds to 0 (ties to even); rounded once it is the smallest subnormal."""
    bits, emin, _ = FORMATS[dtype]
    midpoint = 2.0 ** (emin - bits)
    for k in range(1, 1 << 16):
        x = float(torch.tensor(1.0 + (k % (1 << (bits - 1))) * 2.0 ** (1 - bits), dtype=torch.float64).to(dtype))
        c = midpoint / x
        exact = Fraction(x) * Fraction(c)
        if exact > Fraction(midpoint) and float(exact) == midpoint:
            return x, c
    raise AssertionError("no trap found")


def test_double_rounding_trap_is_one() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        x, c = _double_rounding_trap(dtype)
        naive = float(torch.tensor(x * c, dtype=torch.float64).float().to(dtype))  # float64, then float32, then dtype
        assert naive == 0.0
        bits, emin, _ = FORMATS[dtype]
        assert expected_scaled(x, c, dtype) == 2.0 ** (emin - bits + 1)


@pytest.mark.parametrize("device_backend", CPU_CASES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_coefficient_rounds_once(device_backend, dtype) -> None:
    """Products one float64 rounding would put on a rounding midpoint come out correctly rounded."""
    _, name = device_backend
    x, c = _double_rounding_trap(dtype)
    values = representable([[x, -x, 0.0, -0.0, 3e38, -1e-45]], dtype)
    params = make_params(values, dtype)
    engine.scale_(engine.prepare([p.grad for p in params], name), torch.tensor(c, dtype=torch.float64))
    check_scaled(values, dtype, c, [p.grad.double().tolist() for p in params])


#: a float64 coefficient below 2^-126 with all 53 significand bits in use
SUBNORMAL_COEF = 1.0 / 3.3e38


@pytest.mark.parametrize("device_backend", CPU_CASES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("coef_kind", ["trap", "subnormal"])
def test_aliased_grads_get_the_exact_product(device_backend, dtype, coef_kind) -> None:
    """Overlapping grads (views sharing elements, one grad listed twice, a strided view) are scaled
    one tensor after another (the kernel backends hand them to the torch backend): with a coefficient
    below float32's normal range every write is still the correctly rounded product, and a shared
    element is scaled once per grad holding it."""
    _, name = device_backend
    x, c = _double_rounding_trap(dtype)
    if coef_kind == "subnormal":
        c = SUBNORMAL_COEF
    rng = torch.Generator().manual_seed(3)
    big = ((torch.rand(10, generator=rng, dtype=torch.float64) * 2 - 1) * 3.3e38).tolist()
    values = representable([[x, -x, 0.0, *big]], dtype)[0]
    storage = torch.tensor(values, dtype=torch.float64).to(dtype)
    spans = [range(0, 8), range(5, 13), range(0, 8), range(1, 13, 3)]
    grads = [storage[s.start : s.stop : s.step] for s in spans]
    call = engine.prepare(grads, name)
    assert all(work.plan.aliased for _, work in call.works)
    engine.scale_(call, torch.tensor(c, dtype=torch.float64))
    expected = list(values)
    for span in spans:
        for i in span:
            expected[i] = expected_scaled(expected[i], c, dtype)
    got = storage.double().tolist()
    for i, (y, want) in enumerate(zip(got, expected)):
        assert math.copysign(1.0, y) == math.copysign(1.0, want) and y == want, (i, values[i], c, y, want)
    if coef_kind == "subnormal":  # twice-scaled elements land among float32's subnormals, not all at 0
        assert any(0 < abs(v) < FLOAT_MIN_NORMAL for v in got)


@pytest.mark.parametrize("coef", [SUBNORMAL_COEF, 1e-45, 3e39, 0.37, 0.0, -0.0, math.inf, math.nan, 1.0])
def test_torch_backend_device_side_choice(monkeypatch, coef) -> None:
    """Where the torch backend cannot read the coefficient (a device tensor), it chooses between
    ``float32(coef)`` and the exact product on the device: the same bits as the choice read on the host."""
    values = representable([[3.3e38, -2e38, 1.0, -1e-45, 0.0, 5e-39], [7e37, -0.0]], torch.float32)
    values[1] += [math.inf, -math.inf, math.nan]
    results = []
    for readable in (True, False):
        monkeypatch.setattr(base, "CPU_READS_ARE_FREE", readable)
        grads = []
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            grads += [torch.tensor(row, dtype=torch.float64).to(dtype) for row in values]
        engine.scale_(engine.prepare(grads, "torch"), torch.tensor(coef, dtype=torch.float64))
        results.append(grads)
    for host, device in zip(*results):
        assert torch.equal(host.view(-1).view(torch.uint8), device.view(-1).view(torch.uint8)), (coef, host, device)


def test_coefficient_check_catches_a_float32_coefficient(monkeypatch) -> None:
    """The planted bug: the coefficient rounded to float32 before the kernels see it."""
    real_scale = engine.scale_

    def float32_coefficient(call, coef):
        real_scale(call, coef.to(torch.float32))

    monkeypatch.setattr(engine, "scale_", float32_coefficient)
    values = [[3e38, -2.9e38, 1.7e38]]
    exact = float(exact_norm(values, 2.0))
    coef, got = clip_with_norm(values, torch.float32, 1e-5, exact, "cpu" if _has("cpu") else "torch")
    with pytest.raises(AssertionError, match="correctly rounded"):
        check_scaled(values, torch.float32, coef, got)


def test_coefficient_check_catches_double_rounding() -> None:
    """A second planted bug: the product rounded to float64, then to float32."""
    x, c = _double_rounding_trap()
    got = [[float(torch.tensor(x * c, dtype=torch.float64).float())]]
    with pytest.raises(AssertionError, match="correctly rounded"):
        check_scaled([[x]], torch.float32, c, got)


@pytest.mark.parametrize("device_backend", CPU_CASES, indirect=True)
@pytest.mark.parametrize("magnitude", [3.4e38, 1e18])
def test_clip_grad_norm_end_to_end_against_mpmath(device_backend, magnitude) -> None:
    """clip_grad_norm_ itself: grads near 3e38 (or 1e18, whose norm every backend can take),
    max_norm 1e-3 .. 1e-45; the coefficient the backend computes in float64 may differ from the exact
    one by its documented error (the total's: float32 accumulation for float32 data on some paths),
    so the result must lie between the correctly rounded products with the exact coefficient times
    (1 -+ that bound)."""
    _, name = device_backend
    mpmath.mp.prec = 160
    rng = torch.Generator().manual_seed(5)
    for max_norm in (1e-3, 1e-5, 1e-20, 1e-38, 1e-44, 1e-45):
        values = ((torch.rand(3, 17, generator=rng, dtype=torch.float64) * 2 - 1) * magnitude).float()
        params = make_params(values.double().tolist(), torch.float32)
        fusedclip.clip_grad_norm_(params, max_norm, backend=name)
        norm = mpmath.sqrt(mpmath.fsum(mpmath.mpf(v) ** 2 for v in values.double().flatten().tolist()))
        coef = mp_fraction(mpmath.mpf(max_norm) / (norm + mpmath.mpf(1e-6)))
        bound = Fraction(1, 10**5)
        for row, param in zip(values.double().tolist(), params):
            for x, y in zip(row, param.grad.double().tolist()):
                ends = sorted(round_exact(Fraction(x) * coef * (1 + s * bound), torch.float32, x < 0) for s in (-1, 1))
                assert ends[0] <= y <= ends[1], (max_norm, x, y, ends)
        if max_norm <= 1e-38:  # the old bug: up to 16% off, and zeros below 1.4e-45 * norm
            assert any(p.grad.abs().max() > 0 for p in params) or max_norm < 1e-44


# ---- property 2: general p does not overflow or underflow ----------------------------------------


def exact_norm(values: list[list[float]], p: float) -> mpmath.mpf:
    """The p-norm of all values, at 160 bits (mpmath's exponents are unbounded)."""
    mpmath.mp.prec = 160
    terms = [abs(mpmath.mpf(v)) for row in values for v in row]
    if p < 0 and any(t == 0 for t in terms):
        return mpmath.mpf(0)
    return mpmath.fsum(t ** mpmath.mpf(p) for t in terms) ** (1 / mpmath.mpf(p))


def norm_tolerance(p: float, count: int) -> float:
    """Relative error bound of a float64 evaluation relative to the max (min) element: each term's
    quotient and power (a few ulps, times |p| for the quotient), the sum of ``count`` terms, then
    the 1/p power divides the accumulated relative error by |p|, plus the root and the product."""
    eps = 2.0**-52
    return 8 * eps * (count + 4 + abs(p)) / abs(p) + 8 * eps


def check_total(values: list[list[float]], p: float, dtype: torch.dtype, got: float) -> None:
    want = exact_norm(values, p)
    count = sum(len(row) for row in values)
    out_dtype = dtype
    bits, emin, _ = FORMATS[out_dtype]
    if not mpmath.isfinite(want) or want > mpmath.mpf(torch.finfo(out_dtype).max) * (1 + mpmath.mpf(2) ** -bits):
        assert got == math.inf, f"p={p}: got {got!r}, the exact norm {mpmath.nstr(want, 8)} overflows {out_dtype}"
        return
    tol = mpmath.mpf(norm_tolerance(p, count))
    ulp = max(abs(want) * mpmath.mpf(2) ** (1 - bits), mpmath.mpf(2) ** (emin - bits + 1))
    error = abs(mpmath.mpf(got) - want)
    assert error <= tol * abs(want) + ulp, (
        f"p={p} {dtype}: got {got!r}, exact {mpmath.nstr(want, 20)}, error {mpmath.nstr(error / max(want, ulp), 3)}"
        f" relative (bound {mpmath.nstr(tol, 3)} + one ulp)"
    )


def norm_orders():
    return st.one_of(
        st.floats(4.0, 308.0).map(lambda e: 10.0**e),  # huge
        st.floats(4.0, 308.0).map(lambda e: -(10.0**e)),  # huge negative
        st.floats(-3.0, -1.0).map(lambda e: 10.0**e),  # tiny
        st.sampled_from([3.0, 10.0, -3.0, -10.0, 0.5, 1e-3, 1e308, -1e308, 1e4]),
    )


def magnitudes():
    """Grad rows at one scale (1e-40 .. 3e38 for float32, 1e-300 .. 1e300 for float64)."""
    return st.sampled_from([3e38, 1e38, 1.0, 1e-20, 1e-40])


@pytest.mark.parametrize("device_backend", CPU_CASES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_general_p_against_mpmath(device_backend, dtype) -> None:
    _, name = device_backend

    @settings(max_examples=max(6, EXAMPLES[name] // 2), **SETTINGS)
    @given(
        p=norm_orders(),
        scale=magnitudes(),
        wide=st.sampled_from([1e300, 1e-300, 1e-310]) if dtype is torch.float64 else st.just(None),
        seed=st.integers(0, 2**16),
    )
    @example(p=1e4, scale=3e38, wide=None, seed=0)
    @example(p=10.0, scale=1e-40, wide=None, seed=1)
    @example(p=-1e4, scale=1e-40, wide=None, seed=2)
    def run(p, scale, wide, seed) -> None:
        if wide is not None:
            scale = wide
        if dtype is torch.bfloat16 and scale < 1e-38:
            scale = 1e-38
        rng = torch.Generator().manual_seed(seed)
        rows = [((torch.rand(n, generator=rng, dtype=torch.float64) * 2 - 1) * scale).to(dtype) for n in (5, 13)]
        values = [r.double().tolist() for r in rows]
        if p < 0:
            assume(all(v != 0 for row in values for v in row))
        got = fusedclip.get_total_norm(rows, p, backend=name)
        check_total(values, p, dtype, float(got))

    run()


@pytest.mark.parametrize("device_backend", CPU_CASES, indirect=True)
def test_general_p_per_tensor_norms_do_not_underflow(device_backend) -> None:
    """get_norms: a tensor far below the largest keeps its own norm (not 0) for p = 1e4 and -1e4."""
    _, name = device_backend
    grads = [torch.tensor([3e38, -1e38]), torch.tensor([1e-3, 2e-3, -5e-4]), torch.tensor([7.0])]
    for p in (1e4, -1e4, 10.0):
        total, per_tensor = fusedclip.get_norms(grads, p, backend=name)
        check_total([g.double().tolist() for g in grads], p, torch.float32, float(total))
        for g, value in zip(grads, per_tensor.double().tolist()):
            want = exact_norm([g.double().tolist()], p)
            assert abs(mpmath.mpf(value) - want) <= mpmath.mpf(1e-6) * want, (p, g, value, want)


@pytest.mark.parametrize("device_backend", CPU_CASES, indirect=True)
def test_general_p_clips_instead_of_zeroing(device_backend) -> None:
    """torch returns inf for p = 1e4 here and zeroes every grad; fusedclip scales them by the true
    coefficient."""
    _, name = device_backend
    params = make_params([[3e38, -1.5e38, 2.0], [1e-40, 5.0]], torch.float32)
    total = fusedclip.clip_grad_norm_(params, 1.0, norm_type=1e4, backend=name)
    assert float(total) == pytest.approx(3e38, rel=1e-6)
    assert params[0].grad[0].item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("device_backend", CPU_CASES, indirect=True)
@pytest.mark.parametrize("p,values", [(1e-3, [1e-300, -1e-300, 1e-300]), (-1e-3, [1e300, -1e300, 1e300])])
def test_tiny_p_root_outside_float64_range(device_backend, p, values) -> None:
    """p = +-1e-3: the root of the scaled sum (3 ** +-1000) is outside float64's range, the norm
    (about 1e177 or 1e-177) is not."""
    _, name = device_backend
    grads = [torch.tensor(values, dtype=torch.float64), torch.tensor(values[:1], dtype=torch.float64)]
    total, per_tensor = fusedclip.get_norms(grads, p, backend=name)
    check_total([values, values[:1]], p, torch.float64, float(total))
    for grad, got in zip(grads, per_tensor.tolist()):
        check_total([grad.tolist()], p, torch.float64, got)
    # the backend's own per-tensor norms relative to the call's norm scale (the engine takes its
    # general-p per-tensor norms elsewhere): the same roots
    norm = parse_norm_type(p)
    (backend, work), = engine.prepare(grads, name).works
    magnitudes = torch.cat(grads).abs()
    scale = magnitudes.amax() if p > 0 else magnitudes.amin()
    buffer = torch.empty(len(grads), dtype=torch.float64)
    result = backend.norm(work, norm, None, torch.float64, per_tensor=buffer, scale=scale)
    check_total([values, values[:1]], p, torch.float64, float(result.total))
    # (the cuda kernel keeps the plain product per tensor, within sm_90's register budget: the engine
    # never reads those values for general p, as the get_norms check above shows)
    for grad, got in zip(grads, buffer.tolist() if name != "cuda" else []):
        check_total([grad.tolist()], p, torch.float64, got)
    acc = backend.accumulate(work, norm, scale=scale)
    total = base.finish(acc, norm, None, torch.float64, scale=scale).total
    check_total([values, values[:1]], p, torch.float64, float(total))


def test_general_p_check_catches_unscaled_sums(monkeypatch) -> None:
    """The planted bug: general p summed as plain |x|^p (no norm scale) overflows to inf."""
    monkeypatch.setattr(engine, "is_general_p", lambda norm: False)
    rows = [torch.tensor([3e38, -1e38, 2.0])]
    got = float(fusedclip.get_total_norm(rows, 1e4, backend="cpu" if _has("cpu") else "torch"))
    with pytest.raises(AssertionError):
        check_total([r.double().tolist() for r in rows], 1e4, torch.float32, got)


def test_general_p_check_catches_a_wrong_root() -> None:
    """The tolerance is tight: a total off by a few float32 ulps fails."""
    values = [[3e38, -1e38, 2.0]]
    right = float(exact_norm(values, 10.0))
    wrong = float(torch.tensor(right).float()) * (1 + 2.0**-20)
    with pytest.raises(AssertionError):
        check_total(values, 10.0, torch.float32, wrong)


def test_negative_p_float64_accuracy_matches_torch() -> None:
    """float64 grads with p < 0 on the cpu backend: not meaningfully farther from the exact norm than
    torch (measured over 60 such sums: 6.3 ulps worst against torch's 5.4; a sum of |x|^p rounded
    term by term and one 1/p power, in both)."""
    if not _has("cpu"):
        pytest.skip("the cpu backend is not built")
    mpmath.mp.prec = 160
    rng = torch.Generator().manual_seed(11)
    worst_ours = worst_torch = 0.0
    for p in (-1.0, -2.5, -7.0):
        for _ in range(8):
            grads = [torch.rand(n, generator=rng, dtype=torch.float64) + 0.01 for n in (100, 37)]
            want = exact_norm([g.tolist() for g in grads], p)
            ours = float(fusedclip.get_total_norm(grads, p, backend="cpu"))
            theirs = float(torch.nn.utils.get_total_norm(grads, p))
            ulp = math.ulp(float(want))
            worst_ours = max(worst_ours, float(abs(mpmath.mpf(ours) - want)) / ulp)
            worst_torch = max(worst_torch, float(abs(mpmath.mpf(theirs) - want)) / ulp)
    assert worst_ours <= 1.5 * worst_torch + 2.0, (worst_ours, worst_torch)


def test_norm_scale_guards_match_torch() -> None:
    """Zero, inf and NaN scales leave the result exactly torch's (the scale is then 1)."""
    backend = "cpu" if _has("cpu") else "torch"
    cases = [
        ([torch.zeros(3)], 3.0),
        ([torch.tensor([0.0, 1.0, 2.0])], -3.0),
        ([torch.tensor([math.inf, 1.0])], 3.0),
        ([torch.tensor([math.inf, math.inf])], -3.0),
        ([torch.tensor([math.nan, 1.0])], 3.0),
        ([torch.tensor([math.nan, 1.0])], -3.0),
    ]
    for grads, p in cases:
        ours = fusedclip.get_total_norm(grads, p, backend=backend)
        theirs = torch.nn.utils.get_total_norm(grads, p)
        assert torch.equal(ours.isnan(), theirs.isnan()) and (ours.isnan() or ours == theirs), (grads, p, ours, theirs)
    assert torch.equal(base.usable_norm_scale(torch.tensor([0.0, math.inf, math.nan, 2.0])), torch.tensor([1.0, 1.0, 1.0, 2.0]))


def mp_fraction(value: mpmath.mpf) -> Fraction:
    """An mpmath number as the exact Fraction it holds."""
    mantissa, exponent = value.man_exp
    return Fraction(mantissa) * Fraction(2) ** exponent


def _has(name: str) -> bool:
    return fusedclip.available_backends().get(name) is True


# ---- property 3: squares that overflow float32, norms that do not ---------------------------------


def _huge_params(values: list[list[float]], dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Parameters of ones (AGC's weight norms) with ``values`` as their grads."""
    params = []
    for row in values:
        param = torch.nn.Parameter(torch.ones(1, len(row), dtype=dtype))
        param.grad = torch.tensor([row], dtype=torch.float64).to(dtype)
        params.append(param)
    return params


#: every CPU path that takes norms of float32/bf16 grads: (name, call on the parameters)
HUGE_PATHS = {
    "clip_grad_norm_": lambda params, backend: fusedclip.clip_grad_norm_(params, 1.0, backend=backend),
    "get_norms": lambda params, backend: fusedclip.get_norms([p.grad for p in params], backend=backend),
    "Clipper groups": lambda params, backend: fusedclip.Clipper(
        [{"params": params[:1], "mode": "norm"}, {"params": params[1:], "mode": "norm", "max_norm": 2.0}],
        max_norm=1.0,
        backend=backend,
    )(),
    "Clipper adagc": lambda params, backend: fusedclip.Clipper(params, mode="adagc", max_norm=1.0, backend=backend)(),
    "Clipper agc": lambda params, backend: fusedclip.Clipper(
        [(f"w{i}", p) for i, p in enumerate(params)], mode="agc", backend=backend
    )(),
}


def _huge_violation(path: str, values: list[list[float]], dtype: torch.dtype, backend: str) -> str | None:
    """None when ``path`` on ``dtype`` grads gives what it gives on float64 copies of them (no
    overflow there), rounded to ``dtype``: grads within 2 ulps, returned norms within 1e-5 (or one
    ulp of their own dtype)."""
    ours, wide = _huge_params(values, dtype), _huge_params(values, torch.float64)
    got, expected = HUGE_PATHS[path](ours, backend), HUGE_PATHS[path](wide, backend)
    for mine, reference in zip(*(torch.utils._pytree.tree_leaves(x) for x in (got, expected))):
        if isinstance(mine, torch.Tensor) and mine.is_floating_point():
            rtol = max(1e-5, 2.0 ** -(FORMATS[mine.dtype][0] - 1))  # and the rounding to a 16-bit result
            if not torch.allclose(mine.double(), reference.double(), rtol=rtol, atol=0):
                return f"{path}: returned {mine.tolist()}, float64 gives {reference.tolist()}"
    spacing = 2.0 ** -(FORMATS[dtype][0] - 1)
    for mine, reference in zip(ours, wide):
        exact = reference.grad.double()
        if not torch.allclose(mine.grad.double(), exact, rtol=2 * spacing, atol=0):
            return f"{path}: grads {mine.grad.tolist()}, float64 gives {exact.tolist()}"
    return None


@pytest.mark.parametrize("device_backend", CPU_CASES, indirect=True)
@pytest.mark.parametrize("path", list(HUGE_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_squares_that_overflow_float32_never_zero_a_grad(device_backend, path, dtype) -> None:
    """Grads of magnitude 1e19..1e37: their squares overflow float32 (and bf16) accumulators, their
    norms do not. Every CPU path (total, per-tensor norms, norm groups, AdaGC, AGC's unit norms) must
    give what it gives on float64 copies, where a float32-only norm is inf and zeroes the grads."""
    _, backend = device_backend

    @settings(max_examples=EXAMPLES[backend] // 3 + 2, **SETTINGS)
    @given(
        exponents=st.lists(st.lists(st.floats(19, 37), min_size=1, max_size=6), min_size=2, max_size=3),
        signs=st.lists(st.booleans(), min_size=18, max_size=18),
    )
    def check(exponents, signs):
        values = [[(-1) ** signs[(i * 6 + j) % 18] * 10.0**e for j, e in enumerate(row)] for i, row in enumerate(exponents)]
        values = representable(values, dtype)
        problem = _huge_violation(path, values, dtype, backend)
        assert problem is None, problem

    check()


@pytest.mark.parametrize("device_backend", CPU_CASES, indirect=True)
@pytest.mark.parametrize("path", list(HUGE_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_squares_that_underflow_float32_keep_their_norms(device_backend, path, dtype) -> None:
    """Grads of magnitude 1e-37..1e-19: their squares underflow float32 (and bf16) accumulators,
    their norms do not. Every CPU path must give what it gives on float64 copies (within one ulp of
    the dtype), where float32-only per-tensor norms are 0 or lose digits."""
    _, backend = device_backend

    @settings(max_examples=EXAMPLES[backend] // 3 + 2, **SETTINGS)
    @given(exponents=st.lists(st.lists(st.floats(-37, -19), min_size=1, max_size=6), min_size=2, max_size=3))
    def check(exponents):
        values = representable([[10.0**e for e in row] for row in exponents], dtype)
        problem = _huge_violation(path, values, dtype, backend)
        assert problem is None, problem

    check()


def _zeros_and_tiny_violation() -> str | None:
    """All-zero grads beside tiny ones (squares below float32's range): per-tensor norms and the
    total against float64, on the torch backend (whose CPU float32 sums of such grads are redone
    in float64, all-zero grads excepted)."""
    grads = [torch.zeros(300), torch.full((200,), 1e-25), torch.zeros(5, dtype=torch.bfloat16), torch.full((7,), 3e-22, dtype=torch.bfloat16)]
    total, per_tensor = fusedclip.get_norms([g.clone() for g in grads], backend="torch")
    exact = [torch.linalg.vector_norm(g.double()).item() for g in grads]
    if not torch.allclose(per_tensor.double(), torch.tensor(exact, dtype=torch.float64), rtol=2.0**-20, atol=0):
        return f"per-tensor {per_tensor.tolist()}, float64 gives {exact}"
    wanted = math.hypot(*exact)
    if not math.isclose(float(total), wanted, rel_tol=2.0**-20):
        return f"total {float(total)!r}, float64 gives {wanted!r}"
    return None


def test_all_zero_grads_beside_tiny_ones(monkeypatch) -> None:
    """All-zero grads keep their exact 0 without a float64 pass, and do not hide tiny grads beside
    them; the planted bug (every grad taken for all zeros) is caught."""
    from fusedclip.backends import torch_backend

    assert _zeros_and_tiny_violation() is None
    monkeypatch.setattr(torch_backend, "_zero_sums", lambda tensors: [True] * len(tensors))
    assert _zeros_and_tiny_violation() is not None


def test_the_overflow_check_catches_float32_only_norms(monkeypatch) -> None:
    """The planted bugs: the torch backend's CPU per-tensor norms trusted when they overflow or
    underflow, and AGC's unit norms kept in float32: norm groups and AGC zero the grads again, and
    per-tensor norms of tiny grads come out 0."""
    from fusedclip import adaptive
    from fusedclip.backends import torch_backend

    values = [[3e19, -2e19, 1.0], [5e20, 1.0]]
    assert _huge_violation("Clipper groups", values, torch.float32, "torch") is None
    assert _huge_violation("Clipper agc", values, torch.float32, "cpu") is None
    tiny = [[1e-25] * 100, [3e-22] * 10]
    assert _huge_violation("get_norms", tiny, torch.float32, "torch") is None
    monkeypatch.setattr(torch_backend, "_redo_untrusted_norms", lambda norms, tensors, p: None)
    assert _huge_violation("Clipper groups", values, torch.float32, "torch") is not None
    assert _huge_violation("get_norms", tiny, torch.float32, "torch") is not None
    monkeypatch.setattr(
        adaptive,
        "_unit_norms",
        lambda tensor, dims: torch.linalg.vector_norm(tensor, dim=dims, keepdim=True, dtype=torch.float32 if tensor.dtype != torch.float64 else None),
    )
    assert _huge_violation("Clipper agc", values, torch.float32, "cpu") is not None


# ---- rounding the total once ----------------------------------------------------------------------


@st.composite
def near_midpoints(draw, dtype: torch.dtype) -> float:
    """A float64 value within a few float32 ulps of a midpoint between two neighbours of ``dtype``
    (where rounding through float32 first lands on the midpoint and breaks the tie the wrong way),
    or anywhere in the dtype's range, subnormals and overflow included."""
    bits, emin, emax = FORMATS[dtype]
    if draw(st.booleans()):
        return draw(st.floats(-(2.0 ** (emax + 2)), 2.0 ** (emax + 2), allow_nan=False))
    if draw(st.booleans()):  # a normal binade: neighbours m * 2^(e - bits + 1), m of `bits` bits
        mantissa = draw(st.integers(2 ** (bits - 1), 2**bits - 1))
        exponent = draw(st.integers(emin, emax))
    else:  # the subnormal range: neighbours m * 2^(emin - bits + 1), m below 2^(bits - 1)
        mantissa = draw(st.integers(0, 2 ** (bits - 1) - 1))
        exponent = emin
    midpoint = (mantissa + 0.5) * 2.0 ** (exponent - bits + 1)
    nudge = draw(st.integers(-3, 3)) * midpoint * 2.0**-30  # below float32's resolution there
    return draw(st.sampled_from([1.0, -1.0])) * (midpoint + nudge)


def _round_once_mismatch(convert, dtype: torch.dtype, value: float) -> str | None:
    got = float(convert(torch.tensor(value, dtype=torch.float64), dtype))
    wanted = round_exact(Fraction(value), dtype, negative=math.copysign(1.0, value) < 0)
    return None if got == wanted or (math.isnan(got) and math.isnan(wanted)) else f"{value!r} -> {got!r}, not {wanted!r}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_totals_are_rounded_once_to_16_bit_dtypes(dtype) -> None:
    """``base.round_once`` (every total a float64 accumulator becomes: the torch backend's, the
    tracker's, a distributed reduction's) against the exact rounding of the float64 value."""

    @settings(max_examples=400, deadline=None)
    @given(value=near_midpoints(dtype))
    @example(value=1 + 2.0**-8 + 2.0**-30)
    def check(value: float) -> None:
        problem = _round_once_mismatch(base.round_once, dtype, value)
        assert problem is None, problem

    check()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_rounding_check_catches_rounding_through_float32(dtype) -> None:
    """The planted bug: torch's own float64 -> 16-bit conversion, which goes through float32."""
    caught = []

    @settings(max_examples=400, deadline=None, database=None)
    @given(value=near_midpoints(dtype))
    def collect(value: float) -> None:
        problem = _round_once_mismatch(lambda t, d: t.to(d), dtype, value)
        if problem is not None:
            caught.append(problem)

    collect()
    assert len(caught) >= 10, caught


def test_finish_rounds_the_total_once() -> None:
    """Through the shared finish: a p = 1 accumulator of 1 + 2^-8 + 2^-30 is bf16 1.0078125 (torch's
    conversion gives 1.0), and the coefficient comes from the unrounded value."""
    norm = parse_norm_type(1.0)
    acc = torch.tensor(1 + 2.0**-8 + 2.0**-30, dtype=torch.float64)
    result = base.finish(acc, norm, 0.5, torch.bfloat16)
    assert result.total.dtype == torch.bfloat16 and float(result.total) == 1.0078125
    assert float(result.coef) == 0.5 / (float(acc) + 1e-6)
