"""Load-balance metrics over expert loads.

A load vector counts the (token, expert) assignments each expert received in some scope — a
micro-batch, a global batch, a validation set (routing.md §1). The headline metric is the paper's
MaxVio, the relative excess of the most loaded expert over the mean (routing.md §2.4, Eq. 4): it is
what an expert-parallel step waits for, since the busiest expert's rank finishes last. All
functions reduce along the last axis, so a stack of loads (layers × micro-batches × experts) is
handled in one call.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def max_vio(counts: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """MaxVio = (max_i c_i − mean c) / mean c along the last axis (routing.md §2.4).

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
    """Coefficient of variation std(c) / mean(c) along the last axis (routing.md §10 item 8).

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
) -> npt.NDArray[np.int64]:
    """Load of every expert: the number of (token, expert) assignments (routing.md §1).

    Parameters
    ----------
    selected : ndarray, shape (T, k), integer
        Selected experts per token.
    n_experts : int
        ``E``.
    weights : ndarray, shape (T,), integer, optional
        Multiplicity of each token (bootstrap weights); default 1.

    Returns
    -------
    ndarray, shape (E,), int64
        ``c_i``; sums to ``k · Σ weights``.
    """
    flat = np.asarray(selected).ravel()
    if weights is None:
        return np.bincount(flat, minlength=n_experts).astype(np.int64, copy=False)
    k = selected.shape[1]
    per_pair = np.repeat(np.asarray(weights, dtype=np.float64), k)
    return np.rint(np.bincount(flat, weights=per_pair, minlength=n_experts)).astype(np.int64)
