"""Where the run's GPU-hours go: every cause adds up to the total; stragglers have a price."""

from __future__ import annotations

import pytest

from moesim.estimate import CAUSES, estimate_run, integrate
from moesim.scenario import scenario_from_dict


def _attributed(summary):
    return sum(summary.attribution.by_cause().values())


def test_causes_add_up_with_every_effect_on(tiny_dict):
    d = tiny_dict
    d["strategies"] = [{"name": "none", "kind": "none"}]
    d["faults"] = {
        "failures": {"enabled": True, "gpu_mtbf_hours": 5.0},
        "slow_gpus": {"gpus": {1: 1.4}},
        "jitter": {"sigma": 0.05},
    }
    d["eplb"] = {"enabled": True, "redundant_per_rank": 1, "interval_steps": 30}
    d["output"] = {"trace": False}
    est = estimate_run(scenario_from_dict(d))
    for name in ("none", "none+eplb"):
        s = est.summary[name]
        assert _attributed(s) == pytest.approx(s.gpu_hours_with_failures, rel=1e-9)
        assert s.attribution.hardware_stragglers_gpu_hours > 0  # the slow GPU costs
        assert s.straggler_cost_usd == pytest.approx(
            s.straggler_gpu_hours * d["cluster"]["price_usd_per_gpu_hour"]
        )
        assert s.attribution.failures_gpu_hours == pytest.approx(s.failure_gpu_hours)
        flat = s.as_dict()  # summary.json: one attribution_<cause>_gpu_hours key per cause
        assert sum(flat[f"attribution_{c}_gpu_hours"] for c in CAUSES) == _attributed(s)
    assert est.summary["none+eplb"].attribution.expert_migration_gpu_hours > 0
    assert est.summary["none"].attribution.expert_migration_gpu_hours == 0


def test_healthy_balanced_run_is_only_compute_communication_and_bubble(tiny_dict):
    """When every sampled step is the perfectly balanced step and nothing fails, the run's
    GPU-hours are only compute, communication and pipeline bubble."""
    from dataclasses import replace

    d = tiny_dict
    d["strategies"] = d["strategies"][:1]
    d["output"] = {"trace": False}
    est = estimate_run(scenario_from_dict(d))
    steps = [replace(s, result=est.balanced.result) for s in est.steps]
    timeline, summary = integrate(
        est.scenario, steps, est.balanced, est.balanced_step_s, est.gate_records
    )
    assert len(timeline) == len(est.timeline)
    (s,) = summary.values()
    causes = s.attribution.by_cause()
    for cause in ("routing_imbalance", "hardware_stragglers", "expert_migration", "failures"):
        assert causes[cause] == pytest.approx(0, abs=1e-12)
    for cause in ("compute", "communication", "pipeline_bubble"):
        assert causes[cause] > 0
    assert _attributed(s) == pytest.approx(s.gpu_hours, rel=1e-9)
    assert s.imbalance_cost_usd == pytest.approx(0, abs=1e-9)
