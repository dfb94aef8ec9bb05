"""The parity suite: every backend against torch.nn.utils, judged against an fp64 ideal."""

from __future__ import annotations

import math

import pytest
import torch
from reference import (
    DTYPE_SETS,
    SHAPES,
    assert_no_worse_than_torch,
    check_clip_against_torch,
    clone_params,
    grads,
    ideal_total_norm,
    make_params,
    accumulation_precision,
    accumulation_ulps,
)

import fusedclip

NORM_TYPES = [2.0, 1.0, math.inf, -math.inf, 0.0, "inf", 3.5, 0.5, 2, -1.5]


def _shapes_for(p: float | str) -> tuple[tuple[int, ...], ...]:
    # torch raises on zero-size tensors for p = +-inf and p < 0 (see the dedicated tests below)
    if float(p) < 0 or math.isinf(float(p)):
        return tuple(s for s in SHAPES if 0 not in s)
    return SHAPES


def _p(norm_type: float | str) -> float:
    return float(norm_type)


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("dtypes", list(DTYPE_SETS), ids=str)
@pytest.mark.parametrize("clipped", [True, False], ids=["clipped", "unclipped"])
def test_clip_grad_norm_matches_torch(device_backend, chunk_elements, norm_type, dtypes, clipped):
    device, backend = device_backend
    params = make_params(_shapes_for(norm_type), DTYPE_SETS[dtypes], device=device, seed=len(dtypes))
    theirs = clone_params(params)
    before = [g.clone() for g in grads(params)]
    ideal = float(ideal_total_norm(before, _p(norm_type)))
    max_norm = ideal * (0.3 if clipped else 3.0) if ideal > 0 else (0.0 if clipped else 1.0)

    torch_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    ours_total = fusedclip.clip_grad_norm_(params, max_norm, norm_type, backend=backend)

    check_clip_against_torch(params, theirs, before, ours_total, torch_total, max_norm, _p(norm_type))
    if not clipped:
        for mine, original in zip(grads(params), before):
            assert torch.equal(mine, original), "an unclipped call must leave grads bit-identical"


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 0.0, 3.0], ids=str)
@pytest.mark.parametrize("dtypes", ["fp32", "bf16", "bf16+fp32", "fp64"])
def test_get_total_norm_matches_torch(device_backend, norm_type, dtypes):
    device, backend = device_backend
    tensors = grads(make_params(_shapes_for(norm_type), DTYPE_SETS[dtypes], device=device))
    before = [t.clone() for t in tensors]
    theirs = torch.nn.utils.get_total_norm([t.clone() for t in tensors], norm_type)
    ours = fusedclip.get_total_norm(tensors, norm_type, backend=backend)
    assert ours.dtype == theirs.dtype and ours.device == theirs.device and ours.dim() == 0
    ideal = ideal_total_norm(before, float(norm_type))
    assert_no_worse_than_torch(
        ours, theirs, ideal, what="get_total_norm",
        precision=accumulation_precision(before), accumulation_ulps=accumulation_ulps(before),
    )
    assert all(torch.equal(a, b) for a, b in zip(tensors, before)), "get_total_norm must not modify its inputs"


@pytest.mark.parametrize("dtypes", ["fp32", "bf16", "all4"])
def test_split_api_equals_clip_grad_norm(device_backend, dtypes):
    device, backend = device_backend
    params = make_params(SHAPES, DTYPE_SETS[dtypes], device=device)
    twin = clone_params(params)
    theirs = clone_params(params)
    before = [g.clone() for g in grads(params)]
    max_norm = float(ideal_total_norm(before, 2.0)) / 4

    total = fusedclip.get_total_norm(grads(params), backend=backend)
    fusedclip.clip_grads_with_norm_(params, max_norm, total, backend=backend)
    together = fusedclip.clip_grad_norm_(twin, max_norm, backend=backend)
    torch_total = torch.nn.utils.get_total_norm(grads(theirs))
    torch.nn.utils.clip_grads_with_norm_(theirs, max_norm, torch_total)

    assert torch.equal(total, together)
    # The split API only sees the rounded total, so its coefficient may differ from the fused one in
    # the last bit; both must be as close to the ideal as torch.
    check_clip_against_torch(params, theirs, before, total, torch_total, max_norm, 2.0)
    check_clip_against_torch(twin, theirs, before, together, torch_total, max_norm, 2.0)


def test_clip_grads_with_norm_takes_a_number_and_a_bf16_norm(device_backend):
    device, backend = device_backend
    params = make_params([(40,), (7,)], [torch.float32], device=device, zero_tensor=False, none_grad=False)
    reference = clone_params(params)
    fusedclip.clip_grads_with_norm_(params, 1.0, 8.0, backend=backend)
    torch.nn.utils.clip_grads_with_norm_(reference, 1.0, torch.tensor(8.0))
    for a, b in zip(grads(params), grads(reference)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    bf16_norm = torch.tensor(8.0, dtype=torch.bfloat16, device=device)
    fusedclip.clip_grads_with_norm_(params, 100.0, bf16_norm, backend=backend)  # coef clamps to 1
    for a, b in zip(grads(params), grads(reference)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtypes", ["fp32", "fp16", "bf16", "all4"])
@pytest.mark.parametrize("clip_value", [0.05, 1.0, math.inf])
def test_clip_grad_value_matches_torch_exactly(device_backend, chunk_elements, dtypes, clip_value):
    device, backend = device_backend
    params = make_params(SHAPES, DTYPE_SETS[dtypes], device=device)
    special = grads(params)[0]
    special[:4] = torch.tensor([math.nan, math.inf, -math.inf, -0.0], dtype=special.dtype)
    theirs = clone_params(params)
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    fusedclip.clip_grad_value_(params, clip_value, backend=backend)
    for a, b in zip(grads(params), grads(theirs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("poison", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("dtypes", ["fp32", "bf16+fp32"])
def test_nonfinite_grads_propagate_like_torch(device_backend, poison, norm_type, dtypes):
    device, backend = device_backend
    params = make_params(_shapes_for(norm_type), DTYPE_SETS[dtypes], device=device)
    grads(params)[-1].view(-1)[5] = float(poison)
    theirs = clone_params(params)
    torch_total = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    ours_total = fusedclip.clip_grad_norm_(params, 1.0, norm_type, backend=backend)
    torch.testing.assert_close(ours_total, torch_total, equal_nan=True)
    for a, b in zip(grads(params), grads(theirs)):
        # Non-finite cases have coefficient 0 or NaN: results are exact.
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_error_if_nonfinite_raises_before_touching_grads(device_backend, poison):
    device, backend = device_backend
    params = make_params(SHAPES, [torch.float32], device=device)
    grads(params)[0][3] = float(poison)
    before = [g.clone() for g in grads(params)]
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True, backend=backend)
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedclip.get_total_norm(grads(params), error_if_nonfinite=True, backend=backend)
    for a, b in zip(grads(params), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_error_if_nonfinite_passes_for_finite_grads(device_backend):
    device, backend = device_backend
    params = make_params(SHAPES, [torch.float32], device=device)
    theirs = clone_params(params)
    ours = fusedclip.clip_grad_norm_(params, 0.5, error_if_nonfinite=True, backend=backend)
    torch.testing.assert_close(ours, torch.nn.utils.clip_grad_norm_(theirs, 0.5, error_if_nonfinite=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_single_tensor_and_zero_dim(device_backend, dtype):
    device, backend = device_backend
    for shape in [(), (1,), (257,)]:
        param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        param.grad = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype=dtype, device=device)
        twin = clone_params([param])[0]
        before = param.grad.clone()
        ours = fusedclip.clip_grad_norm_(param, 0.7, backend=backend)  # a Tensor, not a list
        theirs = torch.nn.utils.clip_grad_norm_(twin, 0.7)
        check_clip_against_torch([param], [twin], [before], ours, theirs, 0.7, 2.0)


def test_return_dtype_follows_torch_promotion(device_backend):
    device, backend = device_backend
    cases = {
        (torch.bfloat16,): torch.bfloat16,
        (torch.float16,): torch.float16,
        (torch.bfloat16, torch.float32): torch.float32,
        (torch.float16, torch.bfloat16): torch.float32,
        (torch.float32, torch.float64): torch.float64,
    }
    for dtypes, expected in cases.items():
        params = make_params([(5,), (6,)], dtypes, device=device, none_grad=False)
        assert fusedclip.clip_grad_norm_(params, 1.0, backend=backend).dtype == expected
        assert fusedclip.get_total_norm(grads(params), backend=backend).dtype == expected


def test_max_norm_as_tensor(device_backend):
    device, backend = device_backend
    params = make_params(SHAPES, [torch.float32], device=device)
    twin = clone_params(params)
    for max_norm in [torch.tensor(0.25), torch.tensor(0.25, device=device), torch.tensor(0.25, dtype=torch.float64)]:
        a = fusedclip.clip_grad_norm_(params, max_norm, backend=backend)
        b = fusedclip.clip_grad_norm_(twin, 0.25, backend=backend)
        assert torch.equal(a, b)
        for x, y in zip(grads(params), grads(twin)):
            assert torch.equal(x, y)


def test_max_norm_zero_zeroes_grads_and_inf_leaves_them(device_backend):
    device, backend = device_backend
    params = make_params(SHAPES, [torch.float32, torch.bfloat16], device=device)
    before = [g.clone() for g in grads(params)]
    fusedclip.clip_grad_norm_(params, math.inf, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(grads(params), before))
    fusedclip.clip_grad_norm_(params, 0.0, backend=backend)
    assert all(bool((g == 0).all()) for g in grads(params))


def test_parameters_themselves_are_never_modified(device_backend):
    device, backend = device_backend
    params = make_params(SHAPES, [torch.float32, torch.float16], device=device)
    data = [p.detach().clone() for p in params]
    fusedclip.clip_grad_norm_(params, 0.01, backend=backend)
    fusedclip.clip_grad_value_(params, 0.01, backend=backend)
    for p, d in zip(params, data):
        assert torch.equal(p.detach(), d)


def test_foreach_is_accepted(device_backend):
    device, backend = device_backend
    for foreach in (None, True, False):
        params = make_params(SHAPES, [torch.float32], device=device)
        theirs = clone_params(params)
        before = [g.clone() for g in grads(params)]
        ours = fusedclip.clip_grad_norm_(params, 0.5, foreach=foreach, backend=backend)
        ref = torch.nn.utils.clip_grad_norm_(theirs, 0.5, foreach=foreach)
        check_clip_against_torch(params, theirs, before, ours, ref, 0.5, 2.0)


def test_no_grads_returns_tensor_zero(device_backend):
    device, backend = device_backend
    params = [torch.nn.Parameter(torch.ones(3, device=device)) for _ in range(2)]
    for result in (
        fusedclip.clip_grad_norm_(params, 1.0, backend=backend),
        fusedclip.clip_grad_norm_([], 1.0, backend=backend),
        fusedclip.get_total_norm([], backend=backend),
    ):
        assert torch.equal(result, torch.tensor(0.0)) and result.dtype == torch.float32 and result.device.type == "cpu"
    assert fusedclip.clip_grads_with_norm_(params, 1.0, torch.tensor(3.0), backend=backend) is None
    assert fusedclip.clip_grad_value_(params, 1.0, backend=backend) is None


def test_generators_are_consumed_once(device_backend):
    device, backend = device_backend
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(device)
    model(torch.randn(4, 6, device=device)).square().sum().backward()
    twin = clone_params(list(model.parameters()))
    ours = fusedclip.clip_grad_norm_(model.parameters(), 0.1, backend=backend)
    theirs = torch.nn.utils.clip_grad_norm_(iter(twin), 0.1)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(model.parameters(), twin):
        torch.testing.assert_close(a.grad, b.grad)


def test_empty_generator_warns_like_torch_at_the_callers_line(device_backend):
    _, backend = device_backend
    with pytest.warns(UserWarning, match="empty generator") as record:
        result = fusedclip.clip_grad_norm_((p for p in []), 1.0, backend=backend)
    assert record[0].filename == __file__
    assert torch.equal(result, torch.tensor(0.0))


@pytest.mark.parametrize("norm_type", [-math.inf, -2.0])
def test_norms_without_identity_raise_on_empty_grads_like_torch(device_backend, norm_type):
    device, backend = device_backend
    params = make_params([(4,), (0,), (3,)], [torch.float32], device=device, zero_tensor=False)
    before = [g.clone() for g in grads(params)]
    with pytest.raises(RuntimeError, match="empty tensor"):
        torch.nn.utils.clip_grad_norm_(clone_params(params), 1.0, norm_type)
    with pytest.raises(RuntimeError, match="empty tensor"):
        fusedclip.clip_grad_norm_(params, 1.0, norm_type, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(grads(params), before))


def test_inf_norm_of_empty_grads_is_the_identity(device_backend):
    """Deliberate deviation: torch raises for p = inf on a zero-size grad; max |x| >= 0 has identity 0."""
    device, backend = device_backend
    params = make_params([(4,), (0,), (3,)], [torch.float32], device=device, zero_tensor=False, none_grad=False)
    expected = max(float(g.abs().max()) for g in grads(params) if g.numel())
    assert float(fusedclip.get_total_norm(grads(params), math.inf, backend=backend)) == expected
    only_empty = [torch.zeros(0, device=device)]
    assert float(fusedclip.get_total_norm(only_empty, math.inf, backend=backend)) == 0.0
