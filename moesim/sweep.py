"""Sweeps: one scenario run over a design of overrides, one run directory per point.

A design varies scenario fields named by dotted paths (the ``--set`` syntax of
:mod:`moesim.scenario.overrides`): ``--grid KEY=V1,V2,...`` axes are crossed (cartesian
product, the first axis varying slowest), and ``--zip KEY=V1,V2,...`` lists, all of one length,
vary together point by point (a zipped design), crossed with the grid. A design file (YAML)
says the same with ``grid:``, ``zip:`` and ``set:`` mappings, and may ask for a random design
instead of ``zip:``::

    random:
      points: 8        # how many points
      seed: 1          # the same seed draws the same points
      vary:
        strategies[1].gamma: {low: 1e-5, high: 1e-2, log: true}   # log-uniform
        cluster.price_usd_per_gpu_hour: {low: 2.0, high: 5.0}      # uniform
        parallelism.micro_batch_size: {low: 1, high: 2}            # integer bounds: integers
        router.normalize: [true, false]                            # a choice

(:func:`random_axes`): its points vary together like zipped lists, crossed with the grid.

Every point is validated before any runs, so a bad value fails the whole sweep at once with the
scenario's one-line error. Each point is then a normal run directory ``DIR/<point>`` written
atomically by :func:`moesim.results.store.write_run`, named by a hash of its varied values, so
re-running the same command resumes: a finished point (its directory holds the same resolved
scenario) is skipped, and a killed sweep loses at most the points in flight. Finally
``DIR/sweep.parquet`` is rebuilt from the run directories: one row per point and strategy, the
varied keys as columns, then every key of the point's ``summary.json`` — so the table is the
same whichever executor ran the points, and whether or not the sweep was interrupted.

Executors: a local process pool (``workers`` processes, at most the cores this process may use)
or Dask distributed (a scheduler address, or a local cluster when none is given), for sweeps
that outgrow one machine; with a remote scheduler, ``DIR`` must be on a file system the workers
share. Run one sweep at a time in a directory: a starting sweep removes the hidden temporary
directories that killed runs of its unfinished points left behind.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.queues import Queue
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np
import pandas as pd
import yaml

from moesim.errors import ScenarioError, SimulationError
from moesim.scenario import Scenario, load_scenario
from moesim.scenario.overrides import (
    Yaml12Loader,
    parse_path,
    parse_value,
    split_assignment,
    split_values,
)

Axis = tuple[str, list[Any]]
"""A varied key and its values."""

EXECUTORS = ("process", "dask")
TABLE = "sweep.parquet"


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: its directory name, varied values and validated scenario."""

    name: str
    values: dict[str, Any]
    scenario: Scenario


def parse_axis(text: str, option: str = "--grid") -> Axis:
    """``'strategies[1].gamma=1e-3,1e-4'`` → ``('strategies[1].gamma', [0.001, 0.0001])``."""
    try:
        key, rhs = split_assignment(text)
    except ScenarioError:
        raise ScenarioError(
            option, f"{text!r} is not KEY=V1,V2,... (e.g. cluster.nodes=2,4)"
        ) from None
    parse_path(key)
    items = split_values(rhs)
    if any(item == "" for item in items):
        raise ScenarioError(key, f"empty value in {option} {text!r}")
    return key, [parse_value(item, key) for item in items]


def expand(grid: Sequence[Axis], zipped: Sequence[Axis] = ()) -> list[dict[str, Any]]:
    """The design's points as ``{key: value}`` mappings, in order: the grid's cartesian product
    (first axis slowest), each crossed with the zipped rows (varying fastest)."""
    keys = [k for k, _ in (*grid, *zipped)]
    for key in keys:
        if keys.count(key) > 1:
            raise ScenarioError(key, "varied twice in one sweep")
    if not keys:
        raise ScenarioError("--grid", "nothing to sweep: give at least one --grid or --zip")
    for key, values in (*grid, *zipped):
        if not values:
            raise ScenarioError(key, "no values to sweep over")
    rows: list[dict[str, Any]] = [{}]
    if zipped:
        lengths = {len(v) for _, v in zipped}
        if len(lengths) > 1:
            sizes = ", ".join(f"{k}: {len(v)}" for k, v in zipped)
            raise ScenarioError(zipped[0][0], f"zipped lists differ in length ({sizes})")
        rows = [
            dict(zip([k for k, _ in zipped], vs, strict=True))
            for vs in zip(*(v for _, v in zipped), strict=True)
        ]
    grid_keys = [k for k, _ in grid]
    return [
        {**dict(zip(grid_keys, combo, strict=True)), **row}
        for combo in itertools.product(*(v for _, v in grid))
        for row in rows
    ]


RANDOM_DIGITS = 4
"""Significant digits a random design keeps of a drawn float (readable tables and names)."""


def _round(value: float) -> float:
    return float(f"{value:.{RANDOM_DIGITS}g}")


def _number(value: Any, where: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise ScenarioError(where, f"must be a finite number (got {value!r})")
    return value


def random_axes(spec: Any, where: str = "random") -> list[Axis]:
    """A random design's points as axes that vary together (zipped).

    ``spec`` is ``{points: N, seed: S, vary: {key: range | [choices]}}``. A range
    ``{low, high, log}`` draws uniformly in [low, high] (log-uniformly with ``log: true``,
    which needs low > 0), integers when ``low`` and ``high`` are both integers, and a float
    rounded to :data:`RANDOM_DIGITS` significant digits otherwise; a list draws one of its
    values. The keys are drawn in the order given, from one generator seeded with ``seed``:
    the same spec gives the same points."""
    if not isinstance(spec, dict):
        raise ScenarioError(where, "must be a mapping with points:, seed: and vary:")
    unknown = set(spec) - {"points", "seed", "vary"}
    if unknown:
        raise ScenarioError(f"{where}.{sorted(unknown)[0]}", "unknown key (points, seed, vary)")
    points, seed, vary = spec.get("points"), spec.get("seed"), spec.get("vary")
    if isinstance(points, bool) or not isinstance(points, int) or not 1 <= points <= 100_000:
        raise ScenarioError(f"{where}.points", f"must be an integer from 1 to 100000 ({points!r})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ScenarioError(f"{where}.seed", f"must be a non-negative integer (got {seed!r})")
    if not isinstance(vary, dict) or not vary:
        raise ScenarioError(f"{where}.vary", "must map field paths to ranges or lists")
    rng = np.random.default_rng(seed)
    axes: list[Axis] = []
    for key, how in vary.items():
        at = f"{where}.vary.{key}"
        parse_path(str(key))
        if isinstance(how, list):
            if not how:
                raise ScenarioError(at, "no values to choose from")
            picks = rng.integers(0, len(how), size=points)
            axes.append((str(key), [how[int(i)] for i in picks]))
            continue
        if not isinstance(how, dict) or not {"low", "high"} <= set(how) <= {"low", "high", "log"}:
            raise ScenarioError(at, "must be {low, high, log} or a list of values")
        low, high = _number(how["low"], f"{at}.low"), _number(how["high"], f"{at}.high")
        log = how.get("log", False)
        if not isinstance(log, bool):
            raise ScenarioError(f"{at}.log", f"must be true or false (got {log!r})")
        if not low <= high:
            raise ScenarioError(at, f"low {low} is above high {high}")
        if log and low <= 0:
            raise ScenarioError(f"{at}.low", "a log range needs low > 0")
        integers = isinstance(low, int) and isinstance(high, int)
        values: list[Any]
        if integers and not log:  # every integer equally likely, both ends included
            values = [int(v) for v in rng.integers(int(low), int(high) + 1, size=points)]
        else:
            u = rng.random(points)
            span = (np.log(low), np.log(high)) if log else (low, high)
            drawn = span[0] + u * (span[1] - span[0])
            drawn = np.exp(drawn) if log else drawn
            if integers:
                values = [int(v) for v in np.clip(np.floor(drawn + 0.5), low, high)]
            else:
                values = [min(max(_round(float(v)), float(low)), float(high)) for v in drawn]
        axes.append((str(key), values))
    return axes


def load_design(path: str | Path) -> tuple[list[Axis], list[Axis], list[tuple[str, Any]]]:
    """A sweep file: ``grid:`` and ``zip:`` mappings of key → list of values, ``set:`` fixed
    overrides of key → value, and a ``random:`` design (:func:`random_axes`, in place of
    ``zip:``). Returns (grid axes, zipped or random axes, fixed overrides)."""
    p = Path(path)
    if not p.is_file():
        raise ScenarioError(str(p), "no such sweep file")
    try:
        raw = yaml.load(p.read_text(), Loader=Yaml12Loader) or {}  # safe: a SafeLoader
    except yaml.YAMLError as exc:
        raise ScenarioError(str(p), f"malformed YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(str(p), "a sweep file holds grid:, zip: and set: mappings")
    unknown = set(raw) - {"grid", "zip", "set", "random"}
    if unknown:
        raise ScenarioError(
            sorted(unknown)[0], "unknown key in a sweep file (grid, zip, random, set)"
        )
    if raw.get("random") is not None and raw.get("zip"):
        raise ScenarioError("random", "a sweep file has zip: or random:, not both")

    def mapping(section: str) -> dict[str, Any]:
        value = raw.get(section) or {}
        if not isinstance(value, dict):
            raise ScenarioError(section, "must map field paths to values")
        for key in value:
            parse_path(str(key))
        return {str(k): v for k, v in value.items()}

    axes: dict[str, list[Axis]] = {}
    for section in ("grid", "zip"):
        axes[section] = []
        for key, values in mapping(section).items():
            if not isinstance(values, list):
                raise ScenarioError(f"{section}.{key}", "must be a list of values")
            axes[section].append((key, values))
    if raw.get("random") is not None:
        axes["zip"] = random_axes(raw["random"])
    return axes["grid"], axes["zip"], list(mapping("set").items())


def point_name(values: dict[str, Any]) -> str:
    """A point's directory name: a hash of its varied values (stable across runs)."""
    text = json.dumps(values, sort_keys=True, default=str)
    return "point-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def plan(
    scenario_path: str | Path,
    design: Sequence[dict[str, Any]],
    sets: Sequence[str | tuple[str, Any]] = (),
) -> list[SweepPoint]:
    """Validate the scenario at every point of ``design`` (fixed ``sets`` first), its
    per-GPU memory estimate included."""
    from moesim.estimate.memory import check_memory

    points = []
    for values in design:
        scenario = load_scenario(scenario_path, sets=[*sets, *values.items()])
        check_memory(scenario)
        points.append(SweepPoint(point_name(values), values, scenario))
    return points


def run_point(
    scenario: Scenario,
    run_dir: str,
    command: Sequence[str] | None = None,
    cache: Any = "default",
) -> str:
    """Estimate one point (with its seeds' bands) and write its run directory atomically.
    ``cache``: the gate cache, as :func:`moesim.estimate.estimate_run` takes it (every
    point's process reads and writes the same one)."""
    from moesim.estimate import estimate_with_bands
    from moesim.results import write_run

    queue = _work_queue
    report = None if queue is None else lambda label, units: queue.put((label, units))
    est = estimate_with_bands(scenario, progress=report, workers=1, cache=cache)
    return str(write_run(est, run_dir, command=command))


# Where a point's process reports its units of work (set in each pool worker; see work=).
_work_queue: Queue[tuple[str, float]] | None = None


def _init_worker(queue: Queue[tuple[str, float]] | None) -> None:
    global _work_queue
    _work_queue = queue


def point_work(point: SweepPoint) -> float:
    """Units of work of one point (:func:`moesim.estimate.montecarlo.bands_work`)."""
    from moesim.estimate.montecarlo import bands_work

    return bands_work(point.scenario)


def is_finished(point: SweepPoint, out_dir: Path) -> bool:
    """Whether ``point``'s run directory is complete; one holding another scenario is an
    error (the directory was used for a different sweep)."""
    from moesim.results.store import scenario_hash

    run_dir = out_dir / point.name
    if not (run_dir / "summary.json").is_file():
        return False
    meta = json.loads((run_dir / "metadata.json").read_text())
    if meta.get("scenario_sha256") != scenario_hash(point.scenario):
        raise ScenarioError(
            "--out",
            f"{run_dir} holds a run of another scenario (was the scenario file edited since?); "
            "choose a new sweep directory",
        )
    return True


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_sweep(
    points: Sequence[SweepPoint],
    out_dir: str | Path,
    executor: str = "process",
    workers: int | None = None,
    scheduler: str | None = None,
    progress: Callable[[str], None] | None = None,
    command: Sequence[str] | None = None,
    cache: Any = "default",
    work: Callable[[str, float], None] | None = None,
) -> pd.DataFrame:
    """Run the points not yet finished under ``out_dir`` and write ``out_dir/sweep.parquet``.

    Parameters
    ----------
    points
        From :func:`plan`.
    out_dir
        The sweep directory (created if needed; finished points in it are kept).
    executor
        ``"process"`` (a local process pool) or ``"dask"``.
    workers
        Processes (or local Dask workers); default and cap: the cores available.
    scheduler
        A Dask scheduler address (``tcp://host:8786``); a local cluster when None.
    progress
        Called with a point's name as each point finishes (or is found finished).
    command
        The command line that asked for the sweep (recorded in each point's metadata).
    cache
        The gate cache the points share: a :class:`~moesim.estimate.gate_cache.GateCache`,
        None (none), or ``"default"`` (the environment's, resolved here once).
    work
        Called with a label and units of work as they are done, adding up to the sum of
        :func:`point_work` over ``points``: as each point's gates train and steps run with the
        process executor, at each point's end with Dask, at once for finished points.

    Returns
    -------
    The sweep table (also written to ``out_dir/sweep.parquet``).
    """
    if executor not in EXECUTORS:
        raise ScenarioError("--executor", f"unknown executor {executor!r} ({', '.join(EXECUTORS)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tick = progress or (lambda _name: None)
    todo = []
    for point in points:
        if is_finished(point, out):
            tick(f"{point.name} (done before)")
            if work is not None:
                work(f"{point.name} (done before)", point_work(point))
        else:
            # A killed run leaves its hidden temporary directory behind: not a result.
            for stale in out.glob(f".{point.name}.*"):
                shutil.rmtree(stale, ignore_errors=True)
            todo.append(point)
    if todo:
        from moesim.estimate.gate_cache import GateCache

        gates = GateCache.default() if isinstance(cache, str) else cache
        n = max(1, min(workers or available_cores(), available_cores(), len(todo)))
        if executor == "dask":
            done = tick
            if work is not None:
                works = {p.name: point_work(p) for p in todo}

                def done(name: str) -> None:
                    tick(name)
                    work(name, works[name])

            _run_dask(todo, out, n, scheduler, done, command, gates)
        else:
            _run_processes(todo, out, n, tick, command, gates, work)
    table = sweep_table(points, out)
    tmp = out / f".{TABLE}.tmp"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, out / TABLE)
    return table


def _run_processes(
    todo: Sequence[SweepPoint],
    out: Path,
    workers: int,
    tick: Callable[[str], None],
    command: Sequence[str] | None,
    cache: Any,
    work: Callable[[str, float], None] | None = None,
) -> None:
    context = multiprocessing.get_context()
    queue: Queue[tuple[str, float]] | None = None if work is None else context.Queue()

    def drain() -> None:
        while queue is not None and work is not None:
            try:
                work(*queue.get_nowait())
            except Empty:
                return

    try:
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(queue,)
        ) as pool:
            futures = {
                pool.submit(run_point, p.scenario, str(out / p.name), command, cache): p.name
                for p in todo
            }
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                drain()
                for future in finished:
                    future.result()
                    tick(futures[future])
        drain()  # the workers have exited, so what they put last is in the queue
    except BrokenProcessPool:
        raise SimulationError(
            "a sweep worker died (killed, or out of memory); finished points are kept: "
            "run the same command again to resume"
        ) from None


def _run_dask(
    todo: Sequence[SweepPoint],
    out: Path,
    workers: int,
    scheduler: str | None,
    tick: Callable[[str], None],
    command: Sequence[str] | None,
    cache: Any,
) -> None:
    try:
        from dask.distributed import Client, LocalCluster
        from dask.distributed import as_completed as dask_completed
        from distributed.scheduler import KilledWorker
    except ImportError:
        raise ScenarioError(
            "--executor", "dask needs Dask distributed: pip install 'moesim[sweep]'"
        ) from None
    import logging

    if scheduler:
        client = Client(scheduler)
        cluster = None
    else:
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)
    try:
        futures = client.map(
            run_point,
            [p.scenario for p in todo],
            [str(out / p.name) for p in todo],
            [command] * len(todo),
            [cache] * len(todo),
            key=[f"moesim-{p.name}" for p in todo],
            pure=False,
        )
        names = {f.key: p.name for f, p in zip(futures, todo, strict=True)}
        for future in dask_completed(futures):
            future.result()
            tick(names[future.key])
    except KilledWorker:
        raise SimulationError(
            "Dask workers kept dying on a sweep point (killed, or out of memory); finished "
            "points are kept: run the same command again to resume"
        ) from None
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _cell(value: Any) -> Any:
    """A varied value as a table cell: lists and mappings as their JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def sweep_table(points: Sequence[SweepPoint], out_dir: str | Path) -> pd.DataFrame:
    """One row per point and strategy: ``point``, the varied keys, ``strategy``, then every
    summary key of the point's run directory (in the design's order)."""
    out = Path(out_dir)
    rows = []
    for point in points:
        summary = json.loads((out / point.name / "summary.json").read_text())
        varied = {k: _cell(v) for k, v in point.values.items()}
        for strategy, values in summary.items():
            rows.append({"point": point.name, **varied, "strategy": strategy, **values})
    return pd.DataFrame(rows)


def varied_keys(table: pd.DataFrame) -> list[str]:
    """The varied keys of a sweep table: its columns between ``point`` and ``strategy``."""
    columns = list(table.columns)
    return columns[columns.index("point") + 1 : columns.index("strategy")]
