"""The numba loops behind :mod:`moesim.engine.kernels` (imported only when a kernel first runs,
so that importing the engine does not import numba). Compiled without fast-math, so every
addition rounds as NumPy's does; cached on disk (``cache=True``): a machine compiles them once.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np


def _jit(fn: Any) -> Any:
    return numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")(fn)


@_jit
def _max_plus_into(out: Any, ready: Any, table: Any) -> None:
    """``out[d] = max(out[d], max_s (ready[s] + table[s, d]))``."""
    n = ready.shape[0]
    m = out.shape[0]
    for s in range(n):
        r = ready[s]
        row = table[s]
        for d in range(m):
            v = r + row[d]
            if v > out[d]:
                out[d] = v


@_jit
def _max_plus_sparse(out: Any, ready: Any, index: Any, value: Any) -> None:
    """``out[d] = max(out[d], max_j (ready[index[d, j]] + value[d, j]))``: the product with a
    table kept as its finite entries, column by column (padding: ``-inf``)."""
    m, width = index.shape
    for d in range(m):
        best = out[d]
        for j in range(width):
            v = ready[index[d, j]] + value[d, j]
            if v > best:
                best = v
        out[d] = best


@_jit
def _max_masked(out: Any, ready: Any, mask: Any) -> None:
    """``out[d] = max(out[d], max_{s: mask[s, d]} ready[s])``: the product with a table of
    zeros (``mask``) and ``-inf``, whose additions of zero are exact."""
    n = ready.shape[0]
    m = out.shape[0]
    for s in range(n):
        r = ready[s]
        row = mask[s]
        for d in range(m):
            if row[d] and r > out[d]:
                out[d] = r


@_jit
def _block_max_sum(a: Any, b: Any, lo: int, n: int) -> float:
    """``np.add.reduce(np.maximum(a, b)[lo:lo + n])`` for ``n <= 128``, as NumPy's pairwise
    summation adds: eight partial sums, combined pairwise, then the remainder."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += max(a[i], b[i])
        return res
    r0 = max(a[lo], b[lo])
    r1 = max(a[lo + 1], b[lo + 1])
    r2 = max(a[lo + 2], b[lo + 2])
    r3 = max(a[lo + 3], b[lo + 3])
    r4 = max(a[lo + 4], b[lo + 4])
    r5 = max(a[lo + 5], b[lo + 5])
    r6 = max(a[lo + 6], b[lo + 6])
    r7 = max(a[lo + 7], b[lo + 7])
    i = lo + 8
    stop = lo + n - n % 8
    while i < stop:
        r0 += max(a[i], b[i])
        r1 += max(a[i + 1], b[i + 1])
        r2 += max(a[i + 2], b[i + 2])
        r3 += max(a[i + 3], b[i + 3])
        r4 += max(a[i + 4], b[i + 4])
        r5 += max(a[i + 5], b[i + 5])
        r6 += max(a[i + 6], b[i + 6])
        r7 += max(a[i + 7], b[i + 7])
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < lo + n:
        res += max(a[i], b[i])
        i += 1
    return res


@_jit
def _pairwise_max_sum(a: Any, b: Any) -> float:
    """``np.add.reduce(np.maximum(a, b))``: above 128 terms NumPy sums each half (the first
    a multiple of 8 long) and adds the two; the split tree is walked with explicit stacks."""
    n = a.shape[0]
    if n <= 128:
        return _block_max_sum(a, b, 0, n)
    lo_s = np.empty(128, dtype=np.int64)
    n_s = np.empty(128, dtype=np.int64)
    stage = np.empty(128, dtype=np.int64)
    values = np.empty(128)
    sp, vp = 0, 0
    lo_s[0], n_s[0], stage[0] = 0, n, 0
    while sp >= 0:
        lo, m = lo_s[sp], n_s[sp]
        if m <= 128:
            values[vp] = _block_max_sum(a, b, lo, m)
            vp += 1
            sp -= 1
            continue
        half = m // 2
        half -= half % 8
        if stage[sp] == 0:  # the first half next
            stage[sp] = 1
            sp += 1
            lo_s[sp], n_s[sp], stage[sp] = lo, half, 0
        elif stage[sp] == 1:  # then the second
            stage[sp] = 2
            sp += 1
            lo_s[sp], n_s[sp], stage[sp] = lo + half, m - half, 0
        else:  # both summed
            vp -= 1
            values[vp - 1] = values[vp - 1] + values[vp]
            sp -= 1
    return values[0]


@_jit
def sooner(free: Any, first: Any, second: Any) -> bool:
    """Whether ``sum(max(free, second)) < sum(max(free, first))``, both summed as NumPy
    sums."""
    return _pairwise_max_sum(free, second) < _pairwise_max_sum(free, first)


# Rows of the per-GPU accumulators (moesim.engine.step.ACCUMULATORS).
_EXPERT, _COMM, _STRAGGLER, _PIPELINE, _TP, _TP_BYTES = 3, 4, 5, 6, 10, 11


@_jit
def compute(
    free: Any,
    ready: Any,
    last_sender: Any,
    has_sender: bool,
    seconds: Any,
    uniform_seconds: float,
    uniform: bool,
    after_exchange: bool,
    bucket: int,
    tp: float,
    tp_bytes: float,
    expert: bool,
    acc: Any,
    out: Any,
) -> None:
    """One op on a rank's compute stream on healthy hardware: its start and end per GPU into
    ``out`` (2, gpus), its idle gap and its seconds booked in ``acc`` (accumulators, gpus), as
    ``moesim.engine.step._StepModel._compute`` books them (the NumPy twin), operation for
    operation."""
    n = free.shape[0]
    start = out[0]
    end = out[1]
    for i in range(n):
        f = free[i]
        t = max(f, ready[i])
        start[i] = t
        gap = t - f
        if gap != 0.0:  # added when nonzero: the sum is the same
            if after_exchange:
                if has_sender:
                    waited = min(max(min(last_sender[i], t) - f, 0.0), gap)
                    acc[_STRAGGLER, i] += waited
                    acc[_COMM, i] += gap - waited
                else:
                    acc[_COMM, i] += gap
            else:
                acc[_PIPELINE, i] += gap
        sec = uniform_seconds if uniform else seconds[i]
        end[i] = t + sec
        acc[bucket, i] += sec - tp
        if tp != 0.0:
            acc[_TP, i] += tp
            acc[_TP_BYTES, i] += tp_bytes
        if expert:
            acc[_EXPERT, i] += sec


@_jit
def serve(start: Any, arrive: Any, rows: Any, waited: Any, served: Any) -> None:
    """Book each GPU's tokens (gpus, experts) as served, and their wait between arrival and
    their experts' start (``moesim.engine.step._StepModel._serve``, the NumPy twin)."""
    gpus, experts = rows.shape
    for i in range(gpus):
        wait = max(start[i] - arrive[i], 0.0)
        for e in range(experts):
            waited[i, e] += wait * rows[i, e]
            served[i, e] += rows[i, e]


@_jit
def charge(links: Any, nbytes: float, busy_s: Any, load_bytes: Any, load_busy_s: Any) -> None:
    """Add ``nbytes`` and each link's ``busy_s`` to the links' load, link after link in order
    (as ``np.add.at`` adds repeated links)."""
    for j in range(links.shape[0]):
        load_bytes[links[j]] += nbytes
        load_busy_s[links[j]] += busy_s[j]


@_jit
def column_width(table: Any) -> int:
    """The most finite entries in one column of a (blocks, n, n) table."""
    blocks, n, m = table.shape
    width = 0
    for b in range(blocks):
        for d in range(m):
            count = 0
            for s in range(n):
                if np.isfinite(table[b, s, d]):
                    count += 1
            width = max(width, count)
    return width


@_jit
def by_columns(table: Any, index: Any, value: Any) -> None:
    """Each column's finite entries of a (blocks, n, n) table, senders in order, into
    ``index`` and ``value`` (blocks, n, width), prefilled with 0 and ``-inf``."""
    blocks, n, m = table.shape
    for b in range(blocks):
        for d in range(m):
            j = 0
            for s in range(n):
                if np.isfinite(table[b, s, d]):
                    index[b, d, j] = s
                    value[b, d, j] = table[b, s, d]
                    j += 1


@_jit
def exchange(
    ready: Any,
    from_ready: Any,
    start_index: Any,
    start_value: Any,
    relay_index: Any,
    relay_value: Any,
    senders: Any,
    relayed: bool,
    cell: int,
    out: Any,
) -> None:
    """One exchange of routing cell ``cell``: receivers' done times and last senders' ready
    times, group by group, computed on the ready times relative to the group's earliest and
    shifted back (the arithmetic of
    :meth:`moesim.engine.exchange_tables.ExchangeTables.exchange`, the NumPy twin)."""
    groups, n = ready.shape
    done = out[0]
    last = out[1]
    rel = np.empty(n)
    relay_start = np.empty(n)
    for k in range(groups):
        base = ready[k, 0]
        for i in range(1, n):
            if ready[k, i] < base:
                base = ready[k, i]
        for i in range(n):
            rel[i] = ready[k, i] - base
        out = done[k]
        out[:] = rel
        _max_plus_into(out, rel, from_ready[cell, k])
        if relayed:
            relay_start[:] = rel
            _max_plus_sparse(relay_start, rel, start_index[cell, k], start_value[cell, k])
            _max_plus_sparse(out, relay_start, relay_index[cell, k], relay_value[cell, k])
        for i in range(n):
            out[i] += base
        out = last[k]
        out[:] = rel
        _max_masked(out, rel, senders[cell, k])
        for i in range(n):
            out[i] += base
