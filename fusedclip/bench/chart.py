"""A PNG chart: speedup over the baseline and share of copy bandwidth, per set/dtype and provider."""

from __future__ import annotations

from pathlib import Path

from .providers import BASELINE
from .report import cells_of, providers_measured
from .results import Results

MISSING_MATPLOTLIB = "matplotlib is not installed: no chart written (pip install 'fusedclip[bench]')"


def matplotlib_missing() -> str | None:
    """Why no chart can be drawn, or None when it can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return MISSING_MATPLOTLIB
    return None


def write_chart(results: Results, path: Path) -> None:
    """Four stacked panels of grouped bars, one group per set and dtype, one bar per provider:
    speedup over the baseline (log scale) and share of copy bandwidth, clipped and unclipped."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    cells = cells_of(results)
    groups = [f"{set_name} {dtype}" for set_name, dtype in cells]
    providers = providers_measured(results)
    colors = {name: f"C{index}" for index, name in enumerate(providers)}
    panels = [
        (case, f"{case}: speedup over {BASELINE} (log scale)", [p for p in providers if p != BASELINE], "speedup")
        for case in ("clipped", "unclipped")
    ] + [(case, f"{case}: share of copy bandwidth (%)", providers, "copy_share") for case in ("clipped", "unclipped")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(10.0, 0.5 * len(groups)), 3.4 * len(panels)), squeeze=False)
    for ax, (case, title, shown, metric) in zip(axes[:, 0], panels):
        width = 0.8 / max(1, len(shown))
        for index, provider in enumerate(shown):
            xs, ys = [], []
            for group_index, cell in enumerate(cells.values()):
                row = cell.get((case, provider))
                value = getattr(row, metric) if row is not None and row.ok else None
                if value is not None:
                    xs.append(group_index - 0.4 + width * (index + 0.5))
                    ys.append(100 * value if metric == "copy_share" else value)
            ax.bar(xs, ys, width=width, label=provider, color=colors[provider])
        if metric == "speedup":
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_locator(LogLocator(base=2))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}×"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=7, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=len(shown), loc="upper left")
    meta = results.meta
    fig.suptitle(f"fusedclip benchmark on {meta['device_name']} (torch {meta['torch']})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
