"""Failures and checkpoint/restart: the scenario section.

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
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from moesim import units
from moesim.scenario.base import Frozen, PositiveFloat

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
        description="time training stalls per checkpoint (default: 4 GB per GPU × 16,384 GPUs "
        "at 2 TB/s, Llama 3 storage)",
    )
    restart_minutes: NonNegFloat = Field(
        DEFAULT_RESTART_MINUTES,
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
        if not value > 0:
            raise ValueError("a fixed checkpoint interval must be positive (minutes)")
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


class Faults(Frozen):
    """What real runs lose besides routing imbalance (all seeded, all opt-in)."""

    failures: Failures = Failures()
