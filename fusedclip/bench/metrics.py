"""The byte model and the arithmetic behind every derived number in the report.

Byte model: with N the bytes of all grads, a call must read every grad once to compute the norm
(N); when it clips it must also read and write every grad once more (2N). An unclipped call
therefore must move N bytes and a clipped one 3N, whatever a given implementation actually moves
(torch always scales, so it moves 3N even when the coefficient is 1). Achieved bandwidth is
those bytes over the measured time; its share of a device-to-device copy (which moves 2 bytes per
byte copied: one read, one write) says how close a call comes to the memory system's limit.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

GB = 1e9


def bytes_moved(grad_bytes: int, clipped: bool) -> int:
    """Bytes a call must move: N for the norm pass, plus 2N for the scale pass when it clips."""
    if grad_bytes < 0:
        raise ValueError(f"grad_bytes must be >= 0, got {grad_bytes}")
    return grad_bytes * (3 if clipped else 1)


def copy_bytes_moved(buffer_bytes: int) -> int:
    """Bytes a ``dst.copy_(src)`` of ``buffer_bytes`` moves: one read and one write of each byte."""
    return 2 * buffer_bytes


def bandwidth_gbps(nbytes: int, seconds: float | None) -> float | None:
    """``nbytes / seconds`` in GB/s (10^9 bytes per second); None without a positive time."""
    if seconds is None or not seconds > 0:
        return None
    return nbytes / seconds / GB


def share(achieved: float | None, reference: float | None) -> float | None:
    """``achieved / reference`` (e.g. of copy bandwidth); None when either is missing."""
    if achieved is None or reference is None or not reference > 0:
        return None
    return achieved / reference


def speedup(baseline_seconds: float | None, seconds: float | None) -> float | None:
    """How many times faster than the baseline (> 1: faster); None when either is missing."""
    if baseline_seconds is None or seconds is None or not seconds > 0:
        return None
    return baseline_seconds / seconds


def relative_error(value: float, reference: float) -> float:
    """``|value - reference| / |reference|``; 0 when both are 0, inf when only the reference is."""
    if math.isnan(value) or math.isnan(reference):
        return math.nan
    if reference == 0:
        return 0.0 if value == 0 else math.inf
    if math.isinf(value) or math.isinf(reference):
        return 0.0 if value == reference else math.inf
    return abs(value - reference) / abs(reference)


def median(values: Sequence[float | None]) -> float | None:
    """Median of the values present; None when there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
