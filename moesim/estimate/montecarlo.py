"""Uncertainty bands: the same run estimated under independent seeds, in parallel processes.

A seed sets everything stochastic in a run: the token stream, the teacher, the router
initialisation, the engine's routing samples, hardware straggler draws and the failure draws.
``uncertainty.seeds = n`` estimates the run under seeds ``seed, seed + 1, …, seed + n − 1``
(the first in this process, with its full tables; the others in a process pool on the local
cores, keeping only their summaries and timelines) and reports the P10 / P50 / P90 of step time,
GPU-hours and cost per strategy, and bands around the GPU-hour and cost curves.

Percentiles use NumPy's default linear interpolation; with one seed the three coincide.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from moesim.estimate.run import RunEstimate, estimate_run
from moesim.scenario.schema import Scenario

BANDED = (
    "step_time_s",
    "gpu_hours",
    "cost_usd",
    "gpu_hours_with_failures",
    "cost_usd_with_failures",
)
PERCENTILES = (10, 50, 90)
CURVES = ("gpu_hours", "cost_usd")


def _one_seed(scenario: Scenario) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    est = estimate_run(scenario)
    return est.summary, est.timeline


def seed_scenarios(scenario: Scenario) -> list[Scenario]:
    """The scenario under each of its ``uncertainty.seeds`` seeds (the first is itself)."""
    return [
        scenario.model_copy(update={"seed": scenario.seed + i})
        for i in range(scenario.uncertainty.seeds)
    ]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under ``taskset`` or a container
    quota), the cap on every worker count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def estimate_with_bands(
    scenario: Scenario,
    progress: Callable[[str], None] | None = None,
    workers: int | None = None,
) -> RunEstimate:
    """:func:`estimate_run` for the scenario's seed, plus the other seeds' summaries and
    timelines in a process pool; fills ``summary[...]['<key>_p10|p50|p90']`` and ``bands``."""
    scenarios = seed_scenarios(scenario)
    n = min(workers or scenario.uncertainty.workers or available_cores(), available_cores())
    est = estimate_run(scenario, progress, workers=n)
    results = [(est.summary, est.timeline)]
    others = scenarios[1:]
    if others:
        quiet = [
            s.model_copy(update={"output": s.output.model_copy(update={"trace": False})})
            for s in others
        ]
        with ProcessPoolExecutor(max_workers=min(n, len(quiet))) as pool:
            for summary, timeline in pool.map(_one_seed, quiet):
                results.append((summary, timeline))
                if progress:
                    progress(f"seed {scenario.seed + len(results) - 1}")
    add_bands(est, results)
    return est


def add_bands(est: RunEstimate, results: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> None:
    """Percentiles over seeds of the summary scalars and the cumulative curves."""
    for name, summary in est.summary.items():
        for key in BANDED:
            values = [r[0][name].get(key) for r in results]
            values = [v for v in values if v is not None]
            if not values:
                continue
            for q, value in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True):
                summary[f"{key}_p{q}"] = float(value)
        summary["seeds"] = len(results)
    bands: list[dict[str, Any]] = []
    for row in est.timeline:
        out: dict[str, Any] = {
            "strategy": row["strategy"],
            "point": row["point"],
            "tokens": row["tokens"],
        }
        for curve in CURVES:
            values = [
                r[1][i][curve]
                for r in results
                for i in range(len(r[1]))
                if r[1][i]["strategy"] == row["strategy"] and r[1][i]["point"] == row["point"]
            ]
            for q, value in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True):
                out[f"{curve}_p{q}"] = float(value)
        bands.append(out)
    est.bands = bands
