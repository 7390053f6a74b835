"""Hardware stragglers in the step: a slow GPU, jitter, throttling and a degraded link."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.cluster.stragglers import HardwareState, JitterSource, Windows
from moesim.engine import build_context, simulate_step
from moesim.scenario import scenario_from_dict


def _flat(tiny_dict, nodes=1, gpus_per_node=4, expert=4, free_links=False, data=1):
    """PP1 over one expert-parallel group, MoE layers only: every layer's all-to-all makes
    the group wait for its slowest member."""
    d = tiny_dict
    if free_links:  # communication too fast and too close to matter
        d["cluster"]["nvlink"] = {"latency_us": 0.0, "bandwidth_gbytes_per_s": 1e9}
        d["cluster"]["nic"] = {"bandwidth_gbits_per_s": 8e9, "latency_us": 0.0}
    d["cluster"].update(nodes=nodes, gpus_per_node=gpus_per_node)
    d["model"].update(dense_layers=0, vocab=8, seq_len=2048)
    d["parallelism"] = {"pipeline": 1, "expert": expert, "data": data}
    d["training"]["global_batch_sequences"] = 4 * expert * data
    return build_context(scenario_from_dict(d))


def _balanced(ctx):
    sc, lay = ctx.scenario, ctx.layout
    shape = (sc.gate.layers_simulated, sc.micro_batches, lay.gpus_per_stage)
    tokens = sc.model.seq_len
    e, k = sc.model.moe.routed_experts, sc.model.moe.top_k
    counts = np.full((*shape, e), tokens * k // e, dtype=np.int64)
    dest = np.full((*shape, lay.expert), tokens // 2, dtype=np.int64)
    return counts, dest


def _state(gpus, speed=None, nic=None, throttle=None):
    ones = np.ones(gpus)
    empty = Windows.empty(gpus)
    return HardwareState(
        ones if speed is None else speed,
        ones if nic is None else nic,
        ones,
        empty if throttle is None else throttle,
        empty,
        empty,
    )


def test_one_slow_gpu_on_the_critical_path_adds_its_extra_compute(tiny_dict):
    """In an expert-parallel group every layer waits for its slowest member, so with free
    communication slowing GPU 0 by s lengthens the step by (s − 1) × GPU 0's compute (closed
    form, within 2%). With real links part of the extra compute hides in all-to-all waits."""
    ctx = _flat(tiny_dict, free_links=True)
    counts, dest = _balanced(ctx)
    base = simulate_step(ctx, counts, dest)
    s = 1.5
    speed = np.ones(4)
    speed[0] = s
    slow = simulate_step(ctx, counts, dest, hardware=_state(4, speed=speed))
    predicted = (s - 1) * (base.compute_s[0] + base.optimizer_s[0])
    assert slow.step_time_s - base.step_time_s == pytest.approx(predicted, rel=0.02)
    assert slow.slowdown_s[0] == pytest.approx(predicted, rel=1e-9)
    assert np.all(slow.slowdown_s[1:] == 0)
    # The others wait for it: their straggler wait grows by about what GPU 0 lost.
    assert np.all(slow.straggler_wait_s[1:] > base.straggler_wait_s[1:] + 0.5 * predicted)
    np.testing.assert_allclose(slow.gpu_time_s, slow.step_time_s, rtol=1e-12)


def test_throttling_window_over_the_whole_step_equals_a_slow_gpu(tiny_dict):
    ctx = _flat(tiny_dict)
    counts, dest = _balanced(ctx)
    speed = np.ones(4)
    speed[2] = 2.0
    slow = simulate_step(ctx, counts, dest, hardware=_state(4, speed=speed))
    window = Windows(4, [2], [0.0], [1e6], [2.0])
    throttled = simulate_step(ctx, counts, dest, hardware=_state(4, throttle=window))
    assert throttled.step_time_s == pytest.approx(slow.step_time_s, rel=1e-9)


def test_jitter_is_seeded_and_slows_synchronised_steps(tiny_dict):
    ctx = _flat(tiny_dict)
    counts, dest = _balanced(ctx)
    base = simulate_step(ctx, counts, dest)

    def jittered(seed):
        return simulate_step(
            ctx, counts, dest, jitter=JitterSource(0.2, np.random.default_rng(seed))
        )

    a, b = jittered(1), jittered(1)
    assert a.step_time_s == b.step_time_s
    # Mean-one noise leaves each GPU's compute about where it was, but every synchronisation
    # waits for the slowest draw: the step gets longer.
    assert abs(a.slowdown_s.sum()) < 0.1 * a.compute_s.sum()
    assert a.step_time_s > base.step_time_s


def test_a_degraded_nic_slows_the_inter_node_exchanges(tiny_dict):
    ctx = _flat(tiny_dict, nodes=2, gpus_per_node=2, expert=4)
    counts, dest = _balanced(ctx)
    base = simulate_step(ctx, counts, dest)
    nic = np.ones(4)
    nic[3] = 0.25
    slow = simulate_step(ctx, counts, dest, hardware=_state(4, nic=nic))
    assert slow.step_time_s > base.step_time_s
    assert slow.comm_wait_s.sum() > base.comm_wait_s.sum()
    assert np.all(slow.slowdown_s == 0)  # links, not compute


def test_a_degraded_nic_leaves_intra_node_all_to_alls_alone(tiny_dict):
    """EP4 inside one node: its all-to-alls ride NVLink, so a half-rate NIC changes nothing
    in them (it would only slow traffic that leaves the node)."""
    ctx = _flat(tiny_dict, nodes=2, gpus_per_node=4, expert=4, data=2)  # an EP group per node
    counts, dest = _balanced(ctx)
    base = simulate_step(ctx, counts, dest)
    nic = np.ones(8)
    nic[1] = 0.5
    slow = simulate_step(ctx, counts, dest, hardware=_state(8, nic=nic))
    np.testing.assert_allclose(slow.comm_wait_s, base.comm_wait_s, rtol=1e-12)
    # The dense gradients' ring spans both nodes and crosses GPU 1's NIC: it slows.
    assert slow.allreduce_s.max() > base.allreduce_s.max()
