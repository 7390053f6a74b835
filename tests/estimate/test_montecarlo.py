"""Monte Carlo over seeds: ordered percentiles, determinism, bands in the run directory."""

from __future__ import annotations

import numpy as np

from moesim.estimate import estimate_run, estimate_with_bands
from moesim.scenario import scenario_from_dict


def _scenario(tiny_dict, seeds):
    tiny_dict["strategies"] = tiny_dict["strategies"][:1]
    tiny_dict["uncertainty"] = {"seeds": seeds, "workers": 2}
    tiny_dict["output"] = {"trace": False}
    return scenario_from_dict(tiny_dict)


def test_percentiles_are_ordered_and_reproducible(tiny_dict):
    sc = _scenario(tiny_dict, seeds=3)
    a = estimate_with_bands(sc)
    s = a.summary["aux_loss"]
    assert s.seeds == 3
    for key in ("step_time_s", "gpu_hours", "cost_usd", "task_loss", "gate_maxvio_global"):
        p10, p50, p90 = s.percentiles[key]
        assert p10 <= p50 <= p90
    # A worker's seed gives what that seed gives in this process (same seed, same result).
    # With three values a ≤ b ≤ c, linear interpolation gives P10 = a + 0.2(b − a), P50 = b,
    # P90 = b + 0.8(c − b): recover the three and find this seed's among them.
    p10, b, p90 = s.percentiles["gpu_hours"]
    values = (b - (b - p10) / 0.2, b, b + (p90 - b) / 0.8)
    again = estimate_run(sc.model_copy(update={"seed": sc.seed + 2}))
    assert min(abs(again.summary["aux_loss"].gpu_hours - v) for v in values) < 1e-12
    # Different seeds give different routing, so the band has width.
    assert p90 > p10
    # The bands bracket nothing absurd: the seed's own curve lies within P10–P90 or on it.
    for row, band in zip(a.timeline, a.bands, strict=True):
        assert band.gpu_hours_p10 <= band.gpu_hours_p50 <= band.gpu_hours_p90
        assert row.gpu_hours > 0


def test_one_seed_collapses_the_band(tiny_dict):
    est = estimate_with_bands(_scenario(tiny_dict, seeds=1))
    s = est.summary["aux_loss"]
    assert s.percentiles["gpu_hours"] == (s.gpu_hours,) * 3
    assert s.as_dict()["gpu_hours_p50"] == s.gpu_hours
    assert np.isclose(est.bands[-1].cost_usd_p50, est.timeline[-1].cost_usd)


def test_gates_trained_in_parallel_give_the_same_run(tiny_dict):
    """The strategies' gate trajectories may train in worker processes: same tables."""
    tiny_dict["output"] = {"trace": False}
    sc = scenario_from_dict(tiny_dict)
    serial = estimate_run(sc, workers=1)
    parallel = estimate_run(sc, workers=2)
    assert serial.summary == parallel.summary
    assert serial.gate_records == parallel.gate_records
