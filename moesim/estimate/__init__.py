"""Run estimates: sample steps along the training timeline, integrate step time into
wall-clock, GPU-hours and cost per balancing strategy, against perfectly balanced routing."""

from __future__ import annotations

from moesim.estimate.montecarlo import estimate_with_bands
from moesim.estimate.run import (
    BALANCED,
    RunEstimate,
    SimulatedStep,
    estimate_run,
    run_names,
    sample_steps,
)

__all__ = [
    "BALANCED",
    "RunEstimate",
    "SimulatedStep",
    "estimate_run",
    "estimate_with_bands",
    "run_names",
    "sample_steps",
]
