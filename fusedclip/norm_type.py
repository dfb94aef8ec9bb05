"""Parsing and classifying ``norm_type``.

torch accepts anything ``float()`` accepts (numbers, ``'inf'``, ``'2'``). fusedclip accepts the same
values, rejects NaN and unparseable strings with a clear message, and classifies the order into the
reduction the kernels perform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .codes import NormKind


@dataclass(frozen=True)
class NormSpec:
    """A parsed norm order ``p`` and the reduction it needs."""

    p: float
    kind: NormKind

    @property
    def needs_nonempty_tensors(self) -> bool:
        """True when a zero-size tensor has no identity element (torch raises for these)."""
        return self.kind is NormKind.MIN or (self.kind is NormKind.SUM_POW and self.p < 0)

    def __str__(self) -> str:
        return f"{self.p:g}"


_ACCEPTED = "a number (int or float, p > 0, p < 0, 0, inf or -inf) or the string 'inf'"


def parse_norm_type(norm_type: Any) -> NormSpec:
    """Turn ``norm_type`` into a :class:`NormSpec`, raising ``ValueError``/``TypeError`` if invalid."""
    if isinstance(norm_type, NormSpec):
        return norm_type
    if isinstance(norm_type, bool) or norm_type is None:
        raise TypeError(f"norm_type must be {_ACCEPTED}; got {norm_type!r}")
    try:
        p = float(norm_type)
    except (TypeError, ValueError) as error:
        kind = ValueError if isinstance(norm_type, str) else TypeError
        raise kind(f"norm_type must be {_ACCEPTED}; got {norm_type!r}") from error
    if math.isnan(p):
        raise ValueError(f"norm_type must be {_ACCEPTED}; got NaN")
    if p == math.inf:
        return NormSpec(p, NormKind.MAX)
    if p == -math.inf:
        return NormSpec(p, NormKind.MIN)
    if p == 0.0:
        return NormSpec(0.0, NormKind.COUNT)
    return NormSpec(p, NormKind.SUM_POW)
