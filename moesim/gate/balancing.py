"""Load-balancing strategies: none, the Switch/GShard auxiliary loss, and the loss-free bias.

A strategy acts on a router at two moments of each optimizer step. Before the step it may add a
loss, whose gradient with respect to the router logits joins the task gradient
(:meth:`BalancingStrategy.loss_and_grad`); after the step it may adjust the router's
selection bias from the loads that step produced (:meth:`BalancingStrategy.after_step`).

- ``none`` does neither.
- ``aux_loss`` adds ``α·N·Σ_i f_i·P_i`` per micro-batch (routing.md §5.1, §6.2 item 5): ``f_i =
  c_i/(K·T)`` from the *unbiased, ungrouped* top-k counts, held constant; ``P_i`` the mean over
  the micro-batch's tokens of ``p_{t,i}``, where ``p = softmax(z)`` for softmax routers and ``p =
  σ(z)/Σ_j σ(z_j)`` (normalised over all experts, DeepSeek-V3 Eq. 19, routing.md §3) for sigmoid
  routers. The loss reported is the mean over micro-batches, as gradient accumulation averages it.
- ``loss_free`` never touches the loss. After each step it moves every bias by the sign rule
  ``b_i += γ·sign(mean(c) − c_i)`` with the step's counts over the whole batch, as routed (bias and
  group limits applied), in float32 (routing.md §2.2, §6.3). The new bias first affects the next
  step.

Strategies are built from the scenario's strategy entry by its ``kind`` through the
:data:`STRATEGIES` registry (:func:`make_strategy`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from moesim.gate.router import (
    FloatArray,
    RouterState,
    Routing,
    ScoreFunction,
    row_sum,
    top_k_indices,
)
from moesim.scenario.strategies import AuxLoss, LossFree, NoBalancing

StrategySpec = NoBalancing | AuxLoss | LossFree


def micro_batch_sizes(micro_batches: int | Sequence[int], n_tokens: int) -> npt.NDArray[np.int64]:
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
    if isinstance(micro_batches, int | np.integer):
        m = int(micro_batches)
        if m < 1 or n_tokens % m:
            raise ValueError(f"{m} equal micro-batches do not split {n_tokens} tokens")
        return np.full(m, n_tokens // m, dtype=np.int64)
    sizes = np.asarray(micro_batches, dtype=np.int64)
    if sizes.ndim != 1 or sizes.size == 0 or (sizes <= 0).any() or sizes.sum() != n_tokens:
        raise ValueError(f"micro-batch sizes {sizes.tolist()} do not partition {n_tokens} tokens")
    return sizes


def aux_loss_and_grad(
    routing: Routing,
    score: ScoreFunction,
    top_k: int,
    alpha: float,
    micro_batches: int | Sequence[int],
    selected: npt.NDArray[np.int64] | None = None,
) -> tuple[float, FloatArray]:
    """Micro-batch Switch/GShard auxiliary loss and its exact gradient (routing.md §5.1, §6.2).

    For micro-batch ``m`` of ``T_m`` tokens, ``L_m = α·N·Σ_i f_{m,i}·P_{m,i}`` with ``f_{m,i} =
    c_{m,i}/(K·T_m)`` (no gradient) and ``P_{m,i} = (1/T_m) Σ_{t∈m} p_{t,i}``; the loss is
    ``L = (1/M) Σ_m L_m``. With ``G_{m,i} = α·N·f_{m,i}/(M·T_m)`` and ``ī_t = Σ_i G_{m,i} p_{t,i}``
    the gradient for token ``t`` of micro-batch ``m`` is

    - softmax: ``∂L/∂z_{t,j} = p_{t,j}·(G_{m,j} − ī_t)``;
    - sigmoid: ``∂L/∂z_{t,j} = σ_j(1 − σ_j)/Σ_i σ_i · (G_{m,j} − ī_t)``.

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
    n_micro = sizes.size
    if score not in ("sigmoid", "softmax"):
        raise ValueError(f"score: unknown score function {score!r}")
    if selected is None:
        selected = top_k_indices(s, top_k)
    micro_of_token = np.repeat(np.arange(n_micro, dtype=np.int64), sizes)
    flat = (micro_of_token * n_experts)[:, None] + selected
    counts = np.bincount(flat.ravel(), minlength=n_micro * n_experts).reshape(n_micro, n_experts)
    f = counts / (top_k * sizes[:, None])  # (M, E), float64, no gradient
    scale = alpha * n_experts
    g = ((scale / (n_micro * sizes))[:, None] * f).astype(s.dtype)  # G_{m,i}
    # Sigmoid routers normalise over all experts: p = s / D with D_t = Σ_i s_{t,i}.
    inv_d = 1 / row_sum(s) if score == "sigmoid" else None

    if (sizes == sizes[0]).all():
        # Equal micro-batches: batched mat-vec products on a (M, T_m, E) view.
        t_m = int(sizes[0])
        s3 = s.reshape(n_micro, t_m, n_experts)
        if inv_d is None:
            prob_sum = s3.sum(axis=1, dtype=np.float64)
        else:
            prob_sum = np.matmul(inv_d.reshape(n_micro, 1, t_m), s3)[:, 0, :]
        inner = np.matmul(s3, g[:, :, None])  # (M, T_m, 1): Σ_i G_i s_{t,i}
        if inv_d is not None:
            inner *= inv_d.reshape(n_micro, t_m, 1)
        grad = (g[:, None, :] - inner).reshape(n_tokens, n_experts)
    else:
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        p = s if inv_d is None else s * inv_d[:, None]
        prob_sum = np.add.reduceat(p, starts, axis=0, dtype=np.float64)
        grad = np.repeat(g, sizes, axis=0)
        grad -= row_sum(grad * p)[:, None]

    loss = float(scale * (f * prob_sum / sizes[:, None]).sum(axis=1).mean())
    if inv_d is None:
        grad *= s
    else:
        jac = 1 - s
        jac *= s
        jac *= inv_d[:, None]
        grad *= jac
    return loss, grad


def sign_rule_update(bias: npt.NDArray[np.float32], counts: npt.ArrayLike, gamma: float) -> None:
    """Loss-free bias update, in place: ``b_i += γ·sign(mean(c) − c_i)`` (routing.md §2.2, §6.3).

    Parameters
    ----------
    bias : ndarray, shape (E,), float32
        Selection bias, updated in place (kept float32).
    counts : array_like, shape (E,)
        Loads of the step, as routed.
    gamma : float
        Update speed ``γ``. An overloaded expert moves down by exactly ``γ``, an underloaded one up
        by ``γ``; an expert exactly at the mean keeps its bias (``sign(0) = 0``).
    """
    c = np.asarray(counts, dtype=np.float64)
    step = np.sign(c.mean() - c).astype(np.float32) * np.float32(gamma)
    bias += step


class BalancingStrategy:
    """Base strategy: no loss, no bias change (the null object of the registry).

    Parameters
    ----------
    spec : NoBalancing | AuxLoss | LossFree
        The scenario's strategy entry.
    """

    kind: ClassVar[str] = ""

    def __init__(self, spec: StrategySpec) -> None:
        self.spec = spec

    @property
    def name(self) -> str:
        """The strategy's name in the scenario (unique within it)."""
        return self.spec.name

    def loss_and_grad(
        self,
        routing: Routing,
        *,
        score: ScoreFunction,
        top_k: int,
        micro_batches: int | Sequence[int],
        unbiased_selected: npt.NDArray[np.int64] | None = None,
    ) -> tuple[float, FloatArray | None]:
        """The strategy's loss on this batch and ``∂loss/∂logits`` (``None``: no gradient).

        Parameters
        ----------
        routing : Routing
            The batch as routed, shape (T, E).
        score : {'sigmoid', 'softmax'}
            The router's score function.
        top_k : int
            Experts per token.
        micro_batches : int or sequence of int
            Consecutive micro-batches of the batch (see :func:`micro_batch_sizes`).
        unbiased_selected : ndarray, shape (T, k), optional
            The plain top-k of the unbiased scores, if the caller knows it.
        """
        return 0.0, None

    def after_step(self, state: RouterState, counts: npt.NDArray[np.int64]) -> None:
        """Adjust ``state`` after the optimizer step, from the step's per-expert loads (E,)."""


STRATEGIES: dict[str, type[BalancingStrategy]] = {}


def register(kind: str) -> Callable[[type[BalancingStrategy]], type[BalancingStrategy]]:
    """Class decorator adding a strategy to :data:`STRATEGIES` under ``kind``."""

    def add(cls: type[BalancingStrategy]) -> type[BalancingStrategy]:
        cls.kind = kind
        STRATEGIES[kind] = cls
        return cls

    return add


@register("none")
class NoBalancingStrategy(BalancingStrategy):
    """No balancing at all: the router follows the task loss only."""


@register("aux_loss")
class AuxLossStrategy(BalancingStrategy):
    """Switch/GShard auxiliary loss at micro-batch scope (routing.md §5.1, §6.2 item 5)."""

    spec: AuxLoss

    def loss_and_grad(
        self,
        routing: Routing,
        *,
        score: ScoreFunction,
        top_k: int,
        micro_batches: int | Sequence[int],
        unbiased_selected: npt.NDArray[np.int64] | None = None,
    ) -> tuple[float, FloatArray | None]:
        """``α·N·Σ f·P`` averaged over micro-batches; see :func:`aux_loss_and_grad`."""
        if self.spec.alpha == 0:
            return 0.0, None
        return aux_loss_and_grad(
            routing, score, top_k, self.spec.alpha, micro_batches, selected=unbiased_selected
        )


@register("loss_free")
class LossFreeStrategy(BalancingStrategy):
    """Auxiliary-loss-free balancing: sign-rule bias update after each step (routing.md §2.2)."""

    spec: LossFree

    def after_step(self, state: RouterState, counts: npt.NDArray[np.int64]) -> None:
        """``b += γ·sign(mean(c) − c)`` with the global-batch counts of the step just taken."""
        sign_rule_update(state.bias, counts, self.spec.gamma)


def make_strategy(spec: StrategySpec) -> BalancingStrategy:
    """Build the strategy a scenario entry names, by its ``kind``.

    Raises
    ------
    KeyError
        If no strategy is registered under ``spec.kind``.
    """
    return STRATEGIES[spec.kind](spec)
