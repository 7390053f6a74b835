"""Per-node dispatch volumes of routing samples (``RoutingSample.node_tokens``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moesim.gate.router import RouterState, route, route_options
from moesim.gate.sample import RoutingSample
from moesim.gate.sampling import balanced_sample, routing_sample
from moesim.gate.stream import TokenStream
from moesim.gate.trace import trace_samples

# Two 8-GPU nodes, one expert-parallel group of 16 ranks, 16 experts top-4: 8 experts per node.
TWO_NODES = {
    "cluster": {"nodes": 2},
    "parallelism": {"expert": 16},
    "training": {"global_batch_sequences": 32},
    "model": {"seq_len": 64, "moe": {"top_k": 4}},
    "stream": {"dim": 16},
}


def _routers(scenario, rng: np.random.Generator) -> list[RouterState]:
    states = []
    for _ in range(scenario.gate.layers_simulated):
        state = RouterState.initial(
            scenario.model.moe.routed_experts, scenario.stream.dim, 1.0, rng
        )
        state.bias[:] = np.linspace(0.2, -0.2, state.n_experts).astype(np.float32)
        states.append(state)
    return states


def _sample(scenario, seed: int = 0) -> tuple[RoutingSample, list[RouterState], TokenStream]:
    rng = np.random.default_rng(seed)
    stream = TokenStream(scenario.stream, rng)
    states = _routers(scenario, rng)
    sample = routing_sample(scenario, states, stream, 0, 16, 16, np.random.default_rng(seed + 1))
    return sample, states, stream


def _check_bounds(sample: RoutingSample, tokens: int, top_k: int) -> None:
    """The hard bounds every node_tokens array obeys (n_dest a multiple of the nodes)."""
    n_nodes, n_dest = sample.n_nodes, sample.n_dest
    node = sample.node_tokens
    assert node.dtype == np.int64
    assert node.shape == (*sample.counts.shape[:3], n_nodes)
    assert (node >= 0).all()
    assert (node <= tokens).all()
    ranks = sample.dest_tokens.reshape(*node.shape, n_dest // n_nodes)
    assert (node >= ranks.max(axis=4)).all()  # every token one of its ranks gets
    assert (node <= ranks.sum(axis=4)).all()  # no token unless through a rank
    per_node = sample.n_experts // n_nodes
    load = sample.counts.reshape(*node.shape, per_node).sum(axis=4)
    assert (node <= load).all()
    assert (node * min(top_k, per_node) >= load).all()
    # Over nodes: at least the tokens the busiest rank gets, at most what the ranks get together.
    assert (node.sum(axis=3) >= sample.dest_tokens.max(axis=3)).all()
    assert (node.sum(axis=3) <= sample.dest_tokens.sum(axis=3)).all()


@pytest.mark.parametrize("router", [{}, {"capacity": {"factor": 0.75}}, {"node_limit": 1}])
def test_routed_node_tokens_bounds(make_scenario, router) -> None:
    scenario = make_scenario(
        **TWO_NODES, gate={"routed_tokens_per_sequence": 16, "layers_simulated": 2}, router=router
    )
    sample, _, _ = _sample(scenario)
    tokens, top_k = scenario.model.seq_len, scenario.model.moe.top_k
    assert sample.n_nodes == scenario.ep_nodes == 2
    _check_bounds(sample, tokens, top_k)
    node_sum = sample.node_tokens.sum(axis=3)
    if "capacity" in router:
        assert sample.dropped.sum() > 0
        assert (node_sum <= tokens * 2).all()
    else:
        # Dropless: every token reaches at least one node; with node_limit 1 exactly one.
        assert (node_sum >= tokens).all()
        if "node_limit" in router:
            assert (node_sum == tokens).all()
        else:
            assert (node_sum > tokens).any()
    routed_tokens = scenario.micro_batches * sample.n_src * tokens
    mean_nodes = sample.node_tokens.sum(axis=(1, 2, 3)).mean() / routed_tokens
    assert sample.metrics["nodes_per_token"] == pytest.approx(mean_nodes)


@pytest.mark.parametrize("capacity", [None, {"factor": 0.75, "policy": "probs"}])
def test_node_tokens_match_a_brute_force_count(make_scenario, capacity) -> None:
    """With R = S (unit weights), count each token's kept nodes one by one from route()."""
    router = {} if capacity is None else {"capacity": capacity}
    scenario = make_scenario(
        **TWO_NODES, gate={"routed_tokens_per_sequence": 64, "layers_simulated": 1}, router=router
    )
    sample, states, stream = _sample(scenario, seed=5)
    replay = np.random.default_rng(6)
    n_cells = scenario.micro_batches * 16
    seq_len = scenario.model.seq_len
    tokens, _ = stream.sample(n_cells, seq_len, replay, sequences_per_micro_batch=1)
    routing = route(
        tokens.reshape(-1, 16),
        states[0],
        **route_options(scenario),
        segments=n_cells,
        tokens_per_sequence=seq_len,
    )
    expected = np.zeros((n_cells, 2), dtype=np.int64)
    expected_ranks = np.zeros((n_cells, 16), dtype=np.int64)
    for t in range(routing.n_tokens):
        kept = routing.selected[t][~routing.dropped[t]].tolist()
        for node in {e // 8 for e in kept}:
            expected[t // seq_len, node] += 1
        for rank in set(kept):  # one expert per rank here
            expected_ranks[t // seq_len, rank] += 1
    if capacity is not None:
        assert routing.dropped.any()
    np.testing.assert_array_equal(sample.dest_tokens[0].reshape(n_cells, 16), expected_ranks)
    np.testing.assert_array_equal(sample.node_tokens[0].reshape(n_cells, 2), expected)


def test_one_node_counts_the_tokens_with_a_kept_assignment(make_scenario) -> None:
    scenario = make_scenario(
        model={"seq_len": 64}, stream={"dim": 16}, gate={"routed_tokens_per_sequence": 16}
    )
    rng = np.random.default_rng(0)
    stream = TokenStream(scenario.stream, rng)
    sample = routing_sample(scenario, _routers(scenario, rng), stream, 0, 8, 8, rng)
    assert sample.n_nodes == 1
    assert (sample.node_tokens[..., 0] == 64).all()


def test_balanced_node_tokens(make_scenario) -> None:
    scenario = make_scenario(**TWO_NODES, gate={"routed_tokens_per_sequence": 64})
    sample = balanced_sample(scenario, 0, 16, 16)
    miss = math.comb(8, 4) / math.comb(16, 4)
    assert (sample.node_tokens == round(64 * (1 - miss))).all()
    assert sample.node_tokens.shape == (*sample.counts.shape[:3], 2)
    _check_bounds(sample, 64, 4)
    one = balanced_sample(
        make_scenario(model={"seq_len": 64}, gate={"routed_tokens_per_sequence": 64}), 0, 8, 8
    )
    assert one.n_nodes == 1
    assert (one.node_tokens == 64).all()


@pytest.mark.parametrize("split", ["multinomial", "even"])
def test_trace_node_tokens(make_scenario, tmp_path: Path, split: str) -> None:
    loads = np.random.default_rng(1).integers(200, 3000, 16)
    rows = [(0, 0, e, int(loads[e])) for e in range(16)]
    pd.DataFrame(rows, columns=["step", "layer", "expert", "tokens"]).to_csv(
        tmp_path / "t.csv", index=False
    )
    scenario = make_scenario(
        **TWO_NODES,
        gate={
            "layers_simulated": 1,
            "routed_tokens_per_sequence": 64,
            "trace": {"path": str(tmp_path / "t.csv"), "split": split},
        },
    )
    rng = np.random.default_rng(0)
    sample = trace_samples(scenario, [0], 16, 16, rng)[0]
    _check_bounds(sample, 64, 4)
    assert sample.node_tokens.sum() > 0
    # The split decides how an expert's load spreads over (micro-batch, source rank) cells:
    # evenly (within one token) or at random.
    spread = np.ptp(sample.counts, axis=(1, 2)).max()
    assert spread <= 1 if split == "even" else spread > 1


def test_balanced_trace_reproduces_the_balanced_node_tokens(make_scenario, tmp_path: Path) -> None:
    rows = [(0, 0, e, 1000) for e in range(16)]
    pd.DataFrame(rows, columns=["step", "layer", "expert", "tokens"]).to_csv(
        tmp_path / "flat.csv", index=False
    )
    scenario = make_scenario(
        **TWO_NODES,
        gate={
            "layers_simulated": 1,
            "routed_tokens_per_sequence": 64,
            "trace": {"path": str(tmp_path / "flat.csv"), "split": "even"},
        },
    )
    sample = trace_samples(scenario, [0], 16, 16, np.random.default_rng(0))[0]
    reference = balanced_sample(scenario, 0, 16, 16)
    np.testing.assert_array_equal(sample.node_tokens, reference.node_tokens)


def test_default_node_tokens_are_the_ranks() -> None:
    counts = np.full((1, 1, 2, 4), 3, dtype=np.int64)
    dest = np.full((1, 1, 2, 2), 5, dtype=np.int64)
    sample = RoutingSample(step=0, counts=counts, dest_tokens=dest, metrics={})
    assert sample.n_nodes == 2
    np.testing.assert_array_equal(sample.node_tokens, dest)
    one = RoutingSample(step=0, counts=counts, dest_tokens=dest[..., :1], metrics={})
    assert one.n_nodes == 1
    with pytest.raises(ValueError, match="node_tokens"):
        RoutingSample(
            step=0, counts=counts, dest_tokens=dest, metrics={}, node_tokens=dest[:, :, :1]
        )
    with pytest.raises(ValueError, match="node_tokens"):
        RoutingSample(
            step=0,
            counts=counts,
            dest_tokens=dest,
            metrics={},
            node_tokens=np.zeros((1, 1, 2, 3), dtype=np.int64),
        )
