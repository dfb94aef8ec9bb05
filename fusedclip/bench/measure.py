"""Measuring one call: wall, device and host CPU time; launches; the copy reference; the fp64 norm."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .environment import synchronize
from .metrics import bandwidth_gbps, copy_bytes_moved, median


@dataclass(frozen=True)
class Sample:
    """One call: wall time (device synchronised), device time (CUDA events) and host CPU time."""

    wall_s: float
    device_s: float | None
    cpu_s: float


def time_call(fn: Callable[[], object], device: torch.device) -> tuple[Sample, object]:
    """Run ``fn`` once and time it. The device is synchronised before and after, so the wall time
    covers the host work and the device work of the call and nothing queued before it. Host CPU
    time is the process's CPU time (all threads) until ``fn`` returns: on a GPU that is the host
    side of the call without the wait; on a CPU it is the whole call on every thread it used."""
    cuda = device.type == "cuda"
    if cuda:
        start_event = torch.cuda.Event(enable_timing=True)
        end_event = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
    wall_start = time.perf_counter()
    cpu_start = time.process_time()
    if cuda:
        start_event.record()
    result = fn()
    cpu_end = time.process_time()
    if cuda:
        end_event.record()
        torch.cuda.synchronize(device)
    wall_end = time.perf_counter()
    device_s = start_event.elapsed_time(end_event) / 1e3 if cuda else None
    return Sample(wall_end - wall_start, device_s, cpu_end - cpu_start), result


def timing_seconds(samples: list[Sample], device: torch.device) -> float | None:
    """The time bandwidth is computed from: device time on a GPU, wall time on a CPU."""
    if device.type == "cuda":
        return median([s.device_s for s in samples])
    return median([s.wall_s for s in samples])


@dataclass(frozen=True)
class CopyReference:
    buffer_bytes: int
    seconds: float
    gbps: float


def measure_copy(device: torch.device, buffer_bytes: int, reps: int = 15) -> CopyReference:
    """The fastest of ``reps`` ``dst.copy_(src)`` over a buffer far larger than the cache: the
    ceiling to compare with (a median would let a busy machine lower the ceiling)."""
    elements = max(1, buffer_bytes // 4)
    src = torch.empty(elements, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    samples = [time_call(lambda: dst.copy_(src), device)[0] for _ in range(reps)]
    seconds = min(s.device_s if s.device_s is not None else s.wall_s for s in samples)
    nbytes = elements * 4
    gbps = bandwidth_gbps(copy_bytes_moved(nbytes), seconds)
    assert gbps is not None
    return CopyReference(nbytes, seconds, gbps)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's native start/stop chatter on file descriptor 2 (it would break the
    progress display); Python exceptions still propagate normally."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. captured by a test runner)
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def launch_kind(device: torch.device) -> str:
    """What :func:`count_launches` counts on ``device``, for column headers and notes."""
    return "CUDA kernels" if device.type == "cuda" else "torch ops"


def count_launches(fn: Callable[[], object], device: torch.device) -> int:
    """Launches of one call, from torch.profiler.

    On CUDA: device kernels (memcpy and memset excluded). On a CPU there are no launches, so this
    counts top-level torch operator calls (an operator called inside another is not counted):
    the dispatcher round trips a call makes. Work inside a compiled extension that does not go
    through torch's dispatcher is invisible here.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with _quiet_stderr(), profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = _raw_events(prof)
    if device.type == "cuda":
        kernels = [e for e in events if e.is_device and not e.name.startswith(("Memcpy", "Memset"))]
        if kernels:
            return len(kernels)
        # No device activity recorded (CUPTI unavailable): count the runtime's launch calls instead.
        return sum(1 for e in events if "LaunchKernel" in e.name)
    return _top_level_operators(events)


@dataclass(frozen=True)
class _Event:
    name: str
    is_device: bool
    thread: int
    start_ns: int
    end_ns: int


def _raw_events(prof: object) -> list[_Event]:
    """The profiler's events without building its event tree (which takes seconds for the
    tens of thousands of events a call on 10000 tensors records)."""
    from torch.autograd import DeviceType

    try:
        raw = prof.profiler.kineto_results.events()  # type: ignore[attr-defined]
        return [
            _Event(e.name(), e.device_type() == DeviceType.CUDA, e.start_thread_id(), e.start_ns(), e.end_ns())
            for e in raw
        ]
    except AttributeError:  # pragma: no cover - a torch whose profiler internals moved
        return [
            _Event(
                e.name,
                e.device_type == DeviceType.CUDA,
                e.thread,
                int(e.time_range.start * 1000),
                int(e.time_range.end * 1000),
            )
            for e in prof.events()  # type: ignore[attr-defined]
        ]


def _top_level_operators(events: list[_Event]) -> int:
    """Operators (``aten::*``) not nested inside another operator on the same thread."""
    count = 0
    by_thread: dict[int, list[_Event]] = {}
    for event in events:
        if not event.is_device and event.name.startswith("aten::"):
            by_thread.setdefault(event.thread, []).append(event)
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e.start_ns, -e.end_ns))  # an enclosing op comes first
        open_until: list[int] = []  # end times of the operators enclosing the current point
        for event in thread_events:
            while open_until and open_until[-1] <= event.start_ns:
                open_until.pop()
            if not open_until:
                count += 1
            open_until.append(event.end_ns)
    return count


def reference_norm(grads: list[Tensor], chunk_elements: int = 1 << 24) -> float:
    """The 2-norm of all grads computed in float64. Small grads of one dtype are concatenated, and
    large ones split, into pieces of about ``chunk_elements`` (few ops, no full fp64 copy)."""
    if not grads:
        return 0.0
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad.reshape(-1))
    for flats in by_dtype.values():
        batch: list[Tensor] = []
        batch_elements = 0
        for flat in flats + [None]:  # None flushes the last batch
            if flat is not None and flat.numel() <= chunk_elements:
                batch.append(flat)
                batch_elements += flat.numel()
                if batch_elements < chunk_elements:
                    continue
            if batch:
                total += torch.cat(batch).to(torch.float64).square().sum()
                batch, batch_elements = [], 0
            if flat is not None and flat.numel() > chunk_elements:
                for piece in flat.split(chunk_elements):
                    total += piece.to(torch.float64).square().sum()
    return math.sqrt(total.item())
