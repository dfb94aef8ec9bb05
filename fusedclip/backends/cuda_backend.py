"""The ``cuda`` backend: CUDA kernels from ``fusedclip._C`` over the plan's tables.

One norm launch and one scale launch per clip, for any number of tensors and any dtype mix, on
torch's current stream, with no host synchronisation and no allocation inside the launches, so
the calls can be captured in CUDA graphs. The norm kernel computes the total norm and the clip
coefficient on the device (the last block to finish reduces the per-unit partials in a fixed
order, with no floating-point atomics); the scale kernel reads the coefficient and returns at
once when it is 1.

Repeated calls on the same grads give the same bits for the same GPU model and SM count (the
work units are sized from the SM count, so a MIG slice counts as its own device), the same build
of ``fusedclip._C`` and the same plan. Between SM counts or builds the last bits may differ (the
device code may contract ``acc + x * x`` into an FMA, the CPU build does not), within the
accuracy rules.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from ..plan import DTYPE_CODES, KernelTables
from .base import ACC_DTYPE, DeviceWork
from .kernel_base import KernelBackend, NormLaunch, device_scalar, extension_tables

_SCRATCH_KEY = "cuda-workspace"


class _Workspace:
    """The norm kernel's float64 partials and its two self-resetting counters. One per plan and
    stream for eager launches, one per captured launch in a CUDA graph (``DevicePlan.workspace``):
    two streams, or a graph and an eager call, never share one, so they cannot mix their partials."""

    __slots__ = ("buffer", "partials", "counters")

    def __init__(self, tables: KernelTables, device: torch.device, device_index: int) -> None:
        units = _ext.C.cuda_norm_units(device_index, tables.num_chunks, tables.chunk_elements)
        # One extra float64 slot holds the two uint32 counters: zeroed once here (on the stream
        # that will use them), then every norm launch leaves them at zero for the next one.
        self.buffer = torch.zeros(units + 1, dtype=ACC_DTYPE, device=device)
        self.partials = self.buffer.data_ptr()
        self.counters = self.partials + 8 * units


def _capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on the current stream of ``device``."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class CudaBackend(KernelBackend):
    """Fused norm, scale and clamp of CUDA grads in two launches."""

    name = "cuda"

    def __init__(self) -> None:
        self._reason: str | None | bool = False  # False: not computed yet
        self._device_reasons: dict[int, str | None] = {}

    def unavailable_reason(self) -> str | None:
        if self._reason is False:
            self._reason = self._compute_reason()
        return self._reason  # type: ignore[return-value]

    @staticmethod
    def _compute_reason() -> str | None:
        # built without CUDA, torch without CUDA or a device, or a driver too old for the linked runtime
        return _ext.cuda_unavailable_reason()

    def device_reason(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, not {device.type} tensors"
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._device_reasons:
            major, minor = torch.cuda.get_device_capability(index)
            self._device_reasons[index] = _ext.arch_reason(major, minor)
        return self._device_reasons[index]

    # -- launches ---------------------------------------------------------------------------------
    @staticmethod
    def _launch_target(work: DeviceWork) -> tuple[int, int]:
        """(device index, handle of torch's current stream on it)."""
        device = work.device
        index = device.index if device.index is not None else torch.cuda.current_device()
        return index, torch.cuda.current_stream(index).cuda_stream

    @staticmethod
    def _workspace(work: DeviceWork, tables: KernelTables, index: int, stream: int) -> _Workspace:
        # eager: one per (plan, stream), made on that stream; captured: a fresh one owned by the graph
        return work.plan.workspace(
            _SCRATCH_KEY, stream, lambda: _Workspace(tables, work.device, index), capturing=_capturing(work.device)
        )

    def launch_norm(self, work: DeviceWork, tables: KernelTables, launch: NormLaunch) -> None:
        index, stream = self._launch_target(work)
        workspace = self._workspace(work, tables, index, stream)
        with torch.cuda.device(index):
            _ext.C.cuda_norm(
                extension_tables(_ext.C, tables),
                index,
                stream,
                launch.extension_args(_ext.C),
                workspace.partials,
                workspace.counters,
            )

    def launch_scale(self, work: DeviceWork, tables: KernelTables, coef: Tensor) -> None:
        index, stream = self._launch_target(work)
        if coef.device != work.device or coef.dtype not in DTYPE_CODES:
            coef = device_scalar(coef, work.device)
        with torch.cuda.device(index):
            _ext.C.cuda_scale(extension_tables(_ext.C, tables), index, stream, coef.data_ptr(), DTYPE_CODES[coef.dtype])

    def launch_clamp(self, work: DeviceWork, tables: KernelTables, clip_value: float) -> None:
        index, stream = self._launch_target(work)
        with torch.cuda.device(index):
            _ext.C.cuda_clamp(extension_tables(_ext.C, tables), index, stream, float(clip_value))
