"""The comparison rule itself must be able to fail: feed it deliberately wrong results."""

from __future__ import annotations

import math

import pytest
import torch
from reference import (
    assert_no_worse_than_torch,
    check_clip_against_torch,
    clone_params,
    grads,
    ideal_total_norm,
    make_params,
    ulp,
)


def _clipped_by_torch(dtype):
    params = make_params([(50,), (7, 3)], [dtype], zero_tensor=False, none_grad=False)
    before = [g.clone() for g in grads(params)]
    total = torch.nn.utils.clip_grad_norm_(params, 0.5)
    return params, before, total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_torch_itself_passes(dtype):
    params, before, total = _clipped_by_torch(dtype)
    check_clip_against_torch(params, clone_params(params), before, total, total, 0.5, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_norm_a_few_ulps_off_is_rejected(dtype):
    params, before, total = _clipped_by_torch(dtype)
    ideal = ideal_total_norm(before, 2.0)
    wrong = (total.double() + 4 * ulp(ideal, dtype)).to(dtype)
    with pytest.raises(AssertionError, match="total norm"):
        assert_no_worse_than_torch(wrong, total, ideal, what="total norm")


def test_an_unscaled_grad_is_rejected():
    params, before, total = _clipped_by_torch(torch.float32)
    ours = clone_params(params)
    ours[1].grad.copy_(before[1])  # "forgot" one tensor
    with pytest.raises(AssertionError, match="grad 1"):
        check_clip_against_torch(ours, params, before, total, total, 0.5, 2.0)


def test_a_slightly_wrong_coefficient_is_rejected():
    params, before, total = _clipped_by_torch(torch.float32)
    ours = clone_params(params)
    for g in grads(ours):
        g.mul_(1 + 1e-5)
    with pytest.raises(AssertionError, match="farther from the fp64 ideal"):
        check_clip_against_torch(ours, params, before, total, total, 0.5, 2.0)


def test_a_single_flipped_element_is_rejected():
    params, before, total = _clipped_by_torch(torch.bfloat16)
    ours = clone_params(params)
    ours[0].grad[17] = torch.nextafter(ours[0].grad[17].float(), torch.tensor(math.inf)).to(torch.bfloat16) * 1.1
    with pytest.raises(AssertionError, match="grad 0"):
        check_clip_against_torch(ours, params, before, total, total, 0.5, 2.0)


def test_nan_where_ideal_is_finite_is_rejected_and_missing_nan_too():
    ideal = torch.tensor([1.0, math.nan], dtype=torch.float64)
    theirs = torch.tensor([1.0, math.nan])
    with pytest.raises(AssertionError):
        assert_no_worse_than_torch(torch.tensor([math.nan, math.nan]), theirs, ideal)
    with pytest.raises(AssertionError):
        assert_no_worse_than_torch(torch.tensor([1.0, 0.0]), theirs, ideal)
    assert_no_worse_than_torch(torch.tensor([1.0, math.nan]), theirs, ideal)
