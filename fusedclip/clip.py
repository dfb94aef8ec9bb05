"""The public clipping API: torch 2.13's signatures, plus keyword-only ``backend`` and ``group``.

Each function validates every argument first (so bad input never leaves grads half-modified), then
hands the grads to :mod:`fusedclip.engine`. Inside ``torch.compile`` the same work runs as the
``torch.library`` custom ops of :mod:`fusedclip.ops`, so compiled code has no graph break.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import engine
from .backends import requested_backend
from .backends.base import ACC_DTYPE, NormResult, clip_coefficient
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
from .norm_type import NormSpec, parse_norm_type
from .plan import all_plain, check_writable

__all__ = ["clip_grad_norm_", "get_total_norm", "get_norms", "clip_grads_with_norm_", "clip_grad_value_"]


def _no_grads_result() -> Tensor:
    return torch.tensor(0.0, device=torch.get_default_device())  # torch's result without grads, on its default device


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# -- implementations on validated arguments (also the bodies of the custom ops) ----------------


def norm_pass(
    grads: list[Tensor],
    norm: NormSpec,
    max_norm: float | Tensor | None,
    *,
    backend: str | None = None,
    foreach: bool | None = None,
    group: Any = None,
    grad_scale: Tensor | None = None,
    per_tensor: Tensor | None = None,
) -> tuple[NormResult, list[engine.PreparedCall]]:
    """One norm pass over non-empty ``grads``; returns the result and the calls to scale with.

    Plain tensors go through one prepared call; DTensor grads through their local shards
    (:mod:`fusedclip.distributed`); ``group`` all-reduces the accumulator across processes.
    """
    if not all_plain(grads):
        from . import distributed

        if distributed.has_dtensors(grads):
            if per_tensor is not None:
                raise ValueError("per-tensor norms are not available for DTensor gradients")
            return distributed.dtensor_norm_pass(grads, norm, max_norm, backend, foreach, grad_scale, group)
    reduce = None
    if group is not None:
        from .distributed import group_reducer

        reduce = group_reducer(norm, group)
    call = engine.prepare(grads, backend, foreach)
    result = engine.norm_pass(call, norm, max_norm, per_tensor=per_tensor, grad_scale=grad_scale, reduce=reduce)
    return result, [call]


def scale_calls_(calls: list[engine.PreparedCall], coef: Tensor) -> None:
    if len(calls) > 1:  # each call checks its own grads; these must all pass before any is written
        check_writable(work for call in calls for _, work in call.works)
    for call in calls:
        engine.scale_(call, coef)


def _local_calls(grads: list[Tensor], backend: str | None, foreach: bool | None) -> list[engine.PreparedCall]:
    """Prepared calls over the local tensors of ``grads`` (DTensor grads scale through their shards)."""
    if not all_plain(grads):
        from . import distributed

        if distributed.has_dtensors(grads):
            grads = [g.to_local() if distributed._is_dtensor(g) else g for g in grads]
    return [engine.prepare(grads, backend, foreach)]


def clip_grad_norm_impl(
    grads: list[Tensor],
    max_norm: float | Tensor,
    norm: NormSpec,
    error_if_nonfinite: bool,
    foreach: bool | None,
    backend: str | None,
    group: Any = None,
) -> Tensor:
    result, calls = norm_pass(grads, norm, max_norm, backend=backend, foreach=foreach, group=group)
    if error_if_nonfinite:
        engine.raise_if_nonfinite(result.total, norm)
    scale_calls_(calls, result.coef)
    return result.total


def get_total_norm_impl(
    tensors: list[Tensor], norm: NormSpec, error_if_nonfinite: bool, foreach: bool | None, backend: str | None, group: Any = None
) -> Tensor:
    result, _ = norm_pass(tensors, norm, None, backend=backend, foreach=foreach, group=group)
    if error_if_nonfinite:
        engine.raise_if_nonfinite(result.total, norm)
    return result.total


def clip_grads_with_norm_impl(
    grads: list[Tensor], max_norm: float | Tensor, total_norm: Tensor, foreach: bool | None, backend: str | None
) -> None:
    if hasattr(total_norm, "full_tensor"):  # a DTensor norm from a DTensor get_total_norm
        total_norm = total_norm.full_tensor()
    coef = clip_coefficient(total_norm.to(ACC_DTYPE), max_norm)
    scale_calls_(_local_calls(grads, backend, foreach), coef)


def clip_grad_value_impl(grads: list[Tensor], clip_value: float, foreach: bool | None, backend: str | None) -> None:
    for call in _local_calls(grads, backend, foreach):
        engine.clamp_(call, clip_value)


# -- the public functions ----------------------------------------------------------------------


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
    if _compiling():
        from . import ops

        return ops.compiled_clip_grad_norm_(params, max_norm, norm, error_if_nonfinite, foreach, backend, group)
    max_norm = check_max_norm(max_norm)
    error_if_nonfinite = check_error_if_nonfinite(error_if_nonfinite)
    foreach = check_foreach(foreach)
    requested_backend(backend)
    grads = grads_of(params)
    if not grads:
        return _no_grads_result()
    return clip_grad_norm_impl(grads, max_norm, norm, error_if_nonfinite, foreach, backend, group)


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
    if _compiling():
        from . import ops

        return ops.compiled_get_total_norm(tensors, norm, error_if_nonfinite, foreach, backend, group)
    tensors = check_tensors(tensors, "tensors")
    error_if_nonfinite = check_error_if_nonfinite(error_if_nonfinite)
    foreach = check_foreach(foreach)
    requested_backend(backend)
    if not tensors:
        return _no_grads_result()
    return get_total_norm_impl(tensors, norm, error_if_nonfinite, foreach, backend, group)


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
        the first tensor's device. With ``group``, the total is global and the per-tensor norms local.
    """
    tensors = as_list(tensors, "tensors")
    tensors = check_tensors(tensors, "tensors")
    norm = parse_norm_type(norm_type)
    requested_backend(backend)
    if not tensors:
        return _no_grads_result(), torch.zeros(0, device=torch.get_default_device())
    device = tensors[0].device
    per_tensor = torch.empty(len(tensors), dtype=ACC_DTYPE, device=device)
    result, _ = norm_pass(tensors, norm, None, backend=backend, group=group, per_tensor=per_tensor)
    # at least float32; float64 when the result dtype (the promoted real dtype of the tensors) is
    return result.total, per_tensor.to(torch.promote_types(result.total.dtype, torch.float32))


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
    if _compiling():
        from . import ops

        return ops.compiled_clip_grads_with_norm_(params, max_norm, total_norm, foreach, backend)
    max_norm = check_max_norm(max_norm)
    total_norm = check_total_norm(total_norm)
    foreach = check_foreach(foreach)
    requested_backend(backend)
    grads = grads_of(params)
    if not grads:
        return None
    return clip_grads_with_norm_impl(grads, max_norm, total_norm, foreach, backend)


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
    if _compiling():
        from . import ops

        return ops.compiled_clip_grad_value_(params, clip_value, foreach, backend)
    foreach = check_foreach(foreach)
    requested_backend(backend)
    grads = grads_of(params)
    if not grads:
        return None
    return clip_grad_value_impl(grads, clip_value, foreach, backend)
