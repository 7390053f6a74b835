"""Top-k routers: logits, affinity scores, biased selection, group limits and gate values.

A router maps a token ``u_t`` to logits ``z_t = W u_t`` over the ``E`` routed experts
(docs/model/gate.md), turns them into affinity scores ``s_t = G(z_t)`` — an element-wise sigmoid
(DeepSeek-V3,
DeepSeek-V3, arXiv 2412.19437 §2.1.2) or a softmax over the experts — and selects the ``k`` experts
with the largest
*selection* scores ``s_t + b``. The per-expert bias ``b`` is the auxiliary-loss-free balancing knob
(arXiv 2408.15664 Eq. 3): it only steers selection. A router whose ``bias_mode`` is ``mul`` selects
by
``s_t·b`` instead, ``b`` starting at 1 (the multiplicative variant, arXiv 2408.15664 Table 4).
The gate values that weight the experts' outputs are the **unbiased** scores at the selected
experts, optionally renormalised to sum to one over the selection and multiplied by a scaling
factor (DeepSeek-V3, arXiv 2412.19437 §2.1.2; Megatron-LM megatron/core/transformer/moe/router.py;
docs/model/gate.md).

Group-limited (device- or node-limited) routing splits the experts into ``n_groups`` contiguous,
equal groups, scores each group by the sum of its top ``k // group_topk`` selection scores, keeps
the ``group_topk`` best groups and picks the top-k among their experts only (DeepSeek-V3, arXiv
2412.19437 §2.1.2
"Node-limited routing"; Megatron-LM ``moe_router_group_topk``).

Softmax routers come in two flavours (Megatron-LM TransformerConfig ``moe_router_pre_softmax``;
docs/model/gate.md):
softmax over all experts, then top-k — the gates are those probabilities, renormalised over the
selection only when ``normalize`` (DeepSeek-V2 does not, DeepSeek-V2, arXiv 2405.04434 §2.2) — or
top-k first with the
gates a softmax over the *selected logits* only (``topk_before_softmax``, Mixtral). The two
renormalised forms agree mathematically (the all-expert denominator cancels); the second is
computed from the logits directly, so it stays exact where the all-expert probabilities of the
selected experts underflow. Selection is always the top-k of ``s + b`` with ``s`` the softmax over
all experts; without a bias that is the top-k of the raw logits, as in Megatron.

Group-limited routing comes from the scenario as node-limited (groups = the nodes of the
expert-parallel group, DeepSeek-V3 M = 4), device-limited (groups = the expert-parallel ranks,
DeepSeek-V2 M = 3) or explicit ``num_groups``/``group_topk`` (:func:`route_options`).

**Capacity and token dropping** (DeepSeek-V2, arXiv 2405.04434 §2.2; Switch, arXiv 2101.03961;
Megatron-LM megatron/core/transformer/moe/router.py; docs/model/gate.md). With a
:class:`CapacitySpec`, every router call (a *segment*: one micro-batch of one rank, ``T`` tokens)
gives each expert a budget of ``ceil(T·K/N·CF)`` assignments — or, at device level, each
expert-parallel rank a budget of ``ceil(T·K/D·CF)`` for its experts together (DeepSeek-V2 at
``CF = 1``). Over budget, policy ``probs`` keeps the assignments with the highest gate values and
``position`` the earliest positions in the sequence (the latest are dropped; Megatron's ``[s, b]``
token layout, so the last positions of every sequence go first, earlier sequences winning ties).
Assignments of *exempt* sequences are always kept and use the budget first. The decision is a
mask ``Routing.dropped`` (T, k); ``selected`` and ``gates`` keep the pre-drop values. Without a
capacity (dropless, DeepSeek-V3) ``route`` takes its original path and ``dropped`` is all False.

Selection uses :func:`numpy.argpartition` (no full sort). The selected experts of a token come in
no particular order. Exact ties are broken deterministically: the same scores always give the same
selection, but which of several exactly tied experts wins is left to numpy's introselect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

import numpy as np
import numpy.typing as npt

from moesim.gate import kernels
from moesim.scenario.schema import Scenario
from moesim.scenario.strategies import BiasMode

ScoreFunction = Literal["sigmoid", "softmax"]
DropPolicy = Literal["probs", "position"]
CapacityLevel = Literal["expert", "device"]
FloatArray = npt.NDArray[np.floating]

# Largest |argument| passed to exp when scoring (see scores_from_logits).
_EXP_LIMIT = kernels.EXP_LIMIT


@dataclass(eq=False)
class RouterState:
    """The trainable router of one MoE layer and its balancing bias.

    Attributes
    ----------
    weights : ndarray, shape (E, dim), float32
        Router matrix ``W``; row ``i`` is expert ``i``'s centroid ``e_i`` (docs/model/gate.md).
    bias : ndarray, shape (E,), float32
        Selection-only expert bias ``b`` (arXiv 2408.15664 Eq. 3). Never a gradient target.
    bias_mode : {'add', 'mul'}
        How ``b`` enters selection: ``s + b`` (neutral value 0) or ``s·b`` (neutral value 1,
        arXiv 2408.15664 Table 4). :func:`route` reads it unless told otherwise.
    """

    weights: npt.NDArray[np.float32]
    bias: npt.NDArray[np.float32]
    bias_mode: BiasMode = "add"

    def __post_init__(self) -> None:
        if self.bias_mode not in ("add", "mul"):
            raise ValueError(f"bias_mode: unknown bias mode {self.bias_mode!r} (add or mul)")

    @classmethod
    def initial(
        cls,
        n_experts: int,
        dim: int,
        init_std: float,
        rng: np.random.Generator,
        bias_mode: BiasMode = "add",
    ) -> RouterState:
        """A fresh router: weights ``N(0, init_std²)``, bias neutral — zero (arXiv 2408.15664
        Algorithm 1 step 1), or one for ``bias_mode='mul'`` (arXiv 2408.15664 Table 4). The bias
        draws nothing, so both
        modes get the same weights from the same ``rng``."""
        weights = (rng.standard_normal((n_experts, dim)) * init_std).astype(np.float32)
        bias = np.full(n_experts, neutral_bias(bias_mode), dtype=np.float32)
        return cls(weights=weights, bias=bias, bias_mode=bias_mode)

    @property
    def n_experts(self) -> int:
        """Number of routed experts ``E``."""
        return int(self.weights.shape[0])

    @property
    def biased(self) -> bool:
        """Whether the bias can change selection (some entry differs from the neutral value)."""
        if self.bias_mode == "add":
            return bool(self.bias.any())
        return bool((self.bias != 1).any())

    def copy(self) -> RouterState:
        """A deep copy (the arrays are copied)."""
        return RouterState(
            weights=self.weights.copy(), bias=self.bias.copy(), bias_mode=self.bias_mode
        )


def neutral_bias(bias_mode: BiasMode) -> float:
    """The bias value that leaves selection alone: 0 for ``add``, 1 for ``mul``."""
    if bias_mode == "add":
        return 0.0
    if bias_mode == "mul":
        return 1.0
    raise ValueError(f"bias_mode: unknown bias mode {bias_mode!r} (add or mul)")


def apply_bias(
    scores: FloatArray, bias: FloatArray | None, bias_mode: BiasMode = "add"
) -> FloatArray:
    """Selection scores: ``s + b`` or ``s·b`` (arXiv 2408.15664 Eq. 3 Table 4).

    Returns ``scores`` itself (no copy) when the bias is ``None`` or neutral, a new array
    otherwise.
    """
    if bias is None:
        return scores
    if bias_mode == "add":
        return scores + bias if bias.any() else scores
    if bias_mode == "mul":
        return scores * bias if (bias != 1).any() else scores
    raise ValueError(f"bias_mode: unknown bias mode {bias_mode!r} (add or mul)")


@dataclass(frozen=True, eq=False)
class Routing:
    """The routing decision for a batch of ``T`` tokens.

    Attributes
    ----------
    logits : ndarray, shape (T, E), float32
        ``z = x Wᵀ``.
    scores : ndarray, shape (T, E), float32
        Affinities ``s = softmax(z)`` over experts, or ``σ(z)`` element-wise.
    selected : ndarray, shape (T, k), int64
        Chosen experts per token (top-k of ``s + b``, group limits applied), by decreasing
        ``s + b`` (an exact tie: the lower index first).
    gates : ndarray, shape (T, k), float32
        Gate values aligned with ``selected``: unbiased scores, optionally renormalised over the
        selection, times the scaling factor (or a softmax over the selected logits). Values
        before any dropping: a dropped assignment keeps its gate here.
    dropped : ndarray, shape (T, k), bool
        ``True`` where the assignment ``(t, selected[t, j])`` exceeded its capacity and was
        dropped (the token skips that expert). All False for dropless routing (the default when
        constructed without it).
    """

    logits: FloatArray
    scores: FloatArray
    selected: npt.NDArray[np.int64]
    gates: FloatArray
    dropped: npt.NDArray[np.bool_] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.dropped is None:
            object.__setattr__(self, "dropped", np.zeros(self.selected.shape, dtype=bool))
        elif self.dropped.shape != self.selected.shape:
            raise ValueError(f"dropped: shape {self.dropped.shape} is not {self.selected.shape}")

    @property
    def n_tokens(self) -> int:
        """``T``."""
        return int(self.logits.shape[0])

    @property
    def n_experts(self) -> int:
        """``E``."""
        return int(self.logits.shape[1])

    @property
    def top_k(self) -> int:
        """``k``."""
        return int(self.selected.shape[1])

    @property
    def n_dropped(self) -> int:
        """Dropped (token, expert) assignments."""
        return int(np.count_nonzero(self.dropped))

    def loads(self) -> npt.NDArray[np.int64]:
        """Kept assignments per expert, shape (E,): the load the experts process (Megatron-LM "
        "megatron/core/transformer/moe/router.py counts the final routing map, after dropping)."""
        n_experts = self.n_experts
        if not self.dropped.any():
            return np.bincount(self.selected.ravel(), minlength=n_experts).astype(np.int64)
        kept = self.selected[~self.dropped]
        return np.bincount(kept, minlength=n_experts).astype(np.int64)


@dataclass(frozen=True)
class CapacitySpec:
    """Expert capacity of a router call and what to drop beyond it (DeepSeek-V2, arXiv 2405.04434
    §2.2; Megatron-LM megatron/core/transformer/moe/router.py).

    Attributes
    ----------
    factor : float
        Capacity factor ``CF > 0``.
    policy : {'probs', 'position'}
        Over budget, keep the highest gate values (``probs``) or the earliest positions
        (``position``).
    level : {'expert', 'device'}
        ``expert``: one budget ``ceil(T·K/N·CF)`` per expert. ``device``: one budget
        ``ceil(T·K/D·CF)`` per expert-parallel rank (``n_devices`` contiguous expert blocks).
    n_devices : int
        ``D``, ranks of an expert-parallel group (used at device level only).
    exempt_fraction : float
        Fraction of sequences never dropped (DeepSeek-V2: about 0.1), chosen by
        :func:`exempt_sequences`.
    """

    factor: float
    policy: DropPolicy = "probs"
    level: CapacityLevel = "expert"
    n_devices: int = 1
    exempt_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"capacity.factor: {self.factor} is not positive")
        if not 0.0 <= self.exempt_fraction <= 1.0:
            raise ValueError(f"capacity.exempt_fraction: {self.exempt_fraction} not in [0, 1]")
        if self.policy not in ("probs", "position"):
            raise ValueError(f"capacity.policy: unknown drop policy {self.policy!r}")
        if self.level not in ("expert", "device"):
            raise ValueError(f"capacity.level: unknown level {self.level!r}")
        if self.n_devices < 1:
            raise ValueError(f"capacity.n_devices: {self.n_devices} (need at least 1)")

    def n_bins(self, n_experts: int) -> int:
        """Budgets per router call: ``N`` (expert level) or ``D`` (device level)."""
        if self.level == "expert":
            return n_experts
        if n_experts % self.n_devices:
            raise ValueError(f"capacity.n_devices: {self.n_devices} do not divide {n_experts}")
        return self.n_devices

    def budget(self, n_tokens: int, top_k: int, n_experts: int) -> int:
        """Assignments one expert (or device) may keep in a call of ``n_tokens`` tokens:
        ``ceil(T·K/bins·CF)`` (the product is rounded to 9 decimals first, so a float error
        such as ``100.00000000000001`` does not add a slot)."""
        return math.ceil(round(n_tokens * top_k / self.n_bins(n_experts) * self.factor, 9))


class RouteOptions(TypedDict):
    """Keyword arguments of :func:`route` that a scenario fixes (see :func:`route_options`)."""

    top_k: int
    score: ScoreFunction
    normalize: bool
    scaling_factor: float
    n_groups: int
    group_topk: int | None
    topk_before_softmax: bool
    capacity: CapacitySpec | None


def group_limits(scenario: Scenario) -> tuple[int, int | None]:
    """``(n_groups, group_topk)`` of the scenario's group-limited routing (Megatron-LM
    megatron/core/transformer/moe/router.py).

    - ``router.node_limit``: one group per node of the expert-parallel group (``n_groups =
      scenario.ep_nodes``), when the group spans more than one node (DeepSeek-V3, arXiv 2412.19437
      §2.1.2);
    - ``router.device_limit``: one group per expert-parallel rank (``n_groups =
      parallelism.expert``), when there is more than one (DeepSeek-V2, arXiv 2405.04434 §2.2);
    - ``router.num_groups``/``group_topk``: as given (Megatron's ``moe_router_num_groups``).

    ``(1, None)`` when routing is not group-limited.
    """
    router = scenario.router
    if router.node_limit is not None and scenario.ep_nodes > 1:
        return scenario.ep_nodes, router.node_limit
    if router.device_limit is not None and scenario.parallelism.expert > 1:
        return scenario.parallelism.expert, router.device_limit
    if router.num_groups is not None and router.group_topk is not None:
        return router.num_groups, router.group_topk
    return 1, None


def capacity_spec(scenario: Scenario) -> CapacitySpec | None:
    """The scenario's ``router.capacity`` as a :class:`CapacitySpec` (``None``: dropless);
    devices are the ``parallelism.expert`` ranks of an expert-parallel group."""
    cap = scenario.router.capacity
    if cap is None:
        return None
    return CapacitySpec(
        factor=cap.factor,
        policy=cap.policy,
        level=cap.level,
        n_devices=scenario.parallelism.expert,
        exempt_fraction=cap.exempt_fraction,
    )


def route_options(scenario: Scenario) -> RouteOptions:
    """The routing configuration a scenario implies.

    Group limits come from :func:`group_limits`, the capacity from :func:`capacity_spec`. The
    capacity's scope is the router call: pass ``segments`` (and ``tokens_per_sequence``) to
    :func:`route` when one call holds several micro-batches.
    """
    router = scenario.router
    n_groups, group_topk = group_limits(scenario)
    return RouteOptions(
        top_k=scenario.model.moe_spec.top_k,
        score=router.score,
        normalize=router.normalize,
        scaling_factor=router.scaling_factor,
        n_groups=n_groups,
        group_topk=group_topk,
        topk_before_softmax=router.topk_before_softmax,
        capacity=capacity_spec(scenario),
    )


def gather_rows(values: npt.NDArray[np.generic], index: npt.NDArray[np.int64]) -> npt.NDArray:
    """``values[t, index[t, j]]`` for every ``t, j``.

    Parameters
    ----------
    values : ndarray, shape (T, E)
    index : ndarray, shape (T, k), int64

    Returns
    -------
    ndarray, shape (T, k), dtype of ``values``
    """
    values = np.ascontiguousarray(values)
    n_rows, n_cols = values.shape
    flat = index + (np.arange(n_rows, dtype=np.int64) * n_cols)[:, None]
    return values.ravel()[flat]


def row_sum(values: FloatArray) -> FloatArray:
    """Sum of each row of a (T, n) array, shape (T,).

    A matrix-vector product with ones: numpy's own reduction over a short last axis costs far
    more per row than the arithmetic, and these sums sit on the gate's hot path.
    """
    return values @ np.ones(values.shape[1], dtype=values.dtype)


def row_max(values: FloatArray) -> FloatArray:
    """Maximum of each row of a (T, n) array with small ``n``, shape (T,)."""
    out = values[:, 0].copy()
    for j in range(1, values.shape[1]):
        np.maximum(out, values[:, j], out=out)
    return out


def top_k_indices(values: FloatArray, k: int) -> npt.NDArray[np.int64]:
    """Indices of the ``k`` largest entries of each row.

    Parameters
    ----------
    values : ndarray, shape (T, E)
        Selection scores; ``-inf`` marks an expert that must not be chosen.
    k : int
        ``1 ≤ k ≤ E``.

    Returns
    -------
    ndarray, shape (T, k), int64
        In no particular order. Every selected value is ``≥`` every unselected one in its row;
        of exactly equal values at a row's threshold the lower indices are selected (a rule the
        compiled load counts of :mod:`moesim.gate.kernels` follow too).
    """
    n_cols = values.shape[1]
    if not 1 <= k <= n_cols:
        raise ValueError(f"top_k: {k} is not in 1..{n_cols}")
    if k == n_cols:
        return np.broadcast_to(np.arange(n_cols, dtype=np.int64), values.shape).copy()
    part = np.argpartition(values, n_cols - k, axis=1)
    chosen = np.ascontiguousarray(part[:, n_cols - k :], dtype=np.int64)
    # A row with more than k values at or above its k-th largest has a tie at the threshold,
    # which argpartition breaks arbitrarily: those rows take the stable order instead.
    threshold = np.take_along_axis(values, part[:, n_cols - k, None], axis=1)
    if int(np.count_nonzero(values >= threshold)) != values.shape[0] * k:
        rows = np.flatnonzero(np.count_nonzero(values >= threshold, axis=1) != k)
        order = np.argsort(-values[rows], axis=1, kind="stable")
        chosen[rows] = order[:, :k]
    return chosen


def top_k_mask(values: FloatArray, k: int) -> npt.NDArray[np.bool_]:
    """The entries :func:`top_k_indices` selects, as a (T, n) boolean mask.

    Each row's ``k``-th largest value is read from a sorted copy (numpy's SIMD sort is several
    times faster than :func:`numpy.argpartition` on short rows) and the entries at or above it
    are marked. A row with more than ``k`` marks has an exact tie at its threshold; it takes
    :func:`top_k_indices`' own choice (rows are selected independently, so that is the same as
    on the whole array). For callers that need the set, not an order.
    """
    n_cols = values.shape[1]
    if not 1 <= k <= n_cols:
        raise ValueError(f"top_k: {k} is not in 1..{n_cols}")
    threshold = np.sort(values, axis=1)[:, n_cols - k]
    mask = values >= threshold[:, None]
    if int(np.count_nonzero(mask)) != values.shape[0] * k:
        rows = np.flatnonzero(np.count_nonzero(mask, axis=1) != k)
        mask[rows] = False
        mask[rows[:, None], top_k_indices(values[rows], k)] = True
    return mask


def scores_from_logits(logits: FloatArray, score: ScoreFunction) -> FloatArray:
    """Affinity scores ``G(z)`` (docs/model/gate.md).

    Parameters
    ----------
    logits : ndarray, shape (T, E), float
    score : {'sigmoid', 'softmax'}
        Element-wise logistic sigmoid, or softmax over the expert axis.

    Returns
    -------
    ndarray, shape (T, E), dtype of ``logits``
    """
    if score == "sigmoid":
        out = np.negative(logits)
        # σ is 0 or 1 to float32 precision beyond |z| = 80; clipping keeps exp finite and out of
        # the (very slow) subnormal range.
        np.clip(out, -_EXP_LIMIT, _EXP_LIMIT, out=out)
        np.exp(out, out=out)
        out += 1
        np.reciprocal(out, out=out)
        return out
    if score == "softmax":
        peak = gather_rows(logits, logits.argmax(axis=1)[:, None])
        out = logits - peak
        np.maximum(out, -_EXP_LIMIT, out=out)
        np.exp(out, out=out)
        out /= row_sum(out)[:, None]
        return out
    raise ValueError(f"score: unknown score function {score!r} (sigmoid or softmax)")


def _top_sum(grouped: FloatArray, count: int) -> FloatArray:
    """Sum of the ``count`` largest entries along the last (short) axis of a (T, G, n) array.

    numpy's reductions and partitions along a short last axis cost far more per row than the
    arithmetic (see :func:`row_sum`), so for groups of up to 8 experts and small ``count`` a
    running top-``count`` is kept with element-wise max/min over the ``n`` columns (an insertion
    network); the result is summed largest first, as a sort would. Groups of 16 or more (the
    network's ``2·n·count`` passes cost more than numpy's SIMD sort of the short rows at every
    batch size measured, 3–11× at 8 groups of 32) and larger ``count`` sort the groups and add
    the largest; both give the same values.
    """
    n = grouped.shape[2]
    if count > 4 or count >= n or n >= 16:
        ordered = np.sort(grouped, axis=2)
        total = ordered[:, :, n - 1].copy()
        for i in range(2, count + 1):
            total += ordered[:, :, n - i]
        return total
    tops = [np.full(grouped.shape[:2], -np.inf, dtype=grouped.dtype) for _ in range(count)]
    for j in range(n):
        value = grouped[:, :, j]
        for i in range(count):
            high = np.maximum(tops[i], value)
            value = np.minimum(tops[i], value)
            tops[i] = high
    total = tops[0]
    for i in range(1, count):
        total = total + tops[i]
    return total


def _group_limited(selection: FloatArray, top_k: int, n_groups: int, group_topk: int) -> FloatArray:
    """Selection scores with the experts of all but the best ``group_topk`` groups set to -inf.

    A group's score is the sum of its ``max(1, top_k // group_topk)`` largest selection scores
    (DeepSeek-V3, arXiv 2412.19437 §2.1.2 "node-limited routing", §6.2 item 3: Megatron's ``topk(k
    // group_topk)``
    sum; the ``max(1, ·)`` keeps a score when ``group_topk > top_k``)."""
    n_tokens, n_experts = selection.shape
    _check_groups(n_experts, top_k, n_groups, group_topk)
    group_size = n_experts // n_groups
    grouped = selection.reshape(n_tokens, n_groups, group_size)
    per_group = min(group_size, max(1, top_k // group_topk))
    if kernels.ENABLED and selection.dtype == np.float32 and selection.flags.c_contiguous:
        keep = kernels.group_keep(selection, n_groups, group_topk, per_group)  # same mask
    else:
        group_score = _top_sum(grouped, per_group)
        keep = top_k_mask(group_score, group_topk)
    masked = np.where(keep[:, :, None], grouped, -np.inf).astype(selection.dtype, copy=False)
    return masked.reshape(n_tokens, n_experts)


def select_experts(
    scores: FloatArray,
    bias: FloatArray | None,
    top_k: int,
    n_groups: int = 1,
    group_topk: int | None = None,
    bias_mode: BiasMode = "add",
) -> npt.NDArray[np.int64]:
    """Top-k selection on ``scores + bias`` (or ``scores·bias``), group-limited if asked
    (arXiv 2408.15664 Eq. 3 Table 4; Megatron-LM megatron/core/transformer/moe/router.py).

    Parameters
    ----------
    scores : ndarray, shape (T, E)
        Unbiased affinity scores.
    bias : ndarray, shape (E,), or None
        Selection bias; ``None`` or neutral (all 0 for ``add``, all 1 for ``mul``) means plain
        top-k on the scores.
    top_k : int
        Experts per token.
    n_groups : int
        Contiguous, equal expert groups (nodes or devices).
    group_topk : int or None
        Groups a token may use; ``None`` or ``≥ n_groups`` disables the limit.
    bias_mode : {'add', 'mul'}
        Selection by ``scores + bias`` or ``scores·bias`` (:func:`apply_bias`).

    Returns
    -------
    ndarray, shape (T, top_k), int64
        Each row's experts by decreasing selection score, an exact tie in index order (a
        canonical order: the gates, and every sum over a token's experts, follow it).
    """
    grouped = group_topk is not None and group_topk < n_groups
    if grouped:
        assert group_topk is not None
        _check_groups(scores.shape[1], top_k, n_groups, group_topk)
    if _compiled_selection(scores, bias, top_k):
        chosen = kernels.select_top_k(
            scores, bias, bias_mode == "mul", top_k, n_groups, group_topk if grouped else None
        )
        if chosen is not None:
            return chosen
    selection = apply_bias(scores, bias, bias_mode)
    if grouped:
        assert group_topk is not None
        selection = _group_limited(selection, top_k, n_groups, group_topk)
    return by_decreasing_value(selection, top_k_indices(selection, top_k))


def _compiled_selection(scores: FloatArray, bias: FloatArray | None, top_k: int) -> bool:
    """Whether :func:`select_experts` runs the compiled selection (the same experts in the same
    order): float32 C-contiguous scores, a float32 bias or none, a valid ``top_k``."""
    return (
        kernels.ENABLED
        and scores.dtype == np.float32
        and scores.flags.c_contiguous
        and (bias is None or bias.dtype == np.float32)
        and 1 <= top_k <= scores.shape[1]
    )


def by_decreasing_value(values: FloatArray, chosen: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The indices ``chosen`` (T, k) of each row of ``values`` reordered by decreasing value,
    equal values by increasing index."""
    ascending = np.sort(chosen, axis=1)
    picked = np.take_along_axis(values, ascending, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    return np.take_along_axis(ascending, order, axis=1)


def _check_groups(n_experts: int, top_k: int, n_groups: int, group_topk: int) -> None:
    if n_experts % n_groups:
        raise ValueError(f"n_groups: {n_groups} does not divide the {n_experts} experts")
    group_size = n_experts // n_groups
    if group_topk * group_size < top_k:
        raise ValueError(
            f"group_topk: {group_topk} groups of {group_size} experts cannot hold top_k={top_k}"
        )


def segment_sizes(segments: int | Sequence[int], n_tokens: int) -> npt.NDArray[np.int64]:
    """Token counts of the consecutive router calls (segments) one batch holds.

    Parameters
    ----------
    segments : int or sequence of int
        A number of equal segments (it must divide ``n_tokens``), or their sizes.
    n_tokens : int
        Rows of the batch.

    Returns
    -------
    ndarray, shape (S,), int64
        Positive sizes summing to ``n_tokens``.
    """
    if isinstance(segments, int | np.integer):
        n = int(segments)
        if n < 1 or n_tokens % n:
            raise ValueError(f"segments: {n} equal segments do not split {n_tokens} tokens")
        return np.full(n, n_tokens // n, dtype=np.int64)
    sizes = np.asarray(segments, dtype=np.int64)
    if sizes.ndim != 1 or sizes.size == 0 or (sizes <= 0).any() or sizes.sum() != n_tokens:
        raise ValueError(f"segments: sizes {sizes.tolist()} do not partition {n_tokens} tokens")
    return sizes


def exempt_sequences(n_sequences: int, fraction: float, first: int = 0) -> npt.NDArray[np.bool_]:
    """Which sequences are exempt from dropping (DeepSeek-V2, arXiv 2405.04434 §2.2: about 10% in
    DeepSeek-V2).

    Sequence ``i`` (counted from ``first``) is exempt when ``floor((i+1)·f) > floor(i·f)``: a
    deterministic, evenly spread choice, so any ``n`` consecutive sequences starting at 0 hold
    exactly ``floor(n·f)`` exempt ones and no random draw is spent on it.

    Returns
    -------
    ndarray, shape (n_sequences,), bool
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"exempt_fraction: {fraction} not in [0, 1]")
    index = np.arange(first, first + n_sequences, dtype=np.float64)
    return np.floor((index + 1) * fraction) > np.floor(index * fraction)


def capacity_kept(
    selected: npt.NDArray[np.int64],
    gates: FloatArray,
    n_experts: int,
    capacity: CapacitySpec,
    *,
    segments: int | Sequence[int] = 1,
    weights: npt.NDArray[np.integer] | None = None,
    positions: npt.NDArray[np.integer] | None = None,
    exempt: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.int64]:
    """How much of every assignment survives the capacity (DeepSeek-V2, arXiv 2405.04434 §2.2;
    Megatron-LM megatron/core/transformer/moe/router.py).

    Each segment (one router call) of ``T_s = Σ weights`` tokens gives every bin — an expert, or
    at device level a rank's block of ``N/D`` experts — the budget
    :meth:`CapacitySpec.budget`. Within a bin the assignments are ranked: exempt tokens first,
    then by gate value (``probs``, highest first) or by position (``position``, earliest
    first), exact ties in a deterministic order; they are kept in that order until the budget is
    spent. Vectorised: one sort of the ``T·k`` assignments (:func:`_capacity_order`).

    Parameters
    ----------
    selected : ndarray, shape (T, k), int64
        Selected experts.
    gates : ndarray, shape (T, k)
        Gate values (the ``probs`` ranking).
    n_experts : int
        ``N``.
    capacity : CapacitySpec
        Budget and policy.
    segments : int or sequence of int, default 1
        Consecutive router calls in this batch (see :func:`segment_sizes`), each with its own
        budget.
    weights : ndarray, shape (T,), integer, optional
        Multiplicity of each row (a bootstrap weight: the row stands for that many identical
        tokens); default 1. Budgets count multiplicities, and a row straddling the budget is
        kept in part.
    positions : ndarray, shape (T,), integer, optional
        The ``position`` ranking key, smaller = earlier; default the row index.
    exempt : ndarray, shape (T,), bool, optional
        Rows never dropped; their assignments use up the budget first.

    Returns
    -------
    ndarray, shape (T, k), int64
        Kept multiplicity of each assignment, ``0 ≤ kept ≤ weight``; the dropped share is
        ``weight − kept``. Unless exempt rows exceed it, no bin keeps more than its budget.
    """
    n_tokens, top_k = selected.shape
    if n_tokens == 0:
        return np.zeros(selected.shape, dtype=np.int64)
    sizes = segment_sizes(segments, n_tokens)
    n_seg = sizes.size
    seg = np.repeat(np.arange(n_seg, dtype=np.int64), sizes)
    if weights is None:
        w = np.ones(n_tokens, dtype=np.int64)
        seg_tokens = sizes.astype(np.float64)
    else:
        w = np.asarray(weights, dtype=np.int64)
        if w.shape != (n_tokens,) or (w < 0).any():
            raise ValueError("weights: need one non-negative multiplicity per row")
        seg_tokens = np.bincount(seg, weights=w, minlength=n_seg)
    n_bins = capacity.n_bins(n_experts)
    per_bin = n_experts // n_bins
    budget = np.ceil(np.round(seg_tokens * (top_k / n_bins * capacity.factor), 9)).astype(np.int64)

    own_bin = selected // per_bin if per_bin > 1 else selected
    bins = ((seg * n_bins)[:, None] + own_bin).ravel()
    forced = None if exempt is None or not exempt.any() else np.repeat(exempt, top_k)
    order = _capacity_order(bins, gates, positions, forced, capacity.policy, top_k)

    w_sorted = np.repeat(w, top_k)[order]
    bins_sorted = bins[order]
    before = np.cumsum(w_sorted) - w_sorted  # weight ahead of each assignment, all bins
    run_start = np.ones(bins_sorted.size, dtype=bool)
    run_start[1:] = bins_sorted[1:] != bins_sorted[:-1]
    run_of = np.cumsum(run_start) - 1
    ahead = before - before[run_start][run_of]  # weight ahead of it within its bin
    kept_sorted = np.clip(budget[bins_sorted // n_bins] - ahead, 0, w_sorted)
    if forced is not None:
        kept_sorted = np.where(forced[order], w_sorted, kept_sorted)
    kept = np.empty_like(kept_sorted)
    kept[order] = kept_sorted
    return kept.reshape(n_tokens, top_k)


def _capacity_order(
    bins: npt.NDArray[np.int64],
    gates: FloatArray,
    positions: npt.NDArray[np.integer] | None,
    forced: npt.NDArray[np.bool_] | None,
    policy: DropPolicy,
    top_k: int,
) -> npt.NDArray[np.intp]:
    """Order of the flattened assignments: by bin, exempt first, then best-kept first.

    One sort of a composite key (a plain quicksort is several times faster than a lexicographic
    sort here). ``probs``: ``4·bin + (0 if exempt else 2) + (1 − ĝ)`` with the gates rescaled to
    ``ĝ ∈ [0, 1]``; gates closer than the key's float64 resolution count as tied. ``position``:
    an exact integer key. Exact ties fall in a deterministic, implementation-defined order.
    """
    if policy == "probs":
        g = gates.astype(np.float64).ravel()
        low, high = float(g.min()), float(g.max())
        key = bins * 4.0
        key += 1.0
        if high > low:
            key -= (g - low) / (high - low)
        if forced is not None:
            key += np.where(forced, 0.0, 2.0)
        return np.argsort(key)
    n_rows = bins.size // top_k
    pos = np.arange(n_rows, dtype=np.int64) if positions is None else np.asarray(positions)
    pos = np.repeat(pos.astype(np.int64) - int(pos.min()), top_k)
    high_key = bins if forced is None else 2 * bins + ~forced
    span = int(pos.max()) + 1
    if (int(high_key.max()) + 1) * span < 2**62:
        return np.argsort(high_key * span + pos)
    return np.lexsort((pos, high_key))


def _softmax_rows(values: FloatArray) -> FloatArray:
    """Softmax over each row of a (T, k) array with small ``k``."""
    out = values - row_max(values)[:, None]
    np.maximum(out, -_EXP_LIMIT, out=out)
    np.exp(out, out=out)
    out /= row_sum(out)[:, None]
    return out


def route(
    x: FloatArray,
    state: RouterState,
    top_k: int,
    score: ScoreFunction,
    normalize: bool,
    scaling_factor: float,
    n_groups: int = 1,
    group_topk: int | None = None,
    *,
    topk_before_softmax: bool = False,
    capacity: CapacitySpec | None = None,
    segments: int | Sequence[int] = 1,
    tokens_per_sequence: int | None = None,
    bias_mode: BiasMode | None = None,
    reuse: Routing | None = None,
) -> Routing:
    """Route a batch of tokens (arXiv 2408.15664 Eq. 3; DeepSeek-V3, arXiv 2412.19437 §2.1.2;
    DeepSeek-V2, arXiv 2405.04434 §2.2; Megatron-LM megatron/core/transformer/moe/router.py;
    docs/model/gate.md).

    Parameters
    ----------
    x : ndarray, shape (T, dim), float32
        Router inputs ``u_t``.
    state : RouterState
        Router weights ``W`` (E, dim), selection bias ``b`` (E,) and its mode.
    top_k : int
        Experts per token ``k``.
    score : {'sigmoid', 'softmax'}
        Score function ``G``.
    normalize : bool
        Divide the selected unbiased scores by their sum (DeepSeek-V3 Eq. 13).
    scaling_factor : float
        Multiplies the gate values (``routed_scaling_factor``), after any normalisation.
    n_groups : int, default 1
        Expert groups for group-limited routing.
    group_topk : int or None, default None
        Groups a token may reach; applied only when ``< n_groups``.
    topk_before_softmax : bool, default False
        Softmax only: gates are the softmax over the selected logits (Mixtral, Megatron
        ``pre_softmax=False``); ``normalize`` is then moot. False: the all-expert softmax at the
        selection, renormalised only if ``normalize`` (DeepSeek-V2: not).
    capacity : CapacitySpec or None, default None
        Expert capacity; ``None`` is dropless (and the only path the dropless case takes).
    segments : int or sequence of int, default 1
        The router calls this batch stands for, as consecutive row blocks (e.g. the
        micro-batches of a training batch); each gets its own capacity budget.
    tokens_per_sequence : int or None
        Rows per sequence (sequences consecutive, each inside one segment). With it, ``position``
        means the position in the sequence and ``capacity.exempt_fraction`` picks whole
        sequences (:func:`exempt_sequences`); without it every row is a sequence of its own.
    bias_mode : {'add', 'mul'} or None
        Select by ``s + b`` (``add``, arXiv 2408.15664 Eq. 3) or ``s·b`` (``mul``, arXiv 2408.15664
        Table 4);
        default ``state.bias_mode``. The bias steers selection only, in either mode.
    reuse : Routing or None
        A routing of the same ``x`` with the same weights (another bias, say): its logits and
        scores are taken instead of computed again (the arrays are shared, not copied).

    Returns
    -------
    Routing
        Logits, scores, selection, gates and the dropped mask. Computed in float32 for float32
        inputs (float64 inputs stay float64, which the gradient checks use).
    """
    if reuse is None:
        logits = x @ state.weights.T
        scores = scores_from_logits(logits, score)
    else:
        logits, scores = reuse.logits, reuse.scores
    mode = state.bias_mode if bias_mode is None else bias_mode
    selected = select_experts(scores, state.bias, top_k, n_groups, group_topk, mode)
    if topk_before_softmax:
        if score != "softmax":
            raise ValueError("topk_before_softmax: needs the softmax score function")
        gates = _softmax_rows(gather_rows(logits, selected))
    else:
        gates = gather_rows(scores, selected)
        if normalize:
            gates /= (row_sum(gates) + 1e-20)[:, None]
    if scaling_factor != 1.0:
        gates *= gates.dtype.type(scaling_factor)
    if capacity is None:
        return Routing(logits=logits, scores=scores, selected=selected, gates=gates)

    n_tokens = selected.shape[0]
    rows = np.arange(n_tokens, dtype=np.int64)
    if tokens_per_sequence is None:
        positions, sequence = rows, rows
    else:
        if tokens_per_sequence < 1:
            raise ValueError(f"tokens_per_sequence: {tokens_per_sequence} (need at least 1)")
        # Position-major order, as Megatron flattens [s, b]: the last positions go first.
        positions = (rows % tokens_per_sequence) * n_tokens + rows
        sequence = rows // tokens_per_sequence
    exempt = None
    if capacity.exempt_fraction > 0:
        exempt = exempt_sequences(int(sequence[-1]) + 1, capacity.exempt_fraction)[sequence]
    kept = capacity_kept(
        selected,
        gates,
        state.n_experts,
        capacity,
        segments=segments,
        positions=positions,
        exempt=exempt,
    )
    return Routing(logits=logits, scores=scores, selected=selected, gates=gates, dropped=kept == 0)
