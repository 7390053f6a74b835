"""The synthetic token stream: geometry, Zipf popularity, topic mixtures and noise."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.gate.stream import TokenStream
from moesim.scenario.routing import Stream


def test_shapes_dtypes_and_geometry(rng: np.random.Generator) -> None:
    seed = int(rng.integers(1 << 30))
    plain = TokenStream(Stream(topics=12, dim=20, common=0.0), np.random.default_rng(seed))
    stream = TokenStream(Stream(topics=12, dim=20), np.random.default_rng(seed))
    assert stream.topics.shape == (12, 20)
    assert stream.topics.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(plain.topics, axis=1), 1.0, rtol=1e-6)
    # The default adds one common direction of norm 1 to the same unit centroids.
    shift = stream.topics - plain.topics
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-6)
    assert np.linalg.norm(shift[0]) == pytest.approx(1.0, rel=1e-5)
    assert np.isclose(stream.popularity.sum(), 1.0)
    assert (np.diff(stream.popularity) < 0).all()
    tokens, topics = stream.sample(7, 11, rng)
    assert tokens.shape == (7, 11, 20)
    assert tokens.dtype == np.float32
    assert topics.shape == (7, 11)
    assert topics.min() >= 0
    assert topics.max() < 12


def test_topic_frequencies_follow_popularity(rng: np.random.Generator) -> None:
    params = Stream(topics=8, zipf_exponent=1.2, concentration=1.0)
    stream = TokenStream(params, rng)
    _, topics = stream.sample(4000, 16, rng)
    freq = np.bincount(topics.ravel(), minlength=8) / topics.size
    np.testing.assert_allclose(freq, stream.popularity, atol=0.02)


def test_small_concentration_gives_one_dominant_topic(rng: np.random.Generator) -> None:
    def dominant_share(concentration: float) -> float:
        stream = TokenStream(Stream(topics=16, concentration=concentration), rng)
        _, topics = stream.sample(300, 64, rng)
        counts = np.stack([np.bincount(row, minlength=16) for row in topics])
        return float((counts.max(axis=1) / 64).mean())

    peaked, default, flat = dominant_share(0.01), dominant_share(0.3), dominant_share(20.0)
    assert peaked > 0.85
    assert flat < 0.5
    assert flat < default < peaked


def test_noise_level(rng: np.random.Generator) -> None:
    params = Stream(topics=4, noise=0.5, dim=64)
    stream = TokenStream(params, rng)
    tokens, topics = stream.sample(200, 50, rng)
    residual = tokens - stream.topics[topics]
    rms_norm = np.sqrt((np.linalg.norm(residual, axis=2) ** 2).mean())
    assert abs(rms_norm - 0.5) < 0.01
    silent = TokenStream(params.model_copy(update={"noise": 0.0}), rng)
    tokens, topics = silent.sample(3, 5, rng)
    np.testing.assert_array_equal(tokens, silent.topics[topics])


def test_sampling_is_reproducible() -> None:
    a = TokenStream(Stream(), np.random.default_rng(3))
    b = TokenStream(Stream(), np.random.default_rng(3))
    np.testing.assert_array_equal(a.topics, b.topics)
    ta, ia = a.sample(4, 8, np.random.default_rng(9))
    tb, ib = b.sample(4, 8, np.random.default_rng(9))
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_array_equal(ia, ib)
