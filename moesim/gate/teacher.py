"""The gate's task objective: reproduce a fixed teacher router's weighted choice of experts.

A real router is trained by the language-model loss, which reaches it only through the gate values
of the experts it selected (arXiv 2408.15664 Eq. 3: "the language-model gradient still reaches
``e_i``
through the unbiased ``s_{i,t}`` of the selected experts"). The gate has no language model, so it
replaces that loss with a stand-in with the same structure and a real, finite optimum.

**Objective.** Each simulated MoE layer has a fixed teacher router ``W*`` of shape (E, dim) with
i.i.d. ``N(0, 1)`` entries. For token ``x_t`` the teacher picks its top-k experts ``T_t`` by the
logits ``a_t = x_t W*ᵀ`` and weights them ``q_t = softmax(a_{t,T_t} / τ)`` over ``T_t``
(τ = ``gate.teacher_temperature``; 0 outside ``T_t``). The student selects ``S_t`` and weights it
with its gate values renormalised over ``S_t`` (``w_t``, 0 outside ``S_t``; the selection
renormalisation, ``normalize`` and the scaling factor cancel). If the experts' outputs are
orthonormal, the squared error of the layer's output against the teacher's is

    L_task = (1/T) Σ_t ½ ‖w_t − q_t‖²
           = (1/T) Σ_t [½ Σ_{S_t} w² − Σ_{S_t ∩ T_t} w q + ½ Σ_{T_t} q²].

Its optimum is finite and exact: select ``T_t`` and weight it ``q_t`` (loss 0). Missing a teacher
expert ``j`` costs at least ``½ q_j²``; weight on an expert the teacher did not choose costs
``½ w_i²``. Tokens cluster by topic and topics follow a Zipf law (:mod:`moesim.gate.stream`), so
the teacher's choices are overloaded: balancing the load forces some tokens off their teacher
experts, and balancing has a real price in ``L_task``, as an auxiliary loss has a price in
perplexity (arXiv 2408.15664; arXiv 2408.15664 Table 1).

**Gradient.** ``L_task`` depends on the logits only through the selected experts' weights; the
top-k selection is piecewise constant and passes no gradient. With ``g_j = w_j − q_j`` (the
derivative in ``w_j``) and ``ḡ_t = Σ_{S_t} w g``, for ``j ∈ S_t``:

- sigmoid scores, ``w_j = σ_j / Σ_{S_t} σ``:
  ``∂L/∂z_j = (1/T)(g_j − ḡ_t) σ_j(1 − σ_j) / Σ_{S_t} σ``;
- softmax scores, ``w_j = exp z_j / Σ_{S_t} exp z``: ``∂L/∂z_j = (1/T) w_j (g_j − ḡ_t)``;

and zero for unselected experts. The selection bias ``b`` never receives a gradient (arXiv
2408.15664 Eq. 3).

**Capacity drops.** Under a capacity (``router.capacity``) some assignments of ``S_t`` are dropped
(``Routing.dropped``): the token skips that expert through the residual, so the expert adds
nothing to the layer's output. The student's output is then its gate values renormalised over the
*kept* experts ``K_t ⊆ S_t`` (``w_t`` is 0 at a dropped expert), and everything above holds with
``K_t`` in place of ``S_t``:

    L_task = (1/T) Σ_t [½ Σ_{K_t} w² − Σ_{K_t ∩ T_t} w q + ½ Σ_{T_t} q²],

gradients only at kept experts, with the sums ``Σ σ`` and ``ḡ_t`` over ``K_t``. A token whose
every assignment was dropped outputs 0: it costs ``½ Σ_{T_t} q²`` and passes no gradient. A drop
is a decision of the capacity, piecewise constant in the logits like the selection, so it passes
no gradient either. Without drops (dropless routing, the default) the computation is the one
above, bit for bit.

**Teacher capture** = ``mean_t Σ_{K_t ∩ T_t} q_t``: the share of the teacher's weighted choice the
student's kept experts cover (1 when ``K_t = T_t``; ``K_t = S_t`` when dropless).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moesim.gate.router import FloatArray, Routing, ScoreFunction, gather_rows, row_sum


@dataclass(frozen=True, eq=False)
class TeacherChoice:
    """The teacher's weighted choice for a batch.

    Attributes
    ----------
    experts : ndarray, shape (T, k), int64
        ``T_t``, the teacher's top-k experts.
    weights : ndarray, shape (T, k), float32
        ``q_t`` at ``experts``; rows sum to 1.
    """

    experts: npt.NDArray[np.int64]
    weights: FloatArray

    def at(self, selected: npt.NDArray[np.int64]) -> FloatArray:
        """``q_t`` at the student's ``selected`` experts (0 where the teacher did not choose),
        shape (T, k_student)."""
        match = selected[:, :, None] == self.experts[:, None, :]
        return (match * self.weights[:, None, :]).sum(axis=2, dtype=self.weights.dtype)

    def dense(self, n_experts: int) -> FloatArray:
        """``q_t`` over all experts, shape (T, E) (for tests and analysis)."""
        out = np.zeros((self.experts.shape[0], n_experts), dtype=self.weights.dtype)
        np.put_along_axis(out, self.experts, self.weights, axis=1)
        return out


@dataclass(frozen=True, eq=False)
class Teacher:
    """The fixed teacher router of one MoE layer.

    Attributes
    ----------
    weights : ndarray, shape (E, dim), float32
        ``W*``, entries ``N(0, 1)``.
    temperature : float
        ``τ`` of ``q = softmax(a_T / τ)``; smaller gives more unequal weights within the choice.
    """

    weights: npt.NDArray[np.float32]
    temperature: float

    @classmethod
    def random(
        cls, n_experts: int, dim: int, temperature: float, rng: np.random.Generator
    ) -> Teacher:
        """A teacher with ``N(0, 1)`` weights drawn from ``rng``."""
        weights = rng.standard_normal((n_experts, dim)).astype(np.float32)
        return cls(weights=weights, temperature=temperature)

    def choice(self, x: FloatArray, top_k: int) -> TeacherChoice:
        """The teacher's top-k experts for each row of ``x`` (T, dim) and their weights."""
        a = x @ self.weights.T
        kth = a.shape[1] - top_k
        experts = np.argpartition(a, kth, axis=1)[:, kth:].astype(np.int64)
        top = gather_rows(a, experts) / np.float32(self.temperature)
        top -= top.max(axis=1, keepdims=True)
        np.exp(top, out=top)
        top /= row_sum(top)[:, None]
        return TeacherChoice(experts=experts, weights=top.astype(np.float32, copy=False))


def task_loss_and_grad(
    routing: Routing,
    target: FloatArray,
    target_sq: FloatArray,
    score: ScoreFunction,
    add_to: FloatArray | None = None,
) -> tuple[float, FloatArray]:
    """Task loss ``L_task`` and its exact gradient with respect to the router logits.

    Parameters
    ----------
    routing : Routing
        The student's routing; uses ``scores`` (T, E), ``selected`` (T, k) and ``dropped``
        (T, k): dropped assignments carry no weight, the weights are renormalised over the kept
        ones, and a token with every assignment dropped outputs 0 (module docstring).
    target : ndarray, shape (T, k)
        The teacher's weight ``q`` at each selected expert (:meth:`TeacherChoice.at`).
    target_sq : ndarray, shape (T,)
        ``Σ_{T_t} q²`` per token (the loss of selecting nothing the teacher chose).
    score : {'sigmoid', 'softmax'}
        The score function of ``routing``.
    add_to : ndarray, shape (T, E), optional
        A gradient to accumulate into (modified and returned) instead of a fresh zero array.

    Returns
    -------
    loss : float
        ``L_task`` per token.
    dlogits : ndarray, shape (T, E)
        ``∂L_task/∂z`` (plus ``add_to``); zero outside the kept selection.
    """
    n_tokens, n_experts = routing.scores.shape
    selected = routing.selected
    s_sel = gather_rows(routing.scores, selected)
    q_sel = target.astype(s_sel.dtype, copy=False)
    kept = None if not routing.dropped.any() else ~routing.dropped
    if kept is None:
        total = row_sum(s_sel)[:, None]
    else:
        # Dropped assignments leave the output: zero score there gives them no weight and, in
        # both gradient forms below, no gradient; their target is not reachable either.
        s_sel = np.where(kept, s_sel, s_sel.dtype.type(0))
        q_sel = np.where(kept, q_sel, q_sel.dtype.type(0))
        total = row_sum(s_sel)[:, None]
        # A token with every assignment dropped outputs 0: w = 0 (loss ½Σq², no gradient).
        total[~kept.any(axis=1)] = 1
    w = s_sel / total
    per_token = 0.5 * row_sum(w * w) - row_sum(w * q_sel) + 0.5 * target_sq
    loss = float(per_token.mean(dtype=np.float64))
    g = w - q_sel
    centred = g - row_sum(w * g)[:, None]
    if score == "sigmoid":
        g_sel = centred * s_sel * (1 - s_sel) / total
    elif score == "softmax":
        g_sel = centred * w
    else:
        raise ValueError(f"score: unknown score function {score!r}")
    g_sel *= g_sel.dtype.type(1.0 / n_tokens)
    dlogits = np.zeros((n_tokens, n_experts), dtype=s_sel.dtype) if add_to is None else add_to
    flat = selected + (np.arange(n_tokens, dtype=np.int64) * n_experts)[:, None]
    dlogits.ravel()[flat] += g_sel  # the k experts of a token are distinct: no repeated index
    return loss, dlogits


def teacher_capture(target: FloatArray, dropped: npt.NDArray[np.bool_] | None = None) -> float:
    """``mean_t Σ_{K_t ∩ T_t} q_t`` from the teacher weights at the selected experts (T, k).

    ``dropped`` (T, k), optional: assignments dropped by a capacity (``Routing.dropped``); they
    cover nothing of the teacher's choice. Without it every selected expert counts.
    """
    if dropped is not None and dropped.any():
        target = np.where(dropped, target.dtype.type(0), target)
    return float(row_sum(target).mean(dtype=np.float64))
