"""Property-based fuzzing (hypothesis) of every backend against the fp64 ideal.

Random gradient sets — dtypes, shapes including zero-size, strides, views into one flat buffer,
value scales from 1e-30 to 1e30, norm types, thresholds — judged with torch's own error as the
allowance. The Triton interpreter is slow, so it gets fewer examples.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from reference import (
    accumulation_precision,
    assert_no_worse_than_torch,
    check_clip_against_torch,
    ideal_total_norm,
    accumulation_ulps,
)

import fusedclip

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
#: decimal exponents of the value scale each dtype can hold without overflowing its own range
EXPONENTS = {torch.float32: (-30, 30), torch.bfloat16: (-30, 30), torch.float16: (-3, 3), torch.float64: (-30, 30)}
LAYOUTS = ["contiguous", "transposed", "strided", "flat_view"]


@st.composite
def grad_specs(draw):
    count = draw(st.integers(1, 6))
    specs = []
    for _ in range(count):
        dtype = draw(st.sampled_from(DTYPES))
        rows, cols = draw(st.integers(0, 9)), draw(st.integers(1, 40))
        low, high = EXPONENTS[dtype]
        specs.append(
            dict(
                dtype=dtype,
                shape=(rows, cols),
                exponent=draw(st.integers(low, high)),
                layout=draw(st.sampled_from(LAYOUTS)),
                seed=draw(st.integers(0, 2**16)),
            )
        )
    return specs


def _make(spec, device):
    gen = torch.Generator().manual_seed(spec["seed"])
    rows, cols = spec["shape"]
    values = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 10.0 ** spec["exponent"]
    dtype = spec["dtype"]
    layout = spec["layout"]
    if layout == "transposed":
        return values.to(device=device, dtype=dtype).t().contiguous().t()  # dense, permuted
    if layout == "strided":
        wide = torch.zeros(rows, 2 * cols, dtype=dtype, device=device)
        wide[:, ::2] = values.to(dtype)
        return wide[:, ::2]
    if layout == "flat_view":
        flat = torch.full((rows * cols + 7,), 777.0, dtype=dtype, device=device)
        view = flat[3 : 3 + rows * cols].view(rows, cols)
        view.copy_(values.to(dtype))
        return view
    return values.to(device=device, dtype=dtype)


def _params(specs, device):
    params = []
    for spec in specs:
        grad = _make(spec, device)
        param = torch.nn.Parameter(torch.zeros(grad.shape, dtype=grad.dtype, device=device))
        param.grad = grad
        params.append(param)
    return params


def _torch_twin(params):
    twins = []
    for p in params:
        t = torch.nn.Parameter(p.detach().clone())
        t.grad = p.grad.clone()
        twins.append(t)
    return twins


#: two float32 grads whose p = 1 total, 8 ulps off when summed along one packed chunk (within the
#: accumulation allowance), once made the scaled grads fail an allowance counted in their own ulps
PACKED_FLOAT32_SET = [
    dict(dtype=torch.float32, shape=(3, 4), exponent=2, layout="contiguous", seed=0),
    dict(dtype=torch.float32, shape=(6, 19), exponent=0, layout="contiguous", seed=1),
]


def _examples(backend: str) -> int:
    return 12 if backend == "triton" else 60


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 0.0, 3.0])
def test_clip_grad_norm_is_never_farther_from_ideal_than_torch(device_backend, norm_type):
    device, backend = device_backend

    @settings(max_examples=_examples(backend), deadline=None, suppress_health_check=list(HealthCheck))
    @given(specs=grad_specs(), fraction=st.sampled_from([0.0, 0.01, 0.5, 0.99, 3.0]))
    @example(specs=PACKED_FLOAT32_SET, fraction=0.01)
    def check(specs, fraction):
        if math.isinf(norm_type):
            specs = [s for s in specs if s["shape"][0] > 0] or [dict(specs[0], shape=(1, 1))]
        params = _params(specs, device)
        before = [p.grad.clone() for p in params]
        ideal = float(ideal_total_norm(before, norm_type))
        max_norm = ideal * fraction if math.isfinite(ideal) else 1.0
        twins = _torch_twin(params)
        torch_total = torch.nn.utils.clip_grad_norm_(twins, max_norm, norm_type)
        ours = fusedclip.clip_grad_norm_(params, max_norm, norm_type, backend=backend)
        check_clip_against_torch(params, twins, before, ours, torch_total, max_norm, norm_type, backend)

    check()


def test_get_total_norm_is_bitwise_repeatable(device_backend):
    device, backend = device_backend

    @settings(max_examples=_examples(backend) // 2, deadline=None, suppress_health_check=list(HealthCheck))
    @given(specs=grad_specs(), norm_type=st.sampled_from([2.0, 1.0, math.inf, 0.0, 0.5]))
    def check(specs, norm_type):
        if math.isinf(norm_type):
            specs = [s for s in specs if s["shape"][0] > 0] or [dict(specs[0], shape=(1, 1))]
        tensors = [p.grad for p in _params(specs, device)]
        first = fusedclip.get_total_norm(tensors, norm_type, backend=backend)
        second = fusedclip.get_total_norm(tensors, norm_type, backend=backend)
        assert torch.equal(first, second) or (first.isnan() and second.isnan())
        theirs = torch.nn.utils.get_total_norm([t.clone() for t in tensors], norm_type)
        ideal = ideal_total_norm(tensors, norm_type)
        assert_no_worse_than_torch(
            first,
            theirs,
            ideal,
            what="total",
            precision=accumulation_precision(tensors),
            accumulation_ulps=accumulation_ulps(tensors),
        )

    check()
