"""How many BLAS threads the estimate's NumPy work may use."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import threadpool_limits


@contextmanager
def blas_threads(limit: int = 1) -> Iterator[None]:
    """BLAS limited to ``limit`` threads inside the block (threadpoolctl), whoever calls.

    The gate multiplies small matrices thousands of times: extra BLAS threads cost more than
    they give (10x slower with OpenBLAS's default threads on a loaded 2-core machine), and a
    multi-threaded BLAS may sum in another order, so a notebook and the CLI would not give
    identical results. The CLI also sets ``OPENBLAS_NUM_THREADS`` before NumPy loads; this
    limit holds for the Python API and sweep workers too.
    """
    with threadpool_limits(limits=limit, user_api="blas"):
        yield
