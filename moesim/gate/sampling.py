"""Turning trained routers into the engine's per-step expert loads.

:func:`routing_sample` routes fresh stream tokens with the routers as they stand at a training
step and counts, for each simulated layer, micro-batch and source rank of one expert-parallel
group, the (token, expert) assignments per expert (docs/model/gate.md) and the distinct tokens sent
to
each destination rank. Routing every token of every sequence would be wasteful, so each sequence
routes ``gate.routed_tokens_per_sequence`` tokens (``R``) and stands for its full ``seq_len``
(``S``) tokens by a bootstrap: each routed token counts once and the ``S − R`` unrouted positions
are resampled uniformly from the routed ones, i.e. token weights ``w = 1 + Multinomial(S − R,
uniform over the R routed tokens)``. The weights sum to ``S`` per sequence, so loads are
conserved exactly, and the sample is exact when ``R = S``. The draw of tokens and weights is shared
by all layers (the same sequences flow through every layer), each layer routing them with its own
router. The tokens come from the stream as it stands at the step (its drift after
``scenario.tokens_before(step)`` tokens) and, with domain packing, each rank's micro-batch shares a
dominant topic.

**Capacity.** With ``router.capacity`` every (micro-batch, source rank) cell is one router call
of ``micro_batch_size × seq_len`` tokens (Megatron-LM megatron/core/transformer/moe/router.py):
budgets and drops follow
:func:`~moesim.gate.router.capacity_kept`, counting each routed token with its bootstrap weight
(a token's resampled copies are identical, so a token straddling the budget is kept in part).
Routed token ``j`` of a sequence stands at position ``j`` for the ``position`` policy (its copies
with it), and exempt sequences are chosen by :func:`~moesim.gate.router.exempt_sequences` over the
step's sequences. ``counts``, ``dest_tokens`` and ``node_tokens`` hold the kept assignments
only (a token reaches a rank or node with the most of its copies kept by any of its assignments
there); ``RoutingSample.dropped`` the dropped ones.

**Layers.** ``gate.layers_simulated`` routers stand for the model's MoE layers through
``gate.layer_map``; :func:`gate_layer_of` is the mapping the engine uses.

:func:`balanced_sample` is the ideal reference: perfectly even loads and the dispatch volumes
(to ranks and to nodes) of uniformly random top-k routing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial

import numpy as np
import numpy.typing as npt

from moesim.gate import kernels
from moesim.gate.metrics import (
    coefficient_of_variation,
    dead_experts,
    expert_counts,
    max_vio,
    max_vio_batch,
    max_vio_compute_batch,
)
from moesim.gate.router import (
    RouteOptions,
    RouterState,
    capacity_kept,
    exempt_sequences,
    group_limits,
    route,
    route_options,
    scores_from_logits,
)
from moesim.gate.sample import RoutingSample
from moesim.gate.stream import TokenStream
from moesim.scenario.schema import Scenario

# Upper bound on elements of one (tokens × experts) or (tokens × dim) array while sampling.
_CHUNK_ELEMENTS = 1 << 23
# Rows scored at a time on the compiled path: about 1 MB of float32 scores at 256 experts,
# so that the sigmoid's passes and the selection read them from cache.
_SCORE_BLOCK_ROWS = 1024


def gate_layer_of(scenario: Scenario, moe_layer_index: int) -> int:
    """The simulated gate layer that stands for a MoE layer (``gate.layer_map``).

    Parameters
    ----------
    scenario : Scenario
    moe_layer_index : int
        Index among the MoE layers, ``0 ≤ i < model.moe_layers`` (transformer layer ``l`` is
        MoE layer ``l − model.dense_layers``).

    Returns
    -------
    int
        ``round_robin``: ``i mod L``; ``blocks``: ``i·L // moe_layers`` (contiguous blocks whose
        sizes differ by at most one), with ``L = gate.layers_simulated``.
    """
    n_moe = scenario.model.moe_layers
    if not 0 <= moe_layer_index < n_moe:
        raise ValueError(f"moe_layer_index: {moe_layer_index} outside 0..{n_moe - 1}")
    n_sim = scenario.gate.layers_simulated
    if scenario.gate.layer_map == "blocks":
        return moe_layer_index * n_sim // n_moe
    return moe_layer_index % n_sim


def gate_layer_map(scenario: Scenario) -> npt.NDArray[np.int64]:
    """:func:`gate_layer_of` for every MoE layer, shape (model.moe_layers,), int64."""
    return np.array(
        [gate_layer_of(scenario, i) for i in range(scenario.model.moe_layers)], dtype=np.int64
    )


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


def sample_metrics(
    counts: npt.NDArray[np.int64],
    n_dest: int,
    dropped: npt.NDArray[np.int64] | None = None,
    nodes_per_token: float = float("nan"),
) -> dict[str, float]:
    """Summary metrics of a (L, M, n_src, E) count array (arXiv 2408.15664 Eq. 4;
    docs/model/gate.md).

    Keys (all averaged over layers):

    - ``maxvio_batch``: MaxVio of each layer's loads over the whole sample (one step);
    - ``maxvio_micro``: MaxVio of one micro-batch's loads summed over all source ranks, mean over
      micro-batches;
    - ``maxvio_compute_batch``: MaxVio of one computation batch, a micro-batch of one
      expert-parallel group's ``n_dest`` consecutive source ranks (all sources when ``n_dest``
      does not divide ``n_src``) — equal to ``maxvio_micro`` when the sources are one EP group;
    - ``rank_maxvio_micro``: ``maxvio_micro`` over destination ranks' loads;
    - ``cv_batch``: coefficient of variation of the step's loads;
    - ``dead_experts``: experts with zero load over the step;
    - ``dropped_fraction``: dropped over routed assignments (0 when ``dropped`` is None);
    - ``nodes_per_token``: mean distinct nodes a token reaches (as given).
    """
    per_layer = counts.sum(axis=(1, 2))  # (L, E)
    per_micro = counts.sum(axis=2)  # (L, M, E)
    n_layers, n_micro, n_experts = per_micro.shape
    n_src = counts.shape[2]
    rank_load = per_micro.reshape(n_layers, n_micro, n_dest, n_experts // n_dest).sum(axis=3)
    group = n_dest if n_src % n_dest == 0 else None
    kept = float(counts.sum())
    lost = 0.0 if dropped is None else float(dropped.sum())
    return {
        "maxvio_batch": max_vio_batch(counts),
        "maxvio_micro": float(max_vio(per_micro).mean()),
        "maxvio_compute_batch": max_vio_compute_batch(counts, group),
        "cv_batch": float(coefficient_of_variation(per_layer).mean()),
        "rank_maxvio_micro": float(max_vio(rank_load).mean()),
        "dead_experts": float(dead_experts(per_layer).mean()),
        "dropped_fraction": lost / (kept + lost) if kept + lost > 0 else 0.0,
        "nodes_per_token": float(nodes_per_token),
    }


def _first_reach(groups: npt.NDArray[np.int64], kept: npt.NDArray[np.int64]) -> tuple:
    """Per token, each distinct group once, with the most copies that reach it.

    Parameters
    ----------
    groups : ndarray, shape (T, k)
        Group (rank, node) of every assignment.
    kept : ndarray, shape (T, k), int64
        Kept multiplicity of every assignment.

    Returns
    -------
    sorted_groups : ndarray, shape (T, k)
        Each row's groups in ascending order.
    reach : ndarray, shape (T, k), int64
        At the first entry of each group run: the largest kept multiplicity among the token's
        assignments to that group (the copies of the token that travel there); 0 elsewhere.
    """
    span = int(kept.max()) + 1 if kept.size else 1
    key = np.sort(groups * span + (span - 1 - kept), axis=1)
    sorted_groups = key // span
    best = span - 1 - key % span
    first = np.ones(key.shape, dtype=bool)
    first[:, 1:] = sorted_groups[:, 1:] != sorted_groups[:, :-1]
    return sorted_groups, np.where(first, best, 0)


def _distinct_per_group(
    groups: npt.NDArray[np.int64],
    cell: npt.NDArray[np.int64],
    n_cells: int,
    n_groups: int,
    pair_weights: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Weighted distinct tokens per (cell, group), dropless: each token counts once for every
    group (rank, node) its assignments reach.

    Parameters
    ----------
    groups : ndarray, shape (T, k), int64
        Group of every assignment.
    cell : ndarray, shape (T,), int64
        Cell of every token, ``0 ≤ cell < n_cells``.
    n_cells : int
        Cells.
    n_groups : int
        Groups per cell.
    pair_weights : ndarray, shape (T·k,), float64
        Token weight repeated per assignment.

    Returns
    -------
    ndarray, shape (cells · n_groups,), float64
    """
    ordered = np.sort(groups, axis=1)
    first = np.ones_like(ordered, dtype=bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    flat = ((cell * n_groups)[:, None] + ordered)[first]
    return np.bincount(flat, weights=pair_weights[first.ravel()], minlength=n_cells * n_groups)


def _compiled_counts(x: npt.NDArray[np.floating], state: RouterState) -> bool:
    """Whether the compiled loop can count a dropless sample routed by ``state``: numba is
    there and on, and inputs, weights and bias are float32 (the dtypes it reproduces)."""
    f32 = np.float32
    return kernels.ENABLED and x.dtype == f32 == state.weights.dtype == state.bias.dtype


def _score_blocks(
    x: npt.NDArray[np.float32],
    state: RouterState,
    options: dict[str, object],
    rows: int,
    exp_form: bool = False,
) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
    """The router's scores of ``x`` (the product and score function of
    :func:`~moesim.gate.router.route`) in blocks of ``rows`` rows: (first row, scores). With
    ``exp_form`` (a sigmoid router) the blocks hold ``exp(−logits)`` instead, the logits taken
    with the negated weights (exactly the negated logits), for the compiled counts to finish
    the sigmoid: one pass over the block instead of five."""
    weights = -state.weights if exp_form else state.weights
    for r0 in range(0, x.shape[0], rows):
        logits = x[r0 : r0 + rows] @ weights.T
        if exp_form:
            yield r0, np.exp(logits, out=logits)
        else:
            yield r0, scores_from_logits(logits, options["score"])  # type: ignore[arg-type]


def _exp_form(state: RouterState, options: dict[str, object]) -> bool:
    """Whether the compiled counts take the scores in exp form (:func:`_score_blocks`): a
    sigmoid router with an additive bias."""
    return options["score"] == "sigmoid" and state.bias_mode == "add"


def _selection_options(
    state: RouterState, options: dict[str, object]
) -> tuple[npt.NDArray[np.float32], bool, int, int, int | None]:
    """The selection arguments of the compiled counts: bias, multiply, top_k, groups, kept."""
    group_topk = options["group_topk"]
    return (
        state.bias,
        state.bias_mode == "mul",
        int(options["top_k"]),  # type: ignore[call-overload]
        int(options["n_groups"]),  # type: ignore[call-overload]
        None if group_topk is None else int(group_topk),  # type: ignore[call-overload]
    )


def _dropless_counts(
    x: npt.NDArray[np.float32],
    state: RouterState,
    options: dict[str, object],
    weights: npt.NDArray[np.int64],
    tokens_per_cell: int,
    counts: npt.NDArray[np.int64],
    dest: npt.NDArray[np.int64],
    node: npt.NDArray[np.int64],
) -> None:
    """Dropless counts of the tokens ``x`` (cells of ``tokens_per_cell`` consecutive rows) into
    ``counts`` (M, n_src, E), ``dest`` and ``node`` (views of the sample's arrays), in place:
    :func:`moesim.gate.kernels.sample_counts` on the router's scores, block by block — the
    same values as routing with :func:`~moesim.gate.router.route` and counting with
    ``bincount``, which the NumPy path does (``tests/gate/test_sample_kernel.py``)."""
    n_experts = counts.shape[-1]
    cells = counts.reshape(-1, n_experts)
    ranks, hosts = dest.reshape(cells.shape[0], -1), node.reshape(cells.shape[0], -1)
    block = max(1, _SCORE_BLOCK_ROWS // tokens_per_cell) * tokens_per_cell
    selection = _selection_options(state, options)
    exp_form = _exp_form(state, options)
    for r0, scores in _score_blocks(x, state, options, block, exp_form):
        n_rows = scores.shape[0]
        c, d, n = kernels.sample_counts(
            scores,
            *selection,
            weights[r0 : r0 + n_rows],
            n_rows // tokens_per_cell,
            ranks.shape[1],
            hosts.shape[1],
            from_exp=exp_form,
        )
        first = r0 // tokens_per_cell
        cells[first : first + c.shape[0]] = c
        ranks[first : first + d.shape[0]] = d
        hosts[first : first + n.shape[0]] = n


def dropless_loads(
    x: npt.NDArray[np.floating], state: RouterState, options: RouteOptions
) -> npt.NDArray[np.int64]:
    """Expert loads (E,) of routing the tokens ``x`` (T, dim) with ``state`` without a capacity:
    ``expert_counts`` of :func:`~moesim.gate.router.route`'s selection, counted by the compiled
    loop block by block where it can (:func:`moesim.gate.kernels.routed_counts`: the same
    values)."""
    opts = dict(options)
    if opts.pop("capacity") is not None:
        raise ValueError("dropless_loads: the routing has a capacity (route it instead)")
    if not _compiled_counts(x, state):
        routing = route(x, state, **opts)  # type: ignore[arg-type]
        return expert_counts(routing.selected, state.n_experts)
    loads = np.zeros(state.n_experts, dtype=np.int64)
    bias, multiply, top_k, n_groups, group_topk = _selection_options(state, opts)
    exp_form = _exp_form(state, opts)
    for _, scores in _score_blocks(x, state, opts, _SCORE_BLOCK_ROWS, exp_form):
        loads += kernels.routed_counts(
            scores, bias, multiply, top_k, n_groups, group_topk, from_exp=exp_form
        )[0]
    return loads


def routing_sample(
    scenario: Scenario,
    states: list[RouterState],
    stream: TokenStream,
    step: int,
    n_src: int,
    n_dest: int,
    rng: np.random.Generator,
) -> RoutingSample:
    """Expert loads of one step, routed by the given routers (docs/model/gate.md; arXiv 2408.15664
    Eq. 4; DeepSeek-V2, arXiv 2405.04434 §2.2; Megatron-LM megatron/core/transformer/moe/router.py).

    For every micro-batch (``scenario.micro_batches_at(step)``) and source rank (``n_src``),
    ``parallelism.micro_batch_size`` sequences are drawn from ``stream`` (drift at
    ``scenario.tokens_before(step)`` tokens; domain packing per cell);
    ``R = gate.routed_tokens_per_sequence`` tokens of each are routed by every simulated
    layer's router (group-limited as :func:`~moesim.gate.router.route_options` says) and
    weighted by :func:`bootstrap_weights` up to ``model.seq_len``. With ``router.capacity``
    each cell is one router call with its own budget (module docstring).

    Parameters
    ----------
    scenario : Scenario
        Supplies the model, router, gate and parallelism settings.
    states : list of RouterState
        One router per simulated layer (``gate.layers_simulated``), e.g. a training snapshot.
    stream : TokenStream
        The token source (the one the routers were trained on).
    step : int
        Optimizer step the sample stands for (sets the stream's drift; otherwise recorded only).
    n_src : int
        Source ranks (normally ``parallelism.expert × parallelism.data``).
    n_dest : int
        Destination expert-parallel ranks; must divide the number of routed experts.
    rng : numpy.random.Generator
        Draws the tokens and bootstrap weights.

    Returns
    -------
    RoutingSample
        ``counts`` (L, M, n_src, E) of kept assignments, summing over experts to ``top_k ·
        micro_batch_size · seq_len`` minus ``dropped`` for every (layer, micro-batch, source);
        ``dest_tokens`` (L, M, n_src, n_dest); ``node_tokens`` (L, M, n_src, ep_nodes),
        counted like ``dest_tokens`` over the nodes of the expert-parallel group (node ``j``
        hosts experts ``[j·E/ep_nodes, (j+1)·E/ep_nodes)``); ``dropped`` (L, M, n_src).
    """
    moe, gate = scenario.model.moe_spec, scenario.gate
    n_layers, n_experts, top_k = gate.layers_simulated, moe.routed_experts, moe.top_k
    _check_ranks(n_experts, n_src, n_dest)
    if len(states) != n_layers:
        raise ValueError(f"states: {len(states)} routers for {n_layers} simulated layers")
    options = dict(route_options(scenario))
    capacity = options.pop("capacity")
    n_micro = scenario.micro_batches_at(step)
    mbs = scenario.parallelism.micro_batch_size
    routed, seq_len = gate.routed_tokens_per_sequence, scenario.model.seq_len
    experts_per_rank = n_experts // n_dest
    n_nodes = scenario.ep_nodes
    experts_per_node = n_experts // n_nodes
    tokens_trained = scenario.tokens_before(step)

    tokens_per_micro = n_src * mbs * routed
    width = max(n_experts, stream.dim, 1)
    micro_per_chunk = max(1, _CHUNK_ELEMENTS // (tokens_per_micro * width))

    counts = np.zeros((n_layers, n_micro, n_src, n_experts), dtype=np.int64)
    dest = np.zeros((n_layers, n_micro, n_src, n_dest), dtype=np.int64)
    dropped = np.zeros((n_layers, n_micro, n_src), dtype=np.int64)
    node = np.zeros((n_layers, n_micro, n_src, n_nodes), dtype=np.int64)
    for m0 in range(0, n_micro, micro_per_chunk):
        m1 = min(n_micro, m0 + micro_per_chunk)
        n_cells = (m1 - m0) * n_src  # (micro-batch, source) cells in this chunk
        n_seq = n_cells * mbs
        tokens, _ = stream.sample(
            n_seq, routed, rng, tokens_trained=tokens_trained, sequences_per_micro_batch=mbs
        )
        x = tokens.reshape(n_seq * routed, stream.dim)
        weights_int = bootstrap_weights(n_seq, routed, seq_len, rng).ravel()
        weights = weights_int.astype(np.float64)
        cell = np.repeat(np.arange(n_cells, dtype=np.int64), mbs * routed)
        pair_weights = np.repeat(weights, top_k)
        if capacity is not None:
            n_rows = x.shape[0]
            rows = np.arange(n_rows, dtype=np.int64)
            positions = (rows % routed) * n_rows + rows  # position-major, as route() does
            sequence = rows // routed
            exempt = None
            if capacity.exempt_fraction > 0:
                first = m0 * n_src * mbs
                exempt = exempt_sequences(n_seq, capacity.exempt_fraction, first)[sequence]
        for layer, state in enumerate(states):
            if capacity is None and _compiled_counts(x, state):
                c3, d3, n3 = (a[layer, m0:m1] for a in (counts, dest, node))
                _dropless_counts(x, state, options, weights_int, mbs * routed, c3, d3, n3)
                continue
            routing = route(x, state, **options)  # type: ignore[arg-type]
            selected = routing.selected
            if capacity is None:
                kept_pairs = pair_weights
                kept = None
            else:
                kept = capacity_kept(
                    selected,
                    routing.gates,
                    n_experts,
                    capacity,
                    segments=n_cells,
                    weights=weights_int,
                    positions=positions,
                    exempt=exempt,
                )
                kept_pairs = kept.ravel().astype(np.float64)
                lost = (weights_int[:, None] - kept).sum(axis=1)
                dropped[layer, m0:m1] = (
                    np.bincount(cell, weights=lost, minlength=n_cells)
                    .astype(np.int64)
                    .reshape(m1 - m0, n_src)
                )
            flat = ((cell * n_experts)[:, None] + selected).ravel()
            c = np.bincount(flat, weights=kept_pairs, minlength=n_cells * n_experts)
            counts[layer, m0:m1] = np.rint(c).astype(np.int64).reshape(m1 - m0, n_src, n_experts)
            if kept is None:
                d = _distinct_per_group(
                    selected // experts_per_rank, cell, n_cells, n_dest, pair_weights
                )
                if n_nodes == 1:
                    # Every token reaches the one node (dropless: all k experts are kept).
                    n = np.bincount(cell, weights=weights, minlength=n_cells)
                else:
                    n = _distinct_per_group(
                        selected // experts_per_node, cell, n_cells, n_nodes, pair_weights
                    )
            else:
                ranks, reach = _first_reach(selected // experts_per_rank, kept)
                flat_rank = ((cell * n_dest)[:, None] + ranks).ravel()
                d = np.bincount(flat_rank, weights=reach.ravel(), minlength=n_cells * n_dest)
                nodes, node_hits = _first_reach(selected // experts_per_node, kept)
                flat_node = ((cell * n_nodes)[:, None] + nodes).ravel()
                n = np.bincount(flat_node, weights=node_hits.ravel(), minlength=n_cells * n_nodes)
            dest[layer, m0:m1] = np.rint(d).astype(np.int64).reshape(m1 - m0, n_src, n_dest)
            node[layer, m0:m1] = np.rint(n).astype(np.int64).reshape(m1 - m0, n_src, n_nodes)
    total_tokens = float(n_micro * n_src * mbs * seq_len)
    nodes_per_token = float(node.sum(axis=(1, 2, 3)).mean() / total_tokens)
    return RoutingSample(
        step=step,
        counts=counts,
        dest_tokens=dest,
        metrics=sample_metrics(counts, n_dest, dropped, nodes_per_token),
        dropped=dropped,
        node_tokens=node,
    )


def expected_distinct(
    assignments: npt.ArrayLike, n_tokens: npt.ArrayLike, n_experts: int, top_k: int
) -> npt.NDArray[np.float64]:
    """Expected distinct tokens a group of experts receives, from its assignment count.

    Under uniformly random top-k routing a token misses a group of ``g`` of the ``E`` experts
    with probability ``C(E − g, k)/C(E, k) = Π_{j<k} (E − g − j)/(E − j)``. A group that
    receives ``a`` of a cell's ``k·T`` assignments is treated as holding the equivalent
    ``n = E·a/(k·T)`` experts in that formula (``max(0, ·)`` per factor), so the result is exact
    for balanced loads (:func:`balanced_sample`) and grows with the group's share otherwise.
    The result is clipped to ``[a / min(k, a), min(T, a)]``-style bounds by the caller.

    Parameters
    ----------
    assignments : array_like
        ``a`` per group (any shape).
    n_tokens : array_like
        ``T``, tokens of the cell the group receives from (broadcast against ``assignments``).
    n_experts, top_k : int

    Returns
    -------
    ndarray, float64
        ``T·(1 − Π_{j<k} max(0, E − n − j)/(E − j))``.
    """
    a = np.asarray(assignments, dtype=np.float64)
    t = np.asarray(n_tokens, dtype=np.float64)
    equivalent = np.divide(
        n_experts * a, top_k * t, out=np.zeros(np.broadcast(a, t).shape), where=t > 0
    )
    miss = np.ones_like(equivalent)
    for j in range(top_k):
        miss *= np.maximum(0.0, n_experts - equivalent - j) / (n_experts - j)
    return t * (1.0 - miss)


def uniform_reach(
    n_experts: int, top_k: int, n_groups: int, group_topk: int | None, block: int
) -> float:
    """Probability that a token routed uniformly at random reaches a contiguous block of
    ``block`` experts (a rank's or a node's), under group-limited routing: the token keeps
    ``group_topk`` of ``n_groups`` equal contiguous groups, then its ``top_k`` experts among
    theirs (unlimited: ``group_topk`` None). A block inside one group is reached if its group is
    kept and one of the token's experts falls in it; a block of whole groups is reached unless
    none of its kept groups holds one of the token's experts (hypergeometric over kept groups).
    """
    if group_topk is None or group_topk >= n_groups:
        return 1.0 - math.comb(n_experts - block, top_k) / math.comb(n_experts, top_k)
    size = n_experts // n_groups
    pool = group_topk * size  # experts the token chooses among
    if block <= size:
        missed = math.comb(pool - block, top_k) / math.comb(pool, top_k)
        return group_topk / n_groups * (1.0 - missed)
    whole = block // size
    miss = 0.0
    for kept in range(max(0, group_topk - (n_groups - whole)), min(whole, group_topk) + 1):
        p_kept = (
            math.comb(whole, kept)
            * math.comb(n_groups - whole, group_topk - kept)
            / math.comb(n_groups, group_topk)
        )
        miss += p_kept * math.comb(pool - kept * size, top_k) / math.comb(pool, top_k)
    return 1.0 - miss


def _even_split(totals: npt.NDArray[np.int64], parts: int) -> npt.NDArray[np.int64]:
    """Each of ``totals`` split into ``parts`` integers as evenly as possible (the remainder
    one each to the first parts); a new last axis of length ``parts``."""
    base, remainder = np.divmod(totals, parts)
    return base[..., None] + (np.arange(parts) < remainder[..., None])


def balanced_like(sample: RoutingSample) -> RoutingSample:
    """``sample``'s kept work, perfectly balanced: in every (layer, micro-batch, source) cell
    the same kept assignments spread evenly over the experts, and the same distinct tokens
    spread evenly over the destination ranks and nodes.

    The reference for a routed sample that dropped tokens (``router.capacity``): against the
    full-work :func:`balanced_sample`, a step that dropped a quarter of its assignments looks
    faster than balanced routing, and routing imbalance would come out negative. Against this
    one the routed step differs only in how its work is spread. Its ``dropped_fraction`` is the
    sample's; its MaxVio is 0.
    """
    counts = _even_split(sample.counts.sum(axis=-1), sample.counts.shape[-1])
    dest = _even_split(sample.dest_tokens.sum(axis=-1), sample.dest_tokens.shape[-1])
    node = _even_split(sample.node_tokens.sum(axis=-1), sample.node_tokens.shape[-1])
    per_expert = counts.sum(axis=(0, 1, 2))
    metrics = {
        **{k: 0.0 for k in ("maxvio_batch", "maxvio_micro", "maxvio_compute_batch", "cv_batch")},
        "rank_maxvio_micro": 0.0,
        "dead_experts": float(dead_experts(per_expert)),
        "dropped_fraction": float(sample.metrics.get("dropped_fraction", 0.0)),
        "nodes_per_token": float(sample.metrics.get("nodes_per_token", 0.0)),
    }
    return RoutingSample(
        step=sample.step, counts=counts, dest_tokens=dest, metrics=metrics, node_tokens=node
    )


def balanced_sample(scenario: Scenario, step: int, n_src: int, n_dest: int) -> RoutingSample:
    """The perfectly balanced reference sample (of routing that drops nothing; see
    :func:`balanced_like` for the reference of a sample that dropped tokens).

    Every (layer, micro-batch, source) cell holds ``T = micro_batch_size · seq_len`` tokens whose
    ``T·k`` assignments are split as evenly as integers allow (the remainder, fewer than ``E``,
    goes one each to the first experts). Each destination rank receives the expected number of
    distinct tokens under uniformly random top-k routing, ``round(T·(1 − C(E − E/n_dest, k) /
    C(E, k)))``: a token misses a rank only if all ``k`` of its experts lie on the other ranks.
    Each of the ``n = scenario.ep_nodes`` nodes likewise receives ``round(T·(1 − C(E − E/n, k)
    / C(E, k)))`` distinct tokens (``node_tokens``; ``T`` for one node). Under group-limited
    routing (``router.node_limit`` …) these reach probabilities are those of uniform routing
    inside the kept groups (:func:`uniform_reach`): DeepSeek-V3's node limit of 4 sends a token
    to about 3.6 nodes, not the 5.3 of unconstrained top-8. Nothing is dropped;
    ``nodes_per_token`` is the same expectation over the EP group's nodes, unrounded.

    Parameters
    ----------
    scenario : Scenario
        Supplies the shapes.
    step : int
        Optimizer step the sample stands for (sets its micro-batch count under a batch ramp).
    n_src : int
        Source ranks.
    n_dest : int
        Destination ranks; must divide the number of routed experts.

    Returns
    -------
    RoutingSample
        With ``maxvio_batch = maxvio_micro = maxvio_compute_batch = 0`` (the integer remainder is
        not counted as imbalance) and ``dropped_fraction = 0``.
    """
    moe = scenario.model.moe_spec
    n_layers, n_experts, top_k = scenario.gate.layers_simulated, moe.routed_experts, moe.top_k
    _check_ranks(n_experts, n_src, n_dest)
    n_micro = scenario.micro_batches_at(step)
    tokens = scenario.parallelism.micro_batch_size * scenario.model.seq_len
    base, remainder = divmod(tokens * top_k, n_experts)
    per_expert = np.full(n_experts, base, dtype=np.int64)
    per_expert[:remainder] += 1
    n_groups, group_topk = group_limits(scenario)
    reach = partial(uniform_reach, n_experts, top_k, n_groups, group_topk)
    per_rank = round(tokens * reach(n_experts // n_dest))
    counts = np.broadcast_to(per_expert, (n_layers, n_micro, n_src, n_experts)).copy()
    dest = np.full((n_layers, n_micro, n_src, n_dest), per_rank, dtype=np.int64)
    n_nodes = scenario.ep_nodes
    node_reach = reach(n_experts // n_nodes)
    per_node = round(tokens * node_reach)
    node = np.full((n_layers, n_micro, n_src, n_nodes), per_node, dtype=np.int64)
    metrics = {
        "maxvio_batch": 0.0,
        "maxvio_micro": 0.0,
        "maxvio_compute_batch": 0.0,
        "cv_batch": 0.0,
        "rank_maxvio_micro": 0.0,
        "dead_experts": float(dead_experts(per_expert)),
        "dropped_fraction": 0.0,
        "nodes_per_token": n_nodes * node_reach,
    }
    return RoutingSample(
        step=step, counts=counts, dest_tokens=dest, metrics=metrics, node_tokens=node
    )
