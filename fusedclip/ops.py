"""What the public functions call once their arguments are validated: the engine, eagerly or as a
``torch.library`` custom op inside ``torch.compile``.

Every function here takes validated arguments (see :mod:`fusedclip.inputs`). Eagerly it runs the
engine directly (a custom op's dispatch would only add overhead); while ``torch.compile`` traces,
it calls the custom op whose body is the same engine code, so compiled code has no graph break and
cannot drift from eager. The ops' schemas declare the grads they mutate, and their fake
implementations give the results' dtypes and devices.

Two kinds of entry point:

* one per public function of :mod:`fusedclip.clip` (``clip_grad_norm_`` ...);
* the two primitives, :func:`total_norm` and :func:`scale_`, over a call from :func:`prepare`, which
  AMP, the optimizer folding and :class:`~fusedclip.Clipper` compose.

The ops are registered when this module is imported, which ``import fusedclip`` does: a saved
graph holding ``fusedclip::clip_grad_norm_`` loads after a plain ``import fusedclip``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import engine
from .backends.base import ACC_DTYPE, NormResult, clip_coefficient, is_general_p
from .inputs import check_max_norm
from .norm_type import NormSpec, parse_norm_type
from .plan import result_dtype_of

_NO_GROUP = "fusedclip under torch.compile takes no process group (group=); call it outside the compiled region"


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _no_group(group: Any) -> None:
    if group is not None:
        raise ValueError(_NO_GROUP)


def _split_max_norm(max_norm: float | Tensor) -> tuple[float, Optional[Tensor]]:
    """Custom ops take a float and an optional tensor instead of a union."""
    if isinstance(max_norm, Tensor):
        return math.nan, max_norm
    return float(max_norm), None


def _joined_max_norm(max_norm: float, max_norm_tensor: Optional[Tensor]) -> float | Tensor:
    """The op's max_norm as the engine takes it; a tensor's value is read here, at run time (the
    trace could only check its shape and dtype), by the same check the eager call makes."""
    return max_norm if max_norm_tensor is None else check_max_norm(max_norm_tensor)


def _result_like(grads: list[Tensor]) -> Tensor:
    return grads[0].new_empty((), dtype=result_dtype_of(grad.dtype for grad in grads))


# -- clip_grad_norm_ -------------------------------------------------------------------------------


def _clip_grad_norm(
    grads: list[Tensor],
    max_norm: float | Tensor,
    norm: NormSpec,
    error_if_nonfinite: bool,
    foreach: bool | None,
    backend: str | None,
    group: Any = None,
) -> Tensor:
    call = engine.prepare(grads, backend, foreach, group=group)
    result = engine.total_norm(call, norm, max_norm)
    if error_if_nonfinite:
        engine.raise_if_nonfinite(result.total, norm)
    engine.scale_(call, result.coef)  # type: ignore[arg-type]
    return result.total


@torch.library.custom_op("fusedclip::clip_grad_norm_", mutates_args={"grads"})
def clip_grad_norm_op(
    grads: list[Tensor],
    max_norm: float,
    max_norm_tensor: Optional[Tensor],
    norm_type: float,
    error_if_nonfinite: bool,
    foreach: Optional[bool],
    backend: Optional[str],
) -> Tensor:
    return _clip_grad_norm(
        grads, _joined_max_norm(max_norm, max_norm_tensor), parse_norm_type(norm_type), error_if_nonfinite, foreach, backend
    )


@clip_grad_norm_op.register_fake
def _(grads, max_norm, max_norm_tensor, norm_type, error_if_nonfinite, foreach, backend):
    return _result_like(grads)


def clip_grad_norm_(
    grads: list[Tensor],
    max_norm: float | Tensor,
    norm: NormSpec,
    error_if_nonfinite: bool,
    foreach: bool | None,
    backend: str | None,
    group: Any = None,
) -> Tensor:
    if not _compiling():
        return _clip_grad_norm(grads, max_norm, norm, error_if_nonfinite, foreach, backend, group)
    _no_group(group)
    return clip_grad_norm_op(grads, *_split_max_norm(max_norm), norm.p, error_if_nonfinite, foreach, backend)


# -- get_total_norm --------------------------------------------------------------------------------


def _get_total_norm(
    tensors: list[Tensor], norm: NormSpec, error_if_nonfinite: bool, foreach: bool | None, backend: str | None, group: Any = None
) -> Tensor:
    total = engine.total_norm(engine.prepare(tensors, backend, foreach, group=group), norm).total
    if error_if_nonfinite:
        engine.raise_if_nonfinite(total, norm)
    return total


@torch.library.custom_op("fusedclip::get_total_norm", mutates_args=())
def get_total_norm_op(
    tensors: list[Tensor], norm_type: float, error_if_nonfinite: bool, foreach: Optional[bool], backend: Optional[str]
) -> Tensor:
    return _get_total_norm(tensors, parse_norm_type(norm_type), error_if_nonfinite, foreach, backend)


@get_total_norm_op.register_fake
def _(tensors, norm_type, error_if_nonfinite, foreach, backend):
    return _result_like(tensors)


def get_total_norm(
    tensors: list[Tensor], norm: NormSpec, error_if_nonfinite: bool, foreach: bool | None, backend: str | None, group: Any = None
) -> Tensor:
    if not _compiling():
        return _get_total_norm(tensors, norm, error_if_nonfinite, foreach, backend, group)
    _no_group(group)
    return get_total_norm_op(tensors, norm.p, error_if_nonfinite, foreach, backend)


# -- clip_grads_with_norm_ -------------------------------------------------------------------------


def _clip_grads_with_norm(
    grads: list[Tensor], max_norm: float | Tensor, total_norm: Tensor, foreach: bool | None, backend: str | None
) -> None:
    if engine.is_dtensor(total_norm):  # a DTensor norm from a DTensor get_total_norm
        total_norm = total_norm.full_tensor()  # type: ignore[attr-defined]
    coef = clip_coefficient(total_norm.to(ACC_DTYPE), max_norm)
    engine.scale_(engine.prepare(grads, backend, foreach, for_norm=False), coef)


@torch.library.custom_op("fusedclip::clip_grads_with_norm_", mutates_args={"grads"})
def clip_grads_with_norm_op(
    grads: list[Tensor],
    max_norm: float,
    max_norm_tensor: Optional[Tensor],
    total_norm: Tensor,
    foreach: Optional[bool],
    backend: Optional[str],
) -> None:
    _clip_grads_with_norm(grads, _joined_max_norm(max_norm, max_norm_tensor), total_norm, foreach, backend)


@clip_grads_with_norm_op.register_fake
def _(grads, max_norm, max_norm_tensor, total_norm, foreach, backend):
    return None


def clip_grads_with_norm_(
    grads: list[Tensor], max_norm: float | Tensor, total_norm: Tensor, foreach: bool | None, backend: str | None
) -> None:
    if not _compiling():
        return _clip_grads_with_norm(grads, max_norm, total_norm, foreach, backend)
    clip_grads_with_norm_op(grads, *_split_max_norm(max_norm), total_norm, foreach, backend)
    return None


# -- clip_grad_value_ ------------------------------------------------------------------------------


def _clip_grad_value(grads: list[Tensor], clip_value: float, foreach: bool | None, backend: str | None) -> None:
    engine.clamp_(engine.prepare(grads, backend, foreach, for_norm=False), clip_value)


@torch.library.custom_op("fusedclip::clip_grad_value_", mutates_args={"grads"})
def clip_grad_value_op(grads: list[Tensor], clip_value: float, foreach: Optional[bool], backend: Optional[str]) -> None:
    _clip_grad_value(grads, clip_value, foreach, backend)


@clip_grad_value_op.register_fake
def _(grads, clip_value, foreach, backend):
    return None


def clip_grad_value_(grads: list[Tensor], clip_value: float, foreach: bool | None, backend: str | None) -> None:
    if not _compiling():
        return _clip_grad_value(grads, clip_value, foreach, backend)
    clip_grad_value_op(grads, clip_value, foreach, backend)
    return None


# -- the primitives: a prepared call, its norm, its scaling ----------------------------------------


class TracedCall(NamedTuple):
    """What :func:`prepare` gives while ``torch.compile`` traces: the grads and the backend, for the
    custom ops (the engine's plan is made when the op runs)."""

    grads: list[Tensor]
    backend: Optional[str]


Call = Union[engine.PreparedCall, TracedCall]


def prepare(grads: list[Tensor], backend: str | None, group: Any = None) -> Call:
    """The grads of one call, for :func:`total_norm` and :func:`scale_` (non-empty ``grads``)."""
    if not _compiling():
        return engine.prepare(grads, backend, group=group)
    _no_group(group)
    return TracedCall(grads, backend)


def _distinct(outputs: list[Tensor]) -> list[Tensor]:
    """The outputs, each in memory of its own (a custom op's outputs may not alias one another)."""
    seen: set[int] = set()
    distinct = []
    for output in outputs:
        address = output.untyped_storage().data_ptr()
        if address in seen:
            output = output.clone()
        elif address:
            seen.add(address)
        distinct.append(output)
    return distinct


@torch.library.custom_op("fusedclip::total_norm", mutates_args=())
def total_norm_op(
    grads: list[Tensor],
    norm_type: float,
    max_norm: float,
    max_norm_tensor: Optional[Tensor],
    clip: bool,
    grad_scale: Optional[Tensor],
    per_tensor: bool,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(total, coefficient, accumulator, norm scale, per-tensor norms) of :func:`engine.total_norm`;
    the coefficient is 0 without ``clip``, the norm scale 1 except for a general p, the per-tensor
    norms empty without ``per_tensor``."""
    buffer = torch.empty(len(grads), dtype=ACC_DTYPE, device=grads[0].device) if per_tensor else None
    result = engine.total_norm(
        engine.prepare(grads, backend),
        parse_norm_type(norm_type),
        _joined_max_norm(max_norm, max_norm_tensor) if clip else None,
        per_tensor=buffer,
        grad_scale=grad_scale,
    )
    acc = result.acc
    coef = acc.new_zeros(()) if result.coef is None else result.coef
    scale = acc.new_ones(()) if result.scale is None else result.scale
    per_tensor_out = acc.new_empty(0) if buffer is None else buffer
    return tuple(_distinct([result.total, coef, acc, scale, per_tensor_out]))  # type: ignore[return-value]


@total_norm_op.register_fake
def _(grads, norm_type, max_norm, max_norm_tensor, clip, grad_scale, per_tensor, backend):
    scalar = grads[0].new_empty((), dtype=ACC_DTYPE)
    per_tensor_out = grads[0].new_empty((len(grads) if per_tensor else 0,), dtype=ACC_DTYPE)
    return _result_like(grads), scalar, scalar.clone(), scalar.clone(), per_tensor_out


def total_norm(
    call: Call,
    norm: NormSpec,
    max_norm: float | Tensor | None = None,
    *,
    grad_scale: Tensor | None = None,
    per_tensor: bool = False,
) -> tuple[NormResult, Tensor | None]:
    """:func:`engine.total_norm` over the call, and (with ``per_tensor``) every grad's own norm
    (float64, one slot per grad, on the first grad's device)."""
    if isinstance(call, engine.PreparedCall):
        buffer = torch.empty(call.num_grads, dtype=ACC_DTYPE, device=call.first_device) if per_tensor else None
        return engine.total_norm(call, norm, max_norm, per_tensor=buffer, grad_scale=grad_scale), buffer
    value, tensor = _split_max_norm(0.0 if max_norm is None else max_norm)
    total, coef, acc, scale, per_tensor_out = total_norm_op(
        call.grads, norm.p, value, tensor, max_norm is not None, grad_scale, per_tensor, call.backend
    )
    result = NormResult(total, coef if max_norm is not None else None, acc, scale if is_general_p(norm) else None)
    return result, (per_tensor_out if per_tensor else None)


@torch.library.custom_op("fusedclip::scale_", mutates_args={"grads"})
def scale_op(grads: list[Tensor], coef: Tensor, backend: Optional[str]) -> None:
    engine.scale_(engine.prepare(grads, backend, for_norm=False), coef)


@scale_op.register_fake
def _(grads, coef, backend):
    return None


def scale_(call: Call, coef: Tensor) -> None:
    """Multiply every grad of the call by ``coef`` (:func:`engine.scale_`)."""
    if isinstance(call, engine.PreparedCall):
        engine.scale_(call, coef)
    else:
        scale_op(call.grads, coef, call.backend)
