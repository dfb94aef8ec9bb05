"""The ``cpu`` backend: multithreaded C++ kernels from ``fusedclip._C`` over the plan's tables.

The norm and the scale are each one parallel region over the plan's chunks, on a small pool of
C++ threads (as many as ``torch.get_num_threads()``), with the GIL released. The chunk partials
are reduced in a fixed order, so the result has the same bits for any thread count. The loops are
vectorised for the CPU found at run time (see ``fusedclip._C.build_info()``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from ..norm_type import NormSpec
from ..plan import DTYPE_CODES, KernelTables
from .base import ACC_DTYPE, DeviceWork
from .kernel_base import KernelBackend

_SCRATCH_KEY = "cpu"


def _plan_args(work: DeviceWork, tables: KernelTables) -> tuple[int, int, int, int, int]:
    """(table address, tensors, chunks, chunk size, total elements), computed once per plan."""
    args = work.plan.scratch.get(_SCRATCH_KEY)
    if args is None:
        args = (tables.packed.data_ptr(), tables.num_tensors, tables.num_chunks, tables.chunk_elements, sum(work.plan.numels))
        work.plan.scratch[_SCRATCH_KEY] = args
    return args


def _host_scalar(value: Tensor) -> Tensor:
    """A 0-d CPU tensor of a dtype the kernels read (float32/float16/bfloat16/float64)."""
    value = value.detach().reshape(())
    if value.device.type != "cpu":
        value = value.cpu()
    if value.dtype not in DTYPE_CODES:
        value = value.to(ACC_DTYPE)
    return value


class CpuBackend(KernelBackend):
    """Fused norm, scale and clamp of CPU grads in C++ threads."""

    name = "cpu"

    def unavailable_reason(self) -> str | None:
        return _ext.missing_reason()

    def device_reason(self, device: torch.device) -> str | None:
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, not {device.type} tensors"
        return None

    def launch_norm(
        self,
        work: DeviceWork,
        tables: KernelTables,
        norm: NormSpec,
        max_norm: float | Tensor | None,
        out_dtype: torch.dtype,
        per_tensor: Tensor | None = None,
        grad_scale: Tensor | None = None,
        norm_scale: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        packed, num_tensors, num_chunks, chunk_elements, total_elements = _plan_args(work, tables)
        total = torch.empty((), dtype=out_dtype, device="cpu")  # never the default device: the kernel writes here
        acc = torch.empty((), dtype=ACC_DTYPE, device="cpu")
        coef = None if max_norm is None else torch.empty((), dtype=ACC_DTYPE, device="cpu")
        if isinstance(max_norm, Tensor):
            max_norm = float(max_norm)  # only a tensor on another device gets here (check_max_norm)

        per_tensor_out = per_tensor
        if per_tensor is not None and not (
            per_tensor.dtype == ACC_DTYPE and per_tensor.device.type == "cpu" and per_tensor.is_contiguous()
        ):
            per_tensor_out = torch.empty(num_tensors, dtype=ACC_DTYPE, device="cpu")
        scale = None if grad_scale is None else _host_scalar(grad_scale)
        # general p: the float64 norm scale M, read by the kernel (a CPU tensor: no sync)
        relative_to = None if norm_scale is None else _host_scalar(norm_scale).to(ACC_DTYPE)

        _ext.C.cpu_norm(
            packed,
            num_tensors,
            num_chunks,
            chunk_elements,
            total_elements,
            torch.get_num_threads(),
            int(norm.kind),
            norm.p,
            total.data_ptr(),
            DTYPE_CODES[out_dtype],
            acc.data_ptr(),
            0 if coef is None else coef.data_ptr(),
            0.0 if max_norm is None else max_norm,
            0 if per_tensor_out is None else per_tensor_out.data_ptr(),
            0 if scale is None else scale.data_ptr(),
            0 if scale is None else DTYPE_CODES[scale.dtype],
            0 if relative_to is None else relative_to.data_ptr(),
        )
        if per_tensor_out is not per_tensor:
            per_tensor.copy_(per_tensor_out)  # type: ignore[union-attr]
        return total, coef, acc

    def launch_scale(self, work: DeviceWork, tables: KernelTables, coef: Tensor) -> None:
        packed, num_tensors, num_chunks, chunk_elements, total_elements = _plan_args(work, tables)
        if coef.device.type != "cpu" or coef.dtype not in DTYPE_CODES:
            coef = _host_scalar(coef)
        _ext.C.cpu_scale(
            packed,
            num_tensors,
            num_chunks,
            chunk_elements,
            total_elements,
            torch.get_num_threads(),
            coef.data_ptr(),
            DTYPE_CODES[coef.dtype],
        )

    def launch_clamp(self, work: DeviceWork, tables: KernelTables, clip_value: float) -> None:
        packed, num_tensors, num_chunks, chunk_elements, total_elements = _plan_args(work, tables)
        _ext.C.cpu_clamp(
            packed, num_tensors, num_chunks, chunk_elements, total_elements, torch.get_num_threads(), float(clip_value)
        )
