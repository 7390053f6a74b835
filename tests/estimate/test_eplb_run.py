"""Redundant experts in a run: the EPLB variant next to the static placement."""

from __future__ import annotations

import pytest

from moesim.estimate import estimate_run
from moesim.scenario import scenario_from_dict


def test_eplb_runs_beside_the_static_placement(tiny_dict):
    d = tiny_dict
    d["strategies"] = [{"name": "none", "kind": "none"}]  # unbalanced routing: hot experts
    d["eplb"] = {"enabled": True, "redundant_per_rank": 2, "interval_steps": 20}
    d["output"] = {"trace": False}
    sc = scenario_from_dict(d)
    est = estimate_run(sc)
    assert list(est.summary) == ["none", "none+eplb"]
    static = [s for s in est.steps if s.strategy == "none"]
    eplb = [s for s in est.steps if s.strategy == "none+eplb"]
    assert [s.step for s in static] == [s.step for s in eplb]
    for a, b in zip(static, eplb, strict=True):
        # Replicating the hottest experts lowers the busiest GPU's expert work.
        assert b.result.expert_compute_s.max() < a.result.expert_compute_s.max()
        # Each GPU holds its experts plus the spare slots.
        assert b.result.expert_tokens.shape[1] == a.result.expert_tokens.shape[1] + 2
        assert b.result.expert_tokens.sum() == pytest.approx(a.result.expert_tokens.sum())
        assert b.extra_wall_s == pytest.approx(
            b.routing_metrics["eplb_migration_s"] * b.segment_steps / 20
        )
    s = est.summary["none+eplb"]
    wall = sum(x.segment_steps * x.result.step_time_s + x.extra_wall_s for x in eplb)
    assert s.migration_s > 0
    assert s.gpu_hours == pytest.approx(sc.cluster.gpus * wall / 3600)
