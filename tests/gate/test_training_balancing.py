"""Gate training under composite strategies: interference, the γ schedule, bias scopes,
shorthand equivalence, and the behaviour of sequence-wise and DeepSeek-V3 balancing.

The behavioural runs use the same small set-up as ``test_gate_training.py`` (16 experts, top-2,
64 sequences × 32 tokens per update, one layer, 600 updates).
"""

from __future__ import annotations

import numpy as np
import pytest

from moesim.gate import GateTrajectory, train_gate
from moesim.gate.balancing import grouped_counts
from moesim.gate.metrics import max_vio
from moesim.gate.router import route, route_options
from moesim.gate.training import balance_context
from moesim.scenario import Scenario
from moesim.scenario.routing import Router
from moesim.scenario.strategies import (
    AuxLoss,
    Bias,
    Composite,
    GammaStage,
    LossFree,
    LossTerm,
    NoBalancing,
)

STEPS = 600
V3 = Composite(
    kind="composite",
    name="v3",
    losses=[LossTerm(kind="sequence", alpha=1e-4)],
    bias=Bias(rule="sign", gamma=1e-3),
)


@pytest.fixture
def tiny(make_scenario):  # type: ignore[no-untyped-def]
    """12 updates of a 16-expert top-2 gate, 2 layers, 8 sequences of 16 tokens per update."""
    return make_scenario(
        gate={"batch_sequences": 8, "tokens_per_sequence": 16, "layers_simulated": 2},
        stream={"dim": 16},
        training={"total_tokens": 12 * 64 * 1024},
    )


@pytest.fixture(scope="module")
def behaviour(make_scenario) -> dict[str, tuple[Scenario, GateTrajectory]]:  # type: ignore[no-untyped-def]
    scenario = make_scenario(
        gate={"batch_sequences": 64, "tokens_per_sequence": 32, "layers_simulated": 1},
        stream={"dim": 32},
        training={"total_tokens": STEPS * 64 * 1024},
    )
    softmax = scenario.model_copy(update={"router": Router(score="softmax")})
    runs = {
        "none": (scenario, NoBalancing(kind="none")),
        # Strong at the calibrated gradient scale (moesim.gate.experts.TASK_GRADIENT_SCALE).
        "seq_strong": (scenario, AuxLoss(kind="aux_loss", alpha=1e-2, scope="sequence")),
        "loss_free": (scenario, LossFree(kind="loss_free", gamma=1e-3)),
        "v3": (scenario, V3),
        "none_softmax": (softmax, NoBalancing(kind="none")),
        "proportional_softmax": (
            softmax,
            Composite(kind="composite", bias=Bias(rule="proportional", gamma=1e-3)),
        ),
    }
    return {
        name: (sc, train_gate(sc, spec, [STEPS], np.random.SeedSequence(11)))
        for name, (sc, spec) in runs.items()
    }


def _final(trajectory: GateTrajectory, key: str, window: int = 50) -> float:
    return float(trajectory.column(key)[-window:].mean())


def _sequence_maxvio(scenario: Scenario, trajectory: GateTrajectory) -> float:
    """Mean over 256 fresh sequences of each sequence's MaxVio under the final router."""
    tps = scenario.gate.tokens_per_sequence
    tokens, _ = trajectory.stream.sample(256, tps, np.random.default_rng(5))
    routing = route(
        tokens.reshape(-1, scenario.stream.dim), trajectory.final[0], **route_options(scenario)
    )
    counts = grouped_counts(routing.selected, scenario.model.moe.routed_experts, [tps] * 256)
    return float(max_vio(counts).mean())


# --------------------------------------------------------------------------- records


def test_interference_is_zero_without_a_loss(tiny) -> None:  # type: ignore[no-untyped-def]
    seed = np.random.SeedSequence(4)
    for spec in (NoBalancing(kind="none"), LossFree(kind="loss_free", gamma=0.01)):
        records = train_gate(tiny, spec, [], seed).records
        assert all(r["interference_cos"] == 0.0 for r in records)
        assert all(r["interference_ratio"] == 0.0 for r in records)
        assert all(r["aux_loss"] == 0.0 for r in records)


def test_interference_of_an_aux_loss(tiny) -> None:  # type: ignore[no-untyped-def]
    """Nonzero, a cosine, and a norm ratio linear in α: at the first update the routers, tokens
    and task gradient are the same, so doubling α doubles the ratio and keeps the cosine."""
    seed = np.random.SeedSequence(4)
    one = train_gate(tiny, AuxLoss(kind="aux_loss", alpha=0.05), [], seed).records
    two = train_gate(tiny, AuxLoss(kind="aux_loss", alpha=0.1), [], seed).records
    assert all(-1 <= r["interference_cos"] <= 1 and r["interference_cos"] != 0 for r in one)
    assert all(r["interference_ratio"] > 0 for r in one)
    assert two[0]["interference_ratio"] == pytest.approx(2 * one[0]["interference_ratio"], rel=1e-4)
    assert two[0]["interference_cos"] == pytest.approx(one[0]["interference_cos"], rel=1e-4)
    assert two[0]["task_loss"] == one[0]["task_loss"]


def test_bias_records(tiny) -> None:  # type: ignore[no-untyped-def]
    seed = np.random.SeedSequence(4)
    trajectory = train_gate(tiny, LossFree(kind="loss_free", gamma=0.01), [], seed)
    assert all(r["gamma"] == 0.01 for r in trajectory.records)
    last = np.mean([np.abs(s.bias).mean() for s in trajectory.final])
    assert trajectory.records[-1]["bias_abs_mean"] == pytest.approx(last)
    assert trajectory.records[0]["bias_abs_mean"] > 0
    aux = train_gate(tiny, AuxLoss(kind="aux_loss"), [], seed).records
    assert all(r["gamma"] == 0.0 and r["bias_abs_mean"] == 0.0 for r in aux)


def test_schedule_freezes_the_bias_at_the_token_count(tiny) -> None:  # type: ignore[no-untyped-def]
    """γ = 0.01 for the steps that start before 5 steps' tokens (+1), then 0: the updates after
    steps 0–5 move the bias, later ones do not."""
    per_step = tiny.tokens_per_step
    spec = Composite(
        kind="composite",
        bias=Bias(gamma=0.0, schedule=[GammaStage(until_tokens=5 * per_step + 1, gamma=0.01)]),
    )
    trajectory = train_gate(tiny, spec, [5, 6, 12], np.random.SeedSequence(2))
    assert [r["gamma"] for r in trajectory.records] == [0.01] * 6 + [0.0] * 6
    for before, after in zip(trajectory.states[5], trajectory.states[6], strict=True):
        assert not np.array_equal(before.bias, after.bias)  # step 5's update still moved it
    for frozen, final in zip(trajectory.states[6], trajectory.final, strict=True):
        np.testing.assert_array_equal(frozen.bias, final.bias)
    assert trajectory.records[-1]["bias_abs_mean"] == trajectory.records[5]["bias_abs_mean"]


def test_shorthands_train_like_their_composites(tiny) -> None:  # type: ignore[no-untyped-def]
    seed = np.random.SeedSequence(9)
    pairs = [
        (
            AuxLoss(kind="aux_loss", alpha=0.05, scope="sequence"),
            Composite(kind="composite", losses=[LossTerm(kind="sequence", alpha=0.05)]),
        ),
        (
            LossFree(kind="loss_free", gamma=0.01),
            Composite(kind="composite", bias=Bias(rule="sign", gamma=0.01)),
        ),
    ]
    for short, full in pairs:
        a, b = train_gate(tiny, short, [], seed), train_gate(tiny, full, [], seed)
        assert a.records == b.records
        for x, y in zip(a.final, b.final, strict=True):
            np.testing.assert_array_equal(x.weights, y.weights)
            np.testing.assert_array_equal(x.bias, y.bias)


def test_every_loss_trains(tiny) -> None:  # type: ignore[no-untyped-def]
    """All six terms and a rank-scope proportional bias run end to end; at the first update (same
    routers, same tokens) the recorded aux loss is the sum of the terms' own."""
    kinds = ["switch", "sequence", "global", "device", "communication", "z_loss"]
    terms = [LossTerm(kind=k, alpha=1e-2 * (i + 1)) for i, k in enumerate(kinds)]  # type: ignore[arg-type]
    seed = np.random.SeedSequence(3)
    spec = Composite(
        kind="composite", losses=terms, bias=Bias(rule="proportional", gamma=1e-3, scope="rank")
    )
    records = train_gate(tiny, spec, [], seed).records
    assert all(np.isfinite(list(r.values())).all() for r in records)
    alone = [
        train_gate(tiny, Composite(kind="composite", losses=[t]), [], seed).records[0]["aux_loss"]
        for t in terms
    ]
    assert all(a > 0 for a in alone)
    assert records[0]["aux_loss"] == pytest.approx(sum(alone), rel=1e-5)
    context = balance_context(tiny)
    assert (context.devices, context.comm_limit, context.ranks) == (8, 2, 8)


def test_bias_scope_counts(tiny, make_scenario) -> None:  # type: ignore[no-untyped-def]
    """With one micro-batch per step the micro-batch scope is the global scope, bit for bit;
    with one sequence per micro-batch (each dominated by a topic) it is not."""
    seed = np.random.SeedSequence(6)

    def run(scenario: Scenario, scope: str) -> GateTrajectory:
        spec = Composite(kind="composite", bias=Bias(gamma=0.01, scope=scope))  # type: ignore[arg-type]
        return train_gate(scenario, spec, [], seed)

    one_micro = make_scenario(
        parallelism={"micro_batch_size": 8},
        gate={"batch_sequences": 8, "tokens_per_sequence": 16, "layers_simulated": 2},
        stream={"dim": 16},
        training={"total_tokens": 12 * 64 * 1024},
    )
    assert len(balance_context(one_micro).micro_sizes(128)) == 1
    a, b = run(one_micro, "global"), run(one_micro, "micro_batch")
    assert a.records == b.records
    c, d = run(tiny, "global"), run(tiny, "micro_batch")
    assert len(balance_context(tiny).micro_sizes(128)) == 8
    assert not np.array_equal(c.final[0].bias, d.final[0].bias)
    # Eight ranks, eight micro-batches: one micro-batch per rank.
    e = run(tiny, "rank")
    assert e.records == d.records


# --------------------------------------------------------------------------- behaviour


def test_sequence_aux_balances_each_sequence(behaviour) -> None:  # type: ignore[no-untyped-def]
    none = _sequence_maxvio(*behaviour["none"])
    seq = _sequence_maxvio(*behaviour["seq_strong"])
    assert seq < 0.8 * none, (seq, none)


def test_aux_loss_interferes_with_the_task(behaviour) -> None:  # type: ignore[no-untyped-def]
    """A strong aux loss pulls against the task (negative cosine) with a comparable norm."""
    seq = behaviour["seq_strong"][1]
    assert _final(seq, "interference_cos") < -0.2
    assert 0.2 < _final(seq, "interference_ratio") < 5
    assert _final(behaviour["loss_free"][1], "interference_cos") == 0.0


def test_v3_balances_like_loss_free(behaviour) -> None:  # type: ignore[no-untyped-def]
    """Bias + sequence-wise α = 1e-4 (DeepSeek-V3): the bias does the balancing; at the
    calibrated gradient scale the small loss's gradient is still a fair fraction of the task's
    (norm ratio about 0.3 here), without changing the task loss."""
    none = _final(behaviour["none"][1], "maxvio_batch")
    loss_free = _final(behaviour["loss_free"][1], "maxvio_batch")
    v3 = behaviour["v3"][1]
    assert _final(v3, "maxvio_batch") < 0.3 * none
    assert abs(_final(v3, "maxvio_batch") - loss_free) < 0.25 * loss_free
    assert 0 < _final(v3, "interference_ratio") < 0.6
    assert abs(_final(v3, "task_loss") - _final(behaviour["loss_free"][1], "task_loss")) < 0.01


def test_proportional_bias_balances_a_softmax_router(behaviour) -> None:  # type: ignore[no-untyped-def]
    none = _final(behaviour["none_softmax"][1], "maxvio_batch")
    proportional = _final(behaviour["proportional_softmax"][1], "maxvio_batch")
    assert proportional < 0.5 * none, (proportional, none)


def test_counts_exclude_capacity_drops(make_scenario) -> None:  # type: ignore[no-untyped-def]
    """Under a capacity the loads the bias reads and MaxVio measures are those processed
    (docs/model/gate.md): capacity factor 1 per micro-batch caps every expert at
    its share, so MaxVio is lower than dropless."""
    selected = np.array([[0, 1], [0, 2], [0, 3], [1, 2]])
    dropped = np.array([[False, False], [True, False], [True, False], [False, True]])
    np.testing.assert_array_equal(
        grouped_counts(selected, 4, [2, 2], dropped), [[1, 1, 1, 0], [0, 1, 0, 1]]
    )
    np.testing.assert_array_equal(grouped_counts(selected, 4, [4]), [[3, 2, 2, 1]])
    sizes = {"gate": {"batch_sequences": 8, "tokens_per_sequence": 16, "layers_simulated": 1}}
    capped = make_scenario(
        router={"capacity": {"factor": 1.0}},
        stream={"dim": 16},
        training={"total_tokens": 12 * 64 * 1024},
        **sizes,
    )
    free = make_scenario(stream={"dim": 16}, training={"total_tokens": 12 * 64 * 1024}, **sizes)
    seed = np.random.SeedSequence(1)
    spec = LossFree(kind="loss_free", gamma=0.01)
    a = train_gate(capped, spec, [], seed).records
    b = train_gate(free, spec, [], seed).records
    assert all(np.isfinite(r["maxvio_batch"]) for r in a)
    assert np.mean([r["maxvio_batch"] for r in a]) < np.mean([r["maxvio_batch"] for r in b])
