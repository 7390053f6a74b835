"""Routing samples with capacity and token dropping, the layer map, and the sample metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moesim.gate.router import RouterState, capacity_spec, route, route_options
from moesim.gate.sample import RoutingSample
from moesim.gate.sampling import (
    balanced_sample,
    expected_distinct,
    gate_layer_map,
    gate_layer_of,
    routing_sample,
)
from moesim.gate.stream import TokenStream

METRICS = {
    "maxvio_batch",
    "maxvio_micro",
    "maxvio_compute_batch",
    "cv_batch",
    "rank_maxvio_micro",
    "dead_experts",
    "dropped_fraction",
    "nodes_per_token",
}


def _routers(scenario, rng: np.random.Generator, std: float = 1.0) -> list[RouterState]:  # type: ignore[no-untyped-def]
    states = []
    for _ in range(scenario.gate.layers_simulated):
        state = RouterState.initial(
            scenario.model.moe.routed_experts, scenario.stream.dim, std, rng
        )
        state.bias[:] = np.linspace(0.3, -0.3, state.n_experts).astype(np.float32)
        states.append(state)
    return states


def _sample(scenario, seed: int = 0, n_src: int = 8, n_dest: int = 8) -> RoutingSample:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    stream = TokenStream(scenario.stream, rng)
    return routing_sample(scenario, _routers(scenario, rng), stream, 3, n_src, n_dest, rng)


@pytest.fixture
def capped(make_scenario):  # type: ignore[no-untyped-def]
    """16 experts top-4, 2 sequences of 128 tokens (32 routed) per cell, capacity 1.0."""
    return make_scenario(
        model={"seq_len": 128, "moe": {"top_k": 4}},
        parallelism={"micro_batch_size": 2},
        gate={"routed_tokens_per_sequence": 32, "layers_simulated": 2},
        stream={"dim": 16},
        router={"capacity": {"factor": 1.0}},
    )


def test_capacity_sample_conserves_and_respects_budgets(capped) -> None:  # type: ignore[no-untyped-def]
    sample = _sample(capped)
    tokens = capped.parallelism.micro_batch_size * capped.model.seq_len
    k = capped.model.moe.top_k
    assert sample.dropped.shape == sample.counts.shape[:3]
    assert sample.dropped.dtype == np.int64
    np.testing.assert_array_equal(sample.counts.sum(axis=3) + sample.dropped, k * tokens)
    assert sample.dropped.sum() > 0
    budget = capacity_spec(capped).budget(tokens, k, 16)  # type: ignore[union-attr]
    assert sample.counts.max() <= budget
    assert sample.metrics["dropped_fraction"] == pytest.approx(
        sample.dropped.sum() / (k * tokens * sample.dropped.size)
    )
    # Dispatch counts only kept assignments: bounds as for a dropless sample.
    per_rank = sample.counts.reshape(*sample.counts.shape[:3], 8, 2).sum(axis=4)
    assert (sample.dest_tokens <= per_rank).all()
    assert (sample.dest_tokens * 2 >= per_rank).all()
    assert (sample.dest_tokens <= tokens).all()


def test_dropless_sample_has_no_drops(make_scenario) -> None:  # type: ignore[no-untyped-def]
    scenario = make_scenario(
        model={"seq_len": 64}, gate={"routed_tokens_per_sequence": 16}, stream={"dim": 16}
    )
    sample = _sample(scenario)
    assert not sample.dropped.any()
    assert sample.metrics["dropped_fraction"] == 0.0
    assert set(sample.metrics) == METRICS


def test_capacity_sample_matches_route_when_every_token_is_routed(make_scenario) -> None:  # type: ignore[no-untyped-def]
    """With R = S (unit weights) the sample's drops are exactly route()'s, one call per cell."""
    scenario = make_scenario(
        model={"seq_len": 32, "moe": {"top_k": 2}},
        parallelism={"micro_batch_size": 2},
        gate={"routed_tokens_per_sequence": 32, "layers_simulated": 1},
        stream={"dim": 16},
        router={"capacity": {"factor": 1.0, "policy": "position", "exempt_fraction": 0.25}},
    )
    rng = np.random.default_rng(3)
    stream = TokenStream(scenario.stream, rng)
    states = _routers(scenario, rng)
    draw = np.random.default_rng(11)
    sample = routing_sample(scenario, states, stream, 0, 8, 8, draw)

    replay = np.random.default_rng(11)
    n_cells = scenario.micro_batches * 8
    tokens, _ = stream.sample(n_cells * 2, 32, replay, sequences_per_micro_batch=2)
    x = tokens.reshape(-1, 16)
    routing = route(
        x, states[0], **route_options(scenario), segments=n_cells, tokens_per_sequence=32
    )
    cell = np.repeat(np.arange(n_cells), 64)
    kept_pairs = ((cell * 16)[:, None] + routing.selected)[~routing.dropped]
    expected = np.bincount(kept_pairs, minlength=n_cells * 16).reshape(-1, 8, 16)
    np.testing.assert_array_equal(sample.counts[0], expected)
    lost = np.bincount(cell, weights=routing.dropped.sum(axis=1), minlength=n_cells)
    np.testing.assert_array_equal(sample.dropped[0].ravel(), lost)


def test_exempt_sequences_in_samples(capped) -> None:  # type: ignore[no-untyped-def]
    """Exempting every sequence drops nothing; exempting some drops less."""
    none = _sample(capped).dropped.sum()
    router = capped.router.model_copy(
        update={"capacity": capped.router.capacity.model_copy(update={"exempt_fraction": 0.5})}
    )
    half = _sample(capped.model_copy(update={"router": router})).dropped.sum()
    router_all = capped.router.model_copy(
        update={"capacity": capped.router.capacity.model_copy(update={"exempt_fraction": 1.0})}
    )
    assert _sample(capped.model_copy(update={"router": router_all})).dropped.sum() == 0
    assert 0 < half < none


def test_compute_batch_is_the_ep_group(make_scenario) -> None:  # type: ignore[no-untyped-def]
    scenario = make_scenario(
        model={"seq_len": 64}, gate={"routed_tokens_per_sequence": 16}, stream={"dim": 16}
    )
    one_group = _sample(scenario, n_src=8, n_dest=8)
    assert one_group.metrics["maxvio_compute_batch"] == pytest.approx(
        one_group.metrics["maxvio_micro"]
    )
    two_groups = _sample(scenario, n_src=16, n_dest=8)
    # Half the sequences per computation batch: more imbalance than the whole stage's.
    assert two_groups.metrics["maxvio_compute_batch"] > two_groups.metrics["maxvio_micro"]


def test_nodes_per_token(make_scenario) -> None:  # type: ignore[no-untyped-def]
    common = {
        "cluster": {"nodes": 2},
        "parallelism": {"expert": 16},
        "training": {"global_batch_sequences": 32},
        "model": {"seq_len": 64, "moe": {"top_k": 4}},
        "gate": {"routed_tokens_per_sequence": 64},
        "stream": {"dim": 16},
    }
    limited = _sample(make_scenario(**common, router={"node_limit": 1}), n_src=16, n_dest=16)
    assert limited.metrics["nodes_per_token"] == pytest.approx(1.0)
    free = _sample(make_scenario(**common), n_src=16, n_dest=16)
    assert 1.0 < free.metrics["nodes_per_token"] <= 2.0
    single = _sample(
        make_scenario(
            model={"seq_len": 64}, stream={"dim": 16}, gate={"routed_tokens_per_sequence": 16}
        )
    )
    assert single.metrics["nodes_per_token"] == 1.0
    capped = make_scenario(**common, router={"capacity": {"factor": 0.5}})
    dropped = _sample(capped, n_src=16, n_dest=16)
    assert dropped.metrics["nodes_per_token"] < free.metrics["nodes_per_token"]


def test_domain_packing_unbalances_micro_batches(make_scenario) -> None:  # type: ignore[no-untyped-def]
    base = {
        "model": {"seq_len": 64},
        "gate": {"routed_tokens_per_sequence": 64, "layers_simulated": 1},
        "parallelism": {"micro_batch_size": 4},
        "training": {"global_batch_sequences": 128},
    }
    mixed = _sample(make_scenario(**base, stream={"dim": 16, "topics": 16}), seed=2)
    packed = _sample(
        make_scenario(
            **base, stream={"dim": 16, "topics": 16, "packing": "domain", "domain_share": 1.0}
        ),
        seed=2,
    )
    per_rank_mixed = mixed.counts.max(axis=3) / mixed.counts.mean(axis=3)
    per_rank_packed = packed.counts.max(axis=3) / packed.counts.mean(axis=3)
    assert per_rank_packed.mean() > per_rank_mixed.mean() + 0.3


def test_layer_map(make_scenario) -> None:  # type: ignore[no-untyped-def]
    scenario = make_scenario(model={"layers": 11, "dense_layers": 1}, gate={"layers_simulated": 3})
    assert [gate_layer_of(scenario, i) for i in range(10)] == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    blocks = make_scenario(
        model={"layers": 11, "dense_layers": 1},
        gate={"layers_simulated": 3, "layer_map": "blocks"},
    )
    np.testing.assert_array_equal(gate_layer_map(blocks), [0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match="moe_layer_index"):
        gate_layer_of(scenario, 10)
    with pytest.raises(ValueError, match="moe_layer_index"):
        gate_layer_of(scenario, -1)


def test_balanced_sample_metrics(make_scenario) -> None:  # type: ignore[no-untyped-def]
    scenario = make_scenario(
        cluster={"nodes": 2},
        parallelism={"expert": 16},
        training={"global_batch_sequences": 32},
        model={"moe": {"top_k": 4}},
    )
    sample = balanced_sample(scenario, 0, 16, 16)
    assert set(sample.metrics) == METRICS
    assert not sample.dropped.any()
    miss = math.comb(8, 4) / math.comb(16, 4)
    assert sample.metrics["nodes_per_token"] == pytest.approx(2 * (1 - miss))
    assert sample.metrics["maxvio_compute_batch"] == 0.0


def test_expected_distinct_is_exact_when_balanced() -> None:
    """The generalised formula reproduces C(E − g, k)/C(E, k) for balanced loads."""
    for n_experts, top_k, ranks in [(16, 4, 8), (256, 8, 8), (64, 6, 16)]:
        tokens = 1000
        share = top_k * tokens / ranks
        miss = math.comb(n_experts - n_experts // ranks, top_k) / math.comb(n_experts, top_k)
        assert float(expected_distinct(share, tokens, n_experts, top_k)) == pytest.approx(
            tokens * (1 - miss)
        )
    grows = expected_distinct(np.array([100.0, 400.0, 1600.0]), 1000.0, 16, 4)
    assert (np.diff(grows) > 0).all()
    assert grows[-1] <= 1000.0
