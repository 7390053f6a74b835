"""Load metrics (docs/model/gate.md)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.gate.metrics import coefficient_of_variation, expert_counts, max_vio


def test_max_vio_values() -> None:
    assert float(max_vio([5, 5, 5, 5])) == 0.0
    assert float(max_vio([10, 0, 0, 0])) == pytest.approx(3.0)  # E − 1
    assert float(max_vio([3, 1, 2, 2])) == pytest.approx(0.5)
    assert float(max_vio([0, 0, 0])) == 0.0


def test_max_vio_reduces_the_last_axis() -> None:
    counts = np.array([[[4, 4], [6, 2]], [[8, 0], [1, 3]]])
    np.testing.assert_allclose(max_vio(counts), [[0.0, 0.5], [1.0, 0.5]])


def test_coefficient_of_variation() -> None:
    assert float(coefficient_of_variation([2, 2, 2])) == 0.0
    assert float(coefficient_of_variation([1, 3])) == pytest.approx(0.5)


def test_expert_counts() -> None:
    selected = np.array([[0, 2], [2, 3], [0, 2]])
    np.testing.assert_array_equal(expert_counts(selected, 5), [2, 0, 3, 1, 0])
    weighted = expert_counts(selected, 5, weights=np.array([1, 4, 2]))
    np.testing.assert_array_equal(weighted, [3, 0, 7, 4, 0])
    assert weighted.dtype == np.int64
