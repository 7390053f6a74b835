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

import math
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from moesim.engine import StepContext, build_context, simulate_step
from moesim.engine.recorder import NullRecorder, SliceRecorder
from moesim.estimate.eplb import eplb_step, eplb_steps
from moesim.estimate.gate_cache import GateCache
from moesim.estimate.hardware import PointHardware, point_hardware, simulate_on
from moesim.estimate.memory import check_memory
from moesim.estimate.records import BALANCED, RunEstimate, SimulatedStep
from moesim.estimate.routing import (
    SampleAt,
    dense_sample,
    domain_skew,
    routing_sources,
    topic_load,
)
from moesim.estimate.seeds import SeedPlan
from moesim.estimate.threads import blas_threads
from moesim.estimate.timeline import integrate, scenario_points
from moesim.gate import balanced_like, balanced_sample
from moesim.scenario.schema import Scenario

CacheChoice = GateCache | None | Literal["default"]
"""Where gates are cached: a :class:`GateCache`, None (no cache: neither read nor written), or
``"default"`` (:meth:`GateCache.default`, read from the environment at the call)."""

Progress = Callable[[str, float], None]
"""Called with a short label and the units of work just done (see :func:`run_work`)."""

# Progress weights: units of about a tenth of a second of one core of the machine the
# figures below were measured on (moesim run on DeepSeek-V3 and quickstart, 2-core x86 VM).
# Only the progress bar's ETA reads them; no result does.
_UNIT_S = 0.1
# Gate training: router multiply-adds (tokens × experts × dim per layer) per second.
_GATE_MACS_PER_S = 2.0e9
# Passes over (tokens × experts × dim) of a full update (routing twice, the task's forward and
# backward, the weight gradient) and of a bias step (one scoring).
_FULL_UPDATE_PASSES, _BIAS_STEP_PASSES = 6, 1
# An engine step: a fixed part plus a part per (micro-batch × layer) of one pipeline.
_STEP_FIXED_S, _STEP_PER_LAYER_MICRO_S = 0.1, 4.0e-4


def resolve_cache(cache: CacheChoice) -> GateCache | None:
    """The cache a ``cache=`` argument names."""
    return GateCache.default() if isinstance(cache, str) else cache


def gate_work(scenario: Scenario) -> float:
    """Progress units of one strategy's gate training (0 for a trace replay), from its router
    multiply-adds; a whole number, at least one."""
    moe = scenario.model.moe
    if scenario.gate.trace is not None or moe is None:  # a replay or a dense model: no gate
        return 0.0
    gate = scenario.gate
    every, steps = gate.steps_per_update, scenario.total_steps
    full = -(-steps // every)
    bias_sequences = gate.bias_batch_sequences or gate.batch_sequences
    per_token = gate.layers_simulated * moe.routed_experts * scenario.stream.dim
    macs = (
        per_token
        * gate.tokens_per_sequence
        * (
            full * gate.batch_sequences * _FULL_UPDATE_PASSES
            + (steps - full) * bias_sequences * _BIAS_STEP_PASSES
        )
    )
    return float(max(1, round(macs / _GATE_MACS_PER_S / _UNIT_S)))


def step_work(scenario: Scenario, step: int) -> float:
    """Progress units of simulating optimizer step ``step`` (its micro-batches × layers); a
    whole number, at least one."""
    layer_micro = scenario.micro_batches_at(step) * scenario.model.layers
    return float(max(1, round((_STEP_FIXED_S + _STEP_PER_LAYER_MICRO_S * layer_micro) / _UNIT_S)))


def run_work(scenario: Scenario) -> float:
    """Progress units of one :func:`estimate_run`: each simulated engine step (the balanced
    references, each run's sampled steps and their EPLB variants, :func:`step_work`) and each
    gate's training (:func:`gate_work`)."""
    points = scenario_points(scenario)[0]
    references = {scenario.micro_batches_at(p): p for p in points}
    gated = scenario.gate.trace is None and scenario.model.moe is not None
    runs = len(scenario.strategies) if gated else 1
    per_point = 2 if scenario.eplb.enabled else 1
    sampled = sum(step_work(scenario, p) for p in points)
    balanced = sum(step_work(scenario, p) for p in references.values())
    return balanced + runs * (gate_work(scenario) + per_point * sampled)


@dataclass(frozen=True)
class _PointTask:
    """One sampled step of one run: what :func:`_simulate_point` needs (picklable)."""

    scenario: Scenario
    name: str
    samples: SampleAt
    point: int
    step: int
    length: int
    hardware: PointHardware | None
    seed: np.random.SeedSequence
    eplb_seed: np.random.SeedSequence | None
    traced: bool
    gate_record: dict[str, float] | None


def _simulate_point(task: _PointTask, ctx: StepContext | None = None) -> list[SimulatedStep]:
    """The step's row, and its EPLB variant's when EPLB is on; ``ctx`` None (in a worker
    process) builds the step model for the step's batch."""
    sc = task.scenario
    if ctx is None:
        ctx = build_context(sc, sc.micro_batches_at(task.step))
    with blas_threads():
        sample = task.samples(task.point, task.step, np.random.default_rng(task.seed))
        recorder = SliceRecorder(sc.traced_gpus) if task.traced else NullRecorder()
        result, healthy = simulate_on(
            ctx, sample.counts, sample.dest_tokens, sample.node_tokens, task.hardware, recorder
        )
        kept_balanced = None
        if sc.router.capacity is not None:
            # A step that dropped tokens is compared with its own kept work balanced, not with
            # the full work: imbalance is how the work is spread, not how much.
            like = balanced_like(sample)
            kept_balanced = simulate_step(
                ctx, like.counts, like.dest_tokens, node_tokens=like.node_tokens
            ).step_time_s
        static = SimulatedStep(
            task.name,
            task.point,
            task.step,
            task.length,
            dict(sample.metrics),
            result,
            sample.counts.sum(axis=(1, 2)),
            healthy_step_time_s=healthy,
            gate_record=task.gate_record,
            balanced_step_time_s=kept_balanced,
        )
        if task.eplb_seed is None:
            return [static]
        variant = eplb_step(ctx, static, sample, task.samples, task.eplb_seed, task.hardware)
    return [static, variant]


def estimate_run(
    scenario: Scenario,
    progress: Progress | None = None,
    workers: int = 1,
    cache: CacheChoice = "default",
) -> RunEstimate:
    """Train the gate under each strategy, simulate the sampled steps, integrate the run.

    Parameters
    ----------
    scenario : Scenario
    progress : callable, optional
        Called with a short label and the units of work done as the run goes (gate training
        about every hundredth, each engine step); they add up to :func:`run_work`.
    workers : int
        Processes for the strategies' gate training (identical results for any value).
    cache : GateCache, None or "default"
        Where trained gates are looked up and stored (:mod:`moesim.estimate.gate_cache`);
        None trains every gate and stores nothing. The estimate is the same either way.
    """
    with blas_threads():
        return _estimate_run(scenario, progress, workers, resolve_cache(cache))


def _estimate_run(
    scenario: Scenario,
    progress: Progress | None,
    workers: int,
    cache: GateCache | None,
) -> RunEstimate:
    tick = progress or (lambda _label, _units: None)
    gate_units = gate_work(scenario)
    gate_done: dict[str, float] = {}

    def gate_tick(name: str, share: float) -> None:
        """A gate's training share as whole units: the part not yet reported (whole numbers
        add up exactly, so the bar ends at its total)."""
        done = float(math.floor(share * gate_units))
        if done > gate_done.get(name, 0.0):
            tick(f"{name}: gate {share:.0%}", done - gate_done.get(name, 0.0))
            gate_done[name] = done

    ctx = build_context(scenario)
    memory = check_memory(scenario, ctx.piece_layers).gib()  # refuse before simulating
    contexts = {scenario.micro_batches: ctx}

    def context_at(step: int) -> StepContext:
        """The step model for that step's batch (fewer micro-batches during a ramp)."""
        n = scenario.micro_batches_at(step)
        if n not in contexts:
            contexts[n] = build_context(scenario, n)
        return contexts[n]

    points, lengths = scenario_points(scenario)
    seeds = SeedPlan(scenario.seed)
    # With several workers the simulated steps run in a process pool (each is independent of
    # the others given its inputs, so the rows are the same); their rows keep the run order.
    # Its workers run at a lower priority: the gates' training, which the last steps wait
    # for, keeps the cores while it runs, and the steps fill the cores it leaves idle.
    pool = (
        ProcessPoolExecutor(max_workers=workers, initializer=_behind_training)
        if workers > 1
        else None
    )
    try:
        return _simulate_run(
            scenario, ctx, context_at, memory, points, lengths, seeds, pool, tick, gate_tick,
            workers, cache,
        )  # fmt: skip
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


STEP_NICENESS = 10
"""How much the sampled steps' worker processes lower their priority (Unix ``nice``)."""


def _behind_training() -> None:
    """A sampled-step worker's initializer: a lower scheduling priority where the system has
    one (raising one's own niceness needs no privilege)."""
    if hasattr(os, "nice"):
        os.nice(STEP_NICENESS)


def _reference_step(scenario: Scenario, step: int, ctx: StepContext | None = None) -> SimulatedStep:
    """The balanced reference step at ``step`` (its batch; a dense model's step is its own
    reference); ``ctx`` None (in a worker process) builds the step model."""
    if ctx is None:
        ctx = build_context(scenario, scenario.micro_batches_at(step))
    n_src, n_dest = ctx.layout.gpus_per_stage, ctx.layout.expert
    with blas_threads():
        if scenario.model.moe is None:  # nothing routed
            sample = dense_sample(scenario, step, n_src)
        else:
            sample = balanced_sample(scenario, step, n_src, n_dest)
        result = simulate_step(
            ctx, sample.counts, sample.dest_tokens, node_tokens=sample.node_tokens
        )
    return SimulatedStep(
        BALANCED,
        0,
        step,
        scenario.total_steps,
        dict(sample.metrics),
        result,
        sample.counts.sum(axis=(1, 2)),
    )


def _simulate_run(
    scenario: Scenario,
    ctx: StepContext,
    context_at: Callable[[int], StepContext],
    memory: dict[str, float],
    points: list[int],
    lengths: list[int],
    seeds: SeedPlan,
    pool: ProcessPoolExecutor | None,
    tick: Progress,
    gate_tick: Callable[[str, float], None],
    workers: int,
    cache: GateCache | None,
) -> RunEstimate:
    lay = ctx.layout
    n_src, n_dest = lay.gpus_per_stage, lay.expert
    # The balanced references: the last segment's batch (the full batch after any ramp), then
    # each batch-ramp step's own batch. In the pool they run beside the gates and the sampled
    # steps; only hardware faults wait for the full-batch one (episodes span its step time).
    reference = points[-1]
    references = {scenario.micro_batches_at(reference): reference}
    for step in points:
        references.setdefault(scenario.micro_batches_at(step), step)
    if pool is None:
        done = {
            n: _reference_step(scenario, step, context_at(step)) for n, step in references.items()
        }
        ref_futures: dict[int, Future[SimulatedStep]] = {}
    else:
        done = {}
        ref_futures = {
            n: pool.submit(_reference_step, scenario, step) for n, step in references.items()
        }

    def reference_at(n: int) -> SimulatedStep:
        if n not in done:
            done[n] = ref_futures[n].result()
            tick(f"balanced reference at step {done[n].step}", step_work(scenario, done[n].step))
        return done[n]

    if pool is None:
        for n in references:
            tick(f"balanced reference at step {done[n].step}", step_work(scenario, done[n].step))
    hardware = None
    if scenario.faults.hardware_active:
        full = reference_at(scenario.micro_batches_at(reference))
        hardware = point_hardware(scenario, seeds, len(points), full.result.step_time_s)

    point_seeds = seeds.samples(len(points))  # once: every strategy gets the same seeds
    simulated: list[SimulatedStep] = []
    gate_records: dict[str, list[dict[str, float]]] = {}
    traced = None
    specialisation: dict[str, npt.NDArray[np.int64]] = {}
    gate_windows: dict[str, dict[str, float]] = {}
    by_domain: list[dict[str, float | int | str]] = []
    snapshots = sorted(set(points) | set(eplb_steps(scenario, points)))
    gate_cache: dict[str, str] = {}
    pending: list[Future[list[SimulatedStep]]] = []
    sources = routing_sources(
        scenario, snapshots, seeds, n_src, n_dest, workers, cache=cache, progress=gate_tick
    )
    for run_index, source in enumerate(sources):
        name = source.name
        if source.cache is not None:
            gate_cache[name] = source.cache
        gate_records[name] = source.records
        if source.gate is not None:  # all of it, whatever the gate reported
            gate_tick(name, 1.0)
        if traced is None and scenario.output.trace:
            traced = (name, len(points) // 2)  # the trace shows the first run's middle point
        for i, (step, length) in enumerate(zip(points, lengths, strict=True)):
            eplb_seed = None
            if scenario.eplb.enabled:
                # The EPLB step spawns two children of the point's seed; each run continues
                # where the previous run's spawns left it (the order the runs come in).
                base = point_seeds[i]
                eplb_seed = np.random.SeedSequence(
                    base.entropy,
                    spawn_key=base.spawn_key,
                    pool_size=base.pool_size,
                    n_children_spawned=2 * run_index,
                )
            task = _PointTask(
                scenario,
                name,
                source.sample,
                i,
                step,
                length,
                None if hardware is None else hardware[i],
                point_seeds[i],
                eplb_seed,
                traced == (name, i),
                source.record_at(step),
            )
            if pool is None:
                for row in _simulate_point(task, context_at(step)):
                    simulated.append(row)
                    tick(f"{row.strategy}: step {step}", step_work(scenario, step))
            else:
                pending.append(pool.submit(_simulate_point, task))
        if source.gate is not None:
            # After the points are on their way: the pool's workers need not wait for these.
            specialisation[name] = topic_load(scenario, source.gate, seeds)
            gate_windows[name] = source.gate.tail_summary()
            by_domain.extend(domain_skew(scenario, name, source.gate, seeds))
    for future in pending:  # in submission order: the same order as one after the other
        for row in future.result():
            simulated.append(row)
            tick(f"{row.strategy}: step {row.step}", step_work(scenario, row.step))
    balanced = reference_at(scenario.micro_batches_at(reference))
    balanced_s = {n: reference_at(n).result.step_time_s for n in references}
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
        gate_cache=gate_cache,
        kernels=ctx.compute.kernels(ctx.compute.balanced_rows(scenario.parallelism.expert)),
        memory=memory,
    )
