"""Reliability diagrams (PNG): accuracy per confidence bin against the diagonal, with counts."""
from __future__ import annotations

from pathlib import Path

from caopd.metrics import CalibrationMetrics


def draw_reliability(ax, metrics: CalibrationMetrics, title: str) -> None:
    """One reliability diagram on ``ax``: bars = accuracy per bin, red = gap to calibration."""
    width = metrics.bins[0].high - metrics.bins[0].low
    for b in metrics.bins:
        if not b.count:
            continue
        ax.bar(b.low, b.accuracy, width=width, align="edge", color="#4C72B0", edgecolor="black", lw=0.6)
        gap_low, gap_high = sorted((b.accuracy, b.mean_confidence))
        ax.bar(b.low, gap_high - gap_low, bottom=gap_low, width=width, align="edge",
               color="#DD8452", alpha=0.45, edgecolor="#C44E52", hatch="//", lw=0.4)
        ax.text(b.low + width / 2, min(b.accuracy, 0.93) + 0.02, f"n={b.count}",
                ha="center", va="bottom", fontsize=7)
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.text(0.03, 0.97, f"acc {metrics.accuracy:.2f}   conf {metrics.mean_confidence:.2f}\n"
            f"ECE {metrics.ece:.3f}   OCG {metrics.ocg:+.2f}\nSPR {metrics.spr:.2f}   n={metrics.n}",
            transform=ax.transAxes, va="top", fontsize=8,
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.85))


def save_reliability_diagrams(panels: dict[str, CalibrationMetrics], path: str | Path) -> Path:
    """One PNG with a reliability diagram per entry of ``panels`` (title -> metrics), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, metrics) in zip(axes[0], panels.items()):
        draw_reliability(ax, metrics, title)
    axes[0][0].legend(handles=[Patch(color="#4C72B0", label="accuracy"),
                               Patch(color="#DD8452", alpha=0.45, label="gap to confidence")],
                      loc="lower right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
