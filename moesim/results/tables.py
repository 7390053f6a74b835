"""Records → tidy pandas DataFrames, one row per (strategy, point, …) in every table.

Tables (each becomes ``<name>.parquet`` in the run directory):

- ``timeline``: per strategy and sampled point — tokens trained, step time, cumulative wall
  time, GPU-hours and cost, MFU, MaxVio, task loss.
- ``bands``: per strategy and sampled point — P10/P50/P90 over seeds of cumulative GPU-hours
  and cost (``uncertainty.seeds``).
- ``gate``: per strategy and gate update — MaxVio_batch, task loss, aux loss, teacher capture.
- ``steps``: per simulated step — step time, SimPy events, all-to-all exchanges, mean per-GPU
  time split.
- ``stages``: per simulated step and pipeline stage — mean time of its GPUs in forward,
  backward-input, backward-weight, pipeline bubble, exposed communication, waiting on stragglers,
  gradient sync, optimizer, idle at the end.
- ``gpus``: per simulated step and GPU — the same split per GPU, plus expert compute.
- ``experts``: per simulated step and routed expert — tokens processed, mean queue wait.
- ``links``: per simulated step and link — bytes carried, busy time and fraction.
- ``specialisation``: per strategy, topic and expert — the final routers' load (R8, V3 Fig. 9).

The balanced-routing reference step appears in ``steps``, ``gpus``, ``experts`` and ``links``
under the strategy name ``balanced_reference``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moesim.estimate import RunEstimate, SimulatedStep


def _simulated(est: RunEstimate) -> list[SimulatedStep]:
    return [est.balanced, *est.steps]


def timeline_table(est: RunEstimate) -> pd.DataFrame:
    return pd.DataFrame(est.timeline)


def bands_table(est: RunEstimate) -> pd.DataFrame:
    """Per strategy and point: P10/P50/P90 over seeds of cumulative GPU-hours and cost."""
    columns = ["strategy", "point", "tokens"] + [
        f"{c}_p{q}" for c in ("gpu_hours", "cost_usd") for q in (10, 50, 90)
    ]
    return pd.DataFrame(est.bands, columns=columns)


def gate_table(est: RunEstimate) -> pd.DataFrame:
    frames = [pd.DataFrame(recs).assign(strategy=name) for name, recs in est.gate_records.items()]
    df = pd.concat(frames, ignore_index=True)
    return df[["strategy", *[c for c in df.columns if c != "strategy"]]]


def steps_table(est: RunEstimate) -> pd.DataFrame:
    rows = []
    for s in _simulated(est):
        r = s.result
        rows.append(
            {
                "strategy": s.strategy,
                "point": s.point,
                "step": s.step,
                "step_time_s": r.step_time_s,
                "compute_s": float(r.compute_s.mean()),
                "forward_compute_s": float(r.forward_compute_s.mean()),
                "backward_compute_s": float(r.backward_compute_s.mean()),
                "weight_grad_s": float(r.weight_grad_s.mean()),
                "expert_compute_s": float(r.expert_compute_s.mean()),
                "a2a_wait_s": float(r.a2a_wait_s.mean()),
                "comm_wait_s": float(r.comm_wait_s.mean()),
                "straggler_wait_s": float(r.straggler_wait_s.mean()),
                "pipeline_wait_s": float(r.pipeline_wait_s.mean()),
                "allreduce_s": float(r.allreduce_s.mean()),
                "optimizer_s": float(r.optimizer_s.mean()),
                "tail_idle_s": float(r.tail_idle_s.mean()),
                "max_expert_compute_s": float(r.expert_compute_s.max()),
                "events": r.events,
                "exchanges": r.exchanges,
                **{f"routing_{k}": v for k, v in s.routing_metrics.items()},
            }
        )
    return pd.DataFrame(rows)


STAGE_SPLIT = (
    "forward_s",
    "backward_input_s",
    "backward_weight_s",
    "bubble_s",
    "exposed_comm_s",
    "straggler_wait_s",
    "sync_s",
    "optimizer_s",
    "tail_idle_s",
)


def stages_table(est: RunEstimate) -> pd.DataFrame:
    """Mean time split of each pipeline stage's GPUs; a row's columns add up to the step."""
    frames = []
    for s in _simulated(est):
        r = s.result
        split = {
            "forward_s": r.forward_compute_s,
            "backward_input_s": r.backward_compute_s - r.weight_grad_s,
            "backward_weight_s": r.weight_grad_s,
            "bubble_s": r.pipeline_wait_s,
            "exposed_comm_s": r.comm_wait_s,
            "straggler_wait_s": r.straggler_wait_s,
            "sync_s": r.allreduce_s,
            "optimizer_s": r.optimizer_s,
            "tail_idle_s": r.tail_idle_s,
        }
        df = pd.DataFrame({"stage": r.gpu_stage, **split}).groupby("stage").mean().reset_index()
        frames.append(df.assign(strategy=s.strategy, point=s.point, step=s.step))
    df = pd.concat(frames, ignore_index=True)
    return df[["strategy", "point", "step", "stage", *STAGE_SPLIT]]


def gpus_table(est: RunEstimate) -> pd.DataFrame:
    frames = []
    for s in _simulated(est):
        r = s.result
        n = len(r.compute_s)
        frames.append(
            pd.DataFrame(
                {
                    "strategy": s.strategy,
                    "point": s.point,
                    "step": s.step,
                    "gpu": np.arange(n),
                    "stage": r.gpu_stage,
                    "compute_s": r.compute_s,
                    "forward_compute_s": r.forward_compute_s,
                    "backward_compute_s": r.backward_compute_s,
                    "expert_compute_s": r.expert_compute_s,
                    "a2a_wait_s": r.a2a_wait_s,
                    "pipeline_wait_s": r.pipeline_wait_s,
                    "allreduce_s": r.allreduce_s,
                    "optimizer_s": r.optimizer_s,
                    "tail_idle_s": r.tail_idle_s,
                    "weight_grad_s": r.weight_grad_s,
                    "comm_wait_s": r.comm_wait_s,
                    "straggler_wait_s": r.straggler_wait_s,
                    "expert_tokens": r.expert_tokens.sum(axis=1),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def experts_table(est: RunEstimate) -> pd.DataFrame:
    frames = []
    for s in _simulated(est):
        r = s.result
        gpus, per_rank = r.expert_tokens.shape
        ep = est.scenario.parallelism.expert
        gpu = np.repeat(np.arange(gpus), per_rank)
        local = np.tile(np.arange(per_rank), gpus)
        frames.append(
            pd.DataFrame(
                {
                    "strategy": s.strategy,
                    "point": s.point,
                    "step": s.step,
                    "gpu": gpu,
                    "stage": r.gpu_stage[gpu],
                    "expert": (gpu % ep) * per_rank + local,
                    "tokens": r.expert_tokens.ravel(),
                    "mean_wait_s": r.expert_wait_s.ravel(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def links_table(est: RunEstimate) -> pd.DataFrame:
    frames = []
    for s in _simulated(est):
        r = s.result
        frames.append(
            pd.DataFrame(
                {
                    "strategy": s.strategy,
                    "point": s.point,
                    "step": s.step,
                    "link": est.link_names,
                    "bytes": r.link_bytes,
                    "busy_s": r.link_busy_s,
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
