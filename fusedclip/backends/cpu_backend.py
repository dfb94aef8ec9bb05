"""The ``cpu`` backend: multithreaded C++ kernels from ``fusedclip._C`` over the plan's tables.

The norm and the scale are each one parallel region over the plan's chunks, on a small pool of
C++ threads (as many as ``torch.get_num_threads()``), with the GIL released. The chunk partials
are reduced in a fixed order, so the result has the same bits for any thread count. The loops are
vectorised for the CPU found at run time (see ``fusedclip._C.build_info()``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _ext
from ..plan import DTYPE_CODES, KernelTables
from .base import DeviceWork
from .kernel_base import KernelBackend, NormLaunch, device_scalar, extension_tables

_SCRATCH_KEY = "cpu"


def _tables(work: DeviceWork, tables: KernelTables) -> Any:
    """The extension's description of the plan's tables, made once per plan."""
    described = work.plan.scratch.get(_SCRATCH_KEY)
    if described is None:
        described = extension_tables(_ext.C, tables, sum(work.plan.numels))
        work.plan.scratch[_SCRATCH_KEY] = described
    return described


class CpuBackend(KernelBackend):
    """Fused norm, scale and clamp of CPU grads in C++ threads."""

    name = "cpu"

    def unavailable_reason(self) -> str | None:
        return _ext.missing_reason()

    def device_reason(self, device: torch.device) -> str | None:
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, not {device.type} tensors"
        return None

    def launch_norm(self, work: DeviceWork, tables: KernelTables, launch: NormLaunch) -> None:
        _ext.C.cpu_norm(_tables(work, tables), launch.extension_args(_ext.C), torch.get_num_threads())

    def launch_scale(self, work: DeviceWork, tables: KernelTables, coef: Tensor) -> None:
        if coef.device.type != "cpu" or coef.dtype not in DTYPE_CODES:
            coef = device_scalar(coef, work.device)
        _ext.C.cpu_scale(_tables(work, tables), torch.get_num_threads(), coef.data_ptr(), DTYPE_CODES[coef.dtype])

    def launch_clamp(self, work: DeviceWork, tables: KernelTables, clip_value: float) -> None:
        _ext.C.cpu_clamp(_tables(work, tables), torch.get_num_threads(), float(clip_value))
