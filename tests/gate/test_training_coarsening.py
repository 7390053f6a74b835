"""Coarsened gate training (``gate.steps_per_update = k > 1``, moesim.gate.training).

Every optimizer step keeps its bias update and its Adam step; only the gradient is computed every
k-th step. The fidelity test compares the time-averaged MaxVio_batch of k = 1 and of the k the
DeepSeek-V3 benchmark uses (benchmarks/gate_speed.py), in DeepSeek-V3's regime of router
learning rate against bias speed (peak learning rate 2.2e-4, γ = 1e-3).
"""

from __future__ import annotations

import numpy as np
import pytest

from moesim.gate import train_gate
from moesim.gate.balancing import grouped_counts
from moesim.gate.router import RouterState, route, scores_from_logits, select_experts
from moesim.gate.training import GateTrajectory, bias_batch_sequences, routed_loads
from moesim.scenario.strategies import AuxLoss, Bias, Composite, LossFree

# The k of benchmarks/gate_speed.py, checked here against k = 1.
BENCHMARK_K = 16
V3_LEARNING_RATE = 2.2e-4


@pytest.fixture
def tiny(make_scenario):  # type: ignore[no-untyped-def]
    """12 steps of a 16-expert top-2 gate, 2 layers, a full update every 4 steps."""
    return make_scenario(
        gate={
            "batch_sequences": 8,
            "tokens_per_sequence": 16,
            "layers_simulated": 2,
            "steps_per_update": 4,
        },
        stream={"dim": 16},
        training={"total_tokens": 12 * 64 * 1024},
    )


def _with_gate(scenario, **gate):  # type: ignore[no-untyped-def]
    return scenario.model_copy(update={"gate": scenario.gate.model_copy(update=gate)})


# --------------------------------------------------------------------------- k = 1 unchanged


def test_one_step_per_update_is_the_default_and_ignores_the_bias_batch(tiny) -> None:  # type: ignore[no-untyped-def]
    seed = np.random.SeedSequence(2)
    spec = LossFree(kind="loss_free", gamma=0.01)
    plain = _with_gate(tiny, steps_per_update=1)
    assert type(tiny.gate)().steps_per_update == 1  # the schema default
    a = train_gate(plain, spec, [5], seed)
    b = train_gate(_with_gate(plain, bias_batch_sequences=2), spec, [5], seed)
    assert a.records == b.records
    assert [r["step"] for r in a.records] == list(range(12))
    assert a.steps_per_update == 1
    for x, y in zip(a.final, b.final, strict=True):
        np.testing.assert_array_equal(x.weights, y.weights)
        np.testing.assert_array_equal(x.bias, y.bias)


# --------------------------------------------------------------------------- records, updates


def test_records_every_kth_step(tiny) -> None:  # type: ignore[no-untyped-def]
    trajectory = train_gate(
        tiny, LossFree(kind="loss_free", gamma=0.01), [], np.random.SeedSequence(1)
    )
    assert trajectory.steps_per_update == 4
    assert [r["step"] for r in trajectory.records] == [0, 4, 8]
    assert [r["tokens"] for r in trajectory.records] == [
        (s + 1) * tiny.tokens_per_step for s in (0, 4, 8)
    ]
    assert trajectory.record_at(0) is trajectory.records[0]
    assert trajectory.record_at(7) is trajectory.records[1]
    assert trajectory.record_at(8) is trajectory.records[2]
    assert trajectory.record_at(11) is trajectory.records[2]
    assert trajectory.record_at(500) is trajectory.records[2]
    with pytest.raises(ValueError, match="no records"):
        GateTrajectory(strategy="x", stream=trajectory.stream).record_at(0)


def test_first_full_update_is_the_k1_update(tiny) -> None:  # type: ignore[no-untyped-def]
    """Step 0 is a full update on the same tokens with the same routers as at k = 1, and the
    n-th full update draws the k = 1 run's n-th batch (the bias steps draw elsewhere)."""
    seed = np.random.SeedSequence(3)
    spec = AuxLoss(kind="aux_loss", alpha=0.01)
    one = train_gate(_with_gate(tiny, steps_per_update=1), spec, [], seed)
    four = train_gate(tiny, spec, [], seed)
    assert four.records[0] == one.records[0]
    assert four.records[1] != one.records[4]  # the routers moved differently in between


def test_every_step_moves_the_bias_and_the_weights(tiny) -> None:  # type: ignore[no-untyped-def]
    trajectory = train_gate(
        tiny, LossFree(kind="loss_free", gamma=0.01), list(range(13)), np.random.SeedSequence(4)
    )
    for step in range(12):
        for before, after in zip(trajectory.states[step], trajectory.states[step + 1], strict=True):
            assert not np.array_equal(before.bias, after.bias), step
            assert not np.array_equal(before.weights, after.weights), step
    # The bias moved by ±γ (sign rule, global scope) at every one of the 12 steps.
    for state in trajectory.final:
        assert np.abs(state.bias).max() <= 12 * 0.01 + 1e-6


def test_bias_steps_without_a_bias_only_step_adam(tiny) -> None:  # type: ignore[no-untyped-def]
    trajectory = train_gate(
        tiny, AuxLoss(kind="aux_loss", alpha=0.01), [1, 2, 3], np.random.SeedSequence(5)
    )
    for state in trajectory.states[3]:
        assert not state.bias.any()
    assert not np.array_equal(trajectory.states[2][0].weights, trajectory.states[3][0].weights)


def test_frozen_bias_skips_the_bias_steps(tiny) -> None:  # type: ignore[no-untyped-def]
    """γ drops to 0 after 6 steps: the bias stops moving at once, bias steps included."""
    stop = 6 * tiny.tokens_per_step
    spec = Composite(
        kind="composite",
        bias=Bias(gamma=0.0, schedule=[{"until_tokens": stop, "gamma": 0.01}]),  # type: ignore[list-item]
    )
    trajectory = train_gate(tiny, spec, [5, 6, 7], np.random.SeedSequence(6))
    for state6, state7, final in zip(
        trajectory.states[6], trajectory.states[7], trajectory.final, strict=True
    ):
        np.testing.assert_array_equal(state6.bias, state7.bias)
        np.testing.assert_array_equal(state6.bias, final.bias)
    assert not np.array_equal(trajectory.states[5][0].bias, trajectory.states[6][0].bias)


@pytest.mark.parametrize(
    "router",
    [
        {"capacity": {"factor": 1.0}},
        {"num_groups": 4, "group_topk": 2},
        {"score": "softmax"},
    ],
)
def test_bias_steps_route_like_full_updates(make_scenario, router) -> None:  # type: ignore[no-untyped-def]
    """Capacity, group limits, local bias scopes and softmax routers all run under coarsening,
    deterministically, with a smaller bias batch."""
    softmax = router.get("score") == "softmax"
    scenario = make_scenario(
        router={} if softmax else router,
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
    if softmax:  # the base scenario's sign-rule strategies would not validate with softmax
        scenario = scenario.model_copy(
            update={"router": scenario.router.model_copy(update=router), "strategies": []}
        )
    assert bias_batch_sequences(scenario) == 3
    for scope in ("global", "micro_batch", "rank"):
        rule = "proportional" if softmax else "sign"
        spec = Composite(kind="composite", bias=Bias(rule=rule, gamma=0.01, scope=scope))
        a = train_gate(scenario, spec, [], np.random.SeedSequence(7))
        b = train_gate(scenario, spec, [], np.random.SeedSequence(7))
        assert a.records == b.records
        assert [r["step"] for r in a.records] == [0, 3, 6]
        assert all(np.isfinite(r["maxvio_batch"]) for r in a.records)
        assert a.final[0].bias.any()


# --------------------------------------------------------------------------- bias-step loads


@pytest.mark.parametrize(
    ("n_experts", "top_k", "n_groups", "group_topk"),
    [(256, 8, 8, 4), (64, 6, 8, 3), (64, 6, 1, None), (16, 2, 4, 4), (64, 4, 16, 1)],
)
def test_routed_loads_are_the_selection_counts(
    rng: np.random.Generator, n_experts: int, top_k: int, n_groups: int, group_topk: int | None
) -> None:
    x = rng.standard_normal((300, 32)).astype(np.float32)
    state = RouterState.initial(n_experts, 32, 0.5, rng)
    state.bias[:] = rng.normal(0.0, 0.05, n_experts).astype(np.float32)
    routing = route(x, state, top_k, "sigmoid", True, 2.5, n_groups, group_topk)
    selection = routing.scores + state.bias
    np.testing.assert_array_equal(
        routed_loads(selection, top_k, n_groups, group_topk), routing.loads()
    )
    sizes = [100, 50, 150]
    np.testing.assert_array_equal(
        routed_loads(selection, top_k, n_groups, group_topk, sizes),
        grouped_counts(routing.selected, n_experts, sizes),
    )


def test_routed_loads_fall_back_on_ties() -> None:
    """Exactly tied scores (saturated sigmoids) at a threshold or between groups still give
    the selection's counts, one token's ``top_k`` experts each."""
    logits = np.full((5, 16), 200.0, dtype=np.float32)  # every score exactly 1.0
    logits[:, ::3] = -1.0
    scores = scores_from_logits(logits, "sigmoid")
    for n_groups, group_topk in ((1, None), (4, 2)):
        selected = select_experts(scores, None, 3, n_groups, group_topk)
        expected = np.bincount(selected.ravel(), minlength=16)
        counts = routed_loads(scores, 3, n_groups, group_topk)
        np.testing.assert_array_equal(counts, expected)
        assert counts.sum() == 15


# --------------------------------------------------------------------------- fidelity

STEPS = 3000
SEEDS = (1, 2, 3, 4)


def _fidelity_run(make_scenario, k: int, seed: int) -> GateTrajectory:  # type: ignore[no-untyped-def]
    scenario = make_scenario(
        gate={
            "batch_sequences": 32,
            "tokens_per_sequence": 16,
            "layers_simulated": 1,
            "learning_rate": V3_LEARNING_RATE,
            "steps_per_update": k,
            # The router's coarsening alone: with learning experts the experts also see a
            # gradient only every k-th step, which raises the task loss (about +25 % at k = 16
            # here; docs/model/gate.md, Coarsening).
            "objective": "teacher",
        },
        stream={"dim": 16},
        training={"total_tokens": STEPS * 64 * 1024},
    )
    assert scenario.total_steps == STEPS
    spec = LossFree(kind="loss_free", gamma=1e-3)
    return train_gate(scenario, spec, [], np.random.SeedSequence(seed))


def test_coarsening_keeps_maxvio_within_ten_percent(make_scenario) -> None:  # type: ignore[no-untyped-def]
    """Time-averaged MaxVio_batch over steps 0..3000 (16 experts, top-2, loss-free γ = 1e-3,
    learning rate 2.2e-4), pooled over four seeds: k = 16 against k = 1.

    Measured on the development VM: mean 0.3606 (k = 1) and 0.3432 (k = 16), −4.8 %; per seed
    −13 %, +4 %, −4 %, −3 %; final task loss 0.2172 and 0.2175. Over twelve seeds the pooled
    change was −2.3, −3.4, −5.9 and −9.9 % at k = 4, 8, 16 and 32: the stale gradient answers
    the bias late, so the imbalance comes out a little lower as k grows. The task loss is
    unaffected: the routers learn at the pace of k = 1.
    """
    fine, coarse, task_fine, task_coarse = [], [], [], []
    for seed in SEEDS:
        one = _fidelity_run(make_scenario, 1, seed)
        many = _fidelity_run(make_scenario, BENCHMARK_K, seed)
        assert [r["step"] for r in many.records] == list(range(0, STEPS, BENCHMARK_K))
        fine.append(one.column("maxvio_batch").mean())
        coarse.append(many.column("maxvio_batch").mean())
        task_fine.append(one.column("task_loss")[-100:].mean())
        task_coarse.append(many.column("task_loss")[-100 // BENCHMARK_K :].mean())
    relative = sum(coarse) / sum(fine) - 1
    assert abs(relative) < 0.10, (fine, coarse)
    assert sum(task_coarse) == pytest.approx(sum(task_fine), rel=0.05)
