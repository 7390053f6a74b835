"""Load-balancing strategies: auxiliary losses and the loss-free bias, composable.

A strategy acts on a router at two moments of each optimizer step. Before the step it may add a
loss, whose gradient with respect to the router logits joins the task gradient
(:meth:`BalancingStrategy.loss_and_grad`); after the step it may move the router's selection
bias from the loads that step produced (:meth:`BalancingStrategy.after_step`). Every scenario
kind (``none``, ``aux_loss``, ``loss_free``, ``composite``) is first brought to the general
:class:`~moesim.scenario.strategies.Composite` form, so one implementation serves them all.

**Auxiliary losses** (DeepSeek-V3, arXiv 2412.19437 §2.1.2; DeepSeek-V2, arXiv 2405.04434 §2.2;
Switch, arXiv 2101.03961; ST-MoE, arXiv 2202.08906; arXiv 2501.11873; Megatron-LM
megatron/core/transformer/moe/router.py; docs/model/gate.md). Counts
come from the *unbiased, ungrouped* top-k of the scores and are constants of the loss; the
gradient flows only through the probabilities ``p``: ``p = softmax(z)`` for softmax routers,
``p = σ(z)/Σ_j σ(z_j)`` (normalised over all experts, DeepSeek-V3 Eq. 19) for sigmoid routers.
Every balance loss is linear in ``p`` with constant coefficients,
``L = Σ_g Σ_{t∈g} Σ_i C_{g,i}·p_{t,i}`` over consecutive token groups ``g``:

- ``switch`` (micro-batch; Switch/GShard, Megatron ``aux_loss``): per micro-batch ``m`` of
  ``T_m`` tokens, ``L_m = α·N·Σ_i f_{m,i}·P_{m,i}`` with ``f = c/(K·T_m)`` and ``P`` the mean of
  ``p``; ``L`` is the mean over micro-batches (gradient accumulation averages it), so
  ``C_{m,i} = α·N·f_{m,i}/(M·T_m)``.
- ``sequence`` (DeepSeek-V3 Eqs. 17–20): the same per sequence of ``gate.tokens_per_sequence``
  tokens, averaged over sequences (Megatron ``seq_aux_loss``).
- ``global`` (Demons in the Detail, Megatron ``global_aux_loss``): ``f̄`` from the counts of the
  whole gate batch (all micro-batches, synchronised), ``P`` per micro-batch:
  ``C_{m,i} = α·N·f̄_i/(M·T_m)``.
- ``device`` (DeepSeek-V2): per sequence, ``α·Σ_d f'_d·P'_d`` with ``f'_d`` the mean of
  ``f_j = N·c_j/(K·T)`` over device ``d``'s experts and ``P'_d = Σ_{j∈d} P_j``:
  ``C_{s,j} = α·f'_{s,dev(j)}/(S·T_s)``.
- ``communication`` (DeepSeek-V2): per sequence, ``α·Σ_d f''_d·P''_d`` with ``f''_d =
  D/(M·T)·Σ_t 1(token t reaches device d)`` (``M`` the device limit) and ``P''_d = Σ_{j∈d} P_j``.

Devices are the expert-parallel ranks, each with a contiguous block of ``N/D`` experts. With
``ī_t = Σ_i C_{g(t),i} p_{t,i}`` the gradient is, for token ``t`` (Switch, arXiv 2101.03961):

- softmax: ``∂L/∂z_{t,j} = p_{t,j}·(C_{g(t),j} − ī_t)``;
- sigmoid: ``∂L/∂z_{t,j} = σ_j(1 − σ_j)/Σ_i σ_i · (C_{g(t),j} − ī_t)``,

and ``L = Σ_t ī_t``. Several terms add their coefficients on the common refinement of their
token groups, so a composite costs one gradient pass however many balance terms it has. The
router z-loss ``α·(1/T)·Σ_t LSE(z_t)²`` has the gradient ``(2α/T)·LSE_t·softmax(z_t)``
(ST-MoE, arXiv 2202.08906); it is added separately.

**Loss-free bias** (arXiv 2408.15664 Algorithm 1; Megatron-LM
megatron/core/distributed/finalize_model_grads.py; docs/model/gate.md). After the step, with the
loads
``c`` *as processed* (bias and group limits applied, capacity drops removed, as Megatron-LM counts
the final routing map) of
each count group ``g`` of the configured scope and their mean ``c̄_g``:

- sign rule: ``b_i += γ·mean_g sign(c̄_g − c_{g,i})``;
- proportional rule: ``b_i += γ·mean_g (c̄_g − c_{g,i})/c̄_g``. Table 3's ``u·e`` uses the raw
  error, whose size grows with the batch; dividing by ``c̄`` makes γ dimensionless and the step
  independent of the batch size (a 10 % overload moves the bias by ``0.1·γ``).

The scope sets the groups: ``global`` one group, the whole batch of the step (Megatron's
all-reduced counts); ``micro_batch`` each micro-batch; ``rank`` each data-parallel rank's share
(the gate's micro-batches dealt in contiguous blocks to ``parallelism.expert × parallelism.data``
ranks). The per-group updates are averaged: every group asks for its own balance, as with
unsynchronised local counts (Demons in the Detail, arXiv 2501.11873). The proportional rule is
linear in the counts, so with equal groups its local scopes equal the global one; the sign rule's
are not. The bias is float32; the new value first affects the next step. γ may follow a schedule
(:meth:`~moesim.scenario.strategies.Bias.gamma_at`).

The multiplicative bias of arXiv 2408.15664 Table 4 (``bias.mode: mul``): the router selects by
``s·b`` (``RouterState.bias_mode``), the factors start at 1 and move by
:func:`multiplicative_rule_update`, ``b_i ← b_i·(1 + γ·mean_g sign(c̄_g − c_{g,i}))``.

Re-centring (``bias.recenter``, additive bias only): after the rule, the mean bias is subtracted
(:func:`recenter_bias`). A common shift leaves every top-k and group-limited selection as it was
(:mod:`moesim.scenario.strategies`, *Re-centring*) and stops the sign rule's common drift.

**Interference** (arXiv 2408.15664 Table 1): :func:`interference` compares ``∂L_aux/∂W`` and
``∂L_task/∂W`` on the router weights. The bias never enters a gradient, so a loss-free strategy
has none by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moesim.gate import kernels
from moesim.gate.router import (
    FloatArray,
    RouterState,
    Routing,
    ScoreFunction,
    row_sum,
    segment_sizes,
    top_k_mask,
)
from moesim.scenario.strategies import Bias, BiasMode, Composite, LossTerm, StrategySpec

IntArray = npt.NDArray[np.int64]

__all__ = [
    "BIAS_RULES",
    "BalanceContext",
    "BalancingStrategy",
    "StrategySpec",
    "aux_loss_and_grad",
    "combined_loss_and_grad",
    "grouped_counts",
    "interference",
    "make_strategy",
    "micro_batch_sizes",
    "multiplicative_rule_update",
    "proportional_rule_update",
    "recenter_bias",
    "sign_rule_update",
    "weighted_probability_loss_and_grad",
    "z_loss_and_grad",
]


# --------------------------------------------------------------------------- token groups


def micro_batch_sizes(micro_batches: int | Sequence[int], n_tokens: int) -> IntArray:
    """Token counts of consecutive micro-batches.

    Parameters
    ----------
    micro_batches : int or sequence of int
        A number of equal micro-batches (it must divide ``n_tokens``), or their sizes.
    n_tokens : int
        Tokens in the batch.

    Returns
    -------
    ndarray, shape (M,), int64
        Positive sizes summing to ``n_tokens``.
    """
    try:
        return segment_sizes(micro_batches, n_tokens)
    except ValueError as exc:
        raise ValueError(f"micro-batches: {exc}") from None


def grouped_counts(
    selected: IntArray,
    n_experts: int,
    sizes: npt.ArrayLike,
    dropped: npt.NDArray[np.bool_] | None = None,
) -> IntArray:
    """Expert loads of consecutive token groups (docs/model/gate.md).

    Parameters
    ----------
    selected : ndarray, shape (T, k), int
        Selected experts per token.
    n_experts : int
        ``E``.
    sizes : array_like, shape (G,), int
        Tokens in each consecutive group; they sum to ``T``.
    dropped : ndarray, shape (T, k), bool, optional
        Assignments dropped by a capacity; they do not count (Megatron-LM
        megatron/core/transformer/moe/router.py).

    Returns
    -------
    ndarray, shape (G, E), int64
        ``c_{g,i}``, the (token, expert) assignments of group ``g`` to expert ``i``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n_groups = sizes.size
    flat = selected
    if n_groups > 1:
        flat = np.repeat(np.arange(n_groups, dtype=np.int64) * n_experts, sizes)[:, None] + selected
    flat = flat.ravel()
    if dropped is not None and dropped.any():
        flat = flat[~dropped.ravel()]
    counts = np.bincount(flat, minlength=n_groups * n_experts)
    return counts.reshape(n_groups, n_experts).astype(np.int64, copy=False)


def _group_starts(sizes: IntArray) -> IntArray:
    return np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)


def _refine(partitions: Sequence[IntArray]) -> tuple[IntArray, list[IntArray]]:
    """The common refinement of partitions of one token range into consecutive groups.

    Returns the refined group sizes and, for each partition, the index of its group that holds
    each refined group.
    """
    ends = [np.cumsum(p) for p in partitions]
    bounds = np.unique(np.concatenate(ends))
    sizes = np.diff(np.concatenate(([0], bounds))).astype(np.int64)
    starts = bounds - sizes
    return sizes, [np.searchsorted(e, starts, side="right").astype(np.int64) for e in ends]


@dataclass(frozen=True)
class BalanceContext:
    """How a gate batch is laid out, and the router settings the losses need.

    The batch is ``T`` consecutive tokens: sequences of ``tokens_per_sequence`` tokens, grouped
    into micro-batches of whole sequences, dealt in contiguous blocks to ``ranks`` ranks.

    Attributes
    ----------
    score : {'sigmoid', 'softmax'}
        The router's score function.
    top_k : int
        Experts per token ``K``.
    tokens_per_sequence : int
        Tokens of one sequence (the scope of ``sequence``, ``device`` and ``communication``).
    micro_batches : int or tuple of int
        A number of equal micro-batches, or their token counts.
    ranks : int
        Data-parallel ranks sharing the batch (the ``rank`` bias scope); micro-batches go to
        ``min(ranks, M)`` contiguous blocks of near-equal size.
    devices : int
        Expert-parallel degree ``D``: device ``d`` holds experts ``[d·N/D, (d+1)·N/D)``.
    device_limit : int or None
        ``M`` of the communication loss, the most devices a token can reach; ``None`` means
        ``min(K, D)``.
    """

    score: ScoreFunction
    top_k: int
    tokens_per_sequence: int
    micro_batches: int | tuple[int, ...] = 1
    ranks: int = 1
    devices: int = 1
    device_limit: int | None = None

    def micro_sizes(self, n_tokens: int) -> IntArray:
        """Token counts of the micro-batches, shape (M,)."""
        return micro_batch_sizes(self.micro_batches, n_tokens)

    def sequence_sizes(self, n_tokens: int) -> IntArray:
        """Token counts of the sequences, shape (S,)."""
        tps = self.tokens_per_sequence
        if tps < 1 or n_tokens % tps:
            raise ValueError(f"tokens_per_sequence: {tps} does not divide {n_tokens} tokens")
        return np.full(n_tokens // tps, tps, dtype=np.int64)

    def rank_sizes(self, n_tokens: int) -> IntArray:
        """Token counts of the ranks' shares (contiguous blocks of micro-batches), shape (R,)."""
        micro = self.micro_sizes(n_tokens)
        blocks = np.array_split(micro, min(max(self.ranks, 1), micro.size))
        return np.array([b.sum() for b in blocks], dtype=np.int64)

    def scope_sizes(self, scope: str, n_tokens: int) -> IntArray:
        """Token counts of the count groups of a bias scope (``global``: one group)."""
        if scope == "global":
            return np.array([n_tokens], dtype=np.int64)
        if scope == "micro_batch":
            return self.micro_sizes(n_tokens)
        if scope == "rank":
            return self.rank_sizes(n_tokens)
        raise ValueError(f"scope: unknown balance scope {scope!r}")

    @property
    def comm_limit(self) -> int:
        """``M`` of the communication loss."""
        limit = min(self.top_k, self.devices)
        return limit if self.device_limit is None else max(1, min(limit, self.device_limit))


# --------------------------------------------------------------------------- losses


def weighted_probability_loss_and_grad(
    scores: FloatArray,
    score: ScoreFunction,
    coef: FloatArray,
    sizes: npt.ArrayLike,
) -> tuple[float, FloatArray]:
    """``L = Σ_g Σ_{t∈g} Σ_i C_{g,i}·p_{t,i}`` and ``∂L/∂z`` with ``C`` constant.

    Every balance loss of this module has this form (see the module docstring for ``C`` of each
    and for the gradient formulas).

    Parameters
    ----------
    scores : ndarray, shape (T, E)
        Affinities ``s``: softmax probabilities, or element-wise sigmoids.
    score : {'sigmoid', 'softmax'}
        How ``scores`` came from the logits; sigmoid scores are normalised over all experts,
        ``p = s/Σ_j s_j`` (DeepSeek-V3 Eq. 19).
    coef : ndarray, shape (G, E)
        ``C_{g,i}`` per consecutive token group.
    sizes : array_like, shape (G,), int
        Tokens in each group (sum ``T``).

    Returns
    -------
    loss : float
    dlogits : ndarray, shape (T, E), dtype of ``scores``
    """
    if score not in ("sigmoid", "softmax"):
        raise ValueError(f"score: unknown score function {score!r}")
    s = scores
    n_tokens, n_experts = s.shape
    sizes = np.asarray(sizes, dtype=np.int64)
    n_groups = sizes.size
    c = np.asarray(coef).astype(s.dtype, copy=False)
    inv_d = 1 / row_sum(s) if score == "sigmoid" else None
    if (sizes == sizes[0]).all():
        # Equal groups: batched mat-vec products on a (G, T_g, E) view.
        t_g = int(sizes[0])
        inner = np.matmul(s.reshape(n_groups, t_g, n_experts), c[:, :, None])  # Σ_i C_i s_{t,i}
        if inv_d is not None:
            inner *= inv_d.reshape(n_groups, t_g, 1)
        grad = (c[:, None, :] - inner).reshape(n_tokens, n_experts)
        inner = inner.reshape(n_tokens)
    else:
        grad = np.repeat(c, sizes, axis=0)
        p = s if inv_d is None else s * inv_d[:, None]
        inner = row_sum(grad * p)
        grad -= inner[:, None]
    loss = float(inner.sum(dtype=np.float64))
    if inv_d is None:
        grad *= s
    else:
        jac = 1 - s
        jac *= s
        jac *= inv_d[:, None]
        grad *= jac
    return loss, grad


def _mean_of_group_losses(
    counts: IntArray, sizes: IntArray, top_k: int, alpha: float, n_experts: int
) -> FloatArray:
    """``C`` of the mean over groups of ``α·N·Σ_i f_{g,i} P_{g,i}``, ``f = c/(K·T_g)``."""
    t_g = sizes[:, None].astype(np.float64)
    return (alpha * n_experts / sizes.size) * counts / (top_k * t_g * t_g)


def aux_loss_and_grad(
    routing: Routing,
    score: ScoreFunction,
    top_k: int,
    alpha: float,
    micro_batches: int | Sequence[int],
    selected: IntArray | None = None,
) -> tuple[float, FloatArray]:
    """Micro-batch Switch/GShard auxiliary loss and its exact gradient (Switch, arXiv 2101.03961;
    Megatron-LM megatron/core/transformer/moe/router.py).

    For micro-batch ``m`` of ``T_m`` tokens, ``L_m = α·N·Σ_i f_{m,i}·P_{m,i}`` with ``f_{m,i} =
    c_{m,i}/(K·T_m)`` (no gradient) and ``P_{m,i} = (1/T_m) Σ_{t∈m} p_{t,i}``; the loss is
    ``L = (1/M) Σ_m L_m`` (see :func:`weighted_probability_loss_and_grad` for the gradient).

    Parameters
    ----------
    routing : Routing
        Uses ``scores`` (softmax or sigmoid of the logits), shape (T, E).
    score : {'sigmoid', 'softmax'}
        The score function of ``routing``.
    top_k : int
        ``K``.
    alpha : float
        Coefficient ``α``.
    micro_batches : int or sequence of int
        Consecutive micro-batches of the token axis: a count of equal ones, or their sizes.
    selected : ndarray, shape (T, K), int64, optional
        The unbiased, ungrouped top-k of ``routing.scores`` when the caller has it (a router with
        zero bias and no group limit); computed here otherwise.

    Returns
    -------
    loss : float
        ``L`` (dimensionless; ``α`` at perfect balance).
    dlogits : ndarray, shape (T, E), dtype of ``routing.scores``
        ``∂L/∂z``.
    """
    s = routing.scores
    n_tokens, n_experts = s.shape
    sizes = micro_batch_sizes(micro_batches, n_tokens)
    if score not in ("sigmoid", "softmax"):
        raise ValueError(f"score: unknown score function {score!r}")
    plain = top_k_mask(s, top_k) if selected is None else selected
    counts = _plain_counts(plain, n_experts, sizes)
    coef = _mean_of_group_losses(counts, sizes, top_k, alpha, n_experts)
    return weighted_probability_loss_and_grad(s, score, coef, sizes)


def z_loss_and_grad(logits: FloatArray, alpha: float) -> tuple[float, FloatArray]:
    """Router z-loss ``α·(1/T)·Σ_t LSE(z_t)²`` and its gradient (ST-MoE, arXiv 2202.08906).

    ``∂L/∂z_{t,j} = (2α/T)·LSE_t·softmax_j(z_t)``, whatever the router's score function.

    Parameters
    ----------
    logits : ndarray, shape (T, E)
    alpha : float
        Coefficient ``c_z``.

    Returns
    -------
    loss : float
    dlogits : ndarray, shape (T, E), dtype of ``logits``
    """
    n_tokens = logits.shape[0]
    peak = logits.max(axis=1)
    e = np.exp(logits - peak[:, None])
    total = row_sum(e)
    lse = peak + np.log(total)
    loss = alpha * float(np.mean(lse.astype(np.float64) ** 2))
    e *= ((2 * alpha / n_tokens) * lse / total).astype(e.dtype)[:, None]
    return loss, e


def _device_of_expert(n_experts: int, devices: int) -> int:
    if devices < 1 or n_experts % devices:
        raise ValueError(f"devices: {devices} do not evenly hold {n_experts} experts")
    return n_experts // devices


def _plain_counts(
    plain: IntArray | npt.NDArray[np.bool_], n_experts: int, sizes: IntArray
) -> IntArray:
    """Loads (G, E) of consecutive token groups from the plain top-k: indices (T, K), or the
    boolean mask (T, E) of :func:`~moesim.gate.router.top_k_mask` (the same set, counted
    without indices)."""
    if plain.dtype != np.bool_:
        return grouped_counts(plain, n_experts, sizes)
    return np.add.reduceat(plain.view(np.uint8), _group_starts(sizes), axis=0, dtype=np.int64)


def _loss_coefficients(
    term: LossTerm,
    selected: IntArray | npt.NDArray[np.bool_],
    n_experts: int,
    ctx: BalanceContext,
) -> tuple[FloatArray, IntArray]:
    """``(C, group sizes)`` of one balance term (not ``z_loss``) for the plain top-k:
    ``selected`` (T, K) indices, or its (T, E) boolean mask."""
    n_tokens = selected.shape[0]
    mask = selected.dtype == np.bool_
    top_k, alpha = ctx.top_k, term.alpha
    if term.kind in ("switch", "global"):
        sizes = ctx.micro_sizes(n_tokens)
    else:
        sizes = ctx.sequence_sizes(n_tokens)
    n_groups = sizes.size
    t_g = sizes[:, None].astype(np.float64)
    if term.kind in ("switch", "sequence"):
        counts = _plain_counts(selected, n_experts, sizes)
        return _mean_of_group_losses(counts, sizes, top_k, alpha, n_experts), sizes
    if term.kind == "global":
        if mask:
            total = np.add.reduce(selected.view(np.uint8), axis=0, dtype=np.int64)
        else:
            total = np.bincount(selected.ravel(), minlength=n_experts)
        f_bar = total / (top_k * n_tokens)
        return (alpha * n_experts / n_groups) * f_bar[None, :] / t_g, sizes
    per_device = _device_of_expert(n_experts, ctx.devices)
    if term.kind == "device":
        counts = _plain_counts(selected, n_experts, sizes)
        f = n_experts * counts / (top_k * t_g)
        f_dev = f.reshape(n_groups, ctx.devices, per_device).mean(axis=2)
    elif term.kind == "communication":
        if mask:
            by_device = selected.reshape(n_tokens, ctx.devices, per_device)
            reached = by_device.any(axis=2).astype(np.int64)
        else:
            reached = np.zeros((n_tokens, ctx.devices), dtype=np.int64)
            np.put_along_axis(reached, selected // per_device, 1, axis=1)
        hits = np.add.reduceat(reached, _group_starts(sizes), axis=0)
        f_dev = ctx.devices * hits / (ctx.comm_limit * t_g)
    else:
        raise ValueError(f"kind: unknown loss term {term.kind!r}")
    coef = (alpha / n_groups) * np.repeat(f_dev, per_device, axis=1) / t_g
    return coef, sizes


def combined_loss_and_grad(
    terms: Sequence[LossTerm],
    routing: Routing,
    ctx: BalanceContext,
    selected: IntArray | None = None,
) -> tuple[float, FloatArray]:
    """The sum of ``terms`` on this batch and its gradient with respect to the logits.

    Parameters
    ----------
    terms : sequence of LossTerm
        Loss terms (at least one).
    routing : Routing
        The batch as routed; uses ``logits`` and ``scores``.
    ctx : BalanceContext
        Batch layout and router settings.
    selected : ndarray, shape (T, K), optional
        The unbiased, ungrouped top-k of the scores, if known (computed otherwise).

    Returns
    -------
    loss : float
        ``Σ`` of the terms' losses.
    dlogits : ndarray, shape (T, E), dtype of ``routing.scores``
    """
    if not terms:
        raise ValueError("losses: no loss term to compute")
    s = routing.scores
    n_tokens, n_experts = s.shape
    balance = [t for t in terms if t.kind != "z_loss"]
    z_terms = [t for t in terms if t.kind == "z_loss"]
    loss, grad = 0.0, None
    if balance:
        # Only the set matters to the losses: without the caller's indices, a mask (cheaper).
        plain = selected
        if plain is None and kernels.ENABLED and s.dtype == np.float32 and s.flags.c_contiguous:
            # The same set by the compiled selection (None when NaN scores leave it to NumPy).
            plain = kernels.select_top_k(s, None, False, ctx.top_k, 1, None)
        if plain is None:
            plain = top_k_mask(s, ctx.top_k)
        parts = [_loss_coefficients(t, plain, n_experts, ctx) for t in balance]
        if len(parts) == 1:
            coef, sizes = parts[0]
        else:
            sizes, index = _refine([p[1] for p in parts])
            coef = sum(p[0][i] for p, i in zip(parts, index, strict=True))
        loss, grad = weighted_probability_loss_and_grad(s, ctx.score, coef, sizes)
    for term in z_terms:
        z_loss, z_grad = z_loss_and_grad(routing.logits, term.alpha)
        loss += z_loss
        z_grad = z_grad.astype(s.dtype, copy=False)
        grad = z_grad if grad is None else grad + z_grad
    assert grad is not None
    return loss, grad


# --------------------------------------------------------------------------- bias rules


def _load_error(counts: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """``(c̄ − c, c̄)`` per count group: ``(G, E)`` and ``(G, 1)``; a 1-D input is one group."""
    c = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    mean = c.mean(axis=1, keepdims=True)
    return mean - c, mean


def sign_rule_update(bias: npt.NDArray[np.float32], counts: npt.ArrayLike, gamma: float) -> None:
    """Loss-free bias update, in place: ``b_i += γ·sign(c̄ − c_i)`` (arXiv 2408.15664 Algorithm 1;
    Megatron-LM megatron/core/distributed/finalize_model_grads.py).

    Parameters
    ----------
    bias : ndarray, shape (E,), float32
        Selection bias, updated in place (kept float32).
    counts : array_like, shape (E,) or (G, E)
        Loads of the step, as routed: one vector, or one per count group, whose updates are
        averaged (``γ·mean_g sign(c̄_g − c_{g,i})``).
    gamma : float
        Update speed ``γ``. An overloaded expert moves down by exactly ``γ``, an underloaded one up
        by ``γ``; an expert exactly at the mean keeps its bias (``sign(0) = 0``).
    """
    c = np.asarray(counts)
    if c.ndim == 1 and c.dtype.kind in "iu":
        # One group of integer loads (the common case, once per step): sign(c̄ − c_i) is
        # sign(Σc − E·c_i) in exact integer arithmetic — the same signs, without float passes.
        direction = np.sign(int(c.sum()) - c.size * c.astype(np.int64, copy=False))
        bias += direction.astype(np.float32) * np.float32(gamma)
        return
    error, _ = _load_error(c)
    direction = np.sign(error)
    if direction.shape[0] == 1:
        step = direction[0].astype(np.float32) * np.float32(gamma)
    else:
        step = (direction.mean(axis=0) * gamma).astype(np.float32)
    bias += step


def proportional_rule_update(
    bias: npt.NDArray[np.float32], counts: npt.ArrayLike, gamma: float
) -> None:
    """Proportional update, in place: ``b_i += γ·(c̄ − c_i)/c̄`` (arXiv 2408.15664 Table 3, App. C).

    The load error is divided by the mean load (our normalisation; the paper writes ``u·e`` with
    raw counts): γ is then dimensionless and the step does not grow with the batch size.

    Parameters
    ----------
    bias : ndarray, shape (E,), float32
        Selection bias, updated in place.
    counts : array_like, shape (E,) or (G, E)
        Loads, one vector or one per count group (updates averaged over groups; a group with no
        load contributes nothing).
    gamma : float
        Update speed ``γ``.
    """
    error, mean = _load_error(counts)
    relative = np.divide(error, mean, out=np.zeros_like(error), where=mean > 0)
    bias += (relative.mean(axis=0) * gamma).astype(np.float32)


def multiplicative_rule_update(
    factors: npt.NDArray[np.float32], counts: npt.ArrayLike, gamma: float
) -> None:
    """Multiplicative bias update, in place: ``b_i ← b_i·(1 + γ·sign(c̄ − c_i))``.

    For selection on ``s·b`` with ``b`` initialised to 1 (arXiv 2408.15664 Table 4; a strategy
    with ``bias.mode: mul``). The paper gives the rate but not the form; a relative step keeps
    every factor positive, and near ``b = 1`` it is the additive sign step.

    Parameters
    ----------
    factors : ndarray, shape (E,), float32
        Multiplicative selection factors, updated in place.
    counts : array_like, shape (E,) or (G, E)
        Loads, one vector or one per count group (signs averaged over groups).
    gamma : float
        Relative update speed ``γ`` (``< 1``).
    """
    error, _ = _load_error(counts)
    factors *= (1 + gamma * np.sign(error).mean(axis=0)).astype(np.float32)


def recenter_bias(bias: npt.NDArray[np.float32]) -> None:
    """Subtract the mean from an additive bias, in place (``bias.recenter``).

    Selection is invariant under a shift common to all experts — top-k of ``s + b`` and the
    group scores of group-limited routing alike (:mod:`moesim.scenario.strategies`,
    *Re-centring*) — so this only removes the sign rule's common drift and keeps ``s + b``
    near the scores' magnitude, where float32 resolves it best. The mean is taken in float64;
    the result has mean 0 up to float32 rounding.
    """
    bias -= np.float32(bias.mean(dtype=np.float64))


BIAS_RULES: dict[str, Callable[[npt.NDArray[np.float32], npt.ArrayLike, float], None]] = {
    "sign": sign_rule_update,
    "proportional": proportional_rule_update,
}


# --------------------------------------------------------------------------- interference


def interference(g_aux: FloatArray | None, g_task: FloatArray) -> tuple[float, float]:
    """Cosine between the auxiliary and task gradients, and the ratio of their norms.

    Both are gradients of losses being *minimised*, taken on the same parameters (the router
    weights, flattened): a negative cosine means a step down the auxiliary loss climbs the task
    loss (arXiv 2408.15664 Table 1, "interference gradients").

    Parameters
    ----------
    g_aux : ndarray or None
        ``∂L_aux/∂W``; ``None`` when the strategy has no loss.
    g_task : ndarray
        ``∂L_task/∂W``, the same shape.

    Returns
    -------
    cos : float
        ``⟨g_aux, g_task⟩ / (‖g_aux‖·‖g_task‖)``; 0 when either is zero.
    ratio : float
        ``‖g_aux‖ / ‖g_task‖``; 0 when ``g_aux`` is zero, ``inf`` when only ``g_task`` is.
    """
    if g_aux is None:
        return 0.0, 0.0
    a = g_aux.ravel().astype(np.float64)
    b = g_task.ravel().astype(np.float64)
    norm_a, norm_b = float(np.sqrt(a @ a)), float(np.sqrt(b @ b))
    if norm_a == 0:
        return 0.0, 0.0
    if norm_b == 0:
        return 0.0, float("inf")
    return float(a @ b) / (norm_a * norm_b), norm_a / norm_b


# --------------------------------------------------------------------------- strategies


class BalancingStrategy:
    """A scenario strategy in its general form: loss terms and an optional bias.

    Parameters
    ----------
    spec : NoBalancing | AuxLoss | LossFree | Composite
        The scenario's strategy entry; it is brought to its composite form (terms with ``α = 0``
        are dropped: they add nothing).

    Attributes
    ----------
    spec : StrategySpec
        The entry as given.
    losses : tuple of LossTerm
        The loss terms with ``α > 0``.
    bias : Bias or None
        The loss-free bias, if any.
    """

    def __init__(self, spec: StrategySpec) -> None:
        self.spec = spec
        composite: Composite = spec.canonical()
        self.losses: tuple[LossTerm, ...] = tuple(t for t in composite.losses if t.alpha > 0)
        self.bias: Bias | None = composite.bias

    @property
    def name(self) -> str:
        """The strategy's name in the scenario (unique within it)."""
        return self.spec.name

    @property
    def has_loss(self) -> bool:
        """Whether the strategy adds an auxiliary loss (and so a gradient)."""
        return bool(self.losses)

    @property
    def bias_mode(self) -> BiasMode:
        """How the bias enters selection: ``add`` (also without a bias) or ``mul``."""
        return "add" if self.bias is None else self.bias.mode

    @property
    def bias_scope(self) -> str | None:
        """Scope of the counts the bias update reads; ``None`` without a bias."""
        return None if self.bias is None else self.bias.scope

    def gamma_at(self, tokens: float) -> float:
        """Bias update speed for the step starting with ``tokens`` trained (0 without a bias)."""
        return 0.0 if self.bias is None else self.bias.gamma_at(tokens)

    def loss_and_grad(
        self,
        routing: Routing,
        context: BalanceContext,
        unbiased_selected: IntArray | None = None,
    ) -> tuple[float, FloatArray | None]:
        """The strategy's loss on this batch and ``∂loss/∂logits`` (``None``: no loss).

        Parameters
        ----------
        routing : Routing
            The batch as routed, shape (T, E).
        context : BalanceContext
            Layout of the batch (micro-batches, sequences, devices) and router settings.
        unbiased_selected : ndarray, shape (T, k), optional
            The plain top-k of the unbiased scores, if the caller knows it.
        """
        if not self.losses:
            return 0.0, None
        return combined_loss_and_grad(self.losses, routing, context, unbiased_selected)

    def after_step(self, state: RouterState, counts: npt.ArrayLike, tokens: float = 0.0) -> None:
        """Move ``state.bias`` after the optimizer step (nothing without a bias): the bias rule,
        then any re-centring; the multiplicative step for ``bias.mode: mul``.

        Parameters
        ----------
        state : RouterState
            The layer's router; its bias is updated in place. Its ``bias_mode`` must be the
            strategy's (``ValueError`` otherwise).
        counts : array_like, shape (E,) or (G, E)
            The step's loads as routed: over the whole batch, or per count group of the bias
            scope (:meth:`BalanceContext.scope_sizes`).
        tokens : float
            Tokens trained before this step (selects γ from the schedule).
        """
        bias = self.bias
        if bias is None:
            return
        if state.bias_mode != bias.mode:
            raise ValueError(
                f"bias_mode: the router selects with bias mode {state.bias_mode!r}, the strategy "
                f"updates a {bias.mode!r} bias"
            )
        gamma = bias.gamma_at(tokens)
        if gamma > 0:
            if bias.mode == "mul":
                multiplicative_rule_update(state.bias, counts, gamma)
            else:
                BIAS_RULES[bias.rule](state.bias, counts, gamma)
                if bias.recenter:
                    recenter_bias(state.bias)


def make_strategy(spec: StrategySpec) -> BalancingStrategy:
    """The strategy a scenario entry describes: every kind is one :class:`BalancingStrategy`,
    built from the entry's composite form."""
    return BalancingStrategy(spec)
