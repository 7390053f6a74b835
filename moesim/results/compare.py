"""Comparing run directories: one tidy frame, one row per run and strategy.

``compare(["runs/a", "runs/b"])`` (paths or loaded :class:`~moesim.results.RunResults`) gives
the runs' summaries side by side: ``run`` (a short label), ``path``, ``scenario``, ``seed``,
``gpus``, ``strategy``, then every key of the runs' ``summary.json`` (a key one run lacks is
NaN in its rows), plus ``gpu_hours_vs_first`` and ``cost_usd_vs_first``: each row's
GPU-hours and cost relative to the first run's row of the same strategy (NaN where the first
run has no such strategy). :func:`plot_compare` draws GPU-hours and cost per run and strategy;
with several seeds it shows the P50 and its P10–P90.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from moesim.results.store import RunResults, load

KEYS = ("run", "path", "scenario", "seed", "gpus", "strategy")
METRICS = (("gpu_hours", "GPU-hours"), ("cost_usd", "cost (USD)"))


def _labels(paths: Sequence[Path]) -> list[str]:
    """Each run's directory name, or as many trailing path parts as make the labels unique."""
    for depth in range(1, max((len(p.parts) for p in paths), default=1) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{p}" for i, p in enumerate(paths)]


def compare(runs: Sequence[str | Path | RunResults]) -> pd.DataFrame:
    """The runs' summaries as one frame, one row per run and strategy (see the module)."""
    if not runs:
        raise ValueError("compare needs at least one run")
    loaded = [r if isinstance(r, RunResults) else load(r) for r in runs]
    labels = _labels([r.path for r in loaded])
    rows = []
    for label, run in zip(labels, loaded, strict=True):
        sc = run.scenario
        for strategy, values in run.summary.items():
            rows.append(
                {
                    "run": label,
                    "path": str(run.path),
                    "scenario": sc.name,
                    "seed": sc.seed,
                    "gpus": sc.cluster.gpus,
                    "strategy": strategy,
                    **values,
                }
            )
    df = pd.DataFrame(rows)
    first = df[df["run"] == labels[0]].set_index("strategy")
    for column, _ in METRICS:
        base = df["strategy"].map(first[column]).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            df[f"{column}_vs_first"] = df[column].astype(float) / base
    return df


def headline(df: pd.DataFrame, column: str) -> tuple[pd.Series, pd.Series, pd.Series]:
    """``column`` per row as its P50 with P10 and P90 (all three the value itself for a run
    of one seed)."""
    value = df[column].astype(float)
    if f"{column}_p50" not in df:
        return value, value, value
    p50 = df[f"{column}_p50"].astype(float)
    lo = df[f"{column}_p10"].astype(float)
    hi = df[f"{column}_p90"].astype(float)
    banded = p50.notna()
    return p50.where(banded, value), lo.where(banded, value), hi.where(banded, value)


def plot_compare(df: pd.DataFrame, column: str, ylabel: str, ax: Axes) -> Axes:
    """Grouped bars of ``column``: one group per run, one bar per strategy, the P50 with a
    P10–P90 error bar when a run had several seeds."""
    runs = list(pd.unique(df["run"]))
    strategies = list(pd.unique(df["strategy"]))
    width = 0.8 / max(1, len(strategies))
    for i, strategy in enumerate(strategies):
        rows = df[df["strategy"] == strategy]
        x = np.array([runs.index(r) for r in rows["run"]]) + (i - (len(strategies) - 1) / 2) * width
        y, lo, hi = headline(rows, column)
        yerr = np.vstack([(y - lo).to_numpy(), (hi - y).to_numpy()])
        ax.bar(x, y, width, label=strategy, yerr=yerr if (yerr > 0).any() else None, capsize=3)
    ax.set_xticks(range(len(runs)), runs, rotation=20 if len(runs) > 3 else 0)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="balancing", fontsize=8)
    return ax


def write_compare_figure(df: pd.DataFrame, path: str | Path) -> Path:
    """GPU-hours and cost side by side (:func:`plot_compare`), to ``path`` (format from its
    suffix: ``.png``, ``.svg``, ``.pdf``)."""
    from moesim.results.plots import _figure

    out = Path(path)
    fig = _figure(figsize=(11.0, 4.2), dpi=120, layout="constrained")
    axes = fig.subplots(1, len(METRICS), squeeze=False)[0]
    for ax, (column, ylabel) in zip(axes, METRICS, strict=True):
        plot_compare(df, column, ylabel, ax)
    fig.suptitle("GPU-hours and cost per run")
    meta = {"Software": None} if out.suffix.lower() == ".png" else {}
    fig.savefig(out, metadata=meta)
    return out
