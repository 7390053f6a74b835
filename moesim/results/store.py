"""The run directory: writing it whole or not at all, and loading it back for analysis.

Layout::

    scenario.resolved.yaml   the scenario with presets and defaults written out
    metadata.json            moesim and package versions, seed, scenario hash; when it was written,
                             the command line and the source's git commit (when available)
    summary.json             per-strategy scalars (step time, GPU-hours, cost, MaxVio, …)
    timeline.parquet gate.parquet steps.parquet gpus.parquet experts.parquet links.parquet
    specialisation.parquet kernels.parquet
    routing_by_domain.parquet  the final routers' load skew per data domain and pooled
    gpu_hours.png cost.png   curves against tokens trained, one line per strategy
    step_breakdown.png       where each strategy's GPU time goes in a step
    routing_by_domain.png/.svg  that skew per domain (runs with a trained gate)
    trace.json.gz            one simulated step's timeline (Chrome trace format; Perfetto)

A run is written into a hidden sibling directory (``.<name>.partial-<host>-<pid>-…``) and
renamed into place only when complete, so a failed run leaves no partial directory behind; a
killed one leaves only that hidden directory, which :func:`load` refuses and the next run in the
same parent removes once its process is gone. Nothing but ``metadata.json`` depends on the wall
clock or the machine: the same scenario and seed give identical tables and summary.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pandas as pd

from moesim import __version__
from moesim.errors import ScenarioError
from moesim.estimate.invariants import check_invariants
from moesim.estimate.records import RunEstimate
from moesim.results import plots, tables
from moesim.results.trace import write_trace
from moesim.scenario import Scenario, dump_scenario, load_scenario
from moesim.scenario.loader import show

TABLES = (
    "timeline",
    "bands",
    "gate",
    "steps",
    "stages",
    "gpus",
    "experts",
    "links",
    "specialisation",
    "kernels",
    "routing_by_domain",
)
ROUTING_BY_DOMAIN_COLUMNS = (
    "strategy",
    "layer",
    "domain",
    "maxvio",
    "cv",
    "min_over_mean",
    "tokens",
)
_PACKAGES = ("simpy", "numpy", "pandas", "pydantic", "pyarrow", "matplotlib")


def _package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def source_commit() -> dict[str, Any] | None:
    """The git commit of moesim's source, and whether the tree had uncommitted changes, when
    moesim runs from a git checkout with git on the PATH; None otherwise."""
    src = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(src), *args], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def scenario_hash(scenario: Scenario) -> str:
    return hashlib.sha256(dump_scenario(scenario).encode()).hexdigest()


def build_tables(est: RunEstimate) -> dict[str, pd.DataFrame]:
    return {
        "timeline": tables.timeline_table(est),
        "bands": tables.bands_table(est),
        "gate": tables.gate_table(est),
        "steps": tables.steps_table(est),
        "stages": tables.stages_table(est),
        "gpus": tables.gpus_table(est),
        "experts": tables.experts_table(est),
        "links": tables.links_table(est),
        "specialisation": tables.specialisation_table(est),
        "kernels": tables.kernels_table(est),
        "routing_by_domain": pd.DataFrame(
            est.routing_by_domain, columns=list(ROUTING_BY_DOMAIN_COLUMNS)
        ),
    }


PARTIAL = ".partial-"
"""Marks a run directory still being written: ``.<name>.partial-<host>-<pid>-<random>``."""
MAX_PATH_CHARS = 4096


def _bad_path(text: str) -> str | None:
    if not text:
        return "is empty"
    if any(not c.isprintable() for c in text):
        return "holds a control character (NUL, newline, escape)"
    if len(text) > MAX_PATH_CHARS or any(len(part.encode()) > 255 for part in Path(text).parts):
        return "is too long"
    return None


def check_output_dir(run_dir: str | Path, label: str = "--out") -> Path:
    """Check, before any work, that ``run_dir`` can be created: a printable path that does not
    exist yet (not even as a dangling symlink) under a directory this process can write.

    Raises
    ------
    ScenarioError
        Naming ``label`` (the option or field the path came from).
    """
    text = str(run_dir)
    problem = _bad_path(text)
    if problem:
        raise ScenarioError(label, f"the output path {problem}")
    target = Path(text)
    shown = show(text, 120)
    if os.path.lexists(target):
        raise ScenarioError(label, f"{shown} already exists; choose a new directory")
    parent = target.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ScenarioError(label, f"{show(str(parent), 120)} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ScenarioError(label, f"cannot write under {show(str(parent), 120)}")
    if parent == target.parent:
        try:  # a real probe: access() does not see read-only mounts or quotas
            tempfile.TemporaryDirectory(prefix=".moesim-probe-", dir=parent).cleanup()
        except OSError as exc:
            raise ScenarioError(
                label, f"cannot write under {show(str(parent), 120)} ({exc.strerror})"
            ) from None
    return target


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale_partials(parent: Path) -> list[Path]:
    """Remove partial run directories under ``parent`` left by killed runs of this host (their
    process is gone); returns what was removed. Others' and live runs' are left alone."""
    removed: list[Path] = []
    host = socket.gethostname()
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and PARTIAL in name):
            continue
        owner = name.rsplit(PARTIAL, 1)[1].rsplit("-", 2)
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit():
            continue
        if not _alive(int(owner[1])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _write_plots(out_dir: Path, frames: dict[str, pd.DataFrame]) -> None:
    """Every figure of a run directory (:func:`moesim.results.plots.write_all`, and the routing
    by domain when there is one)."""
    plots.write_all(
        out_dir,
        frames["timeline"],
        frames["bands"],
        frames["stages"],
        frames["gpus"],
        frames["experts"],
    )
    if not frames["routing_by_domain"].empty:
        plots.write_routing_by_domain(frames["routing_by_domain"], out_dir)


def _plots_child(out_dir: Path, frames: dict[str, pd.DataFrame], report: Connection) -> None:
    """The forked process's work: the figures, or its error as one line to the parent (no
    traceback on the terminal: the command line's errors are one line each)."""
    try:
        _write_plots(out_dir, frames)
    except BaseException as exc:
        report.send(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from None


_Plotting = tuple[multiprocessing.process.BaseProcess, Connection]


def _start_plots(out_dir: Path, frames: dict[str, pd.DataFrame]) -> _Plotting | None:
    """Draw the figures in a forked process while this one writes the tables and the trace
    (a second of a DeepSeek-V3 run's end, when the cores are otherwise idle); None when they
    were drawn here instead. Only a single-threaded process forks (another thread may hold a
    lock the child would need: a notebook's kernel, for one); elsewhere, and where fork does
    not exist, the figures are drawn here, the same files."""
    if threading.active_count() > 1 or "fork" not in multiprocessing.get_all_start_methods():
        _write_plots(out_dir, frames)
        return None
    fork = multiprocessing.get_context("fork")
    receive, report = fork.Pipe(duplex=False)
    child = fork.Process(target=_plots_child, args=(out_dir, frames, report), name="moesim-plots")
    child.start()
    report.close()  # the child's copy stays open until it ends
    return child, receive


def _finish_plots(plotting: _Plotting | None) -> None:
    """Wait for the figures' process; its failure fails the run with the child's error."""
    if plotting is None:
        return
    child, receive = plotting
    child.join()
    if child.exitcode == 0:
        receive.close()
        return
    try:
        message = receive.recv()
    except EOFError:  # it died before it could say why (killed)
        message = f"exit code {child.exitcode}"
    finally:
        receive.close()
    raise RuntimeError(f"drawing the run's figures failed: {message}")


def write_run(
    est: RunEstimate,
    run_dir: str | Path,
    label: str = "--out",
    command: Sequence[str] | None = None,
) -> Path:
    """Write the whole run directory atomically; returns its path.

    The output invariants (:mod:`moesim.estimate.invariants`) are checked on the final tables
    and summary first: a violation raises :class:`SimulationError` and nothing is written.
    The run is written into ``.<name>.partial-…`` beside the target and renamed into place
    when complete; a run killed meanwhile leaves only that hidden partial directory, which
    :func:`load` refuses and the next run under the same parent removes. Two runs racing for
    the same target: one wins, the other fails with a :class:`ScenarioError`. ``command``, the
    command line that asked for the run, goes into ``metadata.json``.
    """
    target = Path(run_dir)
    sc = est.scenario
    frames = build_tables(est)
    summary = est.summary_dict()
    check_invariants(sc.name, frames, summary, sc.training.total_tokens)
    summary_text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    if os.path.lexists(target):
        raise ScenarioError(label, f"{show(str(target), 120)} already exists; nothing written")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(target.parent)
    prefix = f".{target.name[:100]}{PARTIAL}{socket.gethostname()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a run directory is for sharing
    plotting = None
    try:
        (tmp / "scenario.resolved.yaml").write_text(dump_scenario(sc))
        meta = {
            "moesim_version": __version__,
            "scenario": sc.name,
            "seed": sc.seed,
            "scenario_sha256": scenario_hash(sc),
            "python": platform.python_version(),
            "packages": _package_versions(),
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": shlex.join(command) if command else None,
            "git": source_commit(),
            "gate_cache": est.gate_cache,
        }
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        plotting = _start_plots(tmp, frames)
        for name, df in frames.items():
            df.to_parquet(tmp / f"{name}.parquet", index=False)
        traced = [s for s in est.steps if s.result.trace]
        if traced:
            step = traced[0]
            lay = sc.parallelism
            labels = {
                g: f"GPU {g} · node {g // sc.cluster.gpus_per_node} · stage "
                f"{g // (lay.expert * lay.data)} · EP rank {g % lay.expert}"
                for g in sc.traced_gpus
            }
            context = {"strategy": step.strategy, "step": step.step, "point": step.point}
            write_trace(tmp / "trace.json.gz", step.result.trace, labels, context)
        _finish_plots(plotting)
        plotting = None
        # summary.json last: a directory with it is complete (load() looks for it).
        (tmp / "summary.json").write_text(summary_text)
        try:
            tmp.rename(target)
        except OSError as exc:
            if os.path.lexists(target):
                raise ScenarioError(
                    label,
                    f"{show(str(target), 120)} was created by another run meanwhile; "
                    "nothing written",
                ) from None
            raise ScenarioError(
                label, f"cannot create {show(str(target), 120)} ({exc.strerror})"
            ) from None
    except BaseException:
        if plotting is not None:  # stopped before it writes into the directory removed here
            plotting[0].terminate()
            plotting[0].join()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@dataclass(frozen=True)
class RunResults:
    """A loaded run directory: the scenario, summary and every table as a DataFrame."""

    path: Path
    scenario: Scenario
    metadata: dict[str, Any]
    summary: dict[str, dict[str, float]]
    timeline: pd.DataFrame
    bands: pd.DataFrame
    gate: pd.DataFrame
    steps: pd.DataFrame
    stages: pd.DataFrame
    gpus: pd.DataFrame
    experts: pd.DataFrame
    links: pd.DataFrame
    specialisation: pd.DataFrame
    kernels: pd.DataFrame
    routing_by_domain: pd.DataFrame

    def __repr__(self) -> str:
        sc = self.scenario
        return (
            f"RunResults({str(self.path)!r}, scenario={sc.name!r}, seed={sc.seed}, "
            f"gpus={sc.cluster.gpus}, strategies={list(self.summary)})"
        )

    def summary_frame(self) -> pd.DataFrame:
        """The summary as a DataFrame, one row per strategy."""
        return pd.DataFrame(self.summary).T.rename_axis("strategy")


def load(run_dir: str | Path) -> RunResults:
    """Load a run directory written by ``moesim run``."""
    path = Path(run_dir)
    if path.name.startswith(".") and PARTIAL in path.name:
        raise FileNotFoundError(
            f"{path}: a partial run directory (a run still writing, or killed); not a run"
        )
    if not (path / "summary.json").is_file():
        raise FileNotFoundError(f"{path}: not a moesim run directory (no summary.json)")
    missing = [name for name in TABLES if not (path / f"{name}.parquet").is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: incomplete run directory (no {missing[0]}.parquet)")
    frames = {name: pd.read_parquet(path / f"{name}.parquet") for name in TABLES}
    return RunResults(
        path=path,
        scenario=load_scenario(path / "scenario.resolved.yaml"),
        metadata=json.loads((path / "metadata.json").read_text()),
        summary=json.loads((path / "summary.json").read_text()),
        **frames,
    )
