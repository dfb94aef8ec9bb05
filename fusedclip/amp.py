"""Mixed precision: unscale and clip in one norm pass and one scale pass.

torch's recipe reads the grads three times and writes them twice::

    scaler.unscale_(optimizer)                          # read + write: grads /= scale, inf check
    torch.nn.utils.clip_grad_norm_(params, max_norm)    # read: norm; read + write: clip

:func:`unscale_and_clip_` computes the norm of the still-scaled grads (which also detects inf/NaN),
turns it into the unscaled norm on the device, and writes every grad once with
``inverse_scale * clip_coefficient``. The scaler's per-optimizer state is then exactly what
``unscale_`` leaves behind, so ``scaler.step(optimizer)`` and ``scaler.update()`` skip the step and
back off on inf/NaN as usual.

found_inf is a statement about the values, as in ``unscale_``: it is read from the norm pass only
where a non-finite accumulator means exactly an inf/NaN element, and from a max |x| pass otherwise.
Where the sum of |x|^p over the still-scaled grads could overflow float64 although the unscaled
grads' sum would not (float64 grads above ~1e154 / scale, or p > 4), the grads are unscaled in
place first, as ``unscale_`` does, and then normed and clipped: the same passes as torch's recipe
(plus a max |x| read), and the same result.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import clip
from .inputs import check_max_norm, grads_of
from .norm_type import NormKind, NormSpec, parse_norm_type
from .plan import real_dtype


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _nonfinite_from_accumulator(norm: NormSpec, dtypes: set[torch.dtype]) -> bool:
    """True when a non-finite accumulator means exactly "some grad element is inf or NaN".

    max |x| propagates inf and NaN. Sums of |x|^p of finite float32/bf16/fp16 values cannot
    overflow a float64 sum while 0 < p <= 4 (at most (3.4e38)^4 = 1.3e154 per element); float64
    values can (their squares overflow above ~1.3e154). Counts (p = 0) and minima (p = -inf, p < 0)
    would hide inf and NaN.
    """
    if norm.kind is NormKind.MAX:
        return True
    return norm.kind is NormKind.SUM_POW and 0 < norm.p <= 4 and not _has_fp64(dtypes)


def _scaled_sum_may_overflow(norm: NormSpec, dtypes: set[torch.dtype]) -> bool:
    """True when the sum of |x|^p (p > 0) over the still-scaled grads can overflow float64 where
    the sum over the unscaled grads (torch's recipe) does not: float64 grads, or p > 4."""
    return norm.kind is NormKind.SUM_POW and norm.p > 0 and (_has_fp64(dtypes) or norm.p > 4)


def _has_fp64(dtypes: set[torch.dtype]) -> bool:
    return any(real_dtype(dtype) == torch.float64 for dtype in dtypes)


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


class ScaledPass(NamedTuple):
    """What :func:`scaled_norm_pass` leaves for the caller."""

    total: Tensor  # the total norm of the unscaled grads
    coef: Tensor | None  # the factor to multiply the grads by, as they are stored now (None: no grads)
    found_inf: Tensor  # float32 1.0 when some stored grad element is inf or NaN, else 0.0
    calls: list  # prepared calls to scale the grads with
    state: dict  # the scaler's state for this optimizer
    grads: list[Tensor]


def scaled_norm_pass(
    scaler: Any,
    optimizer: torch.optim.Optimizer,
    max_norm: Any,
    norm_type: float | str,
    backend: str | None,
    group: Any,
) -> ScaledPass:
    """The shared first half: the unscaled total norm, the coefficient for the stored grads,
    found_inf, prepared calls, optimizer state. Marks nothing in the scaler; raises like
    ``unscale_`` on misuse, before any grad is touched.

    Usually the grads are only read: the norm pass reads the scaled grads with the inverse scale
    folded in, and the returned coefficient is ``inverse_scale * clip_coefficient``. When the sum
    of |x|^p over the scaled grads could overflow where torch's sum over the unscaled grads does not
    (float64 grads, or p > 4), the grads are unscaled in place first, exactly as ``unscale_``
    does, and the coefficient is the clip coefficient alone. found_inf always comes from the values
    (a max |x| pass over the stored grads, unless the accumulator already says it exactly), never
    from an overflowing sum; none of this synchronises with the host.
    """
    norm = parse_norm_type(norm_type)
    max_norm = check_max_norm(max_norm)
    state, scale = _scaler_state(scaler, optimizer)
    grads = grads_of(_optimizer_params(optimizer))
    if any(g.dtype == torch.float16 for g in grads):
        raise ValueError("Attempting to unscale FP16 gradients.")  # torch's message and rule
    inv_scale = scale.double().reciprocal().float()  # as torch: the reciprocal in float64
    if not grads:
        return ScaledPass(torch.tensor(0.0, device=torch.get_default_device()), None, torch.zeros((), device=scale.device), [], state, grads)
    dtypes = {g.dtype for g in grads}
    if _scaled_sum_may_overflow(norm, dtypes):
        # found_inf from the stored values, then torch's order: unscale, norm, (clip by the caller)
        check, calls = clip.norm_pass(grads, parse_norm_type("inf"), None, backend=backend, group=group)
        clip.scale_calls_(calls, inv_scale)
        result, calls = clip.norm_pass(grads, norm, max_norm, backend=backend, group=group)
        acc = check.acc
    else:
        result, calls = clip.norm_pass(grads, norm, max_norm, backend=backend, group=group, grad_scale=inv_scale)
        if _nonfinite_from_accumulator(norm, dtypes):
            acc = result.acc
        else:  # one extra read: the max |x| reveals inf/NaN whatever the norm type
            acc = clip.norm_pass(grads, parse_norm_type("inf"), None, backend=backend, group=group)[0].acc
    found_inf = (~torch.isfinite(acc)).to(device=scale.device, dtype=torch.float32)
    return ScaledPass(result.total, result.coef, found_inf, calls, state, grads)


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
    scaled = scaled_norm_pass(scaler, optimizer, max_norm, norm_type, backend, group)
    if scaled.coef is not None:
        clip.scale_calls_(scaled.calls, scaled.coef)
        scaled.state["found_inf_per_device"] = {scaled.found_inf.device: scaled.found_inf}
    else:
        scaled.state["found_inf_per_device"] = {}  # no grads: scaler.step raises as it does after unscale_
    scaled.state["stage"] = OptState.UNSCALED
    return scaled.total
