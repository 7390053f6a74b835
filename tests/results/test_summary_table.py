"""The printed summary table: bands with several seeds, the headline seed named, small dollar
amounts with their significant digits, imbalance and hardware stragglers in their own columns."""

from __future__ import annotations

from moesim.cli import format_summary


def _summary(seeds: int) -> dict[str, dict[str, object]]:
    values: dict[str, object] = {
        "step_time_s": 0.0061,
        "balanced_step_time_s": 0.006,
        "straggler_overhead": 0.016,
        "imbalance_gpu_hours": 0.00002,
        "straggler_gpu_hours": 0.0,
        "tokens_per_s": 1.2e6,
        "mfu": 0.31,
        "gpu_hours": 0.0016771,
        "cost_usd": 0.0033542,
        "imbalance_cost_usd": 0.00004,
        "straggler_cost_usd": 0.0,
        "maxvio_batch": 0.7,
        "task_loss": 0.35,
    }
    if seeds > 1:
        values |= {"seeds": seeds, "headline_seed": 6}
        values |= {"gpu_hours_p10": 0.001674, "gpu_hours_p50": 0.0016771, "gpu_hours_p90": 0.00168}
        values |= {"cost_usd_p10": 0.003348, "cost_usd_p50": 0.0033542, "cost_usd_p90": 0.00336}
    return {"aux_loss": values}


def test_small_dollar_amounts_keep_their_digits():
    table = format_summary(_summary(1))
    header, _, row = table.splitlines()[:3]
    assert "imbalance $" in header
    assert "hw straggler $" in header
    assert "imbalance" in header.replace("imbalance $", "")
    assert "hw straggler" in header
    assert "0.003354" in row  # cost, not "0"
    assert "4e-05" in row  # imbalance dollars
    assert "seeds" not in table


def test_several_seeds_show_the_band_and_the_headline_seed():
    table = format_summary(_summary(4))
    assert "0.001677 (0.001674–0.00168)" in table
    assert "0.003354 (0.003348–0.00336)" in table
    assert "P50 over 4 seeds" in table
    assert "median-GPU-hours seed (aux_loss 6)" in table


def test_large_and_small_amounts_in_the_sweep_and_compare_tables():
    import pandas as pd

    from moesim.cli import _band, format_sweep

    table = pd.DataFrame(
        [
            {"point": "p", "x": 1, "strategy": "a", "gpu_hours": 2_788_000.0},
            {"point": "q", "x": 2, "strategy": "a", "gpu_hours": 0.001677},
        ]
    ).assign(cost_usd=lambda d: d["gpu_hours"] * 2, step_time_s=1.0, maxvio_batch=0.1)
    text = format_sweep(table, ["x"])
    assert "2,788,000" in text  # not 2.788e+06
    assert "5,576,000" in text
    assert "0.001677" in text
    assert "0.003354" in text
    assert _band(1_234_567.0, 1_000_000.0, 1_500_000.0) == "1,234,567 (1,000,000–1,500,000)"
    assert _band(0.5, 0.5, 0.5) == "0.5"
