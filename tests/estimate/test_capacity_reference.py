"""Token dropping: a routed step is compared with its own kept work balanced, so routing
imbalance never comes out negative because the routed step did less work."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.estimate import estimate_run
from moesim.gate import RoutingSample, balanced_like
from moesim.scenario import scenario_from_dict


def test_balanced_like_keeps_each_cells_work_and_spreads_it_evenly():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(2, 3, 4, 8))  # (layers, micro, sources, experts)
    dest = rng.integers(0, 30, size=(2, 3, 4, 4))
    node = rng.integers(0, 40, size=(2, 3, 4, 2))
    sample = RoutingSample(
        step=5,
        counts=counts,
        dest_tokens=dest,
        metrics={"maxvio_batch": 1.0, "maxvio_micro": 1.0, "dropped_fraction": 0.2},
        node_tokens=node,
    )
    even = balanced_like(sample)
    for ours, theirs in ((even.counts, counts), (even.dest_tokens, dest), (even.node_tokens, node)):
        assert ours.shape == theirs.shape
        np.testing.assert_array_equal(ours.sum(axis=-1), theirs.sum(axis=-1))  # same work
        assert (ours.max(axis=-1) - ours.min(axis=-1)).max() <= 1  # as even as integers allow
    assert even.step == 5
    assert even.metrics["maxvio_batch"] == 0.0
    assert even.metrics["dropped_fraction"] == 0.2


@pytest.mark.parametrize("factor", [1.0, 1.25])
def test_imbalance_is_not_negative_when_tokens_are_dropped(tiny_dict, factor):
    tiny_dict["router"] = {**tiny_dict.get("router", {}), "capacity": {"factor": factor}}
    tiny_dict["output"] = {"trace": False}
    est = estimate_run(scenario_from_dict(tiny_dict))
    for name, s in est.summary.items():
        assert s.routing.dropped_fraction > 0.05, name  # the case this test is about
        assert s.imbalance_gpu_hours >= 0.0, name
        assert s.attribution.routing_imbalance_gpu_hours >= 0.0, name
        # Per sampled point too: every step against its own kept work balanced.
        for row in est.timeline:
            assert row.step_time_s >= row.balanced_step_time_s, (name, row.point)
    steps = [s for s in est.steps if s.balanced_step_time_s is not None]
    assert len(steps) == len(est.steps)
    # Less kept work than the full balanced step: the old reference would have been too slow.
    assert max(s.balanced_step_time_s for s in steps) < est.balanced.result.step_time_s


def test_without_capacity_the_run_reference_stands_for_every_step(tiny_dict):
    tiny_dict["output"] = {"trace": False}
    tiny_dict["strategies"] = tiny_dict["strategies"][:1]
    est = estimate_run(scenario_from_dict(tiny_dict))
    assert all(s.balanced_step_time_s is None for s in est.steps)
