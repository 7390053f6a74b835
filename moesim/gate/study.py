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
from moesim.gate.router import RouterState, route, route_options
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


def window_steps(total_steps: int, windows: int) -> list[int]:
    """The ``windows + 1`` boundaries ``0 = s_0 < … < s_w = total_steps`` of equal windows of
    optimizer steps (train with these as ``sample_steps`` for :func:`window_balance`)."""
    if not 1 <= windows <= total_steps:
        raise ValueError(f"windows: {windows} not in 1..{total_steps}")
    return [int(round(i * total_steps / windows)) for i in range(windows + 1)]


HELD_OUT_CHUNK = 2048
"""Sequences drawn and routed at once by :func:`held_out_loads` (bounds its memory)."""


def held_out_loads(
    scenario: Scenario,
    trajectory: GateTrajectory,
    routers: list[RouterState],
    tokens_trained: float,
    sequences: int,
    seed: int = 9,
) -> npt.NDArray[np.int64]:
    """Each layer's loads, shape (layers, E), of ``sequences × gate.tokens_per_sequence``
    held-out tokens drawn at the stream's popularity after ``tokens_trained`` tokens (packed as in
    training) and routed by ``routers`` (bias included; micro-batch capacity as in training),
    drawn and routed in chunks of :data:`HELD_OUT_CHUNK` sequences."""
    gate = scenario.gate
    n_experts = scenario.model.moe_spec.routed_experts
    options = route_options(scenario)
    rng = np.random.default_rng(seed)
    micro = scenario.parallelism.micro_batch_size
    chunk = max(micro, HELD_OUT_CHUNK - HELD_OUT_CHUNK % micro)
    out = np.zeros((len(routers), n_experts), dtype=np.int64)
    left = sequences
    while left > 0:
        n = min(chunk, left)
        left -= n
        x, _ = trajectory.stream.sample(
            n,
            gate.tokens_per_sequence,
            rng,
            tokens_trained=tokens_trained,
            sequences_per_micro_batch=micro,
        )
        flat = x.reshape(-1, x.shape[-1])
        per_micro = micro * gate.tokens_per_sequence
        whole, rest = divmod(flat.shape[0], per_micro)
        segments = [per_micro] * whole + ([rest] if rest else [])
        for i, state in enumerate(routers):
            routing = route(
                flat,
                state,
                **options,
                segments=segments,
                tokens_per_sequence=gate.tokens_per_sequence,
            )
            out[i] += expert_counts(routing.selected, n_experts, dropped=routing.dropped)
    return out


def window_balance(
    scenario: Scenario,
    trajectory: GateTrajectory,
    windows: int,
    *,
    sequences: int = 16_384,
    last: int | None = None,
    seed: int = 9,
) -> list[dict[str, float]]:
    """Balance and task loss over the same ``windows`` equal windows of training.

    Per window ``[s_i, s_{i+1})`` (:func:`window_steps`; the trajectory must hold router
    snapshots at these steps, the last one being ``total_steps``):

    - ``maxvio_global``: MaxVio of the held-out loads (:func:`held_out_loads`, ``sequences``
      sequences at the window end's popularity) routed by the routers at the window's end,
      averaged over layers — MaxVio_global on a validation set (arXiv 2408.15664 Eq. 4);
    - ``maxvio_batch`` and ``task_loss``: means of the records of the full updates inside the
      window (each update's training batch and its task loss before the update).

    ``last`` keeps only the last windows. A sequence's tokens share one topic-dominated
    mixture, so MaxVio's sampling noise falls with the number of sequences, not tokens; on the
    quickstart's loss-free router the last four windows read 0.113, 0.099, 0.088, 0.099 from
    2,048 sequences and 0.079, 0.087, 0.082, 0.102 from the default 16,384 (524,288 tokens).
    This snapshot measure exceeds the MaxVio of the loads pooled over the window's training
    batches (:meth:`GateTrajectory.tail_summary`: 0.029 over the last tenth): the sign rule keeps
    every bias stepping by γ around its balance point, and pooling over a window averages that
    oscillation out, while a router taken at one instant carries it. The same ``seed`` gives
    every window the same held-out draws (common random numbers).
    """
    bounds = window_steps(scenario.total_steps, windows)
    wanted = bounds[1:] if last is None else bounds[1:][-last:]
    missing = [s for s in wanted if s not in trajectory.states]
    if missing:
        raise ValueError(f"window_balance: no router snapshots at steps {missing}")
    steps = trajectory.column("step")
    out = []
    pairs = list(zip(bounds[:-1], bounds[1:], strict=True))
    for start, end in pairs if last is None else pairs[-last:]:
        inside = (steps >= start) & (steps < end)
        loads = held_out_loads(
            scenario,
            trajectory,
            trajectory.states[end],
            scenario.tokens_before(end),
            sequences,
            seed,
        )
        out.append(
            {
                "start": float(start),
                "end": float(end),
                "maxvio_global": float(max_vio(loads).mean()),
                "maxvio_batch": float(trajectory.column("maxvio_batch")[inside].mean()),
                "task_loss": float(trajectory.column("task_loss")[inside].mean()),
            }
        )
    return out
