"""Compiled loops of the gate and of the engine samples' counts (numba), each with a NumPy
twin.

Contract: every kernel here computes, bit for bit, what a NumPy expression elsewhere in the gate
computes — the kernels only remove the temporaries and per-call overheads that dominate at the
gate's small shapes (a few hundred tokens, a few hundred experts). Where a twin's sums would
otherwise be left to BLAS or to NumPy's pairwise reductions, both sides add in one stated
order (index order, from the first product), so they agree and the result does not depend on
a BLAS library's blocking. ``tests/gate/test_gate_fast_paths.py`` checks each against its twin
on inputs with exact ties.

Bias steps:

- :func:`routed_counts` is :class:`moesim.gate.training.LoadCounter` (selection ``s + b`` or
  ``s·b``, group-limited top-k, per-group expert loads) in one pass per token: the largest
  ``per_group`` values of each group, the best ``group_topk`` groups, a lower bound on the
  token's k-th score (``top_k`` values known to be eligible), and a running top-k of the kept
  experts at or above it, counted at once. Exact ties go to the lower index, the rule of
  :func:`moesim.gate.router.top_k_indices`.
- :func:`sign_rule_block` is a block of consecutive bias steps under the sign rule (loads over
  the whole sub-batch, additive float32 bias, no re-centring — DeepSeek-V3's rule): each
  step's :func:`routed_counts` and :func:`moesim.gate.balancing.sign_rule_update`, in one call.
- :func:`adam_repeat` is the element-wise update of ``moesim.gate.training._Adam.repeat``
  in one pass over the weights, with the same float32 operations in the same order.

Full updates:

- :func:`select_top_k` is :func:`moesim.gate.router.select_experts` (the same per-token top-k
  as the counts), returning each token's experts by decreasing selection score.
- :func:`group_keep` is the group limit of :func:`moesim.gate.router.select_experts` (the
  ``group_topk`` groups with the best sums of their largest scores), row by row.
- :func:`row_products`, :func:`expert_forward` and :func:`expert_backward` are the task's
  targets and the experts' forward and backward passes (:mod:`moesim.gate.experts`), one
  token or one (token, expert) assignment at a time.

Engine samples:

- :func:`sample_counts` is the dropless counting of an engine sample
  (:func:`moesim.gate.sampling.routing_sample`): the same selection per token, then its
  bootstrap weight added to its experts, and once to each rank and node they are on.

They run only where numba is installed (:data:`AVAILABLE`) and :data:`ENABLED` is set, on
float32 arrays (the float64 gradient checks take the NumPy twins); the callers keep their NumPy
path otherwise. The loops themselves live in :mod:`moesim.gate.compiled`, imported at the first
call; they are compiled once per machine and cached on disk (tens of seconds on a busy
two-core machine, then 1–2 s to load them, numba included, in a new process).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Any

import numpy as np
import numpy.typing as npt

AVAILABLE = importlib.util.find_spec("numba") is not None
# Largest |logit| the router's scores pass to exp (moesim.gate.router.scores_from_logits).
EXP_LIMIT = 80.0
# Off with MOESIM_GATE_KERNELS=numpy (the NumPy twins then run; results are the same).
ENABLED = AVAILABLE and os.environ.get("MOESIM_GATE_KERNELS", "numba") != "numpy"


@functools.cache
def _compiled() -> Any:
    """The numba loops (:mod:`moesim.gate.compiled`), imported at first use: importing numba
    takes about a second, which a run that never reaches a bias step need not pay."""
    return importlib.import_module("moesim.gate.compiled")


def _selection_mode(multiply: bool, from_exp: bool, caller: str) -> int:
    """The compiled loops' selection mode: 0 ``scores + bias``, 1 ``scores·bias``, 2 a
    sigmoid's ``exp(−logits)`` plus the bias (additive only)."""
    if from_exp and multiply:
        raise ValueError(f"{caller}: from_exp needs an additive bias")
    return 2 if from_exp else int(multiply)


def routed_counts(
    scores: npt.NDArray[np.floating],
    bias: npt.NDArray[np.floating],
    multiply: bool,
    top_k: int,
    n_groups: int,
    group_topk: int | None,
    starts: npt.NDArray[np.int64] | None = None,
    from_exp: bool = False,
) -> npt.NDArray[np.int64]:
    """Expert loads of the top-k selection on ``scores + bias`` (``scores·bias`` when
    ``multiply``), group-limited when ``group_topk < n_groups``: shape (G, E) for the token
    groups starting at ``starts`` (default one group starting at 0).

    The values are those of :class:`moesim.gate.training.LoadCounter` on the selection scores
    (whose ties take :func:`moesim.gate.router.select_experts`' choice: the lower index); the
    scores must be finite (no NaN). ``scores`` and ``bias`` share one float dtype. With
    ``from_exp`` (additive bias only) ``scores`` holds a sigmoid router's ``exp(−logits)``, as
    in :func:`sample_counts`.
    """
    mode = _selection_mode(multiply, from_exp, "routed_counts")
    n_tokens, n_experts = scores.shape
    limit = n_groups if group_topk is None else min(group_topk, n_groups)
    per_group = min(n_experts // n_groups, max(1, top_k // limit))
    if starts is None:
        starts = np.zeros(1, dtype=np.int64)
    counts = np.zeros((starts.size, n_experts), dtype=np.int64)
    low, high = exp_clip_bounds(scores.dtype)
    _compiled().routed_counts(
        scores, bias.astype(scores.dtype, copy=False), mode, low,
        high, top_k, n_groups, limit, per_group, starts, counts,
    )  # fmt: skip
    return counts


def sign_rule_block(
    scores: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32],
    gammas: npt.NDArray[np.float32],
    top_k: int,
    n_groups: int,
    group_topk: int | None,
    from_exp: bool = False,
) -> None:
    """Consecutive sign-rule bias steps on an additive float32 bias, in place: step ``r``
    selects on ``scores[r·T:(r+1)·T] + bias`` (``T`` = rows / steps), counts the loads over
    the whole sub-batch as :func:`routed_counts` does, and moves ``bias`` by
    ``γ_r·sign(c̄ − c)`` as :func:`moesim.gate.balancing.sign_rule_update` does (nothing where
    ``γ_r`` is 0) — the same values as one :func:`routed_counts` and one update per step.

    With ``from_exp``, ``scores`` holds ``exp(−logits)`` taken without clipping the logits,
    and each selection score is the sigmoid :func:`moesim.gate.router.scores_from_logits`
    gives for them, computed in the loop (the same float32 values: the clip becomes a clamp
    of the exponential to NumPy's ``exp(±80)``), so that the scores need no pass of their
    own."""
    n_rows, n_experts = scores.shape
    steps = gammas.size
    if steps == 0 or n_rows % steps:
        raise ValueError(f"gammas: {steps} steps do not split {n_rows} rows")
    limit = n_groups if group_topk is None else min(group_topk, n_groups)
    per_group = min(n_experts // n_groups, max(1, top_k // limit))
    low, high = exp_clip_bounds(scores.dtype)
    _compiled().sign_rule_block(
        scores, bias, gammas, n_rows // steps, top_k, n_groups, limit, per_group, from_exp,
        low, high,
    )  # fmt: skip


@functools.cache
def exp_clip_bounds(dtype: np.dtype[Any]) -> tuple[np.floating[Any], np.floating[Any]]:
    """``exp(−80)`` and ``exp(80)`` in ``dtype`` as NumPy's ``exp`` computes them on an array
    (the values a sigmoid's clipped logits give)."""
    limit = np.full(64, EXP_LIMIT, dtype=dtype)
    return np.exp(-limit)[0], np.exp(limit)[0]


# --------------------------------------------------------------------------- full updates


def select_top_k(
    scores: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32] | None,
    multiply: bool,
    top_k: int,
    n_groups: int,
    group_topk: int | None,
) -> npt.NDArray[np.int64] | None:
    """Each token's experts under :func:`moesim.gate.router.select_experts` on ``scores +
    bias`` (``scores·bias`` when ``multiply``; no bias when None), shape (T, top_k): the
    same experts, by decreasing selection score, an exact tie in index order — the order
    ``select_experts`` gives them. ``scores`` (T, E) float32, ``1 ≤ top_k ≤ E``; None when
    a NaN selection score leaves a token without ``top_k`` ranked experts (NumPy's selection
    then decides)."""
    n_tokens, n_experts = scores.shape
    if bias is None:
        bias = np.full(n_experts, 1.0 if multiply else 0.0, dtype=scores.dtype)
    if group_topk is None or group_topk >= n_groups:
        n_groups = group_topk = 1  # no group limit: one group of every expert
    limit = group_topk
    per_group = min(n_experts // n_groups, max(1, top_k // limit))
    selected = np.empty((n_tokens, top_k), dtype=np.int64)
    unranked = _compiled().select_top_k(
        scores, bias, multiply, top_k, n_groups, limit, per_group, selected
    )  # fmt: skip
    return None if unranked else selected


def sort_by_expert(
    selected: npt.NDArray[np.int64], dropped: npt.NDArray[np.bool_], n_experts: int
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
]:
    """The kept assignments of ``selected`` (T, k) sorted by expert, stably (slot order within
    an expert): ``(slot, owner, rows, counts, starts)`` — positions in ``selected.ravel()``,
    experts, tokens, and each expert's count and first position; the arrays of
    :func:`moesim.gate.experts._sort_assignments`' stable argsort."""
    size = selected.size
    slot = np.empty(size, dtype=np.int64)
    owner = np.empty(size, dtype=np.int64)
    rows = np.empty(size, dtype=np.int64)
    counts = np.empty(n_experts, dtype=np.int64)
    starts = np.empty(n_experts, dtype=np.int64)
    kept = _compiled().sort_by_expert(
        np.ascontiguousarray(selected, dtype=np.int64), dropped, counts, starts, slot, owner, rows
    )
    return slot[:kept], owner[:kept], rows[:kept], counts, starts


def draw_topics(
    mixtures: npt.NDArray[np.float64], uniforms: npt.NDArray[np.float64]
) -> npt.NDArray[np.int64]:
    """Each token's topic, shape of ``uniforms`` (sequences, tokens): the inverse-CDF draw of
    :meth:`moesim.gate.stream.TokenStream.sample` from each sequence's topic mixture
    (sequences, topics; non-negative), the same indices as its NumPy lines."""
    topic_ids = np.empty(uniforms.shape, dtype=np.int64)
    _compiled().draw_topics(mixtures, uniforms, topic_ids)
    return topic_ids


def gather_add(
    first: npt.NDArray[np.float32],
    first_rows: npt.NDArray[np.int64],
    second: npt.NDArray[np.float32],
    second_rows: npt.NDArray[np.int64],
) -> npt.NDArray[np.float32]:
    """``first[first_rows] + second[second_rows]`` in one pass (row indices of any shape; the
    result has their shape plus the rows' width): the token stream's noise plus topic
    centroid, without the two gathered temporaries."""
    out = np.empty((*first_rows.shape, first.shape[1]), dtype=first.dtype)
    _compiled().gather_add(
        first, first_rows.ravel(), second, second_rows.ravel(), out.reshape(-1, first.shape[1])
    )
    return out


def scaled_step(
    weights: npt.NDArray[np.float32],
    rates: npt.NDArray[np.float32],
    grad: npt.NDArray[np.float32],
) -> None:
    """``weights -= rates[:, None, …] * grad`` in place without the product's temporary (the
    same float32 product and difference per element): an SGD step with one rate per leading
    index. C-contiguous arrays of one shape, ``rates`` one per leading index."""
    _compiled().scaled_step(weights, rates, grad)


def row_products(
    x: npt.NDArray[np.float32],
    maps_t: npt.NDArray[np.float32],
    which: npt.NDArray[np.int64],
) -> npt.NDArray[np.float32]:
    """``out[t] = M_{which[t]} x_t`` for maps given transposed, ``maps_t`` (M, D, O): each sum
    over ``d`` in index order from its first product — the NumPy loop of
    :meth:`moesim.gate.experts.ExpertTask.target`."""
    out = np.empty((x.shape[0], maps_t.shape[2]), dtype=x.dtype)
    _compiled().row_products(x, maps_t, which, out)
    return out


def expert_forward(
    x: npt.NDArray[np.float32],
    rows: npt.NDArray[np.int64],
    owner: npt.NDArray[np.int64],
    up: npt.NDArray[np.float32],
    down: npt.NDArray[np.float32],
    hidden: npt.NDArray[np.float32],
    outs: npt.NDArray[np.float32],
) -> None:
    """For each assignment ``a`` (token ``rows[a]``, expert ``owner[a]``), into ``hidden[a]``
    and ``outs[a]``: ``h = U_e x_t`` and ``V_e relu(h)``, each sum added in index order from
    its first product — the NumPy loops of :func:`moesim.gate.experts._expert_forward`."""
    _compiled().expert_forward(x, rows, owner, up, down, hidden, outs)


def expert_backward(
    x: npt.NDArray[np.float32],
    rows: npt.NDArray[np.int64],
    owner: npt.NDArray[np.int64],
    down: npt.NDArray[np.float32],
    d_out: npt.NDArray[np.float32],
    hidden: npt.NDArray[np.float32],
    grad_up: npt.NDArray[np.float32],
    grad_down: npt.NDArray[np.float32],
) -> None:
    """The experts' weight gradients of :func:`moesim.gate.experts._expert_backward` into
    ``grad_up`` (E, H, D) and ``grad_down`` (E, O, H): from zero, each assignment's outer
    products added in assignment order."""
    _compiled().expert_backward(
        x, rows, owner, down, np.ascontiguousarray(d_out), hidden, grad_up, grad_down
    )


# --------------------------------------------------------------------------- bias steps (Adam)


def adam_repeat(
    weights: npt.NDArray[np.float32],
    m: npt.NDArray[np.float32],
    v: npt.NDArray[np.float32],
    first: npt.NDArray[np.float32],
    second: npt.NDArray[np.float32],
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    negated: npt.NDArray[np.float32] | None = None,
) -> None:
    """In place, per element: ``m ← β1·m + first``, ``v ← β2·v + second``,
    ``w ← w − (m / (√v + eps))·step_size`` — every operation in float32 (the scalars rounded to
    float32 first), as ``moesim.gate.training._Adam.repeat`` does; with ``negated``, ``−w``
    into it as well. All arrays C-contiguous and of one shape."""
    f32 = np.float32
    _compiled().adam_repeat(
        weights, m, v, first, second, f32(beta1), f32(beta2), f32(eps), f32(step_size),
        weights if negated is None else negated, negated is not None,
    )  # fmt: skip


def adam_repeats(
    weights: npt.NDArray[np.float32],
    m: npt.NDArray[np.float32],
    v: npt.NDArray[np.float32],
    first: npt.NDArray[np.float32],
    second: npt.NDArray[np.float32],
    beta1: float,
    beta2: float,
    eps: npt.NDArray[np.float32],
    step_sizes: npt.NDArray[np.float32],
) -> None:
    """:func:`adam_repeat` with ``eps[r]`` and ``step_sizes[r]`` for r = 0, 1, … in one call
    (the same values as one call each)."""
    f32 = np.float32
    _compiled().adam_repeats(weights, m, v, first, second, f32(beta1), f32(beta2), eps, step_sizes)


def group_keep(
    selection: npt.NDArray[np.float32], n_groups: int, group_topk: int, per_group: int
) -> npt.NDArray[np.bool_]:
    """The groups each token keeps under group-limited routing, shape (T, n_groups): the
    ``group_topk`` best by the sum of their ``per_group`` largest selection scores, added
    largest first; an equal score loses to the lower group index — the keep mask of
    :func:`moesim.gate.router.select_experts`' group limit. ``selection`` (T, E) is finite."""
    keep = np.empty((selection.shape[0], n_groups), dtype=np.bool_)
    _compiled().group_keep(selection, n_groups, group_topk, per_group, keep)
    return keep


def sample_counts(
    scores: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32],
    multiply: bool,
    top_k: int,
    n_groups: int,
    group_topk: int | None,
    weights: npt.NDArray[np.int64],
    n_cells: int,
    n_ranks: int,
    n_nodes: int,
    from_exp: bool = False,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """An engine sample's dropless counts in one pass over its routed tokens: the top-k
    selection on ``scores + bias`` (``scores·bias`` when ``multiply``), group-limited when
    ``group_topk < n_groups``, exactly :func:`moesim.gate.router.select_experts`' choice (ties
    to the lower index); then, per cell of ``T / n_cells`` consecutive tokens, each token's
    ``weights`` added to its experts' counts, once to every rank (of ``n_ranks`` contiguous
    blocks of experts) and once to every node (``n_nodes`` blocks) its experts are on — the
    values of :func:`moesim.gate.sampling.routing_sample`'s NumPy path (``bincount`` of the
    routed assignments and of the distinct ranks and nodes per token).

    With ``from_exp`` (additive bias only) ``scores`` holds ``exp(−logits)`` of a sigmoid
    router, the sigmoid taken in the loop (:func:`sign_rule_block`'s form: the same scores).

    Returns ``counts`` (n_cells, E), ``dest`` (n_cells, n_ranks) and ``node`` (n_cells,
    n_nodes), int64.
    """
    n_tokens, n_experts = scores.shape
    mode = _selection_mode(multiply, from_exp, "sample_counts")
    if n_tokens % n_cells or n_experts % n_ranks or n_experts % n_nodes:
        raise ValueError(
            f"sample_counts: {n_tokens} tokens, {n_experts} experts do not split into "
            f"{n_cells} cells, {n_ranks} ranks, {n_nodes} nodes"
        )
    limit = n_groups if group_topk is None else min(group_topk, n_groups)
    per_group = min(n_experts // n_groups, max(1, top_k // limit))
    counts = np.zeros((n_cells, n_experts), dtype=np.int64)
    dest = np.zeros((n_cells, n_ranks), dtype=np.int64)
    node = np.zeros((n_cells, n_nodes), dtype=np.int64)
    low, high = exp_clip_bounds(scores.dtype)
    unranked = _compiled().sample_counts(
        scores, bias.astype(scores.dtype, copy=False), mode, low,
        high, top_k, n_groups, limit, per_group, n_tokens // n_cells, weights,
        n_experts // n_ranks, n_experts // n_nodes, counts, dest, node,
    )  # fmt: skip
    if unranked:
        raise ValueError(
            f"sample_counts: {unranked} of {n_tokens} tokens have NaN router scores "
            "(the gate diverged); a routing sample needs finite scores"
        )
    return counts, dest, node
