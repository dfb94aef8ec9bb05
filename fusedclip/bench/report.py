"""The Markdown report: a headline paragraph, a header saying what ran where, a speedup summary,
and per-set details; and the shorter text the terminal gets (headline, summary, file paths)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from .load import reading_from_dict
from .metrics import bytes_moved
from .providers import BASELINE
from .results import Results, Row
from .suites import SUITES


def fmt_number(value: float | None, digits: int = 3) -> str:
    """``digits`` significant digits without exponent notation for times and rates; "—" for None."""
    if value is None:
        return "—"
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:.0f}"
    return f"{value:#.{digits}g}".rstrip(".")  # '#' keeps trailing zeros: 2.00, not 2


def fmt_speedup(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def fmt_share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def fmt_error(value: float | None) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "0"
    if value != value or value == float("inf"):
        return str(value)
    return f"{value:.1e}"


def _table(header: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def providers_measured(results: Results) -> list[str]:
    order = list(results.meta.get("providers", {}))
    names = {row.provider for row in results.rows}
    return [name for name in order if name in names] + sorted(names - set(order))


def cells_of(results: Results) -> dict[tuple[str, str], dict[tuple[str, str], Row]]:
    """(set, dtype) -> (case, provider) -> row, in the order the rows were measured."""
    cells: dict[tuple[str, str], dict[tuple[str, str], Row]] = {}
    for row in results.rows:
        cells.setdefault((row.set, row.dtype), {})[(row.case, row.provider)] = row
    return cells


def _short_name(set_name: str) -> str:
    suite = SUITES.get(set_name)
    return (suite.short or suite.name) if suite else set_name


def _join(words: list[str]) -> str:
    if len(words) <= 2:
        return " and ".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _speedup_phrase(values: list[float], when: str, aside: str = "") -> str:
    low, high = min(values), max(values)
    if len(values) == 1:
        return f"**speedup {low:.2f}× {when}**" + (f" ({aside})" if aside else "")
    mean = math.exp(sum(math.log(v) for v in values) / len(values))
    aside = f"; {aside}" if aside else ""
    return f"**speedup {low:.2f}× to {high:.2f}× {when}** (geometric mean {mean:.2f}×{aside})"


def scaled_sets(results: Results) -> list[str]:
    return list(dict.fromkeys(row.set for row in results.rows if row.ok and row.scale != "full"))


def headline(results: Results) -> str:
    """One paragraph: on what, which sets, fusedclip's speedup over torch clipped and unclipped, and
    whether the machine was busy."""
    meta = results.meta
    fused = meta.get("fusedclip_provider") or next(
        (p for p in providers_measured(results) if p.startswith("fusedclip-")), None
    )
    measured = [row for row in results.rows if row.ok]
    sets = list(dict.fromkeys(row.set for row in measured))
    dtypes = list(dict.fromkeys(row.dtype for row in measured))
    parts = []
    speed = {
        case: [r.speedup for r in measured if r.provider == fused and r.case == case and r.speedup]
        for case in ("clipped", "unclipped")
    }
    backend = fused.removeprefix("fusedclip-") if fused else None
    if speed["clipped"] or speed["unclipped"]:
        clauses = []
        if speed["clipped"]:
            clauses.append(_speedup_phrase(speed["clipped"], "when clipping"))
        if speed["unclipped"]:
            clauses.append(_speedup_phrase(speed["unclipped"], "when the norm is under `max_norm`", "nothing to scale"))
        parts.append(
            f"On {meta['device_name']}, `fusedclip.clip_grad_norm_` (automatic backend: `{backend}`) against"
            f" `torch.nn.utils.clip_grad_norm_`: {' and '.join(clauses)}; speedup = torch's time / fusedclip's,"
            " above 1× fusedclip is faster."
        )
    else:
        parts.append(f"On {meta['device_name']}, no fusedclip call was measured against torch (see below).")
    if sets:
        parts.append(
            f"Gradient sets: {_join([_short_name(s) for s in sets])}, in {_join(dtypes)}"
            + (f"; {_scaled_phrase(results)}." if scaled_sets(results) else ".")
        )
    skipped = list(
        dict.fromkeys(
            f"{r.set} {r.dtype}" for r in results.rows if r.status == "skipped" and "time budget" in (r.reason or "")
        )
    )
    if skipped:
        shown = _join(skipped) if len(skipped) <= 4 else f"{len(skipped)} set/dtype pairs"
        parts.append(f"Not measured for lack of time: {shown} (`--time-budget 0` measures everything).")
    load = reading_from_dict(meta.get("load"))
    if load is not None:
        parts.append(load.describe)
    if meta.get("thread_note"):
        parts.append(meta["thread_note"])
    duration = meta.get("duration_s")
    when = f"Measured {meta.get('started', '')}" + (f" in {duration:.0f} s" if duration is not None else "")
    full = (meta.get("options") or {}).get("full")
    parts.append(when + ("." if full else "; `--full` runs the complete sweep."))
    return " ".join(parts)


def _scaled_phrase(results: Results) -> str:
    budget = (results.meta.get("options") or {}).get("budget_bytes")
    names = _join([_short_name(s) for s in scaled_sets(results)])
    limit = f" to at most {budget / 2**20:.0f} MiB" if budget else ""
    return f"{names} scaled down{limit} (fewer layers, real tensor shapes; the tensors column shows how many)"


def header_lines(results: Results, regenerate: str | None = None) -> list[str]:
    meta = results.meta
    lines = []
    if regenerate:
        lines += [f"<!-- Regenerate: {regenerate} -->", ""]
    lines += [f"# fusedclip benchmark: {meta['device_name']}", "", headline(results), ""]
    copy = meta["copy"]
    info = [
        ["device", f"{meta['device']}: {meta['device_name']}"],
        ["software", f"torch {meta['torch']}, fusedclip {meta['fusedclip']}, Python {meta['python']}"],
        ["run", f"{meta['started']}, {meta['duration_s']:.0f} s: `{meta['command']}`"],
        [
            "copy bandwidth",
            f"{copy['gbps']:.1f} GB/s (fastest `dst.copy_(src)` of {copy['buffer_bytes'] / 2**20:.0f} MiB, same run)",
        ],
        ["timing", meta["timing"]],
    ]
    load = reading_from_dict(meta.get("load"))
    if load is not None:
        averages = ", ".join(
            f"{value:g} at the {when}"
            for value, when in ((load.load_average_start, "start"), (load.load_average_end, "end"))
            if value is not None
        )
        info.append(["machine load", load.describe.replace("**", "") + (f" (1-minute load average {averages})")])
    lines += _table(["", ""], info, ["l", "l"]) + [""]
    lines.append("Providers (baseline first):")
    lines.append("")
    for name, provider in meta["providers"].items():
        if provider["available"] is True:
            lines.append(f"- `{name}`: {provider['label']}")
    missing = [(n, p) for n, p in meta["providers"].items() if p["available"] is not True]
    if missing:
        lines.append("")
        lines.append("Not measured here:")
        lines.append("")
        lines += [f"- `{name}`: {provider['available']}" for name, provider in missing]
    return lines + [""]


def _both_cases(cell: dict[tuple[str, str], Row], provider: str, value: Callable[[Row], str]) -> str:
    """``clipped / unclipped`` values of one provider ("—" where it was not measured)."""
    parts = []
    for case in ("clipped", "unclipped"):
        row = cell.get((case, provider))
        parts.append("—" if row is None or not row.ok else value(row))
    return " / ".join(parts)


def tensors_label(row: Row) -> str:
    """The tensors measured, with the full set's count when the set was scaled down ("24 of 148")."""
    suite = SUITES.get(row.set)
    if row.scale == "full" or suite is None or row.tensors == suite.full().tensors:
        return str(row.tensors)
    return f"{row.tensors} of {suite.full().tensors}"


def summary_lines(results: Results) -> list[str]:
    providers = [p for p in providers_measured(results) if p != BASELINE]
    lines = [
        f"## Speedup over `{BASELINE}`",
        "",
        f"Median wall time per call of `{BASELINE}` in ms, and each provider's speedup over it"
        " (> 1 is faster), as clipped / unclipped.",
        "",
    ]
    header = ["set", "tensors", "scale", "dtype", f"{BASELINE} ms"] + [f"`{p}`" for p in providers]
    body = []
    for (set_name, dtype), cell in cells_of(results).items():
        any_row = next(iter(cell.values()))
        entries = [set_name, tensors_label(any_row), any_row.scale, dtype]
        entries.append(_both_cases(cell, BASELINE, lambda r: fmt_number(r.wall_ms)))
        entries += [_both_cases(cell, p, lambda r: fmt_speedup(r.speedup)) for p in providers]
        body.append(entries)
    lines += _table(header, body, ["l", "r", "l", "l", "r"] + ["r"] * len(providers))
    return lines + [""]


def detail_lines(results: Results) -> list[str]:
    meta = results.meta
    gpu = meta["device"].startswith("cuda")
    launches = meta["launches_counted"]
    counted = any(row.launches is not None for row in results.rows)
    lines = ["## Details", ""]
    by_set: dict[str, list[Row]] = defaultdict(list)
    for row in results.rows:
        by_set[row.set].append(row)
    for set_name, rows in by_set.items():
        suite = SUITES.get(set_name)
        title = suite.title if suite else set_name
        full = suite.full() if suite else None
        size = f"; full set: {full.tensors} tensors, {full.elements / 1e6:.1f} M elements" if full else ""
        lines += [f"### {set_name}", "", f"{title}{size}.", ""]
        header = ["dtype", "scale", "case", "provider", "wall ms"]
        header += ["device ms"] if gpu else []
        header += ["host CPU ms", "GB/s", "of copy"] + ([f"{launches}/call"] if counted else [])
        header += ["speedup", "norm rel. err"]
        body = []
        for row in rows:
            if not row.ok:
                continue
            entries = [row.dtype, row.scale, row.case, f"`{row.provider}`", fmt_number(row.wall_ms)]
            entries += [fmt_number(row.device_ms)] if gpu else []
            entries += [fmt_number(row.cpu_ms), fmt_number(row.gbps), fmt_share(row.copy_share)]
            entries += (["—" if row.launches is None else str(row.launches)] if counted else []) + [
                fmt_speedup(row.speedup),
                fmt_error(row.norm_rel_err),
            ]
            body.append(entries)
        lines += _table(header, body, ["l", "l", "l", "l"] + ["r"] * (len(header) - 4)) + [""]
        lines += _not_measured(rows)
    return lines


def _not_measured(rows: list[Row]) -> list[str]:
    grouped: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for row in rows:
        if not row.ok:
            grouped[(row.provider, row.status, row.reason or "")].append(f"{row.dtype} {row.case}")
    if not grouped:
        return []
    lines = ["Not measured:", ""]
    for (provider, status, reason), where in grouped.items():
        lines.append(f"- `{provider}` ({', '.join(where)}): {status}: {reason}")
    return lines + [""]


def notes_lines(results: Results) -> list[str]:
    meta = results.meta
    example = bytes_moved(1, True)
    device_ms = (
        [
            "- **device ms**: median time between CUDA events recorded before and after the call: the device"
            " timeline of the call, including gaps where the device waits for the host to launch."
        ]
        if meta["device"].startswith("cuda")
        else []
    )
    lines = [
        "## How to read this",
        "",
        "- **wall ms**: median wall-clock time of one call, the device synchronised before and after, so it"
        " includes the host work (Python, planning, launches) and the device work.",
        *device_ms,
        "- **host CPU ms**: median process CPU time (all threads) until the call returns. On a CPU the call"
        " runs on every intra-op thread, so it can exceed the wall time; on a GPU it is the host side only.",
        f"- **GB/s**: bytes the call must move over the median {meta['bandwidth_time']} time. Byte model: with N"
        f" the bytes of all grads, the norm pass reads N and a clipping call also reads and writes every grad"
        f" (2N): {example}N when clipped, N when not. torch scales even when the coefficient is 1, so it moves"
        " 3N either way; the model counts what the call must move, not what an implementation chooses to.",
        "- **of copy**: that bandwidth as a share of the `copy_` bandwidth above (2 bytes counted per byte"
        " copied; on most CPUs the copy's write first reads the destination line too, so in-place work like"
        " clipping can exceed 100%).",
        *(
            [f"- **{meta['launches_counted']}/call**: {meta['launches_note']}"]
            if any(row.launches is not None for row in results.rows)
            else []
        ),
        "- **speedup**: the baseline's median wall time over this provider's, measured in the same rounds.",
        "- **norm rel. err**: |returned norm − fp64 norm of the same grads| / fp64 norm. bf16/fp16 norms are"
        " returned in bf16/fp16, as torch does, so their error is at least that dtype's rounding.",
        "- **scale**: sets larger than the run's byte budget keep real tensor shapes: they drop whole layers,"
        " then the embeddings, then the last tensors of the one layer left; the huge tensor is shortened.",
        "- **cases**: random grads with a total norm of 100 (unclipped) or the same grads times 4 (clipped,"
        " coefficient about 0.5; exact in every dtype); max_norm is 200 in both, so one torch.compile graph"
        " serves both cases.",
    ]
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    return lines + [""]


def render_terminal(results: Results, written: dict[str, Path], missing_chart: str | None = None) -> str:
    """What the terminal gets: the headline, the speedup table and where the files are."""
    meta = results.meta
    lines = [f"fusedclip benchmark: {meta['device_name']}", "", headline(results), ""]
    lines += summary_lines(results)[2:]  # the table with its one-line explanation
    labels = {"report": "full report", "data": "data", "chart": "chart", "json": "JSON", "csv": "CSV", "png": "chart"}
    if written:
        lines.append("Files:")
        lines += [f"  {labels.get(kind, kind) + ':':<13} {path}" for kind, path in written.items()]
    if missing_chart:
        lines.append(f"  chart:        not written: {missing_chart}")
    return "\n".join(lines).rstrip() + "\n"


def render_markdown(results: Results, regenerate: str | None = None) -> str:
    lines = header_lines(results, regenerate)
    lines += summary_lines(results)
    lines += detail_lines(results)
    lines += notes_lines(results)
    return "\n".join(lines).rstrip() + "\n"
