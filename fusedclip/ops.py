"""``torch.library`` custom ops: how fusedclip runs inside ``torch.compile`` without graph breaks.

The public functions notice compilation (``torch.compiler.is_compiling()``) and route here: the
Python that Dynamo traces only collects grads and checks constant arguments, and the kernels run
behind opaque custom ops whose schemas declare the grads they mutate and whose fake
implementations give the result's dtype and device. In eager mode the public functions call the
same implementations directly (a custom op's dispatch would only add overhead there).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch
from torch import Tensor

from . import clip
from .inputs import check_clip_value, check_max_norm
from .norm_type import NormSpec, parse_norm_type
from .plan import real_dtype

_NO_GROUP = "fusedclip under torch.compile takes no process group (group=); call it outside the compiled region"


def _result_dtype(tensors: list[Tensor]) -> torch.dtype:
    return functools.reduce(torch.promote_types, [real_dtype(t.dtype) for t in tensors])


def _split_max_norm(max_norm: float | Tensor) -> tuple[float, Optional[Tensor]]:
    """Custom ops take a float and an optional tensor instead of a union."""
    if isinstance(max_norm, Tensor):
        return math.nan, max_norm
    return float(max_norm), None


def _runtime_max_norm(max_norm: float, max_norm_tensor: Optional[Tensor]) -> float | Tensor:
    return check_max_norm(max_norm if max_norm_tensor is None else max_norm_tensor)


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
    norm = parse_norm_type(norm_type)
    return clip.clip_grad_norm_impl(
        grads, _runtime_max_norm(max_norm, max_norm_tensor), norm, error_if_nonfinite, foreach, backend
    )


@clip_grad_norm_op.register_fake
def _(grads, max_norm, max_norm_tensor, norm_type, error_if_nonfinite, foreach, backend):
    return grads[0].new_empty((), dtype=_result_dtype(grads))


@torch.library.custom_op("fusedclip::get_total_norm", mutates_args=())
def get_total_norm_op(
    tensors: list[Tensor], norm_type: float, error_if_nonfinite: bool, foreach: Optional[bool], backend: Optional[str]
) -> Tensor:
    return clip.get_total_norm_impl(tensors, parse_norm_type(norm_type), error_if_nonfinite, foreach, backend)


@get_total_norm_op.register_fake
def _(tensors, norm_type, error_if_nonfinite, foreach, backend):
    return tensors[0].new_empty((), dtype=_result_dtype(tensors))


@torch.library.custom_op("fusedclip::clip_grads_with_norm_", mutates_args={"grads"})
def clip_grads_with_norm_op(
    grads: list[Tensor],
    max_norm: float,
    max_norm_tensor: Optional[Tensor],
    total_norm: Tensor,
    foreach: Optional[bool],
    backend: Optional[str],
) -> None:
    clip.clip_grads_with_norm_impl(grads, _runtime_max_norm(max_norm, max_norm_tensor), total_norm, foreach, backend)


@clip_grads_with_norm_op.register_fake
def _(grads, max_norm, max_norm_tensor, total_norm, foreach, backend):
    return None


@torch.library.custom_op("fusedclip::clip_grad_value_", mutates_args={"grads"})
def clip_grad_value_op(grads: list[Tensor], clip_value: float, foreach: Optional[bool], backend: Optional[str]) -> None:
    clip.clip_grad_value_impl(grads, clip_value, foreach, backend)


@clip_grad_value_op.register_fake
def _(grads, clip_value, foreach, backend):
    return None


# -- what the public functions call while being compiled ----------------------------------------


def _grads(params: list) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


def compiled_clip_grad_norm_(
    params: list, max_norm: Any, norm: NormSpec, error_if_nonfinite: bool, foreach: Any, backend: Any, group: Any
) -> Tensor:
    if group is not None:
        raise ValueError(_NO_GROUP)
    if not isinstance(max_norm, Tensor):
        max_norm = check_max_norm(max_norm)  # a constant: checked while tracing
    grads = _grads(params)
    if not grads:
        return torch.tensor(0.0, device=torch.get_default_device())
    value, tensor = _split_max_norm(max_norm)
    return clip_grad_norm_op(grads, value, tensor, norm.p, error_if_nonfinite, foreach, backend)


def compiled_get_total_norm(
    tensors: list, norm: NormSpec, error_if_nonfinite: bool, foreach: Any, backend: Any, group: Any
) -> Tensor:
    if group is not None:
        raise ValueError(_NO_GROUP)
    if not tensors:
        return torch.tensor(0.0, device=torch.get_default_device())
    return get_total_norm_op(tensors, norm.p, error_if_nonfinite, foreach, backend)


def compiled_clip_grads_with_norm_(params: list, max_norm: Any, total_norm: Any, foreach: Any, backend: Any) -> None:
    if not isinstance(max_norm, Tensor):
        max_norm = check_max_norm(max_norm)
    if not isinstance(total_norm, Tensor):
        total_norm = torch.tensor(float(total_norm), device="cpu")
    grads = _grads(params)
    if grads:
        value, tensor = _split_max_norm(max_norm)
        clip_grads_with_norm_op(grads, value, tensor, total_norm, foreach, backend)


def compiled_clip_grad_value_(params: list, clip_value: float, foreach: Any, backend: Any) -> None:
    grads = _grads(params)
    if grads:
        clip_grad_value_op(grads, check_clip_value(clip_value), foreach, backend)
