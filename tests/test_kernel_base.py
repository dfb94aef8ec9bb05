"""fusedclip/backends/kernel_base.py: what every kernel backend shares around its launches.

One norm launch is described once (``NormLaunch.make``), so the backends cannot differ in how they
take its arguments: a per-tensor buffer of any layout or dtype, a ``max_norm`` held in a tensor, a
grad scale of any real dtype. Run for every kernel backend on this machine (the emulated CUDA
kernels and Triton's interpreter included).
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKEND_CASES, require_backend

from fusedclip import backends, plan
from fusedclip.backends.base import DeviceWork
from fusedclip.backends.kernel_base import KernelBackend
from fusedclip.norm_type import parse_norm_type


def _work(device: str, name: str):
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(n), device=device) for n in (5, 300, 70)]
    device_plan = plan.build_plan(grads, True).devices[0]
    work = DeviceWork(device_plan, grads)
    backend = backends.get_backend(name)
    assert isinstance(backend, KernelBackend)
    return backend, work, device_plan.kernel_tables(grads), grads


@pytest.fixture(params=[case for case in BACKEND_CASES if case.values[0][1] != "torch"])
def kernel_case(request):
    device, name = request.param
    if (device, name) == ("cpu", "cuda"):
        request.getfixturevalue("emulated_cuda")
    require_backend(device, name)
    return device, name


@pytest.mark.parametrize("layout", ["strided", "float32", "contiguous"])
def test_per_tensor_buffers_of_any_layout_are_written(kernel_case, layout):
    device, name = kernel_case
    backend, work, tables, grads = _work(device, name)
    expected = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]).cpu()
    if layout == "strided":
        buffer = torch.zeros(6, dtype=torch.float64, device=device)[::2]
    elif layout == "float32":
        buffer = torch.zeros(3, dtype=torch.float32, device=device)
    else:
        buffer = torch.zeros(3, dtype=torch.float64, device=device)
    backend.run_norm(work, tables, parse_norm_type(2.0), None, torch.float32, per_tensor=buffer)
    rel = 1e-6 if buffer.dtype == torch.float32 else 1e-7
    torch.testing.assert_close(buffer.cpu().double(), expected, rtol=rel, atol=0)


def test_a_per_tensor_buffer_too_small_is_refused_before_the_launch(kernel_case):
    device, name = kernel_case
    backend, work, tables, _ = _work(device, name)
    with pytest.raises(ValueError, match="2 slots for 3 tensors"):
        backend.run_norm(work, tables, parse_norm_type(2.0), None, torch.float32, per_tensor=torch.zeros(2, dtype=torch.float64, device=device))


@pytest.mark.parametrize("scale_dtype", [torch.float64, torch.float16, torch.int64])
def test_max_norm_and_grad_scale_as_tensors_match_numbers(kernel_case, scale_dtype):
    device, name = kernel_case
    backend, work, tables, _ = _work(device, name)
    norm = parse_norm_type(2.0)
    total, coef, _ = backend.run_norm(work, tables, norm, 0.5, torch.float64, grad_scale=torch.tensor(2, dtype=scale_dtype))
    total_t, coef_t, _ = backend.run_norm(
        work, tables, norm, torch.tensor(0.5, device=device), torch.float64, grad_scale=torch.tensor(2, dtype=scale_dtype)
    )
    assert torch.equal(total, total_t) and torch.equal(coef, coef_t)
    plain, _, _ = backend.run_norm(work, tables, norm, None, torch.float64)
    assert float(total) == pytest.approx(2 * float(plain), rel=1e-12)


def test_outputs_are_tensors_of_their_own(kernel_case):
    """Total, coefficient and accumulator are fresh 0-d tensors with no storage offset, as the custom
    ops' fake implementations promise (a view into a shared buffer fails ``opcheck``)."""
    device, name = kernel_case
    backend, work, tables, _ = _work(device, name)
    outputs = backend.run_norm(work, tables, parse_norm_type(2.0), 1.0, torch.float32)
    storages = set()
    for output in outputs:
        assert output.dim() == 0 and output.storage_offset() == 0
        storages.add(output.untyped_storage().data_ptr())
    assert len(storages) == 3
