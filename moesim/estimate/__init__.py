"""Run estimates: sample steps along the training timeline, integrate step time into
wall-clock, GPU-hours and cost per balancing strategy, against perfectly balanced routing.

The records (:mod:`moesim.estimate.records`) and the pure parts import without the engine, so
:mod:`moesim.results` can read a run without SimPy; :func:`estimate_run` and
:func:`estimate_with_bands`, which drive the engine, are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moesim.estimate.records import (
    BALANCED,
    CAUSES,
    Attribution,
    BandRow,
    RoutingSummary,
    RunEstimate,
    RunSummary,
    SimulatedStep,
    TimelineRow,
)
from moesim.estimate.seeds import SeedPlan
from moesim.estimate.timeline import integrate, run_names, sample_steps, scenario_points

if TYPE_CHECKING:
    from moesim.estimate.montecarlo import estimate_with_bands, with_bands
    from moesim.estimate.run import estimate_run

_ENGINE = {
    "estimate_run": "moesim.estimate.run",
    "estimate_with_bands": "moesim.estimate.montecarlo",
    "with_bands": "moesim.estimate.montecarlo",
}


def __getattr__(name: str) -> Any:
    """The engine-driving entry points, imported when first asked for."""
    if name in _ENGINE:
        import importlib

        return getattr(importlib.import_module(_ENGINE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BALANCED",
    "CAUSES",
    "Attribution",
    "BandRow",
    "RoutingSummary",
    "RunEstimate",
    "RunSummary",
    "SeedPlan",
    "SimulatedStep",
    "TimelineRow",
    "estimate_run",
    "estimate_with_bands",
    "integrate",
    "run_names",
    "sample_steps",
    "scenario_points",
    "with_bands",
]
