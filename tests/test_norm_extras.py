"""The extras that ride on the norm pass: per-tensor norms and a grad scale (used by AMP and adaptive)."""

from __future__ import annotations

import math

import pytest
import torch
from reference import (
    DTYPE_SETS,
    assert_no_worse_than_torch,
    grads,
    ideal_total_norm,
    make_params,
    rounds_per_tensor_norms_like_torch,
)

import fusedclip
from fusedclip import engine
from fusedclip.norm_type import parse_norm_type

SHAPES = ((17,), (4, 9), (130,), (0,), (), (3, 70))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 0.0, 3.0])
@pytest.mark.parametrize("dtypes", ["fp32", "bf16", "all4"])
def test_per_tensor_norms_come_from_the_same_pass(device_backend, chunk_elements, norm_type, dtypes):
    device, backend = device_backend
    tensors = grads(make_params(SHAPES, DTYPE_SETS[dtypes], device=device))
    call = engine.prepare(tensors, backend)
    per_tensor = torch.full((len(tensors),), -1.0, dtype=torch.float64, device=device)
    total, coef = engine.norm_and_coef(call, parse_norm_type(norm_type), 1.0, per_tensor=per_tensor)
    for i, t in enumerate(tensors):
        ideal = (
            torch.linalg.vector_norm(t.double().cpu(), norm_type)
            if t.numel()
            else torch.tensor(0.0, dtype=torch.float64)
        )
        theirs = torch.linalg.vector_norm(t, norm_type).cpu() if t.numel() else torch.tensor(0.0)
        assert_no_worse_than_torch(per_tensor[i], theirs, ideal, what=f"norm of tensor {i} ({t.dtype})")
    again = engine.norm_and_coef(engine.prepare(tensors, backend), parse_norm_type(norm_type), 1.0)
    assert torch.equal(total, again[0]) and torch.equal(coef, again[1]), "per-tensor output changed the total"


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 0.0])
def test_grad_scale_scales_the_total_and_folds_into_the_coefficient(device_backend, norm_type):
    device, backend = device_backend
    tensors = grads(make_params(SHAPES, DTYPE_SETS["bf16+fp32"], device=device))
    scale = torch.tensor(2.0**-7, device=device)
    ideal = float(ideal_total_norm(tensors, norm_type))
    expected_total = ideal if norm_type == 0.0 else ideal * 2.0**-7
    max_norm = expected_total / 3 if expected_total else 1.0
    call = engine.prepare(tensors, backend)
    total, coef = engine.norm_and_coef(call, parse_norm_type(norm_type), max_norm, grad_scale=scale)
    expected_coef = min(max_norm / (expected_total + 1e-6), 1.0) * 2.0**-7
    # the torch backend on CPUs takes torch's own bf16 per-tensor norms (each within 2**-8 relative)
    rel = 2.0**-8 if rounds_per_tensor_norms_like_torch(tensors, norm_type, backend) else 1e-6
    assert float(total) == pytest.approx(expected_total, rel=rel)
    assert coef.dtype == torch.float64 and float(coef) == pytest.approx(expected_coef, rel=rel)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, -math.inf, 0.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [None, False])
def test_torch_backend_norms_large_16bit_cpu_tensors_in_pieces(monkeypatch, norm_type, dtype, foreach):
    from fusedclip.backends import torch_backend

    monkeypatch.setattr(torch_backend, "CPU_PIECE_ELEMENTS", 64)  # every tensor below spans pieces
    tensors = [torch.randn(s).to(dtype) for s in [(300,), (64,), (5,), (129, 3)]]
    tensors.append(torch.randn(20, 30).to(dtype).t())  # large but not contiguous: normed whole
    tensors[0][17] = 0  # a zero for the count norm
    call = engine.prepare(tensors, "torch", foreach)
    per_tensor = torch.empty(len(tensors), dtype=torch.float64)
    total, _ = engine.norm_and_coef(call, parse_norm_type(norm_type), None, per_tensor=per_tensor)
    for i, t in enumerate(tensors):
        if rounds_per_tensor_norms_like_torch([t], norm_type, "torch"):  # torch's own, bit for bit
            assert float(per_tensor[i]) == float(torch._foreach_norm([t], norm_type)[0]), f"tensor {i}"
            continue
        ideal = torch.linalg.vector_norm(t.double(), norm_type)
        assert float(per_tensor[i]) == pytest.approx(float(ideal), rel=2e-6), f"tensor {i}"
    # torch's definition of the total (for p = 0: tensors with a non-zero element), in float64;
    # ours is returned in the tensors' dtype, as torch returns it
    expected = torch.nn.utils.get_total_norm([t.double() for t in tensors], norm_type)
    assert float(total) == pytest.approx(float(expected), rel=1e-2)


def _uploads_in_steady_state(monkeypatch, call, warm: int = 2, reps: int = 3) -> int:
    """How many tensors ``call`` builds from host data (``torch.tensor`` of a Python list or number
    with a ``device=``: on a GPU, a blocking host-to-device copy) once warmed up."""
    real = torch.tensor
    count = 0

    def counting(data, *args, **kwargs):
        nonlocal count
        if "device" in kwargs and not isinstance(data, torch.Tensor):
            count += 1
        return real(data, *args, **kwargs)

    for _ in range(warm):
        call()
    monkeypatch.setattr(torch, "tensor", counting)
    for _ in range(reps):
        call()
    monkeypatch.setattr(torch, "tensor", real)
    return count


def _per_tensor_calls():
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)] + [torch.nn.Parameter(torch.randn(0))]
    params.append(torch.nn.Parameter(torch.randn(4, dtype=torch.float64)))
    for param in params:
        param.grad = torch.randn_like(param)
    clipper = fusedclip.Clipper(params, mode="norm", backend="torch")
    return {
        "get_norms": lambda: fusedclip.get_norms([p.grad for p in params], backend="torch"),
        "get_norms p=3": lambda: fusedclip.get_norms([p.grad for p in params], 3.0, backend="torch"),
        "Clipper": clipper,
    }


@pytest.mark.parametrize("name", ["get_norms", "get_norms p=3", "Clipper"])
def test_torch_backend_per_tensor_norms_upload_nothing_per_call(monkeypatch, name):
    """The per-tensor scatter index is kept with the plan: steady-state calls build no tensor from
    host data (each would be a host sync on a GPU)."""
    assert _uploads_in_steady_state(monkeypatch, _per_tensor_calls()[name]) == 0


def test_the_upload_count_catches_an_index_made_per_call(monkeypatch):
    """The planted bug: the scatter index rebuilt from a Python list on every call."""
    from fusedclip.backends import torch_backend

    monkeypatch.setattr(torch_backend, "_ORDER_KEY", object())  # a new key object...
    real_write = torch_backend.TorchBackend._write_per_tensor

    def forgetful(work, norm, norms, out):
        work.plan.scratch.clear()  # ...and nothing kept between calls
        real_write(work, norm, norms, out)

    monkeypatch.setattr(torch_backend.TorchBackend, "_write_per_tensor", staticmethod(forgetful))
    assert _uploads_in_steady_state(monkeypatch, _per_tensor_calls()["get_norms"]) == 3
