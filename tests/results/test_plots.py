"""Plots of a run directory: the heatmaps' matrices, GPU binning, and written, reproducible PNGs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moesim.results import plots

STRATEGIES = ("balanced_reference", "aux_loss", "loss_free")
STEPS = (10, 400, 800, 1200)


def gpus_frame(n_gpus: int = 16, stages: int = 2, seed: int = 0) -> pd.DataFrame:
    """A ``gpus`` table: the balanced reference at the first step, each strategy at every step;
    GPU ``g`` waits ``g`` ms on stragglers at point ``p`` times ``p + 1``."""
    rng = np.random.default_rng(seed)
    rows = []
    for name in STRATEGIES:
        steps = STEPS[:1] if name == "balanced_reference" else STEPS
        for point, step in enumerate(steps):
            gpu = np.arange(n_gpus)
            rows.append(
                pd.DataFrame(
                    {
                        "strategy": name,
                        "point": point,
                        "step": step,
                        "gpu": gpu,
                        "stage": gpu // (n_gpus // stages),
                        "straggler_wait_s": 1e-3 * gpu * (point + 1),
                        "comm_wait_s": rng.uniform(0, 2e-3, n_gpus),
                        "pipeline_wait_s": 5e-3 * (gpu // (n_gpus // stages)),
                        "a2a_wait_s": 0.0,
                    }
                )
            )
    return pd.concat(rows, ignore_index=True)


def experts_frame(ep: int = 4, per_rank: int = 4, n_gpus: int = 16) -> pd.DataFrame:
    """An ``experts`` table laid out like ``tables.experts_table``: expert index
    ``(gpu % ep) * per_rank + local``, so each index is held by ``n_gpus / ep`` GPUs."""
    rows = []
    gpu = np.repeat(np.arange(n_gpus), per_rank)
    local = np.tile(np.arange(per_rank), n_gpus)
    expert = (gpu % ep) * per_rank + local
    for name in STRATEGIES:
        steps = STEPS[:1] if name == "balanced_reference" else STEPS
        for point, step in enumerate(steps):
            tokens = 100.0 + (expert == 0) * 50.0 * point  # expert 0 grows hot over training
            rows.append(
                pd.DataFrame(
                    {
                        "strategy": name,
                        "point": point,
                        "step": step,
                        "gpu": gpu,
                        "stage": gpu // (n_gpus // 2),
                        "expert": expert,
                        "tokens": tokens,
                        "mean_wait_s": 0.0,
                    }
                )
            )
    return pd.concat(rows, ignore_index=True)


def test_bin_rows_leaves_small_matrices_alone():
    m = np.arange(12.0).reshape(6, 2)
    binned, edges, size = plots.bin_rows(m, max_bins=256)
    assert size == 1
    np.testing.assert_array_equal(binned, m)
    np.testing.assert_array_equal(edges, np.arange(7) - 0.5)


def test_bin_rows_averages_thousands_of_gpus_into_at_most_256_bins():
    n = 4096 + 5  # not a multiple of the bin size: the last bin holds fewer GPUs
    m = np.stack([np.arange(n, dtype=float), np.ones(n)], axis=1)
    binned, edges, size = plots.bin_rows(m)
    assert size == 17
    assert binned.shape == (242, 2)  # ceil(4101 / 17)
    assert binned.shape[0] <= 256
    assert binned[0, 0] == pytest.approx(np.mean(np.arange(17)))
    assert binned[1, 0] == pytest.approx(np.mean(np.arange(17, 34)))
    assert binned[-1, 0] == pytest.approx(np.mean(np.arange(241 * 17, n)))
    np.testing.assert_allclose(binned[:, 1], 1.0)
    assert edges[0] == -0.5
    assert edges[-1] == n - 0.5
    assert len(edges) == binned.shape[0] + 1


def test_wait_matrix_is_gpu_by_step_in_sampling_order():
    gpus = gpus_frame().sample(frac=1.0, random_state=1)  # row order must not matter
    matrix, steps = plots.wait_matrix(gpus, "aux_loss", "straggler_wait_s")
    assert steps == list(STEPS)
    assert matrix.shape == (16, len(STEPS))
    assert matrix[5, 2] == pytest.approx(1e-3 * 5 * 3)
    ref, ref_steps = plots.wait_matrix(gpus, "balanced_reference", "straggler_wait_s")
    assert ref.shape == (16, 1)
    assert ref_steps == [STEPS[0]]


def test_expert_load_sums_replicas_and_is_relative_to_the_mean():
    experts = experts_frame()
    matrix, steps = plots.expert_load_matrix(experts, "loss_free")
    assert steps == list(STEPS)
    assert matrix.shape == (16, len(STEPS))
    np.testing.assert_allclose(matrix[:, 0], 1.0)  # even at the first point
    np.testing.assert_allclose(matrix.mean(axis=0), 1.0)
    # point 3: expert 0 holds 250 tokens on each of its 4 replicas, every other 100
    mean = (250 + 15 * 100) / 16
    assert matrix[0, 3] == pytest.approx(250 / mean)
    assert matrix[1, 3] == pytest.approx(100 / mean)


def test_heatmaps_are_written_and_reproducible(tmp_path):
    gpus, experts = gpus_frame(), experts_frame()
    paths = {}
    for run in ("a", "b"):
        d = tmp_path / run
        d.mkdir()
        paths[run] = (
            plots.write_wait_heatmap(gpus, d / "wait_heatmap.png"),
            plots.write_expert_load_heatmap(experts, d / "expert_load_heatmap.png"),
        )
    for a, b in zip(paths["a"], paths["b"], strict=True):
        data = a.read_bytes()
        assert data.startswith(b"\x89PNG")
        assert len(data) > 5000
        assert data == b.read_bytes()


def test_wait_heatmap_bins_a_large_cluster(tmp_path):
    gpus = gpus_frame(n_gpus=2048, stages=8)
    matrix, _ = plots.wait_matrix(gpus, "aux_loss", "straggler_wait_s")
    binned, _, size = plots.bin_rows(matrix)
    assert binned.shape == (256, len(STEPS))
    assert binned[0, 0] == pytest.approx(1e-3 * np.mean(np.arange(8)))
    path = plots.write_wait_heatmap(gpus, tmp_path / "wait_heatmap.png")
    assert path.stat().st_size > 5000


def test_wait_heatmap_changes_with_the_data(tmp_path):
    gpus = gpus_frame()
    a = plots.write_wait_heatmap(gpus, tmp_path / "a.png").read_bytes()
    gpus.loc[gpus["strategy"] == "aux_loss", "straggler_wait_s"] *= 0.1
    b = plots.write_wait_heatmap(gpus, tmp_path / "b.png").read_bytes()
    assert a != b


def test_write_all_writes_every_plot(tmp_path):
    timeline = pd.DataFrame(
        {
            "strategy": ["aux_loss"] * 2 + ["loss_free"] * 2,
            "point": [0, 1, 0, 1],
            "tokens": [1e9, 2e9] * 2,
            "gpu_hours": [10.0, 20.0, 9.0, 18.0],
            "cost_usd": [50.0, 100.0, 45.0, 90.0],
            "balanced_gpu_hours": [8.0, 16.0] * 2,
            "balanced_cost_usd": [40.0, 80.0] * 2,
        }
    )
    stages = pd.DataFrame(
        [
            {
                "strategy": s,
                "point": 0,
                "step": 10,
                "stage": st,
                **dict.fromkeys([c for c, _ in plots.BREAKDOWN], 0.1 * (i + 1)),
            }
            for i, s in enumerate(STRATEGIES)
            for st in range(2)
        ]
    )
    written = plots.write_all(tmp_path, timeline, None, stages, gpus_frame(), experts_frame())
    assert sorted(p.name for p in written) == sorted(
        [
            "gpu_hours.png",
            "cost.png",
            "step_breakdown.png",
            "wait_heatmap.png",
            "expert_load_heatmap.png",
        ]
    )
    for p in written:
        assert p.parent == tmp_path
        assert p.stat().st_size > 0


def test_eplb_heatmap_rows_are_labelled_as_physical_slots():
    """A redundant-expert run has more rows (slots) than there are experts: its panel says so."""
    static = experts_frame(ep=4, per_rank=4)  # 16 experts
    eplb = experts_frame(ep=4, per_rank=5)  # 20 slots: one redundant per rank
    eplb = eplb[eplb["strategy"] == "loss_free"].assign(strategy="loss_free+eplb")
    fig = plots.expert_load_figure(pd.concat([static, eplb], ignore_index=True))
    labels = {ax.get_title(): ax.get_ylabel() for ax in fig.axes if ax.get_title()}
    assert labels["loss_free"] == "routed expert"
    assert labels["loss_free+eplb"] == "physical expert slot (20 slots for 16 experts)"


def _sweep_table(tmp_path, points: int, seeds: bool) -> pd.DataFrame:
    """A sweep table of a random design over two keys (every point differs in both), with a
    timeline in each point's directory."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(points):
        gamma, price = float(10 ** rng.uniform(-5, -2)), float(rng.uniform(2, 5))
        name = f"point-{i:012d}"
        timeline = []
        for strategy in ("aux_loss", "loss_free"):
            hours = 100.0 + 10 * i + (strategy == "loss_free")
            row = {"point": name, "gamma": gamma, "price": price, "strategy": strategy}
            row |= {"gpu_hours": hours, "cost_usd": hours * price}
            row |= {f"attribution_{c}_gpu_hours": hours / 2 for c in ("compute", "failures")}
            if seeds:
                for column in ("gpu_hours", "cost_usd"):
                    row |= {f"{column}_p10": row[column] * 0.9, f"{column}_p50": row[column]}
                    row |= {f"{column}_p90": row[column] * 1.1}
            rows.append(row)
            for p, tokens in enumerate((1e9, 2e9)):
                timeline.append(
                    {
                        "strategy": strategy,
                        "point": p,
                        "tokens": tokens,
                        "cost_usd": hours * price * (p + 1) / 2,
                        "balanced_cost_usd": 90 * price * (p + 1) / 2,
                    }
                )
        (tmp_path / name).mkdir()
        pd.DataFrame(timeline).to_parquet(tmp_path / name / "timeline.parquet")
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seeds", [False, True])
def test_sweep_plots_are_written_for_a_random_design(tmp_path, seeds):
    table = _sweep_table(tmp_path, points=5, seeds=seeds)
    written = plots.write_sweep_plots(table, tmp_path)
    names = {p.name for p in written}
    for stem in ("sweep_gamma", "sweep_price", "sweep_attribution", "sweep_cost_over_balanced"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names
    for path in written:
        assert path.stat().st_size > 1000
    # Every point differs in both keys: one scatter per strategy, not one line per point.
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    plots.plot_sweep(table, "gamma", "gpu_hours", "GPU-hours", ax)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["aux_loss", "loss_free"]


def test_cost_over_balanced_has_one_line_per_point_and_strategy(tmp_path):
    table = _sweep_table(tmp_path, points=3, seeds=False)
    timelines = {p: pd.read_parquet(tmp_path / p / "timeline.parquet") for p in table["point"]}
    labels = dict.fromkeys(timelines, "x")
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    plots.plot_sweep_cost_over_balanced(timelines, labels, ax)
    lines = [line for line in ax.get_lines() if len(line.get_xdata()) == 3]
    assert len(lines) == 3 * 2
    first = table.iloc[0]  # from the origin to the last point's cost minus its balanced cost
    assert lines[0].get_ydata()[0] == 0.0
    assert lines[0].get_ydata()[-1] == pytest.approx((first["gpu_hours"] - 90) * first["price"])
