"""Records → tidy pandas DataFrames, one row per (strategy, point, …) in every table.

Tables (each becomes ``<name>.parquet`` in the run directory):

- ``timeline``: per strategy and sampled point — tokens trained, step time, cumulative wall
  time, GPU-hours and cost, MFU, MaxVio, task loss (the fields of
  :class:`~moesim.estimate.TimelineRow`); with several seeds, each strategy's rows are those of
  its headline seed (``headline_seed`` in ``summary.json``), while the per-step tables below
  are the scenario's own seed's.
- ``bands``: per strategy and sampled point — P10/P50/P90 over seeds of cumulative GPU-hours
  and cost (``uncertainty.seeds``; the fields of :class:`~moesim.estimate.BandRow`).
- ``gate``: per strategy and gate update — MaxVio_batch, task loss, aux loss, teacher capture.
- ``steps``: per simulated step — step time, SimPy events, all-to-all exchanges, mean per-GPU
  time split, and the routing sample's metrics (``routing_<metric>``).
- ``stages``: per simulated step and pipeline stage — mean time of its GPUs in forward,
  backward-input, backward-weight, pipeline bubble, exposed communication, waiting on stragglers,
  gradient sync, optimizer, idle at the end.
- ``gpus``: per simulated step and GPU — the same split per GPU, plus expert compute.
- ``experts``: per simulated step and expert slot — tokens processed, mean queue wait.
- ``links``: per simulated step and link — bytes carried, busy time and fraction.
- ``specialisation``: per strategy, topic and expert — the final routers' load.
- ``kernels``: every kernel of one micro-batch on one GPU under balanced routing — op, pass,
  name, kind, FLOPs, bytes, seconds, and whether it is recomputed forward work (the fields of
  :class:`~moesim.cluster.kernels.Kernel`).

The ``steps``, ``gpus``, ``experts`` and ``links`` columns come from the fields of
:class:`moesim.records.StepResult`, each of which names its columns in its metadata
(:func:`moesim.records.field_columns`). The balanced-routing reference step appears in those
tables under the strategy name ``balanced_reference``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np
import pandas as pd

from moesim.cluster import build_layout
from moesim.cluster.kernels import Kernel
from moesim.estimate.records import BandRow, RunEstimate, SimulatedStep, TimelineRow
from moesim.records import field_columns


def _simulated(est: RunEstimate) -> list[SimulatedStep]:
    return [est.balanced, *est.steps]


def _records_frame(records: list[Any], record_type: type) -> pd.DataFrame:
    """One row per record, one column per field of ``record_type``, in field order."""
    columns = [f.name for f in fields(record_type)]
    return pd.DataFrame([{c: getattr(r, c) for c in columns} for r in records], columns=columns)


def kernels_table(est: RunEstimate) -> pd.DataFrame:
    return _records_frame(est.kernels, Kernel)


def _step_keys(s: SimulatedStep) -> dict[str, Any]:
    return {"strategy": s.strategy, "point": s.point, "step": s.step}


def timeline_table(est: RunEstimate) -> pd.DataFrame:
    return _records_frame(est.timeline, TimelineRow)


def bands_table(est: RunEstimate) -> pd.DataFrame:
    """Per strategy and point: P10/P50/P90 over seeds of cumulative GPU-hours and cost."""
    return _records_frame(est.bands, BandRow)


def gate_table(est: RunEstimate) -> pd.DataFrame:
    frames = [pd.DataFrame(recs).assign(strategy=name) for name, recs in est.gate_records.items()]
    df = pd.concat(frames, ignore_index=True)
    return df[["strategy", *[c for c in df.columns if c != "strategy"]]]


def steps_table(est: RunEstimate) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                **_step_keys(s),
                **field_columns(s.result, "steps"),
                **{f"routing_{k}": v for k, v in s.routing_metrics.items()},
            }
            for s in _simulated(est)
        ]
    )


STAGE_SPLIT = (
    "forward_s",
    "backward_input_s",
    "backward_weight_s",
    "bubble_s",
    "exposed_comm_s",
    "tp_comm_s",
    "straggler_wait_s",
    "sync_s",
    "optimizer_s",
    "tail_idle_s",
)
"""The stage table's split of a step: the per-GPU fields of ``StepResult`` regrouped so that a
row adds up to the step (compute by pass, the idle and waiting causes)."""


def stages_table(est: RunEstimate) -> pd.DataFrame:
    """Mean time split of each pipeline stage's GPUs; a row's columns add up to the step."""
    frames = []
    for s in _simulated(est):
        r = s.result
        split = dict(
            zip(
                STAGE_SPLIT,
                (
                    r.forward_compute_s,
                    r.backward_compute_s - r.weight_grad_s,
                    r.weight_grad_s,
                    r.pipeline_wait_s,
                    r.comm_wait_s,
                    r.tp_comm_s,
                    r.straggler_wait_s,
                    r.allreduce_s,
                    r.optimizer_s,
                    r.tail_idle_s,
                ),
                strict=True,
            )
        )
        df = pd.DataFrame({"stage": r.gpu_stage, **split}).groupby("stage").mean().reset_index()
        frames.append(df.assign(**_step_keys(s)))
    df = pd.concat(frames, ignore_index=True)
    return df[["strategy", "point", "step", "stage", *STAGE_SPLIT]]


def gpus_table(est: RunEstimate) -> pd.DataFrame:
    frames = []
    for s in _simulated(est):
        columns = field_columns(s.result, "gpus")
        gpu = np.arange(len(s.result.gpu_stage))
        frames.append(pd.DataFrame({**_step_keys(s), "gpu": gpu, **columns}))
    return pd.concat(frames, ignore_index=True)


def experts_table(est: RunEstimate) -> pd.DataFrame:
    layout = build_layout(est.scenario)
    frames = []
    for s in _simulated(est):
        r = s.result
        gpus, per_rank = r.expert_tokens.shape
        gpu = np.repeat(np.arange(gpus), per_rank)
        columns = {k: v.ravel() for k, v in field_columns(r, "experts").items()}
        frames.append(
            pd.DataFrame(
                {
                    **_step_keys(s),
                    "gpu": gpu,
                    "stage": r.gpu_stage[gpu],
                    "expert": layout.expert_slots(per_rank).ravel(),
                    **columns,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def links_table(est: RunEstimate) -> pd.DataFrame:
    frames = []
    for s in _simulated(est):
        r = s.result
        columns = field_columns(r, "links")
        frames.append(
            pd.DataFrame(
                {
                    **_step_keys(s),
                    "link": est.link_names,
                    **columns,
                    "busy_fraction": r.link_busy_s / r.step_time_s,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def specialisation_table(est: RunEstimate) -> pd.DataFrame:
    """Per run with a gate: assignments of each topic's tokens to each expert at the end of
    training, and that load relative to the topic's uniform share (1 = no specialisation)."""
    frames = []
    for name, load in est.specialisation.items():
        topics, experts = load.shape
        per_topic = load.sum(axis=1, keepdims=True)
        uniform = np.where(per_topic > 0, per_topic / experts, 1.0)
        frames.append(
            pd.DataFrame(
                {
                    "strategy": name,
                    "topic": np.repeat(np.arange(topics), experts),
                    "expert": np.tile(np.arange(experts), topics),
                    "tokens": load.ravel(),
                    "relative_load": (load / uniform).ravel(),
                }
            )
        )
    columns = ["strategy", "topic", "expert", "tokens", "relative_load"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
