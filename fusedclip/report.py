"""Threshold advice from a recorded norm history (a :class:`fusedclip.NormLog` file).

    python -m fusedclip.report norms.jsonl [--out DIR]

writes ``DIR/<log name>.png`` (the norm over steps with the threshold applied, clipped steps,
spikes and non-finite steps marked; the distribution of norms with the candidate thresholds; the
tensors with the largest norms) and ``DIR/<log name>.md``: the clipped fraction, spikes,
non-finite steps, the top tensors, and a table of the fraction of steps each candidate threshold
(the p50, p75, p90, p95 and p99 of the finite norms, and the current threshold) would have clipped.

Definitions, so that the numbers can be checked by hand:

* percentiles are over the finite norms of the steps that had grads, with linear interpolation
  between order statistics (numpy's default ``method="linear"``);
* a threshold ``t`` "would clip" a step when the step's finite norm is above ``t``; fractions are of
  the finite steps (a non-finite norm is zeroed or NaN whatever the threshold);
* a spike is a finite norm more than ``--spike-factor`` (5) times the median of the previous
  ``--spike-window`` (50) finite norms, once at least 10 of them exist;
* the current threshold is the one applied at the last recorded step (``max_norm`` in mode
  ``"norm"``); AGC's threshold is a ratio to weight norms, not a norm, so it has no row.

The candidates are computed on the norms this run saw: they describe this trajectory, which the
clipping that was applied has already shaped. Only matplotlib (for the chart) is needed beyond
fusedclip; it is imported here, never by fusedclip's core.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .history import read_log

PERCENTILES = (50, 75, 90, 95, 99)
SPIKE_FACTOR, SPIKE_WINDOW, SPIKE_MIN_HISTORY = 5.0, 50, 10
#: norms spanning more than this ratio get a log-scale axis
LOG_SCALE_RATIO = 30.0


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linear interpolation (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Candidate:
    label: str
    threshold: float
    clipped_fraction: float  # of the finite steps


@dataclass
class TensorStats:
    name: str
    largest_steps: int  # steps where it had the largest norm
    top_steps: int  # steps where it was among the top k
    median_norm: float  # median of its finite norms over those steps
    max_norm: float


@dataclass
class Analysis:
    header: dict[str, Any]
    steps: list[int]  # steps that had grads
    norms: list[float]
    thresholds: list[float]
    clipped: list[bool]
    nonfinite_steps: list[int]
    spike_steps: list[int]
    finite_norms: list[float]
    candidates: list[Candidate]
    current_threshold: float | None
    current_rank: float | None  # percent of finite norms at or below the current threshold
    tensors: list[TensorStats] = field(default_factory=list)
    no_grad_steps: int = 0

    @property
    def clipped_fraction(self) -> float:
        return sum(self.clipped) / len(self.clipped) if self.clipped else math.nan


def _spikes(steps: list[int], norms: list[float], factor: float, window: int) -> list[int]:
    spikes, previous = [], []
    for step, norm in zip(steps, norms):
        if not math.isfinite(norm):
            continue
        if len(previous) >= SPIKE_MIN_HISTORY and norm > factor * statistics.median(previous[-window:]):
            spikes.append(step)
        previous.append(norm)
    return spikes


def _tensor_stats(rows: list[dict[str, Any]]) -> list[TensorStats]:
    largest: dict[str, int] = defaultdict(int)
    seen: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        for rank, (name, value) in enumerate(row["top"]):
            seen[name].append(value)
            if rank == 0:
                largest[name] += 1
    stats = []
    for name, values in seen.items():
        finite = [v for v in values if math.isfinite(v)]
        stats.append(
            TensorStats(
                name=name,
                largest_steps=largest[name],
                top_steps=len(values),
                median_norm=statistics.median(finite) if finite else math.nan,
                max_norm=max(finite) if finite else math.nan,
            )
        )
    stats.sort(key=lambda s: (-s.largest_steps, -(s.median_norm if math.isfinite(s.median_norm) else -1.0)))
    return stats


def analyse(
    header: dict[str, Any],
    rows: list[dict[str, Any]],
    spike_factor: float = SPIKE_FACTOR,
    spike_window: int = SPIKE_WINDOW,
) -> Analysis:
    """Everything the report shows, from :func:`fusedclip.read_log`'s ``(header, rows)``."""
    with_grads = [r for r in rows if r.get("grads", True)]
    steps = [r["step"] for r in with_grads]
    norms = [r["norm"] for r in with_grads]
    finite = [n for n in norms if math.isfinite(n)]
    candidates = [Candidate(f"p{q}", percentile(finite, q), 0.0) for q in PERCENTILES]
    current = None
    if header.get("mode") != "agc" and with_grads and math.isfinite(with_grads[-1]["threshold"]):
        current = with_grads[-1]["threshold"]  # inf (ZClip, no spike) or NaN (AutoClip, no norm yet): no cap
    if current is not None:
        label = "current (max_norm)" if header.get("mode") == "norm" else "current (last step's threshold)"
        candidates.append(Candidate(label, current, 0.0))
    for c in candidates:
        c.clipped_fraction = sum(n > c.threshold for n in finite) / len(finite) if finite else math.nan
    rank = None
    if current is not None and finite:
        rank = 100.0 * sum(n <= current for n in finite) / len(finite)
    return Analysis(
        header=header,
        steps=steps,
        norms=norms,
        thresholds=[r["threshold"] for r in with_grads],
        clipped=[bool(r["clipped"]) for r in with_grads],
        nonfinite_steps=[s for s, n in zip(steps, norms) if not math.isfinite(n)],
        spike_steps=_spikes(steps, norms, spike_factor, spike_window),
        finite_norms=finite,
        candidates=candidates,
        current_threshold=current,
        current_rank=rank,
        tensors=_tensor_stats(with_grads),
        no_grad_steps=len(rows) - len(with_grads),
    )


def _g(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _step_list(steps: list[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, steps[:limit]))
    return shown + (f", ... ({len(steps) - limit} more)" if len(steps) > limit else "")


def markdown(a: Analysis, log_name: str, png_name: str | None) -> str:
    """The short Markdown summary."""
    h = a.header
    n, f = len(a.norms), len(a.finite_norms)
    lines = [f"# Gradient norm report: `{log_name}`", ""]
    if not n:
        return "\n".join(lines + ["No recorded step had grads.", ""])
    mode = f"Clipper mode `{h.get('mode')}`, norm_type {h.get('norm_type')}"
    if h.get("mode") == "autoclip":
        mode += f", percentile {h.get('percentile')}"
    lines.append(f"{mode}; {n} steps recorded (steps {a.steps[0]}-{a.steps[-1]}), {f} with a finite norm.")
    if a.no_grad_steps:
        lines.append(f"{a.no_grad_steps} further recorded steps had no grads and are left out.")
    lines.append("")
    how = "at least one unit capped by AGC" if h.get("mode") == "agc" else "norm above the threshold applied"
    lines.append(f"- clipped as run ({how}): **{a.clipped_fraction:.1%}** of steps")
    if f:
        lines.append(
            f"- finite norms: median {_g(percentile(a.finite_norms, 50))}, p99 {_g(percentile(a.finite_norms, 99))},"
            f" max {_g(max(a.finite_norms))}, min {_g(min(a.finite_norms))}"
        )
    nonfinite = f" (steps {_step_list(a.nonfinite_steps)})" if a.nonfinite_steps else ""
    lines.append(f"- non-finite norms: {len(a.nonfinite_steps)}{nonfinite}")
    lines.append(
        f"- spikes (finite norm > {SPIKE_FACTOR:g}x the median of the previous {SPIKE_WINDOW} finite norms):"
        f" {len(a.spike_steps)}" + (f" (steps {_step_list(a.spike_steps)})" if a.spike_steps else "")
    )
    lines += ["", "## Candidate thresholds", ""]
    lines += [f"| threshold | value | would clip (of {f} finite steps) |", "|---|---:|---:|"]
    for c in a.candidates:
        lines.append(f"| {c.label} | {_g(c.threshold)} | {c.clipped_fraction:.1%} |")
    lines.append("")
    if a.current_threshold is not None and a.current_rank is not None:
        lines.append(
            f"The current threshold {_g(a.current_threshold)} lies at the p{a.current_rank:.0f} of the finite norms:"
            f" a fixed threshold there clips {100 - a.current_rank:.0f}% of these steps."
        )
    elif h.get("mode") != "agc":
        lines.append(
            f"The last step's threshold was {_g(a.thresholds[-1])} (no cap at that step),"
            " so the table has no current row."
        )
    else:
        lines.append(
            "AGC's threshold is a ratio to weight norms, not a norm: the candidates are for a fixed norm threshold."
        )
    lines.append(
        "A norm above a threshold is scaled down to it; the norms are those of this run,"
        " already shaped by its clipping."
    )
    if a.tensors:
        lines += ["", f"## Tensors with the largest gradient norms (top {h.get('top_k')} recorded per step)", ""]
        lines += [
            "| tensor | steps largest | steps in top k | median norm there | max norm |",
            "|---|---:|---:|---:|---:|",
        ]
        for t in a.tensors[:10]:
            lines.append(f"| `{t.name}` | {t.largest_steps} | {t.top_steps} | {_g(t.median_norm)} | {_g(t.max_norm)} |")
    if png_name:
        lines += ["", f"![gradient norms]({png_name})"]
    return "\n".join(lines) + "\n"


def plot(a: Analysis, path: Path, title: str) -> None:
    """The chart (matplotlib, imported here only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    positive = [v for v in a.finite_norms if v > 0]
    log_scale = bool(positive) and max(positive) / min(positive) > LOG_SCALE_RATIO
    fig = plt.figure(figsize=(12, 8.5))
    grid = fig.add_gridspec(2, 2, height_ratios=(1.5, 1), width_ratios=(1, 1), hspace=0.35, wspace=0.35)
    ax = fig.add_subplot(grid[0, :])
    hist = fig.add_subplot(grid[1, 0])
    bars = fig.add_subplot(grid[1, 1])

    plotted = [v if math.isfinite(v) and (v > 0 or not log_scale) else math.nan for v in a.norms]
    ax.plot(a.steps, plotted, color="tab:blue", linewidth=0.9, label="total norm (before clipping)", zorder=2)
    if h_mode(a) != "agc":
        ax.step(a.steps, a.thresholds, where="mid", color="black", linestyle="--", linewidth=1.1, zorder=3,
                label="threshold applied" + ("" if all(map(math.isfinite, a.thresholds)) else " (gaps: no cap)"))
    by_step = dict(zip(a.steps, a.norms))
    if a.spike_steps:
        ax.scatter(a.spike_steps, [by_step[s] for s in a.spike_steps], marker="^", s=40, color="tab:red", zorder=4,
                   label=f"spike (> {SPIKE_FACTOR:g}x running median)")
    for i, s in enumerate(a.nonfinite_steps):
        label = "non-finite norm" if i == 0 else None
        ax.axvline(s, color="tab:purple", linewidth=0.8, alpha=0.6, zorder=1, label=label)
    clipped_steps = [s for s, c in zip(a.steps, a.clipped) if c]
    if clipped_steps:  # a rug along the bottom edge: where the grads were scaled down
        ax.scatter(clipped_steps, [0.015] * len(clipped_steps), transform=ax.get_xaxis_transform(), marker="|", s=30,
                   color="tab:orange", linewidth=0.8, zorder=3, label=f"clipped step ({a.clipped_fraction:.0%})")
    if log_scale:
        ax.set_yscale("log")
    low, high = ax.get_ylim()  # room below the data for the rug of clipped steps
    ax.set_ylim(low / (high / low) ** 0.08 if log_scale else low - 0.08 * (high - low), high)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm" + (" (log scale)" if log_scale else ""))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=5, frameon=False, fontsize=9)
    ax.margins(x=0.01)

    if a.finite_norms:
        values = [v for v in a.finite_norms if v > 0] if log_scale else a.finite_norms
        if log_scale:
            lo, hi = math.log10(min(values)), math.log10(max(values))
            bins = [10 ** (lo + (hi - lo) * i / 40) for i in range(41)] if hi > lo else 40
            hist.set_xscale("log")
        else:
            bins = 40
        hist.hist(values, bins=bins, color="tab:blue", alpha=0.55)
        colors = plt.get_cmap("viridis")
        for i, c in enumerate(a.candidates):
            current = c.label.startswith("current")
            hist.axvline(c.threshold, color="black" if current else colors(i / max(len(PERCENTILES), 1)),
                         linestyle="--" if current else "-", linewidth=1.4 if current else 1.1,
                         label=f"{c.label.split(' ')[0]} = {c.threshold:.3g}: clips {c.clipped_fraction:.0%}")
        hist.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)
    hist.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    hist.set_xlabel("gradient norm (finite steps)")
    hist.set_ylabel("steps")
    hist.set_title("candidate thresholds", fontsize=10)

    shown = a.tensors[:8][::-1]
    if shown:
        y = range(len(shown))
        bars.barh(list(y), [t.median_norm for t in shown], color="tab:green", alpha=0.7)
        bars.set_yticks(list(y), [_short(t.name) for t in shown], fontsize=8)
        for i, t in zip(y, shown):
            if t.largest_steps:
                bars.annotate(f"largest at {t.largest_steps}/{len(a.norms)} steps", (t.median_norm, i), xytext=(3, 0),
                              textcoords="offset points", va="center", fontsize=8)
        medians = [t.median_norm for t in shown if math.isfinite(t.median_norm) and t.median_norm > 0]
        if medians and max(medians) / min(medians) > LOG_SCALE_RATIO:
            bars.set_xscale("log")
            bars.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            bars.set_xlim(min(medians) / 2, max(medians) * (max(medians) / min(medians)) ** 0.7)
        elif medians:
            bars.set_xlim(0, max(medians) * 1.7)  # room for the annotations
    bars.set_xlabel("median gradient norm while in the top k")
    bars.set_title("tensors with the largest norms", fontsize=10)
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def h_mode(a: Analysis) -> str | None:
    return a.header.get("mode")


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedclip.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="a fusedclip.NormLog JSONL file")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the log's folder)")
    parser.add_argument("--name", default=None, help="file name stem of the outputs (default: the log's stem)")
    parser.add_argument("--title", default=None, help="chart title")
    parser.add_argument("--no-chart", action="store_true", help="write the Markdown only")
    args = parser.parse_args(argv)
    try:
        header, rows = read_log(args.log)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else args.log.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or args.log.stem
    a = analyse(header, rows)
    png = None
    if not args.no_chart and a.norms:
        try:
            png = out / f"{stem}.png"
            plot(a, png, args.title or f"gradient norms: {args.log.name} (Clipper mode {header.get('mode')})")
        except ImportError:
            print("matplotlib is not installed: no chart (pip install matplotlib)", file=sys.stderr)
            png = None
    md = out / f"{stem}.md"
    md.write_text(markdown(a, args.log.name, png.name if png else None))
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
