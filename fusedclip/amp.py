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
from torch.amp.grad_scaler import OptState

from . import ops
from .backends import requested_backend
from .inputs import check_max_norm, grads_of, no_grads_result
from .norm_type import NormKind, NormSpec, parse_norm_type
from .plan import real_dtype

#: max |x|, whose accumulator says exactly whether some element is inf or NaN
_MAX_ABS = parse_norm_type("inf")


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


# The scaler is read through its attributes: torch.compile does not trace into torch.amp (a call of
# one of its functions would break the graph), so the few checks unscale_ makes are written out here.


def scaler_enabled(scaler: Any) -> bool:
    """``scaler.is_enabled()``."""
    return bool(scaler._enabled)


def _scaler_state(scaler: Any, optimizer: torch.optim.Optimizer) -> tuple[dict, Tensor]:
    """Check the scaler's stage as ``unscale_`` does; return the optimizer's state and the scale."""
    fix = "This may indicate your script did not use scaler.scale(loss or outputs) earlier in the iteration."
    scale = scaler._scale
    if scale is None:
        raise AssertionError("Attempted unscale_ but _scale is None.  " + fix)
    if scaler._growth_tracker is None:
        raise AssertionError("Attempted unscale_ but _growth_tracker is None.  " + fix)
    states = scaler._per_optimizer_states
    state = states.get(id(optimizer))
    if state is None:
        # what the defaultdict makes on first access, inserted explicitly: under torch.compile the
        # defaultdict's own insertion would be lost
        state = states[id(optimizer)] = {"stage": OptState.READY, "found_inf_per_device": {}}
    if state["stage"] is OptState.UNSCALED:
        raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")
    return state, scale


class ScaledNorm(NamedTuple):
    """What :func:`scaled_norm` leaves for the caller."""

    total: Tensor  # the total norm of the unscaled grads
    coef: Tensor | None  # the factor to multiply the grads by, as they are stored now (None: no grads)
    found_inf: Tensor  # float32 1.0 when some stored grad element is inf or NaN, else 0.0
    call: ops.Call | None  # the prepared grads, to scale them with (None: no grads)
    state: dict  # the scaler's state for this optimizer
    dtypes: set  # the grads' dtypes


def scaled_norm(
    scaler: Any,
    optimizer: torch.optim.Optimizer,
    max_norm: float | Tensor,
    norm: NormSpec,
    backend: str | None,
    group: Any,
) -> ScaledNorm:
    """The shared first half of :func:`unscale_and_clip_` and ``clip_and_step_`` (arguments
    validated): the unscaled total norm, the coefficient for the stored grads, found_inf, the
    prepared grads, optimizer state. Marks nothing in the scaler; raises like ``unscale_`` on
    misuse, before any grad is touched.

    Usually the grads are only read: the norm pass reads the scaled grads with the inverse scale
    folded in, and the returned coefficient is ``inverse_scale * clip_coefficient``. When the sum
    of |x|^p over the scaled grads could overflow where torch's sum over the unscaled grads does not
    (float64 grads, or p > 4), the grads are unscaled in place first, exactly as ``unscale_``
    does, and the coefficient is the clip coefficient alone. found_inf always comes from the values
    (a max |x| pass over the stored grads, unless the accumulator already says it exactly), never
    from an overflowing sum; none of this synchronises with the host.
    """
    state, scale = _scaler_state(scaler, optimizer)
    grads = grads_of(_optimizer_params(optimizer))
    if any(g.dtype == torch.float16 for g in grads):
        raise ValueError("Attempting to unscale FP16 gradients.")  # torch's message and rule
    inv_scale = scale.double().reciprocal().float()  # as torch: the reciprocal in float64
    if not grads:
        return ScaledNorm(no_grads_result(), None, torch.zeros((), device=scale.device), None, state, set())
    dtypes = {g.dtype for g in grads}
    call = ops.prepare(grads, backend, group)
    if _scaled_sum_may_overflow(norm, dtypes):
        # found_inf from the stored values, then torch's order: unscale, norm, (clip by the caller)
        acc = ops.total_norm(call, _MAX_ABS)[0].acc
        ops.scale_(call, inv_scale)
        result, _ = ops.total_norm(call, norm, max_norm)
    else:
        result, _ = ops.total_norm(call, norm, max_norm, grad_scale=inv_scale)
        if _nonfinite_from_accumulator(norm, dtypes):
            acc = result.acc
        else:  # one extra read: the max |x| reveals inf/NaN whatever the norm type
            acc = ops.total_norm(call, _MAX_ABS)[0].acc
    found_inf = (~torch.isfinite(acc)).to(device=scale.device, dtype=torch.float32)
    return ScaledNorm(result.total, result.coef, found_inf, call, state, dtypes)


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
    norm = parse_norm_type(norm_type)
    max_norm = check_max_norm(max_norm)
    backend = requested_backend(backend)
    if not scaler_enabled(scaler):
        grads = grads_of(_optimizer_params(optimizer))
        if not grads:
            return no_grads_result()
        return ops.clip_grad_norm_(grads, max_norm, norm, False, None, backend, group)
    scaled = scaled_norm(scaler, optimizer, max_norm, norm, backend, group)
    if scaled.call is not None:
        ops.scale_(scaled.call, scaled.coef)  # type: ignore[arg-type]
        scaled.state["found_inf_per_device"] = {scaled.found_inf.device: scaled.found_inf}
    else:
        scaled.state["found_inf_per_device"] = {}  # no grads: scaler.step raises as it does after unscale_
    scaled.state["stage"] = OptState.UNSCALED
    return scaled.total
