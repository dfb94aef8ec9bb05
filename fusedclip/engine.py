"""The engine: the two primitives (norm, scale) over a prepared call, for every caller.

Everything between the validated arguments of a public function and the backends happens here:

* :func:`prepare` plans the grads (:mod:`fusedclip.plan`), groups them by device, picks a backend
  per device and attaches the reducer that makes the norm global: over a process group
  (``group=``) and, for DTensor grads, over their meshes (:mod:`fusedclip.distributed`);
* :func:`total_norm` runs one norm pass: per device an accumulator (or, for one device and nothing to
  reduce, the backend's own fused finish), devices combined on the first device per part, then the
  parts' accumulators combined by the call's reducer (one collective) or locally, then total and
  coefficient finished on the device;
* :func:`scale_` and :func:`clamp_` write every grad, after checking that all can be written.

A reducer is any ``reduce(part_accs, norm, scales=, per_tensor=) -> Reduced`` that combines the
float64 accumulators of a call's parts (for a general p each relative to its own part's norm scale,
and optionally every part's per-tensor norms) into the global ones across processes; see
:class:`fusedclip.distributed.PartsReduction`.
Nothing here validates arguments (the public functions do, once) and nothing synchronises with
the host except :func:`raise_if_nonfinite`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .backends import Backend, DeviceWork, resolve_backend
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
from .plan import PLANS, Plan, all_plain, check_writable, result_dtype_of



class Reduced(NamedTuple):
    """What a call's reducer returns: the global accumulator (for a general p relative to the global
    norm scale ``scale``) and, when asked for, every grad's global norm in call order (float64)."""

    acc: Tensor
    scale: Tensor | None = None
    per_tensor: Tensor | None = None


#: ``reduce(part_accs, norm, *, scales=None, per_tensor=None) -> Reduced``: the float64 accumulators
#: of a call's parts (in order; for a general p each relative to its part's own local norm scale in
#: ``scales``) and optionally each part's per-tensor norms, combined across processes
PartsReducer = Callable[..., Reduced]
#: turns the local total of DTensor grads into the DTensor torch returns
Wrap = Callable[[Tensor, NormSpec], Tensor]


def is_dtensor(tensor: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (checked without importing that package)."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "placements")


@dataclass
class Part:
    """Grads whose accumulators are combined on this process first (the call's reducer says how
    each part enters the reduction): their plan and a backend per device."""

    plan: Plan
    works: list[tuple[Backend, DeviceWork]]


@dataclass
class PreparedCall:
    """The grads of one call, planned: one part for plain grads; for DTensor grads one per set of
    mesh ranks (and whether this rank is the representative replica), plus one for plain grads."""

    parts: list[Part]
    result_dtype: torch.dtype  # torch's promotion over the grads' real dtypes
    reducer: PartsReducer | None = None  # the parts' accumulators to the global one (None: combined locally)
    wrap: Wrap | None = None  # DTensor grads: the total as torch returns it

    @property
    def first_device(self) -> torch.device:
        return self.parts[0].plan.first_device

    @property
    def works(self) -> list[tuple[Backend, DeviceWork]]:
        return [entry for part in self.parts for entry in part.works]

    @property
    def num_grads(self) -> int:
        return sum(work.plan.num_tensors for _, work in self.works)

    @property
    def backend_names(self) -> list[str]:
        return [backend.name for backend, _ in self.works]

    @property
    def direct(self) -> bool:
        """One device and nothing to reduce or wrap: the backend finishes the norm itself."""
        return self.reducer is None and self.wrap is None and len(self.parts) == 1 and len(self.parts[0].works) == 1


def _part(grads: list[Tensor], backend: str | None, foreach: bool | None) -> Part:
    plan = PLANS.plan_for(grads)
    works = [
        (resolve_backend(backend, device_plan), DeviceWork(device_plan, device_plan.grads(grads), foreach))
        for device_plan in plan.devices
    ]
    return Part(plan, works)


def prepare(
    grads: list[Tensor],
    backend: str | None = None,
    foreach: bool | None = None,
    *,
    group: object = None,
    for_norm: bool = True,
) -> PreparedCall:
    """Plan non-empty ``grads`` and pick a backend for each device they live on.

    ``backend``: a name validated by :func:`fusedclip.backends.requested_backend`, or None for the
    automatic choice. ``group``: a process group the norm is reduced over. DTensor grads run on
    their local shards; with ``for_norm`` their mesh dimensions become reducers (and a Partial
    placement is refused), without it (scaling, clamping) the shards are only written.
    """
    if all_plain(grads) or not any(map(is_dtensor, grads)):
        part = _part(grads, backend, foreach)
        reducer = None
        if group is not None:
            from .distributed import group_reducer

            reducer = group_reducer(group)
        return PreparedCall([part], part.plan.result_dtype, reducer)
    from .distributed import dtensor_parts

    shards, reducer, wrap = dtensor_parts(grads, for_norm, group)
    parts = [_part(local, backend, foreach) for local in shards]
    return PreparedCall(parts, result_dtype_of(part.plan.result_dtype for part in parts), reducer, wrap)


# -- the norm ------------------------------------------------------------------------------------


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


def _part_accumulate(
    part: Part, norm: NormSpec, first: torch.device, per_tensor: Tensor | None = None, scale: Tensor | None = None
) -> Tensor:
    """One part's float64 accumulator of ``norm``, its devices combined on ``first``; ``per_tensor``
    (float64, one slot per grad of the part, on ``first``) receives every grad's norm."""
    device_accs = []
    for backend, work in part.works:
        local = per_tensor
        if per_tensor is not None and not work.plan.whole_call:
            local = torch.empty(work.plan.num_tensors, dtype=ACC_DTYPE, device=work.device)
        local_scale = None if scale is None else scale.to(work.device)
        device_accs.append(backend.accumulate(work, norm, local, scale=local_scale).to(first))
        if local is not None and local is not per_tensor:
            positions = torch.tensor(work.plan.positions, dtype=torch.int64, device=first)
            per_tensor.index_copy_(0, positions, local.to(first))  # type: ignore[union-attr]
    return device_accs[0] if len(device_accs) == 1 else combine_accumulators(device_accs, norm)


def _accumulate(
    call: PreparedCall, norm: NormSpec, per_tensor: Tensor | None = None, scale: Tensor | None = None
) -> Tensor:
    """The float64 accumulator of ``norm`` of a call without a reducer (one part) on its first
    device: every device's accumulator, combined. ``per_tensor`` receives every grad's norm."""
    first = call.first_device
    accs = [_part_accumulate(part, norm, first, per_tensor, scale) for part in call.parts]
    return accs[0] if len(accs) == 1 else combine_accumulators(accs, norm)


def _part_num_grads(part: Part) -> int:
    return sum(work.plan.num_tensors for _, work in part.works)


def _reduce(call: PreparedCall, norm: NormSpec, per_tensor: bool) -> Reduced:
    """The call's norm pass through its reducer: every part's local accumulator (for a general p
    relative to the part's own local norm scale, a local pass without communication) and, with
    ``per_tensor``, every part's per-tensor norms, handed to the reducer (one collective)."""
    first = call.first_device
    general = is_general_p(norm)
    scales = [_part_accumulate(part, scale_norm(norm), first) for part in call.parts] if general else None
    accs, norms = [], []
    for index, part in enumerate(call.parts):
        buffer = None
        if per_tensor and not general:
            buffer = torch.empty(_part_num_grads(part), dtype=ACC_DTYPE, device=first)
        accs.append(_part_accumulate(part, norm, first, buffer, None if scales is None else scales[index]))
        if per_tensor and general:
            buffer = torch.empty(_part_num_grads(part), dtype=ACC_DTYPE, device=first)
            _per_tensor_exact(part.works, norm, buffer)
        norms.append(buffer)
    return call.reducer(accs, norm, scales=scales, per_tensor=norms if per_tensor else None)  # type: ignore[misc]


def _per_tensor_exact(works: list[tuple[Backend, DeviceWork]], norm: NormSpec, per_tensor: Tensor) -> None:
    """General-p per-tensor norms by the slower exact path (see ``per_tensor_norms_exact``)."""
    for _, work in works:
        values = per_tensor_norms_exact(work.grads, norm).to(per_tensor.device)
        if work.plan.whole_call:
            per_tensor.copy_(values)
        else:
            positions = torch.tensor(work.plan.positions, dtype=torch.int64, device=per_tensor.device)
            per_tensor.index_copy_(0, positions, values)


def total_norm(
    call: PreparedCall,
    norm: NormSpec,
    max_norm: float | Tensor | None = None,
    *,
    per_tensor: Tensor | None = None,
    grad_scale: Tensor | None = None,
) -> NormResult:
    """One norm pass over the call's grads, without a host synchronisation.

    Returns the total norm (0-d, ``call.result_dtype``, first device; a DTensor for DTensor grads),
    the float64 clip coefficient (if ``max_norm`` is given), the raw float64 accumulator and, for a
    general p, the norm scale it is relative to. ``per_tensor`` (float64, one slot per grad, on the
    first device) receives each grad's norm; ``grad_scale`` is the factor the stored grads are read
    with (see :mod:`fusedclip.backends.base`).

    General p (not 0, 1, 2, +-inf) runs two passes: the norm scale ``M`` (max ``|x|``, min for
    p < 0) first, then the sum of ``(|x| / M')^p``, which cannot overflow or underflow; with a
    reducer both passes are local (each part relative to its own scale) and the reducer brings the
    parts to the global scale. Its per-tensor norms come from ``per_tensor_norms_exact`` (a scaled
    per-tensor sum can underflow).
    """
    _check_norm_is_defined(call, norm)
    if call.reducer is not None:
        reduced = _reduce(call, norm, per_tensor is not None)
        result = finish(reduced.acc, norm, max_norm, call.result_dtype, grad_scale, reduced.scale)
        if per_tensor is not None:
            per_tensor.copy_(reduced.per_tensor)  # type: ignore[arg-type]
        if call.wrap is not None:
            result = result._replace(total=call.wrap(result.total, norm))
        return result
    scale = _accumulate(call, scale_norm(norm)) if is_general_p(norm) else None
    exact_per_tensor = None
    if scale is not None and per_tensor is not None:
        exact_per_tensor, per_tensor = per_tensor, None
    if call.direct:
        backend, work = call.works[0]
        local_scale = None if scale is None else scale.to(work.device)
        result = backend.norm(
            work, norm, max_norm, call.result_dtype, per_tensor=per_tensor, grad_scale=grad_scale, scale=local_scale
        )
    else:
        acc = _accumulate(call, norm, per_tensor, scale)
        result = finish(acc, norm, max_norm, call.result_dtype, grad_scale, scale)
    if exact_per_tensor is not None:
        _per_tensor_exact(call.works, norm, exact_per_tensor)
    return result


def norm_and_coef(
    call: PreparedCall, norm_spec: NormSpec, max_norm: float | Tensor | None, **extras: object
) -> tuple[Tensor, Tensor | None]:
    """(total norm, clip coefficient) of :func:`total_norm`."""
    result = total_norm(call, norm_spec, max_norm, **extras)  # type: ignore[arg-type]
    return result.total, result.coef


# -- writing the grads ----------------------------------------------------------------------------


def scale_(call: PreparedCall, coef: Tensor) -> None:
    """Multiply every grad of the call by ``coef`` (a 0-d tensor on any device)."""
    works = call.works
    check_writable(work for _, work in works)  # refuse before writing any grad
    for backend, work in works:
        backend.scale_(work, coef if coef.device == work.device else coef.to(work.device))


def clamp_(call: PreparedCall, clip_value: float) -> None:
    """Clamp every grad of the call to ``[-clip_value, clip_value]``."""
    works = call.works
    check_writable(work for _, work in works)  # refuse before writing any grad
    for backend, work in works:
        backend.clamp_(work, clip_value)


def raise_if_nonfinite(total: Tensor, norm: NormSpec) -> None:
    """torch's ``error_if_nonfinite`` check (the one place that synchronises with the device)."""
    if is_dtensor(total):  # a DTensor total holds the global value locally
        total = total.to_local()  # type: ignore[attr-defined]
    if not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {float(norm.p)} for gradients from `parameters` is non-finite, so it"
            " cannot be clipped. To disable this error and scale the gradients by the non-finite norm"
            " anyway, set `error_if_nonfinite=False`"
        )
