"""Balancing strategies: bias rules and scopes, the γ schedule, composites, interference, and the
one strategy form every scenario kind builds (loss-free balancing, arXiv 2408.15664; global-batch
balancing, arXiv 2501.11873)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.gate.balancing import (
    BIAS_RULES,
    BalanceContext,
    BalancingStrategy,
    grouped_counts,
    interference,
    make_strategy,
    multiplicative_rule_update,
    proportional_rule_update,
    sign_rule_update,
)
from moesim.gate.router import RouterState, route
from moesim.gate.teacher import TeacherChoice, task_loss_and_grad
from moesim.scenario.strategies import (
    AuxLoss,
    Bias,
    Composite,
    GammaStage,
    LossFree,
    LossTerm,
    NoBalancing,
)


def test_sign_rule_moves_each_bias_the_right_way() -> None:
    """Overloaded down by exactly γ, underloaded up by γ, at the mean unchanged."""
    gamma = 1e-3
    counts = np.array([10, 30, 20, 20, 0, 40], dtype=np.int64)  # mean 20
    bias = np.zeros(6, dtype=np.float32)
    sign_rule_update(bias, counts, gamma)
    g = np.float32(gamma)
    np.testing.assert_array_equal(bias, np.array([g, -g, 0, 0, g, -g], dtype=np.float32))
    assert bias.dtype == np.float32


def test_sign_rule_step_size_is_independent_of_imbalance() -> None:
    start = np.linspace(-0.5, 0.5, 4).astype(np.float32)
    slightly = start.copy()
    hugely = start.copy()
    sign_rule_update(slightly, [99, 101, 100, 100], 0.01)
    sign_rule_update(hugely, [0, 400, 0, 0], 0.01)
    np.testing.assert_allclose(slightly - start, [0.01, -0.01, 0, 0], atol=1e-7)
    np.testing.assert_allclose(hugely - start, [0.01, -0.01, 0.01, 0.01], atol=1e-7)


def test_every_schema_kind_builds_one_strategy_form() -> None:
    """Every kind is the same class, built from the entry's composite form."""
    assert not make_strategy(Composite(kind="composite")).has_loss
    none = make_strategy(NoBalancing(kind="none"))
    assert not none.has_loss
    assert none.bias is None
    aux = make_strategy(AuxLoss(kind="aux_loss", alpha=0.1))
    assert aux.has_loss
    assert aux.bias is None
    assert aux.losses[0].alpha == 0.1
    lf = make_strategy(LossFree(kind="loss_free", gamma=0.5, name="lf"))
    assert not lf.has_loss
    assert lf.bias is not None
    assert lf.gamma_at(0.0) == 0.5
    assert lf.name == "lf"
    assert all(type(s) is BalancingStrategy for s in (none, aux, lf))


def test_only_loss_free_touches_the_bias(rng: np.random.Generator) -> None:
    state = RouterState.initial(8, 4, 1.0, rng)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    routing = route(x, state, 2, "sigmoid", True, 1.0)
    counts = np.bincount(routing.selected.ravel(), minlength=8)
    for spec in (NoBalancing(kind="none"), AuxLoss(kind="aux_loss", alpha=0.1)):
        strategy = make_strategy(spec)
        before = state.copy()
        strategy.after_step(state, counts)
        np.testing.assert_array_equal(state.bias, before.bias)
    lf = make_strategy(LossFree(kind="loss_free", gamma=0.25))
    lf.after_step(state, counts)
    expected = np.float32(0.25) * np.sign(counts.mean() - counts).astype(np.float32)
    np.testing.assert_array_equal(state.bias, expected)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_strategy_losses(rng: np.random.Generator, score: str) -> None:
    state = RouterState.initial(8, 4, 1.0, rng)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    routing = route(x, state, 2, score, True, 1.0)  # type: ignore[arg-type]
    ctx = BalanceContext(score=score, top_k=2, tokens_per_sequence=16, micro_batches=4)  # type: ignore[arg-type]
    assert make_strategy(NoBalancing(kind="none")).loss_and_grad(routing, ctx) == (0.0, None)
    assert make_strategy(LossFree(kind="loss_free")).loss_and_grad(routing, ctx) == (0.0, None)
    loss, grad = make_strategy(AuxLoss(kind="aux_loss", alpha=0.1)).loss_and_grad(routing, ctx)
    assert loss > 0
    assert grad is not None
    assert grad.shape == (64, 8)
    assert grad.dtype == np.float32
    zero = make_strategy(AuxLoss(kind="aux_loss", alpha=0.0)).loss_and_grad(routing, ctx)
    assert zero == (0.0, None)


def test_aux_counts_ignore_the_bias(rng: np.random.Generator) -> None:
    """f_i comes from the unbiased plain top-k even when the routing used a bias (§6.2 item 5)."""
    state = RouterState.initial(8, 4, 1.0, rng)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    plain = route(x, state, 2, "sigmoid", True, 1.0)
    state.bias[:] = np.linspace(-1, 1, 8, dtype=np.float32)
    biased = route(x, state, 2, "sigmoid", True, 1.0)
    assert not np.array_equal(np.sort(plain.selected, 1), np.sort(biased.selected, 1))
    aux = make_strategy(AuxLoss(kind="aux_loss", alpha=0.1))
    ctx = BalanceContext(score="sigmoid", top_k=2, tokens_per_sequence=64)
    a = aux.loss_and_grad(plain, ctx)
    b = aux.loss_and_grad(biased, ctx)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- bias rules


def test_proportional_rule_moves_by_the_relative_error() -> None:
    """b += γ·(c̄ − c)/c̄: direction as the sign rule, size ∝ the relative error, and the same
    step for the same relative loads whatever the batch size."""
    counts = np.array([10, 30, 20, 20, 0, 40])  # mean 20
    bias = np.zeros(6, dtype=np.float32)
    proportional_rule_update(bias, counts, 0.1)
    np.testing.assert_allclose(bias, 0.1 * np.array([0.5, -0.5, 0, 0, 1, -1]), atol=1e-7)
    assert bias.dtype == np.float32
    bigger = np.zeros(6, dtype=np.float32)
    proportional_rule_update(bigger, counts * 1000, 0.1)
    np.testing.assert_allclose(bigger, bias, rtol=1e-6)
    empty = np.zeros(3, dtype=np.float32)
    proportional_rule_update(empty, [0, 0, 0], 0.1)
    assert not empty.any()


def test_multiplicative_rule_moves_factors_relatively() -> None:
    factors = np.array([1.0, 1.0, 2.0, 0.5], dtype=np.float32)
    multiplicative_rule_update(factors, [5, 15, 10, 10], 0.1)  # mean 10
    np.testing.assert_allclose(factors, [1.1, 0.9, 2.0, 0.5], rtol=1e-6)
    for _ in range(200):  # a persistently overloaded expert decays but stays positive
        multiplicative_rule_update(factors, [0, 40, 0, 0], 0.1)
    assert 0 < factors[1] < 1e-8
    assert "multiplicative" not in BIAS_RULES  # a bias mode (bias.mode: mul), not a rule


def test_grouped_sign_rule_averages_the_groups() -> None:
    """Expert 0 is overloaded in the whole batch (one micro-batch sends it everything) but
    underloaded in two micro-batches of three: global scope pushes it down, micro-batch scope
    (the mean of per-group updates) pushes it up."""
    groups = np.array([[10, 0, 5, 5], [4, 6, 5, 5], [4, 6, 5, 5]])
    whole = np.zeros(4, dtype=np.float32)
    sign_rule_update(whole, groups.sum(axis=0), 0.3)
    np.testing.assert_allclose(whole, [-0.3, 0.3, 0, 0], atol=1e-7)
    local = np.zeros(4, dtype=np.float32)
    sign_rule_update(local, groups, 0.3)
    np.testing.assert_allclose(local, [0.1, -0.1, 0, 0], atol=1e-7)
    # One group is the plain rule.
    one = np.zeros(4, dtype=np.float32)
    sign_rule_update(one, groups[:1], 0.3)
    np.testing.assert_allclose(one, [-0.3, 0.3, 0, 0], atol=1e-7)
    # The proportional rule is linear: equal groups give the global update.
    prop_whole, prop_local = np.zeros(4, np.float32), np.zeros(4, np.float32)
    proportional_rule_update(prop_whole, groups.sum(axis=0), 0.3)
    proportional_rule_update(prop_local, groups, 0.3)
    np.testing.assert_allclose(prop_local, prop_whole, atol=1e-7)


def test_scope_counts(rng: np.random.Generator) -> None:
    """Global, micro-batch and rank groups of one batch: the groups' loads add up to the whole."""
    selected = rng.integers(0, 8, (48, 2))
    ctx = BalanceContext(
        score="sigmoid", top_k=2, tokens_per_sequence=4, micro_batches=(8, 8, 8, 8, 16), ranks=2
    )
    whole = ctx.scope_sizes("global", 48)
    micro = ctx.scope_sizes("micro_batch", 48)
    ranks = ctx.scope_sizes("rank", 48)
    assert whole.tolist() == [48]
    assert micro.tolist() == [8, 8, 8, 8, 16]
    assert ranks.tolist() == [24, 24]  # micro-batches dealt in contiguous blocks
    per_micro = grouped_counts(selected, 8, micro)
    assert per_micro.shape == (5, 8)
    np.testing.assert_array_equal(per_micro.sum(axis=0), np.bincount(selected.ravel(), minlength=8))
    np.testing.assert_array_equal(per_micro[0], np.bincount(selected[:8].ravel(), minlength=8))
    np.testing.assert_array_equal(
        grouped_counts(selected, 8, ranks)[1], np.bincount(selected[24:].ravel(), minlength=8)
    )
    assert BalanceContext("sigmoid", 2, 4, micro_batches=3, ranks=8).rank_sizes(12).tolist() == [
        4,
        4,
        4,
    ]
    with pytest.raises(ValueError, match="scope"):
        ctx.scope_sizes("node", 48)


def test_schedule_sets_gamma_by_tokens_before_the_step() -> None:
    bias = Bias(
        gamma=0.0,
        schedule=[
            GammaStage(until_tokens=100, gamma=1e-2),
            GammaStage(until_tokens=300, gamma=1e-3),
        ],
    )
    assert [bias.gamma_at(t) for t in (0, 99, 100, 299, 300, 1e9)] == [
        1e-2,
        1e-2,
        1e-3,
        1e-3,
        0.0,
        0.0,
    ]
    assert Bias(gamma=5e-3).gamma_at(1e12) == 5e-3
    strategy = make_strategy(Composite(kind="composite", bias=bias))
    state = RouterState(
        weights=np.zeros((4, 2), dtype=np.float32), bias=np.zeros(4, dtype=np.float32)
    )
    strategy.after_step(state, [1, 3, 2, 2], tokens=50)
    np.testing.assert_allclose(state.bias, [1e-2, -1e-2, 0, 0], atol=1e-8)
    strategy.after_step(state, [1, 3, 2, 2], tokens=300)  # γ = 0: frozen
    np.testing.assert_allclose(state.bias, [1e-2, -1e-2, 0, 0], atol=1e-8)
    assert strategy.gamma_at(150) == 1e-3
    assert make_strategy(AuxLoss(kind="aux_loss")).gamma_at(0) == 0.0


def test_shorthands_are_composites() -> None:
    """aux_loss and loss_free build the same strategy object as the composite they abbreviate."""
    for scope, kind in (("micro_batch", "switch"), ("sequence", "sequence"), ("global", "global")):
        spec = AuxLoss(kind="aux_loss", alpha=0.2, scope=scope, name="a")  # type: ignore[arg-type]
        strategy = make_strategy(spec)
        assert strategy.losses == (LossTerm(kind=kind, alpha=0.2),)  # type: ignore[arg-type]
        assert strategy.bias is None
        assert strategy.has_loss
        assert strategy.name == "a"
    lf = make_strategy(LossFree(kind="loss_free", gamma=0.02))
    assert lf.losses == ()
    assert lf.bias == Bias(rule="sign", gamma=0.02, scope="global")
    assert lf.bias_scope == "global"
    none = make_strategy(NoBalancing(kind="none"))
    assert (none.losses, none.bias, none.bias_scope) == ((), None, None)
    v3 = make_strategy(
        Composite(
            kind="composite",
            losses=[LossTerm(kind="sequence", alpha=1e-4), LossTerm(kind="z_loss", alpha=0.0)],
            bias=Bias(),
        )
    )
    assert v3.losses == (LossTerm(kind="sequence", alpha=1e-4),)  # α = 0 terms are dropped
    assert v3.bias is not None


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_composite_strategy_adds_its_terms(rng: np.random.Generator, score: str) -> None:
    state = RouterState.initial(8, 4, 1.0, rng)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    routing = route(x, state, 2, score, True, 1.0)  # type: ignore[arg-type]
    ctx = BalanceContext(score=score, top_k=2, tokens_per_sequence=16, micro_batches=4, devices=4)  # type: ignore[arg-type]
    terms = [LossTerm(kind="sequence", alpha=0.1), LossTerm(kind="device", alpha=0.05)]
    both = make_strategy(Composite(kind="composite", losses=terms)).loss_and_grad(routing, ctx)
    one = [
        make_strategy(Composite(kind="composite", losses=[t])).loss_and_grad(routing, ctx)
        for t in terms
    ]
    assert both[0] == pytest.approx(one[0][0] + one[1][0], rel=1e-5)
    np.testing.assert_allclose(both[1], one[0][1] + one[1][1], rtol=1e-4, atol=1e-9)  # type: ignore[operator]


# --------------------------------------------------------------------------- interference


def test_interference_helper() -> None:
    g = np.array([[1.0, -2.0], [0.5, 3.0]])
    assert interference(2 * g, g) == pytest.approx((1.0, 2.0))
    assert interference(-0.5 * g, g) == pytest.approx((-1.0, 0.5))
    assert interference(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx((0.0, 1 / 3))
    assert interference(None, g) == (0.0, 0.0)
    assert interference(np.zeros(4), g) == (0.0, 0.0)
    assert interference(g, np.zeros((2, 2))) == (0.0, float("inf"))


def test_aux_loss_fights_the_task_when_the_teacher_wants_the_busiest_expert() -> None:
    """Every token is the same: logits (3, 2, 0, 0) under softmax, top-2 selects {0, 1} for all,
    so both are overloaded; the teacher weights expert 0 at 0.9 (its second choice, expert 2, is
    not selected). The task gradient raises z_0 and lowers z_1 (towards w_0 = 0.9); the aux loss
    lowers both in proportion to their probability, z_0 most. A step down the aux loss therefore
    climbs the task loss: the cosine between the two weight gradients is negative."""
    dim = 3
    x = np.tile(np.array([[1.0, 0.0, 0.0]]), (8, 1))
    weights = np.zeros((4, dim))
    weights[:, 0] = [3.0, 2.0, 0.0, 0.0]
    state = RouterState(weights=weights, bias=np.zeros(4))
    routing = route(x, state, 2, "softmax", True, 1.0)
    choice = TeacherChoice(
        experts=np.tile(np.array([[0, 2]]), (8, 1)), weights=np.tile([[0.9, 0.1]], (8, 1))
    )
    _, dtask = task_loss_and_grad(
        routing, choice.at(routing.selected), (choice.weights**2).sum(axis=1), "softmax"
    )
    ctx = BalanceContext(score="softmax", top_k=2, tokens_per_sequence=8)
    strategy = make_strategy(AuxLoss(kind="aux_loss", alpha=0.01))
    _, daux = strategy.loss_and_grad(routing, ctx)
    assert daux is not None
    assert dtask[0, 0] < 0 < dtask[0, 1]  # the task wants z_0 up, z_1 down
    assert 0 < daux[0, 1] < daux[0, 0]  # the aux loss wants both down, z_0 more
    cos, ratio = interference(daux.T @ x, dtask.T @ x)
    # Identical tokens: the weight gradients are outer products with x, so their cosine is the
    # cosine of the summed logit gradients.
    a, b = daux.sum(axis=0), dtask.sum(axis=0)
    assert cos == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert cos < -0.1
    assert ratio == pytest.approx(np.linalg.norm(a) / np.linalg.norm(b))
    # Twice α: the same direction, twice the norm.
    double = make_strategy(AuxLoss(kind="aux_loss", alpha=0.02)).loss_and_grad(routing, ctx)[1]
    assert interference(double.T @ x, dtask.T @ x) == pytest.approx((cos, 2 * ratio))  # type: ignore[union-attr]
