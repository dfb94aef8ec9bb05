"""Clipping folded into a fused optimizer step: one read of the grads instead of three.

torch's fused optimizers (``Adam``, ``AdamW``, ``SGD``, ``Adagrad`` with ``fused=True``) divide every
grad by a device-side ``grad_scale`` inside their own kernel (that is how ``GradScaler`` unscales
them for free). :func:`clip_and_step_` runs only fusedclip's norm pass, sets ``grad_scale`` to
``1 / clip_coefficient`` (times the AMP scale when a scaler is given) and steps: the optimizer
applies the coefficient while it reads the grads anyway (and writes the clipped grads back, so
``.grad`` afterwards holds what clip-then-step would leave there). Grad traffic per step: one read
for the norm plus the optimizer's own pass, instead of a norm read plus a read-and-write clip pass
plus the optimizer's pass.

Limits: only torch optimizers constructed with ``fused=True``; the coefficient is applied as a
division by ``1 / coefficient`` inside the optimizer, which may round differently from a
multiplication in the last bit; a custom optimizer that does not honour ``grad_scale`` is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import amp, clip
from .inputs import check_max_norm, grads_of
from .norm_type import parse_norm_type


def _check_fused(optimizer: torch.optim.Optimizer) -> None:
    if not (optimizer.defaults.get("fused") and getattr(optimizer, "_step_supports_amp_scaling", False)):
        raise ValueError(
            f"clip_and_step_ needs a torch optimizer constructed with fused=True (Adam, AdamW, SGD,"
            f" Adagrad), whose fused step accepts a grad_scale; got {type(optimizer).__name__}"
            f" with fused={optimizer.defaults.get('fused')!r}. Use clip_grad_norm_ then step() instead."
        )


def _grad_scale_from(coef: Tensor) -> Tensor:
    """The optimizer divides by grad_scale: 1 / coef (coef 0 -> inf -> zero update, NaN stays NaN)."""
    return coef.reciprocal().to(torch.float32)


@torch.no_grad()
def clip_and_step_(
    optimizer: torch.optim.Optimizer,
    max_norm: float | Tensor,
    norm_type: float | str = 2.0,
    *,
    scaler: Any = None,
    backend: str | None = None,
    group: Any = None,
) -> Tensor:
    """Clip inside the optimizer's fused step: the same update as clip-then-step, one read of grads.

    Without ``scaler`` this replaces ``clip_grad_norm_(params, max_norm); optimizer.step()``.
    With an enabled ``torch.amp.GradScaler`` it replaces ``scaler.unscale_(optimizer);
    clip_grad_norm_(...); scaler.step(optimizer)`` — call ``scaler.update()`` afterwards as usual;
    a step with inf/NaN grads is skipped by the optimizer's kernel.

    Returns:
        The total norm of the (unscaled) grads.
    """
    _check_fused(optimizer)
    if scaler is not None and scaler.is_enabled():
        from torch.amp.grad_scaler import OptState

        total, coef, found_inf, _, state = amp.scaled_norm_pass(scaler, optimizer, max_norm, norm_type, backend, group)
        state["found_inf_per_device"] = {found_inf.device: found_inf} if coef is not None else {}
        state["stage"] = OptState.UNSCALED  # the scaler passes our grad_scale and found_inf through
        if coef is not None:
            optimizer.grad_scale = _grad_scale_from(coef)  # type: ignore[attr-defined]
        try:
            scaler.step(optimizer)
        finally:
            if hasattr(optimizer, "grad_scale"):
                del optimizer.grad_scale  # type: ignore[attr-defined]
        return total

    norm = parse_norm_type(norm_type)
    max_norm = check_max_norm(max_norm)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = grads_of(params)
    if not grads:
        optimizer.step()
        return torch.tensor(0.0)
    result, _ = clip.norm_pass(grads, norm, max_norm, backend=backend, group=group)
    optimizer.grad_scale = _grad_scale_from(result.coef)  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale  # type: ignore[attr-defined]
    return result.total
