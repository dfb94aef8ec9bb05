"""Mixed precision: unscale and clip in one norm pass and one scale pass.

torch's recipe reads the grads three times and writes them twice::

    scaler.unscale_(optimizer)                          # read + write: grads /= scale, inf check
    torch.nn.utils.clip_grad_norm_(params, max_norm)    # read: norm; read + write: clip

:func:`unscale_and_clip_` computes the norm of the still-scaled grads (which also detects inf/NaN),
turns it into the unscaled norm on the device, and writes every grad once with
``inverse_scale * clip_coefficient``. The scaler's per-optimizer state is then exactly what
``unscale_`` leaves behind, so ``scaler.step(optimizer)`` and ``scaler.update()`` skip the step and
back off on inf/NaN as usual.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import clip
from .inputs import check_max_norm, grads_of
from .norm_type import NormKind, NormSpec, parse_norm_type


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _nonfinite_from_accumulator(norm: NormSpec) -> bool:
    """True when a non-finite accumulator means exactly "some grad element is inf or NaN".

    Sums of |x|^p in float64 cannot overflow for finite float32/bf16/fp16 values while p <= 4, and
    max |x| propagates inf and NaN; counts (p = 0) and minima (p = -inf, p < 0) would hide them.
    """
    if norm.kind is NormKind.MAX:
        return True
    return norm.kind is NormKind.SUM_POW and 0 < norm.p <= 4


def _scaler_state(scaler: Any, optimizer: torch.optim.Optimizer) -> tuple[dict, Tensor]:
    """Check the scaler's stage as ``unscale_`` does; return the optimizer's state and the scale."""
    from torch.amp.grad_scaler import OptState

    scale, _ = scaler._check_scale_growth_tracker("unscale_")
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.UNSCALED:
        raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")
    return state, scale


def scaled_norm_pass(
    scaler: Any,
    optimizer: torch.optim.Optimizer,
    max_norm: Any,
    norm_type: float | str,
    backend: str | None,
    group: Any,
) -> tuple[Tensor, Tensor | None, Tensor, list, dict]:
    """The shared first half: (unscaled total norm, coefficient for the stored grads, found_inf,
    prepared calls, optimizer state). Marks nothing; raises like ``unscale_`` on misuse."""
    norm = parse_norm_type(norm_type)
    max_norm = check_max_norm(max_norm)
    state, scale = _scaler_state(scaler, optimizer)
    grads = grads_of(_optimizer_params(optimizer))
    if any(g.dtype == torch.float16 for g in grads):
        raise ValueError("Attempting to unscale FP16 gradients.")  # torch's message and rule
    inv_scale = scale.double().reciprocal().float()  # as torch: the reciprocal in float64
    if not grads:
        return torch.tensor(0.0), None, torch.zeros((), device=scale.device), [], state
    result, calls = clip.norm_pass(grads, norm, max_norm, backend=backend, group=group, grad_scale=inv_scale)
    if _nonfinite_from_accumulator(norm):
        acc = result.acc
    else:  # one extra read: the max |x| reveals inf/NaN whatever the norm type
        acc = clip.norm_pass(grads, parse_norm_type("inf"), None, backend=backend, group=group)[0].acc
    found_inf = (~torch.isfinite(acc)).to(device=scale.device, dtype=torch.float32)
    return result.total, result.coef, found_inf, calls, state


@torch.no_grad()
def unscale_and_clip_(
    scaler: Any,
    optimizer: torch.optim.Optimizer,
    max_norm: float | Tensor,
    norm_type: float | str = 2.0,
    *,
    backend: str | None = None,
    group: Any = None,
) -> Tensor:
    """Replace ``scaler.unscale_(optimizer)`` + ``clip_grad_norm_(params, max_norm, norm_type)``.

    One norm pass over the scaled grads (which doubles as the inf/NaN check) and one scale pass
    applying ``inverse_scale * clip_coefficient``. Afterwards call ``scaler.step(optimizer)`` and
    ``scaler.update()`` as usual: a step with inf/NaN grads is skipped and the scale backs off.

    Args:
        scaler: a ``torch.amp.GradScaler`` (a disabled scaler just clips).
        optimizer: the optimizer whose parameters' grads are unscaled and clipped.
        max_norm, norm_type: as in :func:`fusedclip.clip_grad_norm_`.
        backend, group: as in :func:`fusedclip.clip_grad_norm_`.

    Returns:
        The total norm of the unscaled grads (inf/NaN when the step will be skipped).
    """
    from torch.amp.grad_scaler import OptState

    if not scaler.is_enabled():
        return clip.clip_grad_norm_(_optimizer_params(optimizer), max_norm, norm_type, backend=backend, group=group)
    total, coef, found_inf, calls, state = scaled_norm_pass(scaler, optimizer, max_norm, norm_type, backend, group)
    if coef is not None:
        clip.scale_calls_(calls, coef)
        state["found_inf_per_device"] = {found_inf.device: found_inf}
    else:
        state["found_inf_per_device"] = {}  # no grads: scaler.step raises as it does after unscale_
    state["stage"] = OptState.UNSCALED
    return total
