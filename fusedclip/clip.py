"""The public clipping API: torch 2.13's signatures, plus keyword-only ``backend`` and ``group``.

Each function validates every argument once (:mod:`fusedclip.inputs`; so bad input never leaves
grads half-modified), the same way whether it runs eagerly or is traced by ``torch.compile``, then
calls :mod:`fusedclip.ops`, which runs the engine directly or, while compiling, through its
``torch.library`` custom op.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import ops
from .backends import requested_backend
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
    no_grads_result,
)
from .norm_type import parse_norm_type

__all__ = ["clip_grad_norm_", "get_total_norm", "get_norms", "clip_grads_with_norm_", "clip_grad_value_"]


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: MaxNorm,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
    group: Any = None,
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
        group: a ``torch.distributed`` process group over which the grads are split (model or
            pipeline parallelism): every rank gets the global norm and the same coefficient.
            DTensor grads (FSDP2, tensor parallel) need no group: their mesh says where to reduce.

    Returns:
        The total norm of the gradients as a 0-d tensor on the first gradient's device, in torch's
        promoted dtype of the gradients (a DTensor for DTensor grads, as torch returns);
        ``tensor(0.)`` when there are no gradients.
    """
    params = as_list(parameters, "parameters", warn_empty_generator=True)
    norm = parse_norm_type(norm_type)
    max_norm = check_max_norm(max_norm)
    error_if_nonfinite = check_error_if_nonfinite(error_if_nonfinite)
    foreach = check_foreach(foreach)
    backend = requested_backend(backend)
    grads = grads_of(params)
    if not grads:
        return no_grads_result()
    return ops.clip_grad_norm_(grads, max_norm, norm, error_if_nonfinite, foreach, backend, group)


@torch.no_grad()
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
    group: Any = None,
) -> Tensor:
    """The norm of the given tensors (the gradients themselves), as if concatenated into one vector.

    Same arguments and result as :func:`clip_grad_norm_`, without clipping; ``tensors`` are the
    gradients, not the parameters.
    """
    tensors = as_list(tensors, "tensors")
    norm = parse_norm_type(norm_type)
    tensors = check_tensors(tensors, "tensors")
    error_if_nonfinite = check_error_if_nonfinite(error_if_nonfinite)
    foreach = check_foreach(foreach)
    backend = requested_backend(backend)
    if not tensors:
        return no_grads_result()
    return ops.get_total_norm(tensors, norm, error_if_nonfinite, foreach, backend, group)


@torch.no_grad()
def get_norms(
    tensors: TensorOrTensors,
    norm_type: float | str = 2.0,
    *,
    backend: str | None = None,
    group: Any = None,
) -> tuple[Tensor, Tensor]:
    """The total norm and every tensor's own norm, from one pass over the tensors.

    Returns:
        ``(total, per_tensor)``: ``total`` as :func:`get_total_norm` returns it; ``per_tensor`` a
        1-d tensor with one norm per input tensor (for ``norm_type=0`` its count of non-zero
        elements), unrounded in float32 (float64 when any tensor is float64 or complex128), on
        the first tensor's device. For DTensor grads (FSDP2, HSDP, tensor parallel) each norm is
        that of the whole unsharded tensor, the same on every rank, from the same all-reduce as
        the total. With ``group``, the total is global and plain tensors' norms local.
    """
    tensors = check_tensors(as_list(tensors, "tensors"), "tensors")
    norm = parse_norm_type(norm_type)
    backend = requested_backend(backend)
    if not tensors:
        return no_grads_result(), torch.zeros(0, device=torch.get_default_device())
    result, per_tensor = ops.total_norm(ops.prepare(tensors, backend, group), norm, per_tensor=True)
    # at least float32; float64 when the result dtype (the promoted real dtype of the tensors) is
    return result.total, per_tensor.to(torch.promote_types(result.total.dtype, torch.float32))  # type: ignore[union-attr]


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
    backend = requested_backend(backend)
    grads = grads_of(params)
    if not grads:
        return None
    return ops.clip_grads_with_norm_(grads, max_norm, total_norm, foreach, backend)


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
    backend = requested_backend(backend)
    grads = grads_of(params)
    if not grads:
        return None
    return ops.clip_grad_value_(grads, clip_value, foreach, backend)
