"""The gate's task: a small MoE layer whose experts learn, trained on the synthetic stream.

Contract. For every simulated layer, :class:`ExpertTask` holds a regression problem with latent
structure and the MoE layer that learns it; :meth:`ExpertTask.step` takes one batch routed by the
layer's router and returns the task loss, its exact gradient with respect to the router logits
(through the gate values only, as in a real MoE), and updates the experts. Everything is float32
and vectorised; float64 inputs stay float64 (the gradient checks use them).

**Targets.** Each token ``x_t`` (``dim``) carries the topic ``k(t)`` it was drawn from
(:mod:`moesim.gate.stream`). Its target is ``y_t = (B + A_{k(t)}) x_t`` in ``TASK_DIM``
dimensions: ``B`` is a map every topic shares, ``A_k`` one per topic, all with i.i.d. normal
entries scaled so that ``E‖B x‖² = SHARED_SHARE`` and ``E‖A_k x‖² = 1 − SHARED_SHARE`` for a
unit-norm token. The topic part is what an expert must specialise on; the shared part is what
every expert (or a shared expert) can learn from any token.

**Layer.** Routed expert ``i`` is a small ReLU FFN ``E_i(x) = V_i relu(U_i x)`` with
``EXPERT_HIDDEN`` hidden units; the model's shared experts add one linear map ``S`` applied to
every token with weight 1 (DeepSeekMoE, arXiv 2401.06066 §3: shared experts hold the common
knowledge). The output is

    ŷ_t = S x_t + Σ_{j ∈ K_t} g_{t,j} E_j(x_t),

with ``g`` the router's gate values (:func:`~moesim.gate.router.route`: unbiased scores,
renormalised and scaled as configured) and ``K_t`` the selected experts less any dropped by a
capacity (a dropped assignment skips the expert through the residual). The loss is

    L = (1/T) Σ_t ½ ‖ŷ_t − y_t‖².

An expert with a few hidden units fits a few topics' maps well and many only as a compromise:
an expert that serves many topics fits each worse, one that receives few tokens learns slowly (its
gradient is the sum over its tokens), and one that has learnt the shared map ``B`` helps every
token. A router trained on this loss without balancing has nothing that sends tokens back to a
starved expert, while the experts that get the tokens keep improving — the self-reinforcing
imbalance of an unbalanced MoE (Shazeer et al., arXiv 1701.06538 §4; Switch Transformer,
arXiv 2101.03961 §2.2). On the default stream the routing starts collapsed (its common
direction hands a few router rows every token) and stays so without balancing
(``docs/model/gate.md``, R1).

**Gradients.** With ``r_t = ŷ_t − y_t``:

- expert ``i``, with ``h = U_i x_t``, ``a = relu(h)`` and ``δ = (1/T) g_{t,j} r_t`` over its
  kept assignments: ``∂L/∂V_i = Σ δ aᵀ``, ``∂L/∂U_i = Σ ((V_iᵀ δ) ⊙ 1[h > 0]) x_tᵀ``;
  shared: ``∂L/∂S = (1/T) Σ_t r_t x_tᵀ``;
- gate value: ``∂L/∂g_{t,j} = (1/T)⟨r_t, E_j(x_t)⟩`` at kept assignments, 0 at dropped ones;
- router logits: the gate values' vector-Jacobian product (:func:`gate_backward`). The top-k
  selection and the capacity are piecewise constant and pass no gradient; the bias never does.

The router receives ``TASK_GRADIENT_SCALE · ∂L/∂z`` (*Gradient scale* in ``docs/model/gate.md``):
the toy loss's logit gradient brought to the size a language model's loss gives, so that
balancing coefficients copied from real configurations weigh what they weigh there.

**Experts' optimiser.** Plain SGD with step ``EXPERT_LEARNING_RATE · N/K`` on the routed experts
(``N/K``: an expert at the balanced share ``K/N`` of the tokens then moves as fast as the
shared expert, whatever ``N`` and ``K``), ``EXPERT_LEARNING_RATE`` on the shared one. SGD keeps
the step proportional to the tokens an expert receives — an overloaded expert's gradient mixes
its topics, a starved one hardly moves — where Adam would normalise that away. A coarsened gate
(``gate.steps_per_update = k``) applies k steps' worth at each full update (the stale gradient
repeated, as the router's Adam does). The step of each weight array is capped at ``_STABLE_STEP``
over the trace of its Gauss-Newton curvature (``Σ g²‖a‖²/T`` over an expert's tokens for ``V``,
``‖V‖²·Σ g²‖x‖²/T`` for ``U``, ``Σ‖x‖²/T`` for ``S``) and over the number of maps a token's
output sums (``K``, plus one with a shared expert), so that a flooded expert, or k steps taken
at once, stays a stable gradient step; near the balanced load the cap is far from binding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moesim.gate import kernels
from moesim.gate.router import FloatArray, RouteOptions, Routing, gather_rows, row_sum

# Output dimension of the regression: large enough that distinct topic maps are far apart,
# small enough that the experts cost little next to the router (dim × TASK_DIM per assignment).
TASK_DIM = 8
# Share of the target's variance every topic has in common (the shared map B). Half: a router
# gains as much from an expert that learnt B as from one that learnt its topic.
SHARED_SHARE = 0.5
# Hidden units of a routed expert (a ReLU FFN): few, so that one expert fits a few topics' maps
# well and many only as a compromise.
EXPERT_HIDDEN = 8
# Output variance of a freshly initialised expert, as a share of the target's (random, small
# experts as in any network at initialisation; their differences give the router a first
# gradient).
INIT_SHARE = 0.1
# SGD step of the experts (per optimizer step, on the loss L above). At this rate an expert at
# the balanced load fits a topic's map in a few hundred steps — the scale on which the router
# moves at the gate's learning rates (docs/model/gate.md, Experts).
EXPERT_LEARNING_RATE = 0.5
# Largest step times Hessian trace an expert takes (below 2, the bound for a stable gradient step
# on a quadratic): caps the step of an expert flooded with tokens, or of a coarsened gate's
# k steps at once, and is inactive at loads near the balanced one.
_STABLE_STEP = 0.5
# Multiplier on the task loss's logit gradient (docs/model/gate.md, Gradient scale). Calibrated
# once, on one published point: the loss-free paper's 1B model (arXiv 2408.15664 Table 2: 64
# routed + 2 shared experts, top-6, sigmoid, auxiliary loss α = 1e-3) has MaxVio_global 0.72.
# The quickstart scenario has that router; over the grid α/scale ∈ {0.03, 0.1, 0.3} (seeds 7
# and 8) its MaxVio_global was 1.25, 0.80 and 0.15, so α = 1e-3 must act as 0.1: scale 0.01.
TASK_GRADIENT_SCALE = 0.01


def gate_backward(routing: Routing, dgates: FloatArray, options: RouteOptions) -> FloatArray:
    """``∂L/∂z`` (T, E) from ``∂L/∂g`` (T, k) at ``routing.selected``, for the gate values
    :func:`~moesim.gate.router.route` computes with ``options``.

    With ``d = scaling_factor · ∂L/∂g`` and ``w = g / scaling_factor``:

    - softmax over the selected logits (``topk_before_softmax``, or a softmax router with
      ``normalize``; the two are the same function): ``∂L/∂z_j = w_j (d_j − Σ_S w d)`` on the
      selection;
    - softmax over all experts, not renormalised: ``∂L/∂z_m = p_m (d_m − Σ_S p d)`` for every
      expert ``m`` (``d`` zero outside the selection);
    - sigmoid, renormalised: ``∂L/∂z_j = σ_j(1 − σ_j)(d_j − Σ_S w d)/Σ_S σ``;
    - sigmoid, not renormalised: ``∂L/∂z_j = σ_j(1 − σ_j) d_j``.
    """
    scores, selected = routing.scores, routing.selected
    n_tokens, n_experts = scores.shape
    dtype = scores.dtype.type
    d = dgates.astype(scores.dtype, copy=False) * dtype(options["scaling_factor"])
    out = np.zeros((n_tokens, n_experts), dtype=scores.dtype)
    flat = selected + (np.arange(n_tokens, dtype=np.int64) * n_experts)[:, None]
    score = options["score"]
    if score == "softmax":
        if options["topk_before_softmax"] or options["normalize"]:
            w = routing.gates / dtype(options["scaling_factor"])
            out.ravel()[flat] = w * (d - row_sum(w * d)[:, None])
            return out
        p_sel = gather_rows(scores, selected)
        out.ravel()[flat] = d
        out -= row_sum(p_sel * d)[:, None]
        out *= scores
        return out
    if score != "sigmoid":
        raise ValueError(f"score: unknown score function {score!r}")
    s_sel = gather_rows(scores, selected)
    slope = s_sel * (1 - s_sel)
    if options["normalize"]:
        total = row_sum(s_sel)[:, None]
        w = s_sel / total
        out.ravel()[flat] = slope * (d - row_sum(w * d)[:, None]) / total
    else:
        out.ravel()[flat] = slope * d
    return out


@dataclass
class _Sorted:
    """The kept assignments of a batch in expert order: ``rows`` the token of each, ``slot``
    its position in ``selected.ravel()``, ``owner`` the expert of each; ``counts`` and
    ``starts`` each expert's run (an expert's assignments in token order)."""

    rows: npt.NDArray[np.int64]
    slot: npt.NDArray[np.int64]
    owner: npt.NDArray[np.int64]
    counts: npt.NDArray[np.int64]
    starts: npt.NDArray[np.int64]


def _sort_assignments(routing: Routing) -> _Sorted:
    selected = routing.selected
    if kernels.ENABLED:
        # The same stable order by a counting sort in one compiled pass.
        slot, owner, rows, counts, starts = kernels.sort_by_expert(
            selected, routing.dropped, routing.n_experts
        )
        return _Sorted(rows=rows, slot=slot, owner=owner, counts=counts, starts=starts)
    k = selected.shape[1]
    flat = selected.ravel()
    slot = np.argsort(flat, kind="stable").astype(np.int64)
    if routing.dropped.any():
        slot = slot[~routing.dropped.ravel()[slot]]
    owner = flat[slot]
    counts = np.bincount(owner, minlength=routing.n_experts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    return _Sorted(rows=slot // k, slot=slot, owner=owner, counts=counts, starts=starts)


def _compiled(x: FloatArray) -> bool:
    """Whether the experts' loops run compiled (:mod:`moesim.gate.kernels`): float32 inputs
    (the float64 gradient checks take the NumPy loops, which give the same values)."""
    return kernels.ENABLED and x.dtype == np.float32


def _expert_forward(
    x: FloatArray, order: _Sorted, up: FloatArray, down: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Per kept assignment (expert order): the hidden pre-activation ``U_e x_t`` and the
    expert's output ``V_e relu(h)``, each a sum in index order (``d`` then ``h``), started
    from the first product — the order :func:`moesim.gate.kernels.expert_forward` keeps, so
    both give the same values, whatever BLAS library is installed. (This NumPy form, which
    gathers each assignment's weights, is slower than batched BLAS products; the compiled loop
    is the fast path.)"""
    n = order.rows.size
    hidden = np.empty((n, up.shape[1]), dtype=x.dtype)
    outs = np.empty((n, down.shape[1]), dtype=x.dtype)
    if _compiled(x):
        kernels.expert_forward(x, order.rows, order.owner, up, down, hidden, outs)
        return hidden, outs
    xs = x[order.rows]
    ups = up[order.owner]  # (A, H, D)
    np.multiply(ups[:, :, 0], xs[:, 0, None], out=hidden)
    for d in range(1, xs.shape[1]):
        hidden += ups[:, :, d] * xs[:, d, None]
    act = np.maximum(hidden, hidden.dtype.type(0))
    downs = down[order.owner]  # (A, O, H)
    np.multiply(downs[:, :, 0], act[:, 0, None], out=outs)
    for h in range(1, act.shape[1]):
        outs += downs[:, :, h] * act[:, h, None]
    return hidden, outs


def _expert_backward(
    x: FloatArray,
    order: _Sorted,
    down: FloatArray,
    d_out: FloatArray,
    hidden: FloatArray,
    grad_up: FloatArray,
    grad_down: FloatArray,
) -> None:
    """The experts' weight gradients from ``d_out`` (``∂L/∂`` each assignment's output, expert
    order), into ``grad_up`` and ``grad_down``: per expert, the assignments' outer products
    added in their order from zero; ``∂L/∂h = (V_eᵀ d_out) ⊙ 1[h > 0]`` summed over ``o`` in
    index order. The same order as :func:`moesim.gate.kernels.expert_backward`."""
    if _compiled(x):
        kernels.expert_backward(x, order.rows, order.owner, down, d_out, hidden, grad_up, grad_down)
        return
    zero = hidden.dtype.type(0)
    act = np.maximum(hidden, zero)
    downs = down[order.owner]  # (A, O, H)
    d_hidden = d_out[:, 0, None] * downs[:, 0, :]
    for o in range(1, d_out.shape[1]):
        d_hidden += d_out[:, o, None] * downs[:, o, :]
    d_hidden *= (hidden > zero).astype(hidden.dtype)
    grad_up.fill(0)
    grad_down.fill(0)
    xs = x[order.rows]
    # The p-th assignment of every expert that has one, for p = 0, 1, …: each expert's
    # outer products are added in its assignments' order, as the compiled loop does.
    for p in range(int(order.counts.max(initial=0))):
        experts = np.flatnonzero(order.counts > p)
        at = order.starts[experts] + p
        grad_down[experts] += d_out[at, :, None] * act[at, None, :]
        grad_up[experts] += d_hidden[at, :, None] * xs[at, None, :]


@dataclass
class TaskResult:
    """One batch through :meth:`ExpertTask.step` or :meth:`ExpertTask.evaluate`.

    Attributes
    ----------
    loss : float
        ``L`` per token (before the step's updates).
    dlogits : ndarray, shape (T, E), or None
        ``TASK_GRADIENT_SCALE · ∂L/∂z`` (None from :meth:`ExpertTask.evaluate`).
    """

    loss: float
    dlogits: FloatArray | None


class ExpertTask:
    """The targets and the learning experts of one simulated MoE layer (module docstring).

    Parameters
    ----------
    n_topics, dim : int
        The stream's topics and token dimension.
    n_experts, top_k : int
        Routed experts ``N`` and experts per token ``K``.
    shared : bool
        Whether the layer has shared experts (one shared linear map ``S``).
    rng : numpy.random.Generator
        Draws the target maps, then the experts' initial weights (i.i.d. normal, output
        variance ``INIT_SHARE`` of the target's).
    dtype : numpy dtype, default float32
    """

    def __init__(
        self,
        n_topics: int,
        dim: int,
        n_experts: int,
        top_k: int,
        shared: bool,
        rng: np.random.Generator,
        dtype: type[np.floating] = np.float32,
    ) -> None:
        scale_shared = np.sqrt(SHARED_SHARE / TASK_DIM)
        scale_topic = np.sqrt((1 - SHARED_SHARE) / TASK_DIM)
        common = rng.standard_normal((TASK_DIM, dim)) * scale_shared
        topic = rng.standard_normal((n_topics, TASK_DIM, dim)) * scale_topic
        self.targets: npt.NDArray[np.floating] = (common[None] + topic).astype(dtype)
        # Fan-in initialisation of the first layer; the second scaled so that an expert's output
        # variance is INIT_SHARE of the target's (the ReLU halves the second moment).
        scale_down = np.sqrt(2 * INIT_SHARE * dim / (EXPERT_HIDDEN * TASK_DIM))
        self.up: npt.NDArray[np.floating] = (
            rng.standard_normal((n_experts, EXPERT_HIDDEN, dim)) / np.sqrt(dim)
        ).astype(dtype)
        self.down: npt.NDArray[np.floating] = (
            rng.standard_normal((n_experts, TASK_DIM, EXPERT_HIDDEN)) * scale_down
        ).astype(dtype)
        scale_init = np.sqrt(INIT_SHARE / TASK_DIM)
        self.shared: npt.NDArray[np.floating] | None = (
            (rng.standard_normal((TASK_DIM, dim)) * scale_init).astype(dtype) if shared else None
        )
        self.expert_step = EXPERT_LEARNING_RATE * n_experts / top_k
        # Maps a token's output sums: its k experts and the shared one. Their steps add up on
        # the token's residual, so each map's cap is a share of the stable step.
        self._maps = top_k + (1 if shared else 0)
        self._grads: dict[str, npt.NDArray[np.floating]] | None = None
        self._curvature: dict[str, npt.NDArray[np.float64]] = {}
        # The target maps transposed for the compiled products (the maps never change).
        self._targets_t: npt.NDArray[np.floating] | None = None

    @property
    def n_experts(self) -> int:
        """Routed experts ``N``."""
        return int(self.up.shape[0])

    def target(self, x: FloatArray, topics: npt.NDArray[np.int64]) -> FloatArray:
        """``y_t = (B + A_{k(t)}) x_t``, shape (T, TASK_DIM): each sum over the token's
        dimensions in index order, from the first product (compiled for float32, the same
        values)."""
        which = np.asarray(topics, dtype=np.int64).ravel()
        if _compiled(x) and self.targets.dtype == np.float32:
            if self._targets_t is None:
                self._targets_t = np.ascontiguousarray(self.targets.transpose(0, 2, 1))
            return kernels.row_products(x, self._targets_t, which)
        maps = self.targets[which]  # (T, TASK_DIM, dim)
        out = maps[:, :, 0] * x[:, 0, None]
        for d in range(1, x.shape[1]):
            out += maps[:, :, d] * x[:, d, None]
        return out

    def _forward(
        self, x: FloatArray, routing: Routing
    ) -> tuple[FloatArray, FloatArray, FloatArray, _Sorted, FloatArray]:
        """Layer output (T, TASK_DIM); per kept assignment in expert order, the expert's
        output and hidden pre-activation; the sort; the assignments' gate values."""
        order = _sort_assignments(routing)
        hidden, outs = _expert_forward(x, order, self.up, self.down)
        gates = routing.gates.ravel()[order.slot].astype(x.dtype, copy=False)
        n_tokens, k = routing.selected.shape
        per_slot = np.zeros((n_tokens * k, TASK_DIM), dtype=x.dtype)
        per_slot[order.slot] = gates[:, None] * outs
        # A token's k outputs added in slot order (a dropped slot adds zero).
        by_slot = per_slot.reshape(n_tokens, k, TASK_DIM)
        y_hat = by_slot[:, 0].copy()
        for j in range(1, k):
            y_hat += by_slot[:, j]
        if self.shared is not None:
            y_hat += x @ self.shared.T
        return y_hat, outs, hidden, order, gates

    def evaluate(
        self,
        x: FloatArray,
        topics: npt.NDArray[np.int64],
        routing: Routing,
        target: FloatArray | None = None,
    ) -> float:
        """``L`` of the batch under ``routing`` at the current experts (no gradient, no update);
        ``target``: :meth:`target` of the batch when the caller has it."""
        y_hat = self._forward(x, routing)[0]
        r = y_hat - (self.target(x, topics) if target is None else target)
        return float(0.5 * np.einsum("td,td->", r, r, dtype=np.float64) / x.shape[0])

    def step(
        self,
        x: FloatArray,
        topics: npt.NDArray[np.int64],
        routing: Routing,
        options: RouteOptions,
        steps: int = 1,
        update: bool = True,
        target: FloatArray | None = None,
    ) -> TaskResult:
        """``L``, the router-logit gradient, and (``update``) ``steps`` SGD steps' worth of the
        experts' gradient applied to them; ``target``: :meth:`target` of the batch when the
        caller has it."""
        n_tokens = x.shape[0]
        y_hat, outs, hidden, order, gates = self._forward(x, routing)
        r = y_hat - (self.target(x, topics) if target is None else target)
        loss = float(0.5 * np.einsum("td,td->", r, r, dtype=np.float64) / n_tokens)
        r /= x.dtype.type(n_tokens)  # ∂L/∂ŷ
        r_sorted = r[order.rows]
        # ⟨r_t, E_j(x_t)⟩ per assignment, added over the outputs in index order.
        products = r_sorted * outs
        dgate = products[:, 0].copy()
        for o in range(1, TASK_DIM):
            dgate += products[:, o]
        dgates = np.zeros(routing.selected.size, dtype=x.dtype)
        dgates[order.slot] = dgate
        dlogits = gate_backward(routing, dgates.reshape(routing.selected.shape), options)
        dlogits *= dlogits.dtype.type(TASK_GRADIENT_SCALE)
        r_sorted *= gates[:, None]  # ∂L/∂(expert output) per assignment
        grad_up = np.empty_like(self.up)
        grad_down = np.empty_like(self.down)
        _expert_backward(x, order, self.down, r_sorted, hidden, grad_up, grad_down)
        # Traces of each expert's Hessian blocks (Gauss-Newton), bounds on their largest
        # eigenvalues that cap the steps (apply): Σ g²‖a‖²/T for the second layer and
        # ‖V‖²·Σ g²‖x‖²/T for the first.
        g2 = gates.astype(np.float64) ** 2
        act = np.maximum(hidden, hidden.dtype.type(0))
        # ‖x_t‖² once per token, not per assignment (the same row sums).
        x_sq = np.einsum("td,td->t", x, x, dtype=np.float64)[order.rows] * g2
        a_sq = np.einsum("ah,ah->a", act, act, dtype=np.float64) * g2
        n = self.n_experts
        curv_down = np.bincount(order.owner, weights=a_sq, minlength=n)
        down_sq = np.sum(np.square(self.down, dtype=np.float64), axis=(1, 2))
        curv_up = np.bincount(order.owner, weights=x_sq, minlength=n) * down_sq
        grads = {"up": grad_up, "down": grad_down}
        self._curvature = {"up": curv_up / n_tokens, "down": curv_down / n_tokens}
        if self.shared is not None:
            grads["shared"] = r.T @ x
            shared_sq = float(np.einsum("td,td->", x, x, dtype=np.float64)) / n_tokens
            self._curvature["shared"] = np.array(shared_sq)
        self._grads = grads
        if update:
            self.apply(steps)
        return TaskResult(loss=loss, dlogits=dlogits)

    def apply(self, steps: int = 1) -> None:
        """``steps`` SGD steps with the gradient of the last :meth:`step`."""
        if self._grads is None:
            return
        for name, grad in self._grads.items():
            weights = getattr(self, name)
            step = (EXPERT_LEARNING_RATE if name == "shared" else self.expert_step) * steps
            with np.errstate(divide="ignore"):
                cap = _STABLE_STEP / (self._maps * self._curvature[name])
            rate = np.minimum(step, cap).astype(weights.dtype)
            if rate.ndim and _compiled(weights) and weights.flags.c_contiguous:
                kernels.scaled_step(weights, rate, grad)  # the same values, no temporary
            elif rate.ndim:
                weights -= rate[:, None, None] * grad
            else:
                weights -= rate * grad

    def expert_gradients(self) -> dict[str, npt.NDArray[np.floating]] | None:
        """``∂L/∂`` each weight array (``up``, ``down``, ``shared``) of the last :meth:`step`
        (for tests)."""
        return self._grads
