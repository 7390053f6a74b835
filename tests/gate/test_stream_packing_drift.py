"""Domain-packed micro-batches and data-mix drift of the synthetic token stream."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.gate.stream import TokenStream
from moesim.scenario.routing import Stream


def _dominant(topics: np.ndarray, n_topics: int) -> np.ndarray:
    counts = np.stack([np.bincount(row, minlength=n_topics) for row in topics])
    return counts.argmax(axis=1)


def test_domain_packing_gives_micro_batches_one_dominant_topic(rng: np.random.Generator) -> None:
    params = Stream(topics=16, packing="domain", domain_share=0.9, concentration=1.0)
    stream = TokenStream(params, rng)
    _, topics = stream.sample(200, 128, rng, sequences_per_micro_batch=4)
    dominant = _dominant(topics, 16).reshape(50, 4)
    # Every sequence of a micro-batch shares its dominant topic, which holds ~90% of its tokens.
    assert (dominant == dominant[:, :1]).mean() > 0.98
    share = (topics == np.repeat(dominant[:, 0], 4)[:, None]).mean(axis=1)
    # 0.9 from the packing plus the dominant topic's part of the remaining Dirichlet mixture.
    assert 0.88 < share.mean() < 0.97
    # Micro-batches differ from one another; the dominant topics follow the popularity.
    assert np.unique(dominant[:, 0]).size > 3
    freq = np.bincount(dominant[:, 0], minlength=16) / 50
    assert freq[0] > freq[8:].max()


def test_mixed_packing_is_unchanged_and_homogeneity_needs_packing(
    rng: np.random.Generator,
) -> None:
    """``packing: mixed`` ignores the micro-batch size and draws exactly as before (the same
    generator calls); with domain packing sequences of a micro-batch agree far more often."""
    mixed = Stream(topics=16, concentration=1.0)
    a = TokenStream(mixed, np.random.default_rng(5))
    ta, ia = a.sample(40, 32, np.random.default_rng(6))
    tb, ib = a.sample(40, 32, np.random.default_rng(6), sequences_per_micro_batch=4)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(ta, tb)

    def agreement(params: Stream) -> float:
        stream = TokenStream(params, rng)
        _, topics = stream.sample(400, 64, rng, sequences_per_micro_batch=4)
        dominant = _dominant(topics, 16).reshape(100, 4)
        return float((dominant == dominant[:, :1]).mean())

    assert agreement(mixed.model_copy(update={"packing": "domain"})) > agreement(mixed) + 0.3


def test_domain_share_one_gives_single_topic_micro_batches(rng: np.random.Generator) -> None:
    stream = TokenStream(Stream(topics=8, packing="domain", domain_share=1.0), rng)
    _, topics = stream.sample(12, 50, rng, sequences_per_micro_batch=3)
    per_batch = topics.reshape(4, 3 * 50)
    assert (per_batch == per_batch[:, :1]).all()
    with pytest.raises(ValueError, match="sequences_per_micro_batch"):
        stream.sample(2, 5, rng, sequences_per_micro_batch=0)


def test_drift_rotates_the_popularity(rng: np.random.Generator) -> None:
    params = Stream(topics=8, zipf_exponent=1.2, drift_tokens=1000.0)
    stream = TokenStream(params, rng)
    np.testing.assert_array_equal(stream.popularity_at(0), stream.popularity)
    np.testing.assert_allclose(stream.popularity_at(1000), np.roll(stream.popularity, 1))
    np.testing.assert_allclose(stream.popularity_at(3000), np.roll(stream.popularity, 3))
    np.testing.assert_allclose(stream.popularity_at(8000), stream.popularity)  # a full turn
    half = stream.popularity_at(1500)
    np.testing.assert_allclose(
        half, 0.5 * np.roll(stream.popularity, 1) + 0.5 * np.roll(stream.popularity, 2)
    )
    assert half.sum() == pytest.approx(1.0)
    assert int(np.argmax(stream.popularity_at(2000))) == 2
    # The sampled topics follow the drifted popularity.
    _, topics = stream.sample(3000, 16, rng, tokens_trained=2000.0)
    freq = np.bincount(topics.ravel(), minlength=8) / topics.size
    np.testing.assert_allclose(freq, stream.popularity_at(2000), atol=0.03)


def test_no_drift_means_a_fixed_mix(rng: np.random.Generator) -> None:
    stream = TokenStream(Stream(topics=8), rng)
    assert stream.popularity_at(1e12) is stream.popularity
    a = stream.sample(5, 7, np.random.default_rng(1), tokens_trained=1e12)
    b = stream.sample(5, 7, np.random.default_rng(1))
    np.testing.assert_array_equal(a[1], b[1])
