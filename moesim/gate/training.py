"""Training the numerical gate under one balancing strategy.

Contract: :func:`train_gate` trains every simulated layer's router over the scenario's
optimizer steps under one balancing strategy and returns a :class:`GateTrajectory` — one record
per full update, router snapshots at the requested steps, the final routers and the window
summary the estimate reports. Runs are deterministic given the seed sequence: independent child
sequences drive the stream geometry, the task (targets or teachers), the router initialisation,
the per-update token draws and the bias-step draws, so two strategies trained from the same
seed see the same task and the same token batches.

Each layer has a router (:class:`~moesim.gate.router.RouterState`, weights ``N(0, σ²)`` with
σ = ``init_logit_std / √(E‖x‖²)`` so initial logits spread by ``init_logit_std``; bias
neutral), its task (``gate.objective``: learning experts, :mod:`moesim.gate.experts`, or a fixed
teacher router, :mod:`moesim.gate.teacher`) and its own Adam state (β1 0.9, β2 0.999, ε 1e-8,
``gate.learning_rate``). A *full update*:

1. draws ``gate.batch_sequences × gate.tokens_per_sequence`` tokens from the stream (one batch
   shared by all layers, at the stream's popularity for the tokens trained so far, packed by
   micro-batch as :mod:`moesim.gate.stream` says);
2. per layer: routes it (bias for selection only, group limits and capacity per micro-batch of
   ``parallelism.micro_batch_size`` sequences, :func:`~moesim.gate.router.route`); computes the
   task loss and its logit gradient (the experts take their step); the strategy's balancing loss
   and gradient (:mod:`moesim.gate.balancing`); their interference on the router weights
   (cosine and norm ratio, :func:`~moesim.gate.balancing.interference`); for a biased router,
   the bias's perturbation — the share of assignments it moves off the router's own top-k and
   the task loss at the same weights without it; one Adam step on the summed gradient; then the
   strategy's bias update from this step's loads as processed (routed, less capacity drops),
   counted over the bias scope, with γ at the tokens trained before the step. The new bias
   first affects the next step (arXiv 2408.15664 Algorithm 1; Megatron-LM
   ``megatron/core/distributed/finalize_model_grads.py`` updates it once per optimizer step).

With ``gate.steps_per_update = k > 1`` only steps ``0, k, 2k, …`` are full updates; every other
step is a *bias step*: ``gate.bias_batch_sequences`` fresh sequences are routed with the current
weights and bias, the bias rule reads their loads, and Adam repeats the last full gradient (the
experts take the period's k steps at its full update). The n-th full update draws the tokens a
``k = 1`` run draws at its n-th step. Bias steps run in exact blocks (the same trajectory as one
step at a time, faster); the bias batches come from their own random sequence, drawn in chunks
that take the stream's popularity at their first step. The measurements behind these choices
are in ``docs/decisions/2026-12-04-gate-coarsening.md``.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from moesim.gate import kernels
from moesim.gate.balancing import (
    BalanceContext,
    BalancingStrategy,
    StrategySpec,
    grouped_counts,
    interference,
    make_strategy,
)
from moesim.gate.experts import ExpertTask
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
_EXP_LIMIT = np.float32(kernels.EXP_LIMIT)
# Sub-batches a pipelined block hands from the scoring thread to the selecting one at a time.
_PIPELINE_STEPS = 2
# Bias-step tokens drawn and scored at once (the scores of one chunk are kept for every layer).
_BIAS_CHUNK_TOKENS = 1 << 16
# Longest block of bias steps run together (docs/decisions/2026-12-04-gate-coarsening.md): the
# trajectory does not depend on it; 16 saved about 10 % at DeepSeek-V3 size
# (benchmarks/gate_speed.py) and keeps a block's score buffers within a few tens of MB.
BIAS_BLOCK_STEPS = 16


class UpdateMetrics(NamedTuple):
    """One layer's numbers at one full update (averaged over layers into a record)."""

    maxvio_batch: float
    task_loss: float
    aux_loss: float
    teacher_capture: float
    interference_cos: float
    interference_ratio: float
    bias_abs_mean: float
    bias_moved: float
    task_loss_unbiased: float


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
        (``scenario.tokens_before(step + 1)``, tokens seen once the step is done), and,
        averaged over layers (:class:`UpdateMetrics`): ``maxvio_batch`` (MaxVio of the update's
        gate-batch loads as processed — routed, less any capacity drops), ``task_loss`` (the
        objective's loss before the update), ``aux_loss`` (the strategy's loss, 0 when it has
        none), ``teacher_capture`` (only with ``gate.objective: teacher``,
        :mod:`moesim.gate.teacher`), ``interference_cos`` and ``interference_ratio`` (cosine
        between ``∂L_aux/∂W`` and ``∂L_task/∂W`` on the router weights and ``‖∂L_aux/∂W‖ /
        ‖∂L_task/∂W‖``, :func:`~moesim.gate.balancing.interference`; both exactly 0 for a
        strategy without an auxiliary loss), ``bias_abs_mean`` (mean ``|b − b₀|`` after the
        step's update, ``b₀`` the neutral bias: 0, or 1 for a multiplicative one),
        ``bias_moved`` (share of the assignments the bias moves off the router's own top-k; 0
        while the bias is neutral), ``task_loss_unbiased`` (the task loss of the same weights
        routed without the bias; the task loss while the bias is neutral), and ``gamma`` (the
        bias update speed used after this step; the same for every layer, 0 without a bias).
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
    tail_loads : ndarray, shape (layers, E), int64, or None
        Each layer's gate-batch loads (as processed) summed over the last tenth of the full
        updates (at least one): the window of :meth:`tail_summary`.
    tail_updates : int
        Full updates in that window.
    """

    strategy: str
    stream: TokenStream
    records: list[dict[str, float]] = field(default_factory=list)
    states: dict[int, list[RouterState]] = field(default_factory=dict)
    final: list[RouterState] = field(default_factory=list)
    steps_per_update: int = 1
    tail_loads: npt.NDArray[np.int64] | None = None
    tail_updates: int = 0

    def column(self, key: str) -> npt.NDArray[np.float64]:
        """One record field over all updates, shape (updates,)."""
        return np.array([r[key] for r in self.records], dtype=np.float64)

    def tail_summary(self) -> dict[str, float]:
        """MaxVio_global, MaxVio_batch, task loss and the interference and perturbation
        measures over one window, the last tenth of the full updates (at least one):
        ``maxvio_global`` from the window's pooled loads (per layer, averaged over layers),
        the others the means of the window's records."""
        if not self.records or self.tail_loads is None:
            raise ValueError("tail_summary: the trajectory has no records")
        window = self.records[-self.tail_updates :]
        out = {"maxvio_global": float(np.mean([max_vio(c) for c in self.tail_loads]))}
        for key in (
            "maxvio_batch",
            "task_loss",
            "task_loss_unbiased",
            "bias_moved",
            "interference_cos",
            "interference_ratio",
        ):
            out[key] = float(np.mean([r[key] for r in window]))
        return out

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

    def repeat_many(self, weights: npt.NDArray[np.float32], n: int) -> None:
        """``n`` calls of :meth:`repeat` (compiled: one pass, the same values)."""
        if not (kernels.ENABLED and weights.flags.c_contiguous and n > 1):
            for _ in range(n):
                self.repeat(weights)
            return
        eps, steps = zip(*(self._repeat_terms(self.t + r) for r in range(1, n + 1)), strict=True)
        self.t += n
        kernels.adam_repeats(
            weights, self.m, self.v, self._first, self._second, _BETA1, _BETA2,
            np.array(eps, dtype=np.float32), np.array(steps, dtype=np.float32),
        )  # fmt: skip

    def _repeat_terms(self, t: int) -> tuple[float, float]:
        """The ε term and step size of the repeated update at Adam step ``t``: the bias
        corrections folded in (plain floats: math.sqrt rounds as np.sqrt does, without its
        call cost)."""
        root = math.sqrt(1 - _BETA2**t)
        return _EPS * root, self.learning_rate * root / (1 - _BETA1**t)

    def repeat(
        self, weights: npt.NDArray[np.float32], negated: npt.NDArray[np.float32] | None = None
    ) -> None:
        """One more Adam update with the gradient of the last :meth:`step`: its scaled terms
        reused, the update computed in place (a coarsened gate's bias steps); with ``negated``,
        the new weights negated into it too."""
        self.t += 1
        eps, step_size = self._repeat_terms(self.t)
        if kernels.ENABLED and weights.flags.c_contiguous:
            # The same float32 operations as below, in one pass without temporaries.
            kernels.adam_repeat(
                weights, self.m, self.v, self._first, self._second, _BETA1, _BETA2, eps,
                step_size, negated,
            )  # fmt: skip
            return
        self.m *= _BETA1
        self.m += self._first
        self.v *= _BETA2
        self.v += self._second
        buffer = np.sqrt(self.v, out=self._buffer)
        buffer += np.float32(eps)
        np.divide(self.m, buffer, out=buffer)
        buffer *= np.float32(step_size)
        weights -= buffer
        if negated is not None:
            np.negative(weights, out=negated)


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
    groups span: ``router.device_limit`` itself (DeepSeek-V2's M = 3, DeepSeek-V2, arXiv 2405.04434
    §2.2),
    ``router.node_limit`` nodes' worth of devices, or ``group_topk`` groups' worth.
    """
    p, moe = scenario.parallelism, scenario.model.moe_spec
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
        # A chunk being drawn on the pipeline's worker: (its step and steps, its future).
        self.ahead: tuple[tuple[int, int], Future[FloatArray]] | None = None
        # Each layer's scores of a block, in buffers kept from block to block.
        self.buffers: list[FloatArray] = []
        n_experts = scenario.model.moe_spec.routed_experts
        self.negated = np.empty((n_experts, scenario.stream.dim), dtype=np.float32)
        self.counter = None
        if options["capacity"] is None:
            # One load counter, reused by every layer and step.
            self.counter = LoadCounter(
                self.tokens,
                scenario.model.moe_spec.routed_experts,
                options["top_k"],
                options["n_groups"],
                options["group_topk"],
                self.scope_sizes,
            )

    def fused_sign_rule(self, balancer: BalancingStrategy, states: Sequence[RouterState]) -> bool:
        """Whether :func:`moesim.gate.kernels.sign_rule_block` computes this strategy's bias
        steps: the sign rule on an additive float32 bias, not re-centred, from the loads over the
        whole sub-batch."""
        bias = balancer.bias
        return (
            bias is not None
            and bias.rule == "sign"
            and bias.mode == "add"
            and not bias.recenter
            and self.scope_sizes is None
            and all(s.bias.dtype == np.float32 and s.bias_mode == "add" for s in states)
        )

    def _chunk_steps(self, step: int, period_end: int) -> int:
        """Bias steps of the chunk drawn at ``step``."""
        return min(period_end - step, max(1, _BIAS_CHUNK_TOKENS // self.tokens))

    def _draw(self, step: int, n_steps: int) -> FloatArray:
        """The chunk of ``n_steps`` sub-batches drawn at ``step``, one row per token."""
        scenario = self.scenario
        drawn, _ = self.stream.sample(
            n_steps * self.sequences,
            scenario.gate.tokens_per_sequence,
            self.rng,
            tokens_trained=scenario.tokens_before(step),
            sequences_per_micro_batch=scenario.parallelism.micro_batch_size,
        )
        return drawn.reshape(-1, scenario.stream.dim)

    def draw_ahead(
        self, step: int, period_end: int, balancer: BalancingStrategy, worker: ThreadPoolExecutor
    ) -> None:
        """Start drawing, on ``worker``, the chunk that :meth:`plan` draws at ``step``, the first
        bias step of the next period, while this thread takes the full update (nothing else
        draws from the bias steps' generator in between, so the values are the same)."""
        tokens = self.scenario.tokens_before(step)
        if step >= period_end or not balancer.gamma_at(tokens) > 0:
            return  # that period's first block draws nothing
        n_steps = self._chunk_steps(step, period_end)
        self.ahead = ((step, n_steps), worker.submit(self._draw, step, n_steps))

    def exp_form(self, balancer: BalancingStrategy, states: Sequence[RouterState]) -> bool:
        """Whether the block's scores are left as ``exp(−logits)``, the sigmoid taken inside
        the compiled sign-rule steps (:func:`moesim.gate.kernels.sign_rule_block`): two
        passes fewer over the scores, and no check of the logits' range."""
        return (
            kernels.ENABLED
            and self.options["score"] == "sigmoid"
            and self.options["capacity"] is None
            and self.fused_sign_rule(balancer, states)
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
            n_steps = self._chunk_steps(step, period_end)
            if self.ahead is not None:
                (ahead_step, ahead_steps), drawing = self.ahead
                self.ahead = None
                if (ahead_step, ahead_steps) != (step, n_steps):
                    # The generator has moved on: any other draw would break the trajectory.
                    raise RuntimeError(
                        f"bias chunk drawn ahead for step {ahead_step} ({ahead_steps} steps), "
                        f"needed at step {step} ({n_steps} steps)"
                    )
                self.chunk = drawing.result()
            else:
                self.chunk = self._draw(step, n_steps)
            self.left, self.used = n_steps, 0
        n = min(end - step, self.left)
        x = self.chunk[self.used * self.tokens : (self.used + n) * self.tokens]
        self.used += n
        self.left -= n
        return _Block(step, step + n, trained[:n], x)

    def advance(
        self,
        block: _Block,
        states: Sequence[RouterState],
        optimizers: Sequence[_Adam],
        exp_form: bool = False,
    ) -> list[FloatArray] | None:
        """The block's weights path and every layer's scores of its sub-batches (the bias read
        nowhere): sub-batch r's logits with the weights step ``block.start + r`` starts from,
        then that step's Adam update. Leaves routing with a capacity to :meth:`select`. With
        ``exp_form`` (:meth:`exp_form`) the scores are left as ``exp(−logits)``: the logits
        come negated from the negated weights (negation is exact, so ``x·(−W)ᵀ = −(x·Wᵀ)`` bit
        for bit, on half as many values) and only the exponential is taken."""
        n = block.end - block.start
        if block.x is None:
            for state, adam in zip(states, optimizers, strict=True):
                adam.repeat_many(state.weights, n)
            return None
        if self.options["capacity"] is not None:
            return None
        size = self.tokens
        out = self._buffers(states, n)
        if exp_form:
            self._exp_rows(block, states, optimizers, 0, n)
            return out
        for logits, state, adam in zip(out, states, optimizers, strict=True):
            for r in range(n):
                rows = slice(r * size, (r + 1) * size)
                np.matmul(block.x[rows], state.weights.T, out=logits[rows])
                adam.repeat(state.weights)
            _scores(logits, self.options["score"])
        return out

    def _buffers(self, states: Sequence[RouterState], n: int) -> list[FloatArray]:
        """Each layer's buffer for the scores of ``n`` sub-batches."""
        rows = n * self.tokens
        for layer, state in enumerate(states):
            if layer == len(self.buffers) or len(self.buffers[layer]) < rows:
                buffer = np.empty((rows, state.n_experts), dtype=np.float32)
                self.buffers[layer : layer + 1] = [buffer]
        return [buffer[:rows] for buffer in self.buffers[: len(states)]]

    def _exp_rows(
        self,
        block: _Block,
        states: Sequence[RouterState],
        optimizers: Sequence[_Adam],
        start: int,
        end: int,
    ) -> None:
        """Sub-batches ``start..end − 1`` of the block in exp form (:meth:`advance`), into the
        layers' buffers, with their steps' Adam updates."""
        assert block.x is not None
        size, negated = self.tokens, self.negated
        for logits, state, adam in zip(self.buffers, states, optimizers, strict=True):
            np.negative(state.weights, out=negated)
            for r in range(start, end):
                rows = slice(r * size, (r + 1) * size)
                np.matmul(block.x[rows], negated.T, out=logits[rows])
                adam.repeat(state.weights, negated)  # and the next sub-batch's −weights
            taken = logits[start * size : end * size]
            np.exp(taken, out=taken)

    def pipelined(
        self,
        block: _Block,
        states: Sequence[RouterState],
        optimizers: Sequence[_Adam],
        balancer: BalancingStrategy,
        worker: ThreadPoolExecutor,
    ) -> None:
        """:meth:`advance` and :meth:`select` of a block in exp form whose bias moves, on two
        threads: ``worker`` scores the sub-batches ``_PIPELINE_STEPS`` at a time while this
        thread takes the sign-rule steps of those already scored. Each thread does its part's
        operations in the same order as one thread would, and neither reads what the other
        writes (weights and Adam state there, biases here), so the result is the same bit for
        bit."""
        assert block.x is not None
        n, size = block.end - block.start, self.tokens
        scores = self._buffers(states, n)
        gammas = np.array([balancer.gamma_at(t) for t in block.trained], dtype=np.float32)
        # The first piece is one sub-batch: this thread waits for it alone.
        cuts = [0, *range(min(1, n), n, _PIPELINE_STEPS), n]
        pieces = list(itertools.pairwise(cuts))
        scored = [
            worker.submit(self._exp_rows, block, states, optimizers, lo, hi) for lo, hi in pieces
        ]
        try:
            for (lo, hi), piece in zip(pieces, scored, strict=True):
                piece.result()
                for state, layer_scores in zip(states, scores, strict=True):
                    kernels.sign_rule_block(
                        layer_scores[lo * size : hi * size],
                        state.bias,
                        gammas[lo:hi],
                        self.options["top_k"],
                        self.options["n_groups"],
                        self.options["group_topk"],
                        True,
                    )
        finally:
            wait(scored)  # the weights are not left half-way along the block's path

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
        if kernels.ENABLED and self.fused_sign_rule(balancer, states):
            # The whole block's selections, counts and sign-rule steps in one compiled call.
            gammas = np.array([balancer.gamma_at(t) for t in block.trained], dtype=np.float32)
            from_exp = self.exp_form(balancer, states)
            for state, layer_scores in zip(states, scores, strict=True):
                kernels.sign_rule_block(
                    layer_scores[: n * size],
                    state.bias,
                    gammas,
                    self.options["top_k"],
                    self.options["n_groups"],
                    self.options["group_topk"],
                    from_exp,
                )
            return
        if kernels.ENABLED:
            # The counter's loads in one compiled pass per sub-batch (the bias applied there).
            options, starts = self.options, self.counter.starts
            for state, layer_scores in zip(states, scores, strict=True):
                for r in range(n):
                    loads = kernels.routed_counts(
                        layer_scores[r * size : (r + 1) * size],
                        state.bias,
                        state.bias_mode == "mul",
                        options["top_k"],
                        options["n_groups"],
                        options["group_topk"],
                        starts,
                    )
                    counts = loads[0] if starts is None else loads
                    balancer.after_step(state, counts, block.trained[r])
            return
        for state, layer_scores in zip(states, scores, strict=True):
            for r in range(n):
                selection = layer_scores[r * size : (r + 1) * size]
                if state.biased:
                    if state.bias_mode == "mul":
                        selection *= state.bias
                    else:
                        selection += state.bias
                balancer.after_step(state, self.counter(selection), block.trained[r])


def _mean(values: list[float]) -> float:
    """``np.mean(values)``, without its overhead for one value (a one-layer gate task; adding
    0.0 turns −0.0 into 0.0 as NumPy's sum does)."""
    if len(values) == 1:
        return float(values[0]) + 0.0
    return float(np.mean(values))


def _moved_fraction(
    selected: npt.NDArray[np.int64], plain: npt.NDArray[np.int64], n_experts: int
) -> float:
    """Share of the (token, expert) assignments of ``selected`` not in ``plain`` (the router's
    own top-k): the bias's perturbation of the routing."""
    if selected is plain:
        return 0.0
    n_tokens, k = selected.shape
    mask = np.zeros((n_tokens, n_experts), dtype=bool)
    np.put_along_axis(mask, plain, True, axis=1)
    kept = np.take_along_axis(mask, selected, axis=1)
    return 1.0 - float(np.count_nonzero(kept)) / (n_tokens * k)


def train_gate(
    scenario: Scenario,
    strategy: StrategySpec,
    sample_steps: Sequence[int],
    seed_seq: np.random.SeedSequence,
    progress: Callable[[int], None] | None = None,
    layer: int | None = None,
    threads: int = 1,
) -> GateTrajectory:
    """Train every simulated layer's router (or one of them) over ``scenario.total_steps``
    optimizer steps.

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
    progress : callable, optional
        Called with the optimizer steps done so far, about every hundredth of the run and
        once at the end (``total_steps``); it cannot change the training.
    layer : int, optional
        Train only this layer's router (0-based): the same tokens, the same initial router and
        task and the same updates as in the run of every layer, whose layers never interact;
        the trajectory holds this layer alone. :func:`merge_layers` joins such one-layer
        trajectories into the run of every layer, identical to it, so the layers can train in
        separate processes.
    threads : int, default 1
        With 2 or more, blocks of sign-rule bias steps run pipelined on two threads (one
        scores the next sub-batches while the other selects): the same trajectory bit for
        bit, sooner when a second core is free. No effect on other strategies, or without the
        compiled kernels.

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
    step; blocks of bias steps (``BIAS_BLOCK_STEPS``) score their sub-batches at once
    and draw per block, not per step, which saves about 10 % at DeepSeek-V3 size. Where numba
    is installed the loads, the sign-rule bias updates and Adam's repeated step of the bias
    steps, and the selection, the experts' passes and the token draws of the full updates, run
    as compiled loops (:mod:`moesim.gate.kernels`), with the same values.
    """
    moe, gate = scenario.model.moe_spec, scenario.gate
    n_experts, top_k, dim = moe.routed_experts, moe.top_k, scenario.stream.dim
    n_layers, total_steps = gate.layers_simulated, scenario.total_steps
    every, block = gate.steps_per_update, BIAS_BLOCK_STEPS
    if layer is not None and not 0 <= layer < n_layers:
        raise ValueError(f"layer: {layer} outside 0..{n_layers - 1} (gate.layers_simulated)")
    if threads < 1:
        raise ValueError(f"threads: {threads} (need at least 1)")
    wanted = {int(s) for s in sample_steps}
    bad = sorted(s for s in wanted if not 0 <= s <= total_steps)
    if bad:
        raise ValueError(f"sample_steps: {bad} outside 0..{total_steps}")

    stream_seed, teacher_seed, init_seed, data_seed, bias_seed = child_seeds(seed_seq, 5)
    stream = TokenStream(scenario.stream, np.random.default_rng(stream_seed))
    task_rng = np.random.default_rng(teacher_seed)
    teachers: list[Teacher] = []
    tasks: list[ExpertTask] = []
    if gate.objective == "teacher":
        teachers = [
            Teacher.random(n_experts, dim, gate.teacher_temperature, task_rng)
            for _ in range(n_layers)
        ]
    else:
        tasks = [
            ExpertTask(
                scenario.stream.topics, dim, n_experts, top_k, moe.shared_experts > 0, task_rng
            )
            for _ in range(n_layers)
        ]
    init_rng = np.random.default_rng(init_seed)
    # Tokens have E‖x‖² = Σ_k p_k ‖centroid_k‖² + noise² (unit centroids, plus the common
    # direction when there is one; p the topic popularity), so this weight std gives the
    # initial logits a standard deviation of init_logit_std.
    params = scenario.stream
    centroid_sq = 1.0
    if params.common > 0:
        norms = np.sum(np.square(stream.topics, dtype=np.float64), axis=1)
        centroid_sq = float(stream.popularity @ norms)
    init_std = gate.init_logit_std / float(np.sqrt(centroid_sq + params.noise**2))
    balancer = make_strategy(strategy)
    mode = balancer.bias_mode
    neutral = np.float32(neutral_bias(mode))
    states = [
        RouterState.initial(n_experts, dim, init_std, init_rng, mode) for _ in range(n_layers)
    ]
    optimizers = [_Adam((n_experts, dim), gate.learning_rate) for _ in range(n_layers)]
    data_rng = np.random.default_rng(data_seed)
    # Every layer's router, task and teacher above are drawn, so that each generator is at
    # the same place whichever layers train; only the trained ones are kept.
    trained = range(n_layers) if layer is None else [layer]
    states = [states[i] for i in trained]
    optimizers = [optimizers[i] for i in trained]
    tasks = [tasks[i] for i in trained] if tasks else []
    teachers = [teachers[i] for i in trained] if teachers else []

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
    exp_form = bias_steps is not None and bias_steps.exp_form(balancer, states)
    # The scoring thread of pipelined blocks (idle between them; it ends with the executor).
    worker = ThreadPoolExecutor(1, "moesim-gate-scores") if threads > 1 and exp_form else None

    trajectory = GateTrajectory(strategy=balancer.name, stream=stream, steps_per_update=every)
    n_records = -(-total_steps // every)
    trajectory.tail_updates = max(1, n_records // 10)
    tail_from = n_records - trajectory.tail_updates
    trajectory.tail_loads = np.zeros((len(states), n_experts), dtype=np.int64)
    stops = sorted(wanted)

    def block_end(start: int, period_end: int) -> int:
        """Where a block from ``start`` ends at the latest: the next multiple of j, the next
        full update, or the next snapshot step (the state at its start is taken exactly)."""
        end = min(period_end, start - start % block + block)
        after = bisect.bisect_right(stops, start)
        return min(end, stops[after]) if after < len(stops) else end

    def draw_batch(at: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """The gate batch of the full update at step ``at``."""
        return stream.sample(
            gate.batch_sequences,
            gate.tokens_per_sequence,
            data_rng,
            tokens_trained=scenario.tokens_before(at),
            sequences_per_micro_batch=scenario.parallelism.micro_batch_size,
        )

    batch_ahead: tuple[int, Future[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]]] | None
    batch_ahead = None
    report_every, next_report = max(1, total_steps // 100), 0
    step = 0
    while step < total_steps:
        if progress is not None and step >= next_report:
            progress(step)
            next_report = step + report_every
        if step in wanted:
            trajectory.states[step] = [s.copy() for s in states]
        tokens_before = scenario.tokens_before(step)
        if step % every:
            # A block of bias steps (steps_per_update > 1; one step unless
            # BIAS_BLOCK_STEPS > 1): each step's bias update from its own fresh batch,
            # and its Adam step with the last full update's gradient.
            period_end = min(total_steps, step - step % every + every)
            if bias_steps is None:
                end = block_end(step, period_end)
                for state, adam in zip(states, optimizers, strict=True):
                    adam.repeat_many(state.weights, end - step)
                step = end
                continue
            current = bias_steps.plan(step, block_end(step, period_end), period_end, balancer)
            if worker is not None and current.x is not None:
                last = current.end == period_end < total_steps
                bias_steps.pipelined(current, states, optimizers, balancer, worker)
                if last:
                    # Drawn on the worker after the block's scores (only the full updates
                    # draw from data_rng, so the values are the same).
                    batch_ahead = (period_end, worker.submit(draw_batch, period_end))
                step = current.end
                if step == period_end < total_steps:
                    # The next period's bias steps start after its full update at period_end.
                    next_end = min(total_steps, period_end + every)
                    bias_steps.draw_ahead(period_end + 1, next_end, balancer, worker)
                continue
            scores = bias_steps.advance(
                current, states, optimizers, bias_steps.exp_form(balancer, states)
            )
            bias_steps.select(current, scores, states, optimizers, balancer)
            step = current.end
            continue
        if batch_ahead is not None:
            ahead_step, drawing = batch_ahead
            batch_ahead = None
            if ahead_step != step:  # the generator has moved on (a bug, not a choice)
                raise RuntimeError(f"gate batch drawn for step {ahead_step}, needed at {step}")
            tokens, topics = drawing.result()
        else:
            tokens, topics = draw_batch(step)
        x = tokens.reshape(-1, dim)
        topic_ids = topics.ravel()
        # Optimizer steps this full update stands for (the experts take them at once).
        period = min(every, total_steps - step)
        metrics: list[UpdateMetrics] = []
        for i, (state, adam) in enumerate(zip(states, optimizers, strict=True)):
            routing = route(
                x,
                state,
                **options,
                segments=micro,
                tokens_per_sequence=gate.tokens_per_sequence,
            )
            plain_routing = routing
            if state.biased:
                # The router's own top-k at the same weights: what the bias perturbs.
                unbiased = RouterState(
                    weights=state.weights,
                    bias=np.full(n_experts, neutral, dtype=np.float32),
                    bias_mode=mode,
                )
                plain_routing = route(
                    x,
                    unbiased,
                    **options,
                    segments=micro,
                    tokens_per_sequence=gate.tokens_per_sequence,
                    reuse=routing,  # same inputs and weights: its logits and scores
                )
            moved = _moved_fraction(routing.selected, plain_routing.selected, n_experts)
            if tasks:
                task_model = tasks[i]
                target = task_model.target(x, topic_ids)  # shared by both passes
                task_plain = None
                if plain_routing is not routing and worker is not None:
                    # On the worker, beside the step's passes: the experts change only at
                    # apply, after it (the same values as one after the other).
                    evaluating = worker.submit(
                        task_model.evaluate, x, topic_ids, plain_routing, target
                    )
                    result = task_model.step(
                        x, topic_ids, routing, options, steps=period, update=False, target=target
                    )
                    task_plain = evaluating.result()
                    task_model.apply(period)
                else:
                    if plain_routing is not routing:
                        task_plain = task_model.evaluate(x, topic_ids, plain_routing, target)
                    result = task_model.step(
                        x, topic_ids, routing, options, steps=period, target=target
                    )
                task, dtask = result.loss, result.dlogits
                assert dtask is not None
                capture = float("nan")
                if task_plain is None:
                    task_plain = task
            else:
                teacher = teachers[i]
                choice = teacher.choice(x, top_k)
                target = choice.at(routing.selected)
                sq = row_sum(choice.weights**2)
                task, dtask = task_loss_and_grad(routing, target, sq, score)
                capture = teacher_capture(target, routing.dropped)
                task_plain = task
                if plain_routing is not routing:
                    plain_target = choice.at(plain_routing.selected)
                    task_plain = task_loss_and_grad(plain_routing, plain_target, sq, score)[0]
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
            counts = routing.loads()  # as processed: after any capacity drops
            if step // every >= tail_from:
                trajectory.tail_loads[i] += counts
            if scope_sizes is not None:
                scoped = grouped_counts(routing.selected, n_experts, scope_sizes, routing.dropped)
                balancer.after_step(state, scoped, tokens_before)
            elif scope is not None:
                balancer.after_step(state, counts, tokens_before)
            metrics.append(
                UpdateMetrics(
                    maxvio_batch=float(max_vio(counts)),
                    task_loss=task,
                    aux_loss=aux,
                    teacher_capture=capture,
                    interference_cos=cos,
                    interference_ratio=ratio,
                    bias_abs_mean=float(np.abs(state.bias - neutral).mean(dtype=np.float64)),
                    bias_moved=moved,
                    task_loss_unbiased=task_plain,
                )
            )
        if bias_steps is not None:
            bias_steps.invalidate()  # the next bias steps draw for the new period
        means = {
            key: _mean([getattr(m, key) for m in metrics])
            for key in UpdateMetrics._fields
            if tasks == [] or key != "teacher_capture"  # no teacher: no capture
        }
        if "interference_ratio" in means and not np.isfinite(means["interference_ratio"]):
            # The task gradient vanished: the ratio is undefined (null, not applicable).
            means["interference_ratio"] = float("nan")
        trajectory.records.append(
            {
                "step": step,
                "tokens": scenario.tokens_before(step + 1),
                **means,
                "gamma": balancer.gamma_at(tokens_before),
            }
        )
        step += 1
    if worker is not None:
        worker.shutdown()
    if total_steps in wanted:
        trajectory.states[total_steps] = [s.copy() for s in states]
    trajectory.final = [s.copy() for s in states]
    if progress is not None:
        progress(total_steps)
    return trajectory


# Record fields that are the same for every layer (not averaged over layers).
_SHARED_FIELDS = ("step", "tokens", "gamma")


def merge_layers(parts: Sequence[GateTrajectory]) -> GateTrajectory:
    """The trajectory of every layer from one-layer trajectories (``train_gate(...,
    layer=i)``, given in layer order): identical to training every layer at once, record for
    record — a record's fields are the means over layers of the same values, in the same
    order, and an undefined interference ratio becomes NaN as there."""
    if not parts:
        raise ValueError("merge_layers: no trajectories")
    first = parts[0]
    for part in parts:
        if len(part.final) != 1:
            raise ValueError(
                f"merge_layers: a trajectory of {len(part.final)} layers (one-layer ones only)"
            )
        if (part.strategy, len(part.records), sorted(part.states)) != (
            first.strategy,
            len(first.records),
            sorted(first.states),
        ):
            raise ValueError("merge_layers: the trajectories are not of one training run")
    keys = list(first.records[0]) if first.records else []
    means: dict[str, list[float]] = {}
    if len(parts) < 8:
        # Column by column: np.mean of fewer than eight values adds them in order to 0.0 and
        # divides by their count, as the running sum below does (the same floats, −0.0
        # included); a record at a time, np.mean costs most of a second on a long run.
        for key in keys:
            if key in _SHARED_FIELDS:
                continue
            total = np.zeros(len(first.records))
            for part in parts:
                total += np.array([r[key] for r in part.records], np.float64)
            means[key] = (total / len(parts)).tolist()
    records = []
    for i, record in enumerate(first.records):
        merged = {}
        for key, value in record.items():
            if key in _SHARED_FIELDS:
                merged[key] = value
            elif key in means:
                merged[key] = means[key][i]
            else:
                merged[key] = float(np.mean([part.records[i][key] for part in parts]))
        if "interference_ratio" in merged and not np.isfinite(merged["interference_ratio"]):
            merged["interference_ratio"] = float("nan")
        records.append(merged)
    assert first.tail_loads is not None
    return GateTrajectory(
        strategy=first.strategy,
        stream=first.stream,
        records=records,
        states={step: [part.states[step][0] for part in parts] for step in first.states},
        final=[part.final[0] for part in parts],
        steps_per_update=first.steps_per_update,
        tail_loads=np.concatenate([part.tail_loads for part in parts]),
        tail_updates=first.tail_updates,
    )
