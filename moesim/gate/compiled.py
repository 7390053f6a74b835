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
    group_rank: Any,
    kept: Any,
    keep: Any,
) -> None:
    """One token's group limit: ``keep[g]`` for the ``group_topk`` best groups of the row
    ``selection`` (a group's score the sum of its ``per_group`` largest values, largest first;
    an equal score loses to the lower group index), ``kept`` their indices, and for
    ``per_group <= 2`` each group's largest and second largest values in ``first``, ``second``."""
    group_size = selection.size // n_groups
    lowest = selection.dtype.type(-np.inf)
    if per_group <= 2:
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
    filled = 0
    for g in range(n_groups):
        filled = insert(group_rank, kept, filled, group_topk, group_score[g], g)
    keep[:] = False
    for i in range(group_topk):
        keep[kept[i]] = True


@_jit
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
) -> None:
    """One token's experts, in ``best`` (in no particular order): the top ``top_k`` of the row
    ``selection`` among the ``group_topk`` best of its ``n_groups`` groups (all of them when
    ``group_topk == n_groups``); exact ties go to the lower index. ``scratch`` holds
    :func:`group_pass`' work arrays."""
    first, second, tops, top_index, group_score, group_rank, kept, keep = scratch
    n_experts = selection.size
    group_size = n_experts // n_groups
    lowest, highest = selection.dtype.type(-np.inf), selection.dtype.type(np.inf)
    # floor: a value no larger than the token's k-th largest eligible selection score (the
    # smallest of top_k eligible values), so that only values >= floor need ranking.
    floor = lowest
    if group_topk < n_groups:
        group_pass(
            selection, n_groups, per_group, group_topk, first, second, tops, top_index,
            group_score, group_rank, kept, keep,
        )  # fmt: skip
        if per_group <= 2 and group_topk * per_group >= top_k:
            floor = highest
            for i in range(group_topk):
                g = kept[i]
                low = second[g] if per_group == 2 else first[g]
                floor = min(floor, low)
    else:
        keep[:] = True
        if top_k < n_experts:
            # The maxima of top_k disjoint runs of the row are top_k of its values.
            floor = highest
            for i in range(top_k):
                lo, hi = i * n_experts // top_k, (i + 1) * n_experts // top_k
                peak = selection[lo]
                for e in range(lo + 1, hi):
                    peak = max(peak, selection[e])
                floor = min(floor, peak)
    # Eligible experts at or above the floor, in index order (branch-free compaction).
    n_candidates = 0
    for g in range(n_groups):
        if keep[g]:
            for e in range(g * group_size, (g + 1) * group_size):
                candidates[n_candidates] = e
                n_candidates += selection[e] >= floor
    if n_candidates <= 2 * top_k:
        # Few candidates (the usual case): drop the smallest until top_k are left, the higher
        # index first among equal values, keeping index order — fewer unpredictable branches
        # than inserting each one into a sorted run.
        n = n_candidates
        while n > top_k:
            worst, worst_value = 0, selection[candidates[0]]
            for i in range(1, n):
                value = selection[candidates[i]]
                smaller = value <= worst_value
                worst = i if smaller else worst
                worst_value = value if smaller else worst_value
            for i in range(worst, n - 1):
                candidates[i] = candidates[i + 1]
            n -= 1
        for i in range(top_k):
            best[i] = candidates[i]
        return
    filled = 0
    for i in range(n_candidates):
        e = candidates[i]
        filled = insert(best_values, best, filled, top_k, selection[e], e)


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
        np.empty(group_topk, dtype=dtype),
        np.empty(group_topk, dtype=np.int64),  # kept groups
        np.ones(n_groups, dtype=np.bool_),  # keep mask
    )


@_jit
def routed_counts(
    scores: Any,
    bias: Any,
    multiply: bool,
    top_k: int,
    n_groups: int,
    group_topk: int,
    per_group: int,
    starts: Any,
    counts: Any,
) -> None:
    n_tokens, n_experts = scores.shape
    dtype = scores.dtype
    selection = np.empty(n_experts, dtype=dtype)
    scratch = selection_scratch(n_experts, n_groups, group_topk, per_group, dtype)
    candidates = np.empty(n_experts, dtype=np.int64)
    best_values = np.empty(top_k, dtype=dtype)
    best = np.empty(top_k, dtype=np.int64)
    segment = 0
    for t in range(n_tokens):
        while segment + 1 < starts.size and t >= starts[segment + 1]:
            segment += 1
        if multiply:
            for e in range(n_experts):
                selection[e] = scores[t, e] * bias[e]
        else:
            for e in range(n_experts):
                selection[e] = scores[t, e] + bias[e]
        top_k_row(
            selection, top_k, n_groups, group_topk, per_group, scratch, candidates,
            best_values, best,
        )  # fmt: skip
        for i in range(top_k):
            counts[segment, best[i]] += 1


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
) -> None:
    n_experts = scores.shape[1]
    starts = np.zeros(1, dtype=np.int64)
    counts = np.zeros((1, n_experts), dtype=np.int64)
    for r in range(gammas.size):
        counts[:] = 0
        rows = scores[r * tokens : (r + 1) * tokens]
        routed_counts(
            rows, bias, False, top_k, n_groups, group_topk, per_group, starts, counts
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
) -> None:
    w, mm, vv = weights.ravel(), m.ravel(), v.ravel()
    f, s = first.ravel(), second.ravel()
    for i in range(w.size):
        mi = mm[i] * beta1 + f[i]
        vi = vv[i] * beta2 + s[i]
        mm[i] = mi
        vv[i] = vi
        w[i] -= (mi / (np.sqrt(vi) + eps)) * step_size


@_jit
def group_keep(selection: Any, n_groups: int, group_topk: int, per_group: int, keep: Any) -> None:
    n_tokens, n_experts = selection.shape
    first, second, tops, top_index, group_score, group_rank, kept, _ = selection_scratch(
        n_experts, n_groups, group_topk, per_group, selection.dtype
    )
    for t in range(n_tokens):
        group_pass(
            selection[t], n_groups, per_group, group_topk, first, second, tops, top_index,
            group_score, group_rank, kept, keep[t],
        )  # fmt: skip


@_jit
def sample_counts(
    scores: Any,
    bias: Any,
    multiply: bool,
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
) -> None:
    n_tokens, n_experts = scores.shape
    dtype = scores.dtype
    selection = np.empty(n_experts, dtype=dtype)
    scratch = selection_scratch(n_experts, n_groups, group_topk, per_group, dtype)
    candidates = np.empty(n_experts, dtype=np.int64)
    best_values = np.empty(top_k, dtype=dtype)
    best = np.empty(top_k, dtype=np.int64)
    for t in range(n_tokens):
        cell = t // tokens_per_cell
        if multiply:
            for e in range(n_experts):
                selection[e] = scores[t, e] * bias[e]
        else:
            for e in range(n_experts):
                selection[e] = scores[t, e] + bias[e]
        top_k_row(
            selection, top_k, n_groups, group_topk, per_group, scratch, candidates,
            best_values, best,
        )  # fmt: skip
        w = weights[t]
        for i in range(top_k):
            e = best[i]
            counts[cell, e] += w
            # A token reaches each rank (node) once, however many of its experts are there.
            rank, host = e // experts_per_rank, e // experts_per_node
            new_rank, new_host = True, True
            for j in range(i):
                new_rank = new_rank and best[j] // experts_per_rank != rank
                new_host = new_host and best[j] // experts_per_node != host
            if new_rank:
                dest[cell, rank] += w
            if new_host:
                node[cell, host] += w
