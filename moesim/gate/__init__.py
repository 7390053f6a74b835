"""The numerical gate: routers trained under a balancing strategy, in pure numpy.

The gate produces the expert load the cluster engine simulates. A synthetic token stream
(:mod:`~moesim.gate.stream`) feeds top-k routers (:mod:`~moesim.gate.router`) trained on a small
MoE task whose experts learn (:mod:`~moesim.gate.experts`; or a fixed teacher router,
:mod:`~moesim.gate.teacher`) under a balancing strategy (:mod:`~moesim.gate.balancing`);
:func:`train_gate` runs one strategy over the scenario's steps and keeps router snapshots, and
:func:`routing_sample` turns a snapshot into per-rank loads for the engine
(:class:`RoutingSample`). The model, its equations and sources are in ``docs/model/gate.md``.
Nothing here imports the engine or an event loop.
"""

from __future__ import annotations

from moesim.gate.baselines import (
    ExpertChoice,
    expert_choice,
    expert_choice_leakage_bits,
    sinkhorn,
    sinkhorn_route,
)
from moesim.gate.metrics import (
    dead_experts,
    distinct_groups_per_token,
    dropped_fraction,
    max_vio,
    max_vio_batch,
    max_vio_compute_batch,
    max_vio_global,
    relative_load,
    topic_expert_load,
)
from moesim.gate.router import CapacitySpec, RouterState, Routing, capacity_kept, route
from moesim.gate.sample import RoutingSample
from moesim.gate.sampling import (
    balanced_like,
    balanced_sample,
    gate_layer_map,
    gate_layer_of,
    routing_sample,
    sample_metrics,
)
from moesim.gate.stream import TokenStream
from moesim.gate.trace import ExpertTrace, load_trace, scenario_trace, trace_sample, trace_samples
from moesim.gate.training import GateTrajectory, merge_layers, train_gate

__all__ = [
    "CapacitySpec",
    "ExpertChoice",
    "ExpertTrace",
    "GateTrajectory",
    "RouterState",
    "Routing",
    "RoutingSample",
    "TokenStream",
    "balanced_like",
    "balanced_sample",
    "capacity_kept",
    "dead_experts",
    "distinct_groups_per_token",
    "dropped_fraction",
    "expert_choice",
    "expert_choice_leakage_bits",
    "gate_layer_map",
    "gate_layer_of",
    "load_trace",
    "max_vio",
    "max_vio_batch",
    "max_vio_compute_batch",
    "max_vio_global",
    "merge_layers",
    "relative_load",
    "route",
    "routing_sample",
    "sample_metrics",
    "scenario_trace",
    "sinkhorn",
    "sinkhorn_route",
    "topic_expert_load",
    "trace_sample",
    "trace_samples",
    "train_gate",
]
