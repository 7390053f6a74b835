"""Scenario sections for load-balancing strategies (arXiv 2408.15664; Megatron-LM
megatron/core/transformer/moe/router.py; docs/model/gate.md).

A scenario lists the strategies to compare. Four kinds are accepted; the first three are
shorthands for the general ``composite`` and build the same strategy object
(:meth:`canonical`), so the gate has one implementation of every loss and bias rule.

``none``
    No balancing.
``aux_loss``
    One auxiliary loss ``α·N·Σ_i f_i·P_i``. ``scope`` picks where ``f`` and ``P`` are counted:
    ``micro_batch`` (default; Switch/GShard, Megatron ``aux_loss``, Switch, arXiv 2101.03961),
    ``sequence`` (DeepSeek-V3 Eqs. 17–20, arXiv 2412.19437) or ``global`` (f from the whole batch,
    Demons in
    the Detail, arXiv 2501.11873). Shorthand for ``composite`` with one loss of kind ``switch``,
    ``sequence``
    or ``global``.
``loss_free``
    The auxiliary-loss-free bias with the sign rule at global scope, ``gamma`` its step
    (arXiv 2408.15664 Algorithm 1). ``bias_mode: mul`` selects the multiplicative variant of arXiv
    2408.15664 Table 4 and ``recenter: true`` re-centres the additive bias (both below). Shorthand
    for
    ``composite`` with ``bias: {rule: sign, gamma: γ, mode: …, recenter: …}``.
``composite``
    Any sum of loss terms plus an optional bias. DeepSeek-V3 (DeepSeek-V3, arXiv 2412.19437 §2.1.2)
    is::

        {name: v3, kind: composite,
         losses: [{kind: sequence, alpha: 1.0e-4}],
         bias: {rule: sign, gamma: 0.0, schedule: [{until_tokens: 14.3e12, gamma: 1.0e-3}]}}

    (γ = 1e-3 for the first 14.3T tokens, then 0: the biases freeze for the last 500B.)

Loss terms (``losses[i].kind``; all with the gradient through ``P`` only, counts held constant):
``switch`` (micro-batch), ``sequence``, ``global`` (Switch, arXiv 2101.03961; DeepSeek-V3, arXiv
2412.19437 §2.1.2; arXiv 2501.11873; Megatron-LM megatron/core/transformer/moe/router.py),
``device`` and ``communication`` (DeepSeek-V2, arXiv 2405.04434 §2.2; devices are the
``parallelism.expert`` ranks
of an expert-parallel group, each holding a contiguous block of experts) and ``z_loss`` (ST-MoE,
arXiv 2202.08906).

Bias (``bias``): ``rule`` ``sign`` (``b_i += γ·sign(c̄ − c_i)``) or ``proportional`` (``b_i +=
γ·(c̄ − c_i)/c̄``, the error normalised by the mean load so γ is dimensionless and does not
depend on the batch size; arXiv 2408.15664 Table 3); ``scope`` of the counts: ``global`` (the
whole batch of the step, default, as Megatron-LM all-reduces the counts), ``micro_batch`` or
``rank``; ``schedule`` of γ
by tokens trained (below). The update always uses the loads of the step just taken and first
affects the next step (arXiv 2408.15664 Algorithm 1).

**Bias mode.** ``mode: add`` (default) selects experts by ``s + b`` with ``b`` starting at 0
(arXiv 2408.15664 Eq. 3, Eq. 3); ``mode: mul`` by ``s·b`` with ``b`` starting at 1, updated by the
relative sign step ``b_i ← b_i·(1 + γ·sign(c̄ − c_i))`` (arXiv 2408.15664 Table 4; the paper gives
the rates, not the form — a relative step keeps every factor positive). Either way the bias steers
selection only; the gates are the unbiased scores. ``mul`` takes the sign rule only and ``γ < 1``
(at ``γ ≥ 1`` an overloaded expert's factor would reach zero or below).

**Re-centring** (``recenter: true``, additive bias only). The sign rule's steps need not sum to
zero, so all biases can drift together (≈12 after 100k steps at γ = 1e-3), and at that size
float32 resolves ``s + b`` only to about 1e-6. After each update the mean bias is subtracted. A
shift common to all experts does not change any token's top-k, nor a group-limited choice: every
group's score, a sum of its ``max(1, k // group_topk)`` top biased scores, moves by the same
amount (Megatron-LM megatron/core/transformer/moe/router.py). So selection is unchanged in exact
arithmetic; in float32 the
re-centred sums are the *more* precise ones, and the two can differ only for tokens whose
selection scores tie to within the uncentred rounding. It also leaves the loads, losses and
gates alone (none reads the bias). Off by default, as in Megatron and DeepSeek-V3, whose float32
biases drift; the mean then stays at 0 up to rounding.

**γ schedule.** ``schedule`` is a list of stages ``{until_tokens: X_k, gamma: γ_k}`` with
increasing ``X_k``. The update that follows a step uses ``γ_k`` of the first stage with ``X_k``
greater than the tokens trained *before* that step; once every ``X_k`` is passed, ``gamma``
applies. So ``{gamma: 0, schedule: [{until_tokens: 1e9, gamma: 1e-3}]}`` updates with 1e-3 for
the steps that start before 1e9 tokens and freezes the bias afterwards. Without a schedule γ is
``gamma`` throughout.

A bias with the sign rule needs a sigmoid router: with softmax, the gap between two experts'
scores depends on every other expert's score, so a fixed-size step is mis-scaled (arXiv 2408.15664
App. C; Megatron-LM refuses it). :func:`check_strategies` enforces this across the
scenario. The multiplicative bias is exempt: ``s_i·b_i`` over a softmax is ``∝ exp(z_i + ln
b_i)``, so its relative step moves one expert's logit by ``ln(1 ± γ)`` whatever the others' scores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, ValidationInfo, WrapValidator, model_validator

from moesim.scenario.base import Frozen

if TYPE_CHECKING:
    from moesim.scenario.schema import Scenario

Coefficient = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
"""A balancing coefficient (α, γ): published configs use at most 1e-1; 100 is far beyond any
useful value and keeps the gate's arithmetic finite."""
StrategyName = Annotated[str, Field(pattern=r"^[^\x00-\x1f\x7f$\\]{1,100}$")]
"""Strategy names label tables, plots and the trace: 1 to 100 characters, no control
characters, no '$' or backslash (Matplotlib would read them as TeX)."""
LossKind = Literal["switch", "sequence", "global", "device", "communication", "z_loss"]
AuxScope = Literal["micro_batch", "sequence", "global"]
BiasRule = Literal["sign", "proportional"]
BiasMode = Literal["add", "mul"]
BalanceScope = Literal["global", "micro_batch", "rank"]

# The aux_loss shorthand's scope → the loss term it stands for.
AUX_SCOPE_LOSS: dict[str, LossKind] = {
    "micro_batch": "switch",
    "sequence": "sequence",
    "global": "global",
}


class LossTerm(Frozen):
    """One auxiliary loss and its coefficient ``α`` (DeepSeek-V3, arXiv 2412.19437 §2.1.2;
    DeepSeek-V2, arXiv 2405.04434 §2.2; Switch, arXiv 2101.03961; ST-MoE, arXiv 2202.08906; arXiv
    2501.11873).

    - ``switch``: ``α·N·Σ f_i P_i`` per micro-batch, averaged over micro-batches;
    - ``sequence``: the same per sequence, averaged over sequences (V3 Eqs. 17–20);
    - ``global``: ``f`` from the whole batch, ``P`` per micro-batch;
    - ``device``: ``α·Σ_d f'_d P'_d`` per sequence (V2);
    - ``communication``: ``α·Σ_d f''_d P''_d`` per sequence (V2);
    - ``z_loss``: ``α·mean_t LSE(z_t)²`` (ST-MoE).

    Each is ``α`` at perfect balance, except ``z_loss`` (no balance point) and ``communication``
    (``α`` when every token reaches the device limit).
    """

    kind: LossKind
    alpha: Coefficient


class GammaStage(Frozen):
    """One stage of a γ schedule: ``gamma`` for the steps that start before ``until_tokens``."""

    until_tokens: Annotated[float, Field(gt=0, le=1e16)]
    gamma: Coefficient


class Bias(Frozen):
    """The auxiliary-loss-free selection bias and its update (arXiv 2408.15664 Algorithm 1; "
    "Megatron-LM megatron/core/distributed/finalize_model_grads.py)."""

    rule: BiasRule = "sign"
    gamma: Coefficient = Field(1e-3, description="update speed γ (after the schedule, if any)")
    scope: BalanceScope = Field(
        "global",
        description="loads the update counts: the whole step (global), each micro-batch, or "
        "each data-parallel rank's share; per-group updates are averaged",
    )
    schedule: list[GammaStage] | None = Field(
        None, max_length=256, min_length=1, description="γ stages by tokens trained before the step"
    )
    mode: BiasMode = Field(
        "add",
        description="selection by s + b with b from 0 (add) or by s·b with b from 1 (mul, "
        "arXiv 2408.15664 Table 4; sign rule, relative step γ < 1)",
    )
    recenter: bool = Field(
        False,
        description="subtract the mean bias after each update (additive bias only): the same "
        "selections, without the common drift that costs float32 resolution",
    )

    @model_validator(mode="after")
    def _check(self) -> Bias:
        stages = self.schedule or []
        for k in range(1, len(stages)):
            if stages[k].until_tokens <= stages[k - 1].until_tokens:
                raise ValueError(
                    f"schedule[{k}].until_tokens: {stages[k].until_tokens:g} does not exceed the "
                    f"previous stage's {stages[k - 1].until_tokens:g} (stages must increase)"
                )
        if self.mode == "mul":
            _check_multiplicative(self.rule, self.gamma, stages, self.recenter, "mode")
        return self

    def gamma_at(self, tokens: float) -> float:
        """γ for the update after a step that starts with ``tokens`` already trained."""
        for stage in self.schedule or ():
            if tokens < stage.until_tokens:
                return stage.gamma
        return self.gamma


def _check_multiplicative(
    rule: str, gamma: float, stages: list[GammaStage], recenter: bool, mode_field: str
) -> None:
    """Refuse what the multiplicative bias cannot do; each message starts with its field."""
    if rule != "sign":
        raise ValueError(
            f"rule: the multiplicative bias ({mode_field} mul, arXiv 2408.15664 Table 4) takes "
            f"the sign rule only, not {rule!r}"
        )
    if recenter:
        raise ValueError(
            f"recenter: re-centring shifts an additive bias; a multiplicative one has no common "
            f"shift to remove (use {mode_field} add, or recenter false)"
        )
    gammas = [("gamma", gamma)] + [(f"schedule[{k}].gamma", g.gamma) for k, g in enumerate(stages)]
    for path, value in gammas:
        if value >= 1:
            raise ValueError(
                f"{path}: {value:g} is not below 1; the multiplicative step b·(1 − γ) would take "
                "an overloaded expert's factor to zero or below"
            )


class Composite(Frozen):
    """Auxiliary losses (summed) and an optional loss-free bias, combined freely."""

    kind: Literal["composite"]
    name: StrategyName = "composite"
    losses: list[LossTerm] = Field(default_factory=list, max_length=16)
    bias: Bias | None = None

    @model_validator(mode="after")
    def _check(self) -> Composite:
        kinds = [term.kind for term in self.losses]
        twice = sorted({k for k in kinds if kinds.count(k) > 1})
        if twice:
            raise ValueError(
                f"losses: kind(s) {', '.join(twice)} listed twice (give one term per kind)"
            )
        return self

    def canonical(self) -> Composite:
        """This strategy (already in the general form)."""
        return self


class NoBalancing(Frozen):
    """No balancing: the router follows the task loss only."""

    kind: Literal["none"]
    name: StrategyName = "none"

    def canonical(self) -> Composite:
        """The equivalent composite: no loss, no bias."""
        return Composite(kind="composite", name=self.name)


class AuxLoss(Frozen):
    """One auxiliary loss ``α·N·Σ f_i·P_i`` (Switch, arXiv 2101.03961; DeepSeek-V3, arXiv "
    "2412.19437 §2.1.2; arXiv 2501.11873), by scope."""

    kind: Literal["aux_loss"]
    name: StrategyName = "aux_loss"
    alpha: Coefficient = 1e-3
    scope: AuxScope = Field(
        "micro_batch", description="where f and P are counted: micro_batch, sequence or global"
    )

    def canonical(self) -> Composite:
        """The equivalent composite: one ``switch``, ``sequence`` or ``global`` loss term."""
        term = LossTerm(kind=AUX_SCOPE_LOSS[self.scope], alpha=self.alpha)
        return Composite(kind="composite", name=self.name, losses=[term])


class LossFree(Frozen):
    """Auxiliary-loss-free bias balancing with the sign rule at global scope (arXiv 2408.15664
    Algorithm 1),
    additive (default) or multiplicative (arXiv 2408.15664 Table 4)."""

    kind: Literal["loss_free"]
    name: StrategyName = "loss_free"
    gamma: Coefficient = 1e-3
    bias_mode: BiasMode = Field(
        "add", description="select by s + b (add) or by s·b with b from 1 (mul; γ < 1)"
    )
    recenter: bool = Field(False, description="subtract the mean bias after each update (add)")

    @model_validator(mode="after")
    def _check(self) -> LossFree:
        if self.bias_mode == "mul":
            _check_multiplicative("sign", self.gamma, [], self.recenter, "bias_mode")
        return self

    def canonical(self) -> Composite:
        """The equivalent composite: a global-scope sign-rule bias with constant ``γ``."""
        bias = Bias(rule="sign", gamma=self.gamma, mode=self.bias_mode, recenter=self.recenter)
        return Composite(kind="composite", name=self.name, bias=bias)


StrategySpec = NoBalancing | AuxLoss | LossFree | Composite

STRATEGY_KINDS: dict[str, type[StrategySpec]] = {
    "none": NoBalancing,
    "aux_loss": AuxLoss,
    "loss_free": LossFree,
    "composite": Composite,
}


def _by_kind(value: Any, handler: Callable[[Any], Any], info: ValidationInfo) -> Any:
    """Validate a strategy mapping as the model its ``kind`` names.

    Dispatching here rather than through pydantic's tagged union keeps the tag out of error
    locations, so a bad field reads ``strategies[1].bias.gamma``.
    """
    if not isinstance(value, dict):
        return handler(value)
    kind = value.get("kind")
    model = STRATEGY_KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        known = ", ".join(STRATEGY_KINDS)
        got = "missing" if kind is None else f"unknown strategy kind {kind!r}"
        raise ValueError(f"kind: {got}; expected one of {known}")
    return model.model_validate(value, context=info.context)


Strategy = Annotated[StrategySpec, Field(discriminator="kind"), WrapValidator(_by_kind)]


def check_strategies(scenario: Scenario) -> None:
    """Cross-field checks of ``scenario.strategies`` against the router.

    Raises
    ------
    ValueError
        ``"strategies[i].bias.rule: …"`` (or ``strategies[i].kind`` for the ``loss_free``
        shorthand) when a sign-rule bias meets a softmax router: the score gap between two
        experts then depends on all other experts' scores, so a fixed-size sign step is
        mis-scaled (arXiv 2408.15664 App. C, which uses the proportional rule for softmax;
        Megatron forbids the bias with softmax). The multiplicative bias is exempt (module
        docstring).
    """
    if scenario.router.score != "softmax":
        return
    for i, spec in enumerate(scenario.strategies):
        bias = spec.canonical().bias
        if bias is None or bias.rule != "sign" or bias.mode == "mul":
            continue
        field = "kind" if spec.kind == "loss_free" else "bias.rule"
        where = f"strategies[{i}].{field}"
        fix = (
            "use kind: composite with bias: {rule: proportional}"
            if spec.kind == "loss_free"
            else "use rule: proportional"
        )
        raise ValueError(
            f"{where}: the sign rule needs router.score sigmoid; with softmax the score gap "
            f"between two experts depends on every other expert's score, so a fixed-size sign "
            f"step is mis-scaled (arXiv 2408.15664 App. C, Megatron forbids it); {fix}"
        )
