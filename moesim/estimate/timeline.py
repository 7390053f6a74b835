"""The training timeline: which steps an estimate simulates, which runs it compares, and the
integration of the simulated step times into cumulative wall-clock, GPU-hours and dollars.

Timeline sampling: the run's ``total_steps`` optimizer steps are cut into ``sample_points``
near-equal segments; the step at each segment's midpoint is simulated with the routing the gate
produces at that step, and stands for the whole segment (midpoint rule). Under a batch ramp the
ramp is a segment of its own. The same cluster is also simulated with perfectly balanced
routing; the gap between the two is the straggler overhead that routing imbalance costs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesim import units
from moesim.cluster import model_flops_per_token
from moesim.estimate.attribution import attribute, failure_totals
from moesim.estimate.records import (
    EPLB_SUFFIX,
    GateWindow,
    RoutingSummary,
    RunSummary,
    SimulatedStep,
    TimelineRow,
)
from moesim.gate.metrics import max_vio
from moesim.scenario.schema import Scenario


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


def trace_run_name(scenario: Scenario) -> str:
    """Name of the single run a trace replay produces."""
    assert scenario.gate.trace is not None
    return f"trace:{Path(scenario.gate.trace.path).stem}"


def run_names(scenario: Scenario) -> list[str]:
    """The runs an estimate compares: one per strategy, or the replayed trace, each followed
    by its redundant-expert variant when ``eplb`` is on."""
    if scenario.model.moe is None:
        names = [scenario.name]
    elif scenario.gate.trace is not None:
        names = [trace_run_name(scenario)]
    else:
        names = [s.name for s in scenario.strategies]
    if scenario.eplb.enabled:
        names = [n for name in names for n in (name, name + EPLB_SUFFIX)]
    return names


def routing_summary(rows: list[SimulatedStep], records: list[dict[str, float]]) -> RoutingSummary:
    """Routing quality over the run: MaxVio_global pools the sampled steps' loads; the other
    sample metrics are means over the sampled steps; gate metrics are means over all updates
    (teacher capture over the last tenth, like the task loss)."""

    def sample_mean(key: str) -> float | None:
        values = [s.routing_metrics[key] for s in rows if key in s.routing_metrics]
        return float(np.mean(values)) if values else None

    def gate_mean(key: str, window: list[dict[str, float]]) -> float | None:
        values = [r[key] for r in window if key in r and np.isfinite(r[key])]
        return float(np.mean(values)) if values else None

    pooled = np.sum([s.expert_load for s in rows], axis=0)
    tail = records[-max(1, len(records) // 10) :]
    return RoutingSummary(
        # None for a dense model: no expert, no load to balance.
        maxvio_global=float(max_vio(pooled).mean()) if pooled.size else None,
        maxvio_compute_batch=sample_mean("maxvio_compute_batch"),
        cv_batch=sample_mean("cv_batch"),
        dead_experts=sample_mean("dead_experts"),
        dropped_fraction=sample_mean("dropped_fraction"),
        nodes_per_token=sample_mean("nodes_per_token"),
        teacher_capture=gate_mean("teacher_capture", tail),
        interference_cos=gate_mean("interference_cos", records),
        interference_ratio=gate_mean("interference_ratio", records),
    )


def integrate(
    scenario: Scenario,
    steps: list[SimulatedStep],
    balanced: SimulatedStep,
    balanced_step_s: dict[int, float],
    gate_records: dict[str, list[dict[str, float]]],
    gate_windows: dict[str, dict[str, float]] | None = None,
) -> tuple[list[TimelineRow], dict[str, RunSummary]]:
    """The cumulative curves of every run (one row per sampled point) and its summary.

    ``steps`` are the simulated steps of every run, ``balanced`` the balanced reference step,
    ``balanced_step_s`` the balanced step time by micro-batches per pipeline,
    ``gate_records`` each strategy's gate records (empty for a trace replay) and
    ``gate_windows`` each gate's window summary (``GateTrajectory.tail_summary``).
    """
    gate_windows = gate_windows or {}
    sc = scenario
    gpus = sc.cluster.gpus
    price = sc.cluster.price_usd_per_gpu_hour
    flops_per_token = model_flops_per_token(sc.model)
    peak = gpus * sc.cluster.gpu.peak_flops("bf16")
    timeline: list[TimelineRow] = []
    summary: dict[str, RunSummary] = {}
    for name in run_names(sc):
        rows = [s for s in steps if s.strategy == name]
        records = gate_records[name.removesuffix(EPLB_SUFFIX)]
        wall = 0.0
        balanced_wall = 0.0
        steps_done = 0
        for s in rows:
            balanced_time = (
                s.balanced_step_time_s
                if s.balanced_step_time_s is not None
                else balanced_step_s[sc.micro_batches_at(s.step)]
            )
            wall += s.segment_steps * s.result.step_time_s + s.extra_wall_s
            balanced_wall += s.segment_steps * balanced_time
            steps_done += s.segment_steps
            gpu_hours = gpus * units.seconds_to_hours(wall)
            balanced_hours = gpus * units.seconds_to_hours(balanced_wall)
            step_tokens = sc.batch_sequences_at(s.step) * sc.model.seq_len
            # Without a gate (trace replay) the sample itself is the only routing record.
            rec = s.gate_record if s.gate_record is not None else s.routing_metrics
            timeline.append(
                TimelineRow(
                    strategy=name,
                    point=s.point,
                    step=s.step,
                    steps_done=steps_done,
                    tokens=float(min(sc.tokens_before(steps_done), sc.training.total_tokens)),
                    batch_sequences=sc.batch_sequences_at(s.step),
                    step_time_s=s.result.step_time_s,
                    balanced_step_time_s=balanced_time,
                    straggler_overhead=1.0 - balanced_time / s.result.step_time_s,
                    tokens_per_s=step_tokens / s.result.step_time_s,
                    mfu=flops_per_token * step_tokens / s.result.step_time_s / peak,
                    wall_s=wall,
                    gpu_hours=gpu_hours,
                    cost_usd=gpu_hours * price,
                    balanced_gpu_hours=balanced_hours,
                    balanced_cost_usd=balanced_hours * price,
                    maxvio_sample=s.routing_metrics.get("maxvio_batch"),
                    maxvio_micro=s.routing_metrics.get("maxvio_micro"),
                    maxvio_batch=rec.get("maxvio_batch"),
                    task_loss=rec.get("task_loss"),
                )
            )
        total_steps = sc.total_steps
        step_time = wall / total_steps
        balanced_step = balanced_wall / total_steps
        tokens = sc.training.total_tokens
        gpu_hours = gpus * units.seconds_to_hours(wall)
        tail = records[-max(1, len(records) // 10) :]
        sampled = [s.routing_metrics for s in rows]
        failures = failure_totals(sc, step_time, gpu_hours)
        costs = attribute(sc, balanced, rows, wall, balanced_wall, failures.failure)
        summary[name] = RunSummary(
            step_time_s=step_time,
            balanced_step_time_s=balanced_step,
            straggler_overhead=1.0 - balanced_step / step_time,
            tokens_per_s=tokens / wall,
            mfu=flops_per_token * tokens / wall / peak,
            gpu_hours=gpu_hours,
            cost_usd=gpu_hours * price,
            balanced_gpu_hours=gpus * units.seconds_to_hours(balanced_wall),
            maxvio_batch=(
                float(np.mean([r["maxvio_batch"] for r in records or sampled]))
                if sc.model.moe is not None
                else None
            ),
            task_loss=float(np.mean([r["task_loss"] for r in tail])) if records else None,
            wall_days=units.seconds_to_days(wall),
            migration_s=float(sum(s.extra_wall_s for s in rows)),
            routing=routing_summary(rows, records),
            gate_window=GateWindow.of(gate_windows.get(name.removesuffix(EPLB_SUFFIX))),
            failure=failures.failure,
            gpu_hours_with_failures=failures.gpu_hours_with_failures,
            cost_usd_with_failures=failures.cost_usd_with_failures,
            attribution=costs.attribution,
            imbalance_gpu_hours=costs.imbalance_gpu_hours,
            imbalance_cost_usd=costs.imbalance_cost_usd,
            straggler_gpu_hours=costs.straggler_gpu_hours,
            straggler_cost_usd=costs.straggler_cost_usd,
        )
    return timeline, summary
