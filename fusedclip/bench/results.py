"""The results of a run as data: one row per (set, dtype, case, provider), and the run's metadata.

The JSON file is ``{"schema": SCHEMA, "meta": {...}, "rows": [...]}``; the CSV file holds the same
rows with the columns of :data:`ROW_FIELDS`. Times are in milliseconds, bandwidth in GB/s (10^9
bytes per second), shares and relative errors as plain fractions.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

SCHEMA = "fusedclip-bench/1"

STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"
STATUS_FAILED = "failed"


@dataclass
class Row:
    """One provider on one gradient set in one dtype, clipped or not."""

    set: str
    scale: str
    tensors: int
    elements: int
    dtype: str
    case: str  # "clipped" or "unclipped"
    provider: str
    status: str = STATUS_OK
    reason: str | None = None
    grad_bytes: int = 0  # N: bytes of all grads
    bytes_moved: int = 0  # what the call must move: N, or 3N when it clips
    wall_ms: float | None = None  # median wall time per call, device synchronised
    device_ms: float | None = None  # median device time (CUDA events); None on a CPU
    cpu_ms: float | None = None  # median host CPU time per call (all threads)
    gbps: float | None = None  # bytes_moved over device time (GPU) or wall time (CPU)
    copy_share: float | None = None  # gbps / the copy bandwidth of the same run
    launches: int | None = None  # CUDA kernels (GPU) or top-level torch ops (CPU) per call
    speedup: float | None = None  # baseline wall time / this wall time
    norm_rel_err: float | None = None  # |returned norm - fp64 norm| / fp64 norm
    reps: int = 0
    copies: int = 0
    compile_s: float | None = None  # time of the compiling first call (torch.compile only)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


ROW_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Row))


@dataclass
class Results:
    meta: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "meta": self.meta, "rows": [_json_row(row) for row in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=ROW_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({key: "" if value is None else value for key, value in asdict(row).items()})
        return out.getvalue()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Results:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} file (schema: {data.get('schema')!r})")
        rows = [Row(**{key: _from_json_value(value) for key, value in row.items()}) for row in data["rows"]]
        return cls(dict(data["meta"]), rows)


def _json_row(row: Row) -> dict[str, Any]:
    # JSON has no inf/NaN: write them as strings so the file stays standard JSON.
    return {key: _to_json_value(value) for key, value in asdict(row).items()}


def _to_json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _from_json_value(value: Any) -> Any:
    if value in ("inf", "-inf", "nan"):
        return float(value)
    return value
