"""The numerical gate: routers trained under a balancing strategy, in pure numpy.

The gate produces the expert load the cluster engine simulates. A synthetic token stream
(:mod:`~moesim.gate.stream`) feeds top-k routers (:mod:`~moesim.gate.router`) trained against a
teacher objective (:mod:`~moesim.gate.teacher`) under a balancing strategy
(:mod:`~moesim.gate.balancing`); :func:`train_gate` runs one strategy over the scenario's steps and
keeps router snapshots, and :func:`routing_sample` turns a snapshot into per-rank loads for the
engine (:class:`RoutingSample`). Formulas follow ``reference/routing.md`` (§1–3, §5.1, §6.2–6.3,
§10). Nothing here imports the engine or an event loop.
"""

from __future__ import annotations

from moesim.gate.metrics import max_vio
from moesim.gate.router import RouterState, Routing, route
from moesim.gate.sample import RoutingSample
from moesim.gate.sampling import balanced_sample, routing_sample
from moesim.gate.stream import TokenStream
from moesim.gate.training import GateTrajectory, train_gate

__all__ = [
    "GateTrajectory",
    "RouterState",
    "Routing",
    "RoutingSample",
    "TokenStream",
    "balanced_sample",
    "max_vio",
    "route",
    "routing_sample",
    "train_gate",
]
