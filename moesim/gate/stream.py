"""Synthetic token stream: sequences drawn from a Zipf-weighted mixture of topics.

The gate never sees real text. It sees router inputs ``u_t`` (routing.md §1) that have the two
properties that make expert load uneven in practice: tokens cluster by *topic* (domain), and a few
topics are much more common than the rest. A stream has ``topics`` random unit centroids in the
router's ``dim``-dimensional input space and a Zipf popularity law ``p_k ∝ 1/(k+1)^s``. A sequence
first draws its topic mixture ``θ ~ Dirichlet(concentration · K · p)`` — so popular topics
dominate, and a small ``concentration`` gives one dominant topic per sequence — then every token
draws its topic from ``θ`` and sits at that topic's centroid plus isotropic Gaussian noise of
total standard deviation ``noise`` (``noise · N(0, I) / sqrt(dim)``).

The Gaussian noise vectors come from a fixed pool of ``NOISE_POOL`` vectors drawn once at
construction; each token picks one at random. Drawing fresh Gaussians is the most expensive part
of a gate update on a small CPU, and with 65,536 pool vectors against a few thousand tokens per
update a token's noise repeats too rarely to matter for a router of ``experts × dim`` weights.

Everything is float32 and vectorised over all tokens of a draw.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from moesim.scenario.routing import Stream

NOISE_POOL = 65_536


class TokenStream:
    """A fixed topic geometry from which token batches are sampled.

    Parameters
    ----------
    params : Stream
        The scenario's ``stream`` section.
    rng : numpy.random.Generator
        Draws the topic centroids and the noise pool (only at construction).

    Attributes
    ----------
    params : Stream
        The parameters given.
    topics : ndarray, shape (topics, dim), float32
        Unit-norm topic centroids, uniformly distributed on the sphere.
    popularity : ndarray, shape (topics,), float64
        Zipf popularity ``p_k ∝ 1/(k+1)^zipf_exponent``; sums to 1. Topic 0 is the most popular.
    dirichlet_alpha : ndarray, shape (topics,), float64
        ``concentration · topics · popularity``, the Dirichlet parameter of a sequence's mixture.
    """

    def __init__(self, params: Stream, rng: np.random.Generator) -> None:
        self.params = params
        n_topics, dim = params.topics, params.dim
        centroids = rng.standard_normal((n_topics, dim))
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        self.topics: npt.NDArray[np.float32] = centroids.astype(np.float32)
        ranks = np.arange(1, n_topics + 1, dtype=np.float64)
        weights = ranks ** (-params.zipf_exponent)
        self.popularity: npt.NDArray[np.float64] = weights / weights.sum()
        self.dirichlet_alpha: npt.NDArray[np.float64] = (
            params.concentration * n_topics * self.popularity
        )
        scale = np.float32(params.noise / np.sqrt(dim))
        self._noise_pool = rng.standard_normal((NOISE_POOL, dim), dtype=np.float32) * scale

    @property
    def dim(self) -> int:
        """Dimension of a token vector."""
        return self.params.dim

    def sample(
        self, n_sequences: int, tokens_per_sequence: int, rng: np.random.Generator
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Draw ``n_sequences`` independent sequences.

        Parameters
        ----------
        n_sequences : int
            Number of sequences (each gets its own topic mixture).
        tokens_per_sequence : int
            Tokens drawn per sequence.
        rng : numpy.random.Generator
            Source of all randomness of this draw.

        Returns
        -------
        tokens : ndarray, shape (n_sequences, tokens_per_sequence, dim), float32
            Router inputs: topic centroid plus ``noise · N(0, I) / sqrt(dim)``.
        topic_ids : ndarray, shape (n_sequences, tokens_per_sequence), int64
            The topic each token was drawn from.
        """
        n_topics = self.params.topics
        mixtures = rng.dirichlet(self.dirichlet_alpha, size=n_sequences)  # (n_seq, K)
        # Inverse-CDF draw of each token's topic, vectorised over sequences by shifting sequence
        # s's cumulative mixture and its uniforms into the interval [s, s + 1).
        offsets = np.arange(n_sequences, dtype=np.float64)[:, None]
        cdf = np.cumsum(mixtures, axis=1) + offsets
        uniforms = rng.random((n_sequences, tokens_per_sequence)) + offsets
        flat = np.searchsorted(cdf.ravel(), uniforms.ravel(), side="right")
        topic_ids = (
            flat.reshape(n_sequences, tokens_per_sequence)
            - n_topics * np.arange(n_sequences, dtype=np.int64)[:, None]
        )
        # cumsum can end a hair below 1; such uniforms belong to the last topic.
        np.clip(topic_ids, 0, n_topics - 1, out=topic_ids)
        topic_ids = topic_ids.astype(np.int64, copy=False)

        noise = self._noise_pool[rng.integers(0, NOISE_POOL, (n_sequences, tokens_per_sequence))]
        noise += self.topics[topic_ids]
        return noise, topic_ids
