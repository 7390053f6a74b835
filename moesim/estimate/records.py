"""What an estimate produces, as frozen records: the simulated steps, one timeline row per
(run, sampled point), one summary per run, the bands over seeds, and the run estimate that
holds them. :mod:`moesim.results` turns them into tables and ``summary.json``.

The summary's flat form (:meth:`RunSummary.as_dict`) is the ``summary.json`` entry of a run:
its keys are the field names, with the nested records flattened in place (routing quality,
failure overhead, attribution) and the percentiles over seeds last.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass

import numpy as np
import numpy.typing as npt

from moesim.cluster.kernels import Kernel
from moesim.estimate.failures import FailureEstimate
from moesim.records import StepResult
from moesim.scenario.schema import Scenario

BALANCED = "balanced_reference"
"""Name of the perfectly balanced reference step in the tables."""
EPLB_SUFFIX = "+eplb"
"""Suffix of a run's redundant-expert (EPLB) variant."""
PERCENTILES = (10, 50, 90)
"""Percentiles over seeds reported for the banded summary scalars and curves."""
CAUSES = (
    "compute",
    "communication",
    "pipeline_bubble",
    "routing_imbalance",
    "hardware_stragglers",
    "expert_migration",
    "failures",
)
"""Causes the run's GPU-hours are attributed to (:mod:`moesim.estimate.attribution`)."""

Scalar = float | int | None


@dataclass(frozen=True)
class SimulatedStep:
    """One engine step: which strategy and point it stands for, its routing metrics, result."""

    strategy: str
    point: int
    step: int
    segment_steps: int
    routing_metrics: dict[str, float]
    result: StepResult
    expert_load: npt.NDArray[np.int64]
    """Routed assignments per (simulated layer, expert) over the step, shape (L, E)."""
    extra_wall_s: float = 0.0
    """Wall time the segment spends outside training steps (EPLB expert migrations)."""
    healthy_step_time_s: float | None = None
    """The same step on healthy hardware (set when hardware stragglers are on)."""
    gate_record: dict[str, float] | None = None
    """The gate's record of the last update at or before ``step`` (None without a gate)."""
    balanced_step_time_s: float | None = None
    """The step with this sample's kept work perfectly balanced
    (:func:`moesim.gate.balanced_like`; set when the router drops tokens, None otherwise: the
    run's balanced reference step stands for every step)."""


@dataclass(frozen=True)
class TimelineRow:
    """One run at one sampled point: the cumulative curves up to the end of its segment."""

    strategy: str
    point: int
    step: int
    steps_done: int
    tokens: float
    batch_sequences: int
    step_time_s: float
    balanced_step_time_s: float
    straggler_overhead: float
    tokens_per_s: float
    mfu: float
    wall_s: float
    gpu_hours: float
    cost_usd: float
    balanced_gpu_hours: float
    balanced_cost_usd: float
    maxvio_sample: float | None
    """MaxVio_batch of the engine's routing sample at this step."""
    maxvio_micro: float | None
    maxvio_batch: float | None
    """MaxVio_batch of the gate's update at this step (the sample's without a gate)."""
    task_loss: float | None


@dataclass(frozen=True)
class RoutingSummary:
    """Routing quality over a run (None where the run has no such metric)."""

    maxvio_global: float | None
    maxvio_compute_batch: float | None
    cv_batch: float | None
    dead_experts: float | None
    dropped_fraction: float | None
    nodes_per_token: float | None
    teacher_capture: float | None
    interference_cos: float | None
    interference_ratio: float | None


@dataclass(frozen=True)
class GateWindow:
    """The gate over one window, the last tenth of its updates
    (:meth:`~moesim.gate.training.GateTrajectory.tail_summary`): MaxVio_global from the
    window's pooled loads and MaxVio_batch over the same window as ``task_loss``; the task loss
    of the same routers without their bias, and the share of assignments the bias moves off the
    router's own top-k. None without a gate."""

    gate_maxvio_global: float | None = None
    gate_maxvio_batch: float | None = None
    task_loss_unbiased: float | None = None
    bias_moved: float | None = None

    @classmethod
    def of(cls, window: dict[str, float] | None) -> GateWindow:
        if window is None:
            return cls()
        return cls(
            gate_maxvio_global=window["maxvio_global"],
            gate_maxvio_batch=window["maxvio_batch"],
            task_loss_unbiased=window["task_loss_unbiased"],
            bias_moved=window["bias_moved"],
        )


@dataclass(frozen=True)
class Attribution:
    """The run's GPU-hours by cause (``attribution_<cause>_gpu_hours``); they add up to
    ``gpu_hours_with_failures``."""

    compute_gpu_hours: float
    communication_gpu_hours: float
    pipeline_bubble_gpu_hours: float
    routing_imbalance_gpu_hours: float
    hardware_stragglers_gpu_hours: float
    expert_migration_gpu_hours: float
    failures_gpu_hours: float

    def by_cause(self) -> dict[str, float]:
        """GPU-hours per cause of :data:`CAUSES`."""
        return {cause: getattr(self, f"{cause}_gpu_hours") for cause in CAUSES}


@dataclass(frozen=True)
class RunSummary:
    """Per-run scalars over the whole training run."""

    step_time_s: float
    balanced_step_time_s: float
    straggler_overhead: float
    tokens_per_s: float
    mfu: float
    gpu_hours: float
    cost_usd: float
    balanced_gpu_hours: float
    maxvio_batch: float | None
    """None for a dense model (nothing routed)."""
    task_loss: float | None
    wall_days: float
    migration_s: float
    routing: RoutingSummary
    gate_window: GateWindow
    failure: FailureEstimate | None
    """Expected failure and restart overhead (``faults.failures``; None when off)."""
    gpu_hours_with_failures: float
    cost_usd_with_failures: float
    attribution: Attribution
    imbalance_gpu_hours: float
    imbalance_cost_usd: float
    straggler_gpu_hours: float
    straggler_cost_usd: float
    percentiles: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """P10/P50/P90 over seeds of some of the scalars above (``estimate_with_bands``)."""
    seeds: int | None = None
    """Seeds the percentiles are over (None for a single-seed estimate)."""
    headline_seed: int | None = None
    """The seed whose run these scalars are (the median-GPU-hours seed, see
    :mod:`moesim.estimate.montecarlo`; None for a single-seed estimate)."""

    @property
    def failure_gpu_hours(self) -> float | None:
        return None if self.failure is None else self.failure.overhead_gpu_hours

    @property
    def failure_cost_usd(self) -> float | None:
        return None if self.failure is None else self.failure.overhead_cost_usd

    def as_dict(self) -> dict[str, Scalar]:
        """The flat ``summary.json`` entry of the run."""
        out: dict[str, Scalar] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "failure":
                out.update(
                    value.summary()
                    if value is not None
                    else {"failure_gpu_hours": None, "failure_cost_usd": None}
                )
            elif f.name == "attribution":
                out.update({f"attribution_{k}": v for k, v in asdict(value).items()})
            elif f.name == "percentiles":
                for key, values in value.items():
                    out.update({f"{key}_p{q}": v for q, v in zip(PERCENTILES, values, strict=True)})
            elif f.name in ("seeds", "headline_seed"):
                if value is not None:
                    out[f.name] = value
            elif is_dataclass(value):
                out.update(asdict(value))  # type: ignore[arg-type]
            else:
                out[f.name] = value
        return out


@dataclass(frozen=True)
class BandRow:
    """One run at one sampled point: P10/P50/P90 over seeds of the cumulative curves."""

    strategy: str
    point: int
    tokens: float
    gpu_hours_p10: float
    gpu_hours_p50: float
    gpu_hours_p90: float
    cost_usd_p10: float
    cost_usd_p50: float
    cost_usd_p90: float


@dataclass(frozen=True)
class RunEstimate:
    """Everything a run produced, in plain records; :mod:`moesim.results` turns it into tables."""

    scenario: Scenario
    steps: list[SimulatedStep]
    balanced: SimulatedStep
    gate_records: dict[str, list[dict[str, float]]]
    link_names: list[str]
    specialisation: dict[str, npt.NDArray[np.int64]]
    """Per run with a gate: the topic × expert load of its final routers (first layer) on a
    fresh batch of the stream (domain specialisation of the experts, as in DeepSeek-V3,
    arXiv:2412.19437, Fig. 9 and Appendix C)."""
    balanced_step_s: dict[int, float]
    """Balanced-routing step time by micro-batches per pipeline (several under a batch
    ramp)."""
    summary: dict[str, RunSummary]
    timeline: list[TimelineRow]
    bands: list[BandRow] = field(default_factory=list)
    """Per strategy and point: percentiles over seeds of the cumulative curves
    (:mod:`moesim.estimate.montecarlo`); empty for a single-seed estimate."""
    gate_windows: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per run with a gate: its window summary (``GateTrajectory.tail_summary``), from which
    the summary's :class:`GateWindow` is read."""
    routing_by_domain: list[dict[str, float | int | str]] = field(default_factory=list)
    """Per run with a gate, simulated layer and data domain (and ``pooled``): the final
    routers' load skew (:func:`moesim.estimate.routing.domain_skew`)."""
    gate_cache: dict[str, str] = field(default_factory=dict)
    """Per strategy: where its gate came from, ``hit`` (the gate cache), ``miss`` (trained and
    stored) or ``off`` (trained without a cache); empty for a trace replay."""
    kernels: list[Kernel] = field(default_factory=list)
    """Every kernel of one micro-batch on one GPU under balanced routing, per op and pass
    (:meth:`moesim.cluster.ComputeModel.kernels`): where a step's compute time goes."""

    memory: dict[str, float] = field(default_factory=dict)
    """The worst GPU's estimated peak memory: ``memory_<component>_gib`` for weights,
    gradients, optimizer, activations, buffers and reserved, ``memory_total_gib`` and
    ``memory_capacity_gib`` (:mod:`moesim.cluster.memory`); a property of the layout, the
    same for every run."""

    def summary_dict(self) -> dict[str, dict[str, Scalar]]:
        """The per-run summaries in their flat ``summary.json`` form, each with the layout's
        memory estimate."""
        return {name: {**s.as_dict(), **self.memory} for name, s in self.summary.items()}
