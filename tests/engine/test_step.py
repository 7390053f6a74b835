"""The training-step model: schedule composition, all-to-all traffic, straggler effect."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.engine import build_context, kernels, simulate_step
from moesim.engine.schedules import evaluate
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


def _uniform_pipeline(tiny_dict, **parallelism):
    """One 8-GPU node, PP2 × EP4, MoE layers only, a tiny vocabulary: stages are identical."""
    d = tiny_dict
    d["cluster"]["nodes"] = 1
    d["cluster"]["gpus_per_node"] = 8
    d["model"]["dense_layers"] = 0
    d["model"]["vocab"] = 8
    d["model"]["seq_len"] = 4096  # enough work per layer that embedding and head are noise
    d["training"]["global_batch_sequences"] = 32  # 8 micro-batches
    d["parallelism"].update(parallelism)
    return scenario_from_dict(d)


def _free_communication(d):
    """Links so fast, with no latency, that communication costs nothing measurable."""
    d["cluster"]["nvlink"] = {"latency_us": 0.0, "bandwidth_gbytes_per_s": 1e9}
    d["cluster"]["nic"] = {"bandwidth_gbits_per_s": 8e9, "latency_us": 0.0}


def _bubble_case(tiny_dict, schedule, pp, micro, virtual=1):
    """Balanced routing, free communication, identical pieces (layers divisible by pieces)."""
    d = tiny_dict
    _free_communication(d)
    d["cluster"]["nodes"] = pp
    d["cluster"]["gpus_per_node"] = 2
    d["model"].update(dense_layers=0, vocab=8, seq_len=2048, layers=2 * pp * virtual)
    d["model"]["moe"]["shared_experts"] = 0
    d["parallelism"] = {
        "pipeline": pp,
        "expert": 2,
        "data": 1,
        "micro_batch_size": 1,
        "schedule": schedule,
        "virtual_stages": virtual,
    }
    d["training"]["global_batch_sequences"] = 2 * micro
    sc = scenario_from_dict(d)
    ctx = build_context(sc)
    counts, dest = _balanced(ctx)
    r = simulate_step(ctx, counts, dest)
    ops_end = r.ops_end_s.max()
    busy = np.bincount(r.gpu_stage, weights=r.compute_s) / ctx.layout.gpus_per_stage
    bubble = ops_end - busy
    # Per-op times as the engine priced them (every piece is the same work).
    weight = np.bincount(r.gpu_stage, weights=r.weight_grad_s) / ctx.layout.gpus_per_stage
    return sc, ctx, r, bubble, weight


def _op_prices(ctx, counts):
    """Seconds of each schedule op from the compute model (balanced rows, no communication):
    an independent oracle of what the engine should charge."""
    c, ops, sched = ctx.compute, ctx.ops, ctx.schedule
    rows = counts[0, 0, : ctx.layout.expert].sum(axis=0).reshape(ctx.layout.expert, -1)[0]
    experts = c.experts(rows.astype(float))
    layer = ops.attention + ops.router + ops.shared_experts
    last = sched.n_pieces - 1

    def layers(p):
        return len(ctx.piece_layers[p])

    def forward(p):
        t = layers(p) * (layer.forward + float(experts.forward))
        return (
            t
            + (ops.embedding.forward if p == 0 else 0.0)
            + (ops.head.forward if p == last else 0.0)
        )

    def weight(p):
        t = layers(p) * (layer.backward_weight + float(experts.backward_weight))
        return t + (ops.head.backward_weight if p == last else 0.0)

    def backward(m, p):
        t = layers(p) * (layer.backward + float(experts.backward))
        t += (ops.embedding.backward if p == 0 else 0.0) + (ops.head.backward if p == last else 0.0)
        return t - (weight(p) if sched.is_split(m, p) else 0.0)

    def duration(op):
        if op.kind == "F":
            return forward(op.piece)
        if op.kind == "B":
            return backward(op.micro, op.piece)
        if op.kind == "W":
            return weight(op.piece)
        return forward(op.piece) + backward(op.b_micro, op.b_piece)

    return duration


@pytest.mark.parametrize(
    ("schedule", "pp", "micro", "virtual"),
    [
        ("1f1b", 4, 8, 1),
        ("1f1b", 8, 12, 1),
        ("interleaved", 4, 8, 2),
        ("zb1p", 4, 8, 1),
        ("dualpipe", 4, 8, 1),
        ("dualpipe", 8, 16, 1),
    ],
)
def test_engine_runs_each_schedule_exactly_as_the_oracle(tiny_dict, schedule, pp, micro, virtual):
    """With balanced routing and free communication the engine's per-rank bubbles equal the
    max-plus evaluation of the same schedule priced by the compute model."""
    sc, ctx, r, bubble, _ = _bubble_case(tiny_dict, schedule, pp, micro, virtual)
    counts, _ = _balanced(ctx)
    oracle = evaluate(ctx.schedule, 0.0, 0.0, duration=_op_prices(ctx, counts))
    np.testing.assert_allclose(bubble, oracle.bubble, rtol=1e-6)
    assert r.ops_end_s.max() == pytest.approx(oracle.makespan, rel=1e-6)


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
    # Every GPU of a balanced stage finishes together: no waiting for the ring to form.
    stage_sync = np.array([r.allreduce_s[ctx.rank_gpus[s].ravel()].min() for s in range(2)])
    np.testing.assert_allclose(stage_sync, ring, rtol=1e-6)
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
    ops = c.op_costs()
    moe = (ops.attention + ops.router + ops.shared_experts).forward + float(c.experts(rows).forward)
    dense = (ops.attention + ops.dense_ffn).forward
    expected = ops.embedding.forward + dense + 3 * moe + ops.head.forward
    assert r.stage_forward_s[0] == pytest.approx(expected, rel=1e-9)


def test_all_to_all_bytes_on_links(tiny_dict):
    sc = _uniform_pipeline(tiny_dict)
    ctx = build_context(sc)
    counts, dest = _balanced(ctx)
    r = simulate_step(ctx, counts, dest)
    # GPU 0 sends its dest tokens to 3 peers per MoE layer and micro-batch: dispatch (forward,
    # BF16 here) + combine-backward (BF16), and returns the same to each peer as combine +
    # dispatch-backward; stage 0 also sends activations to stage 1.
    layers_on_stage = len(ctx.piece_layers[0])
    per_pass = 3 * dest[0, 0, 0, 1] * sc.model.hidden * 2
    a2a = 4 * per_pass * layers_on_stage * sc.micro_batches
    acts = ctx.activation_bytes * sc.micro_batches
    allreduce = 2 * 3 / 4 * ctx.dense_grad_bytes[0]
    nvlink_out_gpu0 = r.link_bytes[ctx.topology.link_id(0, 0)]
    assert nvlink_out_gpu0 == pytest.approx(a2a + acts + allreduce, rel=1e-9)


def test_backward_all_to_alls_use_their_kernels_precisions(tiny_dict):
    """FP8 model: the forward dispatch and the backward of the combine (a dispatch kernel)
    carry FP8 (1 byte per element); the forward combine and the backward of the dispatch (a
    combine kernel) carry BF16."""
    tiny_dict["model"]["gemm_precision"] = "fp8"
    sc = _uniform_pipeline(tiny_dict)
    ctx = build_context(sc)
    counts, dest = _balanced(ctx)
    r = simulate_step(ctx, counts, dest)
    layers_on_stage = len(ctx.piece_layers[0])
    per_byte = 3 * dest[0, 0, 0, 1] * sc.model.hidden
    # Out of GPU 0: dispatch FP8 + combine BF16 + dispatch-kernel gradients FP8 + combine-kernel
    # gradients BF16.
    a2a = (1 + 2 + 1 + 2) * per_byte * layers_on_stage * sc.micro_batches
    acts = ctx.activation_bytes * sc.micro_batches
    allreduce = 2 * 3 / 4 * ctx.dense_grad_bytes[0]
    assert r.link_bytes[ctx.topology.link_id(0, 0)] == pytest.approx(
        a2a + acts + allreduce, rel=1e-9
    )


def test_expert_weight_gradients_fill_the_backward_all_to_all(tiny_dict):
    """Not split (1F1B): the experts' weight-gradient GEMMs start after the input gradients
    leave and run while they are in flight."""
    from moesim.engine.recorder import SliceRecorder

    sc = _uniform_pipeline(tiny_dict)
    ctx = build_context(sc)
    counts, dest = _balanced(ctx)
    rec = SliceRecorder([0])
    simulate_step(ctx, counts, dest, recorder=rec)
    sends = [s for s in rec.slices if s.name == "combine backward (of dispatch)"]
    fills = [s for s in rec.slices if s.name == "expert weight gradients"]
    assert len(fills) == len(sends) > 0
    for send, fill in zip(
        sorted(sends, key=lambda s: s.start_s), sorted(fills, key=lambda s: s.start_s), strict=True
    ):
        assert fill.start_s == pytest.approx(send.start_s)
        assert fill.start_s < send.end_s


def test_balanced_rows_hold_every_assignment(tiny_dict):
    sc = scenario_from_dict(tiny_dict)
    c = build_context(sc).compute
    rows = c.balanced_rows(sc.parallelism.expert)
    tokens = sc.parallelism.micro_batch_size * sc.model.seq_len
    assert rows.sum() == pytest.approx(tokens * sc.model.moe.top_k)
    assert rows.size == sc.model.moe.routed_experts // sc.parallelism.expert


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
    # Everyone else in GPU 0's group waits for it, and the wait is the straggler's.
    assert np.all(r.a2a_wait_s[1:4] > r.a2a_wait_s[0] + 1e-4)
    assert np.all(r.straggler_wait_s[1:4] > r.comm_wait_s[1:4])
    layers_on_stage = len(ctx.piece_layers[0])
    assert r.expert_tokens[0, 0] == hot[0, :, :4, 0].sum() * layers_on_stage


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
    np.testing.assert_allclose(r.a2a_wait_s, r.comm_wait_s + r.straggler_wait_s)
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


def test_memory_hungry_scenario_is_refused_up_front(tiny_dict):
    from moesim.errors import ScenarioError

    # Validation refuses it first (moesim.scenario.resources) ...
    tiny_dict["engine"] = {"memory_limit_gib": 1e-6}
    with pytest.raises(ScenarioError, match="would need about") as err:
        scenario_from_dict(tiny_dict)
    assert err.value.path == "engine.memory_limit_gib"
    # ... and the engine still guards a scenario changed after validation.
    del tiny_dict["engine"]
    valid = scenario_from_dict(tiny_dict)
    sc = valid.model_copy(
        update={"engine": valid.engine.model_copy(update={"memory_limit_gib": 1e-6})}
    )
    with pytest.raises(ScenarioError, match="needs about") as err:
        build_context(sc)
    assert err.value.path == "engine.memory_limit_gib"


def test_balanced_layer_split_evens_out_the_pieces(tiny_dict):
    """The last piece carries the output head: a balanced split gives it fewer layers, and its
    costliest piece is no costlier than the even split's."""
    d = tiny_dict
    d["model"].update(layers=12, vocab=128000, dense_layers=0)
    d["cluster"].update(nodes=4, gpus_per_node=2)
    d["parallelism"] = {"pipeline": 4, "expert": 2, "data": 1}
    d["training"]["global_batch_sequences"] = 16
    even = build_context(scenario_from_dict(d))
    d["parallelism"]["layer_split"] = "balanced"
    balanced = build_context(scenario_from_dict(d))
    assert sum(balanced.piece_layers, []) == list(range(12))
    assert len(balanced.piece_layers[-1]) < len(even.piece_layers[-1])

    def worst(ctx):
        counts, dest = _balanced(ctx)
        r = simulate_step(ctx, counts, dest)
        return (r.stage_forward_s + r.stage_backward_s).max(), r.step_time_s

    (even_piece, even_step), (bal_piece, bal_step) = worst(even), worst(balanced)
    assert bal_piece < even_piece
    assert bal_step < even_step


@pytest.mark.parametrize("collective", ["ring", "hierarchical"])
def test_data_parallel_collectives_match_their_closed_forms(tiny_dict, collective):
    """Expert-data-parallel peers on 4 nodes of 2 GPUs (PP1 × EP2 × DP4): a ring crosses the
    NICs for the whole all-reduce; the hierarchical form reduces inside each node over NVLink,
    then across nodes on half the bytes, then gathers inside again."""
    d = tiny_dict
    d["cluster"].update(nodes=4, gpus_per_node=2)
    d["parallelism"] = {
        "pipeline": 1,
        "expert": 2,
        "data": 4,
        "zero1": False,
        "dp_collective": collective,
    }
    d["training"]["global_batch_sequences"] = 16
    sc = scenario_from_dict(d)
    ctx = build_context(sc)
    r = simulate_step(ctx, *_balanced(ctx))
    nvl, nic = sc.cluster.nvlink_bytes_per_s, sc.cluster.nic.bandwidth_bytes_per_s
    lat_nvl, lat_nic = ctx.topology.nvlink_latency_s, ctx.topology.nic_latency_s

    def ring(n, nbytes, bw, lat):
        return 2 * ((n - 1) / n * nbytes / bw + (n - 1) * lat)

    dense, expert = ctx.dense_grad_bytes[0], ctx.expert_grad_bytes[0]
    if collective == "ring":
        # Dense: all 8 GPUs (NIC-bound; each ring step waits for its slowest hop, here the
        # NVLink's latency); experts: the 4 peers, one per node.
        expected = ring(8, dense, nic, max(lat_nvl, lat_nic)) + ring(4, expert, nic, lat_nic)
    else:
        expected = (
            ring(2, dense, nvl, lat_nvl)
            + ring(4, dense / 2, nic, lat_nic)
            + ring(4, expert, nic, lat_nic)  # one peer per node: nothing to do inside
        )
    assert r.allreduce_s.min() == pytest.approx(expected, rel=1e-6)


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")
def test_sooner_sums_as_numpy_does() -> None:
    """The compiled choice between two interleaved chains compares the sums NumPy's pairwise
    summation gives, to the last bit (ties and near-ties included), at any stream width."""
    rng = np.random.default_rng(3)
    for n in (1, 7, 8, 9, 64, 127, 128, 129, 136, 256, 1000, 2048):
        for _ in range(200):
            free = np.round(rng.uniform(0.0, 2.0, n), 2)
            a = np.round(rng.uniform(0.0, 2.0, n), 2)
            b = a.copy()
            b[rng.integers(n)] += rng.choice([0.0, 1e-16, 1e-12, -1e-12])  # near-ties
            for x, y in ((a, b), (b, a), (a, rng.uniform(0.0, 2.0, n))):
                want = np.maximum(free, y).sum() < np.maximum(free, x).sum()
                assert kernels.sooner(free, x, y) == want


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")
def test_compiled_step_equals_the_numpy_step(tiny_dict, monkeypatch) -> None:
    """DualPipe with node-limited dispatch (both chains of an overlapped pair, every exchange
    kind) and skewed routing: the compiled paths give the NumPy paths' step to the last bit."""
    d = tiny_dict
    d["cluster"].update(nodes=8, gpus_per_node=4)
    d["model"].update(layers=6, dense_layers=1)
    d["model"]["moe"].update(routed_experts=32, top_k=4)
    d["parallelism"] = {
        "pipeline": 2,
        "expert": 16,
        "data": 1,
        "micro_batch_size": 1,
        "schedule": "dualpipe",
        "dispatch": "node_limited",
    }
    d["router"] = {**d.get("router", {}), "node_limit": 2}
    d["training"]["global_batch_sequences"] = 16 * 8  # 8 micro-batches per pipeline
    sc = scenario_from_dict(d)
    ctx = build_context(sc)
    counts, dest = _balanced(ctx)
    rng = np.random.default_rng(1)
    counts = counts * rng.integers(1, 4, size=counts.shape)
    dest = dest * rng.integers(1, 3, size=dest.shape)
    nodes = dest.reshape(*dest.shape[:3], sc.ep_nodes, -1).max(axis=-1)
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        results.append(simulate_step(ctx, counts, dest, node_tokens=nodes))
    fast, slow = results
    assert fast.step_time_s == slow.step_time_s
    for name in ("compute_s", "a2a_wait_s", "straggler_wait_s", "pipeline_wait_s", "ops_end_s"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name), err_msg=name)
    np.testing.assert_array_equal(fast.expert_wait_s, slow.expert_wait_s)
    np.testing.assert_array_equal(fast.link_busy_s, slow.link_busy_s)
    assert fast.straggler_wait_s.sum() > 0  # the skew reaches the straggler attribution


def test_compiled_op_books_into_the_named_accumulators() -> None:
    """The compiled op addresses the accumulators by row: its rows are the step's names."""
    if not kernels.AVAILABLE:
        pytest.skip("numba is not installed")
    from moesim.engine import compiled
    from moesim.engine.step import ROW

    for name in ("expert", "comm", "straggler", "pipeline", "tp", "tp_bytes"):
        assert getattr(compiled, f"_{name.upper()}") == ROW[name], name
