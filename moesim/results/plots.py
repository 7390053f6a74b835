"""Plots of a run: GPU-hours and dollar cost against tokens trained, one line per strategy;
where each strategy's step time goes; per-GPU waiting and per-expert load over training.

Files are drawn on :class:`matplotlib.figure.Figure` objects, outside pyplot: importing this
module never switches matplotlib's backend, so figures still show inline in Jupyter, and files
render on headless machines and in CI (``savefig`` picks the canvas from the file's format).
The ``plot_*`` functions draw on an ``Axes`` the caller owns, from pyplot or not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from moesim import units


def _figure(**kwargs: Any) -> Figure:
    """A figure that belongs to no pyplot window (nothing to close, no backend involved)."""
    return Figure(**kwargs)


def plot_curve(
    timeline: pd.DataFrame,
    column: str,
    ylabel: str,
    ax: Axes,
    bands: pd.DataFrame | None = None,
) -> Axes:
    """Cumulative ``column`` against tokens trained, one line per strategy, from the origin,
    with the same cluster under perfectly balanced routing dashed for reference, and, when
    several seeds were run, the median over seeds drawn with its P10–P90 band shaded."""
    for name, df in timeline.groupby("strategy", sort=False):
        x = [0.0, *(df["tokens"] / units.GIGA)]
        band = None if bands is None else bands[bands["strategy"] == name]
        banded = band is not None and len(band) == len(df) and f"{column}_p50" in band
        y = band[f"{column}_p50"] if banded and band is not None else df[column]
        (line,) = ax.plot(x, [0.0, *y], marker="o", markersize=3, label=str(name))
        if band is not None and len(band) and f"{column}_p10" in band:
            bx = [0.0, *(band["tokens"] / units.GIGA)]
            ax.fill_between(
                bx,
                [0.0, *band[f"{column}_p10"]],
                [0.0, *band[f"{column}_p90"]],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
    first = timeline[timeline["strategy"] == timeline["strategy"].iloc[0]]
    ax.plot(
        [0.0, *(first["tokens"] / units.GIGA)],
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


def write_plots(
    timeline: pd.DataFrame, out_dir: Path, bands: pd.DataFrame | None = None
) -> list[Path]:
    """Write ``gpu_hours.png`` and ``cost.png`` into ``out_dir`` (with P10–P90 bands when
    ``bands`` has several seeds' percentiles)."""
    written = []
    for column, ylabel, title, fname in (
        ("gpu_hours", "cumulative GPU-hours", "GPU-hours vs tokens trained", "gpu_hours.png"),
        ("cost_usd", "cumulative cost (USD)", "Cost vs tokens trained", "cost.png"),
    ):
        fig = _figure(figsize=(6.4, 4.0), dpi=120)
        ax = fig.subplots()
        plot_curve(timeline, column, ylabel, ax, bands)
        ax.set_title(title)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, metadata={"Software": None})
        written.append(path)
    return written


BREAKDOWN = (
    ("forward_s", "forward"),
    ("backward_input_s", "backward (input grads)"),
    ("backward_weight_s", "backward (weight grads)"),
    ("bubble_s", "pipeline bubble"),
    ("exposed_comm_s", "exposed all-to-all"),
    ("tp_comm_s", "exposed tensor-parallel comm"),
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
    # Outside the axes: inside, it would hide the first bar.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return ax


def write_step_breakdown(stages: pd.DataFrame, path: Path) -> Path:
    fig = _figure(figsize=(8.4, 4.4), dpi=120)
    ax = fig.subplots()
    plot_step_breakdown(stages, ax)
    ax.set_title("Where the step time goes")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    return path


BALANCED = "balanced_reference"
MAX_BINS = 256
WAITS = (
    ("straggler_wait_s", "waiting on stragglers"),
    ("comm_wait_s", "exposed all-to-all"),
    ("pipeline_wait_s", "pipeline bubble"),
)


def bin_rows(
    matrix: npt.ArrayLike, max_bins: int = MAX_BINS
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], int]:
    """Average consecutive rows of ``matrix`` into at most ``max_bins`` bins.

    Parameters
    ----------
    matrix
        ``(rows, columns)`` values, e.g. one row per GPU and one column per sampled step.
    max_bins
        The most rows the result may have.

    Returns
    -------
    binned
        ``(bins, columns)``: bin ``i`` is the mean of rows ``i·k … (i+1)·k − 1`` (the last bin
        may hold fewer rows); the input unchanged when it has at most ``max_bins`` rows.
    edges
        ``bins + 1`` row-index edges of the bins, offset by −½ so that row ``r`` is centred at
        ``r`` on an axis drawn with them.
    size
        ``k``, the rows per bin (1 when nothing was binned).
    """
    m = np.asarray(matrix, dtype=np.float64)
    rows = m.shape[0]
    size = max(1, -(-rows // max_bins))
    starts = np.arange(0, rows, size)
    binned = np.add.reduceat(m, starts, axis=0) / np.diff([*starts, rows])[:, None]
    edges = np.append(starts, rows) - 0.5
    return binned, edges, size


def _points(df: pd.DataFrame) -> tuple[list[int], list[int]]:
    """The sampled points of one strategy's rows, in order, and their step numbers."""
    pts = df[["point", "step"]].drop_duplicates().sort_values("point")
    return pts["point"].tolist(), pts["step"].astype(int).tolist()


def wait_matrix(
    gpus: pd.DataFrame, strategy: str, column: str
) -> tuple[npt.NDArray[np.float64], list[int]]:
    """One strategy's per-GPU ``column`` (seconds) from the ``gpus`` table.

    Returns
    -------
    matrix
        ``(gpus, sampled steps)``, GPUs in index order, steps in sampling order.
    steps
        The step number of each column.
    """
    df = gpus[gpus["strategy"] == strategy]
    points, steps = _points(df)
    wide = df.pivot_table(index="gpu", columns="point", values=column, aggfunc="mean")
    return wide.reindex(columns=points).to_numpy(dtype=np.float64), steps


def expert_load_matrix(
    experts: pd.DataFrame, strategy: str
) -> tuple[npt.NDArray[np.float64], list[int]]:
    """One strategy's load of each routed expert relative to the mean expert, per sampled step.

    The ``experts`` table has one row per (GPU, local expert); its ``expert`` column is the
    routed-expert index within a layer, so the tokens of all GPUs holding the same index (the
    data-parallel replicas and the pipeline stages, i.e. every MoE layer) are summed first.

    Returns
    -------
    matrix
        ``(experts, sampled steps)``: tokens / mean tokens per expert of that step (1 = an even
        share; NaN for a step in which no expert received tokens).
    steps
        The step number of each column.
    """
    df = experts[experts["strategy"] == strategy]
    points, steps = _points(df)
    wide = df.pivot_table(index="expert", columns="point", values="tokens", aggfunc="sum")
    tokens = wide.reindex(columns=points).fillna(0.0).to_numpy(dtype=np.float64)
    mean = tokens.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = np.where(mean > 0, tokens / mean, np.nan)
    return relative, steps


def _step_ticks(ax: Axes, steps: list[int]) -> None:
    every = max(1, -(-len(steps) // 8))
    idx = list(range(0, len(steps), every))
    ax.set_xticks(idx, [str(steps[i]) for i in idx], rotation=45 if len(steps) > 1 else 0)
    ax.set_xlabel("step")


def _title(strategy: str) -> str:
    return "balanced routing (reference)" if strategy == BALANCED else strategy


def write_wait_heatmap(gpus: pd.DataFrame, path: Path, max_bins: int = MAX_BINS) -> Path:
    """Write ``wait_heatmap.png``: per-GPU waiting time at each sampled step.

    One row of panels per kind of wait (``WAITS``: waiting on stragglers at the all-to-all,
    exposed all-to-all transfer, pipeline bubble) and one column per strategy, the balanced-
    routing reference step first as its own panel; the panels of a row share one colour scale.
    More than ``max_bins`` GPUs are averaged in bins of consecutive GPUs. Thin white lines
    mark pipeline-stage boundaries.
    """
    strategies = list(pd.unique(gpus["strategy"]))
    stage_of = gpus[["gpu", "stage"]].drop_duplicates("gpu").sort_values("gpu")
    n_gpus = len(stage_of)
    boundaries = np.flatnonzero(np.diff(stage_of["stage"].to_numpy())) + 0.5
    data = {(col, name): wait_matrix(gpus, name, col) for col, _ in WAITS for name in strategies}
    widths = [max(2, len(data[(WAITS[0][0], name)][1])) for name in strategies]
    fig = _figure(
        figsize=(1.8 + 2.4 * len(strategies), 2.6 * len(WAITS)), dpi=120, layout="constrained"
    )
    axes = fig.subplots(
        len(WAITS),
        len(strategies),
        squeeze=False,
        sharey=True,
        gridspec_kw={"width_ratios": widths},
    )
    size = 1
    for r, (col, label) in enumerate(WAITS):
        peak = max(float(np.nanmax(data[(col, n)][0], initial=0.0)) for n in strategies)
        scale, unit = (units.seconds_to_milliseconds(1.0), "ms") if peak < 1 else (1.0, "s")
        vmax = peak * scale if peak > 0 else 1.0
        mesh = None
        for c, name in enumerate(strategies):
            ax = axes[r, c]
            matrix, steps = data[(col, name)]
            binned, edges, size = bin_rows(matrix, max_bins)
            x = np.arange(len(steps) + 1) - 0.5
            mesh = ax.pcolormesh(x, edges, binned * scale, cmap="magma", vmin=0.0, vmax=vmax)
            if len(boundaries) <= 32:
                for b in boundaries:
                    ax.axhline(b, color="white", linewidth=0.6)
            ax.set_ylim(n_gpus - 0.5, -0.5)
            _step_ticks(ax, steps)
            if r == 0:
                ax.set_title(_title(name), fontsize=9)
            if r < len(WAITS) - 1:
                ax.set_xlabel("")
        gpu_label = "GPU" if size == 1 else f"GPU (mean of {size} per row)"
        axes[r, 0].set_ylabel(gpu_label)
        assert mesh is not None  # one mesh per strategy, and there is at least one
        fig.colorbar(mesh, ax=axes[r, :].tolist(), label=f"{label} ({unit})", fraction=0.04)
    fig.suptitle("Per-GPU waiting time per step")
    fig.savefig(path, metadata={"Software": None})
    return path


def write_expert_load_heatmap(experts: pd.DataFrame, path: Path, max_bins: int = MAX_BINS) -> Path:
    """Write ``expert_load_heatmap.png`` (:func:`expert_load_figure`)."""
    expert_load_figure(experts, max_bins).savefig(path, metadata={"Software": None})
    return path


def expert_load_figure(experts: pd.DataFrame, max_bins: int = MAX_BINS) -> Figure:
    """The expert-load heatmap: each routed expert's load relative to the mean expert
    (``expert_load_matrix``) at each sampled step, one panel per strategy, on one diverging
    colour scale centred at 1 (red: overloaded, blue: underloaded). The balanced-routing
    reference is left out: its load is even by construction. More than ``max_bins`` experts
    are averaged in bins of consecutive experts.

    The rows of a redundant-expert run (``<strategy>+eplb``) are physical expert slots, not
    experts: each EP rank holds its experts plus ``eplb.redundant_per_rank`` replicas (72 slots
    for 64 experts on 8 ranks with one each), and which expert a slot hosts changes with the
    layer and with each re-placement, so those panels are labelled by slot."""
    strategies = [s for s in pd.unique(experts["strategy"]) if s != BALANCED]
    data = {name: expert_load_matrix(experts, name) for name in strategies}
    peak = max([float(np.nanmax(m, initial=1.0)) for m, _ in data.values()] or [2.0])
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, peak))
    widths = [max(2, len(steps)) for _, steps in data.values()] or [1]
    fig = _figure(figsize=(1.8 + 2.6 * max(1, len(strategies)), 4.4), dpi=120, layout="constrained")
    rows = {name: len(m) for name, (m, _) in data.items()}
    experts_n = min(rows.values(), default=0)  # the static placement: one row per expert
    same_rows = len(set(rows.values())) <= 1
    axes = fig.subplots(
        1,
        max(1, len(strategies)),
        squeeze=False,
        sharey=same_rows,
        gridspec_kw={"width_ratios": widths},
    )
    mesh = None
    for c, name in enumerate(strategies):
        ax = axes[0, c]
        matrix, steps = data[name]
        binned, edges, size = bin_rows(matrix, max_bins)
        x = np.arange(len(steps) + 1) - 0.5
        mesh = ax.pcolormesh(x, edges, binned, cmap="RdBu_r", norm=norm)
        ax.set_ylim(edges[-1], edges[0])
        _step_ticks(ax, steps)
        ax.set_title(name, fontsize=9)
        if rows[name] > experts_n:
            what = f"physical expert slot ({rows[name]} slots for {experts_n} experts)"
        else:
            what = "routed expert"
        if c == 0 or not same_rows:
            ax.set_ylabel(what + ("" if size == 1 else f" (mean of {size} per row)"))
    if mesh is not None:
        fig.colorbar(
            mesh,
            ax=axes[0, :].tolist(),
            label="tokens / mean tokens per expert (or slot)",
            fraction=0.04,
        )
    fig.suptitle("Expert load over training (all MoE layers and replicas summed)")
    return fig


def write_all(
    out_dir: Path,
    timeline: pd.DataFrame,
    bands: pd.DataFrame | None,
    stages: pd.DataFrame,
    gpus: pd.DataFrame,
    experts: pd.DataFrame,
) -> list[Path]:
    """Write every plot of a run directory into ``out_dir``: ``gpu_hours.png``, ``cost.png``,
    ``step_breakdown.png``, ``wait_heatmap.png`` and ``expert_load_heatmap.png`` (not for a
    dense model: it has no expert)."""
    written = [
        *write_plots(timeline, out_dir, bands),
        write_step_breakdown(stages, out_dir / "step_breakdown.png"),
        write_wait_heatmap(gpus, out_dir / "wait_heatmap.png"),
    ]
    if len(experts):
        written.append(write_expert_load_heatmap(experts, out_dir / "expert_load_heatmap.png"))
    return written


SWEEP_METRICS = (
    ("gpu_hours", "GPU-hours"),
    ("cost_usd", "cost (USD)"),
)


def _headline(
    df: pd.DataFrame, column: str
) -> tuple[pd.Series, pd.Series | None, pd.Series | None]:
    """``column`` of a summary frame, as its P50 with P10/P90 when several seeds ran."""
    if f"{column}_p50" in df and df[f"{column}_p50"].notna().all():
        return df[f"{column}_p50"], df[f"{column}_p10"], df[f"{column}_p90"]
    return df[column], None, None


def _varied(table: pd.DataFrame) -> list[str]:
    """A sweep table's varied keys: its columns between ``point`` and ``strategy``."""
    columns = list(table.columns)
    return columns[columns.index("point") + 1 : columns.index("strategy")]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def plot_sweep(table: pd.DataFrame, key: str, column: str, ylabel: str, ax: Axes) -> Axes:
    """One summary ``column`` of a sweep table against the varied ``key``: one line per
    strategy (and per combination of the other varied keys), the P50 with a P10–P90 band when
    the points ran several seeds. Numeric keys get a numeric axis (logarithmic when the values
    span two decades or more), others one tick per value in the design's order."""
    others = [k for k in _varied(table) if k != key]
    values = list(pd.unique(table[key]))
    numeric = all(_is_number(v) for v in values)
    groups = table.groupby(["strategy", *others], sort=False)
    # A line needs the key's every value at fixed values of the other keys, as in a grid. A
    # random design (or a zip) varies every key at every point: one scatter per strategy.
    scatter = bool(others) and bool((groups.size() != len(values)).any())
    if scatter:
        groups = table.groupby(["strategy"], sort=False)
    for group, df in groups:
        names = group if isinstance(group, tuple) else (group,)
        pairs = zip(others, names[1:], strict=False)
        label = ", ".join([str(names[0]), *(f"{k}={v}" for k, v in pairs)])
        x = df[key].astype(float) if numeric else df[key].map(values.index)
        order = np.argsort(np.asarray(x, dtype=float), kind="stable")
        x = x.iloc[order]
        y, lo, hi = (None if v is None else v.iloc[order] for v in _headline(df, column))
        assert y is not None
        if scatter:
            yerr = None if lo is None or hi is None else np.vstack([y - lo, hi - y])
            ax.errorbar(x, y, yerr=yerr, fmt="o", markersize=4, capsize=3, label=label)
            continue
        (line,) = ax.plot(x, y, marker="o", markersize=4, label=label)
        if lo is not None and hi is not None:
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    if numeric:
        positive = [float(v) for v in values if float(v) > 0]
        if len(positive) == len(values) and max(positive) >= 100 * min(positive):
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(values)), [str(v) for v in values])
    ax.set_xlabel(key)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def sweep_plot_name(key: str) -> str:
    """``'strategies[1].gamma'`` → ``'sweep_strategies_1_gamma'``."""
    slug = "".join(c if c.isalnum() else "_" for c in key)
    return "sweep_" + "_".join(part for part in slug.split("_") if part)


def plot_sweep_attribution(table: pd.DataFrame, ax: Axes) -> Axes:
    """The GPU-hours of every point and strategy of a sweep, stacked by cause (the
    ``attribution_<cause>_gpu_hours`` summary keys, which add up to the GPU-hours with
    failures): one bar per point and strategy, labelled with the point's varied values."""
    causes = [c for c in table.columns if c.startswith("attribution_")]
    keys = _varied(table)
    short = {k: k.rsplit(".", 1)[-1] for k in keys}  # the field's own name
    labels = [
        "\n".join([*(f"{short[k]}={r[k]}" for k in keys), str(r["strategy"])])
        for _, r in table.iterrows()
    ]
    x = np.arange(len(table))
    bottom = np.zeros(len(table))
    for cause in causes:
        values = table[cause].astype(float).fillna(0.0).to_numpy()
        name = cause.removeprefix("attribution_").removesuffix("_gpu_hours").replace("_", " ")
        ax.bar(x, values, bottom=bottom, label=name)
        bottom += values
    ax.set_xticks(x, labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("GPU-hours")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_sweep_cost_over_balanced(
    timelines: dict[str, pd.DataFrame], labels: dict[str, str], ax: Axes
) -> Axes:
    """Cumulative cost over the same run under perfectly balanced routing (``cost_usd −
    balanced_cost_usd``: what imbalance and stragglers cost so far) against tokens trained,
    one line per point and strategy. ``timelines`` are the points' ``timeline`` tables by point
    name and ``labels`` their varied values as text."""
    for point, df in timelines.items():
        for strategy, rows in df.groupby("strategy", sort=False):
            x = [0.0, *(rows["tokens"] / units.GIGA)]
            extra = rows["cost_usd"] - rows["balanced_cost_usd"]
            ax.plot(
                x, [0.0, *extra], marker="o", markersize=2, label=f"{labels[point]}, {strategy}"
            )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("tokens trained (billions)")
    ax.set_ylabel("cost over balanced routing (USD)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def _save_png_svg(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """``stem.png`` and ``stem.svg`` without the software and date stamps (same bytes for the
    same figure)."""
    written = []
    for suffix, meta in ((".png", {"Software": None}), (".svg", {"Date": None})):
        path = out_dir / f"{stem}{suffix}"
        fig.savefig(path, metadata=meta)
        written.append(path)
    return written


def write_sweep_plots(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """For each varied key of a sweep table, ``sweep_<key>.png`` and ``.svg``: GPU-hours and
    cost against that key, side by side (:func:`plot_sweep`); ``sweep_attribution.png`` and
    ``.svg``: every point's GPU-hours by cause (:func:`plot_sweep_attribution`); and
    ``sweep_cost_over_balanced.png`` and ``.svg``: every point's cost over balanced routing
    against tokens (:func:`plot_sweep_cost_over_balanced`), from the timelines of the point
    directories ``out_dir/<point>`` (points without one are left out)."""
    written = []
    keys = _varied(table)
    timelines = {}
    labels = {}
    for point, rows in table.groupby("point", sort=False):
        path = out_dir / str(point) / "timeline.parquet"
        if path.is_file():
            timelines[str(point)] = pd.read_parquet(path)
            first = rows.iloc[0]
            labels[str(point)] = ", ".join(f"{k.rsplit('.', 1)[-1]}={first[k]}" for k in keys)
    if timelines:
        fig = _figure(figsize=(10.0, 4.8), dpi=120, layout="constrained")
        ax = fig.subplots()
        plot_sweep_cost_over_balanced(timelines, labels, ax)
        ax.set_title("Cost over balanced routing, every point")
        written += _save_png_svg(fig, out_dir, "sweep_cost_over_balanced")
    fig = _figure(figsize=(3.0 + 1.0 * len(table), 5.2), dpi=120, layout="constrained")
    ax = fig.subplots()
    plot_sweep_attribution(table, ax)
    ax.set_title("GPU-hours by cause, per point and strategy")
    written += _save_png_svg(fig, out_dir, "sweep_attribution")
    for key in keys:
        fig = _figure(figsize=(11.0, 4.2), dpi=120, layout="constrained")
        axes = fig.subplots(1, len(SWEEP_METRICS), squeeze=False)[0]
        for ax, (column, ylabel) in zip(axes, SWEEP_METRICS, strict=True):
            plot_sweep(table, key, column, ylabel, ax)
        fig.suptitle(f"GPU-hours and cost against {key}")
        written += _save_png_svg(fig, out_dir, sweep_plot_name(key))
    return written


def write_routing_by_domain(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write ``routing_by_domain.png`` and ``.svg``: the final routers' MaxVio and min/mean
    load per data domain and pooled (``routing_by_domain.parquet``), one bar per strategy,
    averaged over the simulated layers with their range as whiskers."""
    domains = list(pd.unique(table["domain"]))
    # The pooled row last, after the domains in their scenario order.
    domains = [d for d in domains if d != "pooled"] + ["pooled"]
    strategies = list(pd.unique(table["strategy"]))
    fig = _figure(figsize=(2.4 + 0.9 * len(domains) * max(1, len(strategies)) / 2, 3.6), dpi=120)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    width = 0.8 / max(1, len(strategies))
    x = np.arange(len(domains))
    for ax, column, label in (
        (axes[0], "maxvio", "MaxVio (max / mean − 1)"),
        (axes[1], "min_over_mean", "min / mean load"),
    ):
        for j, name in enumerate(strategies):
            rows = table[table["strategy"] == name].groupby("domain")[column]
            mean = rows.mean().reindex(domains).to_numpy(dtype=float)
            low = mean - rows.min().reindex(domains).to_numpy(dtype=float)
            high = rows.max().reindex(domains).to_numpy(dtype=float) - mean
            ax.bar(x + (j - (len(strategies) - 1) / 2) * width, mean, width, label=name)
            ax.errorbar(
                x + (j - (len(strategies) - 1) / 2) * width,
                mean,
                yerr=[low, high],
                fmt="none",
                ecolor="black",
                elinewidth=0.8,
            )
        ax.set_xticks(x, domains, rotation=30, ha="right")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("Final routers' expert-load skew by data domain")
    fig.tight_layout()
    paths = [out_dir / "routing_by_domain.png", out_dir / "routing_by_domain.svg"]
    for path in paths:
        fig.savefig(path, metadata={"Software": None} if path.suffix == ".png" else {"Date": None})
    return paths
