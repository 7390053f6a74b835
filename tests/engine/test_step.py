"""The training-step model: 1F1B composition, all-to-all traffic, straggler effect."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.engine import build_context, simulate_step
from moesim.engine.step import one_f_one_b
from moesim.scenario import scenario_from_dict


def _balanced(ctx, dest_fraction=0.5):
    sc = ctx.scenario
    lay = ctx.layout
    shape = (sc.gate.layers_simulated, sc.micro_batches, lay.gpus_per_stage)
    tokens = sc.parallelism.micro_batch_size * sc.model.seq_len
    e, k = sc.model.moe.routed_experts, sc.model.moe.top_k
    counts = np.full((*shape, e), tokens * k // e, dtype=np.int64)
    dest = np.full((*shape, lay.expert), int(tokens * dest_fraction), dtype=np.int64)
    return counts, dest


def _uniform_pipeline(tiny_dict):
    """One 8-GPU node, PP2 × EP4, MoE layers only, a tiny vocabulary: stages are identical."""
    d = tiny_dict
    d["cluster"]["nodes"] = 1
    d["cluster"]["gpus_per_node"] = 8
    d["model"]["dense_layers"] = 0
    d["model"]["vocab"] = 8
    d["model"]["seq_len"] = 4096  # enough work per layer that embedding and head are noise
    d["training"]["global_batch_sequences"] = 32  # 8 micro-batches
    return scenario_from_dict(d)


def test_one_f_one_b_order():
    order = one_f_one_b(stage=0, stages=4, micro_batches=6)
    assert order[:3] == [("F", 0), ("F", 1), ("F", 2)]  # PP − s − 1 warm-up forwards
    assert sorted(order) == sorted([("F", j) for j in range(6)] + [("B", j) for j in range(6)])
    for j in range(6):
        assert order.index(("F", j)) < order.index(("B", j))
    last = one_f_one_b(stage=3, stages=4, micro_batches=6)
    assert last[:4] == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]


def test_balanced_1f1b_step_matches_closed_form(tiny_dict):
    """(m + PP − 1)(F + B) + all-reduce. Stage-to-stage transfers sit on the 1F1B critical
    path (about 2 transfers per micro-batch in steady state), so the closed form holds when
    they are cheap: NVLink is made 20× faster here."""
    tiny_dict["cluster"]["nvlink"]["bandwidth_gbytes_per_s"] = 9000
    sc = _uniform_pipeline(tiny_dict)
    ctx = build_context(sc)
    r = simulate_step(ctx, *_balanced(ctx))
    f, b = r.stage_forward_s, r.stage_backward_s
    assert f[0] == pytest.approx(f[1], rel=0.01)
    assert b[0] == pytest.approx(b[1], rel=0.01)
    m, pp = sc.micro_batches, sc.parallelism.pipeline
    closed = (m + pp - 1) * (f.max() + b.max()) + r.allreduce_s.max()
    assert r.step_time_s == pytest.approx(closed, rel=0.01)


@pytest.mark.parametrize("zero1", [False, True])
def test_gradient_sync_is_a_ring_and_zero1_shards_the_optimizer(tiny_dict, zero1):
    """All-reduce = reduce-scatter + all-gather in bytes and time (BF16 gradients and
    parameters); ZeRO-1 updates a 1/n shard of the parameters instead of all of them."""
    tiny_dict["parallelism"]["zero1"] = zero1
    sc = _uniform_pipeline(tiny_dict)
    ctx = build_context(sc)
    r = simulate_step(ctx, *_balanced(ctx))
    n = ctx.layout.gpus_per_stage  # the dense ring spans the stage; EP-data degree is 1
    bw = sc.cluster.nvlink_bytes_per_s
    lat = ctx.topology.nvlink_latency_s
    ring = 2 * (n - 1) / n * ctx.dense_grad_bytes / bw + 2 * (n - 1) * lat
    # The last stage to finish its backward forms its ring last; its ring time is exact.
    assert r.allreduce_s.min() == pytest.approx(ring.min(), rel=1e-6)
    params = ctx.dense_params[0] + ctx.expert_params[0]  # EP-data degree 1: experts unshared
    shard = ctx.dense_params[0] / n + ctx.expert_params[0] if zero1 else params
    assert r.optimizer_s[0] == pytest.approx(ctx.compute.optimizer_step(shard), rel=1e-12)


def test_data_parallel_forward_is_the_sum_of_ops(tiny_dict):
    """With EP = 1 every expert is local: a forward pass is exactly the sum of its ops."""
    d = tiny_dict
    d["parallelism"] = {"pipeline": 1, "expert": 1, "data": 8, "micro_batch_size": 1}
    d["training"]["global_batch_sequences"] = 16
    sc = scenario_from_dict(d)
    ctx = build_context(sc)
    counts, dest = _balanced(ctx, dest_fraction=1.0)
    r = simulate_step(ctx, counts, dest)
    c = ctx.compute
    rows = counts[0, 0, 0].astype(float)
    moe = c.attention(False) + c.router(False) + c.shared_experts(False) + c.experts(rows, False)
    dense = c.attention(False) + c.dense_ffn_seconds(False)
    expected = c.embedding(False) + dense + 3 * moe + c.head(False)
    assert r.stage_forward_s[0] == pytest.approx(expected, rel=1e-9)


def test_all_to_all_bytes_on_links(tiny_dict):
    sc = _uniform_pipeline(tiny_dict)
    ctx = build_context(sc)
    counts, dest = _balanced(ctx)
    r = simulate_step(ctx, counts, dest)
    # GPU 0 sends its dest tokens to 3 peers per MoE layer and micro-batch: dispatch (forward,
    # BF16 here) + combine-backward (BF16), and returns the same to each peer as combine +
    # dispatch-backward; stage 0 also sends activations to stage 1.
    layers_on_stage = len(ctx.layout.stage_layers[0])
    per_pass = 3 * dest[0, 0, 0, 1] * sc.model.hidden * 2
    a2a = 4 * per_pass * layers_on_stage * sc.micro_batches
    acts = ctx.activation_bytes * sc.micro_batches
    allreduce = 2 * 3 / 4 * ctx.dense_grad_bytes[0]
    nvlink_out_gpu0 = r.link_bytes[ctx.topology.link_id(0, 0)]
    assert nvlink_out_gpu0 == pytest.approx(a2a + acts + allreduce, rel=1e-9)


def test_hot_expert_makes_its_group_wait(tiny_dict):
    sc = _uniform_pipeline(tiny_dict)
    ctx = build_context(sc)
    counts, dest = _balanced(ctx)
    base = simulate_step(ctx, counts, dest)
    hot = counts.copy()
    hot[..., 0] *= 6  # expert 0 lives on expert-parallel rank 0 (GPUs 0 and 4)
    r = simulate_step(ctx, hot, dest)
    assert r.step_time_s > base.step_time_s
    assert r.expert_compute_s[0] > r.expert_compute_s[1]
    # Everyone else in GPU 0's group waits for it longer than it waits for them.
    assert np.all(r.a2a_wait_s[1:4] > r.a2a_wait_s[0] + 1e-4)
    assert r.expert_tokens[0, 0] == hot[0, :, :, 0].sum() * len(ctx.layout.stage_layers[0]) / 1


def test_step_is_deterministic(tiny_scenario):
    ctx = build_context(tiny_scenario)
    counts, dest = _balanced(ctx)
    rng = np.random.default_rng(0)
    counts = counts + rng.integers(0, 50, size=counts.shape)
    a = simulate_step(ctx, counts, dest)
    b = simulate_step(ctx, counts, dest)
    assert a.step_time_s == b.step_time_s
    np.testing.assert_array_equal(a.a2a_wait_s, b.a2a_wait_s)
    np.testing.assert_array_equal(a.link_bytes, b.link_bytes)


def test_wrong_sample_shape_is_refused(tiny_scenario):
    from moesim.errors import SimulationError

    ctx = build_context(tiny_scenario)
    counts, dest = _balanced(ctx)
    with pytest.raises(SimulationError, match="does not match"):
        simulate_step(ctx, counts[:, :1], dest[:, :1])


def test_gpu_time_split_adds_up_to_the_step(tiny_scenario):
    ctx = build_context(tiny_scenario)
    counts, dest = _balanced(ctx)
    counts[..., 3] *= 4  # imbalance so that waits appear
    r = simulate_step(ctx, counts, dest)
    np.testing.assert_allclose(r.gpu_time_s, r.step_time_s, rtol=1e-12)
    np.testing.assert_allclose(r.compute_s, r.forward_compute_s + r.backward_compute_s)
    assert r.a2a_wait_s.sum() > 0
    assert r.pipeline_wait_s.sum() > 0


def test_recorder_captures_a_consistent_timeline(tiny_scenario):
    from moesim.engine.recorder import SliceRecorder

    ctx = build_context(tiny_scenario)
    counts, dest = _balanced(ctx)
    plain = simulate_step(ctx, counts, dest)
    r = simulate_step(ctx, counts, dest, SliceRecorder([0, 5]))
    assert r.step_time_s == plain.step_time_s  # recording does not change the model
    assert plain.trace == []
    assert {s.gpu for s in r.trace} == {0, 5}
    for gpu in (0, 5):
        compute = sorted(
            (s.start_s, s.end_s) for s in r.trace if s.gpu == gpu and s.track == "compute"
        )
        busy = sum(e - s for s, e in compute)
        assert busy == pytest.approx(r.compute_s[gpu] + r.optimizer_s[gpu], rel=1e-9)
        for (_, end), (start, _) in zip(compute, compute[1:], strict=False):
            assert start >= end - 1e-12  # one compute stream: slices never overlap
    tracks = {s.track for s in r.trace}
    assert tracks == {"compute", "dispatch", "combine", "pipeline", "allreduce"}
