"""The PNG chart: one figure, speedup over torch per set and dtype, clipped and unclipped side by side.

Read at a glance: horizontal bars, one per provider, each labelled with its value; a dashed line at
1× (torch itself); the same colour for a provider in every chart (a fixed mapping, not the order in
which providers happen to appear); the device and date in the title; the legend below the panels,
never over a bar; and a red warning on the figure when the machine was busy during the run.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from .load import reading_from_dict
from .providers import BASELINE
from .report import cells_of, providers_measured, tensors_label
from .results import Results

MISSING_MATPLOTLIB = "matplotlib is not installed: no chart written (pip install 'fusedclip[bench]')"

#: every known provider's colour, fixed: fusedclip's backends in blues and greens, torch's variants in
#: greys and purple, apex in brown
PROVIDER_COLORS: dict[str, str] = {
    "fusedclip-cpu": "#1f77b4",
    "fusedclip-cuda": "#08519c",
    "fusedclip-triton": "#2ca02c",
    "fusedclip-torch": "#17becf",
    "torch": "#7f7f7f",
    "torch-loop": "#bcbd22",
    "torch-compile": "#9467bd",
    "apex": "#8c564b",
}
#: colours for providers not listed above, picked by a hash of the name (stable from run to run)
_SPARE_COLORS = ("#e377c2", "#ff7f0e", "#d62728", "#393b79", "#637939", "#843c39")
CASE_TITLES = {
    "clipped": "Clipped (norm above max_norm: grads scaled)",
    "unclipped": "Unclipped (norm under max_norm: nothing to scale)",
}


def provider_color(name: str) -> str:
    if name in PROVIDER_COLORS:
        return PROVIDER_COLORS[name]
    return _SPARE_COLORS[zlib.crc32(name.encode()) % len(_SPARE_COLORS)]


def matplotlib_missing() -> str | None:
    """Why no chart can be drawn, or None when it can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return MISSING_MATPLOTLIB
    return None


def write_chart(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    meta = results.meta
    cells = cells_of(results)
    providers = [p for p in providers_measured(results) if p != BASELINE]
    labels = []
    scaled = False
    for (set_name, dtype), cell in cells.items():
        row = next(iter(cell.values()))
        mark = "*" if row.scale != "full" else ""
        scaled = scaled or bool(mark)
        labels.append(f"{set_name}{mark} {dtype}\n{tensors_label(row)} tensors")

    bar = 0.8 / max(1, len(providers))
    height = max(3.8, 2.3 + len(cells) * (0.24 * max(1, len(providers)) + 0.22))
    fig, axes = plt.subplots(1, 2, figsize=(12.5, height), sharey=True, squeeze=False)
    largest = max(
        [r.speedup for r in results.rows if r.ok and r.speedup and r.provider in providers] + [1.0],
    )
    for ax, case in zip(axes[0], ("clipped", "unclipped")):
        for index, provider in enumerate(providers):
            ys, values = [], []
            for group, cell in enumerate(cells.values()):
                row = cell.get((case, provider))
                if row is not None and row.ok and row.speedup:
                    ys.append(group - 0.4 + bar * (index + 0.5))
                    values.append(row.speedup)
            bars = ax.barh(ys, values, height=bar * 0.92, color=provider_color(provider), label=provider)
            ax.bar_label(bars, labels=[f"{v:.2f}×" for v in values], padding=3, fontsize=8)
        for group, cell in enumerate(cells.values()):
            if not any(row.ok and row.speedup for (c, p), row in cell.items() if c == case and p in providers):
                reasons = {row.reason or row.status for (c, _), row in cell.items() if c == case and not row.ok}
                why = "not measured: time budget spent" if any("time budget" in r for r in reasons) else "not measured"
                ax.text(0.02 * largest, group, why, va="center", fontsize=8, color="#777777", zorder=5,
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})  # fmt: skip
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        ax.text(1.0, -0.75, " torch = 1×", fontsize=8, va="bottom", ha="left")
        ax.set_xlim(0, largest * 1.2)
        ax.set_title(CASE_TITLES[case], fontsize=10, loc="left")
        ax.set_xlabel("speedup over torch.nn.utils.clip_grad_norm_ (higher is better)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0][0].set_yticks(range(len(labels)))
    axes[0][0].set_yticklabels(labels, fontsize=8)
    axes[0][0].set_ylim(len(labels) - 0.5, -0.9)  # first set on top, room for the 1x label

    date = str(meta.get("started", ""))[:10]
    # Positions from the top in inches, whatever the figure's height: title, warning, panels.
    fig.suptitle(
        f"fusedclip vs torch: speedup per gradient set\n{meta['device_name']}, {date}, torch {meta['torch']}",
        fontsize=12,
        x=0.01,
        y=1 - 0.1 / height,
        ha="left",
        va="top",
    )
    load = reading_from_dict(meta.get("load"))
    header = 0.75
    if load is not None and load.busy:
        fig.text(
            0.01,
            1 - 0.72 / height,
            "⚠ " + load.describe.replace("**", "").replace(" rerun", "\n   rerun"),
            color="#c00000",
            fontsize=9,
            va="top",
            ha="left",
        )
        header += 0.4
    top = 1 - (header + 0.3) / height
    handles = [Patch(color=provider_color(p), label=p) for p in providers]
    fig.legend(handles=handles, loc="lower left", ncol=max(1, len(handles)), fontsize=9, frameon=False,
               bbox_to_anchor=(0.01, 0.0))  # fmt: skip
    if scaled:
        fig.text(
            0.99,
            0.012,
            "* scaled down to fit the run (fewer layers, real tensor shapes)",
            fontsize=8,
            ha="right",
            va="bottom",
            color="#555555",
        )
    fig.subplots_adjust(left=0.15, right=0.98, top=top, bottom=0.95 / height, wspace=0.08)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
