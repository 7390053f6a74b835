"""From a scenario to a run estimate: the gate trains over the whole run, the engine simulates
steps sampled along it, and the step times integrate into wall-clock, GPU-hours and dollars.

Timeline sampling: the run's ``total_steps`` optimizer steps are cut into ``sample_points``
equal segments; the step at each segment's midpoint is simulated with the routing the gate
produces at that step, and stands for the whole segment (midpoint rule). The same cluster is
also simulated once with perfectly balanced routing; the gap between the two is the straggler
overhead that routing imbalance costs each strategy.

Common random numbers: every strategy sees the same token stream, the same teacher, the same
router initialisation and the same engine-sample sequences (all spawned from the scenario seed),
so differences between strategies come from the strategies, not from sampling noise.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits

from moesim import units
from moesim.cluster import model_flops_per_token
from moesim.cluster.model_costs import model_costs
from moesim.cluster.placement import (
    apply_placement,
    eplb_placement,
    expert_state_bytes,
    layer_loads,
    migration_bytes,
)
from moesim.cluster.stragglers import (
    HardwareState,
    JitterSource,
    draw_run_state,
    draw_step_state,
)
from moesim.engine import StepContext, StepResult, build_context, simulate_step
from moesim.engine.recorder import NullRecorder, SliceRecorder
from moesim.errors import ScenarioError
from moesim.estimate.failures import failure_estimate
from moesim.gate import (
    GateTrajectory,
    RoutingSample,
    balanced_sample,
    routing_sample,
    train_gate,
)
from moesim.gate.metrics import max_vio, topic_expert_load
from moesim.gate.router import route, route_options
from moesim.gate.trace import scenario_trace, trace_sample
from moesim.scenario.schema import Scenario
from moesim.scenario.strategies import Strategy

BALANCED = "balanced_reference"


@dataclass(frozen=True)
class SimulatedStep:
    """One engine step: which strategy and point it stands for, its routing metrics, result."""

    strategy: str
    point: int
    step: int
    segment_steps: int
    routing_metrics: dict[str, float]
    result: StepResult
    expert_load: npt.NDArray[np.int64]
    """Routed assignments per (simulated layer, expert) over the step, shape (L, E)."""
    extra_wall_s: float = 0.0
    """Wall time the segment spends outside training steps (EPLB expert migrations)."""
    healthy_step_time_s: float | None = None
    """The same step on healthy hardware (set when hardware stragglers are on)."""


@dataclass
class RunEstimate:
    """Everything a run produced, in plain records; :mod:`moesim.results` turns it into tables."""

    scenario: Scenario
    steps: list[SimulatedStep]
    balanced: SimulatedStep
    gate_records: dict[str, list[dict[str, float]]]
    link_names: list[str]
    specialisation: dict[str, npt.NDArray[np.int64]]
    """Per run with a gate: the topic × expert load of its final routers (first layer) on a
    fresh batch of the stream (routing.md §3 Fig. 9; the R8 specialisation)."""
    balanced_step_s: dict[int, float]
    """Balanced-routing step time by micro-batches per pipeline (several under a batch
    ramp)."""
    summary: dict[str, dict[str, float | None]] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    bands: list[dict[str, Any]] = field(default_factory=list)
    """Per strategy and point: percentiles over seeds of the cumulative curves
    (:mod:`moesim.estimate.montecarlo`); empty for a single-seed estimate."""


def sample_steps(total_steps: int, points: int, ramp_steps: int = 0) -> tuple[list[int], list[int]]:
    """Midpoint step of each of ``points`` near-equal segments, and each segment's length.

    With a batch ramp of ``ramp_steps`` steps, the ramp is a segment of its own (its steps are
    smaller) and the ``points`` segments share the rest."""
    ramp_steps = min(ramp_steps, total_steps - 1) if total_steps > 1 else 0
    rest = total_steps - ramp_steps
    edges = np.linspace(0, rest, min(points, rest) + 1).round().astype(int) + ramp_steps
    if ramp_steps:
        edges = np.concatenate([[0], edges])
    lengths = np.diff(edges)
    mids = (edges[:-1] + lengths // 2).tolist()
    return [int(m) for m in mids], [int(x) for x in lengths]


def scenario_points(scenario: Scenario) -> tuple[list[int], list[int]]:
    """The steps an estimate simulates and the segment each stands for."""
    ramp = scenario.ramp_steps
    return sample_steps(scenario.total_steps, scenario.training.sample_points, ramp)


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
    # BLAS reductions split over threads sum in a thread-count-dependent order (gate metrics
    # moved by 4e-8 between 1 and 2 threads): one thread, whatever the environment says.
    with threadpool_limits(limits=1, user_api="blas"):
        return _estimate_run(scenario, progress, workers)


def _estimate_run(
    scenario: Scenario, progress: Callable[[str], None] | None, workers: int
) -> RunEstimate:
    tick = progress or (lambda _label: None)
    ctx = build_context(scenario)
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
    root = np.random.SeedSequence(scenario.seed)
    gate_seed, sample_seed, hardware_seed = root.spawn(3)

    # The balanced reference runs the last segment's batch (the full batch after any ramp).
    reference = points[-1]
    bal = balanced_sample(scenario, reference, n_src, n_dest)
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
            ramp = balanced_sample(scenario, step, n_src, n_dest)
            balanced_s[n] = simulate_step(
                context_at(step), ramp.counts, ramp.dest_tokens, node_tokens=ramp.node_tokens
            ).step_time_s
    hardware = _hardware(scenario, hardware_seed, len(points), balanced.result.step_time_s)

    point_seeds = sample_seed.spawn(len(points))  # once: every strategy gets the same seeds
    simulated: list[SimulatedStep] = []
    gate_records: dict[str, list[dict[str, float]]] = {}
    traced = None
    specialisation: dict[str, npt.NDArray[np.int64]] = {}
    snapshots = sorted(set(points) | set(eplb_steps(scenario, points)))
    sources = _routing_sources(
        scenario, snapshots, gate_seed, n_src, n_dest, specialisation, workers
    )
    for name, records, samples in sources:
        gate_records[name] = records
        tick(f"{name}: routing ready")
        if traced is None and scenario.output.trace:
            traced = (name, len(points) // 2)  # the trace shows the first run's middle point
        for i, (step, length) in enumerate(zip(points, lengths, strict=True)):
            step_ctx = context_at(step)
            sample = samples(i, step, np.random.default_rng(point_seeds[i]))
            recorder = (
                SliceRecorder(scenario.traced_gpus) if traced == (name, i) else NullRecorder()
            )
            result, healthy = _simulate_on(
                step_ctx,
                sample.counts,
                sample.dest_tokens,
                sample.node_tokens,
                None if hardware is None else hardware[i],
                recorder,
            )
            simulated.append(
                SimulatedStep(
                    name,
                    i,
                    step,
                    length,
                    dict(sample.metrics),
                    result,
                    sample.counts.sum(axis=(1, 2)),
                    healthy_step_time_s=healthy,
                )
            )
            if scenario.eplb.enabled:
                simulated.append(
                    _eplb_step(
                        step_ctx,
                        name,
                        i,
                        step,
                        length,
                        sample,
                        samples,
                        point_seeds[i],
                        None if hardware is None else hardware[i],
                    )
                )
            tick(f"{name}: step {step}")
    links = [ctx.topology.link_name(i) for i in range(ctx.topology.links)]
    estimate = RunEstimate(
        scenario, simulated, balanced, gate_records, links, specialisation, balanced_s
    )
    _integrate(estimate)
    return estimate


SampleAt = Callable[[int, int, np.random.Generator], RoutingSample]
EPLB_SUFFIX = "+eplb"
# Episodes are drawn over a few step times so that every op of a step falls inside them.
HORIZON_STEPS = 3.0


def _simulate_on(
    ctx: StepContext,
    counts: np.ndarray,
    dest_tokens: np.ndarray,
    node_tokens: np.ndarray | None,
    hardware: tuple[HardwareState, np.random.SeedSequence] | None,
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


def _hardware(
    scenario: Scenario, seed: np.random.SeedSequence, points: int, step_time_s: float
) -> list[tuple[HardwareState, np.random.SeedSequence]] | None:
    """Per sampled point: the hardware condition of its step (the run's persistent slow GPUs
    and degraded ports, plus that step's throttling and link episodes) and the seed of its
    per-op jitter. Every strategy meets the same hardware (common random numbers)."""
    faults = scenario.faults
    if not faults.hardware_active:
        return None
    gpus = scenario.cluster.gpus
    run_seed, *point_seeds = seed.spawn(1 + points)
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


def _eplb_step(
    ctx: StepContext,
    name: str,
    point: int,
    step: int,
    length: int,
    sample: RoutingSample,
    samples: SampleAt,
    seed: np.random.SeedSequence,
    hardware: tuple[HardwareState, np.random.SeedSequence] | None = None,
) -> SimulatedStep:
    """The same step under the redundant-expert placement in force at ``step`` (on the same
    hardware as the static placement's step).

    The placement was computed at the last recomputation step ``r`` from the loads of a batch
    routed then (the gate's routers at ``r``), aligned with the one computed at ``r − N``; the
    migration between the two, once per ``N`` steps, is charged to the segment's wall time.
    Replicas' extra gradient synchronisation is not modelled.
    """
    sc = ctx.scenario
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
    result, healthy = _simulate_on(
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
        name + EPLB_SUFFIX,
        point,
        step,
        length,
        metrics,
        result,
        sample.counts.sum(axis=(1, 2)),
        extra_wall_s=move.seconds * length / every,
        healthy_step_time_s=healthy,
    )


def trace_run_name(scenario: Scenario) -> str:
    """Name of the single run a trace replay produces."""
    assert scenario.gate.trace is not None
    return f"trace:{Path(scenario.gate.trace.path).stem}"


def run_names(scenario: Scenario) -> list[str]:
    """The runs an estimate compares: one per strategy, or the replayed trace, each followed
    by its redundant-expert variant when ``eplb`` is on."""
    if scenario.gate.trace is not None:
        names = [trace_run_name(scenario)]
    else:
        names = [s.name for s in scenario.strategies]
    if scenario.eplb.enabled:
        names = [n for name in names for n in (name, name + EPLB_SUFFIX)]
    return names


def _routing_sources(
    scenario: Scenario,
    points: list[int],
    gate_seed: np.random.SeedSequence,
    n_src: int,
    n_dest: int,
    specialisation: dict[str, npt.NDArray[np.int64]],
    workers: int = 1,
) -> Iterator[tuple[str, list[dict[str, float]], SampleAt]]:
    """Per run: its name, the gate's per-update records, and the routing sample at a point.

    With ``gate.trace`` the recorded loads replace the gate (no records, no strategies);
    otherwise the gate trains under each strategy in turn, and its final routers' topic ×
    expert load goes into ``specialisation``.
    """
    if scenario.gate.trace is not None:
        trace = scenario_trace(scenario)

        def replay(_i: int, step: int, rng: np.random.Generator) -> RoutingSample:
            return trace_sample(scenario, trace, step, n_src, n_dest, rng)

        yield trace_run_name(scenario), [], replay
        return
    for strategy, trajectory in zip(
        scenario.strategies, _train_gates(scenario, points, gate_seed, workers), strict=True
    ):
        specialisation[strategy.name] = _topic_load(scenario, trajectory)

        def routed(
            _i: int, step: int, rng: np.random.Generator, gate: GateTrajectory = trajectory
        ) -> RoutingSample:
            return routing_sample(
                scenario, gate.states[step], gate.stream, step, n_src, n_dest, rng
            )

        yield strategy.name, trajectory.records, routed


def _train_one(
    args: tuple[Scenario, Strategy, list[int], np.random.SeedSequence],
) -> GateTrajectory:
    with threadpool_limits(limits=1, user_api="blas"):  # in the worker process too
        return train_gate(*args)


def _train_gates(
    scenario: Scenario, points: list[int], gate_seed: np.random.SeedSequence, workers: int
) -> Iterator[GateTrajectory]:
    """Each strategy's gate trajectory, in strategy order: in a process pool when there are
    several strategies and ``workers > 1`` (the trajectories are independent and seeded alike,
    so the result does not depend on where they ran), else one after the other."""
    jobs = [(scenario, s, points, gate_seed) for s in scenario.strategies]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            yield from pool.map(_train_one, jobs)
    else:
        for job in jobs:
            yield _train_one(job)


def _topic_load(scenario: Scenario, trajectory: GateTrajectory) -> npt.NDArray[np.int64]:
    """Topic × expert assignments of the final first-layer router on one fresh gate batch."""
    gate = scenario.gate
    rng = np.random.default_rng(np.random.SeedSequence(scenario.seed).spawn(3)[2])
    tokens, topics = trajectory.stream.sample(
        gate.batch_sequences,
        gate.tokens_per_sequence,
        rng,
        tokens_trained=scenario.training.total_tokens,
        sequences_per_micro_batch=scenario.parallelism.micro_batch_size,
    )
    routing = route(
        tokens.reshape(-1, tokens.shape[-1]), trajectory.final[0], **route_options(scenario)
    )
    return topic_expert_load(
        routing.selected,
        topics.ravel(),
        scenario.stream.topics,
        scenario.model.moe.routed_experts,
        routing.dropped,
    )


def _record_at(records: list[dict[str, float]], step: int) -> dict[str, float]:
    """The gate record of the last update at or before ``step`` (records may come every k-th
    step when the gate is coarsened)."""
    index = bisect.bisect_right([r["step"] for r in records], step) - 1
    return records[max(index, 0)]


def _routing_summary(
    rows: list[SimulatedStep], records: list[dict[str, float]]
) -> dict[str, float | None]:
    """Routing quality over the run: MaxVio_global pools the sampled steps' loads; the other
    sample metrics are means over the sampled steps; gate metrics are means over all updates
    (teacher capture over the last tenth, like the task loss)."""
    pooled = np.sum([s.expert_load for s in rows], axis=0)
    out: dict[str, float | None] = {"maxvio_global": float(max_vio(pooled).mean())}
    for key in (
        "maxvio_compute_batch",
        "cv_batch",
        "dead_experts",
        "dropped_fraction",
        "nodes_per_token",
    ):
        values = [s.routing_metrics[key] for s in rows if key in s.routing_metrics]
        out[key] = float(np.mean(values)) if values else None
    tail = records[-max(1, len(records) // 10) :]
    for key, window in (
        ("teacher_capture", tail),
        ("interference_cos", records),
        ("interference_ratio", records),
    ):
        values = [r[key] for r in window if key in r and np.isfinite(r[key])]
        out[key] = float(np.mean(values)) if values else None
    return out


MAX_FAILURE_WALL_S = 3.2e10
"""Expected wall time with failures (about 1,000 years) beyond which a run is refused as never
finishing; it also keeps GPU-hours and costs far from float64 overflow."""


def _failure_summary(sc: Scenario, step_time: float, gpu_hours: float) -> dict[str, float | None]:
    """Expected failure and restart overhead of the run (``faults.failures``), reported apart
    from the failure-free GPU-hours and cost, and their sums."""
    price = sc.cluster.price_usd_per_gpu_hour
    if not sc.faults.failures.enabled:
        return {
            "failure_gpu_hours": None,
            "failure_cost_usd": None,
            "gpu_hours_with_failures": gpu_hours,
            "cost_usd_with_failures": gpu_hours * price,
        }
    try:
        fe = failure_estimate(
            sc.faults.failures,
            gpus=sc.cluster.gpus,
            step_time_s=step_time,
            steps=sc.total_steps,
            price_usd_per_gpu_hour=price,
        )
    except ValueError as err:  # a segment of many job MTBFs: the run would never complete
        raise ScenarioError("faults.failures", str(err)) from None
    if not fe.overhead.wall_s <= MAX_FAILURE_WALL_S:
        raise ScenarioError(
            "faults.failures",
            f"with failures the run would take about {fe.overhead.wall_s / units.HOUR:.3g} hours "
            f"(job MTBF {fe.job_mtbf_s:.3g} s on {sc.cluster.gpus:,} GPUs): it would "
            "essentially never finish; raise gpu_mtbf_hours or shorten restarts and checkpoints",
        )
    return {
        **fe.summary(),
        "gpu_hours_with_failures": gpu_hours + fe.overhead_gpu_hours,
        "cost_usd_with_failures": (gpu_hours + fe.overhead_gpu_hours) * price,
    }


CAUSES = (
    "compute",
    "communication",
    "pipeline_bubble",
    "routing_imbalance",
    "hardware_stragglers",
    "expert_migration",
    "failures",
)


def _attribution(
    est: RunEstimate,
    rows: list[SimulatedStep],
    wall: float,
    balanced: float,
    failure_gpu_hours: float | None,
) -> dict[str, float]:
    """Every GPU-second of the run in one cause, in GPU-hours (``attribution_<cause>``), and
    what routing imbalance and hardware stragglers cost.

    The run's GPU-time splits by counterfactuals: the perfectly balanced, healthy step (its own
    per-GPU split: compute and optimizer; all-to-all waits and gradient sync; pipeline bubble
    and idle at the end), plus the routed step on healthy hardware minus that (routing
    imbalance), plus the step on the scenario's hardware minus the healthy one (hardware
    stragglers), plus EPLB migrations and failure overhead. The causes add up to
    ``gpu_hours_with_failures``. ``imbalance_cost_usd`` is actual healthy minus balanced;
    ``straggler_cost_usd`` actual minus healthy.
    """
    sc = est.scenario
    gpus, price = sc.cluster.gpus, sc.cluster.price_usd_per_gpu_hour
    hours = lambda seconds: gpus * units.seconds_to_hours(seconds)  # noqa: E731
    b = est.balanced.result
    migration = sum(s.extra_wall_s for s in rows)
    healthy = sum(s.segment_steps * (s.healthy_step_time_s or s.result.step_time_s) for s in rows)
    split = {
        "compute": float((b.compute_s + b.slowdown_s + b.optimizer_s).mean()),
        "communication": float((b.a2a_wait_s + b.allreduce_s).mean()),
        "pipeline_bubble": float((b.pipeline_wait_s + b.tail_idle_s).mean()),
    }
    # The balanced step's split, scaled to the balanced run (its shares hold for ramp steps).
    scale = balanced / b.step_time_s
    out = {f"attribution_{k}_gpu_hours": hours(v * scale) for k, v in split.items()}
    out["attribution_routing_imbalance_gpu_hours"] = hours(healthy - balanced)
    out["attribution_hardware_stragglers_gpu_hours"] = hours(wall - migration - healthy)
    out["attribution_expert_migration_gpu_hours"] = hours(migration)
    out["attribution_failures_gpu_hours"] = float(failure_gpu_hours or 0.0)
    out["imbalance_gpu_hours"] = hours(healthy - balanced)
    out["imbalance_cost_usd"] = hours(healthy - balanced) * price
    out["straggler_gpu_hours"] = hours(wall - migration - healthy)
    out["straggler_cost_usd"] = hours(wall - migration - healthy) * price
    return out


def _balanced_at(est: RunEstimate, step: int) -> float:
    """Balanced-routing step time for the batch of ``step``."""
    return est.balanced_step_s[est.scenario.micro_batches_at(step)]


def _integrate(est: RunEstimate) -> None:
    """Fill ``timeline`` (cumulative curves) and ``summary`` (per-strategy scalars)."""
    sc = est.scenario
    gpus = sc.cluster.gpus
    price = sc.cluster.price_usd_per_gpu_hour
    flops_per_token = model_flops_per_token(sc.model)
    peak = gpus * sc.cluster.gpu.peak_flops("bf16")
    for name in run_names(sc):
        rows = [s for s in est.steps if s.strategy == name]
        records = est.gate_records[name.removesuffix(EPLB_SUFFIX)]
        wall = 0.0
        balanced_wall = 0.0
        steps_done = 0
        for s in rows:
            balanced_time = _balanced_at(est, s.step)
            wall += s.segment_steps * s.result.step_time_s + s.extra_wall_s
            balanced_wall += s.segment_steps * balanced_time
            steps_done += s.segment_steps
            gpu_hours = gpus * units.seconds_to_hours(wall)
            balanced_hours = gpus * units.seconds_to_hours(balanced_wall)
            step_tokens = sc.batch_sequences_at(s.step) * sc.model.seq_len
            # Without a gate (trace replay) the sample itself is the only routing record.
            rec = _record_at(records, s.step) if records else s.routing_metrics
            est.timeline.append(
                {
                    "strategy": name,
                    "point": s.point,
                    "step": s.step,
                    "steps_done": steps_done,
                    "tokens": float(min(sc.tokens_before(steps_done), sc.training.total_tokens)),
                    "batch_sequences": sc.batch_sequences_at(s.step),
                    "step_time_s": s.result.step_time_s,
                    "balanced_step_time_s": balanced_time,
                    "straggler_overhead": 1.0 - balanced_time / s.result.step_time_s,
                    "tokens_per_s": step_tokens / s.result.step_time_s,
                    "mfu": flops_per_token * step_tokens / s.result.step_time_s / peak,
                    "wall_s": wall,
                    "gpu_hours": gpu_hours,
                    "cost_usd": gpu_hours * price,
                    "balanced_gpu_hours": balanced_hours,
                    "balanced_cost_usd": balanced_hours * price,
                    "maxvio_sample": s.routing_metrics["maxvio_batch"],
                    "maxvio_micro": s.routing_metrics["maxvio_micro"],
                    "maxvio_batch": rec["maxvio_batch"],
                    "task_loss": rec.get("task_loss"),
                }
            )
        total_steps = sc.total_steps
        step_time = wall / total_steps
        balanced_step = balanced_wall / total_steps
        tokens = sc.training.total_tokens
        gpu_hours = gpus * units.seconds_to_hours(wall)
        tail = records[-max(1, len(records) // 10) :]
        sampled = [s.routing_metrics for s in rows]
        est.summary[name] = {
            "step_time_s": step_time,
            "balanced_step_time_s": balanced_step,
            "straggler_overhead": 1.0 - balanced_step / step_time,
            "tokens_per_s": tokens / wall,
            "mfu": flops_per_token * tokens / wall / peak,
            "gpu_hours": gpu_hours,
            "cost_usd": gpu_hours * price,
            "balanced_gpu_hours": gpus * units.seconds_to_hours(balanced_wall),
            "maxvio_batch": float(np.mean([r["maxvio_batch"] for r in records or sampled])),
            "task_loss": float(np.mean([r["task_loss"] for r in tail])) if records else None,
            "wall_days": wall / 86400.0,
            "migration_s": float(sum(s.extra_wall_s for s in rows)),
            **_routing_summary(rows, records),
            **_failure_summary(sc, step_time, gpu_hours),
        }
        failure = est.summary[name]["failure_gpu_hours"]
        est.summary[name].update(_attribution(est, rows, wall, balanced_wall, failure))
