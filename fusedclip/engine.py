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
from .backends.base import ACC_DTYPE, NormResult, combine_accumulators, finish
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


def norm_pass(
    call: PreparedCall,
    norm: NormSpec,
    max_norm: float | Tensor | None,
    *,
    per_tensor: Tensor | None = None,
    grad_scale: Tensor | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> NormResult:
    """One norm pass over the call's grads, without a host synchronisation.

    Returns the total norm (0-d, ``call.result_dtype``, first device), the float64 clip coefficient
    (if ``max_norm`` is given) and the raw float64 accumulator. ``per_tensor`` (float64, one slot
    per grad, on the first device) receives each grad's norm; ``grad_scale`` is the factor the
    stored grads are read with (see :mod:`fusedclip.backends.base`); ``reduce`` combines the
    accumulator across processes (see :mod:`fusedclip.distributed`) before the total is formed.
    """
    _check_norm_is_defined(call, norm)
    if len(call.works) == 1 and reduce is None:
        backend, work = call.works[0]
        return backend.norm(work, norm, max_norm, call.result_dtype, per_tensor=per_tensor, grad_scale=grad_scale)
    first = call.first_device
    accs = []
    for backend, work in call.works:
        local = per_tensor
        if per_tensor is not None and not work.plan.whole_call:
            local = torch.empty(work.plan.num_tensors, dtype=ACC_DTYPE, device=work.device)
        accs.append(backend.accumulate(work, norm, local).to(first))
        if local is not None and local is not per_tensor:
            positions = torch.tensor(work.plan.positions, dtype=torch.int64, device=first)
            per_tensor.index_copy_(0, positions, local.to(first))
    acc = accs[0] if len(accs) == 1 else combine_accumulators(accs, norm)
    if reduce is not None:
        acc = reduce(acc)
    return finish(acc, norm, max_norm, call.result_dtype, grad_scale)


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
