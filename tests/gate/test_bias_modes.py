"""The multiplicative bias (docs/model/gate.md) and re-centring of the additive bias."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from moesim.errors import ScenarioError
from moesim.gate import train_gate
from moesim.gate.balancing import make_strategy, recenter_bias
from moesim.gate.router import RouterState, apply_bias, route, select_experts
from moesim.gate.sampling import routing_sample
from moesim.gate.training import routed_loads
from moesim.scenario import scenario_from_dict
from moesim.scenario.strategies import Bias, Composite, LossFree, NoBalancing

STEPS = 600


@pytest.fixture(scope="module")
def behaviour(make_scenario):  # type: ignore[no-untyped-def]
    """The small balancing set-up of test_training_balancing.py: 16 experts top-2, 64 × 32
    tokens per update, one layer, 600 updates; trained without balancing and with each bias.

    Without the stream's common direction: with it (the default) an expert starved early has a
    sigmoid score near 0 for every token, which a multiplicative bias ``s·b`` hardly lifts, and
    the multiplicative run balanced far less in 600 updates (MaxVio_batch 0.77 against 1.02
    without balancing, where the additive bias reaches about 0.2)."""
    scenario = make_scenario(
        gate={"batch_sequences": 64, "tokens_per_sequence": 32, "layers_simulated": 1},
        stream={"dim": 32, "common": 0.0},
        training={"total_tokens": STEPS * 64 * 1024},
    )
    runs = {
        "none": NoBalancing(kind="none"),
        "add": LossFree(kind="loss_free", gamma=1e-3),
        "mul": LossFree(kind="loss_free", gamma=1e-3, bias_mode="mul"),
        "recentred": LossFree(kind="loss_free", gamma=1e-3, recenter=True),
    }
    seed = np.random.SeedSequence(11)
    return scenario, {n: train_gate(scenario, s, [0, STEPS], seed) for n, s in runs.items()}


def _final(trajectory, key: str = "maxvio_batch", window: int = 50) -> float:  # type: ignore[no-untyped-def]
    return float(trajectory.column(key)[-window:].mean())


# --------------------------------------------------------------------------- multiplicative


def test_multiplicative_selection_uses_the_product(rng: np.random.Generator) -> None:
    state = RouterState.initial(32, 8, 1.0, rng, bias_mode="mul")
    assert state.bias_mode == "mul"
    assert (state.bias == 1).all()
    assert not state.biased
    x = rng.standard_normal((200, 8)).astype(np.float32)
    plain = route(x, state, 4, "sigmoid", True, 1.0)
    reference = np.sort(np.argsort(-plain.scores, axis=1)[:, :4], axis=1)
    np.testing.assert_array_equal(np.sort(plain.selected, axis=1), reference)

    state.bias[:] = rng.uniform(0.5, 1.5, 32).astype(np.float32)
    assert state.biased
    routing = route(x, state, 4, "sigmoid", True, 2.5)
    product = np.sort(np.argsort(-(routing.scores * state.bias), axis=1)[:, :4], axis=1)
    np.testing.assert_array_equal(np.sort(routing.selected, axis=1), product)
    additive = np.sort(np.argsort(-(routing.scores + state.bias), axis=1)[:, :4], axis=1)
    assert not np.array_equal(product, additive)
    # Selection only: the gates are the unbiased scores at the choice, renormalised and scaled.
    chosen = np.take_along_axis(routing.scores, routing.selected, axis=1)
    expected = 2.5 * chosen / chosen.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(routing.gates, expected, rtol=1e-5)
    # The mode can be overridden per call; the state's is the default.
    add = route(x, state, 4, "sigmoid", True, 1.0, bias_mode="add")
    np.testing.assert_array_equal(np.sort(add.selected, axis=1), additive)


def test_multiplicative_group_limited_selection(rng: np.random.Generator) -> None:
    scores = rng.uniform(0.05, 1.0, (300, 32)).astype(np.float32)
    bias = rng.uniform(0.5, 1.5, 32).astype(np.float32)
    grouped = select_experts(scores, bias, 8, 8, 4, bias_mode="mul")
    np.testing.assert_array_equal(grouped, select_experts(scores * bias, None, 8, 8, 4))
    np.testing.assert_array_equal(apply_bias(scores, np.ones(32, np.float32), "mul"), scores)
    with pytest.raises(ValueError, match="bias_mode"):
        apply_bias(scores, bias, "pow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bias_mode"):
        RouterState(weights=np.zeros((2, 2), np.float32), bias=bias[:2], bias_mode="pow")  # type: ignore[arg-type]


def test_multiplicative_state_keeps_its_mode(rng: np.random.Generator) -> None:
    add = RouterState.initial(16, 4, 1.0, np.random.default_rng(3))
    mul = RouterState.initial(16, 4, 1.0, np.random.default_rng(3), bias_mode="mul")
    np.testing.assert_array_equal(add.weights, mul.weights)  # the bias draws nothing
    assert (add.bias == 0).all()
    clone = mul.copy()
    assert clone.bias_mode == "mul"
    clone.bias[0] = 2.0
    assert mul.bias[0] == 1.0


def test_multiplicative_strategy_update_and_mode_check() -> None:
    strategy = make_strategy(LossFree(kind="loss_free", gamma=0.1, bias_mode="mul"))
    assert strategy.bias_mode == "mul"
    state = RouterState(
        weights=np.zeros((4, 2), np.float32), bias=np.ones(4, np.float32), bias_mode="mul"
    )
    strategy.after_step(state, [1, 3, 2, 2])
    np.testing.assert_allclose(state.bias, [1.1, 0.9, 1.0, 1.0], rtol=1e-6)
    strategy.after_step(state, [1, 3, 2, 2])
    np.testing.assert_allclose(state.bias, [1.21, 0.81, 1.0, 1.0], rtol=1e-6)
    additive = RouterState(weights=np.zeros((4, 2), np.float32), bias=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="bias_mode"):
        strategy.after_step(additive, [1, 3, 2, 2])
    with pytest.raises(ValueError, match="bias_mode"):
        make_strategy(LossFree(kind="loss_free")).after_step(state, [1, 3, 2, 2])


def test_multiplicative_training_starts_at_one_and_balances(behaviour) -> None:  # type: ignore[no-untyped-def]
    _, runs = behaviour
    mul = runs["mul"]
    assert all(s.bias_mode == "mul" and (s.bias == 1).all() for s in mul.states[0])
    final = mul.final[0]
    assert final.bias_mode == "mul"
    assert (final.bias > 0).all()
    assert final.biased
    # Same seed: the same initial weights as the additive run.
    np.testing.assert_array_equal(mul.states[0][0].weights, runs["add"].states[0][0].weights)
    none = _final(runs["none"])
    assert _final(mul) < 0.3 * none, (_final(mul), none)
    # Near b = 1 the relative step is the additive one (§2.5 Table 4: balance on a par).
    assert _final(mul) < 1.5 * _final(runs["add"])
    last = np.abs(final.bias - 1).mean()
    assert mul.records[-1]["bias_abs_mean"] == pytest.approx(last)


def test_routing_sample_routes_with_the_state_mode(behaviour) -> None:  # type: ignore[no-untyped-def]
    scenario, runs = behaviour
    mul = runs["mul"]
    states = mul.final
    sample = routing_sample(scenario, states, mul.stream, STEPS, 8, 8, np.random.default_rng(1))
    flipped = [RouterState(s.weights, s.bias, "add") for s in states]
    other = routing_sample(scenario, flipped, mul.stream, STEPS, 8, 8, np.random.default_rng(1))
    assert not np.array_equal(sample.counts, other.counts)
    assert sample.metrics["maxvio_batch"] < other.metrics["maxvio_batch"]


# --------------------------------------------------------------------------- schema


@pytest.fixture
def raw_with(tiny_dict: dict[str, Any]):  # type: ignore[no-untyped-def]
    def build(*extra: dict[str, Any], score: str = "sigmoid") -> dict[str, Any]:
        raw = dict(tiny_dict)
        raw["strategies"] = [*tiny_dict["strategies"][:1], *extra]
        raw["router"] = {"score": score}
        return raw

    return build


@pytest.mark.parametrize(
    ("strategy", "path", "words"),
    [
        (
            {"kind": "composite", "bias": {"mode": "mul", "rule": "proportional"}},
            "strategies[1].bias.rule",
            "sign rule only",
        ),
        (
            {"kind": "composite", "bias": {"mode": "mul", "gamma": 1.0}},
            "strategies[1].bias.gamma",
            "below 1",
        ),
        (
            {
                "kind": "composite",
                "bias": {
                    "mode": "mul",
                    "gamma": 0.0,
                    "schedule": [{"until_tokens": 1e9, "gamma": 2.0}],
                },
            },
            "strategies[1].bias.schedule[0].gamma",
            "below 1",
        ),
        (
            {"kind": "composite", "bias": {"mode": "mul", "recenter": True}},
            "strategies[1].bias.recenter",
            "additive",
        ),
        ({"kind": "composite", "bias": {"mode": "product"}}, "strategies[1].bias.mode", ""),
        (
            {"kind": "loss_free", "bias_mode": "mul", "gamma": 1.5},
            "strategies[1].gamma",
            "below 1",
        ),
        (
            {"kind": "loss_free", "bias_mode": "mul", "recenter": True},
            "strategies[1].recenter",
            "bias_mode add",
        ),
        ({"kind": "loss_free", "bias_mode": "sub"}, "strategies[1].bias_mode", ""),
    ],
)
def test_nonsense_bias_combinations_are_refused(raw_with, strategy, path, words) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(raw_with(strategy))
    assert info.value.path == path
    assert words in info.value.message


def test_bias_options_validate(raw_with) -> None:  # type: ignore[no-untyped-def]
    scenario = scenario_from_dict(
        raw_with(
            {"name": "m", "kind": "loss_free", "bias_mode": "mul", "gamma": 1e-2},
            {"name": "r", "kind": "loss_free", "recenter": True},
            {"name": "c", "kind": "composite", "bias": {"mode": "mul", "scope": "micro_batch"}},
        )
    )
    m, r, c = scenario.strategies[1:]
    assert m.canonical().bias == Bias(rule="sign", gamma=1e-2, mode="mul")
    assert r.canonical().bias == Bias(rule="sign", gamma=1e-3, recenter=True)
    assert isinstance(c, Composite)
    assert c.bias is not None
    assert c.bias.mode == "mul"
    assert Bias().mode == "add"
    assert not Bias().recenter
    # A multiplicative sign step moves a softmax logit by ln(1 ± γ) whatever the other scores,
    # so unlike the additive sign rule it is accepted with a softmax router.
    scenario_from_dict(raw_with({"kind": "loss_free", "bias_mode": "mul"}, score="softmax"))
    with pytest.raises(ScenarioError, match="sigmoid"):
        scenario_from_dict(raw_with({"kind": "loss_free"}, score="softmax"))


# --------------------------------------------------------------------------- re-centring


@pytest.mark.parametrize(("n_groups", "group_topk"), [(1, None), (8, 4), (8, 1)])
def test_recentring_keeps_every_selection(n_groups: int, group_topk: int | None) -> None:
    """A common shift of the bias changes no selection, group-limited or not. The scores and
    biases lie on a dyadic grid, so every sum is exact in float32 and the comparison is of the
    selections alone (ties included: they break the same way)."""
    rng = np.random.default_rng(7)
    scores = (rng.integers(1, 256, (2000, 64)) / 256).astype(np.float32)
    drifted = (rng.integers(-64, 64, 64) / 1024 + 12.25).astype(np.float32)
    centred = drifted.copy()
    recenter_bias(centred)
    assert abs(float(centred.mean(dtype=np.float64))) < 1e-6
    np.testing.assert_array_equal(centred, drifted - np.float32(drifted.mean(dtype=np.float64)))
    a = select_experts(scores, drifted, 8, n_groups, group_topk)
    b = select_experts(scores, centred, 8, n_groups, group_topk)
    np.testing.assert_array_equal(a, b)


def test_recentring_differs_only_at_rounding_ties() -> None:
    """On ordinary float32 scores a drifted bias (+12) rounds ``s + b`` to about 1e-6: any token
    whose selection changes on re-centring has its k-th and (k+1)-th scores that close."""
    rng = np.random.default_rng(8)
    scores = (1 / (1 + np.exp(-rng.standard_normal((20000, 64))))).astype(np.float32)
    spread = rng.normal(0, 0.05, 64)
    drifted = (spread + 12.0).astype(np.float32)
    centred = drifted.copy()
    recenter_bias(centred)
    a = np.sort(select_experts(scores, drifted, 8), axis=1)
    b = np.sort(select_experts(scores, centred, 8), axis=1)
    exact = np.sort(scores.astype(np.float64) + centred.astype(np.float64), axis=1)
    margin = exact[:, -8] - exact[:, -9]
    changed = np.flatnonzero((a != b).any(axis=1))
    assert changed.size < 0.01 * scores.shape[0]
    assert (margin[changed] < 4 * np.spacing(np.float32(13.0))).all()


def test_recentring_holds_the_mean_bias_at_zero(make_scenario) -> None:  # type: ignore[no-untyped-def]
    """Over a long run the sign rule drifts the mean bias; re-centred it stays at 0 (rounding),
    the bias keeps its spread, and the balance is as good."""
    steps = 3000
    scenario = make_scenario(
        gate={"batch_sequences": 32, "tokens_per_sequence": 16, "layers_simulated": 1},
        stream={"dim": 16},
        training={"total_tokens": steps * 64 * 1024},
    )
    snaps = list(range(0, steps + 1, 250))
    seed = np.random.SeedSequence(5)
    drift = train_gate(scenario, LossFree(kind="loss_free", gamma=1e-2), snaps, seed)
    spec = LossFree(kind="loss_free", gamma=1e-2, recenter=True)
    centred = train_gate(scenario, spec, snaps, seed)
    means = [float(centred.states[s][0].bias.mean(dtype=np.float64)) for s in snaps]
    assert max(abs(m) for m in means) < 1e-6
    drifted = float(drift.final[0].bias.mean(dtype=np.float64))
    assert drifted > 0.5, drifted  # 50 sign steps' worth of common drift
    assert np.ptp(centred.final[0].bias) > 0.05
    none = train_gate(scenario, NoBalancing(kind="none"), [], seed)
    window = 500
    assert _final(centred, window=window) < 0.5 * _final(none, window=window)
    assert _final(centred, window=window) < 1.25 * _final(drift, window=window)


def test_recentred_training_balances_like_the_plain_bias(behaviour) -> None:  # type: ignore[no-untyped-def]
    _, runs = behaviour
    plain, centred = runs["add"], runs["recentred"]
    assert abs(float(centred.final[0].bias.mean(dtype=np.float64))) < 1e-6
    assert float(plain.final[0].bias.mean()) > 0.01  # the plain sign rule has drifted
    assert abs(_final(centred) - _final(plain)) < 0.25 * _final(plain)
    # The first updates route identically: while |b| ≤ 20γ the two float32 forms differ by
    # ~1e-9, far below any score gap these tokens are likely to have. (Later a rounding-level tie
    # can flip one choice and the two runs part, as any float32 perturbation would make them.)
    np.testing.assert_array_equal(
        centred.column("maxvio_batch")[:20], plain.column("maxvio_batch")[:20]
    )


def test_multiplicative_bias_under_coarsening(make_scenario, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
    """The bias steps of a coarsened gate select by s·b too: their counted loads are route()'s,
    and every step moves the factors."""
    state = RouterState.initial(64, 16, 0.5, rng, bias_mode="mul")
    state.bias[:] = rng.uniform(0.7, 1.3, 64).astype(np.float32)
    x = rng.standard_normal((96, 16)).astype(np.float32)
    routing = route(x, state, 6, "sigmoid", True, 1.0, 8, 3)
    selection = routing.scores * state.bias
    np.testing.assert_array_equal(routed_loads(selection, 6, 8, 3), routing.loads())
    # Float64 scores take the same path with their own work arrays.
    wide = routed_loads(selection.astype(np.float64), 6, 8, 3)
    np.testing.assert_array_equal(wide, routing.loads())

    scenario = make_scenario(
        gate={
            "batch_sequences": 8,
            "tokens_per_sequence": 16,
            "layers_simulated": 1,
            "steps_per_update": 3,
            "bias_batch_sequences": 3,
        },
        stream={"dim": 16},
        training={"total_tokens": 9 * 64 * 1024},
    )
    spec = LossFree(kind="loss_free", gamma=0.05, bias_mode="mul")
    a = train_gate(scenario, spec, [1, 2], np.random.SeedSequence(3))
    b = train_gate(scenario, spec, [1, 2], np.random.SeedSequence(3))
    assert a.records == b.records
    one, two = a.states[1][0].bias, a.states[2][0].bias
    assert not np.array_equal(one, two)  # step 1 is a bias step
    assert (a.final[0].bias > 0).all()
    steps = np.log(a.final[0].bias.astype(np.float64)) / np.log1p(0.05)
    assert np.abs(steps).max() <= scenario.total_steps + 1e-6
