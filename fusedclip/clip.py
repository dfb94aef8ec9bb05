"""The public clipping API: torch 2.13's signatures, plus the keyword-only ``backend``.

Each function validates every argument first (so bad input never leaves grads half-modified), then
hands the grads to :mod:`fusedclip.engine`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import engine
from .backends import requested_backend
from .backends.base import ACC_DTYPE, clip_coefficient
from .inputs import (
    MaxNorm,
    TensorOrTensors,
    as_list,
    check_clip_value,
    check_error_if_nonfinite,
    check_foreach,
    check_max_norm,
    check_tensors,
    check_total_norm,
    grads_of,
)
from .norm_type import parse_norm_type

__all__ = ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_"]


def _no_grads_result() -> Tensor:
    return torch.tensor(0.0)


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: MaxNorm,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Clip the gradient norm of an iterable of parameters, in place; drop-in for torch's.

    The norm is computed over all gradients together, as if they were concatenated into one vector
    (for ``norm_type=0``: the number of gradients with a non-zero element, as in torch). Every
    gradient is multiplied by ``min(max_norm / (total_norm + 1e-6), 1)``.

    Args:
        parameters: a Tensor or an iterable of Tensors whose ``.grad`` will be clipped; tensors
            whose ``.grad`` is None are skipped.
        max_norm: the largest allowed norm: a non-negative number or a 0-d tensor (a tensor on an
            accelerator stays on the device and is not checked by value).
        norm_type: the order ``p`` of the norm: any number, ``inf``/``-inf`` or ``'inf'``.
        error_if_nonfinite: raise ``RuntimeError`` when the total norm is NaN or infinite (this
            check synchronises with the device; it is the only one that does).
        foreach: accepted for compatibility; the kernel backends ignore it, the ``torch`` backend
            honours it as torch does.
        backend: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"`` or None (``FUSEDCLIP_BACKEND``,
            else the best one for the device).

    Returns:
        The total norm of the gradients as a 0-d tensor on the first gradient's device, in torch's
        promoted dtype of the gradients; ``tensor(0.)`` when there are no gradients.
    """
    params = as_list(parameters, "parameters", warn_empty_generator=True)
    norm = parse_norm_type(norm_type)
    max_norm = check_max_norm(max_norm)
    error_if_nonfinite = check_error_if_nonfinite(error_if_nonfinite)
    foreach = check_foreach(foreach)
    requested_backend(backend)
    grads = grads_of(params)
    if not grads:
        return _no_grads_result()
    call = engine.prepare(grads, backend, foreach)
    total, coef = engine.norm_and_coef(call, norm, max_norm)
    if error_if_nonfinite:
        engine.raise_if_nonfinite(total, norm)
    engine.scale_(call, coef)
    return total


@torch.no_grad()
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """The norm of the given tensors (the gradients themselves), as if concatenated into one vector.

    Same arguments and result as :func:`clip_grad_norm_`, without clipping; ``tensors`` are the
    gradients, not the parameters.
    """
    tensors = as_list(tensors, "tensors")
    check_tensors(tensors, "tensors")
    norm = parse_norm_type(norm_type)
    error_if_nonfinite = check_error_if_nonfinite(error_if_nonfinite)
    foreach = check_foreach(foreach)
    requested_backend(backend)
    if not tensors:
        return _no_grads_result()
    call = engine.prepare(tensors, backend, foreach)
    total, _ = engine.norm_and_coef(call, norm, None)
    if error_if_nonfinite:
        engine.raise_if_nonfinite(total, norm)
    return total


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: MaxNorm,
    total_norm: Tensor | float,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> None:
    """Scale the gradients by ``min(max_norm / (total_norm + 1e-6), 1)`` given a precomputed norm.

    ``total_norm`` is usually the result of :func:`get_total_norm`; the coefficient is computed on
    its device in float64, so no host synchronisation happens.
    """
    params = as_list(parameters, "parameters")
    max_norm = check_max_norm(max_norm)
    total_norm = check_total_norm(total_norm)
    foreach = check_foreach(foreach)
    requested_backend(backend)
    grads = grads_of(params)
    if not grads:
        return
    coef = clip_coefficient(total_norm.to(ACC_DTYPE), max_norm)
    engine.scale_(engine.prepare(grads, backend, foreach), coef)


@torch.no_grad()
def clip_grad_value_(
    parameters: TensorOrTensors,
    clip_value: Any,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> None:
    """Clamp every gradient to ``[-clip_value, clip_value]`` in place (NaN stays NaN).

    ``clip_value`` must be positive (torch silently zeroes or flips gradients otherwise).
    """
    params = as_list(parameters, "parameters")
    clip_value = check_clip_value(clip_value)
    foreach = check_foreach(foreach)
    requested_backend(backend)
    grads = grads_of(params)
    if not grads:
        return
    engine.clamp_(engine.prepare(grads, backend, foreach), clip_value)
