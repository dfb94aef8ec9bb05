"""Composition of the primitives: plan lookup, backend choice per device, multi-device combining.

The public functions in :mod:`fusedclip.clip` validate arguments and call into here; later layers
(AMP, distributed, adaptive clipping) use the same entry points.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .backends import Backend, DeviceWork, requested_backend, resolve_backend
from .backends.base import (
    ACC_DTYPE,
    NormResult,
    combine_accumulators,
    finish,
    is_general_p,
    per_tensor_norms_exact,
    scale_norm,
)
from .norm_type import NormSpec
from .plan import PLANS, Plan, check_writable


@dataclass
class PreparedCall:
    """The grads of one call, planned, with a backend chosen for each device."""

    plan: Plan
    works: list[tuple[Backend, DeviceWork]]

    @property
    def result_dtype(self) -> torch.dtype:
        return self.plan.result_dtype

    @property
    def first_device(self) -> torch.device:
        return self.plan.first_device

    @property
    def backend_names(self) -> list[str]:
        return [backend.name for backend, _ in self.works]


def prepare(grads: list[Tensor], backend: str | None = None, foreach: bool | None = None) -> PreparedCall:
    """Plan ``grads`` (non-empty) and pick a backend for each device they live on."""
    requested = requested_backend(backend)
    plan = PLANS.plan_for(grads)
    works = [
        (resolve_backend(requested, device_plan), DeviceWork(device_plan, device_plan.grads(grads), foreach))
        for device_plan in plan.devices
    ]
    return PreparedCall(plan, works)


def _check_norm_is_defined(call: PreparedCall, norm: NormSpec) -> None:
    if not norm.needs_nonempty_tensors:
        return
    for _, work in call.works:
        empty = work.plan.first_empty()
        if empty is not None:
            raise RuntimeError(
                f"the {norm} norm cannot be computed on an empty tensor because the operation does not"
                f" have an identity (gradient {empty} has no elements); torch raises here too"
            )


#: ``norm_pass(scale=AUTO)``: compute the norm scale of a general p (the default)
AUTO = "auto"


def reducer_for(reduce: Callable[[Tensor], Tensor] | None, norm: NormSpec) -> Callable[[Tensor], Tensor] | None:
    """The same cross-process reduction for another norm's accumulator (``reduce.for_norm``), or
    None when ``reduce`` cannot provide one."""
    for_norm = getattr(reduce, "for_norm", None)
    return None if for_norm is None else for_norm(norm)


def norm_scale(call: PreparedCall, norm: NormSpec, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor | None:
    """The norm scale ``M`` of general-p ``norm`` over the call's grads (0-d float64, first device):
    max ``|x|`` (min for p < 0) over every device and, with ``reduce``, every process; one extra
    pass, no host synchronisation. None when ``reduce`` cannot reduce a max/min (the general-p pass
    then runs unscaled, as before)."""
    spec = scale_norm(norm)
    reduce_scale = None
    if reduce is not None:
        reduce_scale = reducer_for(reduce, spec)
        if reduce_scale is None:
            return None
    first = call.first_device
    scales = [backend.accumulate(work, spec).to(first) for backend, work in call.works]
    scale = scales[0] if len(scales) == 1 else combine_accumulators(scales, spec)
    return scale if reduce_scale is None else reduce_scale(scale)


def _per_tensor_exact(call: PreparedCall, norm: NormSpec, per_tensor: Tensor) -> None:
    """General-p per-tensor norms by the slower exact path (see ``per_tensor_norms_exact``)."""
    for _, work in call.works:
        values = per_tensor_norms_exact(work.grads, norm).to(per_tensor.device)
        if work.plan.whole_call:
            per_tensor.copy_(values)
        else:
            positions = torch.tensor(work.plan.positions, dtype=torch.int64, device=per_tensor.device)
            per_tensor.index_copy_(0, positions, values)


def norm_pass(
    call: PreparedCall,
    norm: NormSpec,
    max_norm: float | Tensor | None,
    *,
    per_tensor: Tensor | None = None,
    grad_scale: Tensor | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    scale: Tensor | None | str = AUTO,
) -> NormResult:
    """One norm pass over the call's grads, without a host synchronisation.

    Returns the total norm (0-d, ``call.result_dtype``, first device), the float64 clip coefficient
    (if ``max_norm`` is given) and the raw float64 accumulator. ``per_tensor`` (float64, one slot
    per grad, on the first device) receives each grad's norm; ``grad_scale`` is the factor the
    stored grads are read with (see :mod:`fusedclip.backends.base`); ``reduce`` combines the
    accumulator across processes (see :mod:`fusedclip.distributed`) before the total is formed.

    General p (not 0, 1, 2, +-inf) runs two passes: :func:`norm_scale` first (``scale=AUTO``; or
    the caller's ``M``, which must be the same for every accumulator that is later combined),
    then the sum of ``(|x| / M')^p``, which cannot overflow or underflow. Its per-tensor norms come
    from ``per_tensor_norms_exact`` (a scaled per-tensor sum can underflow).
    """
    _check_norm_is_defined(call, norm)
    if scale is AUTO:
        scale = norm_scale(call, norm, reduce) if is_general_p(norm) else None
    elif not is_general_p(norm):
        scale = None
    exact_per_tensor = None
    if scale is not None and per_tensor is not None:
        exact_per_tensor, per_tensor = per_tensor, None
    if len(call.works) == 1 and reduce is None:
        backend, work = call.works[0]
        local_scale = None if scale is None else scale.to(work.device)
        result = backend.norm(
            work, norm, max_norm, call.result_dtype, per_tensor=per_tensor, grad_scale=grad_scale, scale=local_scale
        )
        if exact_per_tensor is not None:
            _per_tensor_exact(call, norm, exact_per_tensor)
        return result
    first = call.first_device
    accs = []
    for backend, work in call.works:
        local = per_tensor
        if per_tensor is not None and not work.plan.whole_call:
            local = torch.empty(work.plan.num_tensors, dtype=ACC_DTYPE, device=work.device)
        local_scale = None if scale is None else scale.to(work.device)
        accs.append(backend.accumulate(work, norm, local, scale=local_scale).to(first))
        if local is not None and local is not per_tensor:
            positions = torch.tensor(work.plan.positions, dtype=torch.int64, device=first)
            per_tensor.index_copy_(0, positions, local.to(first))
    acc = accs[0] if len(accs) == 1 else combine_accumulators(accs, norm)
    if reduce is not None:
        acc = reduce(acc)
    if exact_per_tensor is not None:
        _per_tensor_exact(call, norm, exact_per_tensor)
    return finish(acc, norm, max_norm, call.result_dtype, grad_scale, None if scale is None else scale.to(first))


def norm_and_coef(
    call: PreparedCall, norm: NormSpec, max_norm: float | Tensor | None, **extras: object
) -> tuple[Tensor, Tensor | None]:
    """(total norm, clip coefficient) of :func:`norm_pass`."""
    result = norm_pass(call, norm, max_norm, **extras)  # type: ignore[arg-type]
    return result.total, result.coef


def scale_(call: PreparedCall, coef: Tensor) -> None:
    """Multiply every grad of the call by ``coef`` (a 0-d tensor on any device)."""
    check_writable(work for _, work in call.works)  # refuse before writing any grad
    for backend, work in call.works:
        backend.scale_(work, coef if coef.device == work.device else coef.to(work.device))


def clamp_(call: PreparedCall, clip_value: float) -> None:
    check_writable(work for _, work in call.works)  # refuse before writing any grad
    for backend, work in call.works:
        backend.clamp_(work, clip_value)


def raise_if_nonfinite(total: Tensor, norm: NormSpec) -> None:
    """torch's ``error_if_nonfinite`` check (the one place that synchronises with the device)."""
    if hasattr(total, "to_local"):  # a DTensor total holds the global value locally
        total = total.to_local()
    if not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {float(norm.p)} for gradients from `parameters` is non-finite, so it"
            " cannot be clipped. To disable this error and scale the gradients by the non-finite norm"
            " anyway, set `error_if_nonfinite=False`"
        )
