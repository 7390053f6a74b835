"""Fixtures for the numerical-gate tests: a small valid scenario and seeded generators.

``make_scenario`` builds the tests' base scenario (:data:`base_scenario.BASE`: 16 experts,
top-2, one 8-GPU node, expert parallelism 8) with section-level overrides, so a test states only
what it varies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from base_scenario import BASE, derive

from moesim.scenario import Scenario, scenario_from_dict


def build_scenario(**sections: dict[str, Any]) -> Scenario:
    """The tests' base scenario with each named section updated key by key (nested dicts
    merged)."""
    return scenario_from_dict(derive(BASE, **sections))


@pytest.fixture(scope="session")
def make_scenario() -> Callable[..., Scenario]:
    """Factory: ``make_scenario(model={"moe": {"top_k": 4}}, gate={...})``."""
    return build_scenario


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator, fresh for every test."""
    return np.random.default_rng(20240601)
