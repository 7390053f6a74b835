"""Hardware stragglers: slow GPUs, per-op jitter, throttling episodes and degraded links.

Pure NumPy. Everything here is drawn per GPU from a seeded :class:`numpy.random.Generator`, so
one slow GPU of an expert-parallel group delays that group's all-to-all, and through the
pipeline the whole step, exactly as a vector ``argmax`` in the engine sees it. The scenario
section is :mod:`moesim.scenario.faults`; all effects are off by default.

What is drawn, and when
-----------------------
Once per run, :func:`draw_run_state`
    the persistent parts: slow GPUs (``gpu_speed``) and persistently degraded NIC and NVLink
    ports (``nic_factor``, ``nvlink_factor``).
Once per simulated step, :func:`draw_step_state`
    the episodic parts, over a horizon ``[0, horizon_s)`` of simulated time that should cover
    the step with room to spare (a few step times): throttling windows and link-degradation
    windows. Steps sampled along a run are far apart compared with an episode, so each step's
    episodes are drawn independently from the *stationary* process: an episode may already be
    under way at ``t = 0``.
Once per op, :class:`JitterSource`
    mean-1 lognormal multipliers for the GPUs the op runs on.

The episode process
-------------------
Per GPU (or port), an on/off process: healthy gaps ``Exp(λ)`` alternate with episodes of fixed
length ``d``. With ``r`` the long-run episode rate (the scenario's ``rate_per_gpu_hour``), the
onset hazard while healthy is ``λ = r / (1 − r·d)`` (:func:`onset_rate`), and the fraction of
time inside an episode is exactly ``r·d`` (:func:`stationary_coverage`). At ``t = 0`` a GPU is
inside an episode with probability ``r·d``, with a residual length uniform on ``[0, d)`` (the
equilibrium residual of a fixed length); otherwise its next onset is ``Exp(λ)`` away. The
process is then stationary on the whole horizon. Episodes ending past the horizon keep their
true end; episodes starting at or after the horizon are not drawn, so an op that runs past the
horizon sees no new throttling.

How the engine applies a state (see also the notes of :class:`HardwareState`)
-----------------------------------------------------------------------------
An op of nominal duration ``t`` (scalar or per GPU) on the GPUs ``sl`` starting at ``start``::

    work = t * state.gpu_speed[sl] * jitter(n)       # n GPUs in sl
    end = compute_end(state, sl, start, work)        # throttling windows stretch it

and the NIC (NVLink) ports of GPU ``g`` run at ``nic_factor[g]`` (``nvlink_factor[g]``) of their
capacity for the whole step.

Throttling, exactly (:func:`compute_end`)
-----------------------------------------
Inside a window of factor ``f`` a GPU does work at rate ``1/f``; outside, at rate 1. An op
that starts at ``t0`` with ``W`` seconds of (unthrottled) work ends at the ``T`` solving
``∫_{t0}^{T} rate(t) dt = W``. An op entirely inside one window takes ``f·W``; one that
straddles a window's start takes ``(a − t0) + f·(W − (a − t0))``, and so on
(:func:`throttled_end` is the single-window closed form).

Degraded links over a step
--------------------------
The network model keeps one capacity per link for the step, so an episodic degradation enters
as the time average of the bandwidth factor over ``[0, link_average_s)`` (default: the
horizon): the throughput of a link kept busy over that span. A port both persistently degraded
and inside an episode gets the product of the two factors (an assumption).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from moesim.scenario.faults import (
    Faults,
    FixedSlowdown,
    LinkDegradation,
    LognormalSlowdown,
    SlowdownSpec,
    SlowGpus,
    UniformSlowdown,
    check_faults,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
GpuIndex = int | slice | npt.NDArray[np.integer]

DEFAULT_JITTER_BLOCK = 1 << 16
"""Multipliers pre-drawn per refill of a :class:`JitterSource` (512 KiB of float64)."""


def _frozen(values: npt.ArrayLike, dtype: type) -> npt.NDArray:
    out: npt.NDArray[Any] = np.array(values, dtype=dtype, copy=True)
    out.flags.writeable = False
    return out


# --------------------------------------------------------------------------- episode windows


@dataclass(frozen=True)
class Windows:
    """Episode windows of one fault, per GPU: ``[start_s, end_s)`` at ``factor``.

    Windows of one GPU never overlap. They are stored sorted by ``(gpu, start_s)``, with CSR
    offsets ``ptr``: GPU ``g``'s windows are entries ``ptr[g]:ptr[g + 1]``.

    Parameters
    ----------
    gpus : int
        GPUs in the cluster.
    gpu, start_s, end_s, factor : array_like
        One entry per window, in any order. ``factor`` is a compute-time multiplier (≥ 1) for
        throttling, a bandwidth multiplier (in (0, 1]) for links.

    Raises
    ------
    ValueError
        On a GPU id outside ``[0, gpus)``, an empty or reversed window, a non-positive factor,
        or overlapping windows on one GPU.
    """

    gpus: int
    gpu: IntArray
    start_s: FloatArray
    end_s: FloatArray
    factor: FloatArray
    ptr: IntArray = field(init=False, repr=False)
    has: npt.NDArray[np.bool_] = field(init=False, repr=False)
    """Per GPU: whether it has any window."""
    owners: IntArray = field(init=False, repr=False)
    """The GPUs with windows, ascending."""
    rank: IntArray = field(init=False, repr=False)
    """``rank[g]``: how many GPUs below ``g`` have windows (``owners[rank[lo]:rank[hi]]`` are
    those in ``[lo, hi)``)."""
    by_gpu: dict[int, tuple[tuple[float, float, float], ...]] = field(init=False, repr=False)
    """``{gpu: ((start_s, end_s, factor), …)}`` in time order, for GPUs with windows."""

    def __post_init__(self) -> None:
        gpu = np.asarray(self.gpu, dtype=np.int64).ravel()
        start = np.asarray(self.start_s, dtype=np.float64).ravel()
        end = np.asarray(self.end_s, dtype=np.float64).ravel()
        factor = np.asarray(self.factor, dtype=np.float64).ravel()
        if not gpu.size == start.size == end.size == factor.size:
            raise ValueError("windows: gpu, start_s, end_s and factor differ in length")
        if self.gpus <= 0:
            raise ValueError(f"windows: {self.gpus} GPUs must be positive")
        if gpu.size:
            if gpu.min() < 0 or gpu.max() >= self.gpus:
                raise ValueError(f"windows: GPU ids must lie in [0, {self.gpus})")
            if not np.all(end > start):
                raise ValueError("windows: every window needs end_s > start_s")
            if not np.all(factor > 0):
                raise ValueError("windows: factors must be positive")
        order = np.lexsort((start, gpu))
        gpu, start, end, factor = gpu[order], start[order], end[order], factor[order]
        same = gpu[1:] == gpu[:-1]
        if np.any(same & (start[1:] < end[:-1])):
            raise ValueError("windows: windows of one GPU overlap")
        counts = np.bincount(gpu, minlength=self.gpus)
        ptr = np.concatenate([[0], np.cumsum(counts)])
        for name, value in (("gpu", gpu), ("start_s", start), ("end_s", end), ("factor", factor)):
            object.__setattr__(self, name, _frozen(value, value.dtype.type))
        object.__setattr__(self, "ptr", _frozen(ptr, np.int64))
        has = counts > 0
        object.__setattr__(self, "has", _frozen(has, np.bool_))
        object.__setattr__(self, "owners", _frozen(np.flatnonzero(has), np.int64))
        object.__setattr__(self, "rank", _frozen(np.concatenate([[0], np.cumsum(has)]), np.int64))
        rows = zip(gpu.tolist(), start.tolist(), end.tolist(), factor.tolist(), strict=True)
        by_gpu: dict[int, list[tuple[float, float, float]]] = {}
        for g, a, b, k in rows:
            by_gpu.setdefault(g, []).append((a, b, k))
        object.__setattr__(self, "by_gpu", {g: tuple(w) for g, w in by_gpu.items()})

    @classmethod
    def empty(cls, gpus: int) -> Windows:
        """No windows at all."""
        none = np.empty(0)
        return cls(gpus, np.empty(0, dtype=np.int64), none, none, none)

    def __len__(self) -> int:
        return int(self.gpu.size)

    def of(self, gpu: int) -> tuple[FloatArray, FloatArray, FloatArray]:
        """``(start_s, end_s, factor)`` of one GPU's windows, in time order."""
        lo, hi = self.ptr[gpu], self.ptr[gpu + 1]
        return self.start_s[lo:hi], self.end_s[lo:hi], self.factor[lo:hi]

    def covered_s(self, lo_s: float, hi_s: float) -> FloatArray:
        """Per GPU, seconds of ``[lo_s, hi_s)`` inside a window."""
        overlap = np.clip(np.minimum(self.end_s, hi_s) - np.maximum(self.start_s, lo_s), 0, None)
        return cast(FloatArray, np.bincount(self.gpu, weights=overlap, minlength=self.gpus))

    def mean_factor(self, lo_s: float, hi_s: float) -> FloatArray:
        """Per GPU, the time average over ``[lo_s, hi_s)`` of the factor (1 outside windows)."""
        if not hi_s > lo_s:
            raise ValueError(f"mean_factor: empty span [{lo_s}, {hi_s})")
        overlap = np.clip(np.minimum(self.end_s, hi_s) - np.maximum(self.start_s, lo_s), 0, None)
        excess = np.bincount(self.gpu, weights=overlap * (self.factor - 1), minlength=self.gpus)
        return 1 + excess / (hi_s - lo_s)

    def factor_at(self, t_s: float) -> FloatArray:
        """Per GPU, the factor in force at instant ``t_s`` (1 outside windows)."""
        out = np.ones(self.gpus)
        inside = (self.start_s <= t_s) & (t_s < self.end_s)
        out[self.gpu[inside]] = self.factor[inside]
        return out


# --------------------------------------------------------------------------- hardware state


@dataclass(frozen=True)
class HardwareState:
    """Hardware condition of every GPU for one simulated step (or, from
    :func:`draw_run_state`, the persistent part for the whole run, with no windows).

    Attributes
    ----------
    gpu_speed : ndarray, shape (gpus,)
        Persistent compute-time multipliers, ≥ 1 (1 = healthy; 1.3 = every op takes 30%
        longer). Drawn once per run.
    nic_factor, nvlink_factor : ndarray, shape (gpus,)
        Bandwidth multipliers in (0, 1] of each GPU's NIC and NVLink ports for the step:
        persistent degradation times the time average of any episode.
    throttle : Windows
        Throttling windows (factor = compute-time multiplier) intersecting ``[0, horizon_s)``.
    nic_windows, nvlink_windows : Windows
        The link-degradation episodes behind ``nic_factor`` and ``nvlink_factor`` (for traces,
        or a network model with time-varying capacity).
    horizon_s : float
        The span the windows were drawn over (0 for a run state).

    Notes
    -----
    All arrays are read-only. Apply ``gpu_speed`` and jitter to an op's duration, then
    :func:`compute_end` for throttling; scale link capacities by the factors.
    """

    gpu_speed: FloatArray
    nic_factor: FloatArray
    nvlink_factor: FloatArray
    throttle: Windows
    nic_windows: Windows
    nvlink_windows: Windows
    horizon_s: float = 0.0
    ids: IntArray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        speed = _frozen(self.gpu_speed, np.float64).ravel()
        gpus = speed.size
        if gpus == 0:
            raise ValueError("hardware state: no GPUs")
        if not np.all(speed >= 1):
            raise ValueError("hardware state: gpu_speed multipliers must be ≥ 1")
        object.__setattr__(self, "gpu_speed", speed)
        for name in ("nic_factor", "nvlink_factor"):
            value = _frozen(getattr(self, name), np.float64).ravel()
            if value.shape != (gpus,):
                raise ValueError(f"hardware state: {name} has shape {value.shape}, not ({gpus},)")
            if not np.all((value > 0) & (value <= 1)):
                raise ValueError(f"hardware state: {name} must lie in (0, 1]")
            object.__setattr__(self, name, value)
        for name in ("throttle", "nic_windows", "nvlink_windows"):
            if getattr(self, name).gpus != gpus:
                raise ValueError(f"hardware state: {name} is for another number of GPUs")
        if not self.horizon_s >= 0:
            raise ValueError("hardware state: horizon_s must be ≥ 0")
        object.__setattr__(self, "ids", _frozen(np.arange(gpus), np.int64))

    @classmethod
    def healthy(cls, gpus: int) -> HardwareState:
        """Every GPU and port at full speed, no episodes."""
        ones = np.ones(gpus)
        empty = Windows.empty(gpus)
        return cls(ones, ones, ones, empty, empty, empty)

    @property
    def gpus(self) -> int:
        return int(self.gpu_speed.size)

    @property
    def is_healthy(self) -> bool:
        """True when nothing here would change a simulation."""
        return (
            not len(self.throttle)
            and bool(np.all(self.gpu_speed == 1))
            and bool(np.all(self.nic_factor == 1))
            and bool(np.all(self.nvlink_factor == 1))
        )


# --------------------------------------------------------------------------- drawing


def sample_slowdown(spec: SlowdownSpec, n: int, rng: np.random.Generator) -> FloatArray:
    """``n`` independent compute-time multipliers from a slowdown distribution.

    Parameters
    ----------
    spec : FixedSlowdown | UniformSlowdown | LognormalSlowdown
        ``fixed``: ``factor``; ``uniform``: ``U(low, high)``; ``lognormal``:
        ``1 + (median − 1)·exp(sigma·Z)``.
    n : int
        How many.
    rng : numpy.random.Generator
        Consumed: ``n`` uniforms (``uniform``), ``n`` normals (``lognormal``), nothing
        (``fixed``).
    """
    if isinstance(spec, FixedSlowdown):
        return np.full(n, spec.factor)
    if isinstance(spec, UniformSlowdown):
        return spec.low + (spec.high - spec.low) * rng.random(n)
    if isinstance(spec, LognormalSlowdown):
        return 1 + (spec.median - 1) * np.exp(spec.sigma * rng.standard_normal(n))
    raise TypeError(f"unknown slowdown distribution {type(spec).__name__}")


def _explicit(values: FloatArray, listed: Mapping[int, float]) -> FloatArray:
    if listed:
        ids = np.fromiter(listed.keys(), dtype=np.int64, count=len(listed))
        values[ids] = np.fromiter(listed.values(), dtype=np.float64, count=len(listed))
    return values


def draw_slow_gpus(spec: SlowGpus, gpus: int, rng: np.random.Generator) -> FloatArray:
    """Persistent compute-time multipliers, shape ``(gpus,)``.

    Each GPU is slow with probability ``spec.fraction``, independently; listed GPUs take their
    listed factor. A uniform and a factor are drawn for every GPU whatever the fraction, so a
    larger fraction under the same seed keeps the GPUs a smaller one made slow, with the same
    factors (common random numbers for what-if studies).
    """
    slow = rng.random(gpus) < spec.fraction
    factors = sample_slowdown(spec.slowdown, gpus, rng)
    return _explicit(np.where(slow, factors, 1.0), spec.gpus)


def draw_degraded_ports(spec: LinkDegradation, gpus: int, rng: np.random.Generator) -> FloatArray:
    """Persistent bandwidth multipliers of one kind of port, shape ``(gpus,)``.

    Each port is degraded to ``spec.bandwidth_factor`` with probability ``spec.fraction``,
    independently (one uniform per port whatever the fraction, as in :func:`draw_slow_gpus`);
    listed ports take their listed factor.
    """
    degraded = rng.random(gpus) < spec.fraction
    return _explicit(np.where(degraded, spec.bandwidth_factor, 1.0), spec.gpus)


def draw_windows(
    rate_per_s: float,
    duration_s: float,
    factor: float,
    gpus: int,
    horizon_s: float,
    rng: np.random.Generator,
) -> Windows:
    """Episodes of the stationary on/off process (module docstring) over ``[0, horizon_s)``.

    Parameters
    ----------
    rate_per_s : float
        Long-run episodes per GPU per second; ``rate_per_s · duration_s`` must be below 1.
    duration_s : float
        Length of an episode.
    factor : float
        The factor every window carries.
    gpus : int
        GPUs (or ports), each with an independent process.
    horizon_s : float
        Windows intersecting ``[0, horizon_s)`` are returned.
    rng : numpy.random.Generator
        Source of randomness.
    """
    if not horizon_s > 0:
        raise ValueError(f"horizon_s: {horizon_s} must be positive")
    if rate_per_s < 0 or not duration_s > 0:
        raise ValueError("episodes need a rate ≥ 0 and a positive duration")
    coverage = stationary_coverage(rate_per_s, duration_s)
    if coverage >= 1:
        raise ValueError(f"episodes cover {coverage:.0%} of the time; rate × duration must be < 1")
    if coverage == 0:
        return Windows.empty(gpus)
    mean_gap = 1.0 / onset_rate(rate_per_s, duration_s)
    inside = rng.random(gpus) < coverage
    residual = rng.random(gpus) * duration_s
    first = np.flatnonzero(inside)
    gpu_parts = [first]
    start_parts = [np.zeros(first.size)]
    end_parts = [residual[first]]
    # Cursor: when each GPU's current episode (if any) ends; then the next healthy gap.
    t = np.where(inside, residual, 0.0) + rng.exponential(mean_gap, gpus)
    alive = np.flatnonzero(t < horizon_s)
    while alive.size:
        onset = t[alive]
        gpu_parts.append(alive)
        start_parts.append(onset)
        end_parts.append(onset + duration_s)
        t[alive] = onset + duration_s + rng.exponential(mean_gap, alive.size)
        alive = alive[t[alive] < horizon_s]
    gpu = np.concatenate(gpu_parts)
    start = np.concatenate(start_parts)
    end = np.concatenate(end_parts)
    keep = end > start  # a residual of exactly 0 is an episode that already ended
    return Windows(gpus, gpu[keep], start[keep], end[keep], np.full(int(keep.sum()), factor))


def _spawn(rng: np.random.Generator, n: int) -> list[np.random.Generator]:
    """Independent child generators, one per effect: switching one effect on or off leaves the
    others' draws unchanged under the same seed."""
    return list(rng.spawn(n))


def draw_run_state(faults: Faults, gpus: int, rng: np.random.Generator) -> HardwareState:
    """The persistent hardware condition of one run: slow GPUs and degraded ports.

    Parameters
    ----------
    faults : Faults
        The scenario's ``faults`` section.
    gpus : int
        GPUs in the cluster.
    rng : numpy.random.Generator
        A generator seeded for this purpose (spawned from the run's root seed); three children
        are spawned from it (slow GPUs, NIC ports, NVLink ports).

    Returns
    -------
    HardwareState
        With ``gpu_speed``, ``nic_factor`` and ``nvlink_factor`` set, no windows.

    Raises
    ------
    ValueError
        When an explicit GPU id is not below ``gpus`` (:func:`check_faults`).
    """
    check_faults(faults, gpus)
    slow_rng, nic_rng, nvlink_rng = _spawn(rng, 3)
    links = faults.degraded_links
    empty = Windows.empty(gpus)
    return HardwareState(
        gpu_speed=draw_slow_gpus(faults.slow_gpus, gpus, slow_rng),
        nic_factor=draw_degraded_ports(links.nic, gpus, nic_rng),
        nvlink_factor=draw_degraded_ports(links.nvlink, gpus, nvlink_rng),
        throttle=empty,
        nic_windows=empty,
        nvlink_windows=empty,
    )


def _link_windows(
    spec: LinkDegradation, gpus: int, horizon_s: float, rng: np.random.Generator
) -> Windows:
    if not (spec.episodes.active and spec.bandwidth_factor < 1):
        return Windows.empty(gpus)
    ep = spec.episodes
    return draw_windows(ep.rate_per_s, ep.duration_s, spec.bandwidth_factor, gpus, horizon_s, rng)


def draw_step_state(
    faults: Faults,
    run_state: HardwareState,
    gpus: int,
    horizon_s: float,
    rng: np.random.Generator,
    *,
    link_average_s: float | None = None,
) -> HardwareState:
    """The hardware condition for one simulated step: the run's persistent part plus episodes.

    Parameters
    ----------
    faults : Faults
        The scenario's ``faults`` section.
    run_state : HardwareState
        From :func:`draw_run_state` for the same ``faults`` and ``gpus``.
    gpus : int
        GPUs in the cluster.
    horizon_s : float
        Span of simulated time to draw episodes over, from the step's start: a few expected
        step times, so that every op of the step falls inside it.
    rng : numpy.random.Generator
        A generator seeded for this step; three children are spawned from it (throttling, NIC
        episodes, NVLink episodes).
    link_average_s : float, optional
        Span ``[0, link_average_s)`` over which episodic link degradation is averaged into
        ``nic_factor`` / ``nvlink_factor`` (the expected step time is the natural choice);
        default ``horizon_s``.

    Returns
    -------
    HardwareState
    """
    if run_state.gpus != gpus:
        raise ValueError(f"run state is for {run_state.gpus} GPUs, not {gpus}")
    if not horizon_s > 0:
        raise ValueError(f"horizon_s: {horizon_s} must be positive")
    average_s = horizon_s if link_average_s is None else link_average_s
    throttle_rng, nic_rng, nvlink_rng = _spawn(rng, 3)
    thr = faults.throttling
    throttle = (
        draw_windows(thr.rate_per_s, thr.duration_s, thr.slowdown, gpus, horizon_s, throttle_rng)
        if thr.active
        else Windows.empty(gpus)
    )
    links = faults.degraded_links
    nic_windows = _link_windows(links.nic, gpus, horizon_s, nic_rng)
    nvlink_windows = _link_windows(links.nvlink, gpus, horizon_s, nvlink_rng)
    return HardwareState(
        gpu_speed=run_state.gpu_speed,
        nic_factor=run_state.nic_factor * nic_windows.mean_factor(0.0, average_s),
        nvlink_factor=run_state.nvlink_factor * nvlink_windows.mean_factor(0.0, average_s),
        throttle=throttle,
        nic_windows=nic_windows,
        nvlink_windows=nvlink_windows,
        horizon_s=float(horizon_s),
    )


# --------------------------------------------------------------------------- per-op effects


class JitterSource:
    """Per-op, per-GPU compute-time multipliers ``exp(σ·Z − σ²/2)``: lognormal, mean 1.

    Multipliers are pre-drawn in blocks and handed out as read-only views, so a call costs a
    slice, not a random draw. The stream handed out is the generator's standard-normal stream
    transformed, in order, whatever the block size or the sizes asked for.

    Parameters
    ----------
    sigma : float
        Log-space standard deviation; 0 hands out ones without touching ``rng``.
    rng : numpy.random.Generator
        A generator dedicated to this source (spawned from the step's seed).
    block : int
        Multipliers drawn per refill.

    Examples
    --------
    >>> jitter = JitterSource(0.05, np.random.default_rng(0))
    >>> jitter(4).shape
    (4,)
    """

    def __init__(
        self, sigma: float, rng: np.random.Generator, block: int = DEFAULT_JITTER_BLOCK
    ) -> None:
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"jitter sigma: {sigma} must be a finite number ≥ 0")
        if block <= 0:
            raise ValueError(f"block: {block} must be positive")
        self.sigma = float(sigma)
        self._rng = rng
        self._block = int(block)
        self._buf: FloatArray = np.empty(0)
        self._pos = 0

    def __call__(self, n: int) -> FloatArray:
        """The next ``n`` multipliers (a read-only view; multiply, do not modify in place)."""
        pos = self._pos
        end = pos + n
        if end > self._buf.size:
            self._refill(n)
            pos, end = 0, n
        self._pos = end
        return self._buf[pos:end]

    def _refill(self, n: int) -> None:
        size = max(self._block, n)
        if self.sigma == 0:
            if self._buf.size < size:
                self._buf = _frozen(np.ones(size), np.float64)
            self._pos = 0
            return
        # A fresh array: views handed out earlier keep their values.
        rest = self._buf[self._pos :]
        buf = np.empty(size)
        buf[: rest.size] = rest
        z = buf[rest.size :]
        self._rng.standard_normal(out=z)
        z *= self.sigma
        z -= 0.5 * self.sigma**2
        np.exp(z, out=z)
        buf.flags.writeable = False
        self._buf = buf
        self._pos = 0


def _stretch(t0: float, work: float, windows: tuple[tuple[float, float, float], ...]) -> float:
    """End of ``work`` seconds started at ``t0`` through sorted, disjoint windows
    ``(start, end, factor)``."""
    t, left = t0, work
    for a, b, k in windows:
        if b <= t:
            continue
        if a > t:
            if left <= a - t:
                return t + left
            left -= a - t
            t = a
        room = (b - t) / k  # work that fits in the rest of this window
        if left <= room:
            return t + left * k
        left -= room
        t = b
    return t + left


def compute_end(
    state: HardwareState, gpus: GpuIndex, start_s: npt.ArrayLike, work_s: npt.ArrayLike
) -> FloatArray:
    """When an op ends on each GPU, given the throttling windows.

    Parameters
    ----------
    state : HardwareState
        The step's state.
    gpus : int, slice or integer array
        The GPUs the op runs on (indexes per-GPU arrays).
    start_s, work_s : float or array_like
        Start time and unthrottled duration (``gpu_speed`` and jitter already applied), scalars
        or one per GPU of ``gpus``.

    Returns
    -------
    ndarray
        End times: ``start + work`` where no window intersects the op; otherwise the ``T`` with
        ``∫_{start}^{T} rate = work``, rate ``1/factor`` inside windows and 1 outside.

    Notes
    -----
    Without windows on these GPUs (the common case) it costs one addition and, for a
    contiguous slice, two integer look-ups. Each GPU of ``gpus`` with windows then costs a
    short Python loop over its windows (a few per step).
    """
    start = np.asarray(start_s, dtype=np.float64)
    work = np.asarray(work_s, dtype=np.float64)
    end = start + work
    thr = state.throttle
    if not len(thr):
        return end
    if isinstance(gpus, slice) and gpus.step in (None, 1):
        lo, hi, _ = gpus.indices(state.gpus)
        hi = max(hi, lo)
        first, last = thr.rank[lo], thr.rank[hi]
        if first == last:
            return end
        owners = thr.owners[first:last]  # the GPUs of the slice with windows
        where = owners - lo
        shape: tuple[int, ...] = (hi - lo,)
    else:
        ids = state.ids[gpus]
        shape = np.shape(ids)
        where = np.flatnonzero(thr.has[ids])
        if not where.size:
            return end
        owners = np.reshape(ids, -1)[where]
    if end.shape == shape and end.ndim:
        out = end  # a fresh array from the addition
    else:
        out = np.array(np.broadcast_to(end, np.broadcast_shapes(shape, end.shape)))
    flat = out.reshape(-1)
    starts = _flat_view(start, out.shape)
    works = _flat_view(work, out.shape)
    by_gpu = thr.by_gpu
    for i, g in zip(where.tolist(), owners.tolist(), strict=True):
        t0 = float(starts[0] if starts.size == 1 else starts[i])
        w = float(works[0] if works.size == 1 else works[i])
        flat[i] = _stretch(t0, w, by_gpu[g])
    return out


def _flat_view(x: FloatArray, shape: tuple[int, ...]) -> FloatArray:
    """``x`` as a flat array over ``shape`` (one element for a scalar)."""
    if x.size == 1 or x.shape == shape:
        return x.reshape(-1)
    return np.broadcast_to(x, shape).reshape(-1)


def compute_multiplier(
    state: HardwareState, gpus: GpuIndex, start_s: npt.ArrayLike, work_s: npt.ArrayLike
) -> FloatArray:
    """Throttling slowdown ``(end − start) / work`` of an op (1 for zero work); see
    :func:`compute_end`."""
    start = np.asarray(start_s, dtype=np.float64)
    work = np.asarray(work_s, dtype=np.float64)
    end = compute_end(state, gpus, start, work)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(work > 0, (end - start) / work, 1.0)


# --------------------------------------------------------------------------- closed forms


def stationary_coverage(rate_per_s: float, duration_s: float) -> float:
    """Fraction of time a GPU spends inside an episode: ``rate × duration`` (this process's
    episodes never overlap, so the long-run rate times the length is the covered fraction)."""
    return rate_per_s * duration_s


def onset_rate(rate_per_s: float, duration_s: float) -> float:
    """Hazard of an episode starting while healthy, ``r / (1 − r·d)``: the mean cycle is
    ``1/λ + d = 1/r``."""
    return rate_per_s / (1 - rate_per_s * duration_s)


def throttled_end(
    start_s: npt.ArrayLike,
    work_s: npt.ArrayLike,
    window_start_s: float,
    window_end_s: float,
    factor: float,
) -> FloatArray:
    """End of an op through a single throttling window ``[a, b)`` of factor ``f``, closed form.

    With ``t0`` the start, ``W`` the work and ``s = max(t0, a)``: if ``t0 + W ≤ a`` or
    ``t0 ≥ b`` the op ends at ``t0 + W``; else ``w₁ = max(0, a − t0)`` is done before the
    window, and the op ends at ``s + f·(W − w₁)`` if that is within the window, else at
    ``b + (W − w₁ − (b − s)/f)``.
    """
    t0 = np.asarray(start_s, dtype=np.float64)
    w = np.asarray(work_s, dtype=np.float64)
    a, b, f = window_start_s, window_end_s, factor
    s = np.maximum(t0, a)
    before = np.clip(a - t0, 0, None)
    rest = w - before
    inside = s + f * rest
    after = b + rest - (b - s) / f
    touched = (t0 + w > a) & (t0 < b)
    return np.where(touched, np.where(inside <= b, inside, after), t0 + w)


def mean_stretch(coverage: float, factor: float) -> float:
    """Expected time multiplier of an op much shorter than an episode at a random instant:
    ``1 + coverage·(factor − 1)``."""
    return 1 + coverage * (factor - 1)


def expected_link_factor(spec: LinkDegradation) -> float:
    """Expected step bandwidth factor of an unlisted port: persistent degradation with
    probability ``fraction`` times the time-averaged episodic factor (independent)."""
    cut = 1 - spec.bandwidth_factor
    episodic = spec.episodes.coverage if spec.episodes.active else 0.0
    return (1 - spec.fraction * cut) * (1 - episodic * cut)


def _norm_sf(z: FloatArray) -> FloatArray:
    """Standard normal survival function, ``P(Z > z)``."""
    return np.array([0.5 * math.erfc(v / math.sqrt(2)) for v in z.tolist()])


def _integrate(y: FloatArray, dx: float) -> float:
    return float((y[1:] + y[:-1]).sum() * dx / 2)


_Z_GRID = np.linspace(-12.0, 12.0, 4801)


def expected_group_slowdown(spec: SlowGpus, group: int) -> float:
    """Expected largest persistent multiplier among ``group`` unlisted GPUs: the slowdown of a
    synchronised group's compute, ``E[max_i s_i]`` with ``s_i`` as :func:`draw_slow_gpus` draws.

    ``E[max] = 1 + ∫₁^∞ (1 − (1 − p·S(x))^n) dx`` with ``S`` the slowdown's survival function:
    fixed ``F`` gives ``1 + (F − 1)(1 − (1 − p)^n)``; uniform ``[l, h]`` adds to
    ``(l − 1)(1 − (1 − p)^n)`` the term ``(h − l)(1 − (1 − (1 − p)^{n+1}) / (p(n + 1)))``;
    lognormal is integrated numerically (trapezoid on a grid of ``Z``).
    """
    if group <= 0:
        raise ValueError(f"group: {group} must be positive")
    p, n, dist = spec.fraction, group, spec.slowdown
    if p == 0:
        return 1.0
    any_slow = 1 - (1 - p) ** n
    if isinstance(dist, FixedSlowdown):
        return 1 + (dist.factor - 1) * any_slow
    if isinstance(dist, UniformSlowdown):
        spread = (dist.high - dist.low) * (1 - (1 - (1 - p) ** (n + 1)) / (p * (n + 1)))
        return 1 + (dist.low - 1) * any_slow + spread
    if isinstance(dist, LognormalSlowdown):
        excess = dist.median - 1
        if excess == 0:
            return 1.0
        if dist.sigma == 0:
            return 1 + excess * any_slow
        # x − 1 = excess·exp(σz):  dx = σ·(x − 1)·dz.
        z = _Z_GRID + dist.sigma
        tail = 1 - (1 - p * _norm_sf(z)) ** n
        dx = dist.sigma * excess * np.exp(dist.sigma * z)
        # Below the grid every slow GPU exceeds x, so the tail there is P(any slow).
        below = excess * math.exp(dist.sigma * float(z[0])) * any_slow
        return 1 + below + _integrate(tail * dx, float(z[1] - z[0]))
    raise TypeError(f"unknown slowdown distribution {type(dist).__name__}")


def expected_max_jitter(group: int, sigma: float) -> float:
    """``E[max]`` of ``group`` independent mean-1 jitter multipliers (numerical quadrature of
    ``∫ (1 − Φ(z)^n)·dx``, ``x = exp(σz − σ²/2)``): the expected stretch of one op that a group
    must finish together."""
    if group <= 0:
        raise ValueError(f"group: {group} must be positive")
    if sigma == 0:
        return 1.0
    z = _Z_GRID + sigma
    x = np.exp(sigma * z - 0.5 * sigma**2)
    tail = 1 - (1 - _norm_sf(z)) ** group
    # P(max > x) integrates to E[max]; below the grid the tail is 1 over [0, x[0]).
    return float(x[0]) + _integrate(tail * sigma * x, float(z[1] - z[0]))
