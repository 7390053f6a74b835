"""A compiled exchange replay (numba) with the NumPy expression it reproduces as its twin.

:meth:`moesim.engine.exchange_tables.ExchangeTables.exchange` runs tens of thousands of times
per DeepSeek-V3 step on (groups, 64) ready times against (groups, 64, 64) tables: NumPy's
temporaries and per-call overheads, not arithmetic, set its cost there. The kernel computes
the same max-plus products in one call, bit for bit: each entry is one addition
``ready[s] + table[s, d]``, and a maximum does not depend on the order it is taken in.
``tests/engine/test_exchange_tables.py`` checks the kernel against the NumPy path.

:func:`sooner` picks which of two interleaved chains runs next on a compute stream; it sums
as NumPy's pairwise summation does (eight partial sums per block of 128, halves above), so it
decides as ``np.maximum(free, ready).sum()`` does, ties included;
``tests/engine/test_step.py`` checks it against NumPy on random vectors.

It runs where numba is installed (:data:`AVAILABLE`) unless ``MOESIM_ENGINE_KERNELS=numpy``
(:data:`ENABLED`); the loop is compiled once per machine and cached on disk.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

AVAILABLE = importlib.util.find_spec("numba") is not None
ENABLED = AVAILABLE and os.environ.get("MOESIM_ENGINE_KERNELS", "numba") != "numpy"

Array = npt.NDArray[np.float64]


@functools.cache
def _compiled() -> Any:
    """The numba loops (:mod:`moesim.engine.compiled`), imported at first use."""
    return importlib.import_module("moesim.engine.compiled")


def by_columns(table: Array) -> tuple[npt.NDArray[np.int64], Array]:
    """A (..., n, n) max-plus table as the finite entries of each column ``d``: sender
    indices and values (..., n, width), senders in order, padded with ``-inf`` (a term that
    never wins)."""
    blocks = np.ascontiguousarray(table).reshape(-1, *table.shape[-2:])
    width = max(1, int(_compiled().column_width(blocks)))
    index = np.zeros((*blocks.shape[:2], width), dtype=np.int64)
    value = np.full(index.shape, -np.inf)
    _compiled().by_columns(blocks, index, value)
    shape = (*table.shape[:-1], width)
    return index.reshape(shape), value.reshape(shape)


# Stand for the relay tables of a direction without relays (numba needs arrays of one type).
_NO_INDEX: npt.NDArray[np.int64] = np.zeros((0, 0, 0, 0), dtype=np.int64)
_NO_VALUE: Array = np.zeros((0, 0, 0, 0))


@dataclass
class PackedTables:
    """One direction's tables as the kernel reads them: the dense per-flow durations, the
    node-limited combine's sparse relay tables by columns, the senders as a mask."""

    from_ready: Array
    senders: npt.NDArray[np.uint8]
    relayed: bool
    start_index: npt.NDArray[np.int64] = field(default_factory=lambda: _NO_INDEX)
    start_value: Array = field(default_factory=lambda: _NO_VALUE)
    relay_index: npt.NDArray[np.int64] = field(default_factory=lambda: _NO_INDEX)
    relay_value: Array = field(default_factory=lambda: _NO_VALUE)

    @property
    def arguments(self) -> tuple[Any, ...]:
        """The compiled exchange's arguments between the ready times and the cell."""
        return (
            self.from_ready,
            self.start_index,
            self.start_value,
            self.relay_index,
            self.relay_value,
            self.senders,
            self.relayed,
        )


def pack(
    from_ready: Array, start: Array | None, from_relay: Array | None, last_sender: Array
) -> PackedTables:
    """:class:`PackedTables` of (cells, groups, n, n) tables; ``last_sender`` holds 0 where
    a receiver waits for a sender and ``-inf`` elsewhere."""
    packed = PackedTables(
        np.ascontiguousarray(from_ready),
        np.ascontiguousarray(last_sender == 0.0).view(np.uint8),
        from_relay is not None,
    )
    if from_relay is not None:
        assert start is not None
        packed.start_index, packed.start_value = by_columns(start)
        packed.relay_index, packed.relay_value = by_columns(from_relay)
    return packed


def loop(name: str) -> Any:
    """The compiled loop ``name`` itself (:func:`compute`, :func:`sooner`: same arguments;
    ``sooner`` returns a NumPy bool), for callers on the hottest path."""
    return getattr(_compiled(), name)


def compute(
    free: Array,
    ready: Array,
    last_sender: Array,
    has_sender: bool,
    seconds: Array,
    uniform_seconds: float,
    uniform: bool,
    after_exchange: bool,
    bucket: int,
    tp: float,
    tp_bytes: float,
    expert: bool,
    acc: Array,
    out: Array,
) -> None:
    """One op on a compute stream of healthy GPUs (:func:`moesim.engine.compiled.compute`):
    start and end times into ``out``, waits and busy time booked in ``acc``."""
    _compiled().compute(
        free, ready, last_sender, has_sender, seconds, uniform_seconds, uniform,
        after_exchange, bucket, tp, tp_bytes, expert, acc, out,
    )  # fmt: skip


def sooner(free: Array, first: Array, second: Array) -> bool:
    """Whether ops ready at ``second`` could start sooner in sum over the GPUs of a compute
    stream free at ``free`` than ops ready at ``first``: the sums compared are NumPy's
    (``np.maximum(free, x).sum()``), to the last bit."""
    return bool(_compiled().sooner(free, first, second))


def charge(
    links: npt.NDArray[np.int64], nbytes: float, busy_s: Array, load_bytes: Array, load_busy: Array
) -> None:
    """``np.add.at(load_bytes, links, nbytes); np.add.at(load_busy, links, busy_s)``."""
    _compiled().charge(links, nbytes, busy_s, load_bytes, load_busy)


def serve(start: Array, arrive: Array, rows: Array, waited: Array, served: Array) -> None:
    """Book ``rows`` tokens (gpus, experts) served and their wait ``max(start − arrive, 0)``
    (:func:`moesim.engine.compiled.serve`)."""
    _compiled().serve(start, arrive, rows, waited, served)


def exchange(ready: Array, tables: PackedTables, cell: int) -> Array:
    """Done times and last senders' ready times (2, groups, n) of routing cell ``cell`` for
    senders ready at ``ready`` (groups, n, C-ordered)."""
    out = np.empty((2, *ready.shape))
    _compiled().exchange(
        ready,
        tables.from_ready,
        tables.start_index,
        tables.start_value,
        tables.relay_index,
        tables.relay_value,
        tables.senders,
        tables.relayed,
        cell,
        out,
    )
    return out
