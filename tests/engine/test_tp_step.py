"""Tensor-parallel collectives in a simulated step: exposed seconds per GPU add up to the
closed form (collectives × exposed time × micro-batches), overlap lowers them, their bytes
land on the NVLink ports, and an MoE model folds TP onto its expert-parallel GPUs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from base_scenario import BASE, derive

from moesim.cluster.topology import NVLINK_OUT
from moesim.engine import build_context, simulate_step
from moesim.estimate.routing import dense_sample
from moesim.gate import balanced_sample
from moesim.scenario import scenario_from_dict

DENSE = derive(
    BASE,
    name="dense",
    model={
        "dense_layers": 0,
        "attention": {"kind": "gqa", "heads": 16, "kv_heads": 8, "head_dim": 128},
        "dense_ffn": 4096,
        "seq_len": 2048,
    },
    parallelism={"pipeline": 1, "expert": 1, "data": 8, "micro_batch_size": 1},
    strategies=[],
    training={"total_tokens": 1.0e8, "global_batch_sequences": 16, "sample_points": 1},
)
del DENSE["model"]["moe"]


def dense_step(tensor: int, overlap: bool = False, context: int = 1):  # type: ignore[no-untyped-def]
    raw = copy.deepcopy(DENSE)
    raw["parallelism"].update(tensor=tensor, tp_comm_overlap=overlap, context=context)
    sc = scenario_from_dict(raw)
    ctx = build_context(sc)
    sample = dense_sample(sc, 0, ctx.layout.gpus_per_stage)
    return sc, ctx, simulate_step(ctx, sample.counts, sample.dest_tokens)


@pytest.mark.parametrize(
    ("tensor", "context", "overlap"), [(4, 1, False), (4, 1, True), (2, 2, False), (1, 4, True)]
)
def test_exposed_tp_seconds_match_the_closed_form(tensor, context, overlap):
    sc, ctx, r = dense_step(tensor, overlap, context)
    per_micro = 0.0
    sent = 0.0
    for c in ctx.compute.tp_collectives():
        times = sc.model.layers if c.op in ("attention", "dense_ffn") else 1
        per_micro += times * c.exposed_s
        sent += times * c.sent_bytes
    micro = sc.micro_batches
    # One sequence per tensor × context group per micro-batch.
    assert micro == 16 // (8 // (tensor * context))
    np.testing.assert_allclose(r.tp_comm_s, micro * per_micro, rtol=1e-9)
    # The rings' bytes leave on each GPU's NVLink port (the DP all-reduce adds its own).
    out = r.link_bytes[ctx.topology.link_id(np.arange(8), NVLINK_OUT)]
    assert np.all(out >= micro * sent * (1 - 1e-12))


def test_no_tp_time_without_tensor_parallelism():
    _, _, r = dense_step(1)
    assert not r.tp_comm_s.any()


def test_overlap_lowers_exposed_tp_time_and_the_step():
    _, _, plain = dense_step(4, overlap=False)
    _, _, hidden = dense_step(4, overlap=True)
    assert hidden.tp_comm_s.mean() < plain.tp_comm_s.mean()
    assert hidden.step_time_s < plain.step_time_s
    # The compute itself does not change.
    np.testing.assert_allclose(hidden.compute_s, plain.compute_s)


def test_moe_folds_tensor_parallel_attention_onto_expert_gpus():
    """TP 2 over an EP-8 stage: 4 attention-data-parallel replicas, each GPU routes half of
    its group's micro-batch, and the attention adds TP time."""
    raw = copy.deepcopy(BASE)
    raw["parallelism"]["tensor"] = 2
    sc = scenario_from_dict(raw)
    ctx = build_context(sc)
    n_src, n_dest = ctx.layout.gpus_per_stage, ctx.layout.expert
    bal = balanced_sample(sc, 0, n_src, n_dest)
    r = simulate_step(ctx, bal.counts, bal.dest_tokens)
    assert sc.micro_batches == 64 // 4
    assert r.tp_comm_s.min() > 0
    # Each GPU's experts receive, per MoE layer and micro-batch, top_k assignments of half
    # a sequence (its TP group's micro-batch is one sequence; EP-8, balanced).
    per_gpu = sc.micro_batches * sc.model.moe_layers * sc.model.seq_len * sc.model.moe.top_k / 2
    np.testing.assert_allclose(r.expert_tokens.sum(axis=1), per_gpu, rtol=1e-12)
