"""Baseline routers: Expert Choice and Sinkhorn (S-BASE) routing.

**Expert Choice** (Zhou et al. 2022; Expert Choice, arXiv 2202.09368). Scores ``S = softmax(X·Wᵀ)``
over the
experts, as token choice has; then each *expert* picks the ``c·n/E`` tokens of a chunk of ``n``
tokens with the highest scores (``c``, the capacity factor, is the average number of experts per
token). Expert loads are perfectly balanced by construction; a token may get no expert or many.

Expert Choice is **not causal** (arXiv 2408.15664 Table 1; docs/model/gate.md): whether expert ``e``
takes token ``t``
depends on how ``t`` ranks among *all* tokens of its chunk, including later ones, so changing a
later token can change an earlier token's experts — in an autoregressive language model that is
information from the future. The loss-free paper bounds what an EC layer can leak: with sparsity
``R = K/N`` it can carry more than ``K·log2((1 − R)/R)`` bits per token (App. D.1; ≈ 5.6 bits per
layer for ``R = 2/16``, > 50 bits over 9 layers), see :func:`expert_choice_leakage_bits`. The
smaller the chunk, the more a token's selection reveals about its neighbours (App. D.2: a
512-token chunk gives an abnormal ~10% loss drop).

**Sinkhorn** (S-BASE, Clark et al. 2022; Megatron's ``sinkhorn`` balancing type, S-BASE, arXiv
2202.01169; Megatron-LM megatron/core/transformer/moe/moe_utils.py). In training the experts are the
top-k of a Sinkhorn-normalised matrix: start from
``exp(z)``, alternately rescale rows (tokens) and columns (experts) towards equal sums until the
mean absolute change of the column scalings is below ``tol`` (1e-4), all in float32 without
gradient; the result is an approximately doubly-stochastic (balanced) transport plan. The gate
values are ``σ(z)`` when ``k = 1``, else the softmax over all experts, taken at the chosen experts
and not renormalised. In evaluation the selection is the plain top-k of those activations.
Sinkhorn needs no balancing loss (Megatron requires its coefficient to be 0) and no bias.

Both are pure numpy and vectorised over tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moesim.gate.router import (
    FloatArray,
    RouterState,
    Routing,
    gather_rows,
    scores_from_logits,
    top_k_indices,
)


@dataclass(frozen=True, eq=False)
class ExpertChoice:
    """An Expert Choice routing decision for ``T`` tokens in chunks of ``n``.

    Attributes
    ----------
    logits : ndarray, shape (T, E), float32
    scores : ndarray, shape (T, E), float32
        Softmax over the experts.
    chosen : ndarray, shape (T // n, E, m), int64
        Row indices (into the batch) of the ``m = c·n/E`` tokens expert ``e`` took in each chunk,
        in no particular order.
    gates : ndarray, shape (T // n, E, m), float32
        ``scores`` at those tokens (the weights of the experts' outputs).
    """

    logits: FloatArray
    scores: FloatArray
    chosen: npt.NDArray[np.int64]
    gates: FloatArray

    @property
    def n_tokens(self) -> int:
        """``T``."""
        return int(self.scores.shape[0])

    @property
    def n_experts(self) -> int:
        """``E``."""
        return int(self.scores.shape[1])

    def assignment(self) -> npt.NDArray[np.bool_]:
        """(T, E) bool: token ``t`` is processed by expert ``e``."""
        out = np.zeros((self.n_tokens, self.n_experts), dtype=bool)
        experts = np.broadcast_to(np.arange(self.n_experts)[None, :, None], self.chosen.shape)
        out[self.chosen.ravel(), experts.ravel()] = True
        return out

    def loads(self) -> npt.NDArray[np.int64]:
        """Tokens per expert, (E,): ``chunks · m`` for every expert."""
        return np.full(self.n_experts, self.chosen.shape[0] * self.chosen.shape[2], np.int64)

    def experts_per_token(self) -> npt.NDArray[np.int64]:
        """Experts each token got, (T,); averages ``c`` but varies from 0 up to ``E``."""
        return np.bincount(self.chosen.ravel(), minlength=self.n_tokens).astype(np.int64)


def expert_choice(
    x: FloatArray,
    state: RouterState,
    capacity_factor: float,
    chunk_size: int | None = None,
) -> ExpertChoice:
    """Expert Choice routing (Expert Choice, arXiv 2202.09368): each expert takes its top tokens per
    chunk.

    Parameters
    ----------
    x : ndarray, shape (T, dim)
        Router inputs.
    state : RouterState
        Router weights; the selection bias is not used (Expert Choice needs none).
    capacity_factor : float
        ``c``, the average experts per token; each expert takes ``m = round(c·n/E)`` tokens of a
        chunk (at least 1, at most ``n``).
    chunk_size : int, optional
        ``n``, tokens among which the experts choose (a sequence, a batch); must divide ``T``.
        Default: the whole batch.

    Returns
    -------
    ExpertChoice
    """
    n_tokens = x.shape[0]
    chunk = n_tokens if chunk_size is None else int(chunk_size)
    if chunk < 1 or n_tokens % chunk:
        raise ValueError(f"chunk_size: {chunk} does not divide {n_tokens} tokens")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor: {capacity_factor} is not positive")
    logits = x @ state.weights.T
    scores = scores_from_logits(logits, "softmax")
    n_experts = scores.shape[1]
    per_expert = min(chunk, max(1, round(capacity_factor * chunk / n_experts)))
    n_chunks = n_tokens // chunk
    by_expert = np.ascontiguousarray(
        scores.reshape(n_chunks, chunk, n_experts).transpose(0, 2, 1)
    ).reshape(n_chunks * n_experts, chunk)
    local = top_k_indices(by_expert, per_expert)  # (chunks·E, m)
    gates = gather_rows(by_expert, local).reshape(n_chunks, n_experts, per_expert)
    offsets = (np.arange(n_chunks, dtype=np.int64) * chunk)[:, None, None]
    chosen = local.reshape(n_chunks, n_experts, per_expert) + offsets
    return ExpertChoice(logits=logits, scores=scores, chosen=chosen, gates=gates)


def expert_choice_leakage_bits(top_k: float, n_experts: int, layers: int = 1) -> float:
    """The loss-free paper's leakage bound for Expert Choice (arXiv 2408.15664 Table 1, App. D.1).

    An EC layer with sparsity ``R = K/N`` can leak more than ``K·log2((1 − R)/R)`` bits per
    token; ``layers`` such layers add up. (``K`` is the average experts per token, EC's
    capacity factor.) For ``R ≥ 1/2`` the expression is not positive and the bound is 0.

    Returns
    -------
    float
        Bits per token over ``layers`` layers; e.g. ``K = 2, N = 16, 9 layers`` → 9·2·log2(7) ≈
        50.5.
    """
    if not 0 < top_k < n_experts:
        raise ValueError(f"top_k: {top_k} is not in (0, {n_experts})")
    ratio = top_k / n_experts
    return max(0.0, layers * top_k * math.log2((1.0 - ratio) / ratio))


def sinkhorn(logits: FloatArray, tol: float = 1e-4, max_iter: int = 1000) -> FloatArray:
    """Sinkhorn normalisation of ``exp(logits)`` (Megatron's ``sinkhorn``, Megatron-LM
    megatron/core/transformer/moe/moe_utils.py).

    With ``C = exp(z − max z)`` (the shift only rescales the plan's scalings and keeps ``exp``
    finite), repeat: token scalings ``d0 = (1/T) / (C·d1)``, expert scalings
    ``d1 = (1/E) / (d0ᵀ·C)`` (each with ``+1e-8`` in the denominator), until the mean absolute
    change of ``d1`` is below ``tol``. Returns ``d1 · C · d0``: rows summing to ``≈ 1/T`` and
    columns to ``≈ 1/E`` (exactly after the last column step).

    Parameters
    ----------
    logits : ndarray, shape (T, E)
        Computed in float32.
    tol : float
        Convergence threshold on the expert scalings.
    max_iter : int
        Safety cap on the iterations (Megatron loops until converged).

    Returns
    -------
    ndarray, shape (T, E), float32
    """
    if max_iter < 1:
        raise ValueError(f"max_iter: {max_iter} (need at least 1)")
    z = np.asarray(logits, dtype=np.float32)
    n_tokens, n_experts = z.shape
    cost = np.exp(np.maximum(z - z.max(), np.float32(-80.0)))
    eps = np.float32(1e-8)
    d1 = np.ones(n_experts, dtype=np.float32)
    for _ in range(max_iter):
        d0 = np.float32(1.0 / n_tokens) / (cost @ d1 + eps)
        new = np.float32(1.0 / n_experts) / (d0 @ cost + eps)
        error = float(np.abs(new - d1).mean())
        d1 = new
        if error < tol:
            break
    return (cost * d1[None, :]) * d0[:, None]


def sinkhorn_route(
    x: FloatArray, state: RouterState, top_k: int, training: bool = True, tol: float = 1e-4
) -> Routing:
    """Sinkhorn (S-BASE) routing as Megatron does it (S-BASE, arXiv 2202.01169; Megatron-LM
    megatron/core/transformer/moe/moe_utils.py).

    Parameters
    ----------
    x : ndarray, shape (T, dim)
    state : RouterState
        Weights only; the bias is not used.
    top_k : int
    training : bool, default True
        Training: select the top-k of :func:`sinkhorn` of the logits. Evaluation: the top-k of
        the activations.
    tol : float
        Sinkhorn convergence threshold.

    Returns
    -------
    Routing
        ``scores`` are the activations (``σ(z)`` for ``k = 1``, softmax over all experts
        otherwise) and ``gates`` those at the selection, not renormalised; nothing dropped.
    """
    logits = x @ state.weights.T
    scores = scores_from_logits(logits, "sigmoid" if top_k == 1 else "softmax")
    plan = sinkhorn(logits, tol) if training else scores
    selected = top_k_indices(plan, top_k)
    gates = gather_rows(scores, selected)
    return Routing(logits=logits, scores=scores, selected=selected, gates=gates)
