"""Training the numerical gate under one balancing strategy (routing.md §10).

The gate stands in for the routers of a real training run. Each simulated layer has a student
router (:class:`~moesim.gate.router.RouterState`, initialised ``N(0, σ²)`` with
σ = ``init_logit_std / √(1 + noise²)`` so initial logits spread by ``init_logit_std`` whatever the
token norm, bias zero),
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
   (routing.md §2.2, §6.3): one bias update per optimizer step of the real run, no coarsening.

Runs are deterministic given the seed sequence: independent child sequences drive the stream
geometry, the teachers, the student initialisation and the per-update token draws, so two
strategies trained from the same seed see the same teachers and the same token batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from moesim.gate.balancing import (
    BalanceContext,
    StrategySpec,
    grouped_counts,
    interference,
    make_strategy,
)
from moesim.gate.metrics import max_vio
from moesim.gate.router import RouterState, route, route_options, row_sum
from moesim.gate.stream import TokenStream
from moesim.gate.teacher import Teacher, task_loss_and_grad, teacher_capture
from moesim.scenario.schema import Scenario

_BETA1 = 0.9
_BETA2 = 0.999
_EPS = 1e-8


@dataclass
class GateTrajectory:
    """What one gate training run produced.

    Attributes
    ----------
    strategy : str
        Name of the strategy trained.
    records : list of dict
        One per update, in step order: ``step``, ``tokens`` (``(step + 1) · tokens_per_step``,
        tokens seen once the step is done), and, averaged over layers, ``maxvio_batch`` (MaxVio
        of the update's gate-batch loads as processed — routed, less any capacity drops —
        routing.md §2.4, §10 item 4), ``task_loss`` (nats),
        ``aux_loss`` (the strategy's loss, 0 when it has none), ``teacher_capture``
        (:mod:`moesim.gate.teacher`), ``interference_cos`` and ``interference_ratio`` (cosine
        between ``∂L_aux/∂W`` and ``∂L_task/∂W`` on the router weights and ``‖∂L_aux/∂W‖ /
        ‖∂L_task/∂W‖``, :func:`~moesim.gate.balancing.interference`; both exactly 0 for a
        strategy without an auxiliary loss), ``bias_abs_mean`` (mean ``|b|`` after the step's
        update), and ``gamma`` (the bias update speed used after this step; the same for every
        layer, 0 without a bias).
    states : dict of int to list of RouterState
        Deep copies of every layer's router taken *before* the update of each requested step
        (the step ``total_steps`` means after the last update).
    final : list of RouterState
        The routers after the last update.
    stream : TokenStream
        The token stream the routers were trained on: route samples from this one, since a
        stream built from another seed has another topic geometry.
    """

    strategy: str
    stream: TokenStream
    records: list[dict[str, float]] = field(default_factory=list)
    states: dict[int, list[RouterState]] = field(default_factory=dict)
    final: list[RouterState] = field(default_factory=list)

    def column(self, key: str) -> npt.NDArray[np.float64]:
        """One record field over all updates, shape (updates,)."""
        return np.array([r[key] for r in self.records], dtype=np.float64)


class _Adam:
    """Adam for one float32 weight matrix."""

    def __init__(self, shape: tuple[int, ...], learning_rate: float) -> None:
        self.m = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.t = 0
        self.learning_rate = learning_rate

    def step(self, weights: npt.NDArray[np.float32], grad: npt.NDArray[np.float32]) -> None:
        self.t += 1
        self.m *= _BETA1
        self.m += (1 - _BETA1) * grad
        self.v *= _BETA2
        self.v += (1 - _BETA2) * grad * grad
        step_size = self.learning_rate * np.sqrt(1 - _BETA2**self.t) / (1 - _BETA1**self.t)
        # Bias-corrected update lr·m̂/(√v̂ + ε), with the corrections folded into the step size.
        denom = np.sqrt(self.v) + np.float32(_EPS * np.sqrt(1 - _BETA2**self.t))
        weights -= np.float32(step_size) * self.m / denom


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


def gate_micro_batches(scenario: Scenario) -> list[int]:
    """Token counts of the gate batch's micro-batches: ``micro_batch_size`` sequences each.

    A last, smaller micro-batch takes any remainder of ``gate.batch_sequences``.
    """
    mbs = scenario.parallelism.micro_batch_size
    batch, tps = scenario.gate.batch_sequences, scenario.gate.tokens_per_sequence
    full, rest = divmod(batch, mbs)
    return [mbs * tps] * full + ([rest * tps] if rest else [])


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


def train_gate(
    scenario: Scenario,
    strategy: StrategySpec,
    sample_steps: Sequence[int],
    seed_seq: np.random.SeedSequence,
) -> GateTrajectory:
    """Train every simulated layer's router for ``scenario.total_steps`` updates.

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
        Per-update records, the requested snapshots and the final routers.

    Notes
    -----
    Cost per update is a few (tokens × experts) passes per layer plus three (tokens × experts ×
    dim) products, and one more (the auxiliary weight gradient, kept apart for the
    interference) when the strategy has a loss; everything is float32 and vectorised.
    """
    moe, gate = scenario.model.moe, scenario.gate
    n_experts, top_k, dim = moe.routed_experts, moe.top_k, scenario.stream.dim
    n_layers, total_steps = gate.layers_simulated, scenario.total_steps
    wanted = {int(s) for s in sample_steps}
    bad = sorted(s for s in wanted if not 0 <= s <= total_steps)
    if bad:
        raise ValueError(f"sample_steps: {bad} outside 0..{total_steps}")

    stream_seed, teacher_seed, init_seed, data_seed = child_seeds(seed_seq, 4)
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
    states = [RouterState.initial(n_experts, dim, init_std, init_rng) for _ in range(n_layers)]
    optimizers = [_Adam((n_experts, dim), gate.learning_rate) for _ in range(n_layers)]
    data_rng = np.random.default_rng(data_seed)

    balancer = make_strategy(strategy)
    options = route_options(scenario)
    grouped = options["group_topk"] is not None and options["group_topk"] < options["n_groups"]
    score = options["score"]
    context = balance_context(scenario)
    tokens_per_step = scenario.tokens_per_step
    n_tokens = gate.batch_sequences * gate.tokens_per_sequence
    scope = balancer.bias_scope
    scope_sizes = None if scope in (None, "global") else context.scope_sizes(scope, n_tokens)
    micro = context.micro_sizes(n_tokens)

    trajectory = GateTrajectory(strategy=balancer.name, stream=stream)
    for step in range(total_steps):
        if step in wanted:
            trajectory.states[step] = [s.copy() for s in states]
        tokens_before = step * tokens_per_step
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
                x, state, **options, segments=micro, tokens_per_sequence=gate.tokens_per_sequence
            )
            choice = teacher.choice(x, top_k)
            target = choice.at(routing.selected)
            task, dtask = task_loss_and_grad(routing, target, row_sum(choice.weights**2), score)
            grad = dtask.T @ x
            aux, cos, ratio = 0.0, 0.0, 0.0
            if balancer.has_loss:
                plain = None if grouped or state.bias.any() else routing.selected
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
                teacher_capture(target),
                cos,
                ratio,
                float(np.abs(state.bias).mean(dtype=np.float64)),
            )
        sums /= n_layers
        trajectory.records.append(
            {
                "step": step,
                "tokens": (step + 1) * tokens_per_step,
                "maxvio_batch": float(sums[0]),
                "task_loss": float(sums[1]),
                "aux_loss": float(sums[2]),
                "teacher_capture": float(sums[3]),
                "interference_cos": float(sums[4]),
                "interference_ratio": float(sums[5]),
                "bias_abs_mean": float(sums[6]),
                "gamma": balancer.gamma_at(tokens_before),
            }
        )
    if total_steps in wanted:
        trajectory.states[total_steps] = [s.copy() for s in states]
    trajectory.final = [s.copy() for s in states]
    return trajectory
