"""A progress display on stderr: rich when installed, else tqdm, else one plain line per step."""

from __future__ import annotations

import sys
import time
from typing import Protocol


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def step(self, description: str) -> None: ...
    def advance(self) -> None: ...
    def stop(self) -> None: ...


class RichProgress:
    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description:<36}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = None

    def start(self, total: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task("starting", total=total)

    def step(self, description: str) -> None:
        self._progress.update(self._task, description=description)

    def advance(self) -> None:
        self._progress.advance(self._task)

    def stop(self) -> None:
        self._progress.stop()


class TqdmProgress:
    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bar = None

    def start(self, total: int) -> None:
        self._bar = self._tqdm(total=total, file=sys.stderr, unit="cell")

    def step(self, description: str) -> None:
        self._bar.set_description_str(description)

    def advance(self) -> None:
        self._bar.update(1)

    def stop(self) -> None:
        self._bar.close()


class PlainProgress:
    """One line per step: works in logs and on terminals without any extra package."""

    def __init__(self) -> None:
        self._total = 0
        self._done = 0
        self._start = 0.0

    def start(self, total: int) -> None:
        self._total, self._done, self._start = total, 0, time.perf_counter()

    def step(self, description: str) -> None:
        elapsed = time.perf_counter() - self._start
        print(f"[{self._done + 1}/{self._total} {elapsed:5.0f}s] {description}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self._done += 1

    def stop(self) -> None:
        pass


class NoProgress:
    def start(self, total: int) -> None: ...
    def step(self, description: str) -> None: ...
    def advance(self) -> None: ...
    def stop(self) -> None: ...


def make_progress(enabled: bool = True) -> tuple[Progress, str | None]:
    """The best display available, and a note when it is a fallback."""
    if not enabled:
        return NoProgress(), None
    if not sys.stderr.isatty():  # a log file: lines, not a redrawn bar
        return PlainProgress(), None
    try:
        return RichProgress(), None
    except ImportError:
        pass
    try:
        return TqdmProgress(), None
    except ImportError:
        pass
    return (
        PlainProgress(),
        "rich is not installed: plain progress lines (pip install 'fusedclip[bench]' for a progress bar)",
    )
