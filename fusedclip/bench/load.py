"""Was the machine busy? Other processes' CPU use during the run, measured, not guessed.

On Linux the meter reads the CPU time every process has used (``/proc/stat``) at the start and at
the end of the run and subtracts this process's own CPU time: what is left is other work, in CPUs
(1.0 = one CPU busy all the time). Where ``/proc/stat`` is missing or counts other CPUs than this
process may use, the 1-minute load average at the start stands in for it. Other work on the CPUs
makes every timing on a CPU slower and noisier, so the report says so, in its first paragraph.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_threshold(cpus: int) -> float:
    """Other work, in CPUs, from which the machine counts as busy: half a CPU, or a quarter of them."""
    return max(0.5, 0.25 * cpus)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (``/proc/stat``), when it counts exactly the
    CPUs this process may run on; else None."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            lines = stat.read().splitlines()
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    per_cpu = [line for line in lines if line.startswith("cpu") and line[3:4].isdigit()]
    if not lines or not lines[0].startswith("cpu ") or len(per_cpu) != usable_cpus():
        return None
    fields = [int(value) for value in lines[0].split()[1:]]
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)
    # guest time is already counted in user time
    busy -= sum(fields[8:10]) if len(fields) >= 10 else 0
    return busy / ticks


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), start-up and imports included; else None."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as uptime:
            up = float(uptime.read().split()[0])
        return max(0.0, up - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class LoadReading:
    cpus: int
    load_average_start: float | None
    load_average_end: float | None
    other_cpus: float | None  # other processes' average CPU use during the run; None: not measurable
    busy: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def describe(self) -> str:
        """One sentence for the report: what was measured and what it means."""
        if self.other_cpus is not None:
            measured = f"other processes used {self.other_cpus:.1f} of {self.cpus} CPUs on average during the run"
        elif self.load_average_start is not None:
            measured = f"the 1-minute load average was {self.load_average_start:g} on {self.cpus} CPUs at the start"
        else:
            return "The machine's load could not be measured."
        if self.busy:
            return (
                f"**The machine was busy**: {measured}, so every timing is slower and noisier than on an idle"
                " machine; rerun when it is idle for numbers to quote."
            )
        return f"The machine was quiet: {measured}."


def reading_from_dict(data: dict[str, Any] | None) -> LoadReading | None:
    if not data:
        return None
    try:
        return LoadReading(**data)
    except TypeError:
        return None


def others_now(window_s: float = 0.3) -> float | None:
    """Other processes' CPU use (in CPUs) over a short window, this process idle meanwhile."""
    busy, own = _busy_seconds(), _own_seconds()
    if busy is None:
        return None
    start = time.perf_counter()
    time.sleep(window_s)
    busy_now, elapsed = _busy_seconds(), time.perf_counter() - start
    if busy_now is None or elapsed <= 0:
        return None
    return round(max(0.0, (busy_now - busy) - (_own_seconds() - own)) / elapsed, 2)


def threads_for(cpus: int, others: float | None, current: int) -> int:
    """Threads to run with: all of ``current`` on a quiet machine; on a busy one, the CPUs the other
    processes leave free (at least 1). A CPU shared with other work makes every multithreaded call
    wait for its slowest thread: torch's clip on a busy 2-core machine was 10x slower with 2
    threads than with 1."""
    if others is None or others < busy_threshold(cpus):
        return current
    return max(1, min(current, round(cpus - others)))


class LoadMeter:
    """Start it before the run, read it after."""

    def __init__(self) -> None:
        self.cpus = usable_cpus()
        self.load_average_start = _load_average()
        self._wall = time.perf_counter()
        self._busy = _busy_seconds()
        self._own = _own_seconds()

    def read(self) -> LoadReading:
        wall = time.perf_counter() - self._wall
        busy_now = _busy_seconds()
        other = None
        if self._busy is not None and busy_now is not None and wall > 0.5:
            other = max(0.0, (busy_now - self._busy) - (_own_seconds() - self._own)) / wall
            other = round(other, 2)
        load_end = _load_average()
        threshold = busy_threshold(self.cpus)
        if other is not None:
            busy = other >= threshold
        else:  # before the run starts, all of the load average is someone else's
            busy = self.load_average_start is not None and self.load_average_start >= threshold
        return LoadReading(self.cpus, self.load_average_start, load_end, other, busy)
