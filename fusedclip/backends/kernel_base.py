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

import torch
from torch import Tensor

from ..norm_type import NormSpec
from ..plan import DevicePlan, KernelTables
from .base import Backend, DeviceWork, NormResult, is_general_p
from .torch_backend import TorchBackend

_TORCH = TorchBackend()


def _general(norm: NormSpec, scale: Tensor | None) -> Tensor | None:
    """The norm scale to launch with: only general p uses one."""
    return scale if scale is not None and is_general_p(norm) else None


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
        """One launch: (total in ``out_dtype``, float64 coefficient or None, float64 accumulator).

        ``max_norm`` is a Python float or a 0-d tensor on the device (read by the kernel, no sync);
        ``norm_scale`` the 0-d float64 norm scale of a general p (on the device), or None.
        """

    @abc.abstractmethod
    def launch_scale(self, work: DeviceWork, tables: KernelTables, coef: Tensor) -> None:
        """One launch multiplying every grad by ``coef`` (0-d float32/float64 on the device)."""

    @abc.abstractmethod
    def launch_clamp(self, work: DeviceWork, tables: KernelTables, clip_value: float) -> None:
        """One launch clamping every grad to ``[-clip_value, clip_value]``."""

    # -- the Backend primitives ---------------------------------------------------------------
    def accumulate(
        self, work: DeviceWork, norm: NormSpec, per_tensor: Tensor | None = None, *, scale: Tensor | None = None
    ) -> Tensor:
        work, tables = self._bind(work)
        _, _, acc = self.launch_norm(work, tables, norm, None, torch.float64, per_tensor, None, _general(norm, scale))
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
        launched = self.launch_norm(work, tables, norm, max_norm, out_dtype, per_tensor, grad_scale, scale)
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
