"""Failure and checkpoint/restart overhead: closed form, optimal interval, Monte Carlo.

Model (Daly 2006, see below). A job must do ``W`` seconds of useful work. It checkpoints after
every ``τ`` seconds of work, each write stalling it ``δ`` seconds; the last segment is the
remainder ``W − ⌊W/τ⌋τ`` followed by a final checkpoint. Failures of the whole job arrive as a
Poisson process of mean inter-arrival ``M`` (the job MTBF: per-GPU MTBF / GPUs). A failure
discards the segment in progress (its work and any partial write) and starts a restart of
``R`` seconds; a failure during the restart starts the restart over. Failures are independent
of the job's state, and nothing else (stragglers, slow-downs) is modelled here.

Expected time of one segment of length ``L = τ + δ`` (renewal argument). Let ``X ~ Exp(M)`` be
the time to the next failure and ``T`` the time to finish the segment. Restart first: a restart
completes when a failure-free stretch of length ``R`` occurs, so with ``T_R`` its duration,
``E[T_R] = E[min(X, R)] + P(X < R) E[T_R]``, i.e. ``E[T_R] = M (e^{R/M} − 1)``. Then
``E[T] = E[min(X, L)] + P(X < L) (E[T_R] + E[T])`` gives

    E[T] = M e^{R/M} (e^{L/M} − 1)                                           (1)

which is Daly's (2006) expected wall-clock time per segment. It splits
exactly into the successful work and write ``L``, plus

- lost time ``M (e^{L/M} − 1) − L``: the expected number of failed attempts
  ``e^{L/M} − 1`` (geometric) times their mean length ``E[X | X < L]``;
- restart time ``M (e^{L/M} − 1)(e^{R/M} − 1)``: one restart per failed attempt;
- interruptions ``(e^{L/M} − 1) e^{R/M}``: failed attempts plus failed restarts.

Optimal interval. Per unit of work the expected time is ``M e^{R/M} (e^{(τ+δ)/M} − 1) / τ``;
``R`` is a constant factor, and the minimiser satisfies ``(1 − τ/M) e^{(τ+δ)/M} = 1``, solved
here to machine precision (:func:`optimal_interval`). Young (1974), "A first order
approximation to the optimum checkpoint interval", Commun. ACM 17(9):530-531, gives
``τ = √(2δM)``; Daly (2006), "A higher order estimate of the optimum checkpoint interval for
restart dumps", Future Gener. Comput. Syst. 22(3):303-312, gives the higher-order
``√(2δM) [1 + ⅓ √(δ/2M) + ⅑ (δ/2M)] − δ`` for ``δ < 2M`` and ``M`` otherwise. Both are offered;
the scenario's ``"optimal"`` uses the exact minimiser, because the overhead moesim reports is
(1), and Young/Daly are its expansions in ``δ/M``.

Everything is in seconds; GPU-hours and dollars go through :mod:`moesim.units`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moesim import units
from moesim.scenario.faults import Failures

_MAX_EXPONENT = 700.0  # e^700 ≈ 1e304: beyond it (1) overflows a double.


@dataclass(frozen=True)
class FailureOverhead:
    """Wall-clock time to finish ``work_s`` of useful work, split by cause (seconds).

    ``checkpoint_s`` counts completed checkpoint writes; a write cut short by a failure is
    part of ``lost_s``, with the work it was saving. ``restart_s`` includes restarts that a
    further failure cut short. ``failures`` is the number of interruptions (expected, or
    counted in one simulated run).
    """

    work_s: float
    checkpoint_s: float
    lost_s: float
    restart_s: float
    failures: float

    @property
    def overhead_s(self) -> float:
        """Time beyond the useful work: checkpoints + lost work + restarts."""
        return self.checkpoint_s + self.lost_s + self.restart_s

    @property
    def wall_s(self) -> float:
        return self.work_s + self.overhead_s

    @property
    def overhead_fraction(self) -> float:
        """Overhead relative to the useful work (0 for no work)."""
        return self.overhead_s / self.work_s if self.work_s > 0 else 0.0


def _check(
    work_s: float, interval_s: float, write_s: float, restart_s: float, mtbf_s: float
) -> None:
    if not work_s >= 0:
        raise ValueError(f"work_s: {work_s} must be non-negative")
    if not interval_s > 0:
        raise ValueError(f"interval_s: {interval_s} must be positive")
    if not write_s >= 0:
        raise ValueError(f"write_s: {write_s} must be non-negative")
    if not restart_s >= 0:
        raise ValueError(f"restart_s: {restart_s} must be non-negative")
    if not mtbf_s > 0:
        raise ValueError(f"mtbf_s: {mtbf_s} must be positive")


def _segments(work_s: float, interval_s: float) -> tuple[int, float]:
    """Number of full segments of ``interval_s`` work and the remainder's work (0 if none)."""
    if work_s == 0:
        return 0, 0.0
    if math.isinf(interval_s):
        return 0, work_s
    full = int(work_s // interval_s)
    last = work_s - full * interval_s
    if last <= 1e-12 * work_s:  # a whole number of intervals, up to rounding
        last = 0.0
    return full, last


def young_interval(write_s: float, mtbf_s: float) -> float:
    """Young's (1974) first-order optimum checkpoint interval ``√(2 δ M)``, s.

    Parameters
    ----------
    write_s : float
        Checkpoint write time ``δ``, s.
    mtbf_s : float
        Job mean time between failures ``M``, s.
    """
    return math.sqrt(2.0 * write_s * mtbf_s)


def daly_interval(write_s: float, mtbf_s: float) -> float:
    """Daly's (2006) higher-order optimum checkpoint interval, s.

    ``√(2δM) [1 + ⅓ (δ/2M)^½ + ⅑ (δ/2M)] − δ`` for ``δ < 2M``, else ``M``.
    """
    if write_s >= 2.0 * mtbf_s:
        return mtbf_s
    ratio = write_s / (2.0 * mtbf_s)
    return young_interval(write_s, mtbf_s) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - write_s


def optimal_interval(write_s: float, mtbf_s: float) -> float:
    """Checkpoint interval minimising the expected time per unit of work under (1), s.

    With ``x = τ/M`` and ``a = δ/M`` the stationarity condition of ``(e^{x+a} − 1)/x`` is
    ``a + x + log(1 − x) = 0``; its left side falls strictly from ``a`` at 0 to ``−∞`` at 1, so
    it has one root in ``(0, 1)``, found by bisection. ``M = ∞`` (no failures) gives ``∞``:
    one checkpoint, at the end.
    """
    if not write_s > 0:
        raise ValueError(f"write_s: {write_s} must be positive for an optimal interval")
    if not mtbf_s > 0:
        raise ValueError(f"mtbf_s: {mtbf_s} must be positive")
    if math.isinf(mtbf_s):
        return math.inf
    a = write_s / mtbf_s
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if a + mid + math.log1p(-mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi) * mtbf_s


def overhead_rate(interval_s: float, write_s: float, restart_s: float, mtbf_s: float) -> float:
    """Expected wall-clock seconds per second of useful work, ``M e^{R/M}(e^{(τ+δ)/M} − 1)/τ``.

    Exact for a run of whole intervals; the long-run rate otherwise (Daly 2006).
    """
    _check(0.0, interval_s, write_s, restart_s, mtbf_s)
    return _segment(interval_s, write_s, restart_s, mtbf_s).wall_s / interval_s


def _segment(work: float, write_s: float, restart_s: float, mtbf_s: float) -> FailureOverhead:
    """Expected split of one segment of ``work`` seconds followed by one write (see (1))."""
    length = work + write_s
    if math.isinf(mtbf_s):
        return FailureOverhead(work, write_s, 0.0, 0.0, 0.0)
    if max(length, restart_s) / mtbf_s > _MAX_EXPONENT:
        raise ValueError(
            f"a segment of {length:.3g} s (or a restart of {restart_s:.3g} s) is "
            f"{max(length, restart_s) / mtbf_s:.0f} job MTBFs: it would essentially never "
            f"complete; shorten the checkpoint interval"
        )
    attempts = math.expm1(length / mtbf_s)  # expected failed attempts
    restart_growth = math.expm1(restart_s / mtbf_s)
    return FailureOverhead(
        work_s=work,
        checkpoint_s=write_s,
        lost_s=mtbf_s * attempts - length,
        restart_s=mtbf_s * attempts * restart_growth,
        failures=attempts * (1.0 + restart_growth),
    )


def expected_overhead(
    work_s: float, interval_s: float, write_s: float, restart_s: float, mtbf_s: float
) -> FailureOverhead:
    """Expected wall-clock time, by cause, to finish ``work_s`` of useful work.

    Parameters
    ----------
    work_s : float
        Useful (failure-free) training time, s.
    interval_s : float
        Useful work between checkpoints ``τ``, s (``inf``: one checkpoint at the end).
    write_s : float
        Stall per checkpoint ``δ``, s.
    restart_s : float
        Restart time after a failure ``R``, s (failures may strike during it).
    mtbf_s : float
        Job mean time between failures ``M``, s (``inf``: no failures).

    Returns
    -------
    FailureOverhead
        Sum of (1) and its split over ``⌊W/τ⌋`` full segments and the remainder segment
        (segments are independent: the Poisson process is memoryless).
    """
    _check(work_s, interval_s, write_s, restart_s, mtbf_s)
    full, last = _segments(work_s, interval_s)
    parts = []
    if full:
        parts.append((full, _segment(interval_s, write_s, restart_s, mtbf_s)))
    if last > 0:
        parts.append((1, _segment(last, write_s, restart_s, mtbf_s)))
    return FailureOverhead(
        work_s=work_s,
        checkpoint_s=sum(n * p.checkpoint_s for n, p in parts),
        lost_s=sum(n * p.lost_s for n, p in parts),
        restart_s=sum(n * p.restart_s for n, p in parts),
        failures=sum(n * p.failures for n, p in parts),
    )


@dataclass(frozen=True)
class FailureSamples:
    """Monte Carlo runs of the same job, one entry per run (seconds; ``failures`` counts)."""

    work_s: float
    checkpoint_s: float
    lost_s: npt.NDArray[np.float64]
    restart_s: npt.NDArray[np.float64]
    failures: npt.NDArray[np.int64]
    wall_s: npt.NDArray[np.float64]
    """Wall-clock of each run, accumulated event by event (equals the sum of the parts)."""

    def run(self, i: int) -> FailureOverhead:
        return FailureOverhead(
            self.work_s,
            self.checkpoint_s,
            float(self.lost_s[i]),
            float(self.restart_s[i]),
            float(self.failures[i]),
        )

    def mean(self) -> FailureOverhead:
        return FailureOverhead(
            self.work_s,
            self.checkpoint_s,
            float(self.lost_s.mean()),
            float(self.restart_s.mean()),
            float(self.failures.mean()),
        )


def simulate_failures_many(
    work_s: float,
    interval_s: float,
    write_s: float,
    restart_s: float,
    mtbf_s: float,
    runs: int,
    rng: np.random.Generator,
) -> FailureSamples:
    """Simulate ``runs`` independent runs of the job, event by event (vectorised over runs).

    Each run walks a Poisson process of failures: it draws the exponential time to the next
    failure, finishes a restart if one is pending and the failure comes later, then completes
    as many checkpointed segments as fit before the failure; the segment the failure falls in
    is lost. The loop is over failures (a step per interruption of the slowest run), each step
    NumPy over the runs still going.
    """
    _check(work_s, interval_s, write_s, restart_s, mtbf_s)
    if runs <= 0:
        raise ValueError(f"runs: {runs} must be positive")
    full, last = _segments(work_s, interval_s)
    segments = full + (last > 0)
    expected = expected_overhead(work_s, interval_s, write_s, restart_s, mtbf_s)
    if expected.failures > 1e6:
        raise ValueError(
            f"about {expected.failures:.3g} failures expected per run: too many to simulate"
        )
    seg_len = interval_s + write_s
    last_len = last + write_s
    done = np.zeros(runs, dtype=np.int64)  # completed segments
    wall = np.zeros(runs)
    lost = np.zeros(runs)
    restart = np.zeros(runs)
    failures = np.zeros(runs, dtype=np.int64)
    restarting = np.zeros(runs, dtype=bool)
    active = np.flatnonzero(done < segments)
    while active.size:
        x = rng.exponential(mtbf_s, size=active.size)  # time to the next failure
        # A pending restart: cut short by the failure, or completed before it.
        pending = restarting[active]
        cut = pending & (x < restart_s)
        spent = np.where(pending, np.minimum(x, restart_s), 0.0)
        restart[active] += spent
        wall[active] += spent
        x = x - spent
        restarting[active] = cut
        # Runs back at work: whole segments that fit before the failure.
        go = ~cut
        idx, left = active[go], x[go]
        full_left = np.maximum(full - done[idx], 0)
        fit = np.floor(left / seg_len) if full else np.zeros_like(left)
        k = np.minimum(fit, full_left).astype(np.int64)
        done[idx] += k
        wall[idx] += k * seg_len
        left = left - k * seg_len
        # Past the full segments, the remainder segment either fits or is lost.
        at_last = (k == full_left) & (last > 0) & (done[idx] < segments)
        finish_last = at_last & (left >= last_len)
        done[idx[finish_last]] += 1
        wall[idx[finish_last]] += last_len
        # The failure strikes runs that have not finished.
        hit = done[idx] < segments
        struck = idx[hit]
        lost[struck] += left[hit]
        wall[struck] += left[hit]
        failures[struck] += 1
        restarting[struck] = True
        failures[active[cut]] += 1
        active = np.flatnonzero(done < segments)
    return FailureSamples(
        work_s=work_s,
        checkpoint_s=segments * write_s,
        lost_s=lost,
        restart_s=restart,
        failures=failures,
        wall_s=wall,
    )


def simulate_failures(
    work_s: float,
    interval_s: float,
    write_s: float,
    restart_s: float,
    mtbf_s: float,
    rng: np.random.Generator,
) -> FailureOverhead:
    """One seeded Monte Carlo run of the job (see :func:`simulate_failures_many`)."""
    return simulate_failures_many(work_s, interval_s, write_s, restart_s, mtbf_s, 1, rng).run(0)


# --------------------------------------------------------------------------- scenario level


@dataclass(frozen=True)
class FailureEstimate:
    """Failure overhead of a run on ``gpus`` GPUs, in time, GPU-hours and dollars.

    GPU-hours charge every GPU of the job for the whole overhead: a synchronous job holds (and
    a reservation bills) its whole allocation while it writes checkpoints, redoes lost work
    and restarts.
    """

    gpus: int
    price_usd_per_gpu_hour: float
    job_mtbf_s: float
    interval_s: float
    """Checkpoint interval used (fixed, or optimal rounded to whole steps), s."""
    young_interval_s: float
    daly_interval_s: float
    optimal_interval_s: float
    overhead: FailureOverhead

    def gpu_hours(self, seconds: float) -> float:
        return self.gpus * units.seconds_to_hours(seconds)

    @property
    def overhead_gpu_hours(self) -> float:
        return self.gpu_hours(self.overhead.overhead_s)

    @property
    def overhead_cost_usd(self) -> float:
        return self.overhead_gpu_hours * self.price_usd_per_gpu_hour

    def summary(self) -> dict[str, float]:
        """Flat scalars for a run summary (all ``failure_``-prefixed, SI or GPU-hours/USD)."""
        o = self.overhead
        return {
            "failure_job_mtbf_s": self.job_mtbf_s,
            "failure_checkpoint_interval_s": self.interval_s,
            "failure_optimal_interval_s": self.optimal_interval_s,
            "failure_young_interval_s": self.young_interval_s,
            "failure_daly_interval_s": self.daly_interval_s,
            "failure_expected_interruptions": o.failures,
            "failure_overhead_s": o.overhead_s,
            "failure_overhead_fraction": o.overhead_fraction,
            "failure_checkpoint_gpu_hours": self.gpu_hours(o.checkpoint_s),
            "failure_lost_gpu_hours": self.gpu_hours(o.lost_s),
            "failure_restart_gpu_hours": self.gpu_hours(o.restart_s),
            "failure_gpu_hours": self.overhead_gpu_hours,
            "failure_cost_usd": self.overhead_cost_usd,
        }


def failure_estimate(
    failures: Failures,
    *,
    gpus: int,
    step_time_s: float,
    steps: int,
    price_usd_per_gpu_hour: float,
) -> FailureEstimate:
    """Expected failure overhead of ``steps`` steps of ``step_time_s`` on ``gpus`` GPUs.

    The useful work is ``steps × step_time_s`` (use the run's mean step time). Checkpoints are
    taken between steps, so the interval (fixed or optimal) is rounded to a whole number of
    steps, at least one. This ignores ``failures.enabled``: callers decide whether to apply it.
    """
    if steps < 0 or not step_time_s > 0:
        raise ValueError(f"steps ({steps}) must be ≥ 0 and step_time_s ({step_time_s}) > 0")
    mtbf = failures.job_mtbf_s(gpus)
    write = failures.checkpoint_write_s
    best = optimal_interval(write, mtbf)
    wanted = failures.checkpoint_interval_s
    wanted = best if wanted is None else wanted
    interval = (
        math.inf if math.isinf(wanted) else max(1, round(wanted / step_time_s)) * float(step_time_s)
    )
    return FailureEstimate(
        gpus=gpus,
        price_usd_per_gpu_hour=price_usd_per_gpu_hour,
        job_mtbf_s=mtbf,
        interval_s=interval,
        young_interval_s=young_interval(write, mtbf),
        daly_interval_s=daly_interval(write, mtbf),
        optimal_interval_s=best,
        overhead=expected_overhead(steps * step_time_s, interval, write, failures.restart_s, mtbf),
    )
