"""Turning trained routers into the engine's per-step expert loads.

:func:`routing_sample` routes fresh stream tokens with the routers as they stand at a training
step and counts, for each simulated layer, micro-batch and source rank of one expert-parallel
group, the (token, expert) assignments per expert (routing.md §1) and the distinct tokens sent to
each destination rank. Routing every token of every sequence would be wasteful, so each sequence
routes ``gate.routed_tokens_per_sequence`` tokens (``R``) and stands for its full ``seq_len``
(``S``) tokens by a bootstrap: each routed token counts once and the ``S − R`` unrouted positions
are resampled uniformly from the routed ones, i.e. token weights ``w = 1 + Multinomial(S − R,
uniform over the R routed tokens)``. The weights sum to ``S`` per sequence, so loads are
conserved exactly, and the sample is exact when ``R = S``. The draw of tokens and weights is shared
by all layers (the same sequences flow through every layer), each layer routing them with its own
router.

:func:`balanced_sample` is the ideal reference: perfectly even loads and the dispatch volume of
uniformly random top-k routing.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from moesim.gate.metrics import coefficient_of_variation, max_vio
from moesim.gate.router import RouterState, route, route_options
from moesim.gate.sample import RoutingSample
from moesim.gate.stream import TokenStream
from moesim.scenario.schema import Scenario

# Upper bound on elements of one (tokens × experts) or (tokens × dim) array while sampling.
_CHUNK_ELEMENTS = 1 << 23


def _check_ranks(n_experts: int, n_src: int, n_dest: int) -> None:
    if n_src < 1:
        raise ValueError(f"n_src: {n_src} source ranks (need at least 1)")
    if n_dest < 1 or n_experts % n_dest:
        raise ValueError(f"n_dest: {n_dest} ranks do not evenly hold {n_experts} experts")


def bootstrap_weights(
    n_sequences: int, routed: int, seq_len: int, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """Token multiplicities that stretch ``routed`` tokens per sequence to ``seq_len``.

    Parameters
    ----------
    n_sequences : int
        Sequences.
    routed : int
        Routed tokens per sequence ``R`` (``≤ seq_len``).
    seq_len : int
        Tokens each sequence stands for ``S``.
    rng : numpy.random.Generator
        Draws the resampled positions.

    Returns
    -------
    ndarray, shape (n_sequences, routed), int64
        ``1 + Multinomial(S − R, uniform)`` per sequence; each row sums to ``S``.
    """
    if routed > seq_len:
        raise ValueError(f"routed tokens per sequence {routed} exceed seq_len {seq_len}")
    weights = np.ones((n_sequences, routed), dtype=np.int64)
    extra = seq_len - routed
    if extra:
        picks = rng.integers(0, routed, size=(n_sequences, extra), dtype=np.int64)
        picks += (np.arange(n_sequences, dtype=np.int64) * routed)[:, None]
        weights += np.bincount(picks.ravel(), minlength=n_sequences * routed).reshape(
            n_sequences, routed
        )
    return weights


def _sample_metrics(counts: npt.NDArray[np.int64], n_dest: int) -> dict[str, float]:
    """Summary metrics of a (L, M, n_src, E) count array (routing.md §2.4)."""
    per_layer = counts.sum(axis=(1, 2))  # (L, E)
    per_micro = counts.sum(axis=2)  # (L, M, E)
    n_layers, n_micro, n_experts = per_micro.shape
    rank_load = per_micro.reshape(n_layers, n_micro, n_dest, n_experts // n_dest).sum(axis=3)
    return {
        "maxvio_batch": float(max_vio(per_layer).mean()),
        "maxvio_micro": float(max_vio(per_micro).mean()),
        "cv_batch": float(coefficient_of_variation(per_layer).mean()),
        "rank_maxvio_micro": float(max_vio(rank_load).mean()),
    }


def routing_sample(
    scenario: Scenario,
    states: list[RouterState],
    stream: TokenStream,
    step: int,
    n_src: int,
    n_dest: int,
    rng: np.random.Generator,
) -> RoutingSample:
    """Expert loads of one step, routed by the given routers (routing.md §1, §2.4, §6.2).

    For every micro-batch (``scenario.micro_batches``) and source rank (``n_src``),
    ``parallelism.micro_batch_size`` sequences are drawn from ``stream``; ``R =
    gate.routed_tokens_per_sequence`` tokens of each are routed by every simulated layer's
    router (group-limited when ``router.node_limit`` applies, see
    :func:`~moesim.gate.router.route_options`) and weighted by :func:`bootstrap_weights` up to
    ``model.seq_len``.

    Parameters
    ----------
    scenario : Scenario
        Supplies the model, router, gate and parallelism settings.
    states : list of RouterState
        One router per simulated layer (``gate.layers_simulated``), e.g. a training snapshot.
    stream : TokenStream
        The token source (the one the routers were trained on).
    step : int
        Optimizer step the sample stands for (recorded only).
    n_src : int
        Source ranks (normally ``parallelism.expert``).
    n_dest : int
        Destination expert-parallel ranks; must divide the number of routed experts.
    rng : numpy.random.Generator
        Draws the tokens and bootstrap weights.

    Returns
    -------
    RoutingSample
        ``counts`` (L, M, n_src, E) summing over experts to ``top_k · micro_batch_size ·
        seq_len`` for every (layer, micro-batch, source), and ``dest_tokens`` (L, M, n_src,
        n_dest).
    """
    moe, gate = scenario.model.moe, scenario.gate
    n_layers, n_experts, top_k = gate.layers_simulated, moe.routed_experts, moe.top_k
    _check_ranks(n_experts, n_src, n_dest)
    if len(states) != n_layers:
        raise ValueError(f"states: {len(states)} routers for {n_layers} simulated layers")
    options = route_options(scenario)
    n_micro = scenario.micro_batches
    mbs = scenario.parallelism.micro_batch_size
    routed, seq_len = gate.routed_tokens_per_sequence, scenario.model.seq_len
    experts_per_rank = n_experts // n_dest

    tokens_per_micro = n_src * mbs * routed
    width = max(n_experts, stream.dim, 1)
    micro_per_chunk = max(1, _CHUNK_ELEMENTS // (tokens_per_micro * width))

    counts = np.zeros((n_layers, n_micro, n_src, n_experts), dtype=np.int64)
    dest = np.zeros((n_layers, n_micro, n_src, n_dest), dtype=np.int64)
    for m0 in range(0, n_micro, micro_per_chunk):
        m1 = min(n_micro, m0 + micro_per_chunk)
        n_cells = (m1 - m0) * n_src  # (micro-batch, source) cells in this chunk
        n_seq = n_cells * mbs
        tokens, _ = stream.sample(n_seq, routed, rng)
        x = tokens.reshape(n_seq * routed, stream.dim)
        weights = bootstrap_weights(n_seq, routed, seq_len, rng).ravel().astype(np.float64)
        cell = np.repeat(np.arange(n_cells, dtype=np.int64), mbs * routed)
        pair_weights = np.repeat(weights, top_k)
        for layer, state in enumerate(states):
            selected = route(x, state, **options).selected
            flat = ((cell * n_experts)[:, None] + selected).ravel()
            c = np.bincount(flat, weights=pair_weights, minlength=n_cells * n_experts)
            counts[layer, m0:m1] = np.rint(c).astype(np.int64).reshape(m1 - m0, n_src, n_experts)
            # Distinct destination ranks per token: sort each token's ranks, drop repeats.
            ranks = np.sort(selected // experts_per_rank, axis=1)
            first = np.ones_like(ranks, dtype=bool)
            first[:, 1:] = ranks[:, 1:] != ranks[:, :-1]
            flat_rank = ((cell * n_dest)[:, None] + ranks)[first]
            d = np.bincount(
                flat_rank, weights=pair_weights[first.ravel()], minlength=n_cells * n_dest
            )
            dest[layer, m0:m1] = np.rint(d).astype(np.int64).reshape(m1 - m0, n_src, n_dest)
    return RoutingSample(
        step=step, counts=counts, dest_tokens=dest, metrics=_sample_metrics(counts, n_dest)
    )


def balanced_sample(scenario: Scenario, step: int, n_src: int, n_dest: int) -> RoutingSample:
    """The perfectly balanced reference sample.

    Every (layer, micro-batch, source) cell holds ``T = micro_batch_size · seq_len`` tokens whose
    ``T·k`` assignments are split as evenly as integers allow (the remainder, fewer than ``E``,
    goes one each to the first experts). Each destination rank receives the expected number of
    distinct tokens under uniformly random top-k routing, ``round(T·(1 − C(E − E/n_dest, k) /
    C(E, k)))``: a token misses a rank only if all ``k`` of its experts lie on the other ranks.

    Parameters
    ----------
    scenario : Scenario
        Supplies the shapes.
    step : int
        Optimizer step the sample stands for (recorded only).
    n_src : int
        Source ranks.
    n_dest : int
        Destination ranks; must divide the number of routed experts.

    Returns
    -------
    RoutingSample
        With ``maxvio_batch = maxvio_micro = 0`` (the integer remainder is not counted as
        imbalance).
    """
    moe = scenario.model.moe
    n_layers, n_experts, top_k = scenario.gate.layers_simulated, moe.routed_experts, moe.top_k
    _check_ranks(n_experts, n_src, n_dest)
    n_micro = scenario.micro_batches
    tokens = scenario.parallelism.micro_batch_size * scenario.model.seq_len
    base, remainder = divmod(tokens * top_k, n_experts)
    per_expert = np.full(n_experts, base, dtype=np.int64)
    per_expert[:remainder] += 1
    miss = math.comb(n_experts - n_experts // n_dest, top_k) / math.comb(n_experts, top_k)
    per_rank = round(tokens * (1.0 - miss))
    counts = np.broadcast_to(per_expert, (n_layers, n_micro, n_src, n_experts)).copy()
    dest = np.full((n_layers, n_micro, n_src, n_dest), per_rank, dtype=np.int64)
    metrics = {"maxvio_batch": 0.0, "maxvio_micro": 0.0, "cv_batch": 0.0, "rank_maxvio_micro": 0.0}
    return RoutingSample(step=step, counts=counts, dest_tokens=dest, metrics=metrics)
