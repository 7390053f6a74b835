"""A global batch that ramps up: fewer micro-batches early, the ramp its own segment."""

from __future__ import annotations

import pytest

from moesim.errors import ScenarioError
from moesim.estimate import estimate_run, scenario_points
from moesim.scenario import scenario_from_dict


def _ramped(tiny_dict, start=4, over=5.0e5):
    d = tiny_dict
    d["training"].update(global_batch_sequences=16, total_tokens=2.0e6)
    d["training"]["batch_ramp"] = {"start_sequences": start, "over_tokens": over}
    d["output"] = {"trace": False}
    return scenario_from_dict(d)


def test_ramp_schedule_counts_tokens_and_steps(tiny_dict):
    plain = scenario_from_dict(tiny_dict)
    sc = _ramped(tiny_dict)
    assert sc.ramp_steps > 0
    batches = [sc.batch_sequences_at(t) for t in range(sc.total_steps)]
    assert batches[0] == 4
    assert batches[-1] == 16
    assert batches == sorted(batches)  # never shrinks
    assert all(b % 4 == 0 for b in batches)  # whole micro-batches (micro × EP × DP = 4)
    assert sc.total_steps > plain.total_steps  # smaller early steps: more of them
    assert sc.tokens_before(sc.total_steps) >= sc.training.total_tokens
    assert sc.tokens_before(sc.total_steps - 1) < sc.training.total_tokens
    assert sc.micro_batches_at(0) == 1
    assert sc.micro_batches_at(sc.total_steps - 1) == 4


def test_ramp_is_its_own_segment_and_simulated_at_its_batch(tiny_dict):
    sc = _ramped(tiny_dict)
    points, lengths = scenario_points(sc)
    assert lengths[0] == sc.ramp_steps
    assert sum(lengths) == sc.total_steps
    tiny = sc.model_copy(update={"strategies": sc.strategies[:1]})
    est = estimate_run(tiny)
    assert len(est.balanced_step_s) == 2  # the ramp's batch and the full one
    ramp, *rest = [s for s in est.steps]
    assert est.scenario.micro_batches_at(ramp.step) < est.scenario.micro_batches
    # A smaller batch takes less time per step.
    assert ramp.result.step_time_s < rest[-1].result.step_time_s
    last = est.timeline[-1]
    assert last.tokens == pytest.approx(sc.training.total_tokens)
    assert est.timeline[0].batch_sequences < last.batch_sequences


def test_ramp_start_above_the_batch_is_refused(tiny_dict):
    with pytest.raises(ScenarioError, match="start_sequences"):
        _ramped(tiny_dict, start=32)
