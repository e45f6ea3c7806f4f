"""Reliability diagrams (PNG): accuracy per confidence bin against the diagonal, with counts."""
from __future__ import annotations

from pathlib import Path

from caopd.evaluation.metrics import CalibrationMetrics


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
    m = metrics
    ax.text(0.03, 0.97, f"acc {m.fmt(m.accuracy, '.2f')}   conf {m.fmt(m.mean_confidence, '.2f')}\n"
            f"ECE {metrics.fmt(metrics.ece, '.3f')}   OCG {metrics.fmt(metrics.ocg, '+.2f')}\n"
            f"SPR {metrics.fmt(metrics.spr, '.2f')}   n={metrics.n}",
            transform=ax.transAxes, va="top", fontsize=8,
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.85))


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _legend(ax) -> None:
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#4C72B0", label="accuracy"),
                       Patch(color="#DD8452", alpha=0.45, label="gap to confidence")], loc="lower right", fontsize=7)


def save_reliability_diagrams(panels: dict[str, CalibrationMetrics], path: str | Path) -> Path:
    """One PNG with a reliability diagram per entry of ``panels`` (title -> metrics), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, metrics) in zip(axes[0], panels.items()):
        draw_reliability(ax, metrics, title)
    _legend(axes[0][0])
    return _save(fig, path)


def save_demo_figure(per_seed: list[dict], path: str | Path, split: str = "heldout") -> Path:
    """The demo's figure: the reliability diagrams of base, OPD and CaOPD on ``split`` (first seed),
    and the rollouts' accuracy and stated confidence over the training steps (every seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = per_seed[0]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    for ax, name in zip(axes[:3], ("base", "OPD", "CaOPD")):
        metrics = CalibrationMetrics.from_dict(first["evaluation"][name][split]["metrics"])
        draw_reliability(ax, metrics, f"{name}: {split} (seed {first['seed']})")
    _legend(axes[0])
    ax = axes[3]
    colors = {"OPD": "#C44E52", "CaOPD": "#55A868"}
    for i, result in enumerate(per_seed):
        for method, points in result["trajectory"].items():
            steps = [p["step"] for p in points]
            ax.plot(steps, [p["mean_confidence"] for p in points], color=colors[method], lw=1.2,
                    label=f"{method} stated confidence" if i == 0 else None)
            ax.plot(steps, [p["rollout_accuracy"] for p in points], color=colors[method], lw=1.0, ls=":",
                    label=f"{method} rollout accuracy" if i == 0 else None)
    ax.set(ylim=(0, 1.02), xlabel="training step", ylabel="mean over the step's rollouts",
           title=f"training ({len(per_seed)} seed{'s' * (len(per_seed) > 1)})")
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def save_overlaid_reliability(runs: dict[str, CalibrationMetrics], path: str | Path) -> Path:
    """One reliability diagram with a line per run (accuracy against mean confidence per non-empty
    bin, marker size by count): several models compared on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5.2, 6.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
    for i, (name, metrics) in enumerate(runs.items()):
        filled = [b for b in metrics.bins if b.count]
        (line,) = ax.plot([b.mean_confidence for b in filled], [b.accuracy for b in filled], "-o", lw=1.2,
                          markersize=3, label=f"{name} (ECE {metrics.fmt(metrics.ece, '.3f')}, "
                          f"OCG {metrics.fmt(metrics.ocg, '+.2f')})")
        width = (metrics.bins[0].high - metrics.bins[0].low) / len(runs)
        counts.bar([b.low + i * width for b in metrics.bins], [b.count for b in metrics.bins], width=width,
                   align="edge", color=line.get_color(), alpha=0.8)  # completions per bin, as the single plot
    counts.set(xlim=(0, 1), xlabel="confidence", ylabel="completions per bin")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title="reliability")
    ax.legend(loc="upper left", fontsize=7)
    return _save(fig, path)
