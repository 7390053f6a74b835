"""Load-balance metrics over expert loads.

A load vector counts the (token, expert) assignments each expert received in some scope — a
micro-batch, a global batch, a validation set (docs/model/gate.md). The headline metric is the
paper's
MaxVio, the relative excess of the most loaded expert over the mean (arXiv 2408.15664 Eq. 4, Eq. 4):
it is
what an expert-parallel step waits for, since the busiest expert's rank finishes last. The
elementary functions reduce along the last axis, so a stack of loads (layers × micro-batches ×
experts) is handled in one call.

MaxVio at the paper's three scopes (arXiv 2408.15664 Eq. 4; docs/model/gate.md "cluster-level
metric"), from a sample's
count array ``(L, M, n_src, E)`` (layers, micro-batches, source ranks, experts) and always
averaged over layers:

- *global* (:func:`max_vio_global`): loads summed over everything observed (many steps; a
  validation set) — the efficiency bound for an unbounded batch;
- *batch* (:func:`max_vio_batch`): loads of one training step (all micro-batches and ranks);
- *computation batch* (:func:`max_vio_compute_batch`): loads of one micro-batch summed over the
  source ranks that feed the same experts — ``micro_batch_size × ranks`` sequences, arXiv 2408.15664
  §5.1;
- *micro-batch* per rank is the finest scope (``sources_per_batch=1``).

Also: the coefficient of variation, dead experts (zero load), the dropped fraction, the mean
number of distinct nodes (or devices) a token reaches, and the topic × expert load matrix that
shows specialisation (docs/model/gate.md; arXiv 2412.19437 Fig. 9; OLMoE, arXiv 2409.02060; arXiv
2412.19437 App. C).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def max_vio(counts: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """MaxVio = (max_i c_i − mean c) / mean c along the last axis (arXiv 2408.15664 Eq. 4).

    Parameters
    ----------
    counts : array_like, shape (..., E)
        Expert loads (assignments, or any non-negative load).

    Returns
    -------
    ndarray, shape (...), float64
        0 for a perfectly balanced load (and for an all-zero one); ``E − 1`` when one expert takes
        everything. A 1-D input gives a 0-d array (``float()`` it).
    """
    c = np.asarray(counts, dtype=np.float64)
    mean = c.mean(axis=-1)
    excess = c.max(axis=-1) - mean
    return np.divide(excess, mean, out=np.zeros_like(mean), where=mean > 0)


def coefficient_of_variation(counts: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Coefficient of variation std(c) / mean(c) along the last axis (docs/model/gate.md).

    Parameters
    ----------
    counts : array_like, shape (..., E)
        Expert loads.

    Returns
    -------
    ndarray, shape (...), float64
        Population standard deviation over the mean; 0 for a balanced or all-zero load.
    """
    c = np.asarray(counts, dtype=np.float64)
    mean = c.mean(axis=-1)
    return np.divide(c.std(axis=-1), mean, out=np.zeros_like(mean), where=mean > 0)


def expert_counts(
    selected: npt.NDArray[np.integer],
    n_experts: int,
    weights: npt.NDArray[np.integer] | None = None,
    dropped: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.int64]:
    """Load of every expert: the number of (token, expert) assignments (docs/model/gate.md).

    Parameters
    ----------
    selected : ndarray, shape (T, k), integer
        Selected experts per token.
    n_experts : int
        ``E``.
    weights : ndarray, shape (T,), integer, optional
        Multiplicity of each token (bootstrap weights); default 1.
    dropped : ndarray, shape (T, k), bool, optional
        Assignments dropped by a capacity (:attr:`Routing.dropped`); they are not counted
        (docs/model/gate.md: loads exclude dropped tokens).

    Returns
    -------
    ndarray, shape (E,), int64
        ``c_i``; sums to ``k · Σ weights`` minus the dropped assignments.
    """
    sel = np.asarray(selected)
    k = sel.shape[1]
    per_pair = None if weights is None else np.repeat(np.asarray(weights, dtype=np.float64), k)
    flat = sel.ravel()
    if dropped is not None and np.any(dropped):
        keep = ~np.asarray(dropped).ravel()
        flat = flat[keep]
        per_pair = None if per_pair is None else per_pair[keep]
    if per_pair is None:
        return np.bincount(flat, minlength=n_experts).astype(np.int64, copy=False)
    return np.rint(np.bincount(flat, weights=per_pair, minlength=n_experts)).astype(np.int64)


def max_vio_global(counts: npt.ArrayLike | list[npt.ArrayLike]) -> float:
    """MaxVio_global (arXiv 2408.15664 Eq. 4): per-layer loads summed over all given samples.

    Parameters
    ----------
    counts : array_like of shape (L, ..., E), or a list of them
        Count arrays of one or more samples (e.g. :attr:`RoutingSample.counts`), all with the
        same layers and experts.

    Returns
    -------
    float
        MaxVio of each layer's accumulated loads, averaged over layers.
    """
    arrays = counts if isinstance(counts, list) else [counts]
    total: npt.NDArray[np.float64] | None = None
    for c in arrays:
        a = np.asarray(c, dtype=np.float64)
        per_layer = a.reshape(a.shape[0], -1, a.shape[-1]).sum(axis=1)
        total = per_layer if total is None else total + per_layer
    if total is None:
        raise ValueError("counts: no samples given")
    return float(max_vio(total).mean())


def max_vio_batch(counts: npt.ArrayLike) -> float:
    """MaxVio_batch (arXiv 2408.15664 Eq. 4): each layer's loads over the whole step, mean over
    layers.

    Parameters
    ----------
    counts : array_like, shape (L, M, n_src, E)
    """
    c = np.asarray(counts)
    return float(max_vio(c.sum(axis=(1, 2))).mean())


def max_vio_compute_batch(counts: npt.ArrayLike, sources_per_batch: int | None = None) -> float:
    """MaxVio_computation-batch (arXiv 2408.15664 Eq. 4; Switch, arXiv 2101.03961), mean over layers
    and batches.

    A computation batch is one micro-batch of the ``sources_per_batch`` consecutive source ranks
    whose tokens meet at the same expert copies — an expert-parallel group, so
    ``micro_batch_size × ep`` sequences. ``None`` takes all source ranks as one batch (the
    micro-batch across the stage); ``1`` gives per-rank micro-batches.

    Parameters
    ----------
    counts : array_like, shape (L, M, n_src, E)
    sources_per_batch : int, optional
        Must divide ``n_src``.
    """
    c = np.asarray(counts)
    n_layers, n_micro, n_src, n_experts = c.shape
    group = n_src if sources_per_batch is None else int(sources_per_batch)
    if group < 1 or n_src % group:
        raise ValueError(f"sources_per_batch: {group} does not divide {n_src} source ranks")
    grouped = c.reshape(n_layers, n_micro, n_src // group, group, n_experts).sum(axis=3)
    return float(max_vio(grouped).mean())


def dead_experts(counts: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Experts with zero load along the last axis (docs/model/gate.md).

    Parameters
    ----------
    counts : array_like, shape (..., E)

    Returns
    -------
    ndarray, shape (...), int64
    """
    c = np.asarray(counts)
    return np.count_nonzero(c == 0, axis=-1).astype(np.int64)


def dropped_fraction(dropped: npt.ArrayLike, assignments: npt.ArrayLike) -> float:
    """Share of (token, expert) assignments dropped by the capacity (docs/model/gate.md).

    Parameters
    ----------
    dropped : array_like
        Dropped assignments (any shape; summed).
    assignments : array_like
        All assignments routed, kept or dropped (any shape; summed).

    Returns
    -------
    float
        In ``[0, 1]``; 0 when nothing was routed.
    """
    total = float(np.sum(assignments, dtype=np.float64))
    return float(np.sum(dropped, dtype=np.float64)) / total if total > 0 else 0.0


def distinct_groups_per_token(
    selected: npt.NDArray[np.integer],
    experts_per_group: int,
    dropped: npt.NDArray[np.bool_] | None = None,
    weights: npt.NDArray[np.integer] | None = None,
) -> float:
    """Mean number of distinct expert groups (nodes, devices) a token reaches (docs/model/gate.md).

    Groups are contiguous blocks of ``experts_per_group`` experts — a node holds ``E /
    ep_nodes`` experts, a device ``E / ep``. Dropped assignments reach nothing; a token whose
    assignments were all dropped counts 0.

    Parameters
    ----------
    selected : ndarray, shape (T, k), integer
    experts_per_group : int
    dropped : ndarray, shape (T, k), bool, optional
    weights : ndarray, shape (T,), integer, optional
        Token multiplicities; default 1.

    Returns
    -------
    float
        Between 0 and ``min(k, groups)``; at least ``ceil(k / experts_per_group)`` when nothing
        is dropped.
    """
    groups = np.sort(np.asarray(selected) // experts_per_group, axis=1)
    first = np.ones(groups.shape, dtype=bool)
    first[:, 1:] = groups[:, 1:] != groups[:, :-1]
    if dropped is not None and np.any(dropped):
        # Sort each row by (group, dropped) so a group's first entry is kept if any is.
        order = np.lexsort((dropped, np.asarray(selected) // experts_per_group), axis=1)
        drop_sorted = np.take_along_axis(dropped, order, axis=1)
        reached = first & ~drop_sorted
    else:
        reached = first
    per_token = np.count_nonzero(reached, axis=1)
    if weights is None:
        return float(per_token.mean()) if per_token.size else 0.0
    w = np.asarray(weights, dtype=np.float64)
    return float((per_token * w).sum() / w.sum()) if w.sum() > 0 else 0.0


def topic_expert_load(
    selected: npt.NDArray[np.integer],
    topic_ids: npt.NDArray[np.integer],
    n_topics: int,
    n_experts: int,
    dropped: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.int64]:
    """The topic × expert load matrix: assignments of each topic's tokens to each expert.

    Specialisation shows as rows concentrated on a few experts (arXiv 2412.19437 Fig. 9;
    docs/model/gate.md; OLMoE, arXiv 2409.02060; arXiv 2412.19437 App. C). Dropped assignments are
    excluded.

    Parameters
    ----------
    selected : ndarray, shape (T, k), integer
    topic_ids : ndarray, shape (T,), integer
        The topic of each token (:meth:`TokenStream.sample`'s second result, flattened).
    n_topics, n_experts : int
    dropped : ndarray, shape (T, k), bool, optional

    Returns
    -------
    ndarray, shape (n_topics, n_experts), int64
        Sums to the kept assignments.
    """
    sel = np.asarray(selected)
    topics = np.asarray(topic_ids).reshape(-1)
    if topics.shape[0] != sel.shape[0]:
        raise ValueError(f"topic_ids: {topics.shape[0]} topics for {sel.shape[0]} tokens")
    flat = (topics[:, None] * n_experts + sel).ravel()
    if dropped is not None:
        flat = flat[~np.asarray(dropped).ravel()]
    return np.bincount(flat, minlength=n_topics * n_experts).reshape(n_topics, n_experts)


def relative_load(load: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Load over the balanced load along the last axis: ``c_i / mean(c)`` (DeepSeek-V3's
    "relative expert load", OLMoE, arXiv 2409.02060; arXiv 2412.19437 App. C); rows with no load
    give 0.

    Parameters
    ----------
    load : array_like, shape (..., E)
    """
    c = np.asarray(load, dtype=np.float64)
    mean = c.mean(axis=-1, keepdims=True)
    return np.divide(c, mean, out=np.zeros_like(c), where=mean > 0)


def min_over_mean(counts: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Load of the least loaded expert over the mean load along the last axis (1 when balanced,
    0 when some expert gets nothing); an all-zero load gives 0.

    Parameters
    ----------
    counts : array_like, shape (..., E)
    """
    c = np.asarray(counts, dtype=np.float64)
    mean = c.mean(axis=-1)
    return np.divide(c.min(axis=-1), mean, out=np.zeros_like(mean), where=mean > 0)


SKEW_STATS = ("maxvio", "cv", "min_over_mean")
"""The skew statistics of one load vector, in the columns of ``routing_by_domain``."""


def load_skew(counts: npt.ArrayLike) -> dict[str, npt.NDArray[np.float64]]:
    """MaxVio, coefficient of variation and min/mean of loads along the last axis.

    Parameters
    ----------
    counts : array_like, shape (..., E)

    Returns
    -------
    dict of str to ndarray, shape (...)
        Keys :data:`SKEW_STATS`.
    """
    return {
        "maxvio": max_vio(counts),
        "cv": coefficient_of_variation(counts),
        "min_over_mean": min_over_mean(counts),
    }


def pooled_load(loads: npt.ArrayLike, tokens: npt.ArrayLike, shares: npt.ArrayLike) -> npt.NDArray:
    """The load of a stream mixing domains by ``shares``, from per-domain loads measured on
    ``tokens`` tokens each: ``Σ_d share_d · load_d / tokens_d`` (expected assignments per token
    of the mixed stream), so each domain weighs by its share, not by its sample size.

    Parameters
    ----------
    loads : array_like, shape (D, E)
    tokens : array_like, shape (D,)
        Tokens routed for each domain's row (all positive).
    shares : array_like, shape (D,)
        The domains' shares of the stream.

    Returns
    -------
    ndarray, shape (E,), float64
    """
    c = np.asarray(loads, dtype=np.float64)
    n = np.asarray(tokens, dtype=np.float64)
    w = np.asarray(shares, dtype=np.float64)
    if c.ndim != 2 or n.shape != (c.shape[0],) or w.shape != (c.shape[0],):
        raise ValueError(f"loads, tokens, shares: shapes {c.shape}, {n.shape}, {w.shape}")
    if np.any(n <= 0):
        raise ValueError("tokens: every domain needs routed tokens")
    return np.asarray((w / n) @ c, dtype=np.float64)
