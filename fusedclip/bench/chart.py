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
    """Four panels (speedup and share of copy bandwidth, clipped and unclipped) of grouped bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    cells = cells_of(results)
    groups = [f"{set_name}\n{dtype}" for set_name, dtype in cells]
    providers = providers_measured(results)
    width = 0.8 / max(1, len(providers))
    fig, axes = plt.subplots(2, 2, figsize=(max(10.0, 0.6 * len(groups) * 2), 8.5), squeeze=False)
    panels = [
        ("speedup", f"speedup over {BASELINE} (×)", lambda r: r.speedup),
        ("copy_share", "share of copy bandwidth (%)", lambda r: None if r.copy_share is None else 100 * r.copy_share),
    ]
    for row_index, (_, ylabel, value) in enumerate(panels):
        for col_index, case in enumerate(("clipped", "unclipped")):
            ax = axes[row_index][col_index]
            for index, provider in enumerate(providers):
                xs, ys = [], []
                for group_index, cell in enumerate(cells.values()):
                    row = cell.get((case, provider))
                    y = value(row) if row is not None and row.ok else None
                    if y is not None:
                        xs.append(group_index - 0.4 + width * (index + 0.5))
                        ys.append(y)
                ax.bar(xs, ys, width=width, label=provider)
            if row_index == 0:
                ax.axhline(1.0, color="black", linewidth=0.8)
                ax.set_yscale("log")
            ax.set_title(f"{case}: {ylabel}", fontsize=10)
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels(groups, fontsize=7, rotation=90)
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, ncol=2)
    meta = results.meta
    fig.suptitle(f"fusedclip benchmark on {meta['device_name']} (torch {meta['torch']})", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
