"""Routing samples for the engine: conservation, dispatch bounds, the balanced reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moesim.gate.router import RouterState
from moesim.gate.sample import RoutingSample
from moesim.gate.sampling import balanced_sample, bootstrap_weights, routing_sample
from moesim.gate.stream import TokenStream


def _routers(scenario, rng: np.random.Generator, std: float = 1.0) -> list[RouterState]:  # type: ignore[no-untyped-def]
    return [
        RouterState.initial(scenario.model.moe.routed_experts, scenario.stream.dim, std, rng)
        for _ in range(scenario.gate.layers_simulated)
    ]


@pytest.fixture
def small(make_scenario):  # type: ignore[no-untyped-def]
    """16 experts top-4, seq_len 128 of which 32 routed, 2 sequences per micro-batch."""
    return make_scenario(
        model={"seq_len": 128, "moe": {"top_k": 4}},
        parallelism={"micro_batch_size": 2},
        gate={"routed_tokens_per_sequence": 32, "layers_simulated": 3},
        stream={"dim": 16},
    )


def _sample(scenario, rng: np.random.Generator, n_src: int = 8, n_dest: int = 8) -> RoutingSample:  # type: ignore[no-untyped-def]
    stream = TokenStream(scenario.stream, rng)
    return routing_sample(scenario, _routers(scenario, rng), stream, 5, n_src, n_dest, rng)


def test_counts_are_conserved(small, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
    sample = _sample(small, rng)
    tokens = small.parallelism.micro_batch_size * small.model.seq_len
    assert sample.counts.shape == (3, small.micro_batches, 8, 16)
    assert sample.counts.dtype == sample.dest_tokens.dtype == np.int64
    assert (sample.counts.sum(axis=3) == small.model.moe.top_k * tokens).all()
    assert (sample.counts >= 0).all()
    assert sample.step == 5


@pytest.mark.parametrize("n_dest", [1, 2, 4, 8, 16])
def test_dest_tokens_bounds(small, rng: np.random.Generator, n_dest: int) -> None:  # type: ignore[no-untyped-def]
    sample = _sample(small, rng, n_src=3, n_dest=n_dest)
    tokens = small.parallelism.micro_batch_size * small.model.seq_len
    k = small.model.moe.top_k
    per_rank = 16 // n_dest
    dest = sample.dest_tokens
    assert dest.shape == (3, small.micro_batches, 3, n_dest)
    assert (dest >= 0).all()
    assert (dest <= tokens).all()
    # Every token reaches at least ceil(k / experts per rank) and at most min(k, n_dest) ranks.
    total = dest.sum(axis=3)
    assert (total >= tokens * math.ceil(k / per_rank)).all()
    assert (total <= tokens * min(k, n_dest)).all()
    # A rank receives at most one copy per assignment and at least 1/min(k, per_rank) of them.
    assignments = sample.counts.reshape(*sample.counts.shape[:3], n_dest, per_rank).sum(axis=4)
    assert (dest <= assignments).all()
    assert (dest * min(k, per_rank) >= assignments).all()
    if n_dest == 1:
        assert (dest[..., 0] == tokens).all()


def test_all_tokens_routed_means_unit_weights(make_scenario, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
    weights = bootstrap_weights(5, 32, 32, rng)
    assert (weights == 1).all()
    weights = bootstrap_weights(5, 32, 100, rng)
    assert weights.shape == (5, 32)
    assert (weights.sum(axis=1) == 100).all()
    assert (weights >= 1).all()
    with pytest.raises(ValueError, match="exceed"):
        bootstrap_weights(1, 10, 5, rng)


def test_sample_is_reproducible(small) -> None:  # type: ignore[no-untyped-def]
    a = _sample(small, np.random.default_rng(4))
    b = _sample(small, np.random.default_rng(4))
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.dest_tokens, b.dest_tokens)
    assert a.metrics == b.metrics


def test_sample_metrics(small, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
    sample = _sample(small, rng)
    assert {"maxvio_batch", "maxvio_micro"} <= set(sample.metrics)
    from moesim.gate.metrics import max_vio

    per_layer = sample.counts.sum(axis=(1, 2))
    assert sample.metrics["maxvio_batch"] == pytest.approx(float(max_vio(per_layer).mean()))
    per_micro = sample.counts.sum(axis=2)
    assert sample.metrics["maxvio_micro"] == pytest.approx(float(max_vio(per_micro).mean()))
    # A random router on topic-clustered tokens is visibly imbalanced.
    assert sample.metrics["maxvio_batch"] > 0.1


def test_node_limited_sample_reaches_one_node(make_scenario, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
    scenario = make_scenario(
        cluster={"nodes": 2},
        parallelism={"expert": 16},
        training={"global_batch_sequences": 32},
        model={"seq_len": 64, "moe": {"top_k": 4}},
        gate={"routed_tokens_per_sequence": 64},
        router={"node_limit": 1},
        stream={"dim": 16},
    )
    sample = _sample(scenario, rng, n_src=16, n_dest=16)
    tokens = scenario.model.seq_len
    per_node = sample.dest_tokens.reshape(*sample.dest_tokens.shape[:3], 2, 8)
    # Each token's experts sit on one node: its ranks there, none on the other.
    assert (per_node.sum(axis=(3, 4)) <= tokens * 4).all()
    node_tokens = sample.counts.reshape(*sample.counts.shape[:3], 2, 8).sum(axis=4)
    assert (node_tokens.sum(axis=3) == 4 * tokens).all()
    assert (node_tokens % 4 == 0).all()  # every token puts all 4 assignments on one node


def test_balanced_sample(small) -> None:  # type: ignore[no-untyped-def]
    sample = balanced_sample(small, 3, 8, 8)
    tokens = small.parallelism.micro_batch_size * small.model.seq_len
    assert sample.metrics["maxvio_batch"] == 0.0
    assert sample.metrics["maxvio_micro"] == 0.0
    assert sample.counts.shape == (3, small.micro_batches, 8, 16)
    assert (sample.counts.sum(axis=3) == 4 * tokens).all()
    assert np.ptp(sample.counts, axis=3).max() <= 1
    # 16 experts on 8 ranks, top-4: a rank is missed with probability C(14,4)/C(16,4).
    expected = round(tokens * (1 - math.comb(14, 4) / math.comb(16, 4)))
    assert (sample.dest_tokens == expected).all()
    assert balanced_sample(small, 0, 2, 1).dest_tokens.max() == tokens


def test_balanced_sample_remainder_and_big_numbers(make_scenario) -> None:  # type: ignore[no-untyped-def]
    scenario = make_scenario(
        model={"seq_len": 4099, "moe": {"routed_experts": 256, "top_k": 8}},
    )
    sample = balanced_sample(scenario, 0, 8, 8)
    assert (sample.counts.sum(axis=3) == 8 * 4099).all()
    assert np.ptp(sample.counts, axis=3).max() == 1
    miss = math.comb(224, 8) / math.comb(256, 8)
    assert (sample.dest_tokens == round(4099 * (1 - miss))).all()


def test_bad_rank_counts(small, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="n_dest"):
        balanced_sample(small, 0, 8, 3)
    stream = TokenStream(small.stream, rng)
    with pytest.raises(ValueError, match="states"):
        routing_sample(small, _routers(small, rng)[:1], stream, 0, 8, 8, rng)
