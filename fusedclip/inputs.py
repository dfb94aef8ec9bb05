"""Argument normalisation and validation for the public API.

Everything here runs before any gradient is touched, so a bad argument never leaves grads
half-modified. Messages name the bad value and what is accepted.
"""

from __future__ import annotations

import inspect
import math
import operator
import types
import warnings
from collections.abc import Iterable
from typing import Any, Union

import torch
from torch import Tensor

from . import _ext
from .plan import PLAIN_TENSOR_TYPES, PlainTensors

TensorOrTensors = Union[Tensor, Iterable[Tensor]]
MaxNorm = Union[float, int, Tensor]


def as_list(items: Any, what: str, *, warn_empty_generator: bool = False) -> list:
    """A Tensor becomes ``[tensor]``; an iterable is consumed once into a list (as torch does)."""
    if isinstance(items, Tensor):
        return [items]
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"{what} must be a Tensor or an iterable of Tensors; got {type(items).__name__}")
    is_generator = isinstance(items, types.GeneratorType)
    items = list(items)
    if warn_empty_generator and is_generator and not items:
        warnings.warn(
            "`parameters` is an empty generator, no gradient clipping will occur.",
            stacklevel=4,
        )
    return items


def _bad_item(items: list, what: str) -> TypeError:
    for index, item in enumerate(items):
        if not isinstance(item, Tensor):
            return TypeError(
                f"{what}[{index}] is a {type(item).__name__}; expected a torch.Tensor"
                " (a parameter, or a tensor with a .grad)"
            )
    return TypeError(f"{what} must contain only torch.Tensor objects")


_get_grad = operator.attrgetter("grad")
# The C getter behind Tensor.grad, called directly: p.grad on a Parameter first looks the name up
# through the class hierarchy and the instance dict, which costs more than the getter itself.
_read_grad = Tensor.grad.__get__


# What fusedclip._C.gather_grads reads, as torch.Tensor defines it (it checks each is a C-level
# descriptor of the expected kind, and declines otherwise).
_GATHERED_TYPES = tuple(PLAIN_TENSOR_TYPES)
_GATHERED_DESCRIPTORS = tuple(
    inspect.getattr_static(Tensor, name) for name in ("grad", "data_ptr", "nbytes", "dtype", "is_contiguous")
)


def no_grads_result() -> Tensor:
    """torch's result without grads: ``tensor(0.)`` on the default device."""
    return torch.tensor(0.0, device=torch.get_default_device())


def grads_of(params: list) -> list[Tensor]:
    """The ``.grad`` of every parameter that has one, in order; non-tensors raise ``TypeError``."""
    if torch.compiler.is_compiling():  # the same reads and checks, in Python Dynamo can trace
        try:
            grads = [param.grad for param in params if param.grad is not None]
        except AttributeError:
            raise _bad_item(params, "parameters") from None
        return check_tensors(grads, "gradients")
    if _ext.C is not None:
        # one C pass for the .grad reads and the plan-cache key (see csrc/gather.h)
        gathered = _ext.C.gather_grads(params, _GATHERED_TYPES, _GATHERED_DESCRIPTORS)
        if gathered is not None:
            grads = PlainTensors(gathered[0])
            grads.key_parts, grads.null_address = gathered[1:]
            return grads
    if set(map(type, params)) <= PLAIN_TENSOR_TYPES:  # nothing overrides .grad
        grads = [grad for grad in map(_read_grad, params) if grad is not None]
    else:
        try:
            grads = [grad for grad in map(_get_grad, params) if grad is not None]  # one .grad read each
        except AttributeError:
            raise _bad_item(params, "parameters") from None
    return check_tensors(grads, "gradients")


def check_tensors(tensors: list, what: str) -> list[Tensor]:
    """``tensors``, after raising ``TypeError`` unless every item is a Tensor (one C-level pass over
    the types); a :class:`~fusedclip.plan.PlainTensors` when none is a subclass, so later checks
    need not look again."""
    kinds = set(map(type, tensors))
    if kinds <= PLAIN_TENSOR_TYPES:
        return list(tensors) if torch.compiler.is_compiling() else PlainTensors(tensors)
    if not all(issubclass(kind, Tensor) for kind in kinds):
        raise _bad_item(tensors, what)
    return tensors


def check_max_norm(max_norm: Any) -> float | Tensor:
    """A non-negative, non-NaN number; or a 0-d tensor.

    A tensor on the CPU is checked by value. A tensor on an accelerator stays there and is used as
    is: checking its value would cost the host synchronisation fusedclip exists to avoid. While
    ``torch.compile`` traces, a tensor's shape and dtype are checked and its value is checked when
    the custom op runs (:func:`fusedclip.ops._joined_max_norm` calls this again then).
    """
    if isinstance(max_norm, Tensor):
        if max_norm.numel() != 1:
            raise ValueError(f"max_norm must be a number or a 1-element tensor; got shape {tuple(max_norm.shape)}")
        if max_norm.is_complex() or not (max_norm.is_floating_point() or _is_integral(max_norm)):
            raise TypeError(f"max_norm must be a real number; got a tensor of dtype {max_norm.dtype}")
        if max_norm.device.type != "cpu" or torch.compiler.is_compiling():
            return max_norm.reshape(())
        max_norm = max_norm.item()
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) and not _is_real_scalar(max_norm):
        raise TypeError(f"max_norm must be a real number or a 0-d tensor; got {type(max_norm).__name__}")
    value = float(max_norm)
    if math.isnan(value) or value < 0:
        raise ValueError(
            f"max_norm must be a non-negative number (0 <= max_norm <= inf); got {value}."
            " (torch would silently flip the sign of every gradient for a negative max_norm.)"
        )
    return value


def check_clip_value(clip_value: Any) -> float:
    """A positive number (torch silently zeroes or flips grads for 0 or negative values)."""
    if isinstance(clip_value, Tensor):
        if clip_value.numel() != 1 or clip_value.is_complex():
            raise TypeError("clip_value must be a real number or a 1-element real tensor")
        clip_value = clip_value.item()
    if isinstance(clip_value, bool) or not isinstance(clip_value, (int, float)) and not _is_real_scalar(clip_value):
        raise TypeError(f"clip_value must be a positive real number; got {type(clip_value).__name__}")
    value = float(clip_value)
    if math.isnan(value) or value <= 0:
        raise ValueError(f"clip_value must be a positive number (0 < clip_value <= inf); got {value}")
    return value


def check_total_norm(total_norm: Any) -> Tensor:
    """The ``total_norm`` of ``clip_grads_with_norm_``: a real 1-element tensor or a number."""
    if isinstance(total_norm, Tensor):
        if total_norm.numel() != 1 or total_norm.is_complex():
            raise ValueError("total_norm must be a real 1-element tensor (as returned by get_total_norm)")
        if not total_norm.is_floating_point():
            total_norm = total_norm.to(torch.float32)
        return total_norm.reshape(())
    if isinstance(total_norm, bool) or not isinstance(total_norm, (int, float)) and not _is_real_scalar(total_norm):
        raise TypeError(f"total_norm must be a tensor or a real number; got {type(total_norm).__name__}")
    return torch.tensor(float(total_norm), dtype=torch.float32, device="cpu")


def _flag(value: Any, name: str) -> bool:
    """A yes/no flag read as torch reads it (``if flag:``), from what torch reads without misreading
    it: a bool, a numpy bool, any real number (Python, numpy), a one-element real tensor. Refused:
    strings (``"False"`` is truthy, so torch would read it as True), containers and other objects."""
    if isinstance(value, bool):
        return value
    original = value
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.device.type == "meta":
            raise TypeError(f"{name} must be True or False (or a one-element real tensor); got {value!r}")
        value = value.item()  # as torch's ``if flag:`` reads it (a device tensor syncs there too)
    if isinstance(value, (str, bytes)) or not _is_real_scalar(value):
        raise TypeError(
            f"{name} must be True or False (or a number); got {original!r}"
            + (" (a string is always true, so torch would read it as True)" if isinstance(value, (str, bytes)) else "")
        )
    return bool(value)


def check_foreach(foreach: Any) -> bool | None:
    """None (automatic), or a flag as :func:`_flag` accepts it, as a bool."""
    if foreach is None:
        return None
    return _flag(foreach, "foreach")


def check_error_if_nonfinite(flag: Any) -> bool:
    """A flag as :func:`_flag` accepts it, as a bool; None reads as False, as in torch."""
    if flag is None:
        return False
    return _flag(flag, "error_if_nonfinite")


def _is_integral(tensor: Tensor) -> bool:
    return not tensor.is_floating_point() and not tensor.is_complex() and tensor.dtype != torch.bool


def _is_real_scalar(value: Any) -> bool:
    """numpy and other scalar types that convert to float (but not strings)."""
    if isinstance(value, (str, bytes, complex)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
