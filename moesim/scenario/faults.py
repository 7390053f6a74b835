"""Faults: failures with checkpoint/restart, and hardware stragglers. The scenario section.

Failures and checkpoint/restart
-------------------------------

The run is interrupted by a Poisson process of failures. Every GPU fails independently at rate
``1 / gpu_mtbf``, and any one failure stops the whole synchronous job, so the job fails at rate
``gpus / gpu_mtbf``. The job checkpoints every ``checkpoint_interval`` of useful work, stalling
``checkpoint_write`` each time; after a failure it pays ``restart`` (detection, rescheduling,
process-group set-up, checkpoint load) and redoes the work since the last checkpoint. The
expected cost and its Monte Carlo counterpart live in :mod:`moesim.estimate.failures`.

The section is opt-in (``enabled: false`` by default) so that a scenario without it keeps
estimating the failure-free run; every field has a default, so ``failures: {enabled: true}``
models a run with Llama 3's observed interruption rate.

Defaults and their provenance
-----------------------------
``gpu_mtbf_hours``
    Llama 3 pre-training (Dubey et al., "The Llama 3 Herd of Models", arXiv 2407.21783, §3.3.4,
    Table 5): 16,384 H100 GPUs over a 54-day window, 466 job interruptions of which 419 were
    unexpected. Per-GPU MTBF = 16,384 × 54 days × 24 h / 419 ≈ 5.07e4 h; at 16,384 GPUs the job
    MTBF is 54 × 24 / 419 ≈ 3.09 h. Only the *unexpected* interruptions are counted: the 47
    planned ones (maintenance, upgrades) are scheduled, so the operator checkpoints right
    before them and loses no work; they are not a random process. The rate folds every
    unexpected cause (GPU, HBM, network, host, software) into a per-GPU equivalent, which
    assumes the interruption rate grows linearly with the number of GPUs.
``checkpoint_write_seconds``
    The same paper (§3.3.1): each GPU saves 1 MB to 4 GB of model state per checkpoint, onto a
    Tectonic file system with 2 TB/s sustained throughput. Writing the largest shard (4 GB) from
    all 16,384 GPUs at the sustained rate takes 4 GB × 16,384 / 2 TB/s ≈ 32.8 s, taken as the
    time the job stalls per checkpoint (a synchronous save). It scales with model size per GPU
    and storage bandwidth per GPU: set it for the scenario's model and storage; an asynchronous
    save (GPU → host copy, then background write) stalls far less.
``restart_minutes``
    An assumption, not a measurement: 10 minutes from the failure to training again. Published
    bounds bracket it: FlashRecovery (arXiv 2509.03047, §1 and §5) reports timeout-based
    failure detection alone can take up to 30 minutes in PyTorch, and its optimised system
    restores a 4,800-device job in 150 s.
``checkpoint_interval_minutes``
    ``"optimal"``: the interval that minimises the expected overhead of this model (see
    :func:`moesim.estimate.failures.optimal_interval`, which Young's and Daly's formulas
    approximate), rounded to a whole number of training steps by the estimate.

Hardware stragglers
-------------------
Four opt-in effects, each off by default (a zero fraction, rate or sigma and no listed GPU),
each drawn per GPU from the scenario's seed by :mod:`moesim.cluster.stragglers`:

``slow_gpus``
    Persistent slow parts: each GPU is slow for the whole run with probability ``fraction``
    (independently), its compute time multiplied by a factor drawn from ``slowdown``; GPUs listed
    in ``gpus`` take their listed factor instead. ``slowdown`` is a number (a fixed factor) or
    ``{kind: fixed, factor}``, ``{kind: uniform, low, high}`` or ``{kind: lognormal, median,
    sigma}``; the lognormal one is shifted so that the factor never drops below 1:
    ``1 + (median − 1)·exp(sigma·Z)``, with ``Z`` standard normal (median ``median``).
``jitter``
    Per-op multiplicative noise on every GPU's compute time: lognormal with log-sigma ``sigma``,
    normalised to **mean 1** (``exp(sigma·Z − sigma²/2)``, so its median is
    ``exp(−sigma²/2)``). Mean 1 keeps each GPU's total compute time unchanged on average: jitter
    only adds the cost of waiting for the slowest GPU at every synchronisation, which is the
    straggler effect it stands for. The compute model's efficiencies are means over repeated
    kernel runs, so mean 1 also keeps them calibrated. ``sigma`` is at most 1 (a sanity bound).
``throttling``
    Episodes during which a GPU computes ``slowdown`` times slower (thermal or power throttling),
    ``rate_per_gpu_hour`` episodes per GPU-hour on average, each lasting ``duration_seconds``.
    Per GPU, episodes alternate with healthy gaps (exponential, so onsets are Poisson while
    healthy); they never overlap, and the fraction of time a GPU is throttled is
    ``rate × duration`` exactly, which must stay below 1.
``degraded_links``
    ``nic`` and ``nvlink`` ports (one of each per GPU) running at ``bandwidth_factor`` of their
    bandwidth: persistently for a ``fraction`` of ports drawn once per run (plus any listed in
    ``gpus`` with their own factor), and in ``episodes`` following the same process as
    throttling.

Defaults and their provenance (used once an effect is switched on)
------------------------------------------------------------------
``slow_gpus.slowdown``
    Uniform between 1.1 and 1.5. Sinha et al., "Not All GPUs Are Created Equal: Characterizing
    Variability in Large-Scale, Accelerator-Rich Systems" (SC22, arXiv 2208.11035) measured an
    8% (up to 22%) average performance variation across nominally identical GPUs of five HPC
    clusters, with outliers up to 1.5× slower than the median GPU. The upper bound is that
    worst outlier; the lower bound is an assumption: a part counts as slow once it is clearly
    outside the typical 8% spread.
``throttling.slowdown``
    2.0: NVML's hardware slowdown (``nvmlClocksThrottleReasonHwSlowdown`` and its thermal and
    power-brake variants, NVML API reference, "Clocks event reasons") reduces the core clocks
    "by a factor of 2 or more"; 2 is the mildest such episode, for a compute-bound op.
``throttling.duration_seconds`` and ``degraded_links.*.episodes.duration_seconds``
    60 s, an assumption. Wu et al., "FALCON: Pinpointing and Mitigating Stragglers for
    Large-Scale Hybrid-Parallel Training" (arXiv 2410.12588, §1) observed fail-slows, from GPU
    and network causes, lasting from tens of seconds to nearly ten hours on a >10,000-GPU
    production cluster; 60 s sits at the short end.
``degraded_links.*.bandwidth_factor``
    0.5, an assumption: a port that trains down to half its rate (an NDR 400 Gb/s InfiniBand
    port running at HDR's 200 Gb/s, or at half its lanes).
``jitter.sigma``, fractions and rates
    0 (off). There is no default magnitude: a scenario that switches an effect on states it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, WrapValidator, field_validator, model_validator

from moesim import units
from moesim.scenario.base import Frozen, NonNegInt, PositiveFloat

_MINUTE_S = units.MINUTE

# Llama 3 (arXiv 2407.21783): §3.3.4 and Table 5 (interruptions), §3.3.1 (checkpoint storage).
LLAMA3_GPUS = 16_384
LLAMA3_WINDOW_HOURS = 54 * 24
LLAMA3_UNEXPECTED_INTERRUPTIONS = 419
LLAMA3_PLANNED_INTERRUPTIONS = 47
LLAMA3_GPU_MTBF_HOURS = LLAMA3_GPUS * LLAMA3_WINDOW_HOURS / LLAMA3_UNEXPECTED_INTERRUPTIONS
"""Per-GPU mean time between (unexpected) job interruptions, ≈ 5.07e4 h."""

LLAMA3_CHECKPOINT_BYTES_PER_GPU = 4 * units.GIGA
"""Largest per-GPU checkpoint shard of Llama 3 (§3.3.1: "1 MB to 4 GB per GPU")."""
LLAMA3_STORAGE_SUSTAINED_BYTES_PER_S = units.tbytes_per_s(2.0)
"""Tectonic sustained throughput for the Llama 3 run (§3.3.1: 2 TB/s; 7 TB/s peak)."""
DEFAULT_CHECKPOINT_WRITE_SECONDS = (
    LLAMA3_CHECKPOINT_BYTES_PER_GPU * LLAMA3_GPUS / LLAMA3_STORAGE_SUSTAINED_BYTES_PER_S
)
"""≈ 32.8 s: every GPU writes a 4 GB shard through the shared 2 TB/s (synchronous save)."""

DEFAULT_RESTART_MINUTES = 10.0
"""Assumption: failure → training again (see the module docstring for the published bounds)."""

NonNegFloat = Annotated[float, Field(ge=0)]


class Failures(Frozen):
    """Interruptions as a Poisson process, periodic checkpoints, restart after each failure.

    Notes
    -----
    The model and its assumptions are those of Daly (2006), "A higher order estimate of the
    optimum checkpoint interval for restart dumps", Future Gener. Comput. Syst. 22(3):303-312:
    exponential inter-failure times, a fixed checkpoint write time, a fixed restart time during
    which failures can also strike (a failed restart starts over), and all work since the last
    completed checkpoint lost.
    """

    enabled: bool = Field(False, description="add failure and checkpoint overhead to the run")
    gpu_mtbf_hours: PositiveFloat = Field(
        LLAMA3_GPU_MTBF_HOURS,
        ge=1,
        le=1e9,
        description="per-GPU mean time between job interruptions (default: Llama 3, 16,384 "
        "H100 × 54 days / 419 unexpected interruptions)",
    )
    checkpoint_interval_minutes: float | Literal["optimal"] = Field(
        "optimal",
        description="useful work between checkpoints, in minutes, or 'optimal' (minimises the "
        "expected overhead; rounded to whole steps)",
    )
    checkpoint_write_seconds: PositiveFloat = Field(
        DEFAULT_CHECKPOINT_WRITE_SECONDS,
        le=86_400,
        description="time training stalls per checkpoint (default: 4 GB per GPU × 16,384 GPUs "
        "at 2 TB/s, Llama 3 storage)",
    )
    restart_minutes: NonNegFloat = Field(
        DEFAULT_RESTART_MINUTES,
        le=10_080,
        description="failure detection + restart + checkpoint load (assumption: 10 minutes)",
    )

    @field_validator("checkpoint_interval_minutes", mode="before")
    @classmethod
    def _interval(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value != "optimal":
                raise ValueError("expected a positive number of minutes or 'optimal'")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("expected a positive number of minutes or 'optimal'")
        if not 0 < value <= 1e7:
            raise ValueError("a fixed checkpoint interval must lie in (0, 1e7] minutes")
        return float(value)

    @property
    def gpu_mtbf_s(self) -> float:
        """Per-GPU mean time between failures, s."""
        return self.gpu_mtbf_hours * units.HOUR

    @property
    def checkpoint_interval_s(self) -> float | None:
        """The fixed interval in s, or ``None`` when the optimal one is asked for."""
        if self.checkpoint_interval_minutes == "optimal":
            return None
        return float(self.checkpoint_interval_minutes) * _MINUTE_S

    @property
    def checkpoint_write_s(self) -> float:
        return self.checkpoint_write_seconds

    @property
    def restart_s(self) -> float:
        return self.restart_minutes * _MINUTE_S

    def job_mtbf_s(self, gpus: int) -> float:
        """Mean time between interruptions of a synchronous job on ``gpus`` GPUs, s."""
        if gpus <= 0:
            raise ValueError(f"gpus: {gpus} must be positive")
        return self.gpu_mtbf_s / gpus


# --------------------------------------------------------------------------- hardware stragglers

SINHA_OUTLIER_SLOWDOWN = 1.5
"""Worst GPU relative to the median GPU of a cluster (Sinha et al., SC22, arXiv 2208.11035)."""
DEFAULT_SLOW_GPU_LOW = 1.1
"""Assumption: a slow part is clearly outside the typical 8% spread of Sinha et al."""
NVML_HW_SLOWDOWN_FACTOR = 2.0
"""NVML: hardware slowdown reduces the core clocks "by a factor of 2 or more"."""
DEFAULT_EPISODE_SECONDS = 60.0
"""Assumption, at the short end of FALCON's fail-slow durations (arXiv 2410.12588, §1)."""
MAX_JITTER_SIGMA = 1.0
"""Sanity bound: at sigma = 1 the mean-1 jitter's median op already runs 1.65× faster than the
mean; noise that large is not jitter."""
DEFAULT_LINK_BANDWIDTH_FACTOR = 0.5
"""Assumption: a port running at half its rate (NDR 400 Gb/s trained down to 200 Gb/s)."""


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


MAX_SLOWDOWN = 100.0
"""Bound: a part 100× slower than its peers is dead, not a straggler (NVML's hardware slowdown
halves clocks; Sinha et al.'s worst GPU is 1.5×)."""
MIN_BANDWIDTH_FACTOR = 0.01
"""Bound: a port below 1 % of its rate (4 Gb/s of 400) is down, not degraded."""


def _slowdown_factor(value: float) -> float:
    if not (math.isfinite(value) and 1 <= value <= MAX_SLOWDOWN):
        raise ValueError(
            f"a slowdown multiplies compute time and must be a finite number ≥ 1 "
            f"(at most {MAX_SLOWDOWN:g})"
        )
    return value


def _fraction(value: float) -> float:
    if not 0 <= value <= 1:
        raise ValueError("a fraction must lie in [0, 1]")
    return value


def _bandwidth_factor(value: float) -> float:
    if not MIN_BANDWIDTH_FACTOR <= value <= 1:
        raise ValueError(
            "a bandwidth factor must lie in (0, 1] (1 = full bandwidth), at least "
            f"{MIN_BANDWIDTH_FACTOR:g}"
        )
    return value


def _jitter_sigma(value: float) -> float:
    if not 0 <= value <= MAX_JITTER_SIGMA:
        raise ValueError(
            f"jitter sigma must lie in [0, {MAX_JITTER_SIGMA:g}]; beyond it the mean-1 "
            "normalisation puts the median op far below the compute model's time"
        )
    return value


SlowdownFactor = Annotated[float, AfterValidator(_slowdown_factor)]
"""Compute-time multiplier: 1 is a healthy GPU, 2 takes twice as long."""
UnitFraction = Annotated[float, AfterValidator(_fraction)]
BandwidthFactor = Annotated[float, AfterValidator(_bandwidth_factor)]
NonNegFinite = Annotated[float, Field(ge=0), AfterValidator(_finite)]
JitterSigma = Annotated[float, Field(allow_inf_nan=True), AfterValidator(_jitter_sigma)]


class FixedSlowdown(Frozen):
    """Every slow GPU is slowed by the same ``factor``."""

    kind: Literal["fixed"] = "fixed"
    factor: SlowdownFactor


class UniformSlowdown(Frozen):
    """Slowdown uniform on ``[low, high]``."""

    kind: Literal["uniform"] = "uniform"
    low: SlowdownFactor
    high: SlowdownFactor

    @model_validator(mode="after")
    def _ordered(self) -> UniformSlowdown:
        if self.high < self.low:
            raise ValueError(f"high: {self.high} is below low ({self.low})")
        return self


class LognormalSlowdown(Frozen):
    """Slowdown ``1 + (median − 1)·exp(sigma·Z)``: a lognormal excess over 1, median ``median``."""

    kind: Literal["lognormal"] = "lognormal"
    median: SlowdownFactor
    sigma: NonNegFinite


SlowdownSpec = FixedSlowdown | UniformSlowdown | LognormalSlowdown

SLOWDOWN_KINDS: dict[str, type[SlowdownSpec]] = {
    "fixed": FixedSlowdown,
    "uniform": UniformSlowdown,
    "lognormal": LognormalSlowdown,
}


def _slowdown_by_kind(value: Any, _handler: Callable[[Any], Any]) -> Any:
    """A bare number is a fixed factor; a mapping is validated as the model its ``kind`` names
    (so an error reads ``faults.slow_gpus.slowdown.low``, without the tag in the path)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return FixedSlowdown(factor=value)
    if not isinstance(value, Mapping):
        if isinstance(value, SlowdownSpec):
            return value
        raise ValueError(
            "expected a fixed factor (a number ≥ 1) or a mapping {kind: fixed|uniform|lognormal, …}"
        )
    kind = value.get("kind")
    model = SLOWDOWN_KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        got = "missing" if kind is None else f"unknown slowdown kind {kind!r}"
        raise ValueError(f"kind: {got}; expected one of {', '.join(SLOWDOWN_KINDS)}")
    return model.model_validate(value)


Slowdown = Annotated[
    SlowdownSpec, WrapValidator(_slowdown_by_kind, json_schema_input_type=float | SlowdownSpec)
]


class SlowGpus(Frozen):
    """Persistent slow GPUs (thermal or power-capped parts), drawn once per run.

    Notes
    -----
    Each GPU not listed in ``gpus`` is slow with probability ``fraction``, independently, so the
    expected number of slow GPUs is ``fraction × gpus`` at any cluster size (a rounded count
    would make 1% of 8 GPUs always zero).
    """

    fraction: UnitFraction = Field(0.0, description="probability that a GPU is slow (0: off)")
    slowdown: Slowdown = Field(
        UniformSlowdown(low=DEFAULT_SLOW_GPU_LOW, high=SINHA_OUTLIER_SLOWDOWN),
        description="compute-time multiplier of a slow GPU: a number, or {kind: fixed|uniform|"
        "lognormal, ...} (default uniform 1.1–1.5: Sinha et al. SC22 outliers up to 1.5×)",
    )
    gpus: dict[NonNegInt, SlowdownFactor] = Field(
        default_factory=dict,
        description="explicit slow GPUs: {global GPU id: compute-time multiplier}",
    )

    @property
    def active(self) -> bool:
        return self.fraction > 0 or any(f != 1 for f in self.gpus.values())


class Jitter(Frozen):
    """Per-op lognormal noise on compute time, mean 1 (see the module docstring)."""

    sigma: JitterSigma = Field(
        0.0, description="log-space standard deviation of the per-op multiplier (0: off)"
    )

    @property
    def active(self) -> bool:
        return self.sigma > 0


class Episodes(Frozen):
    """A per-GPU on/off process: episodes of fixed length alternating with exponential gaps."""

    rate_per_gpu_hour: NonNegFinite = Field(
        0.0, description="episodes per GPU (or port) per hour, long-run average (0: off)"
    )
    duration_seconds: PositiveFloat = Field(
        DEFAULT_EPISODE_SECONDS,
        le=604_800,
        description="length of one episode (assumption: 60 s; FALCON fail-slows last from "
        "tens of seconds to hours)",
    )

    @model_validator(mode="after")
    def _fits(self) -> Episodes:
        if self.coverage >= 1:
            raise ValueError(
                f"rate_per_gpu_hour: {self.rate_per_gpu_hour} episodes of "
                f"{self.duration_seconds} s per hour cover {self.coverage:.0%} of the time; "
                "rate × duration must stay below 1"
            )
        return self

    @property
    def rate_per_s(self) -> float:
        """Long-run episodes per GPU per second."""
        return self.rate_per_gpu_hour / units.HOUR

    @property
    def duration_s(self) -> float:
        return self.duration_seconds

    @property
    def coverage(self) -> float:
        """Fraction of the time a GPU spends inside an episode: ``rate × duration``."""
        return self.rate_per_s * self.duration_s

    @property
    def active(self) -> bool:
        return self.rate_per_gpu_hour > 0


class Throttling(Episodes):
    """Throttling episodes: the GPU computes ``slowdown`` times slower while one lasts."""

    slowdown: SlowdownFactor = Field(
        NVML_HW_SLOWDOWN_FACTOR,
        description="compute-time multiplier during an episode (default 2: NVML hardware "
        "slowdown halves the clocks or more)",
    )

    @property
    def active(self) -> bool:
        return self.rate_per_gpu_hour > 0 and self.slowdown > 1


class LinkDegradation(Frozen):
    """One kind of port (NIC or NVLink, one of each per GPU) at reduced bandwidth."""

    fraction: UnitFraction = Field(
        0.0, description="probability that a port is degraded for the whole run (0: off)"
    )
    gpus: dict[NonNegInt, BandwidthFactor] = Field(
        default_factory=dict,
        description="explicit degraded ports, persistent: {global GPU id: bandwidth factor}",
    )
    bandwidth_factor: BandwidthFactor = Field(
        DEFAULT_LINK_BANDWIDTH_FACTOR,
        description="bandwidth of a degraded port relative to a healthy one, for the drawn "
        "fraction and for episodes (assumption: 0.5, a port at half its rate)",
    )
    episodes: Episodes = Field(
        Episodes(), description="episodic degradation of every port at bandwidth_factor"
    )

    @property
    def active(self) -> bool:
        persistent = self.fraction > 0 or any(f != 1 for f in self.gpus.values())
        episodic = self.episodes.active and self.bandwidth_factor < 1
        return persistent or episodic


class DegradedLinks(Frozen):
    """Degraded NIC and NVLink ports."""

    nic: LinkDegradation = LinkDegradation()
    nvlink: LinkDegradation = LinkDegradation()

    @property
    def active(self) -> bool:
        return self.nic.active or self.nvlink.active


class Faults(Frozen):
    """What real runs lose besides routing imbalance (all seeded, all opt-in)."""

    failures: Failures = Failures()
    slow_gpus: SlowGpus = SlowGpus()
    jitter: Jitter = Jitter()
    throttling: Throttling = Throttling()
    degraded_links: DegradedLinks = DegradedLinks()

    @property
    def hardware_active(self) -> bool:
        """Whether any hardware straggler effect is switched on."""
        return (
            self.slow_gpus.active
            or self.jitter.active
            or self.throttling.active
            or self.degraded_links.active
        )


def check_faults(faults: Faults, gpus: int) -> None:
    """Cross-checks of the ``faults`` section against the cluster size.

    Parameters
    ----------
    faults : Faults
        The validated section.
    gpus : int
        GPUs in the cluster; explicit GPU ids must be below it.

    Raises
    ------
    ValueError
        ``"faults.slow_gpus.gpus: GPU 4096 beyond the 2048 GPUs"``: the message starts with the
        dotted path of the offending field, as the scenario loader expects of cross-checks.
    """
    if gpus <= 0:
        raise ValueError(f"cluster: {gpus} GPUs; faults need a positive GPU count")
    listed = {
        "faults.slow_gpus.gpus": faults.slow_gpus.gpus,
        "faults.degraded_links.nic.gpus": faults.degraded_links.nic.gpus,
        "faults.degraded_links.nvlink.gpus": faults.degraded_links.nvlink.gpus,
    }
    for path, ids in listed.items():
        bad = sorted(g for g in ids if g >= gpus)
        if bad:
            which = f"GPU {bad[0]}" if len(bad) == 1 else f"GPUs {', '.join(map(str, bad))}"
            raise ValueError(f"{path}: {which} beyond the {gpus} GPUs (ids run 0–{gpus - 1})")
