"""Shared fixtures: the ``tiny`` scenario (as a dict and validated; see
:mod:`base_scenario` for how it derives from the tests' base scenario) and a seeded RNG."""

from __future__ import annotations

import copy
import os
from typing import Any

# Small matrices: BLAS threads only add overhead (and contention on a 2-core CI machine).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from base_scenario import TINY  # noqa: E402

from moesim.scenario import Scenario, scenario_from_dict  # noqa: E402


@pytest.fixture(autouse=True)
def _gate_cache_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test gets its own empty gate cache (never the user's), so no test sees another's
    trained gates; subprocesses inherit it through the environment."""
    monkeypatch.setenv("MOESIM_CACHE_DIR", str(tmp_path_factory.mktemp("gate-cache")))


@pytest.fixture
def tiny_dict() -> dict[str, Any]:
    """A deep copy of a small valid scenario, free to modify."""
    return copy.deepcopy(TINY)


@pytest.fixture
def tiny_scenario(tiny_dict: dict[str, Any]) -> Scenario:
    return scenario_from_dict(tiny_dict)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
