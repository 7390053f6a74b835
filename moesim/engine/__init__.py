"""The SimPy model of the cluster: the only package that imports simpy.

Where to start reading:

- :func:`~moesim.engine.step.simulate_step` (:mod:`moesim.engine.step`) runs one training step:
  every pipeline rank walks its schedule (:mod:`moesim.engine.schedules`: 1F1B, interleaved,
  ZB-H1, DualPipe), each MoE layer's dispatch and combine are priced by the rank's
  :class:`~moesim.engine.exchange_tables.ExchangeTables` (per-flow durations computed once per
  routing cell, replayed as max-plus products), experts run per GPU, and the gradient
  synchronisation closes the step; it returns a :class:`~moesim.engine.step.StepResult`.
- :mod:`moesim.engine.alltoall`: the port model of an exchange (paths, relays, leaf links,
  processor sharing at a port) and the link accounting.

The network model, its assumptions and its measured error against a flow-level max-min
reference (kept with the tests, ``tests/support/``) are described in ``docs/model/network.md``;
the schedules in ``docs/model/schedules.md``.
"""

from __future__ import annotations

from moesim.engine.step import StepContext, StepResult, build_context, simulate_step

__all__ = [
    "StepContext",
    "StepResult",
    "build_context",
    "simulate_step",
]
