"""Clipping folded into a fused optimizer step: one read of the grads instead of three.

torch's fused optimizers (``Adam``, ``AdamW``, ``SGD``, ``Adagrad`` with ``fused=True``) divide every
grad by a device-side ``grad_scale`` inside their own kernel (that is how ``GradScaler`` unscales
them for free). :func:`clip_and_step_` runs only fusedclip's norm pass, sets ``grad_scale`` to
``1 / clip_coefficient`` (times the AMP scale when a scaler is given) and steps: the optimizer
applies the coefficient while it reads the grads anyway (and writes the clipped grads back, so
``.grad`` afterwards holds what clip-then-step would leave there). Grad traffic per step: one read
for the norm plus the optimizer's own pass, instead of a norm read plus a read-and-write clip pass
plus the optimizer's pass.

``grad_scale`` is a float32 tensor (the fused kernels read it as such), so it can carry the
coefficient only while ``1 / coefficient`` is a normal float32 number: a norm beyond float32's
range, a tiny ``max_norm``, a zero or NaN coefficient would otherwise turn into an infinite or
rounded-away ``grad_scale`` and a wrong (e.g. zero) update. Which case applies is decided on the
device, without a host synchronisation: the scale pass always runs, with ``torch.where`` choosing
the factor 1 (the kernels return at once for it; nothing is written) when ``grad_scale`` can carry
the coefficient and the coefficient itself otherwise, in which case ``grad_scale`` is 1. float64
grads always take the scale pass (known on the host): a float32 ``grad_scale`` would round their
coefficient to 24 bits.

The optimizer applies the coefficient to each grad as it reads it, and torch's fused CPU kernels
read and write a grad as one flat run of memory starting at its data address, paired element by
element with its parameter. So the coefficient is folded in only when every grad is dense (no gaps:
``buf[::2]`` is not), laid out in memory as its parameter is, and shares no memory with another
grad (:func:`grads_foldable`). Otherwise the grads are scaled first, exactly as
``clip_grad_norm_`` scales them (a grad listed twice, or views sharing elements, are scaled once
per grad, one after another), and the optimizer steps with no ``grad_scale``: the same update as
clip-then-step, and no write outside the grads, at the cost of one more read and write of the
grads. Under ``torch.compile`` the layouts are judged while tracing and the shared memory when the
step runs.

Limits: only torch optimizers constructed with ``fused=True``; the coefficient is applied as a
division by ``1 / coefficient`` inside the optimizer, which may round differently from a
multiplication in the last bit; a custom optimizer that does not honour ``grad_scale`` is refused.

:func:`step_unless_flagged` (what :meth:`fusedclip.Clipper.step` calls) skips a step on a device
flag the same way ``GradScaler`` does: a fused optimizer's ``found_inf``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from . import amp, engine, ops
from . import plan as plans
from .backends import requested_backend
from .inputs import check_max_norm, grads_of, no_grads_result
from .norm_type import parse_norm_type
from .plan import real_dtype

#: the smallest normal float32: ``grad_scale`` carries a coefficient c only when c and 1 / c are
#: both normal float32 numbers (then the division inside the optimizer is as exact as a multiplication)
_F32_TINY = torch.finfo(torch.float32).tiny


def _check_fused(optimizer: torch.optim.Optimizer) -> None:
    if not (optimizer.defaults.get("fused") and getattr(optimizer, "_step_supports_amp_scaling", False)):
        raise ValueError(
            f"clip_and_step_ needs a torch optimizer constructed with fused=True (Adam, AdamW, SGD,"
            f" Adagrad), whose fused step accepts a grad_scale; got {type(optimizer).__name__}"
            f" with fused={optimizer.defaults.get('fused')!r}. Use clip_grad_norm_ then step() instead."
        )


def _laid_out_like(grad: Tensor, param: Tensor) -> bool:
    """True when ``grad`` is dense and its elements sit in memory in the order of ``param``'s, so a
    kernel that walks both as flat runs from their data addresses pairs each grad element with its
    own parameter element and touches no memory outside the grad."""
    if grad.is_contiguous() and param.is_contiguous():
        return True
    if grad.shape != param.shape or not plans.is_dense(grad):
        return False
    return all(g == p for size, g, p in zip(grad.shape, grad.stride(), param.stride()) if size > 1)


def _grads_share_memory(call: engine.PreparedCall) -> bool:
    """True when the memory extents of two grads of the call overlap (a grad listed twice, views
    sharing elements, interleaved strided views)."""
    device_plans = [work.plan for _, work in call.works]
    if any(device_plan.aliased for device_plan in device_plans):
        return True
    by_device: dict[torch.device, list[plans.DevicePlan]] = {}
    for device_plan in device_plans:
        by_device.setdefault(device_plan.device, []).append(device_plan)
    for same_device in by_device.values():
        if len(same_device) < 2:
            continue
        # grads of different parts of the call (DTensor shards, plain grads) on one device
        if not all(device_plan.has_storage for device_plan in same_device):
            return True  # addresses unknown: cannot rule it out
        starts, sizes = plans._byte_spans(
            tuple(a for device_plan in same_device for a in device_plan.addresses),
            tuple(s for device_plan in same_device for s in device_plan.spans),
        )
        if plans._spans_overlap(starts, sizes):
            return True
    return False


def grads_foldable(call: ops.Call, params: list[Tensor]) -> bool:
    """True when the fused optimizer may apply the clip coefficient itself (see the module
    docstring): every grad of ``params`` (the parameters that have one) is dense and laid out like
    its parameter, and no two grads share memory. Otherwise the grads must be scaled before the step.

    While ``torch.compile`` traces only the layouts are judged here (they are fixed by the trace);
    whether grads share memory is decided when the step runs (:func:`fold_op`).
    """
    if not all(_laid_out_like(param.grad, param) for param in params):
        return False
    if isinstance(call, engine.PreparedCall):
        return not _grads_share_memory(call)
    return True


def _carried(coef: Tensor, scale: Any) -> Tensor:
    """The grad_scale for ``coef`` (float32 ``1 / coef`` when both are normal float32 numbers, else
    1); ``scale`` applies the coefficient to the grads in the other case (factor 1 otherwise)."""
    coef = coef.to(torch.float64)
    carried = (coef >= _F32_TINY) & (coef <= 1.0 / _F32_TINY)  # False for NaN
    one = torch.ones_like(coef)
    scale(torch.where(carried, one, coef))
    return torch.where(carried, coef.reciprocal(), one).to(torch.float32)


@torch.library.custom_op("fusedclip::fold_coefficient", mutates_args={"grads"})
def fold_op(grads: list[Tensor], coef: Tensor, backend: Optional[str]) -> Tensor:
    """:func:`fold_coefficient` under ``torch.compile`` for grads already judged dense and laid out
    like their parameters: grads that share memory (known only now, from their addresses) are scaled
    by ``coef`` and the returned ``grad_scale`` is 1."""
    call = engine.prepare(grads, backend, for_norm=False)
    if _grads_share_memory(call):
        engine.scale_(call, coef)
        return torch.ones((), dtype=torch.float32, device=coef.device)
    return _carried(coef, lambda factor: engine.scale_(call, factor))


@fold_op.register_fake
def _(grads, coef, backend):
    return coef.new_empty((), dtype=torch.float32)


def fold_coefficient(coef: Tensor, call: ops.Call, dtypes: Iterable[torch.dtype], foldable: bool = True) -> Tensor | None:
    """Apply ``coef`` (the factor for the stored grads) so that the optimizer's step sees clipped
    grads; returns the ``grad_scale`` to hand to the optimizer (None: nothing to divide by).

    ``foldable`` (:func:`grads_foldable`): False makes the grads be scaled here, as
    ``clip_grad_norm_`` scales them, with no ``grad_scale``. Otherwise, when ``1 / coef`` is a
    normal float32 number the grads are left alone and the optimizer divides by it; else (norm
    beyond float32's range, tiny ``max_norm``, coefficient 0 or NaN) the grads are multiplied by
    ``coef`` in a scale pass and ``grad_scale`` is 1. Chosen on the device: the scale pass runs with
    factor 1 (a no-op) in the first case. float64 grads (or complex128) always take the scale pass,
    decided on the host.
    """
    if not foldable or any(real_dtype(dtype) == torch.float64 for dtype in dtypes):
        ops.scale_(call, coef)
        return None
    if isinstance(call, ops.TracedCall):
        return fold_op(call.grads, coef, call.backend)
    return _carried(coef, lambda factor: ops.scale_(call, factor))


def _params_with_grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def _set_grad_scale(optimizer: torch.optim.Optimizer, grad_scale: Tensor | None) -> None:
    if grad_scale is not None:
        optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]


def _clear_grad_scale(optimizer: torch.optim.Optimizer) -> None:
    if hasattr(optimizer, "grad_scale"):
        del optimizer.grad_scale  # type: ignore[attr-defined]


@torch.no_grad()
def clip_and_step_(
    optimizer: torch.optim.Optimizer,
    max_norm: float | Tensor,
    norm_type: float | str = 2.0,
    *,
    scaler: Any = None,
    backend: str | None = None,
    group: Any = None,
    tracker: Any = None,
) -> Tensor:
    """Clip inside the optimizer's fused step: the same update as clip-then-step, one read of grads.

    Without ``scaler`` this replaces ``clip_grad_norm_(params, max_norm); optimizer.step()``.
    With an enabled ``torch.amp.GradScaler`` it replaces ``scaler.unscale_(optimizer);
    clip_grad_norm_(...); scaler.step(optimizer)`` — call ``scaler.update()`` afterwards as usual;
    a step with inf/NaN grads is skipped by the optimizer's kernel.

    Returns:
        The total norm of the (unscaled) grads.

    With ``tracker`` (a :class:`fusedclip.NormTracker` over the optimizer's parameters) the norm
    comes from the tracker's hooks, not from a pass over the grads, and any optimizer is accepted
    (one scale pass when it is not fused); see :mod:`fusedclip.tracker`.
    """
    if tracker is not None:
        from .tracker import tracked_step

        return tracked_step(optimizer, max_norm, norm_type, tracker, scaler)
    _check_fused(optimizer)
    norm = parse_norm_type(norm_type)
    max_norm = check_max_norm(max_norm)
    backend = requested_backend(backend)
    if scaler is not None and amp.scaler_enabled(scaler):
        scaled = amp.scaled_norm(scaler, optimizer, max_norm, norm, backend, group)
        state = scaled.state
        if scaled.call is not None:
            foldable = grads_foldable(scaled.call, _params_with_grads(optimizer))
            _set_grad_scale(optimizer, fold_coefficient(scaled.coef, scaled.call, scaled.dtypes, foldable))  # type: ignore[arg-type]
            state["found_inf_per_device"] = {scaled.found_inf.device: scaled.found_inf}
        else:
            state["found_inf_per_device"] = {}
        state["stage"] = OptState.UNSCALED  # the scaler passes our grad_scale and found_inf through
        try:
            scaler.step(optimizer)
        finally:
            _clear_grad_scale(optimizer)
        return scaled.total

    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = grads_of(params)
    if not grads:
        optimizer.step()
        return no_grads_result()
    call = ops.prepare(grads, backend, group)
    result, _ = ops.total_norm(call, norm, max_norm)
    foldable = grads_foldable(call, [p for p in params if p.grad is not None])
    _set_grad_scale(optimizer, fold_coefficient(result.coef, call, {g.dtype for g in grads}, foldable))  # type: ignore[arg-type]
    try:
        optimizer.step()
    finally:
        _clear_grad_scale(optimizer)
    return result.total


def _init_sgd_momentum_(optimizer: torch.optim.Optimizer) -> None:
    """Give fused SGD's missing momentum buffers the value 0 before a step that may be skipped.

    Without a buffer fused SGD takes its first step (``buf = grad``) in buffers it allocates
    uninitialised; when that step is skipped on ``found_inf`` they stay garbage and later steps use
    them. With dampening 0, ``momentum * 0 + grad`` is ``grad`` exactly, so a zero buffer gives the
    same first step; with dampening it would not (``(1 - dampening) * grad``), which is refused.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        missing = [p for p in group["params"] if p.grad is not None and optimizer.state[p].get("momentum_buffer") is None]
        if not missing:
            continue
        if group["dampening"] != 0:
            raise ValueError(
                "fused SGD with momentum and dampening cannot skip its first step on the device (its first"
                " momentum buffer would be left uninitialised); take the first step with sync=True"
            )
        for p in missing:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@torch.no_grad()
def step_unless_flagged(optimizer: torch.optim.Optimizer, found_inf: Tensor, *, sync: bool = False) -> Any:
    """``optimizer.step()`` unless ``found_inf`` (a 0-d float32 tensor) is 1.0.

    A torch optimizer built with ``fused=True`` gets ``found_inf`` as the attribute ``GradScaler``
    sets: its kernel leaves parameters and state unchanged when it is 1 (Adam's step count is
    incremented and decremented again), without a host sync. Fused SGD with momentum gets zero
    momentum buffers before its first step (the same first step; see :func:`_init_sgd_momentum_`).

    Other optimizers have no device-side skip (zeroing the grads is not one: Adam's moments and step
    count still move), so they are refused unless ``sync=True``, which reads the flag on the host
    (one sync) and calls ``step()`` only when it is 0. ``sync=True`` with a fused optimizer still
    skips on the device.
    """
    if found_inf.dim() != 0 or found_inf.dtype != torch.float32:
        raise ValueError(f"found_inf must be a 0-d float32 tensor; got shape {tuple(found_inf.shape)}, {found_inf.dtype}")
    fused = bool(optimizer.defaults.get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)
    if not fused:
        if not sync:
            raise ValueError(
                f"{type(optimizer).__name__} (fused={optimizer.defaults.get('fused')!r}) cannot skip a step on a device"
                f" flag; build it with fused=True, or pass sync=True to read the flag on the host (one sync per step)"
            )
        return None if bool(found_inf) else optimizer.step()
    if hasattr(optimizer, "found_inf"):
        raise RuntimeError("the optimizer already has a found_inf (is a GradScaler stepping it?)")
    _init_sgd_momentum_(optimizer)
    optimizer.found_inf = found_inf  # type: ignore[attr-defined]
    try:
        return optimizer.step()
    finally:
        del optimizer.found_inf  # type: ignore[attr-defined]
