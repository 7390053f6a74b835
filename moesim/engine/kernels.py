"""A compiled exchange replay (numba) with the NumPy expression it reproduces as its twin.

:meth:`moesim.engine.exchange_tables.ExchangeTables.exchange` runs tens of thousands of times
per DeepSeek-V3 step on (groups, 64) ready times against (groups, 64, 64) tables: NumPy's
temporaries and per-call overheads, not arithmetic, set its cost there. The kernel computes
the same max-plus products in one call, bit for bit: each entry is one addition
``ready[s] + table[s, d]``, and a maximum does not depend on the order it is taken in.
``tests/engine/test_exchange_tables.py`` checks the kernel against the NumPy path.

It runs where numba is installed (:data:`AVAILABLE`) unless ``MOESIM_ENGINE_KERNELS=numpy``
(:data:`ENABLED`); the loop is compiled once per machine and cached on disk.
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
ENABLED = AVAILABLE and os.environ.get("MOESIM_ENGINE_KERNELS", "numba") != "numpy"

Array = npt.NDArray[np.float64]
_NONE = np.zeros((0, 0, 0, 0))  # stands for an absent relay table (numba needs one type)


@functools.cache
def _compiled() -> Any:
    """The numba loops (:mod:`moesim.engine.compiled`), imported at first use."""
    return importlib.import_module("moesim.engine.compiled")


def exchange(
    ready: Array,
    from_ready: Array,
    start: Array | None,
    from_relay: Array | None,
    last_sender: Array,
    cell: int,
) -> tuple[Array, Array]:
    """Done times and last senders' ready times (groups, n) of routing cell ``cell`` for
    senders ready at ``ready`` (groups, n, C-ordered); the tables are (cells, groups, n, n),
    C-ordered."""
    done = np.empty_like(ready)
    last = np.empty_like(ready)
    relayed = from_relay is not None
    _compiled().exchange(
        ready,
        from_ready,
        start if relayed else _NONE,
        from_relay if relayed else _NONE,
        last_sender,
        cell,
        relayed,
        done,
        last,
    )
    return done, last
