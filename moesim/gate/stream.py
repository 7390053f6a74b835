"""Synthetic token stream: sequences drawn from a Zipf-weighted mixture of topics.

The gate never sees real text. It sees router inputs ``u_t`` (docs/model/gate.md) that have the
properties that make expert load uneven in practice: tokens cluster by *topic* (domain), a few
topics are much more common than the rest (OLMoE, arXiv 2409.02060; arXiv 2412.19437 App. C), data
is often packed by domain so a
micro-batch is nearly single-domain (arXiv 2501.11873), and the data mix changes over a run.

**Generative model.** A stream has ``topics`` random unit centroids in the router's
``dim``-dimensional input space and a Zipf popularity law ``p_r ∝ 1/(r+1)^s`` over topic ranks
``r`` (``s`` = ``zipf_exponent``; topic 0 is the most popular at the start). To draw a batch:

1. *Drift.* With ``drift_tokens = D``, after ``τ`` tokens trained the ranking has moved
   ``τ/D`` topics along: topic ``k`` has the popularity topic ``k − 1`` had ``D`` tokens
   earlier, blended linearly between whole shifts
   (``p(τ) = (1−φ)·roll(p, i) + φ·roll(p, i+1)``, ``i = ⌊τ/D⌋``, ``φ = τ/D − i``), so the hot
   topics — and the experts they prefer — keep moving and a balancer has something to track.
   Without drift ``p(τ) = p``.
2. *Mixtures.* Each sequence draws its topic mixture ``θ ~ Dirichlet(concentration · K · p(τ))``:
   popular topics dominate, and a small ``concentration`` gives one dominant topic per sequence.
3. *Packing.* With ``packing: domain`` the sequences come in micro-batches of
   ``sequences_per_micro_batch`` (one rank's micro-batch); each micro-batch draws one dominant
   topic ``d ~ p(τ)`` and every sequence in it takes the mixture
   ``domain_share · onehot(d) + (1 − domain_share) · θ``. Micro-batch loads then concentrate on
   the dominant topic's experts (Demons in the Detail's packed, single-domain micro-batches).
4. *Tokens.* Every token draws its topic from its sequence's mixture and sits at that topic's
   centroid plus a direction ``m`` common to all tokens (norm ``common``, drawn once) plus
   isotropic Gaussian noise of total standard deviation ``noise``
   (``noise · N(0, I) / sqrt(dim)``). The common part stands for the anisotropy of a language
   model's hidden states (Ethayarajh, arXiv 1909.00512): a router vector that leans towards it
   raises its expert's logit for every token.

The Gaussian noise vectors come from a fixed pool of ``NOISE_POOL`` vectors drawn once at
construction; each token picks one at random. Drawing fresh Gaussians is the most expensive part
of a gate update on a small CPU, and with 65,536 pool vectors against a few thousand tokens per
update a token's noise repeats too rarely to matter for a router of ``experts × dim`` weights.

Everything is float32 and vectorised over all tokens of a draw. Without drift and packing a draw
consumes the generator exactly as before these options existed.
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
        Topic centroids: unit vectors uniformly distributed on the sphere, plus the common
        direction ``m``.
    popularity : ndarray, shape (topics,), float64
        Zipf popularity ``p_k ∝ 1/(k+1)^zipf_exponent`` before any drift; sums to 1. Topic 0 is
        the most popular.
    dirichlet_alpha : ndarray, shape (topics,), float64
        ``concentration · topics · popularity``, the Dirichlet parameter of a sequence's mixture
        before any drift.
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
        if params.common > 0:
            # Drawn last, so the centroids and the noise do not depend on it.
            shared = rng.standard_normal(dim)
            shared *= params.common / np.linalg.norm(shared)
            self.topics = (centroids + shared).astype(np.float32)

    @property
    def dim(self) -> int:
        """Dimension of a token vector."""
        return self.params.dim

    def popularity_at(self, tokens_trained: float) -> npt.NDArray[np.float64]:
        """Topic popularity after ``tokens_trained`` tokens, drift applied (module docstring,
        step 1); shape (topics,), sums to 1. Equal to :attr:`popularity` without drift."""
        drift = self.params.drift_tokens
        if drift is None or tokens_trained <= 0:
            return self.popularity
        shift = tokens_trained / drift
        whole = int(np.floor(shift))
        frac = shift - whole
        n_topics = self.params.topics
        out = np.roll(self.popularity, whole % n_topics)
        if frac > 0:
            out = (1.0 - frac) * out + frac * np.roll(self.popularity, (whole + 1) % n_topics)
        return out

    def sample(
        self,
        n_sequences: int,
        tokens_per_sequence: int,
        rng: np.random.Generator,
        *,
        tokens_trained: float = 0.0,
        sequences_per_micro_batch: int = 1,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Draw ``n_sequences`` sequences (module docstring, steps 1–4).

        Parameters
        ----------
        n_sequences : int
            Number of sequences (each gets its own topic mixture).
        tokens_per_sequence : int
            Tokens drawn per sequence.
        rng : numpy.random.Generator
            Source of all randomness of this draw.
        tokens_trained : float, default 0
            Tokens trained before this batch; sets the popularity under ``drift_tokens``.
        sequences_per_micro_batch : int, default 1
            With ``packing: domain``, consecutive blocks of this many sequences form one rank's
            micro-batch and share a dominant topic (a last, shorter block is its own
            micro-batch). Ignored with ``packing: mixed``.

        Returns
        -------
        tokens : ndarray, shape (n_sequences, tokens_per_sequence, dim), float32
            Router inputs: topic centroid plus ``noise · N(0, I) / sqrt(dim)``.
        topic_ids : ndarray, shape (n_sequences, tokens_per_sequence), int64
            The topic each token was drawn from.
        """
        params = self.params
        n_topics = params.topics
        popularity = self.popularity_at(tokens_trained)
        alpha = (
            self.dirichlet_alpha
            if popularity is self.popularity
            else params.concentration * n_topics * popularity
        )
        mixtures = rng.dirichlet(alpha, size=n_sequences)  # (n_seq, K)
        if params.packing == "domain":
            if sequences_per_micro_batch < 1:
                raise ValueError(
                    f"sequences_per_micro_batch: {sequences_per_micro_batch} (need at least 1)"
                )
            n_groups = -(-n_sequences // sequences_per_micro_batch)
            dominant = rng.choice(n_topics, size=n_groups, p=popularity)
            of_sequence = dominant[np.arange(n_sequences) // sequences_per_micro_batch]
            mixtures *= 1.0 - params.domain_share
            mixtures[np.arange(n_sequences), of_sequence] += params.domain_share
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

        picks = rng.integers(0, NOISE_POOL, (n_sequences, tokens_per_sequence))
        # np.take gathers rows about twice as fast as fancy indexing (same values).
        noise = np.take(self._noise_pool, picks, axis=0)
        noise += np.take(self.topics, topic_ids, axis=0)
        return noise, topic_ids
