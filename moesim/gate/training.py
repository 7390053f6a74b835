"""Training the numerical gate under one balancing strategy (routing.md §10).

The gate stands in for the routers of a real training run. Each simulated layer has a student
router (:class:`~moesim.gate.router.RouterState`, initialised ``N(0, σ²)`` with
σ = ``init_logit_std / √(1 + noise²)`` so initial logits spread by ``init_logit_std`` whatever the
token norm, bias neutral: zero, or one for a multiplicative bias),
a fixed random teacher (:class:`~moesim.gate.teacher.Teacher`) that defines the task loss, and
its own Adam state. Every optimizer step of the scenario is one gate update:

1. draw ``gate.batch_sequences × gate.tokens_per_sequence`` tokens from the stream — one batch,
   shared by all layers, standing for the step's global batch (the stream's popularity at the
   tokens trained so far, domain packing by micro-batch, :mod:`moesim.gate.stream`);
2. for each layer: route (bias for selection only, group limits and capacity as in
   :func:`~moesim.gate.router.route_options`, one router call per micro-batch); the teacher's
   weighted choice and the task loss with its gradient
   (:func:`~moesim.gate.teacher.task_loss_and_grad`); the strategy's loss and gradient
   (:mod:`moesim.gate.balancing`), on micro-batches of ``parallelism.micro_batch_size``
   consecutive sequences and sequences of ``gate.tokens_per_sequence`` tokens; the weight
   gradients ``dW = dlogitsᵀ x`` of the task and of the auxiliary loss, and their interference
   (cosine and norm ratio); one Adam step on their sum (β1 0.9, β2 0.999, ε 1e-8,
   ``gate.learning_rate``); then the strategy's post-step bias update from this step's loads as
   processed (routed, less any capacity drops), counted over the bias scope, with γ from its
   schedule at the tokens trained before the step. The new bias first affects the next step
   (routing.md §2.2, §6.3): one bias update per optimizer step of the real run.

**Coarsening** (``gate.steps_per_update = k > 1``). The bias dynamics depend on the number of
updates, not on the tokens (routing.md §2.2, §2.7: the sign rule moves every bias by ``±γ`` per
step), so every optimizer step of the run still takes one bias update and one Adam step. What
runs only every k-th step is the expensive part: the teacher, the task and balance losses and
their weight gradients on the full gate batch.

- Steps ``0, k, 2k, …`` are *full* updates, exactly the steps above. The n-th full update draws
  the tokens a ``k = 1`` run draws at its n-th step (the same random sequence, consumed the same
  way).
- Every other step is a *bias step*: ``gate.bias_batch_sequences`` fresh sequences (default
  ``gate.batch_sequences``, so the bias reads loads as noisy as at ``k = 1``) are routed by every
  layer with its current weights and bias — group limits and capacity as in a full update, the
  batch cut into micro-batches of ``parallelism.micro_batch_size`` sequences — and the strategy's
  bias rule reads their loads as processed over its scope, with γ at the tokens trained before
  the step. Then each layer takes an Adam step with the gradient of the last full update. No
  teacher, no loss, no new gradient. Without a bias (or while γ is 0) the routing is skipped.

``gate.learning_rate`` thus keeps its meaning, the step of every optimizer step, and the weights
move at the pace of a ``k = 1`` run; Adam's moments see each gradient k times in a row. What
changes is that the gradient is up to k − 1 steps old: the router answers the bias's moves (the
task gradient pulls diverted tokens back to the teacher's experts) only at full updates, and the
load imbalance comes out lower than at ``k = 1``. How much depends on the router's speed
relative to the bias's. With DeepSeek-V3's ratio (peak learning rate 2.2e-4, γ = 1e-3) the
time-averaged MaxVio_batch of a 16-expert top-2 gate over 3000 steps dropped by 2, 3, 6 and 10 %
at k = 4, 8, 16 and 32 (twelve seeds pooled; ``tests/gate/test_training_coarsening.py`` checks
k = 16); with the gate's default learning rate 1e-3 = γ it dropped by about 4–10 % at k = 4 and
14–16 % at k = 8, so k must stay small there. (The other
choice, the same step per gradient update and k times fewer Adam steps, slows the routers k-fold
and halved MaxVio_batch at k = 4; it was rejected.) A smaller ``gate.bias_batch_sequences``
makes a bias step cheaper but the loads it reads noisier, and the bias wanders more: at
DeepSeek-V3 size, 8, 4 and 2 sequences instead of 32 raised MaxVio_batch by about 13, 28 and
45 %. Over longer runs the stale gradient matters more: at DeepSeek-V3 size (256 experts,
top-8, node limit 4, the benchmark's gate) the two agree over the first 3000 steps, but over
16,000 steps (two seeds) k = 16, 32 and 64 all gave MaxVio_batch about 2.5 where k = 1 gave 3.3
(−24 %): from about step 6000 on, k = 1's imbalance climbs to about 4 and the coarsened ones'
does not.

**Blocks of bias steps** (``gate.bias_steps_per_update = j > 1``; j divides k). The bias steps
between two full updates run in blocks of up to j consecutive steps. A block takes one
sub-batch of ``gate.bias_batch_sequences`` sequences per step from the chunk (below), walks the
weights through its steps first — each sub-batch's logits taken with the weights of its own
step, then that step's Adam update (Adam reads no bias) — scores all the sub-batches at once,
and then runs the steps' bias updates in order: step r selects on its own sub-batch's scores
with the bias it starts from, and the bias rule reads those loads with γ at its own step's
tokens. That is the ``j = 1`` computation reordered, so the trajectory is the same bit for bit
whatever j; a block only saves per-step overhead (the draws, the scores and the loop are
batched). A block ends at the next multiple of j, at the next full update, at the next
requested snapshot step (the state at the start of every requested step is exact), where γ
starts or stops being 0 (no routing while it is 0) and at the end of a chunk.

Coarser bias rules were tried and rejected: the load answers a single γ step strongly — at
DeepSeek-V3 size one step of γ on one expert moves its load by 4 % of the mean load at
initialisation, 13 % after 4000 steps and 36 % after 8000 — so every real step must read the
loads its own bias produces. Against the time-averaged MaxVio_batch of ``j = 1`` (2.52 over
16,000 steps at the benchmark's settings, k = 16, two seeds), one update of ``j·γ`` from one
batch's loads gave +16 % at j = 2 and +56 % at j = 4; j sign updates from j sub-batches all
routed with the block's first bias and weights +6, +27 and +82 % at j = 2, 4, 8, the imbalance
running away after about 6000 steps (one update of ``j·γ`` from the j sub-batches pooled was
+20 % at j = 8 over the first 3000 steps already); one batch re-selected at every step's bias
+4 and +18 % at j = 2, 8; sub-batches selected at every step's bias but scored with the block's
first weights +2 and +8 % at j = 4, 8. Only the one-batch rule is much cheaper (it routes a
j-th of the tokens: about 45 % less time per step at j = 4); the others cost about what the
exact block costs, since the time goes into scoring and counting every step's own tokens.

The bias batches come from their own random sequence (a fifth child of the seed). They are
drawn in chunks of consecutive bias steps (at most ``_BIAS_CHUNK_TOKENS`` tokens, never past the
next full update), and a chunk takes the stream's popularity at its first step: a data-mix
drift moves once per chunk. With domain packing, a bias batch whose sequences are not a whole
number of micro-batches shares its last micro-batch's dominant topic with the next one.

Records: one per full update — every step for ``k = 1``, every k-th step from step 0 otherwise
— each with its real ``step`` (:meth:`GateTrajectory.record_at` looks a step up). Snapshots
(``sample_steps``) may fall on any step.

Runs are deterministic given the seed sequence: independent child sequences drive the stream
geometry, the teachers, the student initialisation, the per-update token draws and the bias-step
draws, so two strategies trained from the same seed see the same teachers and the same token
batches.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from moesim.gate.balancing import (
    BalanceContext,
    BalancingStrategy,
    StrategySpec,
    grouped_counts,
    interference,
    make_strategy,
)
from moesim.gate.metrics import max_vio
from moesim.gate.router import (
    FloatArray,
    RouteOptions,
    RouterState,
    ScoreFunction,
    neutral_bias,
    route,
    route_options,
    row_sum,
    scores_from_logits,
    select_experts,
)
from moesim.gate.stream import TokenStream
from moesim.gate.teacher import Teacher, task_loss_and_grad, teacher_capture
from moesim.scenario.schema import Scenario

_BETA1 = 0.9
_BETA2 = 0.999
_EPS = 1e-8
# |argument| bound of exp in the sigmoid, as moesim.gate.router's.
_EXP_LIMIT = np.float32(80.0)
# Bias-step tokens drawn and scored at once (the scores of one chunk are kept for every layer).
_BIAS_CHUNK_TOKENS = 1 << 16


@dataclass
class GateTrajectory:
    """What one gate training run produced.

    Attributes
    ----------
    strategy : str
        Name of the strategy trained.
    records : list of dict
        One per full update, in step order (every step for ``gate.steps_per_update = 1``, every
        k-th step from step 0 otherwise): ``step`` (the real optimizer step), ``tokens``
        (``scenario.tokens_before(step + 1)``,
        tokens seen once the step is done), and, averaged over layers, ``maxvio_batch`` (MaxVio
        of the update's gate-batch loads as processed — routed, less any capacity drops —
        routing.md §2.4, §10 item 4), ``task_loss`` (nats),
        ``aux_loss`` (the strategy's loss, 0 when it has none), ``teacher_capture``
        (:mod:`moesim.gate.teacher`), ``interference_cos`` and ``interference_ratio`` (cosine
        between ``∂L_aux/∂W`` and ``∂L_task/∂W`` on the router weights and ``‖∂L_aux/∂W‖ /
        ‖∂L_task/∂W‖``, :func:`~moesim.gate.balancing.interference`; both exactly 0 for a
        strategy without an auxiliary loss), ``bias_abs_mean`` (mean ``|b − b₀|`` after the
        step's update, ``b₀`` the neutral bias: 0, or 1 for a multiplicative one), and
        ``gamma`` (the bias update speed used after this step; the same for every layer, 0
        without a bias).
    states : dict of int to list of RouterState
        Deep copies of every layer's router taken *before* the update of each requested step
        (the step ``total_steps`` means after the last update).
    final : list of RouterState
        The routers after the last update.
    stream : TokenStream
        The token stream the routers were trained on: route samples from this one, since a
        stream built from another seed has another topic geometry.
    steps_per_update : int
        ``gate.steps_per_update``: optimizer steps between two records.
    bias_steps_per_update : int
        ``gate.bias_steps_per_update``: the longest block of bias steps run together (the
        trajectory does not depend on it).
    """

    strategy: str
    stream: TokenStream
    records: list[dict[str, float]] = field(default_factory=list)
    states: dict[int, list[RouterState]] = field(default_factory=dict)
    final: list[RouterState] = field(default_factory=list)
    steps_per_update: int = 1
    bias_steps_per_update: int = 1

    def column(self, key: str) -> npt.NDArray[np.float64]:
        """One record field over all updates, shape (updates,)."""
        return np.array([r[key] for r in self.records], dtype=np.float64)

    def record_at(self, step: int) -> dict[str, float]:
        """The record of the last full update at or before ``step`` (the first record for a
        step before it, the last one past the end); ``records[step]`` when every step is
        recorded."""
        if not self.records:
            raise ValueError("record_at: the trajectory has no records")
        index = max(0, step) // self.steps_per_update
        return self.records[min(index, len(self.records) - 1)]


class _Adam:
    """Adam for one float32 weight matrix."""

    def __init__(self, shape: tuple[int, ...], learning_rate: float) -> None:
        self.m = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.t = 0
        self.learning_rate = learning_rate
        self._first = self._second = np.zeros(shape, dtype=np.float32)
        self._buffer = np.empty(shape, dtype=np.float32)

    def step(self, weights: npt.NDArray[np.float32], grad: npt.NDArray[np.float32]) -> None:
        """One Adam update with ``grad``; its scaled moments are kept for :meth:`repeat`."""
        self.t += 1
        self.m *= _BETA1
        self._first = (1 - _BETA1) * grad
        self.m += self._first
        self.v *= _BETA2
        self._second = (1 - _BETA2) * grad * grad
        self.v += self._second
        step_size = self.learning_rate * np.sqrt(1 - _BETA2**self.t) / (1 - _BETA1**self.t)
        # Bias-corrected update lr·m̂/(√v̂ + ε), with the corrections folded into the step size.
        denom = np.sqrt(self.v) + np.float32(_EPS * np.sqrt(1 - _BETA2**self.t))
        weights -= np.float32(step_size) * self.m / denom

    def repeat(self, weights: npt.NDArray[np.float32]) -> None:
        """One more Adam update with the gradient of the last :meth:`step`: its scaled terms
        reused, the update computed in place (a coarsened gate's bias steps)."""
        self.t += 1
        self.m *= _BETA1
        self.m += self._first
        self.v *= _BETA2
        self.v += self._second
        # Scalars in plain floats (math.sqrt rounds as np.sqrt does, without its call cost).
        root = math.sqrt(1 - _BETA2**self.t)
        step_size = self.learning_rate * root / (1 - _BETA1**self.t)
        buffer = np.sqrt(self.v, out=self._buffer)
        buffer += np.float32(_EPS * root)
        np.divide(self.m, buffer, out=buffer)
        buffer *= np.float32(step_size)
        weights -= buffer


def child_seeds(seed_seq: np.random.SeedSequence, n: int) -> list[np.random.SeedSequence]:
    """The first ``n`` children of ``seed_seq``, without advancing its spawn counter.

    :meth:`numpy.random.SeedSequence.spawn` mutates its parent, which would make a second run
    from the same object differ; building the children from the spawn key keeps runs repeatable.
    """
    return [
        np.random.SeedSequence(
            seed_seq.entropy, spawn_key=(*seed_seq.spawn_key, i), pool_size=seed_seq.pool_size
        )
        for i in range(n)
    ]


def gate_micro_batches(scenario: Scenario, sequences: int | None = None) -> list[int]:
    """Token counts of the gate batch's micro-batches: ``micro_batch_size`` sequences each.

    A last, smaller micro-batch takes any remainder of ``gate.batch_sequences`` (or of
    ``sequences``, for a batch of another size such as a bias step's).
    """
    mbs = scenario.parallelism.micro_batch_size
    batch = scenario.gate.batch_sequences if sequences is None else sequences
    tps = scenario.gate.tokens_per_sequence
    full, rest = divmod(batch, mbs)
    return [mbs * tps] * full + ([rest * tps] if rest else [])


def bias_batch_sequences(scenario: Scenario) -> int:
    """Sequences a bias step routes: ``gate.bias_batch_sequences``, or ``gate.batch_sequences``
    when unset."""
    gate = scenario.gate
    return gate.batch_sequences if gate.bias_batch_sequences is None else gate.bias_batch_sequences


def routed_loads(
    selection: FloatArray,
    top_k: int,
    n_groups: int = 1,
    group_topk: int | None = None,
    sizes: npt.ArrayLike | None = None,
) -> npt.NDArray[np.int64]:
    """Expert loads of the top-k routing :func:`~moesim.gate.router.select_experts` makes on
    ``selection`` (scores plus bias), counted without listing each token's experts.

    Group-limited (``group_topk < n_groups``): a group's score is the sum of its ``max(1,
    top_k // group_topk)`` largest selection scores added largest first, as there; the groups
    scoring at least the ``group_topk``-th best are kept. Then every kept expert scoring at
    least the token's threshold — the ``top_k``-th largest score among the kept groups, read from
    each kept group's sorted top values — is counted. Sorting the short rows of a group, or a
    row for one threshold, costs far less than :func:`numpy.argpartition`'s index bookkeeping
    over all experts. An exact tie at a threshold (saturated sigmoids, biases on the
    sign rule's lattice) would keep more groups or count more experts than asked: the totals
    show it, and the tied tokens take :func:`~moesim.gate.router.select_experts`' own choice,
    so the result is always its selection.

    Parameters
    ----------
    selection : ndarray, shape (T, E)
        Selection scores ``s + b``.
    top_k : int
        Experts per token.
    n_groups, group_topk : int, int or None
        Group-limited routing as in :func:`~moesim.gate.router.select_experts`.
    sizes : array_like of int, optional
        Consecutive token groups to count apart (summing to ``T``); default one group.

    Returns
    -------
    ndarray, int64
        Shape (G, E) with ``sizes``, else (E,).
    """
    n_tokens, n_experts = selection.shape
    counter = LoadCounter(n_tokens, n_experts, top_k, n_groups, group_topk, sizes)
    return counter(selection)


class LoadCounter:
    """:func:`routed_loads` for one batch shape, with its group structure worked out once and
    its work arrays kept (a coarsened gate calls it at every bias step).

    Parameters
    ----------
    n_tokens, n_experts : int
        Shape ``(T, E)`` of the selection scores it will count.
    top_k, n_groups, group_topk, sizes
        As :func:`routed_loads`.

    Notes
    -----
    Order statistics of short rows come from in-place :meth:`numpy.ndarray.sort` (SIMD sorting
    networks), several times faster than :func:`numpy.partition`'s per-row selection on rows
    this short; the value at a rank is the same. Loads are summed in ``uint16`` while a column
    total fits (summing bytes into ``int64`` costs several times more). Calls are not
    re-entrant: the work arrays are shared.
    """

    def __init__(
        self,
        n_tokens: int,
        n_experts: int,
        top_k: int,
        n_groups: int = 1,
        group_topk: int | None = None,
        sizes: npt.ArrayLike | None = None,
    ) -> None:
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k: {top_k} is not in 1..{n_experts}")
        self.shape = (n_tokens, n_experts)
        self.top_k, self.n_groups, self.group_topk = top_k, n_groups, group_topk
        self.grouped = group_topk is not None and group_topk < n_groups
        if self.grouped:
            assert group_topk is not None
            group_size = n_experts // n_groups
            if n_experts % n_groups or group_topk * group_size < top_k:
                raise ValueError(
                    f"n_groups: {group_topk} of {n_groups} groups cannot route top_k={top_k} of "
                    f"{n_experts} experts"
                )
            self.group_size = group_size
            self.per_group = min(group_size, max(1, top_k // group_topk))
            self.depth = min(top_k, group_size)  # a token's top-k lie in its kept groups' tops
            self.ordered = np.empty((n_tokens, n_groups, group_size), dtype=np.float32)
            self.tops = np.empty((n_tokens, n_groups, self.depth), dtype=np.float32)
            self.chosen = np.empty((n_tokens, n_groups, group_size), dtype=bool)
        else:
            self.ordered = np.empty((n_tokens, n_experts), dtype=np.float32)
            self.chosen = np.empty((n_tokens, n_experts), dtype=bool)
        self.acc = np.uint16 if n_tokens < 1 << 16 else np.int64
        self.starts: npt.NDArray[np.int64] | None = None
        self.equal_groups = 0
        if sizes is not None:
            bounds = np.asarray(sizes, dtype=np.int64)
            if bounds.ndim != 1 or bounds.sum() != n_tokens or (bounds <= 0).any():
                raise ValueError(f"sizes: {bounds.tolist()} do not split {n_tokens} tokens")
            if (bounds == bounds[0]).all():
                self.equal_groups = int(bounds.size)
            self.starts = np.concatenate(([0], np.cumsum(bounds)[:-1])).astype(np.int64)

    def __call__(self, selection: FloatArray) -> npt.NDArray[np.int64]:
        """Loads (E,), or (G, E) with ``sizes``, of the top-k selection on ``selection``."""
        if selection.shape != self.shape:
            raise ValueError(f"selection: shape {selection.shape} is not {self.shape}")
        n_tokens, n_experts = self.shape
        top_k, n_groups, group_topk = self.top_k, self.n_groups, self.group_topk
        if selection.dtype != np.float32:
            # The work arrays are float32; other dtypes take fresh ones of their own dtype.
            ordered = np.empty(self.ordered.shape, dtype=selection.dtype)
        else:
            ordered = self.ordered
        chosen = self.chosen
        keep = None
        if not self.grouped:
            np.copyto(ordered, selection)
            ordered.sort(axis=1)
            threshold = ordered[:, n_experts - top_k]
            np.greater_equal(selection, threshold[:, None], out=chosen)
        else:
            assert group_topk is not None
            n, depth = self.group_size, self.depth
            by_group = selection.reshape(n_tokens, n_groups, n)
            np.copyto(ordered, by_group)
            ordered.sort(axis=2)
            group_score = ordered[:, :, n - 1]
            for i in range(2, self.per_group + 1):
                group_score = group_score + ordered[:, :, n - i]
            ranked = np.sort(group_score, axis=1)
            keep = group_score >= ranked[:, n_groups - group_topk, None]
            zero, minus = selection.dtype.type(0), selection.dtype.type(-np.inf)
            tops = (
                self.tops
                if ordered.dtype == np.float32
                else np.empty_like(self.tops, ordered.dtype)
            )
            np.add(ordered[:, :, n - depth :], np.where(keep, zero, minus)[:, :, None], out=tops)
            flat_tops = tops.reshape(n_tokens, n_groups * depth)
            flat_tops.sort(axis=1)
            threshold = flat_tops[:, n_groups * depth - top_k]
            limit = np.where(keep, threshold[:, None], selection.dtype.type(np.inf))
            np.greater_equal(by_group, limit[:, :, None], out=chosen)
            chosen = chosen.reshape(n_tokens, n_experts)
        # Every row keeps at least group_topk groups and counts at least top_k experts; more
        # means an exact tie. Those rows take select_experts' own choice (row by row, as it
        # decides).
        tied = keep is not None and int(np.count_nonzero(keep)) != n_tokens * (group_topk or 0)
        if tied or int(np.count_nonzero(chosen)) != n_tokens * top_k:
            bad = np.add.reduce(chosen.view(np.uint8), axis=1) != top_k
            if keep is not None:
                bad |= np.count_nonzero(keep, axis=1) != group_topk
            rows = np.flatnonzero(bad)
            chosen[rows] = False
            exact = select_experts(selection[rows], None, top_k, n_groups, group_topk)
            chosen[rows[:, None], exact] = True
        flags = chosen.view(np.uint8)
        if self.starts is None:
            return np.add.reduce(flags, axis=0, dtype=self.acc).astype(np.int64)
        if self.equal_groups:
            # Equal groups: one reduction over a (G, T/G, E) view, cheaper than reduceat.
            by_size = flags.reshape(self.equal_groups, -1, n_experts)
            return np.add.reduce(by_size, axis=1, dtype=self.acc).astype(np.int64)
        return np.add.reduceat(flags, self.starts, axis=0, dtype=self.acc).astype(np.int64)


def balance_context(scenario: Scenario) -> BalanceContext:
    """The layout of the gate batch and the router settings the balancing losses need.

    Micro-batches as in :func:`gate_micro_batches`; ranks are the ``parallelism.expert ×
    parallelism.data`` data-parallel ranks of a pipeline stage; devices the ``parallelism.expert``
    ranks of an expert-parallel group. The communication loss's device limit ``M`` is
    ``min(top_k, devices)``, further capped by group-limited routing at the devices the kept
    groups span: ``router.device_limit`` itself (DeepSeek-V2's M = 3, routing.md §4),
    ``router.node_limit`` nodes' worth of devices, or ``group_topk`` groups' worth.
    """
    p, moe = scenario.parallelism, scenario.model.moe
    limit = None
    options = route_options(scenario)
    if options["group_topk"] is not None:
        limit = options["group_topk"] * max(1, p.expert // options["n_groups"])
    return BalanceContext(
        score=scenario.router.score,
        top_k=moe.top_k,
        tokens_per_sequence=scenario.gate.tokens_per_sequence,
        micro_batches=tuple(gate_micro_batches(scenario)),
        ranks=p.expert * p.data,
        devices=p.expert,
        device_limit=limit,
    )


def _scores(logits: FloatArray, score: ScoreFunction) -> FloatArray:
    """:func:`~moesim.gate.router.scores_from_logits`, in place on ``logits``; the sigmoid by
    the same operations, the clip at ``±_EXP_LIMIT`` applied only when some logit is beyond it
    (two reductions cost less than two element-wise passes, and an in-range clip changes
    nothing, so the values are the same)."""
    if score != "sigmoid":
        return scores_from_logits(logits, score)
    out = np.negative(logits, out=logits)
    # ``not (a <= b)`` also takes the clip path when a NaN hides in the logits.
    if not (np.maximum.reduce(out, axis=None) <= _EXP_LIMIT) or not (
        np.minimum.reduce(out, axis=None) >= -_EXP_LIMIT
    ):
        np.minimum(out, _EXP_LIMIT, out=out)
        np.maximum(out, -_EXP_LIMIT, out=out)
    np.exp(out, out=out)
    out += 1
    return np.reciprocal(out, out=out)


@dataclass
class _Block:
    """Consecutive bias steps ``start, …, end − 1`` taken together (module docstring, *Blocks
    of bias steps*)."""

    start: int
    end: int
    trained: list[float]  # tokens trained before each step (its γ)
    x: FloatArray | None  # the steps' sub-batches in order; None while the bias does not move


class _BiasSteps:
    """The bias steps between full updates (module docstring, *Coarsening*): the current chunk of
    bias-batch tokens, cut into blocks of consecutive steps; for a block, the weights' path and
    every sub-batch's scores (:meth:`advance`), then the steps' bias updates (:meth:`select`)."""

    def __init__(
        self,
        scenario: Scenario,
        stream: TokenStream,
        rng: np.random.Generator,
        options: RouteOptions,
        scope: str,
    ) -> None:
        gate = scenario.gate
        self.scenario, self.stream, self.rng, self.options = scenario, stream, rng, options
        self.sequences = bias_batch_sequences(scenario)
        self.tokens = self.sequences * gate.tokens_per_sequence
        micro = gate_micro_batches(scenario, self.sequences)
        self.micro = micro
        context = replace(balance_context(scenario), micro_batches=tuple(micro))
        self.scope_sizes = None if scope == "global" else context.scope_sizes(scope, self.tokens)
        self.chunk: npt.NDArray[np.float32] = np.zeros((0, scenario.stream.dim), np.float32)
        self.left = 0
        self.used = 0
        # Each layer's scores of a block, in buffers kept from block to block.
        self.buffers: list[FloatArray] = []
        self.counter = None
        if options["capacity"] is None:
            # One load counter, reused by every layer and step.
            self.counter = LoadCounter(
                self.tokens,
                scenario.model.moe.routed_experts,
                options["top_k"],
                options["n_groups"],
                options["group_topk"],
                self.scope_sizes,
            )

    def invalidate(self) -> None:
        """Forget the rest of the chunk (at a full update: chunks never span one)."""
        self.left = 0

    def plan(self, step: int, end: int, period_end: int, balancer: BalancingStrategy) -> _Block:
        """The block from ``step``: at most to ``end``, cut where the bias starts or stops moving
        (γ = 0 skips the routing) and at the end of the chunk, whose sub-batches it takes
        (drawing a new chunk, at the stream's popularity at ``step``, when none is left)."""
        scenario = self.scenario
        trained = [scenario.tokens_before(step)]
        active = balancer.gamma_at(trained[0]) > 0
        for later in range(step + 1, end):
            tokens = scenario.tokens_before(later)
            if (balancer.gamma_at(tokens) > 0) != active:
                end = later
                break
            trained.append(tokens)
        if not active:
            return _Block(step, end, trained, None)
        if self.left == 0:
            gate = scenario.gate
            n_steps = min(period_end - step, max(1, _BIAS_CHUNK_TOKENS // self.tokens))
            drawn, _ = self.stream.sample(
                n_steps * self.sequences,
                gate.tokens_per_sequence,
                self.rng,
                tokens_trained=trained[0],
                sequences_per_micro_batch=scenario.parallelism.micro_batch_size,
            )
            self.chunk = drawn.reshape(-1, scenario.stream.dim)
            self.left, self.used = n_steps, 0
        n = min(end - step, self.left)
        x = self.chunk[self.used * self.tokens : (self.used + n) * self.tokens]
        self.used += n
        self.left -= n
        return _Block(step, step + n, trained[:n], x)

    def advance(
        self, block: _Block, states: Sequence[RouterState], optimizers: Sequence[_Adam]
    ) -> list[FloatArray] | None:
        """The block's weights path and every layer's scores of its sub-batches (the bias read
        nowhere): sub-batch r's logits with the weights step ``block.start + r`` starts from,
        then that step's Adam update. Leaves routing with a capacity to :meth:`select`."""
        n = block.end - block.start
        if block.x is None:
            for state, adam in zip(states, optimizers, strict=True):
                for _ in range(n):
                    adam.repeat(state.weights)
            return None
        if self.options["capacity"] is not None:
            return None
        size = self.tokens
        out = []
        for layer, (state, adam) in enumerate(zip(states, optimizers, strict=True)):
            if layer == len(self.buffers) or len(self.buffers[layer]) < n * size:
                buffer = np.empty((n * size, state.n_experts), dtype=np.float32)
                self.buffers[layer : layer + 1] = [buffer]
            logits = self.buffers[layer][: n * size]
            for r in range(n):
                rows = slice(r * size, (r + 1) * size)
                np.matmul(block.x[rows], state.weights.T, out=logits[rows])
                adam.repeat(state.weights)
            out.append(_scores(logits, self.options["score"]))
        return out

    def select(
        self,
        block: _Block,
        scores: list[FloatArray] | None,
        states: Sequence[RouterState],
        optimizers: Sequence[_Adam],
        balancer: BalancingStrategy,
    ) -> None:
        """The block's bias updates, step by step: each selects on its sub-batch's scores with
        the bias it starts from, and the bias rule reads those loads as processed, per
        bias-scope group, with γ at its step's tokens. With a capacity (dropping depends on the
        gates) each step routes its sub-batch here, then takes its Adam update."""
        if block.x is None:
            return
        size = self.tokens
        n = block.end - block.start
        if scores is None:
            for state, adam in zip(states, optimizers, strict=True):
                for r in range(n):
                    routing = route(
                        block.x[r * size : (r + 1) * size],
                        state,
                        **self.options,
                        segments=self.micro,
                        tokens_per_sequence=self.scenario.gate.tokens_per_sequence,
                    )
                    if self.scope_sizes is None:
                        counts = routing.loads()
                    else:
                        counts = grouped_counts(
                            routing.selected, state.n_experts, self.scope_sizes, routing.dropped
                        )
                    balancer.after_step(state, counts, block.trained[r])
                    adam.repeat(state.weights)
            return
        assert self.counter is not None
        for state, layer_scores in zip(states, scores, strict=True):
            for r in range(n):
                selection = layer_scores[r * size : (r + 1) * size]
                if state.biased:
                    if state.bias_mode == "mul":
                        selection *= state.bias
                    else:
                        selection += state.bias
                balancer.after_step(state, self.counter(selection), block.trained[r])


def train_gate(
    scenario: Scenario,
    strategy: StrategySpec,
    sample_steps: Sequence[int],
    seed_seq: np.random.SeedSequence,
) -> GateTrajectory:
    """Train every simulated layer's router over ``scenario.total_steps`` optimizer steps.

    Parameters
    ----------
    scenario : Scenario
        Model (experts, top-k), router, stream, gate, parallelism and training settings.
    strategy : NoBalancing | AuxLoss | LossFree | Composite
        The balancing strategy, one of ``scenario.strategies``.
    sample_steps : sequence of int
        Steps in ``0..total_steps`` whose routers to snapshot (before that step's update).
    seed_seq : numpy.random.SeedSequence
        Root of all randomness; not mutated.

    Returns
    -------
    GateTrajectory
        Per-update records (one per full update: every step, or every
        ``gate.steps_per_update``-th), the requested snapshots and the final routers.

    Notes
    -----
    Cost per full update is a few (tokens × experts) passes per layer plus three (tokens ×
    experts × dim) products, and one more (the auxiliary weight gradient, kept apart for the
    interference) when the strategy has a loss; everything is float32 and vectorised. A bias
    step (``steps_per_update > 1``) costs one (tokens × experts × dim) product per layer on the
    bias batch, its scores, the loads of their selection (:func:`routed_loads`) and an Adam
    step; blocks of bias steps (``bias_steps_per_update > 1``) score their sub-batches at once
    and draw per block, not per step, which saves about 10 % at DeepSeek-V3 size.
    """
    moe, gate = scenario.model.moe, scenario.gate
    n_experts, top_k, dim = moe.routed_experts, moe.top_k, scenario.stream.dim
    n_layers, total_steps = gate.layers_simulated, scenario.total_steps
    every, block = gate.steps_per_update, gate.bias_steps_per_update
    wanted = {int(s) for s in sample_steps}
    bad = sorted(s for s in wanted if not 0 <= s <= total_steps)
    if bad:
        raise ValueError(f"sample_steps: {bad} outside 0..{total_steps}")

    stream_seed, teacher_seed, init_seed, data_seed, bias_seed = child_seeds(seed_seq, 5)
    stream = TokenStream(scenario.stream, np.random.default_rng(stream_seed))
    teacher_rng = np.random.default_rng(teacher_seed)
    teachers = [
        Teacher.random(n_experts, dim, gate.teacher_temperature, teacher_rng)
        for _ in range(n_layers)
    ]
    init_rng = np.random.default_rng(init_seed)
    # Tokens have E‖x‖² = 1 + noise² (unit centroid plus noise), so this weight std gives the
    # initial logits a standard deviation of init_logit_std.
    init_std = gate.init_logit_std / float(np.sqrt(1.0 + scenario.stream.noise**2))
    balancer = make_strategy(strategy)
    mode = balancer.bias_mode
    neutral = np.float32(neutral_bias(mode))
    states = [
        RouterState.initial(n_experts, dim, init_std, init_rng, mode) for _ in range(n_layers)
    ]
    optimizers = [_Adam((n_experts, dim), gate.learning_rate) for _ in range(n_layers)]
    data_rng = np.random.default_rng(data_seed)

    options = route_options(scenario)
    grouped = options["group_topk"] is not None and options["group_topk"] < options["n_groups"]
    score = options["score"]
    context = balance_context(scenario)
    n_tokens = gate.batch_sequences * gate.tokens_per_sequence
    scope = balancer.bias_scope
    scope_sizes = None if scope in (None, "global") else context.scope_sizes(scope, n_tokens)
    micro = context.micro_sizes(n_tokens)
    bias_steps = None
    if every > 1 and scope is not None:
        bias_steps = _BiasSteps(scenario, stream, np.random.default_rng(bias_seed), options, scope)

    trajectory = GateTrajectory(
        strategy=balancer.name,
        stream=stream,
        steps_per_update=every,
        bias_steps_per_update=block,
    )
    stops = sorted(wanted)

    def block_end(start: int, period_end: int) -> int:
        """Where a block from ``start`` ends at the latest: the next multiple of j, the next
        full update, or the next snapshot step (the state at its start is taken exactly)."""
        end = min(period_end, start - start % block + block)
        after = bisect.bisect_right(stops, start)
        return min(end, stops[after]) if after < len(stops) else end

    step = 0
    while step < total_steps:
        if step in wanted:
            trajectory.states[step] = [s.copy() for s in states]
        tokens_before = scenario.tokens_before(step)
        if step % every:
            # A block of bias steps (steps_per_update > 1; one step unless
            # bias_steps_per_update > 1): each step's bias update from its own fresh batch,
            # and its Adam step with the last full update's gradient.
            period_end = min(total_steps, step - step % every + every)
            if bias_steps is None:
                end = block_end(step, period_end)
                for state, adam in zip(states, optimizers, strict=True):
                    for _ in range(end - step):
                        adam.repeat(state.weights)
                step = end
                continue
            current = bias_steps.plan(step, block_end(step, period_end), period_end, balancer)
            scores = bias_steps.advance(current, states, optimizers)
            bias_steps.select(current, scores, states, optimizers, balancer)
            step = current.end
            continue
        tokens, _ = stream.sample(
            gate.batch_sequences,
            gate.tokens_per_sequence,
            data_rng,
            tokens_trained=tokens_before,
            sequences_per_micro_batch=scenario.parallelism.micro_batch_size,
        )
        x = tokens.reshape(-1, dim)
        sums = np.zeros(7)
        for state, teacher, adam in zip(states, teachers, optimizers, strict=True):
            routing = route(
                x,
                state,
                **options,
                segments=micro,
                tokens_per_sequence=gate.tokens_per_sequence,
            )
            choice = teacher.choice(x, top_k)
            target = choice.at(routing.selected)
            task, dtask = task_loss_and_grad(routing, target, row_sum(choice.weights**2), score)
            grad = dtask.T @ x
            aux, cos, ratio = 0.0, 0.0, 0.0
            if balancer.has_loss:
                plain = None if grouped or state.biased else routing.selected
                aux, daux = balancer.loss_and_grad(routing, context, unbiased_selected=plain)
                if daux is not None:
                    grad_aux = daux.T @ x
                    cos, ratio = interference(grad_aux, grad)
                    grad += grad_aux
            adam.step(state.weights, grad)
            counts = routing.loads()  # as processed: after any capacity drops (§6.2 item 6)
            if scope_sizes is not None:
                scoped = grouped_counts(routing.selected, n_experts, scope_sizes, routing.dropped)
                balancer.after_step(state, scoped, tokens_before)
            elif scope is not None:
                balancer.after_step(state, counts, tokens_before)
            sums += (
                float(max_vio(counts)),
                task,
                aux,
                teacher_capture(target, routing.dropped),
                cos,
                ratio,
                float(np.abs(state.bias - neutral).mean(dtype=np.float64)),
            )
        if bias_steps is not None:
            bias_steps.invalidate()  # the next bias steps draw for the new period
        sums /= n_layers
        trajectory.records.append(
            {
                "step": step,
                "tokens": scenario.tokens_before(step + 1),
                "maxvio_batch": float(sums[0]),
                "task_loss": float(sums[1]),
                "aux_loss": float(sums[2]),
                "teacher_capture": float(sums[3]),
                "interference_cos": float(sums[4]),
                # inf where the task gradient vanished: undefined, so NaN (null, not applicable)
                "interference_ratio": float(sums[5]) if np.isfinite(sums[5]) else float("nan"),
                "bias_abs_mean": float(sums[6]),
                "gamma": balancer.gamma_at(tokens_before),
            }
        )
        step += 1
    if total_steps in wanted:
        trajectory.states[total_steps] = [s.copy() for s in states]
    trajectory.final = [s.copy() for s in states]
    return trajectory
