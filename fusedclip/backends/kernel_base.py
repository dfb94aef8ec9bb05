"""What the kernel backends (triton, cpu, cuda) share around their launches.

A kernel backend reads the plan's tables and writes through raw addresses, so this layer makes
that safe and torch-consistent:

* grads that are not dense in memory are staged into buffers of this call only (``DevicePlan.bind``)
  before a launch and copied back after a launch that writes;
* grads whose memory extents overlap (one grad listed twice, views sharing elements, interleaved
  strided views) are scaled by the torch backend, one tensor after another, so the result is
  torch's (a shared element is scaled once per grad holding it) and no two programs race on a byte;
* autograd's version counter of every grad is bumped after a write, as torch's in-place ops do.

The kernel contract every subclass implements (see ``csrc/fusedclip.h`` for the same in C++):

* accumulator: finite p != 0: sum of ``|x|^p`` in float64; inf: max ``|x|``; -inf: min ``|x|``
  (both NaN-propagating); 0: the number of tensors holding an element ``!= 0`` (NaN counts).
  General p (not 0, 1, 2, +-inf) with a norm scale ``M`` (``norm_scale``, a 0-d float64 on the
  device that the kernel reads, no sync): the sum of ``(|x| / M')^p``, ``M' = M`` when
  ``0 < M < inf`` else 1 (see :mod:`fusedclip.backends.base`).
  Zero-size tensors contribute nothing (the engine rejects them first for -inf and p < 0).
  The ``cpu`` kernels sum p = 1, 2 of float32/float16/bfloat16 data in float32 blocks of 256
  elements added into the float64 sum, redoing in float64 any block float32 cannot sum safely
  (overflow, inf/NaN, tiny squares): still at least float32 accumulation and overflow-safe.
* total: the accumulator (p = 1, inf, -inf, 0), its square root (p = 2) or ``M'`` times its
  ``1/p`` power; then, when ``grad_scale`` ``s`` is given and p != 0, ``total * |s|``.
* coefficient (float64): ``r = max_norm / (total + 1e-6)``; ``c = r > 1 ? 1 : r`` (NaN
  propagates); then ``c * s`` when ``grad_scale`` is given.
* per-tensor norms (when a float64 ``per_tensor`` buffer is given): each tensor's own norm,
  unscaled, from the same pass (p = 0: its count of non-zero elements; zero-size tensors: 0;
  general p: ``M'`` times the 1/p power of the tensor's scaled sum).
* the total is rounded once to ``out_dtype``; the accumulator is returned unrounded (float64).
* scale: every program returns at once when ``coef == 1`` (a clip coefficient is never above 1,
  but with ``grad_scale`` folded in, e.g. AMP's inverse scale below 1, it can be); otherwise
  ``x = round(x * coef)`` for float64 grads, and for the others ``x = round(float(x) *
  float(coef))`` (torch's result) when ``coef`` is 0, inf, NaN or a normal float32, else (``coef``
  outside float32's normal range, where ``float(coef)`` loses bits or overflows) the exact product
  ``x * coef`` rounded once to the grad's dtype (``product_round_odd`` in ``csrc/fusedclip.h``).
* clamp: ``x > v ? v : (x < -v ? -v : x)`` (NaN stays NaN).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..norm_type import NormSpec
from ..plan import DTYPE_CODES, DevicePlan, KernelTables
from .base import ACC_DTYPE, Backend, DeviceWork, NormResult, is_general_p
from .torch_backend import TorchBackend

_TORCH = TorchBackend()


def _general(norm: NormSpec, scale: Tensor | None) -> Tensor | None:
    """The norm scale to launch with: only general p uses one."""
    return scale if scale is not None and is_general_p(norm) else None


def device_scalar(value: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """``value`` as a 0-d tensor on ``device`` in ``dtype``, or else in a dtype the kernels read
    (float32/float16/bfloat16/float64; anything else becomes float64). A copy between devices is
    queued, not waited for (a CUDA value read by CPU kernels is the one exception: it waits)."""
    value = value.detach().reshape(())
    if value.device != device:
        value = value.to(device, non_blocking=device.type != "cpu")
    if dtype is not None:
        return value.to(dtype)
    return value if value.dtype in DTYPE_CODES else value.to(ACC_DTYPE)


@dataclass(frozen=True)
class NormLaunch:
    """One norm launch, normalised once for every kernel backend (:meth:`NormLaunch.make`): the
    outputs are fresh tensors on the grads' device, and every value a kernel reads is either a
    Python number or a 0-d tensor on that device in a dtype the kernels read. Backends differ only
    in how they hand it to their kernel."""

    norm: NormSpec
    #: out: the total, rounded once to the result dtype
    total: Tensor
    #: out: the unrounded float64 accumulator
    acc: Tensor
    #: out: the float64 clip coefficient; None without ``max_norm``
    coef: Tensor | None
    #: ``max_norm`` known on the host (used when :attr:`max_norm` is None)
    max_norm_value: float
    #: ``max_norm`` on the device, read by the kernel (no host sync)
    max_norm: Tensor | None
    #: grads are read as ``grad_scale * grad`` (None: as they are)
    grad_scale: Tensor | None
    #: general p only: the float64 norm scale ``M`` (see :mod:`fusedclip.backends.base`)
    norm_scale: Tensor | None
    #: out: contiguous float64 per-tensor norms, one slot per tensor (None: not wanted)
    per_tensor: Tensor | None

    @classmethod
    def make(
        cls,
        work: DeviceWork,
        tables: KernelTables,
        norm: NormSpec,
        max_norm: float | Tensor | None,
        out_dtype: torch.dtype,
        per_tensor: Tensor | None,
        grad_scale: Tensor | None,
        norm_scale: Tensor | None,
    ) -> NormLaunch:
        device = work.device
        total = torch.empty((), dtype=out_dtype, device=device)
        # separate tensors, not views of one buffer: the custom ops' outputs have no storage offset
        acc = torch.empty((), dtype=ACC_DTYPE, device=device)
        coef = None if max_norm is None else torch.empty((), dtype=ACC_DTYPE, device=device)
        max_norm_value, max_norm_tensor = 0.0, None
        if isinstance(max_norm, Tensor):
            if max_norm.device.type == "cpu" and device.type != "cpu":
                max_norm_value = float(max_norm)  # a host value: reading it costs no sync
            else:
                max_norm_tensor = device_scalar(max_norm, device)
        elif max_norm is not None:
            max_norm_value = float(max_norm)
        per_tensor_out = per_tensor
        if per_tensor is not None and not (
            per_tensor.dtype == ACC_DTYPE and per_tensor.device == device and per_tensor.is_contiguous()
        ):
            per_tensor_out = torch.empty(tables.num_tensors, dtype=ACC_DTYPE, device=device)
        if per_tensor_out is not None and per_tensor_out.numel() < tables.num_tensors:
            raise ValueError(f"per_tensor has {per_tensor_out.numel()} slots for {tables.num_tensors} tensors")
        return cls(
            norm=norm,
            total=total,
            acc=acc,
            coef=coef,
            max_norm_value=max_norm_value,
            max_norm=max_norm_tensor,
            grad_scale=None if grad_scale is None else device_scalar(grad_scale, device),
            norm_scale=None if norm_scale is None else device_scalar(norm_scale, device, ACC_DTYPE),
            per_tensor=per_tensor_out,
        )

    def extension_args(self, C: Any) -> Any:
        """The extension's ``NormArgs`` (``csrc/bindings.cpp``) for this launch: every field named."""

        def address(tensor: Tensor | None) -> int:
            return 0 if tensor is None else tensor.data_ptr()

        def code(tensor: Tensor | None) -> int:
            return -1 if tensor is None else DTYPE_CODES[tensor.dtype]

        return C.NormArgs(
            kind=int(self.norm.kind),
            p=self.norm.p,
            total_out=self.total.data_ptr(),
            total_dtype=DTYPE_CODES[self.total.dtype],
            acc_out=self.acc.data_ptr(),
            coef_out=address(self.coef),
            max_norm=self.max_norm_value,
            max_norm_ptr=address(self.max_norm),
            max_norm_dtype=code(self.max_norm),
            scale_ptr=address(self.grad_scale),
            scale_dtype=code(self.grad_scale),
            per_tensor_out=address(self.per_tensor),
            norm_scale_ptr=address(self.norm_scale),
        )


def extension_tables(C: Any, tables: KernelTables, total_elements: int = 0) -> Any:
    """The extension's ``Tables`` (``csrc/bindings.cpp``) for a plan's kernel tables."""
    return C.Tables(
        packed=tables.packed.data_ptr(),
        num_tensors=tables.num_tensors,
        num_chunks=tables.num_chunks,
        chunk_elements=tables.chunk_elements,
        total_elements=total_elements,
    )


def bump_versions(grads: list[Tensor]) -> None:
    """Tell autograd the grads were modified in place (as torch's own in-place ops do)."""
    torch._C._increment_version(grads)


def _one_at_a_time(work: DeviceWork) -> DeviceWork:
    """The same work for the torch backend without foreach (whose CUDA kernels would race on aliases)."""
    return DeviceWork(work.plan, work.grads, foreach=False)


class KernelBackend(Backend):
    """Base of the backends that run fused kernels over a plan's tables."""

    def plan_reason(self, plan: DevicePlan) -> str | None:
        return plan.kernel_reason

    @staticmethod
    def _bind(work: DeviceWork) -> tuple[DeviceWork, KernelTables]:
        """The work with its plan bound to this call (staging buffers for strided grads, filled),
        and the tables to launch with. The bound plan dies with the primitive."""
        plan = work.plan.bind(work.grads)
        if plan is not work.plan:
            work = DeviceWork(plan, work.grads, work.foreach)
        tables = plan.kernel_tables(work.grads)
        plan.stage_in(work.grads)
        return work, tables

    # -- what subclasses implement ------------------------------------------------------------
    @abc.abstractmethod
    def launch_norm(self, work: DeviceWork, tables: KernelTables, launch: NormLaunch) -> None:
        """One launch writing ``launch``'s outputs (total, accumulator, coefficient, per-tensor norms)."""

    @abc.abstractmethod
    def launch_scale(self, work: DeviceWork, tables: KernelTables, coef: Tensor) -> None:
        """One launch multiplying every grad by ``coef`` (0-d float32/float64 on the device)."""

    @abc.abstractmethod
    def launch_clamp(self, work: DeviceWork, tables: KernelTables, clip_value: float) -> None:
        """One launch clamping every grad to ``[-clip_value, clip_value]``."""

    def run_norm(
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
        """One norm launch: (total in ``out_dtype``, float64 coefficient or None, float64 accumulator).

        ``max_norm`` is a Python float or a 0-d tensor (read by the kernel on the grads' device, no
        sync); ``norm_scale`` the 0-d float64 norm scale of a general p, or None; ``per_tensor`` any
        float64-compatible buffer of one slot per tensor (written after the launch).
        """
        launch = NormLaunch.make(work, tables, norm, max_norm, out_dtype, per_tensor, grad_scale, norm_scale)
        self.launch_norm(work, tables, launch)
        if launch.per_tensor is not per_tensor:
            per_tensor.copy_(launch.per_tensor)  # type: ignore[union-attr]
        return launch.total, launch.coef, launch.acc

    # -- the Backend primitives ---------------------------------------------------------------
    def accumulate(
        self, work: DeviceWork, norm: NormSpec, per_tensor: Tensor | None = None, *, scale: Tensor | None = None
    ) -> Tensor:
        work, tables = self._bind(work)
        _, _, acc = self.run_norm(work, tables, norm, None, torch.float64, per_tensor, None, _general(norm, scale))
        return acc

    def norm(
        self,
        work: DeviceWork,
        norm: NormSpec,
        max_norm: float | Tensor | None,
        out_dtype: torch.dtype,
        *,
        per_tensor: Tensor | None = None,
        grad_scale: Tensor | None = None,
        scale: Tensor | None = None,
    ) -> NormResult:
        work, tables = self._bind(work)
        scale = _general(norm, scale)
        launched = self.run_norm(work, tables, norm, max_norm, out_dtype, per_tensor, grad_scale, scale)
        return NormResult(*launched, scale)

    def scale_(self, work: DeviceWork, coef: Tensor) -> None:
        if work.plan.aliased:
            _TORCH.scale_(_one_at_a_time(work), coef)
            return
        work, tables = self._bind(work)
        self.launch_scale(work, tables, coef)
        work.plan.stage_out(work.grads)
        bump_versions(work.grads)

    def clamp_(self, work: DeviceWork, clip_value: float) -> None:
        if work.plan.aliased:
            _TORCH.clamp_(_one_at_a_time(work), clip_value)
            return
        work, tables = self._bind(work)
        self.launch_clamp(work, tables, clip_value)
        work.plan.stage_out(work.grads)
        bump_versions(work.grads)
