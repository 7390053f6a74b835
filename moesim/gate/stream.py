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

**Data domains** (``domains``, optional; docs/model/gate.md "Data domains"). A domain is a
data source (code, web text, papers): a contiguous block of topics and a share of the
sequences. Then the Zipf law ranks topics *within* each domain (domain ``d``'s topic of rank
``r`` has popularity ``share_d · (r+1)^−s / Σ_r' (r'+1)^−s``), every sequence first draws its
domain by share and its mixture ``θ ~ Dirichlet(concentration · K_d · p_d)`` over that domain's
``K_d`` topics only (``p_d`` the within-domain popularity) — blended, with weight
``domain_overlap``, with a second mixture over all topics at the stream's popularity (the kinds
of tokens every domain has) — packed micro-batches draw one domain
and a dominant topic inside it, and drift rolls the ranking inside each domain (a domain's share
never changes). Without ``domains`` the stream is one domain of all topics and draws exactly as
described in steps 1–4.

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

from moesim.gate import kernels
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
        domains = params.domains
        sizes = [n_topics] if domains is None else [d.topics for d in domains]
        self.domain_shares: npt.NDArray[np.float64] = np.array(
            [1.0] if domains is None else [d.share for d in domains], dtype=np.float64
        )
        starts = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        self.domain_starts: npt.NDArray[np.int64] = starts
        self.domain_of_topic: npt.NDArray[np.int64] = np.repeat(
            np.arange(len(sizes), dtype=np.int64), sizes
        )
        # Zipf ranks restart in every domain; one domain gives the plain Zipf law over all topics.
        ranks = np.concatenate([np.arange(1, n + 1, dtype=np.float64) for n in sizes])
        weights = ranks ** (-params.zipf_exponent)
        # Each block's sum as np.sum gives it (one block: exactly the plain Zipf normalisation).
        block_sums = np.array(
            [weights[a:b].sum() for a, b in zip(starts[:-1], starts[1:], strict=True)]
        )
        self._within: npt.NDArray[np.float64] = weights / block_sums[self.domain_of_topic]
        self.popularity: npt.NDArray[np.float64] = (
            self._within
            if domains is None
            else self._within * self.domain_shares[self.domain_of_topic]
        )
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

    @property
    def domain_names(self) -> tuple[str, ...]:
        """The data domains' names (``("all",)`` without ``stream.domains``)."""
        domains = self.params.domains
        return ("all",) if domains is None else tuple(d.name for d in domains)

    @property
    def n_domains(self) -> int:
        """Number of data domains (1 without ``stream.domains``)."""
        return len(self.domain_names)

    def popularity_at(self, tokens_trained: float) -> npt.NDArray[np.float64]:
        """Topic popularity after ``tokens_trained`` tokens, drift applied (module docstring,
        step 1) inside each domain; shape (topics,), sums to 1. Equal to :attr:`popularity`
        without drift."""
        return self._drifted(self.popularity, tokens_trained)

    def _drifted(
        self, values: npt.NDArray[np.float64], tokens_trained: float
    ) -> npt.NDArray[np.float64]:
        drift = self.params.drift_tokens
        if drift is None or tokens_trained <= 0:
            return values
        shift = tokens_trained / drift
        whole = int(np.floor(shift))
        frac = shift - whole
        out = self._roll(values, whole)
        if frac > 0:
            out = (1.0 - frac) * out + frac * self._roll(values, whole + 1)
        return out

    def _roll(self, values: npt.NDArray[np.float64], shift: int) -> npt.NDArray[np.float64]:
        """``values`` rolled by ``shift`` inside every domain's block of topics."""
        if self.n_domains == 1:
            return np.roll(values, shift % values.size)
        out = np.empty_like(values)
        for start, end in zip(self.domain_starts[:-1], self.domain_starts[1:], strict=True):
            out[start:end] = np.roll(values[start:end], shift % (end - start))
        return out

    def sample(
        self,
        n_sequences: int,
        tokens_per_sequence: int,
        rng: np.random.Generator,
        *,
        tokens_trained: float = 0.0,
        sequences_per_micro_batch: int = 1,
        domain: int | None = None,
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
        domain : int, optional
            Draw every sequence from this domain (an index into :attr:`domain_names`), as a
            per-domain evaluation set; default: domains by their shares.

        Returns
        -------
        tokens : ndarray, shape (n_sequences, tokens_per_sequence, dim), float32
            Router inputs: topic centroid plus ``noise · N(0, I) / sqrt(dim)``.
        topic_ids : ndarray, shape (n_sequences, tokens_per_sequence), int64
            The topic each token was drawn from.
        """
        params = self.params
        n_topics = params.topics
        if params.packing == "domain" and sequences_per_micro_batch < 1:
            raise ValueError(
                f"sequences_per_micro_batch: {sequences_per_micro_batch} (need at least 1)"
            )
        if domain is not None and not 0 <= domain < self.n_domains:
            raise ValueError(f"domain: {domain} is not one of the {self.n_domains} domain(s)")
        if params.domains is None:
            popularity = self.popularity_at(tokens_trained)
            alpha = (
                self.dirichlet_alpha
                if popularity is self.popularity
                else params.concentration * n_topics * popularity
            )
            mixtures = rng.dirichlet(alpha, size=n_sequences)  # (n_seq, K)
            if params.packing == "domain":
                n_groups = -(-n_sequences // sequences_per_micro_batch)
                dominant = rng.choice(n_topics, size=n_groups, p=popularity)
                of_sequence = dominant[np.arange(n_sequences) // sequences_per_micro_batch]
                mixtures *= 1.0 - params.domain_share
                mixtures[np.arange(n_sequences), of_sequence] += params.domain_share
        else:
            mixtures = self._domain_mixtures(
                n_sequences, rng, tokens_trained, sequences_per_micro_batch, domain
            )
        compiled = kernels.ENABLED and self.topics.dtype == self._noise_pool.dtype == np.float32
        uniforms = rng.random((n_sequences, tokens_per_sequence))
        if compiled:
            # The lines below in one compiled pass, sequence by sequence (the same topics: the
            # flattened cumulative sums below rise from row to row, so searching them all at
            # once finds each uniform in its own row).
            topic_ids = kernels.draw_topics(mixtures, uniforms)
        else:
            # Inverse-CDF draw of each token's topic, vectorised over sequences by shifting
            # sequence s's cumulative mixture and its uniforms into the interval [s, s + 1).
            offsets = np.arange(n_sequences, dtype=np.float64)[:, None]
            cdf = np.cumsum(mixtures, axis=1) + offsets
            uniforms += offsets
            flat = np.searchsorted(cdf.ravel(), uniforms.ravel(), side="right")
            topic_ids = (
                flat.reshape(n_sequences, tokens_per_sequence)
                - n_topics * np.arange(n_sequences, dtype=np.int64)[:, None]
            )
            # cumsum can end a hair below 1; such uniforms belong to the last topic.
            np.clip(topic_ids, 0, n_topics - 1, out=topic_ids)
            topic_ids = topic_ids.astype(np.int64, copy=False)

        picks = rng.integers(0, NOISE_POOL, (n_sequences, tokens_per_sequence))
        if compiled:
            # Both gathers and the sum in one compiled pass (the same float32 sums).
            tokens = kernels.gather_add(self._noise_pool, picks, self.topics, topic_ids)
            return tokens, topic_ids
        # np.take gathers rows about twice as fast as fancy indexing (same values).
        noise = np.take(self._noise_pool, picks, axis=0)
        noise += np.take(self.topics, topic_ids, axis=0)
        return noise, topic_ids

    def _domain_mixtures(
        self,
        n_sequences: int,
        rng: np.random.Generator,
        tokens_trained: float,
        sequences_per_micro_batch: int,
        domain: int | None,
    ) -> npt.NDArray[np.float64]:
        """Topic mixtures of ``n_sequences`` sequences of a stream with domains: each sequence's
        domain by share (per micro-batch under ``packing: domain``; all ``domain`` when given),
        then a Dirichlet mixture over that domain's topics only."""
        params = self.params
        within = self._drifted(self._within, tokens_trained)
        packed = params.packing == "domain"
        per = sequences_per_micro_batch if packed else 1
        n_groups = -(-n_sequences // per)
        if domain is None:
            group_domain = rng.choice(self.n_domains, size=n_groups, p=self.domain_shares)
        else:
            group_domain = np.full(n_groups, domain, dtype=np.int64)
        of_sequence = group_domain[np.arange(n_sequences) // per]
        mixtures = np.zeros((n_sequences, params.topics), dtype=np.float64)
        starts = self.domain_starts
        for d in range(self.n_domains):
            rows = np.flatnonzero(of_sequence == d)
            if rows.size == 0:
                continue
            start, end = starts[d], starts[d + 1]
            alpha = params.concentration * (end - start) * within[start:end]
            mixtures[rows, start:end] = rng.dirichlet(alpha, size=rows.size)
        if params.domain_overlap > 0:
            # The shared part: a mixture over all topics at the stream's (drifted) popularity.
            popularity = self._drifted(self.popularity, tokens_trained)
            shared = rng.dirichlet(params.concentration * params.topics * popularity, n_sequences)
            mixtures *= 1.0 - params.domain_overlap
            mixtures += params.domain_overlap * shared
        if packed:
            # Each micro-batch's dominant topic, drawn inside its domain by the within-domain
            # popularity (inverse CDF on the domain's block).
            uniforms = rng.random(n_groups)
            dominant = np.empty(n_groups, dtype=np.int64)
            for g, d in enumerate(group_domain):
                block_cdf = np.cumsum(within[starts[d] : starts[d + 1]])
                pick = int(np.searchsorted(block_cdf, uniforms[g], side="right"))
                dominant[g] = starts[d] + min(pick, block_cdf.size - 1)
            on = dominant[np.arange(n_sequences) // per]
            mixtures *= 1.0 - params.domain_share
            mixtures[np.arange(n_sequences), on] += params.domain_share
        return mixtures
