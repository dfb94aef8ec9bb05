"""A Clipper's norm history, recorded to a JSONL file without a host synchronisation per step.

    clipper = fusedclip.Clipper(model.named_parameters(), mode="autoclip")
    with fusedclip.NormLog(clipper, "norms.jsonl", flush_every=100) as log:
        for batch in loader:
            loss(batch).backward()
            clipper()
            log.record()  # after every clipper() call; queues device work only
            optimizer.step()
            optimizer.zero_grad()

    python -m fusedclip.report norms.jsonl --out report/   # chart + threshold advice

:meth:`NormLog.record` reads the Clipper's device state (total norm, threshold, clipped and
non-finite counters, per-tensor norms) and writes one row into a preallocated ring buffer of
``flush_every`` rows on the Clipper's device, with device ops only (``topk``, ``where``, ``copy_``
at a slot index the host already knows). Nothing is read back until the buffer is full: then
:meth:`flush` copies the filled rows to the host in one transfer (the one synchronisation per
``flush_every`` steps) and appends them to the file. :meth:`close` (or leaving the ``with`` block)
flushes what is left. Rows still buffered when the process dies are lost; use it as a context
manager or call :meth:`close`.

File format (JSON Lines, one object per line). The first line is a header::

    {"format": "fusedclip.normlog", "version": 1, "mode": "autoclip", "norm_type": 2.0,
     "max_norm": 1.0, "top_k": 5, "params": ["lstm.weight_ih_l0", ...]}

then one line per recorded step::

    {"step": 41, "norm": 3.17, "threshold": 1.0, "clipped": true, "nonfinite": false, "grads": true,
     "top": [["lstm.weight_hh_l0", 2.9], ["lstm.bias_hh_l0", 1.1], ...]}

``norm`` is the Clipper's unrounded float64 total norm before clipping, ``threshold`` the one
applied at that step (``"nan"`` while AutoClip has no finite norm yet; AGC's is its lambda, not a
norm), ``clipped`` whether the Clipper scaled the grads down at that step, ``top`` the ``top_k``
largest per-tensor norms, largest first (NaN ranks first). A step where no parameter had a grad
has ``grads`` false, ``norm`` 0, ``clipped`` false and no ``top``. Non-finite numbers are written as the strings
``"inf"``, ``"-inf"`` and ``"nan"`` so that every line is strict JSON; :func:`read_log` turns them
back into floats. Step numbers are ``Clipper.steps`` before the call (they continue after
``Clipper.load_state_dict``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from .adaptive import Clipper

FORMAT = "fusedclip.normlog"
VERSION = 1
#: columns of a buffered row before the top-k values and indices
_NORM, _THRESHOLD, _CLIPPED, _NONFINITE, _GRADS, _FIXED = 0, 1, 2, 3, 4, 5


def _encode(value: float) -> float | str:
    """A float for strict JSON: non-finite values become ``"inf"``, ``"-inf"`` or ``"nan"``."""
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _decode(value: Any) -> float:
    return float(value)  # float("inf"), float("nan") read the strings back


class NormLog:
    """Records a :class:`~fusedclip.Clipper`'s norm history to ``path`` (JSONL; see the module docstring).

    Args:
        clipper: the Clipper to watch; call :meth:`record` after each of its calls.
        path: the file to write (created or truncated now; the header is written at the first flush).
        flush_every: rows buffered on the device between writes; one host synchronisation each.
        top_k: per-tensor norms kept per step (default: ``clipper.top_k``; at most the number of
            parameters).
    """

    def __init__(
        self, clipper: Clipper, path: str | os.PathLike[str], flush_every: int = 100, top_k: int | None = None
    ) -> None:
        if not isinstance(clipper, Clipper):
            raise TypeError(f"NormLog records a fusedclip.Clipper; got {type(clipper).__name__}")
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an int >= 1; got {flush_every!r}")
        top_k = clipper.top_k if top_k is None else top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0; got {top_k!r}")
        self.clipper = clipper
        self.path = Path(path)
        self.flush_every = flush_every
        self.top_k = min(top_k, len(clipper.named))
        self.closed = False
        self.flushes = 0  # host synchronisations so far
        state = clipper.state
        dtype, device = state["last_norm"].dtype, state["last_norm"].device
        # one float64 row per step: norm, threshold, clipped, nonfinite, grads, k norms, k indices (exact in float64)
        self._rows = torch.zeros((flush_every, _FIXED + 2 * self.top_k), dtype=dtype, device=device)
        self._steps: list[int] = []  # step index of each buffered row (known on the host)
        # counters at the previous record(), to tell what this step changed (device tensors)
        self._prev_clipped = state["clipped_steps"].clone()
        self._prev_counted = state["finite_steps"] + state["nonfinite_steps"]
        self._last_step: int | None = None
        self._header_written = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    # -- per step: device work only ---------------------------------------------------------------
    @torch.no_grad()
    def record(self) -> None:
        """Buffer the Clipper's last step; no host synchronisation (flushes when the buffer is full).

        Call it after every ``clipper()`` call. Skipping steps is allowed: ``clipped`` then says
        whether any step since the previous row was clipped; the other values are the last step's.
        """
        if self.closed:
            raise RuntimeError("NormLog is closed")
        step = self.clipper.steps - 1
        if step < 0:
            raise RuntimeError("record() comes after a clipper() call; the Clipper has not run yet")
        if step == self._last_step:
            raise RuntimeError(f"step {step} is already recorded; call record() once per clipper() call")
        state = self.clipper.state
        counted = state["finite_steps"] + state["nonfinite_steps"]
        had_grads = counted > self._prev_counted  # a step without grads records nothing in the Clipper
        self._prev_counted.copy_(counted)
        clipped = state["clipped_steps"] > self._prev_clipped
        self._prev_clipped.copy_(state["clipped_steps"])
        zero = torch.zeros((), dtype=self._rows.dtype, device=self._rows.device)
        norm = torch.where(had_grads, state["last_norm"], zero)
        parts = [
            norm.reshape(1),
            state["threshold"].reshape(1),
            clipped.to(self._rows.dtype).reshape(1),
            (~torch.isfinite(norm)).to(self._rows.dtype).reshape(1),
            had_grads.to(self._rows.dtype).reshape(1),
        ]
        if self.top_k:
            per_tensor = torch.where(had_grads, state["param_norms"], zero)
            _, indices = torch.topk(torch.nan_to_num(per_tensor, nan=math.inf), self.top_k)
            parts += [per_tensor.gather(0, indices), indices.to(self._rows.dtype)]
            # a step without grads is marked by index -1 (no top tensors)
            parts[-1] = torch.where(had_grads, parts[-1], torch.full_like(parts[-1], -1.0))
        self._rows[len(self._steps)].copy_(torch.cat(parts))
        self._steps.append(step)
        self._last_step = step
        if len(self._steps) == self.flush_every:
            self.flush()

    # -- flushing: one synchronisation ------------------------------------------------------------
    def flush(self) -> None:
        """Write the buffered rows to the file: one device-to-host copy (a synchronisation)."""
        if not self._header_written:
            self._write_lines([json.dumps(self._header())])
            self._header_written = True
        if not self._steps:
            return
        rows = self._rows[: len(self._steps)].cpu().tolist()  # the one synchronisation
        self.flushes += 1
        names = [name for name, _ in self.clipper.named]
        k = self.top_k
        lines = []
        for step, row in zip(self._steps, rows):
            top = []
            for value, index in zip(row[_FIXED : _FIXED + k], row[_FIXED + k :]):
                if index >= 0:
                    top.append([names[int(index)], _encode(value)])
            record = {
                "step": step,
                "norm": _encode(row[_NORM]),
                "threshold": _encode(row[_THRESHOLD]),
                "clipped": bool(row[_CLIPPED]),
                "nonfinite": bool(row[_NONFINITE]),
                "grads": bool(row[_GRADS]),
                "top": top,
            }
            lines.append(json.dumps(record, allow_nan=False))
        self._write_lines(lines)
        self._steps.clear()

    def _header(self) -> dict[str, Any]:
        c = self.clipper
        return {
            "format": FORMAT,
            "version": VERSION,
            "mode": c.mode,
            "norm_type": _encode(c.norm.p),
            "max_norm": c.max_norm,
            "percentile": c.percentile if c.mode == "autoclip" else None,
            "top_k": self.top_k,
            "params": [name for name, _ in c.named],
        }

    def _write_lines(self, lines: list[str]) -> None:
        with self.path.open("a") as f:
            f.write("".join(line + "\n" for line in lines))

    def close(self) -> None:
        """Flush what is buffered and stop recording (idempotent)."""
        if not self.closed:
            self.flush()
            self.closed = True

    def __enter__(self) -> NormLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, rows) of a :class:`NormLog` file, with non-finite numbers back as floats."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} is empty (a NormLog writes at its first flush or on close)")
    header = json.loads(lines[0])
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fusedclip norm log (first line: {lines[0][:80]!r})")
    if header.get("version") != VERSION:
        raise ValueError(f"{path} has norm log version {header.get('version')}; this fusedclip reads {VERSION}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            row = json.loads(line)
            row["norm"] = _decode(row["norm"])
            row["threshold"] = _decode(row["threshold"])
            row["top"] = [(str(name), _decode(value)) for name, value in row["top"]]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a norm log row ({error})") from None
        rows.append(row)
    return header, rows
