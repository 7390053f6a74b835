"""Top-k routers: logits, affinity scores, biased selection, group limits and gate values.

A router maps a token ``u_t`` to logits ``z_t = W u_t`` over the ``E`` routed experts (routing.md
§1), turns them into affinity scores ``s_t = G(z_t)`` — an element-wise sigmoid (DeepSeek-V3,
routing.md §3) or a softmax over the experts — and selects the ``k`` experts with the largest
*selection* scores ``s_t + b``. The per-expert bias ``b`` is the auxiliary-loss-free balancing knob
(routing.md §2.1): it only steers selection. The gate values that weight the experts' outputs are
the **unbiased** scores at the selected experts, optionally renormalised to sum to one over the
selection and multiplied by a scaling factor (routing.md §3, §6.2 item 3, §10 item 3).

Group-limited (device- or node-limited) routing splits the experts into ``n_groups`` contiguous,
equal groups, scores each group by the sum of its top ``k // group_topk`` selection scores, keeps
the ``group_topk`` best groups and picks the top-k among their experts only (routing.md §3
"Node-limited routing", §6.2 item 3).

Selection uses :func:`numpy.argpartition` (no full sort). The selected experts of a token come in
no particular order. Exact ties are broken deterministically: the same scores always give the same
selection, but which of several exactly tied experts wins is left to numpy's introselect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypedDict

import numpy as np
import numpy.typing as npt

from moesim.scenario.schema import Scenario

ScoreFunction = Literal["sigmoid", "softmax"]
FloatArray = npt.NDArray[np.floating]

# Largest |argument| passed to exp when scoring (see scores_from_logits).
_EXP_LIMIT = 80.0


@dataclass(eq=False)
class RouterState:
    """The trainable router of one MoE layer and its balancing bias.

    Attributes
    ----------
    weights : ndarray, shape (E, dim), float32
        Router matrix ``W``; row ``i`` is expert ``i``'s centroid ``e_i`` (routing.md §1).
    bias : ndarray, shape (E,), float32
        Selection-only expert bias ``b`` (routing.md §2.1). Never a gradient target.
    """

    weights: npt.NDArray[np.float32]
    bias: npt.NDArray[np.float32]

    @classmethod
    def initial(
        cls, n_experts: int, dim: int, init_std: float, rng: np.random.Generator
    ) -> RouterState:
        """A fresh router: weights ``N(0, init_std²)``, bias zero (routing.md §2.2 step 1)."""
        weights = (rng.standard_normal((n_experts, dim)) * init_std).astype(np.float32)
        return cls(weights=weights, bias=np.zeros(n_experts, dtype=np.float32))

    @property
    def n_experts(self) -> int:
        """Number of routed experts ``E``."""
        return int(self.weights.shape[0])

    def copy(self) -> RouterState:
        """A deep copy (the arrays are copied)."""
        return RouterState(weights=self.weights.copy(), bias=self.bias.copy())


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
        Chosen experts per token (top-k of ``s + b``, group limits applied), in no particular order.
    gates : ndarray, shape (T, k), float32
        Gate values aligned with ``selected``: unbiased scores, optionally renormalised over the
        selection, times the scaling factor.
    """

    logits: FloatArray
    scores: FloatArray
    selected: npt.NDArray[np.int64]
    gates: FloatArray

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


class RouteOptions(TypedDict):
    """Keyword arguments of :func:`route` that a scenario fixes (see :func:`route_options`)."""

    top_k: int
    score: ScoreFunction
    normalize: bool
    scaling_factor: float
    n_groups: int
    group_topk: int | None


def route_options(scenario: Scenario) -> RouteOptions:
    """The routing configuration a scenario implies.

    Node-limited routing (``router.node_limit``) becomes group-limited routing with one group per
    node of the expert-parallel group (``n_groups = scenario.ep_nodes``, ``group_topk =
    node_limit``) when that group spans more than one node (routing.md §6.2 item 3).
    """
    router = scenario.router
    limited = router.node_limit is not None and scenario.ep_nodes > 1
    return RouteOptions(
        top_k=scenario.model.moe.top_k,
        score=router.score,
        normalize=router.normalize,
        scaling_factor=router.scaling_factor,
        n_groups=scenario.ep_nodes if limited else 1,
        group_topk=router.node_limit if limited else None,
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
        exact ties are resolved deterministically by :func:`numpy.argpartition`.
    """
    n_cols = values.shape[1]
    if not 1 <= k <= n_cols:
        raise ValueError(f"top_k: {k} is not in 1..{n_cols}")
    if k == n_cols:
        return np.broadcast_to(np.arange(n_cols, dtype=np.int64), values.shape).copy()
    part = np.argpartition(values, n_cols - k, axis=1)
    return np.ascontiguousarray(part[:, n_cols - k :], dtype=np.int64)


def scores_from_logits(logits: FloatArray, score: ScoreFunction) -> FloatArray:
    """Affinity scores ``G(z)`` (routing.md §1).

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


def _group_limited(selection: FloatArray, top_k: int, n_groups: int, group_topk: int) -> FloatArray:
    """Selection scores with the experts of all but the best ``group_topk`` groups set to -inf."""
    n_tokens, n_experts = selection.shape
    if n_experts % n_groups:
        raise ValueError(f"n_groups: {n_groups} does not divide the {n_experts} experts")
    group_size = n_experts // n_groups
    if group_topk * group_size < top_k:
        raise ValueError(
            f"group_topk: {group_topk} groups of {group_size} experts cannot hold top_k={top_k}"
        )
    grouped = selection.reshape(n_tokens, n_groups, group_size)
    per_group = min(group_size, max(1, top_k // group_topk))
    if per_group == 1:
        group_score = grouped.max(axis=2)
    else:
        kth = group_size - per_group
        group_score = np.partition(grouped, kth, axis=2)[:, :, kth:].sum(axis=2)
    kept = top_k_indices(group_score, group_topk)
    keep = np.zeros((n_tokens, n_groups), dtype=bool)
    np.put_along_axis(keep, kept, True, axis=1)
    masked = np.where(keep[:, :, None], grouped, -np.inf).astype(selection.dtype, copy=False)
    return masked.reshape(n_tokens, n_experts)


def select_experts(
    scores: FloatArray,
    bias: FloatArray | None,
    top_k: int,
    n_groups: int = 1,
    group_topk: int | None = None,
) -> npt.NDArray[np.int64]:
    """Top-k selection on ``scores + bias``, group-limited if asked (routing.md §2.1, §6.2).

    Parameters
    ----------
    scores : ndarray, shape (T, E)
        Unbiased affinity scores.
    bias : ndarray, shape (E,), or None
        Selection bias; ``None`` or all zeros means plain top-k on the scores.
    top_k : int
        Experts per token.
    n_groups : int
        Contiguous, equal expert groups (nodes or devices).
    group_topk : int or None
        Groups a token may use; ``None`` or ``≥ n_groups`` disables the limit.

    Returns
    -------
    ndarray, shape (T, top_k), int64
    """
    selection = scores + bias if bias is not None and bias.any() else scores
    if group_topk is not None and group_topk < n_groups:
        selection = _group_limited(selection, top_k, n_groups, group_topk)
    return top_k_indices(selection, top_k)


def route(
    x: FloatArray,
    state: RouterState,
    top_k: int,
    score: ScoreFunction,
    normalize: bool,
    scaling_factor: float,
    n_groups: int = 1,
    group_topk: int | None = None,
) -> Routing:
    """Route a batch of tokens (routing.md §2.1, §3, §6.2, §10 items 1–3).

    Parameters
    ----------
    x : ndarray, shape (T, dim), float32
        Router inputs ``u_t``.
    state : RouterState
        Router weights ``W`` (E, dim) and selection bias ``b`` (E,).
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

    Returns
    -------
    Routing
        Logits, scores, selection and gates. Computed in float32 for float32 inputs (float64
        inputs stay float64, which the gradient checks use).
    """
    logits = x @ state.weights.T
    scores = scores_from_logits(logits, score)
    selected = select_experts(scores, state.bias, top_k, n_groups, group_topk)
    gates = gather_rows(scores, selected)
    if normalize:
        gates /= (row_sum(gates) + 1e-20)[:, None]
    if scaling_factor != 1.0:
        gates *= gates.dtype.type(scaling_factor)
    return Routing(logits=logits, scores=scores, selected=selected, gates=gates)
