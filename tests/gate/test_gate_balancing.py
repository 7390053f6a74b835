"""Balancing strategies: the loss-free sign rule and the registry (routing.md §2.2, §6.3)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.gate.balancing import (
    STRATEGIES,
    AuxLossStrategy,
    LossFreeStrategy,
    NoBalancingStrategy,
    make_strategy,
    sign_rule_update,
)
from moesim.gate.router import RouterState, route
from moesim.scenario.strategies import AuxLoss, LossFree, NoBalancing


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


def test_registry_covers_every_schema_kind() -> None:
    assert set(STRATEGIES) == {"none", "aux_loss", "loss_free"}
    assert isinstance(make_strategy(NoBalancing(kind="none")), NoBalancingStrategy)
    assert isinstance(make_strategy(AuxLoss(kind="aux_loss", alpha=0.1)), AuxLossStrategy)
    lf = make_strategy(LossFree(kind="loss_free", gamma=0.5, name="lf"))
    assert isinstance(lf, LossFreeStrategy)
    assert lf.name == "lf"


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
    kwargs = {"score": score, "top_k": 2, "micro_batches": 4}
    assert make_strategy(NoBalancing(kind="none")).loss_and_grad(routing, **kwargs) == (0.0, None)  # type: ignore[arg-type]
    assert make_strategy(LossFree(kind="loss_free")).loss_and_grad(routing, **kwargs) == (0.0, None)  # type: ignore[arg-type]
    loss, grad = make_strategy(AuxLoss(kind="aux_loss", alpha=0.1)).loss_and_grad(routing, **kwargs)  # type: ignore[arg-type]
    assert loss > 0
    assert grad is not None
    assert grad.shape == (64, 8)
    assert grad.dtype == np.float32
    zero = make_strategy(AuxLoss(kind="aux_loss", alpha=0.0)).loss_and_grad(routing, **kwargs)  # type: ignore[arg-type]
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
    a = aux.loss_and_grad(plain, score="sigmoid", top_k=2, micro_batches=1)
    b = aux.loss_and_grad(biased, score="sigmoid", top_k=2, micro_batches=1)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])  # type: ignore[arg-type]
