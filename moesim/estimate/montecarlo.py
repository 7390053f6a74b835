"""Uncertainty bands: the same run estimated under independent seeds, in parallel processes.

A seed sets everything stochastic in a run: the token stream, the teacher, the router
initialisation, the engine's routing samples, hardware straggler draws and the failure draws.
``uncertainty.seeds = n`` estimates the run under seeds ``seed, seed + 1, …, seed + n − 1``
(the first in this process, with its full tables; the others in a process pool on the local
cores, keeping only their summaries and timelines) and reports the P10 / P50 / P90 of step time,
GPU-hours and cost per strategy, and bands around the GPU-hour and cost curves.

Every percentile is a value one seed gave, never an interpolation between two: P50 is the lower
median (with an even number of seeds, the lower of the two middle values), P10 rounds down and
P90 rounds up to the nearest seed (NumPy's ``lower`` and ``higher`` methods), so the band holds
the headline run even with two seeds (where linear interpolation would put P10 and P90 strictly
between them, excluding both). With ten seeds or fewer the band is the seeds' whole range; with
one seed the three coincide.

The headline. Each strategy's summary and timeline are those of one seed, its *headline
seed*: the seed of median GPU-hours (the lower median, as P50; ties go to the lower seed), so
the headline GPU-hours and cost are their P50. Every scalar of the summary then comes from one
run and stays consistent with the others, and since step time, GPU-hours, cost (with and
without failures), tokens/s and MFU all follow the run's wall time, each lies inside its
P10–P90 band. The measures of the gate's last window (task loss and
the window's MaxVio) do not follow the wall time, so the summary gives them as the P50 of their
bands. The per-step tables and the trace of the run directory stay those of the scenario's own
seed (the only one kept in full); ``headline_seed`` in the summary says which seed the headline
is.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np

from moesim.estimate.gate_cache import GateCache
from moesim.estimate.records import PERCENTILES, BandRow, RunEstimate, RunSummary, TimelineRow
from moesim.estimate.run import CacheChoice, Progress, estimate_run, resolve_cache, run_work
from moesim.scenario.schema import Scenario

BANDED = (
    "step_time_s",
    "gpu_hours",
    "cost_usd",
    "gpu_hours_with_failures",
    "cost_usd_with_failures",
    # The gate's balance and task loss over one window (moesim.gate.training.tail_summary).
    "task_loss",
    "gate_maxvio_global",
    "gate_maxvio_batch",
)
"""Summary scalars reported as percentiles over seeds."""
CURVES = ("gpu_hours", "cost_usd")
"""Timeline curves banded over seeds (the fields of :class:`BandRow`)."""

SeedResult = tuple[dict[str, RunSummary], list[TimelineRow]]
"""One seed's summaries and timeline."""


def _one_seed(scenario: Scenario, cache: GateCache | None) -> SeedResult:
    est = estimate_run(scenario, cache=cache)
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


def bands_work(scenario: Scenario) -> float:
    """Progress units of :func:`estimate_with_bands`: :func:`run_work` per seed."""
    return run_work(scenario) * scenario.uncertainty.seeds


def estimate_with_bands(
    scenario: Scenario,
    progress: Progress | None = None,
    workers: int | None = None,
    cache: CacheChoice = "default",
) -> RunEstimate:
    """:func:`estimate_run` for the scenario's seed, plus the other seeds' summaries and
    timelines in a process pool; the estimate with percentiles in its summaries and bands.
    ``progress`` hears the first seed's work as it goes and each other seed's at its end (they
    add up to :func:`bands_work`); ``cache`` serves every seed's gates."""
    scenarios = seed_scenarios(scenario)
    n = min(workers or scenario.uncertainty.workers or available_cores(), available_cores())
    gates = resolve_cache(cache)
    est = estimate_run(scenario, progress, workers=n, cache=gates)
    results: list[SeedResult] = [(est.summary, est.timeline)]
    others = scenarios[1:]
    if others:
        quiet = [
            s.model_copy(update={"output": s.output.model_copy(update={"trace": False})})
            for s in others
        ]
        with ProcessPoolExecutor(max_workers=min(n, len(quiet))) as pool:
            for summary, timeline in pool.map(_one_seed, quiet, [gates] * len(quiet)):
                results.append((summary, timeline))
                if progress:
                    progress(f"seed {scenario.seed + len(results) - 1}", run_work(scenario))
    return with_bands(est, results)


def _percentiles(values: list[float]) -> tuple[float, ...]:
    """P10, P50, P90 of ``values``, each one of the values (see the module)."""
    return tuple(
        float(np.percentile(values, q, method="higher" if q > 50 else "lower")) for q in PERCENTILES
    )


WINDOW_MEASURES = ("task_loss", "gate_maxvio_global", "gate_maxvio_batch")
"""Banded scalars averaged over the gate's last window: the headline gives their P50."""


def headline_index(gpu_hours: list[float]) -> int:
    """Index of the median-GPU-hours seed: the lower middle one for an even count, the first
    of equal values (a stable sort)."""
    order = sorted(range(len(gpu_hours)), key=lambda i: gpu_hours[i])
    return order[(len(order) - 1) // 2]


def with_bands(est: RunEstimate, results: list[SeedResult]) -> RunEstimate:
    """``est`` with each strategy's summary and timeline taken from its headline seed among
    ``results`` (the seeds' results, ``est``'s own first; see the module), percentiles over
    them of the banded summary scalars, and bands around the cumulative curves."""
    summary = {}
    headline: dict[str, int] = {}
    for name in est.summary:
        percentiles = {}
        for key in BANDED:
            present = [r[0][name].as_dict()[key] for r in results]
            values = [float(v) for v in present if v is not None]
            if values:
                percentiles[key] = _percentiles(values)
        pick = headline_index([r[0][name].gpu_hours for r in results])
        headline[name] = pick
        chosen = results[pick][0][name]
        p50 = {key: percentiles[key][1] for key in WINDOW_MEASURES if key in percentiles}
        summary[name] = replace(
            chosen,
            task_loss=p50.get("task_loss", chosen.task_loss),
            gate_window=replace(
                chosen.gate_window,
                **{k: v for k, v in p50.items() if k.startswith("gate_")},
            ),
            percentiles=percentiles,
            seeds=len(results),
            headline_seed=est.scenario.seed + pick,
        )
    timeline = [
        row for name, pick in headline.items() for row in results[pick][1] if row.strategy == name
    ]
    bands = []
    for row in timeline:
        curves = {}
        for curve in CURVES:
            values = [
                getattr(other, curve)
                for r in results
                for other in r[1]
                if other.strategy == row.strategy and other.point == row.point
            ]
            curves.update(
                {f"{curve}_p{q}": v for q, v in zip(PERCENTILES, _percentiles(values), strict=True)}
            )
        bands.append(BandRow(strategy=row.strategy, point=row.point, tokens=row.tokens, **curves))
    return replace(est, summary=summary, timeline=timeline, bands=bands)
