"""The SimPy model of the cluster: the only package that imports simpy.

:func:`simulate_step` runs one training step (1F1B pipeline, expert-parallel all-to-alls with
per-GPU expert queues, gradient all-reduce) over a fair-share network and returns a
:class:`StepResult`.
"""

from __future__ import annotations

from moesim.engine.network import FairShareNetwork, max_min_rates
from moesim.engine.step import StepContext, StepResult, build_context, simulate_step

__all__ = [
    "FairShareNetwork",
    "StepContext",
    "StepResult",
    "build_context",
    "max_min_rates",
    "simulate_step",
]
