"""Small measurements on trained gates, shared by the published-result tests and the notebook.

The reproductions of docs/model/gate.md (``tests/gate/test_published_results.py``,
``notebooks/balancing_dilemma.ipynb``) train the gate under several strategies with
:func:`~moesim.gate.training.train_gate` and compare them on a few numbers: the late-training mean
of a record (:func:`tail_mean`), a smoothed curve (:func:`smooth`), and the MaxVio of held-out
batches of a chosen size routed by the final routers (:func:`maxvio_by_batch`), which gives both
MaxVio_computation-batch (arXiv 2408.15664 Eq. 4, §5.1) and, pooled, MaxVio_global. Pure NumPy.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from moesim.gate.metrics import expert_counts, max_vio
from moesim.gate.router import route, route_options
from moesim.gate.training import GateTrajectory
from moesim.scenario.schema import Scenario


def tail_mean(trajectory: GateTrajectory, key: str, fraction: float = 0.25) -> float:
    """Mean of the record ``key`` over the last ``fraction`` of the updates (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: {fraction} not in (0, 1]")
    values = trajectory.column(key)
    n = max(1, int(round(len(values) * fraction)))
    return float(values[-n:].mean())


def head_mean(trajectory: GateTrajectory, key: str, updates: int) -> float:
    """Mean of the record ``key`` over the first ``updates`` updates (early training)."""
    if updates < 1:
        raise ValueError(f"updates: {updates} (need at least 1)")
    return float(trajectory.column(key)[:updates].mean())


def smooth(values: npt.ArrayLike, window: int) -> npt.NDArray[np.float64]:
    """Trailing moving average over ``window`` points (shorter at the start), same length.

    The loss-free paper smooths MaxVio_batch over 100 neighbouring steps (arXiv 2408.15664 Eq. 4).
    """
    v = np.asarray(values, dtype=np.float64)
    if window < 1:
        raise ValueError(f"window: {window} (need at least 1)")
    csum = np.concatenate(([0.0], np.cumsum(v)))
    idx = np.arange(1, v.size + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


def maxvio_by_batch(
    scenario: Scenario,
    trajectory: GateTrajectory,
    sequences: int,
    *,
    batches: int = 30,
    seed: int = 9,
) -> tuple[float, float]:
    """MaxVio of held-out batches of ``sequences`` sequences routed by the final routers.

    Draws ``batches`` batches of ``sequences × gate.tokens_per_sequence`` tokens from the
    trajectory's stream (its popularity at the start of training, mixed packing: the batches
    stand for computation batches cut from a shuffled validation set), routes them with each
    layer's final router (bias included, as at inference, arXiv 2408.15664 Algorithm 1 step 3) and
    returns

    - the mean over batches and layers of each batch's MaxVio (MaxVio_computation-batch for a
      computation batch of ``sequences`` sequences, arXiv 2408.15664 Eq. 4; Switch, arXiv
      2101.03961), and
    - the MaxVio of all batches' loads pooled, averaged over layers (MaxVio_global over a
      held-out set of ``batches × sequences`` sequences).

    The same ``seed`` gives every trajectory trained on the same stream the same batches.
    """
    if sequences < 1 or batches < 1:
        raise ValueError(f"sequences: {sequences}, batches: {batches} (need at least 1 each)")
    n_experts = scenario.model.moe_spec.routed_experts
    options = route_options(scenario)
    rng = np.random.default_rng(seed)
    layers = trajectory.final
    totals = np.zeros((len(layers), n_experts))
    per_batch = np.zeros((batches, len(layers)))
    for b in range(batches):
        x, _ = trajectory.stream.sample(sequences, scenario.gate.tokens_per_sequence, rng)
        flat = x.reshape(-1, x.shape[-1])
        for i, state in enumerate(layers):
            routing = route(flat, state, **options)
            counts = expert_counts(routing.selected, n_experts, dropped=routing.dropped)
            totals[i] += counts
            per_batch[b, i] = float(max_vio(counts))
    return float(per_batch.mean()), float(max_vio(totals).mean())


def pareto_front(x: npt.ArrayLike, y: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Indices of the points no other point beats on both ``x`` and ``y`` (lower is better).

    For (MaxVio_global, task loss) pairs this is the trade-off frontier of a sweep
    (docs/model/gate.mdR2). Returned in increasing ``x``; of exactly equal points the first is kept.
    """
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x, y: shapes {xs.shape} and {ys.shape} (need equal 1-D)")
    order = np.lexsort((ys, xs))
    front: list[int] = []
    best = np.inf
    for i in order:
        if ys[i] < best:
            front.append(int(i))
            best = ys[i]
    return np.array(front, dtype=np.int64)


def frontier_at(x: npt.ArrayLike, y: npt.ArrayLike, at: float) -> float:
    """The best ``y`` the Pareto frontier of ``(x, y)`` offers at ``x = at``.

    Piecewise-linear between frontier points; left of the frontier's smallest ``x`` (a balance
    no point of the sweep reaches) the most balanced point's ``y``, right of its largest ``x`` the
    lowest ``y``. A point ``(at, v)`` with ``v ≤ frontier_at(x, y, at)`` lies on or below the
    frontier.
    """
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    front = pareto_front(xs, ys)
    return float(np.interp(at, xs[front], ys[front]))
