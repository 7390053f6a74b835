"""From a scenario to a run estimate: the gate trains over the whole run, the engine simulates
steps sampled along it, and the step times integrate into wall-clock, GPU-hours and dollars.

The parts live in their own modules: :mod:`~moesim.estimate.timeline` (sampled steps, runs
compared, the integration), :mod:`~moesim.estimate.routing` (gate training or trace replay),
:mod:`~moesim.estimate.hardware` (straggler hardware per point), :mod:`~moesim.estimate.eplb`
(redundant experts), :mod:`~moesim.estimate.attribution` (GPU-hours by cause) and
:mod:`~moesim.estimate.seeds` (the seed plan). This module runs them in order.

Common random numbers: every strategy sees the same token stream, the same teacher, the same
router initialisation and the same engine-sample sequences (all from the scenario's seed plan),
so differences between strategies come from the strategies, not from sampling noise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from moesim.engine import StepContext, build_context, simulate_step
from moesim.engine.recorder import NullRecorder, SliceRecorder
from moesim.estimate.eplb import eplb_step, eplb_steps
from moesim.estimate.hardware import point_hardware, simulate_on
from moesim.estimate.memory import check_memory
from moesim.estimate.records import BALANCED, RunEstimate, SimulatedStep
from moesim.estimate.routing import dense_sample, domain_skew, routing_sources, topic_load
from moesim.estimate.seeds import SeedPlan
from moesim.estimate.threads import blas_threads
from moesim.estimate.timeline import integrate, scenario_points
from moesim.gate import RoutingSample, balanced_like, balanced_sample
from moesim.scenario.schema import Scenario


def estimate_run(
    scenario: Scenario,
    progress: Callable[[str], None] | None = None,
    workers: int = 1,
) -> RunEstimate:
    """Train the gate under each strategy, simulate the sampled steps, integrate the run.

    Parameters
    ----------
    scenario : Scenario
    progress : callable, optional
        Called with a short label after each unit of work (gate training, each engine step).
    workers : int
        Processes for the strategies' gate training (identical results for any value).
    """
    with blas_threads():
        return _estimate_run(scenario, progress, workers)


def _estimate_run(
    scenario: Scenario,
    progress: Callable[[str], None] | None,
    workers: int,
) -> RunEstimate:
    tick = progress or (lambda _label: None)
    ctx = build_context(scenario)
    memory = check_memory(scenario, ctx.piece_layers).gib()  # refuse before simulating
    contexts = {scenario.micro_batches: ctx}

    def context_at(step: int) -> StepContext:
        """The step model for that step's batch (fewer micro-batches during a ramp)."""
        n = scenario.micro_batches_at(step)
        if n not in contexts:
            contexts[n] = build_context(scenario, n)
        return contexts[n]

    lay = ctx.layout
    n_src, n_dest = lay.gpus_per_stage, lay.expert
    points, lengths = scenario_points(scenario)
    seeds = SeedPlan(scenario.seed)

    # The balanced reference runs the last segment's batch (the full batch after any ramp).
    reference = points[-1]

    def reference_sample(step: int) -> RoutingSample:
        if scenario.model.moe is None:  # nothing routed: the step is its own reference
            return dense_sample(scenario, step, n_src)
        return balanced_sample(scenario, step, n_src, n_dest)

    bal = reference_sample(reference)
    balanced = SimulatedStep(
        BALANCED,
        0,
        reference,
        scenario.total_steps,
        dict(bal.metrics),
        simulate_step(
            context_at(reference), bal.counts, bal.dest_tokens, node_tokens=bal.node_tokens
        ),
        bal.counts.sum(axis=(1, 2)),
    )
    tick("balanced reference step")
    balanced_s = {scenario.micro_batches_at(reference): balanced.result.step_time_s}
    for step in points:  # batch-ramp steps: their own balanced reference step time
        n = scenario.micro_batches_at(step)
        if n not in balanced_s:
            ramp = reference_sample(step)
            balanced_s[n] = simulate_step(
                context_at(step), ramp.counts, ramp.dest_tokens, node_tokens=ramp.node_tokens
            ).step_time_s
    hardware = point_hardware(scenario, seeds, len(points), balanced.result.step_time_s)

    point_seeds = seeds.samples(len(points))  # once: every strategy gets the same seeds
    simulated: list[SimulatedStep] = []
    gate_records: dict[str, list[dict[str, float]]] = {}
    traced = None
    specialisation: dict[str, npt.NDArray[np.int64]] = {}
    gate_windows: dict[str, dict[str, float]] = {}
    by_domain: list[dict[str, float | int | str]] = []
    snapshots = sorted(set(points) | set(eplb_steps(scenario, points)))
    for source in routing_sources(scenario, snapshots, seeds, n_src, n_dest, workers):
        name = source.name
        if source.gate is not None:
            specialisation[name] = topic_load(scenario, source.gate, seeds)
            gate_windows[name] = source.gate.tail_summary()
            by_domain.extend(domain_skew(scenario, name, source.gate, seeds))
        gate_records[name] = source.records
        tick(f"{name}: routing ready")
        if traced is None and scenario.output.trace:
            traced = (name, len(points) // 2)  # the trace shows the first run's middle point
        for i, (step, length) in enumerate(zip(points, lengths, strict=True)):
            step_ctx = context_at(step)
            point_hw = None if hardware is None else hardware[i]
            sample = source.sample(i, step, np.random.default_rng(point_seeds[i]))
            recorder = (
                SliceRecorder(scenario.traced_gpus) if traced == (name, i) else NullRecorder()
            )
            result, healthy = simulate_on(
                step_ctx,
                sample.counts,
                sample.dest_tokens,
                sample.node_tokens,
                point_hw,
                recorder,
            )
            kept_balanced = None
            if scenario.router.capacity is not None:
                # A step that dropped tokens is compared with its own kept work balanced, not
                # with the full work: imbalance is how the work is spread, not how much.
                like = balanced_like(sample)
                kept_balanced = simulate_step(
                    step_ctx, like.counts, like.dest_tokens, node_tokens=like.node_tokens
                ).step_time_s
            static = SimulatedStep(
                name,
                i,
                step,
                length,
                dict(sample.metrics),
                result,
                sample.counts.sum(axis=(1, 2)),
                healthy_step_time_s=healthy,
                gate_record=source.record_at(step),
                balanced_step_time_s=kept_balanced,
            )
            simulated.append(static)
            if scenario.eplb.enabled:
                simulated.append(
                    eplb_step(step_ctx, static, sample, source.sample, point_seeds[i], point_hw)
                )
            tick(f"{name}: step {step}")
    links = [ctx.topology.link_name(i) for i in range(ctx.topology.links)]
    timeline, summary = integrate(
        scenario, simulated, balanced, balanced_s, gate_records, gate_windows
    )
    return RunEstimate(
        scenario,
        simulated,
        balanced,
        gate_records,
        links,
        specialisation,
        balanced_s,
        summary=summary,
        timeline=timeline,
        gate_windows=gate_windows,
        routing_by_domain=by_domain,
        kernels=ctx.compute.kernels(ctx.compute.balanced_rows(scenario.parallelism.expert)),
        memory=memory,
    )
