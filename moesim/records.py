"""Records that cross package boundaries: what a simulated step produced and the slices of its
timeline trace. Plain dataclasses and NumPy arrays, no simulation machinery, so
:mod:`moesim.results` can read a run without importing the engine (or SimPy).

Each :class:`StepResult` field says, in its metadata, along which axis it is indexed and
which columns of which results tables it becomes (:class:`Column`); the tables are built by
walking the fields, so a new metric is one field here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

TRACKS = ("compute", "dispatch", "combine", "pipeline", "allreduce")
"""Trace tracks of a GPU, in display order (see :mod:`moesim.engine.recorder`)."""


class Slice(NamedTuple):
    """One recorded interval of a GPU's work on one track."""

    gpu: int
    track: str
    name: str
    start_s: float
    end_s: float
    args: dict[str, Any]


Axis = Literal["step", "stage", "gpu", "expert", "link"]
"""What a field is indexed by: one value per step, per pipeline rank, per GPU, per (GPU, local
expert), per link."""
Reduce = Literal["value", "mean", "max", "sum"]
"""How a field becomes a column: as it is, mean or max over GPUs (a per-step column), or sum
over a GPU's local experts (a per-GPU column)."""

AXIS = "axis"
COLUMNS = "columns"


@dataclass(frozen=True)
class Column:
    """A results-table column made from a field: ``table`` (steps, gpus, experts, links),
    the column ``name`` (the field's own name when None) and how the field is reduced."""

    table: str
    name: str | None = None
    reduce: Reduce = "value"


def recorded(axis: Axis, *columns: Column) -> Any:
    """A dataclass field indexed by ``axis`` that becomes ``columns`` of the results tables."""
    return field(metadata={AXIS: axis, COLUMNS: columns})


def gpu_split() -> Any:
    """A per-GPU time: its mean over GPUs in ``steps``, per GPU in ``gpus``."""
    return recorded("gpu", Column("steps", reduce="mean"), Column("gpus"))


def field_columns(record: Any, table: str) -> dict[str, Any]:
    """The columns ``record``'s fields contribute to ``table``, in field order."""
    out: dict[str, Any] = {}
    for f in fields(record):
        for col in f.metadata.get(COLUMNS, ()):
            if col.table == table:
                out[col.name or f.name] = _REDUCE[col.reduce](getattr(record, f.name))
    return out


_REDUCE = {
    "value": lambda x: x,
    "mean": lambda x: float(x.mean()),
    "max": lambda x: float(x.max()),
    "sum": lambda x: x.sum(axis=1),
}


@dataclass(frozen=True)
class StepResult:
    """Outcome of one simulated training step.

    Per-GPU arrays have shape (gpus,); per-expert arrays (gpus, experts_per_rank); per-link
    arrays (links,). Times in seconds.
    """

    step_time_s: float = recorded("step", Column("steps"))
    gpu_stage: npt.NDArray[np.int64] = recorded("gpu", Column("gpus", "stage"))
    compute_s: FloatArray = gpu_split()
    """Busy time of the compute stream in forward and backward ops:
    forward_compute_s + backward_compute_s."""
    forward_compute_s: FloatArray = gpu_split()
    backward_compute_s: FloatArray = gpu_split()
    """Input and weight gradients (and recomputation)."""
    weight_grad_s: FloatArray = gpu_split()
    """Part of ``backward_compute_s`` spent in weight gradients."""
    expert_compute_s: FloatArray = recorded(
        "gpu",
        Column("steps", reduce="mean"),
        Column("steps", "max_expert_compute_s", reduce="max"),
        Column("gpus"),
    )
    """Part of ``compute_s`` spent in routed experts."""
    slowdown_s: FloatArray = recorded("gpu")
    """Extra compute time from this GPU's hardware condition (slow part, jitter, throttling):
    ``compute_s`` holds the healthy durations."""
    a2a_wait_s: FloatArray = gpu_split()
    """Compute stream idle inside MoE layers, waiting for an all-to-all:
    ``comm_wait_s + straggler_wait_s``."""
    comm_wait_s: FloatArray = gpu_split()
    """Exposed communication: waiting for bytes in flight after every sender was ready."""
    straggler_wait_s: FloatArray = gpu_split()
    """Waiting for the exchange's last sender to become ready (a slower peer upstream)."""
    pipeline_wait_s: FloatArray = gpu_split()
    """Idle waiting for activations or gradients from a neighbouring stage (bubble + P2P)."""
    tp_comm_s: FloatArray = gpu_split()
    """Tensor-parallel all-gathers and reduce-scatters and context-parallel (ring attention)
    key/value exchanges on the compute stream: what overlap with the neighbouring GEMMs or
    attention leaves exposed; 0 without either."""
    allreduce_s: FloatArray = gpu_split()
    """Gradient and parameter synchronisation at the end of the step (all-reduce, or ZeRO-1's
    reduce-scatter and all-gather), including waiting for the slowest member."""
    optimizer_s: FloatArray = gpu_split()
    """The optimizer step (on this GPU's shard under ZeRO-1)."""
    tail_idle_s: FloatArray = gpu_split()
    """Idle after this GPU finished, until the slowest GPU finished."""
    ops_end_s: FloatArray = recorded("gpu")
    """When this GPU's last forward or backward op ended (before gradient synchronisation)."""
    expert_tokens: FloatArray = recorded(
        "expert", Column("gpus", reduce="sum"), Column("experts", "tokens")
    )
    """Tokens each local expert processed (forward), over the step."""
    expert_wait_s: FloatArray = recorded("expert", Column("experts", "mean_wait_s"))
    """Token-weighted mean time a token waited between arriving and its expert starting."""
    link_bytes: FloatArray = recorded("link", Column("links", "bytes"))
    link_busy_s: FloatArray = recorded("link", Column("links", "busy_s"))
    stage_forward_s: FloatArray = recorded("stage")
    """Per rank: mean compute seconds of one forward op (one micro-batch through its piece)."""
    stage_backward_s: FloatArray = recorded("stage")
    """Per rank: mean compute seconds of one backward (input and weight gradients)."""
    events: int = recorded("step", Column("steps"))
    exchanges: int = recorded("step", Column("steps"))
    """All-to-all exchanges priced (one per MoE layer pass and rank)."""
    trace: list[Slice] = recorded("step")
    """Recorded slices (empty unless a recorder was given)."""

    @property
    def gpu_time_s(self) -> FloatArray:
        """Per GPU, the sum of its time split; equals ``step_time_s`` for every GPU."""
        return (
            self.compute_s
            + self.slowdown_s
            + self.a2a_wait_s
            + self.pipeline_wait_s
            + self.allreduce_s
            + self.optimizer_s
            + self.tail_idle_s
        )
