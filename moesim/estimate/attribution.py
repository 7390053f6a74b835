"""Where a run's GPU-hours go: each GPU-second in one cause, by counterfactual steps, and the
expected failure overhead next to the failure-free total.

The run's GPU-time splits by counterfactuals: the perfectly balanced, healthy step (its own
per-GPU split: compute and optimizer; all-to-all waits and gradient sync; pipeline bubble and
idle at the end), plus the routed step on healthy hardware minus that (routing imbalance),
plus the step on the scenario's hardware minus the healthy one (hardware stragglers), plus
EPLB migrations and failure overhead. The causes add up to ``gpu_hours_with_failures``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import numpy as np

from moesim import units
from moesim.errors import ScenarioError
from moesim.estimate.failures import FailureEstimate, failure_estimate
from moesim.estimate.records import Attribution, SimulatedStep
from moesim.records import FloatArray
from moesim.scenario.schema import Scenario

MAX_FAILURE_WALL_S = 3.2e10
"""Expected wall time with failures (about 1,000 years) beyond which a run is refused as never
finishing; it also keeps GPU-hours and costs far from float64 overflow."""


@dataclass(frozen=True)
class FailureTotals:
    """The expected failure overhead (None when ``faults.failures`` is off) and the run's
    GPU-hours and cost with it."""

    failure: FailureEstimate | None
    gpu_hours_with_failures: float
    cost_usd_with_failures: float


def failure_totals(sc: Scenario, step_time: float, gpu_hours: float) -> FailureTotals:
    """Expected failure and restart overhead of the run (``faults.failures``), reported apart
    from the failure-free GPU-hours and cost, and their sums."""
    price = sc.cluster.price_usd_per_gpu_hour
    if not sc.faults.failures.enabled:
        return FailureTotals(None, gpu_hours, gpu_hours * price)
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
    return FailureTotals(
        fe,
        gpu_hours + fe.overhead_gpu_hours,
        (gpu_hours + fe.overhead_gpu_hours) * price,
    )


@dataclass(frozen=True)
class Costs:
    """The attribution of a run's GPU-hours, and what routing imbalance (actual healthy minus
    balanced) and hardware stragglers (actual minus healthy) cost in GPU-hours and dollars."""

    attribution: Attribution
    imbalance_gpu_hours: float
    imbalance_cost_usd: float
    straggler_gpu_hours: float
    straggler_cost_usd: float


def attribute(
    sc: Scenario,
    balanced_step: SimulatedStep,
    rows: list[SimulatedStep],
    wall: float,
    balanced: float,
    failure: FailureEstimate | None,
) -> Costs:
    """Every GPU-second of the run (``rows``: its sampled steps, ``wall`` seconds in all;
    ``balanced`` seconds for the same run under balanced routing) in one cause, in GPU-hours."""
    gpus, price = sc.cluster.gpus, sc.cluster.price_usd_per_gpu_hour

    def hours(seconds: float) -> float:
        return gpus * units.seconds_to_hours(seconds)

    def balanced_hours(*split: FloatArray) -> float:
        """GPU-hours of the balanced run in these parts of the balanced step's per-GPU split."""
        return hours(float(reduce(np.add, split).mean()) * scale)

    b = balanced_step.result
    migration = sum(s.extra_wall_s for s in rows)
    healthy = sum(s.segment_steps * (s.healthy_step_time_s or s.result.step_time_s) for s in rows)
    # The balanced step's split, scaled to the balanced run (its shares hold for ramp steps).
    scale = balanced / b.step_time_s
    imbalance = hours(healthy - balanced)
    straggler = hours(wall - migration - healthy)
    return Costs(
        Attribution(
            compute_gpu_hours=balanced_hours(b.compute_s, b.slowdown_s, b.optimizer_s),
            communication_gpu_hours=balanced_hours(b.a2a_wait_s, b.allreduce_s, b.tp_comm_s),
            pipeline_bubble_gpu_hours=balanced_hours(b.pipeline_wait_s, b.tail_idle_s),
            routing_imbalance_gpu_hours=imbalance,
            hardware_stragglers_gpu_hours=straggler,
            expert_migration_gpu_hours=hours(migration),
            failures_gpu_hours=0.0 if failure is None else float(failure.overhead_gpu_hours),
        ),
        imbalance_gpu_hours=imbalance,
        imbalance_cost_usd=imbalance * price,
        straggler_gpu_hours=straggler,
        straggler_cost_usd=straggler * price,
    )
