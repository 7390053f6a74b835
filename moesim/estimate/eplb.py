"""Redundant experts (EPLB): each run's steps again under the placement in force at the step,
with the expert migrations between recomputations charged to the run's wall time."""

from __future__ import annotations

import numpy as np

from moesim.cluster.model_costs import model_costs
from moesim.cluster.placement import (
    apply_placement,
    eplb_placement,
    expert_state_bytes,
    layer_loads,
    migration_bytes,
)
from moesim.engine import StepContext
from moesim.estimate.hardware import PointHardware, simulate_on
from moesim.estimate.records import EPLB_SUFFIX, SimulatedStep
from moesim.estimate.routing import SampleAt
from moesim.gate import RoutingSample
from moesim.scenario.schema import Scenario


def eplb_steps(scenario: Scenario, points: list[int]) -> list[int]:
    """Steps whose routing the redundant-expert placements in force at ``points`` were
    computed from: the last recomputation before each point and the one before it."""
    if not scenario.eplb.enabled:
        return []
    every = scenario.eplb.interval_steps
    out = []
    for step in points:
        last = step - step % every
        out += [last, max(0, last - every)]
    return out


def eplb_step(
    ctx: StepContext,
    static: SimulatedStep,
    sample: RoutingSample,
    samples: SampleAt,
    seed: np.random.SeedSequence,
    hardware: PointHardware | None = None,
) -> SimulatedStep:
    """The step ``static`` (of the static placement, routed as ``sample``) under the
    redundant-expert placement in force at its step, on the same hardware.

    The placement was computed at the last recomputation step ``r`` from the loads of a batch
    routed then (the gate's routers at ``r``), aligned with the one computed at ``r − N``; the
    migration between the two, once per ``N`` steps, is charged to the segment's wall time.
    Replicas' extra gradient synchronisation is not modelled.
    """
    sc = ctx.scenario
    point, step = static.point, static.step
    every = sc.eplb.interval_steps
    last = step - step % every
    lay = ctx.layout
    slots = lay.experts_per_rank + sc.eplb.redundant_per_rank
    nodes = sc.ep_nodes
    now_rng, before_rng = (np.random.default_rng(s) for s in seed.spawn(2))
    loads = layer_loads(samples(point, last, now_rng).counts)
    loads_before = layer_loads(samples(point, max(0, last - every), before_rng).counts)
    before = eplb_placement(loads_before, slots, lay.expert, nodes, nodes)
    placement = eplb_placement(loads, slots, lay.expert, nodes, nodes, previous=before)
    tokens = sc.parallelism.micro_batch_size * sc.model.seq_len
    placed = apply_placement(
        sample.counts, placement, sample.dest_tokens, sample.node_tokens, tokens=tokens
    )
    assert placed.dest_tokens is not None
    result, healthy = simulate_on(
        ctx, placed.counts, placed.dest_tokens, placed.node_tokens, hardware
    )
    costs = model_costs(sc.model)
    shards = sc.parallelism.data if sc.parallelism.zero1 else 1
    moe_per_stage = max(
        sum(1 for layer in piece if layer >= sc.model.dense_layers) for piece in ctx.piece_layers
    )
    move = migration_bytes(
        before,
        placement,
        expert_state_bytes(costs.expert_params, optimizer_shards=shards),
        sc.cluster.nic.bandwidth_bytes_per_s,
        layer_weight=np.full(placement.layers, max(1.0, moe_per_stage / sc.gate.layers_simulated)),
        # An EP group smaller than a node lies inside one node (the schema makes it divide it).
        ranks_per_node=min(sc.cluster.gpus_per_node, sc.parallelism.expert),
        intra_node_bytes_per_s=sc.cluster.nvlink_bytes_per_s,
    )
    metrics = dict(sample.metrics)
    metrics["eplb_migration_s"] = move.seconds
    metrics["eplb_migration_bytes"] = move.bytes
    return SimulatedStep(
        static.strategy + EPLB_SUFFIX,
        point,
        step,
        static.segment_steps,
        metrics,
        result,
        static.expert_load,
        extra_wall_s=move.seconds * static.segment_steps / every,
        healthy_step_time_s=healthy,
        gate_record=static.gate_record,
        balanced_step_time_s=static.balanced_step_time_s,  # the same kept work
    )
