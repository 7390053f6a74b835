"""The numba loops behind :mod:`moesim.gate.kernels` (imported only when a kernel first runs,
so that importing the gate does not import numba). Each is compiled without fast-math (no
reassociation, no contraction into fused multiply-adds), so that every floating-point operation
rounds as NumPy's does, and cached on disk (``cache=True``): a machine compiles them once."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np


def _jit(fn: Any) -> Any:
    return numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")(fn)


def _jit_inline(fn: Any) -> Any:
    """:func:`_jit`, inlined into its callers' per-token loops (a call per token cost about a
    tenth of a block of bias steps)."""
    return numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")(
        fn
    )


@_jit
def insert(values: Any, index: Any, filled: int, size: int, value: Any, at: int) -> int:
    """Insert ``(value, at)`` into the descending run ``values[:filled]`` (at most ``size``
    long); an equal value stays ahead, so the earlier index wins a tie. Returns the new
    length."""
    if filled == size and not value > values[size - 1]:
        return filled
    i = filled if filled < size else size - 1
    while i > 0 and values[i - 1] < value:
        values[i] = values[i - 1]
        index[i] = index[i - 1]
        i -= 1
    values[i] = value
    index[i] = at
    return filled + 1 if filled < size else filled


@_jit
def group_pass(
    selection: Any,
    n_groups: int,
    per_group: int,
    group_topk: int,
    first: Any,
    second: Any,
    tops: Any,
    top_index: Any,
    group_score: Any,
    kept: Any,
    keep: Any,
    lanes_hi: Any,
    lanes_lo: Any,
) -> None:
    """One token's group limit: ``keep[g]`` for the ``group_topk`` best groups of the row
    ``selection`` (a group's score the sum of its ``per_group`` largest values, largest first;
    an equal score loses to the lower group index), ``kept`` their indices, and for
    ``per_group <= 2`` each group's largest and second largest values in ``first``, ``second``.
    ``lanes_hi`` and ``lanes_lo`` are work arrays of half the row's length."""
    group_size = selection.size // n_groups
    lowest = selection.dtype.type(-np.inf)
    power_of_two = group_size >= 2 and group_size & (group_size - 1) == 0
    if (
        per_group <= 2
        and power_of_two
        and group_top2(selection, n_groups, first, second, lanes_hi, lanes_lo)
    ):
        for g in range(n_groups):
            # Largest first, as a sorted row is summed.
            group_score[g] = first[g] + second[g] if per_group == 2 else first[g]
    elif per_group <= 2 and group_size % 4 == 0:
        for g in range(n_groups):
            # The two largest of the group's values: four interleaved running pairs
            # (independent chains), merged pairwise (max and min are exact: the same values).
            base = g * group_size
            a1, a2, b1, b2 = lowest, lowest, lowest, lowest
            c1, c2, d1, d2 = lowest, lowest, lowest, lowest
            for j in range(base, base + group_size, 4):
                u, v, w, z = selection[j], selection[j + 1], selection[j + 2], selection[j + 3]
                a2 = max(a2, min(a1, u))
                a1 = max(a1, u)
                b2 = max(b2, min(b1, v))
                b1 = max(b1, v)
                c2 = max(c2, min(c1, w))
                c1 = max(c1, w)
                d2 = max(d2, min(d1, z))
                d1 = max(d1, z)
            a2 = max(min(a1, b1), max(a2, b2))
            a1 = max(a1, b1)
            c2 = max(min(c1, d1), max(c2, d2))
            c1 = max(c1, d1)
            first[g] = max(a1, c1)
            second[g] = max(min(a1, c1), max(a2, c2))
            # Largest first, as a sorted row is summed.
            group_score[g] = first[g] + second[g] if per_group == 2 else first[g]
    elif per_group <= 2:
        for g in range(n_groups):
            # The two largest of the group's values: two interleaved running pairs
            # (independent chains), then merged.
            base = g * group_size
            a1, a2, b1, b2 = selection[base], lowest, lowest, lowest
            for j in range(1, group_size - 1, 2):
                v, w = selection[base + j], selection[base + j + 1]
                a2 = max(a2, min(a1, v))
                a1 = max(a1, v)
                b2 = max(b2, min(b1, w))
                b1 = max(b1, w)
            if group_size % 2 == 0:
                v = selection[base + group_size - 1]
                a2 = max(a2, min(a1, v))
                a1 = max(a1, v)
            first[g] = max(a1, b1)
            second[g] = max(min(a1, b1), max(a2, b2))
        for g in range(n_groups):
            # Largest first, as a sorted row is summed.
            group_score[g] = first[g] + second[g] if per_group == 2 else first[g]
    else:
        for g in range(n_groups):
            filled = 0
            for e in range(g * group_size, (g + 1) * group_size):
                filled = insert(tops, top_index, filled, per_group, selection[e], e)
            total = tops[0]
            for i in range(1, per_group):
                total += tops[i]
            group_score[g] = total
    rank_groups(group_score, group_topk, keep, kept)


@_jit_inline
def group_top2(
    selection: Any, n_groups: int, first: Any, second: Any, lanes_hi: Any, lanes_lo: Any
) -> bool:
    """Each group's largest and second largest value into ``first``, ``second`` (groups of a
    power-of-two size, at least 2), or False when the row holds a NaN (then they are not set).

    A tournament the compiler vectorises: neighbours ``2i``, ``2i + 1`` (always in one group)
    give the larger to ``lanes_hi[i]`` and the smaller to ``lanes_lo[i]``; then neighbouring
    pairs merge in place, halving the lanes, until each group has one. Every loop is flat over
    the row (a loop over one group's few lanes is too short to vectorise), and uses
    comparisons and selects, not ``max``/``min``: without NaNs they give the same values,
    since the largest and second largest of a set do not depend on the order they are taken
    in."""
    n = selection.size // 2
    nans = 0
    for i in range(n):
        u, v = selection[2 * i], selection[2 * i + 1]
        lanes_hi[i] = u if u > v else v
        lanes_lo[i] = v if u > v else u
        nans += (u != u) | (v != v)
    if nans:
        return False
    while n > n_groups:
        n //= 2
        for i in range(n):
            a1, b1 = lanes_hi[2 * i], lanes_hi[2 * i + 1]
            a2, b2 = lanes_lo[2 * i], lanes_lo[2 * i + 1]
            beaten = a1 if a1 < b1 else b1
            rest = a2 if a2 > b2 else b2
            lanes_hi[i] = a1 if a1 > b1 else b1
            lanes_lo[i] = beaten if beaten > rest else rest
    for g in range(n_groups):
        first[g], second[g] = lanes_hi[g], lanes_lo[g]
    return True


@_jit_inline
def rank_among(values: Any, n: int, i: int) -> int:
    """The rank of ``values[i]`` among ``values[:n]``, largest first: how many are larger, or
    equal at a lower index. Independent comparisons, without the unpredictable branches of a
    sorted insertion; the ranks of ``n`` values without NaN are ``0 … n − 1``."""
    value = values[i]
    rank = 0
    for j in range(n):
        other = values[j]
        rank += (other > value) | ((other == value) & (j < i))
    return rank


@_jit_inline
def rank_groups(group_score: Any, group_topk: int, keep: Any, kept: Any) -> None:
    """``keep[g]`` for the ``group_topk`` best group scores (an equal score: the lower index
    wins), and ``kept`` their indices in index order, by :func:`rank_among`. A NaN score (a
    NaN value, or +inf and −inf summed) ranks below every other, as in NumPy's selection
    (top_k_mask sorts NaN last), NaN scores among themselves by index."""
    n_groups = group_score.size
    filled = 0
    for g in range(n_groups):
        score = group_score[g]
        if score == score:  # NaN scores are never ahead of it (comparisons with NaN are false)
            rank = rank_among(group_score, n_groups, g)
        else:
            rank = 0
            for j in range(n_groups):
                other = group_score[j]
                rank += (other == other) | (j < g)
        keep[g] = rank < group_topk
        kept[filled] = g
        filled += rank < group_topk


@_jit_inline
def at_or_above(
    selection: Any, kept: Any, n_kept: int, group_size: int, floor: Any, candidates: Any
) -> int:
    """The experts of the groups ``kept[:n_kept]`` (in index order) whose value is at least
    ``floor``, into ``candidates`` in index order (a branch-free compaction); how many."""
    n = 0
    for i in range(n_kept):
        base = kept[i] * group_size
        for e in range(base, base + group_size):
            candidates[n] = e
            n += selection[e] >= floor
    return n


@_jit_inline
def top_k_row(
    selection: Any,
    top_k: int,
    n_groups: int,
    group_topk: int,
    per_group: int,
    scratch: Any,
    candidates: Any,
    best_values: Any,
    best: Any,
) -> int:
    """One token's experts, in ``best``: the top ``top_k`` of the row ``selection`` among the
    ``group_topk`` best of its ``n_groups`` groups (all of them when ``group_topk ==
    n_groups``); exact ties go to the lower index. They are written largest first (an equal
    value: the lower index first); ``best`` has ``top_k + 1`` slots, the last a spare one.
    Returns how many were found: ``top_k``, fewer only when NaN scores leave too few
    candidates. ``scratch`` holds :func:`group_pass`' work arrays."""
    first, second, tops, top_index, group_score, kept, keep = scratch[:7]
    lanes_hi, lanes_lo, candidate_values = scratch[7:]
    n_experts = selection.size
    group_size = n_experts // n_groups
    lowest, highest = selection.dtype.type(-np.inf), selection.dtype.type(np.inf)
    # floor: a value no larger than the token's k-th largest eligible selection score (the
    # smallest of top_k eligible values), so that only values >= floor need ranking.
    floor = lowest
    if group_topk < n_groups:
        group_pass(
            selection, n_groups, per_group, group_topk, first, second, tops, top_index,
            group_score, kept, keep, lanes_hi, lanes_lo,
        )  # fmt: skip
        if per_group <= 2 and group_topk * per_group >= top_k:
            floor = highest
            for i in range(group_topk):
                g = kept[i]
                low = second[g] if per_group == 2 else first[g]
                floor = min(floor, low)
    else:
        keep[:] = True
        for g in range(n_groups):
            kept[g] = g
        group_topk = n_groups
        if top_k < n_experts:
            # The maxima of top_k disjoint runs of the row are top_k of its values.
            floor = highest
            for i in range(top_k):
                lo, hi = i * n_experts // top_k, (i + 1) * n_experts // top_k
                peak = selection[lo]
                for e in range(lo + 1, hi):
                    peak = max(peak, selection[e])
                floor = min(floor, peak)
    n_candidates = at_or_above(selection, kept, group_topk, group_size, floor, candidates)
    if n_candidates <= 4 * top_k:
        # Few candidates (the usual case): each one's rank among them (rank_among; they are
        # in index order), placed by rank, so that the top_k come largest first (an equal
        # value: the lower index first). Without branches: a rank past top_k goes to the
        # spare slot best[top_k].
        for i in range(n_candidates):
            candidate_values[i] = selection[candidates[i]]
        found = 0
        for i in range(n_candidates):
            rank = rank_among(candidate_values, n_candidates, i)
            best[rank if rank < top_k else top_k] = candidates[i]
            found += rank < top_k
        return found
    # A running top-k, largest first; an equal value stays behind the earlier (lower) index.
    filled = 0
    for i in range(n_candidates):
        e = candidates[i]
        filled = insert(best_values, best, filled, top_k, selection[e], e)
    return filled


@_jit
def selection_scratch(
    n_experts: int, n_groups: int, group_topk: int, per_group: int, dtype: Any
) -> Any:
    """Work arrays of :func:`top_k_row` for rows of ``n_experts`` values of ``dtype``."""
    return (
        np.empty(n_groups, dtype=dtype),  # each group's largest value
        np.empty(n_groups, dtype=dtype),  # and its second largest
        np.empty(per_group, dtype=dtype),
        np.empty(per_group, dtype=np.int64),
        np.empty(n_groups, dtype=dtype),  # group scores
        np.empty(n_groups, dtype=np.int64),  # kept groups (the first group_topk)
        np.ones(n_groups, dtype=np.bool_),  # keep mask
        np.empty(n_experts // 2, dtype=dtype),  # group_top2's lanes: the larger values
        np.empty(n_experts // 2, dtype=dtype),  # and the smaller
        np.empty(n_experts, dtype=dtype),  # candidates' values
    )


@_jit_inline
def sigmoid_of_exp(value: Any, low: Any, high: Any, one: Any) -> Any:
    """The sigmoid score ``1 / (1 + e)`` from ``e = exp(−logit)`` taken without the clip of the
    logit at ``±80``: clamping ``e`` to ``[low, high] = [exp(−80), exp(80)]`` (NumPy's own
    values) is that clip, since ``exp`` is increasing and its result for a logit beyond the
    clip is dozens of ulps past the bound; a NaN stays NaN. Then the float32 operations of the
    gate's sigmoid (``+ 1``, a correctly rounded reciprocal; ``one`` is 1 in the scores'
    type)."""
    if value > high:
        value = high
    if value < low:
        value = low
    return one / (one + value)


@_jit_inline
def selection_row(row: Any, bias: Any, mode: int, low: Any, high: Any, one: Any,
                  selection: Any) -> None:  # fmt: skip
    """A token's selection scores into ``selection``: ``row + bias`` (``mode`` 0),
    ``row·bias`` (1) or ``1 / (1 + clamp(row, low, high)) + bias`` (2, ``row`` in exp form:
    :func:`sigmoid_of_exp`)."""
    if mode == 1:
        for e in range(row.size):
            selection[e] = row[e] * bias[e]
    elif mode == 2:
        for e in range(row.size):
            selection[e] = sigmoid_of_exp(row[e], low, high, one) + bias[e]
    else:
        for e in range(row.size):
            selection[e] = row[e] + bias[e]


@_jit
def routed_top_k(
    scores: Any,
    bias: Any,
    mode: int,
    low: Any,
    high: Any,
    top_k: int,
    n_groups: int,
    group_topk: int,
    per_group: int,
    starts: Any,
    counts: Any,
    selected: Any,
    record: bool,
) -> int:
    """Every token's group-limited top-k (:func:`top_k_row`) on ``scores + bias`` (``mode``
    0), ``scores·bias`` (1) or ``1 / (1 + clamp(scores, low, high)) + bias`` (2: ``scores``
    holds unclipped ``exp(−logits)``, see :func:`sigmoid_of_exp`), counted into ``counts``
    per token group (``starts``), and with ``record`` written to ``selected`` largest first
    (an equal score: the lower index first). A token with NaN scores that leave fewer than
    ``top_k`` candidates is skipped and counted in the return value, so that a caller can take
    another path.

    A group limit whose kept groups' ``per_group <= 2`` largest values number at least
    ``top_k`` (DeepSeek-V3's node limit) takes :func:`top_k_row`'s floor, candidates and ranks
    written out in this loop: the same experts in the same order, about a fifth faster than
    through :func:`top_k_row`, for reasons not found (docs/decisions/2026-12-05-gate-speed.md,
    part 6). There, without ``record``, each candidate adds ``rank < top_k`` to its expert's
    count, and no token's experts are listed."""
    n_tokens, n_experts = scores.shape
    dtype = scores.dtype
    one = dtype.type(1.0)
    selection = np.empty(n_experts, dtype=dtype)
    scratch = selection_scratch(n_experts, n_groups, group_topk, per_group, dtype)
    first, second, tops, top_index, group_score, kept, keep = scratch[:7]
    lanes_hi, lanes_lo, candidate_values = scratch[7:]
    candidates = np.empty(n_experts, dtype=np.int64)
    best_values = np.empty(top_k, dtype=dtype)
    best = np.empty(top_k + 1, dtype=np.int64)  # top_k_row's spare slot at the end
    floored = group_topk < n_groups and per_group <= 2 and group_topk * per_group >= top_k
    group_size = n_experts // n_groups
    unranked = 0
    segment = 0
    for t in range(n_tokens):
        while segment + 1 < starts.size and t >= starts[segment + 1]:
            segment += 1
        selection_row(scores[t], bias, mode, low, high, one, selection)
        if not floored:
            found = top_k_row(
                selection, top_k, n_groups, group_topk, per_group, scratch, candidates,
                best_values, best,
            )  # fmt: skip
        else:
            group_pass(
                selection, n_groups, per_group, group_topk, first, second, tops, top_index,
                group_score, kept, keep, lanes_hi, lanes_lo,
            )  # fmt: skip
            floor = dtype.type(np.inf)
            for i in range(group_topk):
                g = kept[i]
                floor = min(floor, second[g] if per_group == 2 else first[g])
            n = at_or_above(selection, kept, group_topk, group_size, floor, candidates)
            found = min(n, top_k)  # fewer only when NaN scores left too few candidates
            if top_k <= n <= 4 * top_k:
                for i in range(n):
                    candidate_values[i] = selection[candidates[i]]
                if not record:
                    for i in range(n):
                        rank = rank_among(candidate_values, n, i)
                        counts[segment, candidates[i]] += rank < top_k
                    continue
                for i in range(n):
                    rank = rank_among(candidate_values, n, i)
                    best[rank if rank < top_k else top_k] = candidates[i]
            elif n > 4 * top_k:
                filled = 0
                for i in range(n):
                    e = candidates[i]
                    filled = insert(best_values, best, filled, top_k, selection[e], e)
        if found < top_k:
            unranked += 1
            continue
        for i in range(top_k):
            counts[segment, best[i]] += 1
        if record:
            for i in range(top_k):
                selected[t, i] = best[i]
    return unranked


@_jit
def routed_counts(
    scores: Any,
    bias: Any,
    mode: int,
    low: Any,
    high: Any,
    top_k: int,
    n_groups: int,
    group_topk: int,
    per_group: int,
    starts: Any,
    counts: Any,
) -> None:
    no_record = np.empty((1, 1), dtype=np.int64)
    routed_top_k(
        scores, bias, mode, low, high, top_k, n_groups, group_topk, per_group, starts, counts,
        no_record, False,
    )  # fmt: skip


@_jit
def select_top_k(
    scores: Any,
    bias: Any,
    multiply: bool,
    top_k: int,
    n_groups: int,
    group_topk: int,
    per_group: int,
    selected: Any,
) -> int:
    starts = np.zeros(1, dtype=np.int64)
    counts = np.zeros((1, scores.shape[1]), dtype=np.int64)
    none = scores.dtype.type(0)
    return routed_top_k(
        scores, bias, 1 if multiply else 0, none, none, top_k, n_groups, group_topk,
        per_group, starts, counts, selected, True,
    )  # fmt: skip


@_jit
def sign_rule_block(
    scores: Any,
    bias: Any,
    gammas: Any,
    tokens: int,
    top_k: int,
    n_groups: int,
    group_topk: int,
    per_group: int,
    from_exp: bool,
    low: Any,
    high: Any,
) -> None:
    n_experts = scores.shape[1]
    starts = np.zeros(1, dtype=np.int64)
    counts = np.zeros((1, n_experts), dtype=np.int64)
    no_record = np.empty((1, 1), dtype=np.int64)
    for r in range(gammas.size):
        counts[:] = 0
        rows = scores[r * tokens : (r + 1) * tokens]
        routed_top_k(
            rows, bias, 2 if from_exp else 0, low, high, top_k, n_groups, group_topk,
            per_group, starts, counts, no_record, False,
        )  # fmt: skip
        gamma = gammas[r]
        if not gamma > 0:
            continue
        total = 0
        for e in range(n_experts):
            total += counts[0, e]
        for e in range(n_experts):
            error = total - n_experts * counts[0, e]  # sign(c̄ − c_e), in exact integers
            step = np.float32(1.0) if error > 0 else np.float32(-1.0 if error < 0 else 0.0)
            bias[e] += step * gamma


# --------------------------------------------------------------------------- full updates
# The experts' forward and backward passes of moesim.gate.experts, one assignment at a time.


@_jit
def row_products(x: Any, maps_t: Any, which: Any, out: Any) -> None:
    """``out[t] = maps[which[t]] @ x[t]`` (``maps_t`` the maps transposed, (M, D, O)), each
    sum in index order from its first product."""
    n_dim, n_out = maps_t.shape[1], maps_t.shape[2]
    for t in range(x.shape[0]):
        m = which[t]
        row = out[t]
        x0 = x[t, 0]
        for o in range(n_out):
            row[o] = maps_t[m, 0, o] * x0
        for d in range(1, n_dim):
            xd = x[t, d]
            for o in range(n_out):
                row[o] += maps_t[m, d, o] * xd


@_jit
def sort_by_expert(
    selected: Any, dropped: Any, counts: Any, starts: Any, slot: Any, owner: Any, rows: Any
) -> int:
    """The kept assignments of ``selected`` (T, k) in expert order, each expert's in slot order
    (a stable counting sort): their slots, experts and tokens; each expert's count and first
    position. Returns how many are kept."""
    n_tokens, k = selected.shape
    counts[:] = 0
    for t in range(n_tokens):
        for j in range(k):
            if not dropped[t, j]:
                counts[selected[t, j]] += 1
    total = 0
    for e in range(counts.size):
        starts[e] = total
        total += counts[e]
    filled = starts.copy()
    for t in range(n_tokens):
        for j in range(k):
            if not dropped[t, j]:
                e = selected[t, j]
                at = filled[e]
                filled[e] = at + 1
                slot[at] = t * k + j
                owner[at] = e
                rows[at] = t
    return total


@_jit
def draw_topics(mixtures: Any, uniforms: Any, topic_ids: Any) -> None:
    """``topic_ids[s, t]``: the inverse-CDF draw of uniform ``uniforms[s, t]`` from sequence
    ``s``'s mixture, as :meth:`moesim.gate.stream.TokenStream.sample` takes it with NumPy — the
    cumulative sum shifted by ``s`` and the uniform shifted by ``s`` (the same float64 sums),
    the count of cumulative values at or below it (``searchsorted(..., side="right")`` in a
    non-decreasing row), clipped to the last topic."""
    n_topics = mixtures.shape[1]
    cdf = np.empty(n_topics, dtype=np.float64)
    for s in range(mixtures.shape[0]):
        offset = np.float64(s)
        total = 0.0
        for k in range(n_topics):
            total += mixtures[s, k]
            cdf[k] = total + offset
        for t in range(uniforms.shape[1]):
            key = uniforms[s, t] + offset
            below = 0
            for k in range(n_topics):
                below += cdf[k] <= key
            topic_ids[s, t] = below if below < n_topics else n_topics - 1


@_jit
def gather_add(first: Any, first_rows: Any, second: Any, second_rows: Any, out: Any) -> None:
    """``out[i] = first[first_rows[i]] + second[second_rows[i]]``, row by row."""
    n_dim = out.shape[1]
    for i in range(out.shape[0]):
        a, b = first[first_rows[i]], second[second_rows[i]]
        row = out[i]
        for d in range(n_dim):
            row[d] = a[d] + b[d]


@_jit
def scaled_step(weights: Any, rates: Any, grad: Any) -> None:
    """``weights[e] -= rates[e]·grad[e]`` for each leading index ``e``, in place."""
    for e in range(weights.shape[0]):
        w, g, rate = weights[e].ravel(), grad[e].ravel(), rates[e]
        for i in range(w.size):
            w[i] -= rate * g[i]


@_jit
def hidden_pairs8(x: Any, rows: Any, owner: Any, up: Any, hidden: Any) -> None:
    """``hidden[a] = U_{owner[a]} x_{rows[a]}`` for eight hidden units (``up`` (E, 8, D)), two
    assignments at a time: sixteen independent running sums in registers, each added over
    ``d`` in index order from its first product."""
    n_dim = up.shape[2]
    n = rows.size
    for a in range(0, n - 1, 2):
        u, v = up[owner[a]], up[owner[a + 1]]
        t, s = rows[a], rows[a + 1]
        x0, y0 = x[t, 0], x[s, 0]
        a0, a1, a2, a3 = u[0, 0] * x0, u[1, 0] * x0, u[2, 0] * x0, u[3, 0] * x0
        a4, a5, a6, a7 = u[4, 0] * x0, u[5, 0] * x0, u[6, 0] * x0, u[7, 0] * x0
        b0, b1, b2, b3 = v[0, 0] * y0, v[1, 0] * y0, v[2, 0] * y0, v[3, 0] * y0
        b4, b5, b6, b7 = v[4, 0] * y0, v[5, 0] * y0, v[6, 0] * y0, v[7, 0] * y0
        for d in range(1, n_dim):
            xd, yd = x[t, d], x[s, d]
            a0 += u[0, d] * xd
            a1 += u[1, d] * xd
            a2 += u[2, d] * xd
            a3 += u[3, d] * xd
            a4 += u[4, d] * xd
            a5 += u[5, d] * xd
            a6 += u[6, d] * xd
            a7 += u[7, d] * xd
            b0 += v[0, d] * yd
            b1 += v[1, d] * yd
            b2 += v[2, d] * yd
            b3 += v[3, d] * yd
            b4 += v[4, d] * yd
            b5 += v[5, d] * yd
            b6 += v[6, d] * yd
            b7 += v[7, d] * yd
        hidden[a, 0], hidden[a, 1], hidden[a, 2], hidden[a, 3] = a0, a1, a2, a3
        hidden[a, 4], hidden[a, 5], hidden[a, 6], hidden[a, 7] = a4, a5, a6, a7
        hidden[a + 1, 0], hidden[a + 1, 1], hidden[a + 1, 2], hidden[a + 1, 3] = b0, b1, b2, b3
        hidden[a + 1, 4], hidden[a + 1, 5], hidden[a + 1, 6], hidden[a + 1, 7] = b4, b5, b6, b7
    if n % 2:
        e, t = owner[n - 1], rows[n - 1]
        for h in range(8):
            total = up[e, h, 0] * x[t, 0]
            for d in range(1, n_dim):
                total += up[e, h, d] * x[t, d]
            hidden[n - 1, h] = total


@_jit
def expert_forward(
    x: Any, rows: Any, owner: Any, up: Any, down: Any, hidden: Any, outs: Any
) -> None:
    n_experts, n_hidden, n_dim = up.shape
    n_out = down.shape[1]
    zero = hidden.dtype.type(0)
    if n_hidden == 8:
        hidden_pairs8(x, rows, owner, up, hidden)
    else:
        for a in range(rows.size):
            e, t = owner[a], rows[a]
            for h in range(n_hidden):
                total = up[e, h, 0] * x[t, 0]
                for d in range(1, n_dim):
                    total += up[e, h, d] * x[t, d]
                hidden[a, h] = total
    act = np.empty(n_hidden, dtype=hidden.dtype)
    for a in range(rows.size):
        e = owner[a]
        for h in range(n_hidden):
            act[h] = hidden[a, h] if hidden[a, h] > zero else zero
        for o in range(n_out):
            total = down[e, o, 0] * act[0]
            for h in range(1, n_hidden):
                total += down[e, o, h] * act[h]
            outs[a, o] = total


@_jit
def expert_backward(
    x: Any, rows: Any, owner: Any, down: Any, d_out: Any, hidden: Any, grad_up: Any,
    grad_down: Any,
) -> None:  # fmt: skip
    n_hidden, n_dim = grad_up.shape[1], grad_up.shape[2]
    n_out = down.shape[1]
    dtype = hidden.dtype
    zero, one = dtype.type(0), dtype.type(1)
    act = np.empty(n_hidden, dtype=dtype)
    d_hidden = np.empty(n_hidden, dtype=dtype)
    grad_up[:] = zero
    grad_down[:] = zero
    for a in range(rows.size):
        e, t = owner[a], rows[a]
        for h in range(n_hidden):
            act[h] = hidden[a, h] if hidden[a, h] > zero else zero
        for o in range(n_out):
            g = d_out[a, o]
            for h in range(n_hidden):
                grad_down[e, o, h] += g * act[h]
        for h in range(n_hidden):
            d_hidden[h] = d_out[a, 0] * down[e, 0, h]
        for o in range(1, n_out):
            g = d_out[a, o]
            for h in range(n_hidden):
                d_hidden[h] += g * down[e, o, h]
        for h in range(n_hidden):
            d_hidden[h] *= one if hidden[a, h] > zero else zero
            g = d_hidden[h]
            for d in range(n_dim):
                grad_up[e, h, d] += g * x[t, d]


# --------------------------------------------------------------------------- bias steps (Adam)


@_jit_inline
def adam_pass(w: Any, mm: Any, vv: Any, f: Any, s: Any, beta1: Any, beta2: Any, eps: Any,
              step_size: Any, negated: Any, negate: bool) -> None:  # fmt: skip
    """One repeated Adam update over flat arrays, element by element (vectorised); with
    ``negate`` the new weights negated into ``negated`` too (negation is exact)."""
    if negate:
        for i in range(w.size):
            mi = mm[i] * beta1 + f[i]
            vi = vv[i] * beta2 + s[i]
            mm[i] = mi
            vv[i] = vi
            wi = w[i] - (mi / (np.sqrt(vi) + eps)) * step_size
            w[i] = wi
            negated[i] = -wi
        return
    for i in range(w.size):
        mi = mm[i] * beta1 + f[i]
        vi = vv[i] * beta2 + s[i]
        mm[i] = mi
        vv[i] = vi
        w[i] -= (mi / (np.sqrt(vi) + eps)) * step_size


@_jit
def adam_repeat(
    weights: Any,
    m: Any,
    v: Any,
    first: Any,
    second: Any,
    beta1: Any,
    beta2: Any,
    eps: Any,
    step_size: Any,
    negated: Any,
    negate: bool,
) -> None:
    adam_pass(
        weights.ravel(), m.ravel(), v.ravel(), first.ravel(), second.ravel(), beta1, beta2, eps,
        step_size, negated.ravel(), negate,
    )  # fmt: skip


@_jit
def adam_repeats(
    weights: Any,
    m: Any,
    v: Any,
    first: Any,
    second: Any,
    beta1: Any,
    beta2: Any,
    eps: Any,
    step_sizes: Any,
) -> None:
    """:func:`adam_repeat` once per entry of ``eps`` and ``step_sizes``, in their order: one
    vectorised pass over the elements per repeat (a loop over the repeats inside would chain
    each element's square roots and divisions)."""
    w, mm, vv = weights.ravel(), m.ravel(), v.ravel()
    f, s = first.ravel(), second.ravel()
    for r in range(step_sizes.size):
        adam_pass(w, mm, vv, f, s, beta1, beta2, eps[r], step_sizes[r], w, False)


@_jit
def group_keep(selection: Any, n_groups: int, group_topk: int, per_group: int, keep: Any) -> None:
    n_tokens, n_experts = selection.shape
    scratch = selection_scratch(n_experts, n_groups, group_topk, per_group, selection.dtype)
    first, second, tops, top_index, group_score, kept, _ = scratch[:7]
    lanes_hi, lanes_lo = scratch[7], scratch[8]
    for t in range(n_tokens):
        group_pass(
            selection[t], n_groups, per_group, group_topk, first, second, tops, top_index,
            group_score, kept, keep[t], lanes_hi, lanes_lo,
        )  # fmt: skip


@_jit
def sample_counts(
    scores: Any,
    bias: Any,
    mode: int,
    low: Any,
    high: Any,
    top_k: int,
    n_groups: int,
    group_topk: int,
    per_group: int,
    tokens_per_cell: int,
    weights: Any,
    experts_per_rank: int,
    experts_per_node: int,
    counts: Any,
    dest: Any,
    node: Any,
) -> int:
    n_tokens, n_experts = scores.shape
    dtype = scores.dtype
    one = dtype.type(1.0)
    selection = np.empty(n_experts, dtype=dtype)
    scratch = selection_scratch(n_experts, n_groups, group_topk, per_group, dtype)
    candidates = np.empty(n_experts, dtype=np.int64)
    best_values = np.empty(top_k, dtype=dtype)
    best = np.empty(top_k + 1, dtype=np.int64)  # top_k_row's spare slot at the end
    # Each expert's rank and node, looked up rather than divided per token.
    rank_of = np.arange(n_experts) // experts_per_rank
    node_of = np.arange(n_experts) // experts_per_node
    ranks = np.empty(top_k, dtype=np.int64)
    hosts = np.empty(top_k, dtype=np.int64)
    unranked = 0
    for t in range(n_tokens):
        cell = t // tokens_per_cell
        selection_row(scores[t], bias, mode, low, high, one, selection)
        found = top_k_row(
            selection, top_k, n_groups, group_topk, per_group, scratch, candidates,
            best_values, best,
        )  # fmt: skip
        if found < top_k:
            unranked += 1
            continue
        w = weights[t]
        for i in range(top_k):
            e = best[i]
            counts[cell, e] += w
            # A token reaches each rank (node) once, however many of its experts are there.
            rank, host = rank_of[e], node_of[e]
            ranks[i], hosts[i] = rank, host
            new_rank, new_host = True, True
            for j in range(i):
                new_rank &= ranks[j] != rank
                new_host &= hosts[j] != host
            if new_rank:
                dest[cell, rank] += w
            if new_host:
                node[cell, host] += w
    return unranked
