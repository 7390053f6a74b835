"""Tensor parallelism with sequence parallelism: split GEMM shapes, the collectives' volume and
ring time per layer (with and without chunked overlap), and the parallel-folding rank layout."""

from __future__ import annotations

import copy

import pytest
from base_scenario import BASE, derive

from moesim import units
from moesim.cluster import ComputeModel, build_layout
from moesim.cluster.tensor_parallel import exposed_seconds, ring_bytes, ring_seconds
from moesim.scenario import scenario_from_dict

# A dense model on one 8-GPU node: heads, KV heads, FFN and sequence divide by 8.
DENSE = derive(
    BASE,
    name="dense",
    model={
        "dense_layers": 0,
        "moe": None,
        "attention": {"kind": "gqa", "heads": 16, "kv_heads": 8, "head_dim": 128},
        "dense_ffn": 4096,
        "seq_len": 2048,
    },
    parallelism={"pipeline": 1, "expert": 1, "data": 8, "micro_batch_size": 2},
    strategies=[],
    training={"total_tokens": 1.0e8, "global_batch_sequences": 64, "sample_points": 1},
)
del DENSE["model"]["moe"]


def dense(tensor: int, overlap: bool = False, context: int = 1, **model):  # type: ignore[no-untyped-def]
    raw = copy.deepcopy(DENSE)
    raw["parallelism"].update(tensor=tensor, tp_comm_overlap=overlap, context=context)
    raw["model"].update(model)
    return scenario_from_dict(raw)


def layer_flops(scenario, phase: str | None = None) -> float:  # type: ignore[no-untyped-def]
    """Matrix FLOP of one layer (attention + FFN) on one GPU, every pass or one."""
    kernels = ComputeModel(scenario).kernels([])
    return sum(
        k.flops
        for k in kernels
        if k.op in ("attention", "dense_ffn") and (phase is None or k.phase == phase)
    )


@pytest.mark.parametrize("tensor", [2, 4, 8])
def test_split_gemms_do_one_tth_of_the_layer_flops(tensor):
    whole = layer_flops(dense(1))
    assert whole > 0
    for phase in ("forward", "backward_input", "backward_weight", None):
        assert layer_flops(dense(tensor), phase) == pytest.approx(
            layer_flops(dense(1), phase) / tensor, rel=1e-12
        )


def test_split_gemm_shapes_are_megatron_column_and_row_parallel():
    t, sc = 4, dense(4)
    kernels = {(k.op, k.phase, k.name): k for k in ComputeModel(sc).kernels([])}
    n = sc.parallelism.micro_batch_size * sc.model.seq_len
    d, f = sc.model.hidden, sc.model.dense_ffn
    att = sc.model.attention
    qkv = (att.heads + 2 * att.kv_heads) * att.head_dim
    # Column-parallel: every token, 1/t of the output columns; row-parallel: 1/t of K.
    assert kernels[("attention", "forward", "QKV projection")].flops == 2 * n * d * qkv / t
    assert kernels[("attention", "forward", "attention output")].flops == (
        2 * n * att.heads * att.head_dim / t * d
    )
    assert kernels[("dense_ffn", "forward", "FFN gate+up")].flops == 2 * n * d * 2 * f / t
    assert kernels[("dense_ffn", "forward", "FFN down")].flops == 2 * n * f / t * d
    # Norms run on the GPU's sequence shard: 1/t of the unsplit bytes.
    norm = kernels[("attention", "forward", "RMSNorm: attention input")]
    unsplit = {(k.op, k.phase, k.name): k for k in ComputeModel(dense(1)).kernels([])}
    assert norm.bytes == unsplit[("attention", "forward", "RMSNorm: attention input")].bytes / t


def test_ring_formula():
    # 3/4 of 1 GB over 100 GB/s plus three hops of 2 µs.
    assert ring_seconds(1e9, 4, 100e9, 2e-6) == pytest.approx(0.75e9 / 100e9 + 3 * 2e-6)
    assert ring_bytes(1e9, 4) == 0.75e9
    assert ring_seconds(1e9, 1, 100e9, 2e-6) == 0.0


def test_overlap_rule():
    assert exposed_seconds(3.0, 2.0, 4, overlap=False) == 3.0
    # Communication longer than the GEMM: the excess plus one chunk of the GEMM.
    assert exposed_seconds(3.0, 2.0, 4, overlap=True) == pytest.approx(1.0 + 0.5)
    # GEMM longer: one chunk of communication is left as pipeline fill.
    assert exposed_seconds(1.0, 2.0, 4, overlap=True) == pytest.approx(0.25)
    # Nothing to overlap with: all exposed.
    assert exposed_seconds(1.0, 0.0, 4, overlap=True) == 1.0


@pytest.mark.parametrize("tensor", [2, 4, 8])
def test_layer_collectives_volume_and_time(tensor):
    sc = dense(tensor)
    layer = [c for c in ComputeModel(sc).tp_collectives() if c.op in ("attention", "dense_ffn")]
    forward = [c for c in layer if c.phase == "forward"]
    backward = [c for c in layer if c.phase == "backward_input"]
    assert sorted(c.kind for c in forward) == ["all_gather"] * 2 + ["reduce_scatter"] * 2
    assert sorted(c.kind for c in backward) == ["all_gather"] * 2 + ["reduce_scatter"] * 2
    b, s, h = sc.parallelism.micro_batch_size, sc.model.seq_len, sc.model.hidden
    full = b * s * h * 2  # BF16
    assert sum(c.sent_bytes for c in forward) == pytest.approx(4 * (tensor - 1) / tensor * full)
    bandwidth = sc.cluster.nvlink_bytes_per_s
    latency = units.microseconds(sc.cluster.nvlink.latency_us)
    ring = (tensor - 1) / tensor * full / bandwidth + (tensor - 1) * latency
    for c in layer:
        assert c.comm_s == pytest.approx(ring)
        assert c.exposed_s == c.comm_s  # no overlap
    assert sum(c.exposed_s for c in forward) == pytest.approx(4 * ring)


def test_overlap_hides_collectives_behind_their_gemms():
    plain = ComputeModel(dense(4)).tp_collectives()
    hidden = ComputeModel(dense(4, overlap=True)).tp_collectives()
    assert len(plain) == len(hidden)
    for p, o in zip(plain, hidden, strict=True):
        assert o.gemm_s == p.gemm_s
        if o.op in ("attention", "dense_ffn"):
            assert o.gemm_s > 0  # every layer collective has a neighbouring GEMM
        expected = max(0.0, o.comm_s - o.gemm_s) + min(o.comm_s, o.gemm_s) / 4
        assert o.exposed_s == pytest.approx(expected if o.gemm_s > 0 else o.comm_s)
        assert o.exposed_s <= p.exposed_s
    assert sum(o.exposed_s for o in hidden) < sum(p.exposed_s for p in plain)


def test_no_collectives_without_tensor_parallelism():
    assert ComputeModel(dense(1)).tp_collectives() == []


def test_parallel_folding_layout():
    """Stage of 8 GPUs on two 4-GPU nodes, tensor 2, expert 4, data 2: TP groups are pairs of
    consecutive ranks inside a node, EP groups 4 consecutive ranks, attention data-parallel
    peers share the tensor-parallel rank."""
    raw = derive(
        BASE,
        cluster={"nodes": 4, "gpus_per_node": 4},
        parallelism={"pipeline": 2, "tensor": 2, "expert": 4, "data": 2},
    )
    sc = scenario_from_dict(raw)
    lay = build_layout(sc)
    assert sc.attention_data == 4
    assert lay.tp_group(0) == [0, 1]
    assert lay.tp_group(5) == [4, 5]
    assert lay.tp_group(11) == [10, 11]
    assert lay.ep_group(5) == [4, 5, 6, 7]
    assert lay.ep_group(9) == [8, 9, 10, 11]
    assert lay.dp_peers(5) == [1, 5]  # expert data parallel: same EP rank, same stage
    assert lay.attention_dp_peers(5) == [1, 3, 5, 7]
    assert lay.attention_dp_peers(10) == [8, 10, 12, 14]  # second stage
    # Every TP group stays on one node.
    for gpu in range(sc.cluster.gpus):
        nodes = {g // sc.cluster.gpus_per_node for g in lay.tp_group(gpu)}
        assert len(nodes) == 1


@pytest.mark.parametrize(("tensor", "context"), [(1, 2), (1, 8), (2, 2), (2, 4)])
def test_context_parallel_gpus_do_their_share_of_the_layer_flops(tensor, context):
    for phase in ("forward", "backward_input", "backward_weight"):
        assert layer_flops(dense(tensor, context=context), phase) == pytest.approx(
            layer_flops(dense(1), phase) / (tensor * context), rel=1e-12
        )


@pytest.mark.parametrize(("tensor", "context"), [(1, 4), (2, 2), (2, 4)])
def test_ring_attention_kv_exchange(tensor, context):
    sc = dense(tensor, context=context)
    compute = ComputeModel(sc)
    ring = [c for c in compute.tp_collectives() if c.kind == "kv_ring"]
    assert [c.phase for c in ring] == ["forward", "backward_input"]
    att = sc.model.attention
    tokens = sc.parallelism.micro_batch_size * sc.model.seq_len / context
    chunk = tokens * att.kv_heads / tensor * 2 * att.head_dim * 2  # K and V, BF16
    bandwidth = sc.cluster.nvlink_bytes_per_s
    latency = units.microseconds(sc.cluster.nvlink.latency_us)
    forward, backward = ring
    assert forward.sent_bytes == pytest.approx((context - 1) * chunk)
    assert forward.comm_s == pytest.approx((context - 1) * (chunk / bandwidth + latency))
    # The backward passes K, V and their gradients.
    assert backward.sent_bytes == pytest.approx(2 * forward.sent_bytes)
    assert backward.comm_s == pytest.approx(2 * forward.comm_s)
    for c in ring:
        assert c.gemm_s > 0  # overlapped with flash attention
        expected = max(0.0, c.comm_s - c.gemm_s) + min(c.comm_s, c.gemm_s) / context
        assert c.exposed_s == pytest.approx(expected)


def test_context_parallel_layout():
    raw = derive(
        BASE,
        model={"seq_len": 2048},
        parallelism={"pipeline": 1, "tensor": 2, "context": 2, "expert": 8, "data": 1},
        training={"global_batch_sequences": 64},
    )
    sc = scenario_from_dict(raw)
    lay = build_layout(sc)
    assert sc.attention_data == 2
    assert lay.tp_group(5) == [4, 5]
    assert lay.cp_group(0) == [0, 2]
    assert lay.cp_group(5) == [5, 7]
    assert lay.cp_group(6) == [4, 6]
    # Context-parallel ranks hold the same weights: they reduce gradients together.
    assert lay.attention_dp_peers(1) == [1, 3, 5, 7]
