"""Plots of a run: GPU-hours and dollar cost against tokens trained, one line per strategy.

Uses matplotlib's non-interactive Agg backend, so plots render on headless machines and in CI.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402


def plot_curve(timeline: pd.DataFrame, column: str, ylabel: str, ax: Axes) -> Axes:
    """Cumulative ``column`` against tokens trained, one line per strategy, from the origin,
    with the same cluster under perfectly balanced routing dashed for reference."""
    for name, df in timeline.groupby("strategy", sort=False):
        x = [0.0, *(df["tokens"] / 1e9)]
        ax.plot(x, [0.0, *df[column]], marker="o", markersize=3, label=str(name))
    first = timeline[timeline["strategy"] == timeline["strategy"].iloc[0]]
    ax.plot(
        [0.0, *(first["tokens"] / 1e9)],
        [0.0, *first[f"balanced_{column}"]],
        color="black",
        linestyle="--",
        linewidth=1,
        label="balanced routing",
    )
    ax.set_xlabel("tokens trained (billions)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(title="balancing")
    return ax


def write_plots(timeline: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write ``gpu_hours.png`` and ``cost.png`` into ``out_dir``."""
    written = []
    for column, ylabel, title, fname in (
        ("gpu_hours", "cumulative GPU-hours", "GPU-hours vs tokens trained", "gpu_hours.png"),
        ("cost_usd", "cumulative cost (USD)", "Cost vs tokens trained", "cost.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
        plot_curve(timeline, column, ylabel, ax)
        ax.set_title(title)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, metadata={"Software": None})
        plt.close(fig)
        written.append(path)
    return written


BREAKDOWN = (
    ("forward_s", "forward"),
    ("backward_input_s", "backward (input grads)"),
    ("backward_weight_s", "backward (weight grads)"),
    ("bubble_s", "pipeline bubble"),
    ("exposed_comm_s", "exposed all-to-all"),
    ("straggler_wait_s", "waiting on stragglers"),
    ("sync_s", "gradient/parameter sync"),
    ("optimizer_s", "optimizer step"),
    ("tail_idle_s", "idle at step end"),
)


def plot_step_breakdown(stages: pd.DataFrame, ax: Axes) -> Axes:
    """Stacked mean per-GPU time split of a step, one bar per strategy (averaged over stages
    and simulated points); the bars' heights are the mean step times."""
    mean = stages.groupby("strategy", sort=False)[[c for c, _ in BREAKDOWN]].mean()
    bottom = pd.Series(0.0, index=mean.index)
    for column, label in BREAKDOWN:
        ax.bar(mean.index, mean[column], bottom=bottom, label=label)
        bottom = bottom + mean[column]
    ax.set_ylabel("seconds per step (mean over GPUs)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return ax


def write_step_breakdown(stages: pd.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    plot_step_breakdown(stages, ax)
    ax.set_title("Where the step time goes")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path
