"""The hardware each sampled step runs on: the run's persistent faults (slow GPUs, degraded
ports) plus that step's throttling and link episodes and per-op jitter, drawn once per point so
every strategy meets the same hardware (common random numbers); and a step simulated on it,
with the same step on healthy hardware for the attribution of straggler time."""

from __future__ import annotations

import numpy as np

from moesim.cluster.stragglers import (
    HardwareState,
    JitterSource,
    draw_run_state,
    draw_step_state,
)
from moesim.engine import StepContext, StepResult, simulate_step
from moesim.engine.recorder import NullRecorder
from moesim.estimate.seeds import SeedPlan
from moesim.scenario.schema import Scenario

PointHardware = tuple[HardwareState, np.random.SeedSequence]
"""A point's hardware state and the seed of its per-op jitter stream."""

# Episodes are drawn over a few step times so that every op of a step falls inside them.
HORIZON_STEPS = 3.0


def point_hardware(
    scenario: Scenario, seeds: SeedPlan, points: int, step_time_s: float
) -> list[PointHardware] | None:
    """Per sampled point: the hardware condition of its step (the run's persistent slow GPUs
    and degraded ports, plus that step's throttling and link episodes) and the seed of its
    per-op jitter; None when the scenario has no hardware faults."""
    faults = scenario.faults
    if not faults.hardware_active:
        return None
    gpus = scenario.cluster.gpus
    run_seed, point_seeds = seeds.hardware(points)
    run_state = draw_run_state(faults, gpus, np.random.default_rng(run_seed))
    out = []
    for point_seed in point_seeds:
        state_seed, jitter_seed = point_seed.spawn(2)
        state = draw_step_state(
            faults,
            run_state,
            gpus,
            HORIZON_STEPS * step_time_s,
            np.random.default_rng(state_seed),
            link_average_s=step_time_s,
        )
        out.append((state, jitter_seed))
    return out


def simulate_on(
    ctx: StepContext,
    counts: np.ndarray,
    dest_tokens: np.ndarray,
    node_tokens: np.ndarray | None,
    hardware: PointHardware | None,
    recorder: NullRecorder | None = None,
) -> tuple[StepResult, float | None]:
    """The step on the point's hardware (its state and a fresh jitter stream from its seed)
    and, when that hardware has faults, the same step's time on healthy hardware."""
    if hardware is None:
        return simulate_step(ctx, counts, dest_tokens, recorder, node_tokens), None
    state, jitter_seed = hardware
    jitter = JitterSource(ctx.scenario.faults.jitter.sigma, np.random.default_rng(jitter_seed))
    result = simulate_step(
        ctx, counts, dest_tokens, recorder, node_tokens, hardware=state, jitter=jitter
    )
    healthy = simulate_step(ctx, counts, dest_tokens, node_tokens=node_tokens)
    return result, healthy.step_time_s
