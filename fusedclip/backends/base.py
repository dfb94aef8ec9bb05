"""The backend interface: the two primitives every backend provides, plus value clipping.

* ``norm(work, norm, max_norm, out_dtype) -> (total_norm, coef)``: the total norm (rounded once to
  ``out_dtype``) and the clip coefficient ``min(max_norm / (total + 1e-6), 1)`` computed from the
  unrounded total, both on the device, without a host synchronisation. Two optional extras ride
  on the same pass: ``per_tensor`` (a float64 buffer receiving every tensor's own norm) and
  ``grad_scale`` (a 0-d device tensor ``s``: the grads are read as ``s * grad``, so the total is
  ``s * raw_total`` and the returned coefficient ``s * min(...)`` is the factor to multiply the
  stored grads by; AMP passes its inverse scale here).
* ``scale_(work, coef)``: multiply every grad by the coefficient read from device memory.
* ``clamp_(work, clip_value)``: ``clip_grad_value_``.

``accumulate`` exposes the raw reduction (sum of ``|x|^p``, max, min or tensor count) so that grads
on several devices can be combined; ``finish`` turns an accumulator into total and coefficient.

General p (any p but 0, 1, 2 and +-inf) is computed relative to a norm scale ``M`` so that nothing
overflows or underflows float64 (``|x|^p`` does for p = 1e4, or p = 10 with values near 1e38 or
1e-40): ``accumulate``/``norm`` take ``scale`` (0-d float64 on the device, normally max ``|x|`` over
every grad of the call, or min ``|x|`` for p < 0, see :func:`fusedclip.engine.norm_scale`) and the
accumulator is then the sum of ``(|x| / M')^p`` with ``M' = usable_norm_scale(M)`` (``M`` when
``0 < M < inf``, else 1: zero, inf and NaN cases stay exactly as unscaled, which is torch's result).
Such accumulators add up across devices and processes like any sum, provided every one of them
used the same ``M``; the total is ``M' * acc^(1/p)``. Without ``scale`` the accumulator is the plain
sum of ``|x|^p``. A per-tensor norm computed with a scale can underflow (a tensor far below ``M``),
so the engine takes general-p per-tensor norms from :func:`per_tensor_norms_exact` instead.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..norm_type import NormKind, NormSpec
from ..plan import DevicePlan

#: torch's epsilon in ``max_norm / (total_norm + 1e-6)``
CLIP_EPS = 1e-6
#: dtype of accumulators and coefficients produced by the backends
ACC_DTYPE = torch.float64
#: whether values of CPU tensors may be read on the host for free (see ``host_reads_are_free``);
#: the tests turn it off so that CPU tensors stand in for a device where a read waits for its queue
CPU_READS_ARE_FREE = True


def host_reads_are_free(device: torch.device) -> bool:
    """True when reading a tensor's value on the host costs nothing on ``device``: the CPU, which has
    no queue to wait for, outside tracing. Paths that read values (to choose a cheaper computation,
    or to redo a rare overflow exactly) take them only then; elsewhere they stay on the device."""
    return CPU_READS_ARE_FREE and device.type == "cpu" and not torch.compiler.is_compiling()


@dataclass
class DeviceWork:
    """One call's grads on one device, with the plan that describes them."""

    plan: DevicePlan
    grads: list[Tensor]
    foreach: bool | None = None

    @property
    def device(self) -> torch.device:
        return self.plan.device


class NormResult(NamedTuple):
    """What a norm pass produces, all 0-d tensors on the device."""

    total: Tensor  # the total norm, rounded once to the result dtype (scaled by grad_scale)
    coef: Tensor | None  # float64 factor to multiply the stored grads by (None without max_norm)
    acc: Tensor  # float64 raw accumulator of the stored grads (not times grad_scale, unrounded)
    scale: Tensor | None = None  # general p: the norm scale M the accumulator is relative to


class Backend(abc.ABC):
    """A way of running the primitives. Subclasses fill the abstract methods."""

    name: str = "?"

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run in this process at all, or None when it can."""
        return None

    def device_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device``, or None when it can."""
        return None

    def plan_reason(self, plan: DevicePlan) -> str | None:
        """Why this backend cannot take these grads (e.g. complex dtypes), or None when it can."""
        return None

    @abc.abstractmethod
    def accumulate(
        self, work: DeviceWork, norm: NormSpec, per_tensor: Tensor | None = None, *, scale: Tensor | None = None
    ) -> Tensor:
        """0-d float64 tensor on the device: sum of |x|^p (of (|x| / M')^p for general p with a norm
        ``scale``, see the module docstring), max |x|, min |x| or count of non-zero tensors. When
        ``per_tensor`` (float64, one slot per grad, on the device) is given, every grad's own norm
        is written there too (for p = 0: its count of non-zero elements)."""

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
        """Total norm (in ``out_dtype``), clip coefficient (float64; None when ``max_norm`` is
        None) and raw accumulator, all 0-d on the device (``scale``: see the module docstring)."""
        acc = self.accumulate(work, norm, per_tensor, scale=scale)
        return finish(acc, norm, max_norm, out_dtype, grad_scale, scale)

    @abc.abstractmethod
    def scale_(self, work: DeviceWork, coef: Tensor) -> None:
        """Multiply every grad by ``coef`` (a 0-d tensor on the device); skip when coef == 1.

        The kernel backends round each product once: in float (torch's result) when ``coef`` is a
        normal float32, else the exact ``x * coef`` rounded once to the grad's dtype."""

    @abc.abstractmethod
    def clamp_(self, work: DeviceWork, clip_value: float) -> None:
        """Clamp every grad to ``[-clip_value, clip_value]`` (NaN stays NaN)."""

    def __repr__(self) -> str:
        return f"<fusedclip backend {self.name!r}>"


def is_general_p(norm: NormSpec) -> bool:
    """True for the norm orders computed relative to a norm scale (all but 0, 1, 2 and +-inf)."""
    return norm.kind is NormKind.SUM_POW and norm.p not in (1.0, 2.0)


def scale_norm(norm: NormSpec) -> NormSpec:
    """The norm whose accumulator is the norm scale of general-p ``norm``: inf (max |x|) for p > 0,
    -inf (min |x|) for p < 0."""
    return NormSpec(math.inf, NormKind.MAX) if norm.p > 0 else NormSpec(-math.inf, NormKind.MIN)


def usable_norm_scale(scale: Tensor) -> Tensor:
    """``M'``: the norm scale when ``0 < M < inf``, else 1 (zero, inf, NaN: computed unscaled)."""
    return torch.where((scale > 0) & (scale < math.inf), scale, torch.ones_like(scale))


def total_from_accumulator(acc: Tensor, norm: NormSpec, scale: Tensor | None = None) -> Tensor:
    """The norm from its accumulator, in the accumulator's dtype (``scale``: the norm scale the
    accumulator of a general p is relative to, see the module docstring)."""
    if norm.kind is not NormKind.SUM_POW or norm.p == 1.0:
        return acc
    if norm.p == 2.0:
        return acc.sqrt()
    if scale is None:
        return acc.pow(1.0 / norm.p)
    return scaled_root(acc, norm.p, usable_norm_scale(scale.to(acc)))


def scaled_root(acc: Tensor, p: float, scale: Tensor) -> Tensor:
    """``scale * acc ** (1/p)`` for a general-p accumulator taken relative to ``scale`` (finite, > 0).

    For tiny ``|p|`` the root alone can leave float64's range (``3 ** 1000``) while the norm does
    not: there it is taken through logarithms (a relative error of ``|ln(norm)|`` ulps, where the
    direct product would be inf or 0).
    """
    root = acc.pow(1.0 / p)
    lost = ((root == 0) | torch.isinf(root)) & torch.isfinite(acc) & (acc > 0)
    via_logs = torch.exp(torch.log(acc) / p + torch.log(scale))
    return torch.where(lost, via_logs, scale * root)


def per_tensor_norms_exact(grads: list[Tensor], norm: NormSpec) -> Tensor:
    """Every grad's own general-p norm, float64, one slot per grad, on the grads' device.

    Each tensor is taken relative to its own max ``|x|`` (min for p < 0), in float64, so no norm
    underflows or overflows unless its value does. A slower path than the fused pass (a float64 copy
    of each grad and a few torch ops per tensor): it serves per-tensor norms of general p only.
    """
    values = []
    for grad in grads:
        if grad.numel() == 0:
            values.append(torch.zeros((), dtype=ACC_DTYPE, device=grad.device))
            continue
        magnitude = grad.detach().abs().to(ACC_DTYPE)
        scale = usable_norm_scale(magnitude.amax() if norm.p > 0 else magnitude.amin())
        values.append(scaled_root((magnitude / scale).pow(norm.p).sum(), norm.p, scale))
    return torch.stack(values)


def round_odd_to_float(d: Tensor) -> Tensor:
    """float64 ``d`` rounded to odd at float32 precision (``round_odd_to_float`` in ``csrc/fusedclip.h``):
    rounding that once more to bfloat16 or float16 is rounding ``d`` once."""
    f = d.to(torch.float32)
    back = f.to(torch.float64)
    step = (back.abs() > d.abs()).to(torch.int32)  # f was rounded away from zero: step back
    odd = ((f.view(torch.int32) - step) | 1).view(torch.float32)
    return torch.where((back == d) | torch.isnan(d), f, odd)


def round_once(value: Tensor, dtype: torch.dtype) -> Tensor:
    """float64 ``value`` rounded once to ``dtype``. torch converts float64 to bf16/fp16 through
    float32, rounding twice (``1 + 2^-8 + 2^-30`` became bf16 1.0, not 1.0078125), so those take
    an odd float32 first (``round_odd_to_float``), as the kernels do."""
    if value.dtype == torch.float64 and dtype in (torch.bfloat16, torch.float16):
        return round_odd_to_float(value).to(dtype)
    return value.to(dtype)


def clip_coefficient(total: Tensor, max_norm: float | Tensor) -> Tensor:
    """``min(max_norm / (total + 1e-6), 1)`` without a branch (NaN propagates as in torch)."""
    if isinstance(max_norm, Tensor):
        max_norm = max_norm.to(device=total.device, dtype=total.dtype)
    return torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)


def finish(
    acc: Tensor,
    norm: NormSpec,
    max_norm: float | Tensor | None,
    out_dtype: torch.dtype,
    grad_scale: Tensor | None = None,
    scale: Tensor | None = None,
) -> NormResult:
    """Total norm rounded once to ``out_dtype`` and the coefficient from the unrounded total.

    With ``grad_scale`` ``s`` the grads count as ``s * grad``: the total is scaled by ``s`` (counts
    are not) and the coefficient returned is ``s * min(max_norm / (total + 1e-6), 1)``. ``scale`` is
    the norm scale a general-p accumulator is relative to (see the module docstring).
    """
    total = total_from_accumulator(acc, norm, scale if is_general_p(norm) else None)
    return finish_total(total, acc, norm, max_norm, out_dtype, grad_scale, scale)


def finish_total(
    total: Tensor,
    acc: Tensor,
    norm: NormSpec,
    max_norm: float | Tensor | None,
    out_dtype: torch.dtype,
    grad_scale: Tensor | None = None,
    scale: Tensor | None = None,
) -> NormResult:
    """:func:`finish` for a backend that forms the total itself (``scale`` is only recorded in the
    result: ``total`` must already include it)."""
    factor = None if grad_scale is None else grad_scale.to(device=total.device, dtype=total.dtype)
    if factor is not None and norm.kind is not NormKind.COUNT:
        total = total * factor.abs()
    coef = None
    if max_norm is not None:
        coef = clip_coefficient(total, max_norm)
        if factor is not None:
            coef = coef * factor
    return NormResult(round_once(total, out_dtype), coef, acc, scale if is_general_p(norm) else None)


def combine_accumulators(accs: list[Tensor], norm: NormSpec) -> Tensor:
    """Combine per-device accumulators (all on one device) into one."""
    stacked = torch.stack(accs)
    if norm.kind is NormKind.MAX:
        return stacked.amax()
    if norm.kind is NormKind.MIN:
        return stacked.amin()
    return stacked.sum()
