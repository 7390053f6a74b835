"""MaxVio at its three scopes, dead experts, dropped fraction, distinct groups per token and the
topic × expert load matrix (docs/model/gate.md)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.gate.metrics import (
    dead_experts,
    distinct_groups_per_token,
    dropped_fraction,
    expert_counts,
    max_vio,
    max_vio_batch,
    max_vio_compute_batch,
    max_vio_global,
    relative_load,
    topic_expert_load,
)


def _counts() -> np.ndarray:
    """(L=2, M=2, n_src=4, E=4): sources 0–1 and 2–3 are skewed in opposite directions."""
    c = np.zeros((2, 2, 4, 4), dtype=np.int64)
    c[:, :, 0] = c[:, :, 1] = [6, 2, 0, 0]
    c[:, :, 2] = c[:, :, 3] = [0, 0, 2, 6]
    c[1, 1] = [[2, 2, 2, 2]] * 4
    return c


def test_scopes_differ_as_they_should() -> None:
    c = _counts()
    # Per rank (finest): every skewed cell has MaxVio (6 − 2)/2 = 2.
    per_rank = max_vio_compute_batch(c, 1)
    assert per_rank == pytest.approx((3 * 2.0 + 0.0) / 4)
    # An EP group of two sources: still one-sided.
    assert max_vio_compute_batch(c, 2) == pytest.approx(per_rank)
    # All four sources: opposite skews cancel to [12, 4, 4, 12] → 0.5.
    assert max_vio_compute_batch(c) == pytest.approx((3 * 0.5 + 0.0) / 4)
    # Whole step per layer: layer 0 [24, 8, 8, 24] → 0.5; layer 1 [20, 12, 12, 20] → 0.25.
    assert max_vio_batch(c) == pytest.approx((0.5 + 0.25) / 2)
    with pytest.raises(ValueError, match="sources_per_batch"):
        max_vio_compute_batch(c, 3)


def test_max_vio_global_accumulates_samples() -> None:
    a = np.zeros((1, 1, 1, 2), dtype=np.int64)
    a[..., 0] = 10
    b = np.zeros((1, 1, 1, 2), dtype=np.int64)
    b[..., 1] = 10
    assert max_vio_global(a) == pytest.approx(1.0)
    assert max_vio_global([a, b]) == pytest.approx(0.0)  # balanced over the two steps
    assert max_vio_global([a, b, a]) == pytest.approx(float(max_vio([20, 10])))
    with pytest.raises(ValueError, match="no samples"):
        max_vio_global([])


def test_dead_experts_and_dropped_fraction() -> None:
    np.testing.assert_array_equal(dead_experts([[0, 3, 0, 1], [1, 1, 1, 1]]), [2, 0])
    assert dropped_fraction([1, 2], [10, 10]) == pytest.approx(0.15)
    assert dropped_fraction(0, 0) == 0.0


def test_distinct_groups_per_token() -> None:
    selected = np.array([[0, 1, 2, 3], [0, 4, 8, 12], [4, 5, 12, 13]])
    assert distinct_groups_per_token(selected, 4) == pytest.approx((1 + 4 + 2) / 3)
    assert distinct_groups_per_token(selected, 16) == 1.0
    dropped = np.array(
        [[True, True, True, True], [False, True, True, False], [True, False, True, True]]
    )
    # Token 0 reaches nothing, token 1 groups 0 and 3, token 2 group 1 only.
    assert distinct_groups_per_token(selected, 4, dropped) == pytest.approx((0 + 2 + 1) / 3)
    weights = np.array([1, 2, 1])
    assert distinct_groups_per_token(selected, 4, weights=weights) == pytest.approx((1 + 8 + 2) / 4)


def test_topic_expert_load_and_relative_load() -> None:
    selected = np.array([[0, 1], [0, 2], [3, 1]])
    topics = np.array([1, 1, 0])
    load = topic_expert_load(selected, topics, 2, 4)
    np.testing.assert_array_equal(load, [[0, 1, 0, 1], [2, 1, 1, 0]])
    assert load.sum() == selected.size
    dropped = np.array([[False, True], [False, False], [False, False]])
    np.testing.assert_array_equal(
        topic_expert_load(selected, topics, 2, 4, dropped), [[0, 1, 0, 1], [2, 0, 1, 0]]
    )
    np.testing.assert_allclose(relative_load(load), [[0, 2, 0, 2], [2, 1, 1, 0]])
    np.testing.assert_allclose(relative_load([0, 0]), [0, 0])
    with pytest.raises(ValueError, match="topic_ids"):
        topic_expert_load(selected, topics[:2], 2, 4)


def test_expert_counts_exclude_dropped() -> None:
    selected = np.array([[0, 2], [2, 3], [0, 2]])
    dropped = np.array([[False, True], [False, False], [True, False]])
    np.testing.assert_array_equal(expert_counts(selected, 4, dropped=dropped), [1, 0, 2, 1])
    np.testing.assert_array_equal(
        expert_counts(selected, 4, weights=np.array([1, 4, 2]), dropped=dropped), [1, 0, 6, 4]
    )
