"""Helpers of :mod:`moesim.gate.study` (the published-result tests and the notebook use them)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.gate import train_gate
from moesim.gate.study import (
    frontier_at,
    head_mean,
    maxvio_by_batch,
    pareto_front,
    smooth,
    tail_mean,
)
from moesim.scenario.strategies import NoBalancing


def test_smooth_is_a_trailing_mean() -> None:
    np.testing.assert_allclose(smooth([1, 2, 3, 4, 5], 2), [1, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(smooth([3, 1], 1), [3, 1])
    np.testing.assert_allclose(smooth([1, 2, 3], 10), [1, 1.5, 2])
    with pytest.raises(ValueError, match="window"):
        smooth([1.0], 0)


def test_pareto_front_and_frontier() -> None:
    # (MaxVio, loss): point 4 is dominated by point 3; point 0 ties point 1 on loss.
    x = [1.3, 1.2, 1.1, 0.9, 1.0]
    y = [0.15, 0.15, 0.18, 0.28, 0.40]
    front = pareto_front(x, y)
    assert front.tolist() == [3, 2, 1]
    assert frontier_at(x, y, 0.05) == pytest.approx(0.28)  # better balance than any point
    assert frontier_at(x, y, 1.0) == pytest.approx(0.23)  # between points 3 and 2
    assert frontier_at(x, y, 5.0) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="shapes"):
        pareto_front([1.0, 2.0], [1.0])


def test_trajectory_summaries_and_batch_maxvio(make_scenario) -> None:  # type: ignore[no-untyped-def]
    scenario = make_scenario(
        gate={"batch_sequences": 8, "tokens_per_sequence": 8, "layers_simulated": 2},
        stream={"dim": 16},
        training={"total_tokens": 10 * 64 * 1024},
    )
    run = train_gate(scenario, NoBalancing(kind="none"), [], np.random.SeedSequence(3))
    values = run.column("task_loss")
    assert tail_mean(run, "task_loss", 0.2) == pytest.approx(values[-2:].mean())
    assert tail_mean(run, "task_loss", 1.0) == pytest.approx(values.mean())
    assert head_mean(run, "task_loss", 3) == pytest.approx(values[:3].mean())
    with pytest.raises(ValueError, match="fraction"):
        tail_mean(run, "task_loss", 0)

    per_batch, pooled = maxvio_by_batch(scenario, run, 4, batches=5, seed=2)
    assert (per_batch, pooled) == maxvio_by_batch(scenario, run, 4, batches=5, seed=2)
    # Batches of equal size, no drops: max of a sum ≤ sum of the maxima, so pooling never
    # raises MaxVio.
    assert 0 <= pooled <= per_batch
    one_batch = maxvio_by_batch(scenario, run, 4, batches=1, seed=2)
    assert one_batch[0] == pytest.approx(one_batch[1])
    assert one_batch[0] <= 15  # E − 1: one expert takes everything
