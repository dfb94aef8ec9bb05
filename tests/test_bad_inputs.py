"""Bad input fails loudly, with a message naming the problem, before any grad is touched."""

from __future__ import annotations

import math

import pytest
import torch
from reference import SHAPES, grads, make_params

import fusedclip


@pytest.fixture
def params(device_backend):
    device, _ = device_backend
    return make_params(SHAPES, [torch.float32, torch.bfloat16], device=device)


def _unchanged(params, before):
    return all(torch.equal(a, b) for a, b in zip(grads(params), before))


CLIP_NORM_CASES = [
    (dict(max_norm=-1.0), ValueError, "non-negative"),
    (dict(max_norm=math.nan), ValueError, "non-negative"),
    (dict(max_norm=torch.tensor(-2.0)), ValueError, "non-negative"),
    (dict(max_norm="1.0"), TypeError, "max_norm"),
    (dict(max_norm=None), TypeError, "max_norm"),
    (dict(max_norm=True), TypeError, "max_norm"),
    (dict(max_norm=torch.ones(2)), ValueError, "1-element"),
    (dict(max_norm=torch.tensor(1 + 1j)), TypeError, "real"),
    (dict(max_norm=1.0, norm_type="fro"), ValueError, "norm_type"),
    (dict(max_norm=1.0, norm_type=math.nan), ValueError, "NaN"),
    (dict(max_norm=1.0, norm_type=None), TypeError, "norm_type"),
    (dict(max_norm=1.0, norm_type=[2]), TypeError, "norm_type"),
    (dict(max_norm=1.0, backend="nope"), ValueError, "unknown fusedclip backend 'nope'"),
    (dict(max_norm=1.0, backend=3), TypeError, "backend"),
    (dict(max_norm=1.0, foreach="yes"), TypeError, "foreach"),
    (dict(max_norm=1.0, error_if_nonfinite="no"), TypeError, "error_if_nonfinite"),
    (dict(max_norm=1.0, error_if_nonfinite="False"), TypeError, "always true"),  # torch reads it as True
    (dict(max_norm=1.0, foreach=torch.ones(2, dtype=torch.bool)), TypeError, "foreach"),
]


@pytest.mark.parametrize("kwargs,error,message", CLIP_NORM_CASES, ids=lambda v: repr(v)[:40])
def test_clip_grad_norm_rejects(params, device_backend, kwargs, error, message):
    before = [g.clone() for g in grads(params)]
    kwargs = dict(kwargs)
    kwargs.setdefault("backend", device_backend[1])
    with pytest.raises(error, match=message):
        fusedclip.clip_grad_norm_(params, **kwargs)
    assert _unchanged(params, before)


@pytest.mark.parametrize("clip_value", [0.0, -0.5, math.nan, "0.1", None, torch.tensor([1.0, 2.0])])
def test_clip_grad_value_rejects_non_positive_or_non_numbers(params, device_backend, clip_value):
    before = [g.clone() for g in grads(params)]
    with pytest.raises((ValueError, TypeError), match="clip_value"):
        fusedclip.clip_grad_value_(params, clip_value, backend=device_backend[1])
    assert _unchanged(params, before)


def test_non_tensor_items_are_named(params, device_backend):
    before = [g.clone() for g in grads(params)]
    with pytest.raises(TypeError, match=r"parameters\[2\] is a int"):
        fusedclip.clip_grad_norm_(params[:2] + [3] + params[2:], 1.0, backend=device_backend[1])
    with pytest.raises(TypeError, match=r"tensors\[1\] is a str"):
        fusedclip.get_total_norm([grads(params)[0], "x"], backend=device_backend[1])
    with pytest.raises(TypeError, match="iterable of Tensors"):
        fusedclip.clip_grad_norm_(5, 1.0)
    with pytest.raises(TypeError, match="iterable of Tensors"):
        fusedclip.clip_grad_value_("abc", 1.0)
    assert _unchanged(params, before)


def test_a_non_tensor_grad_is_rejected(params, device_backend):
    class Fake:
        grad = [1.0, 2.0]

    before = [g.clone() for g in grads(params)]
    with pytest.raises(TypeError, match="gradients"):
        fusedclip.clip_grad_norm_(params + [Fake()], 1.0, backend=device_backend[1])
    assert _unchanged(params, before)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_and_bool_grads_raise_type_error(params, device_backend, dtype):
    device, backend = device_backend
    before = [g.clone() for g in grads(params)]
    bad = torch.ones(4, dtype=dtype, device=device)
    with pytest.raises(TypeError, match=f"dtype {dtype}"):
        fusedclip.get_total_norm(grads(params) + [bad], backend=backend)
    holder = torch.zeros(4, dtype=dtype, device=device)
    holder.grad = bad  # torch allows integer grads on integer tensors
    with pytest.raises(TypeError, match="floating point"):
        fusedclip.clip_grad_value_(params + [holder], 1.0, backend=backend)
    assert _unchanged(params, before)


def test_sparse_grads_raise_type_error(params, device_backend):
    device, backend = device_backend
    before = [g.clone() for g in grads(params)]
    sparse = torch.nn.Parameter(torch.zeros(5, 5, device=device))
    sparse.grad = torch.eye(5, device=device).to_sparse()
    with pytest.raises(TypeError, match="sparse|layout"):
        fusedclip.clip_grad_norm_(params + [sparse], 1.0, backend=backend)
    assert _unchanged(params, before)


def test_bad_total_norm_for_clip_grads_with_norm(params, device_backend):
    before = [g.clone() for g in grads(params)]
    with pytest.raises(ValueError, match="1-element"):
        fusedclip.clip_grads_with_norm_(params, 1.0, torch.ones(3), backend=device_backend[1])
    with pytest.raises(TypeError, match="total_norm"):
        fusedclip.clip_grads_with_norm_(params, 1.0, "big", backend=device_backend[1])
    with pytest.raises(ValueError, match="non-negative"):
        fusedclip.clip_grads_with_norm_(params, -1.0, torch.tensor(2.0), backend=device_backend[1])
    assert _unchanged(params, before)


def test_bad_backend_in_environment(params, monkeypatch):
    monkeypatch.setenv("FUSEDCLIP_BACKEND", "bogus")
    before = [g.clone() for g in grads(params)]
    with pytest.raises(ValueError, match="unknown fusedclip backend 'bogus'"):
        fusedclip.clip_grad_norm_(params, 1.0)
    assert _unchanged(params, before)


def test_norm_type_parsing_accepts_what_torch_accepts():
    from fusedclip.norm_type import NormKind, parse_norm_type

    assert parse_norm_type("inf").kind is NormKind.MAX
    assert parse_norm_type("-inf").kind is NormKind.MIN
    assert parse_norm_type(2).p == 2.0 and parse_norm_type("2").p == 2.0
    assert parse_norm_type(0).kind is NormKind.COUNT
    assert parse_norm_type(torch.tensor(3.0)).p == 3.0
    assert parse_norm_type(-1.5).kind is NormKind.SUM_POW
