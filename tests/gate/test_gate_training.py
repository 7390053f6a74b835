"""Gate training: determinism, snapshots, records, and the behaviour the strategies must show.

The behavioural scenario is deliberately small (16 experts, top-2, 64 × 32 tokens per update,
600 updates) and otherwise uses the schema's defaults for the gate and the stream, with the
teacher objective (``gate.objective: teacher``), whose experts never learn: there balancing can
only cost task loss. The learning-expert task's behaviour is in ``test_learning_dynamics.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from moesim.gate import GateTrajectory, train_gate
from moesim.gate.training import child_seeds, gate_micro_batches
from moesim.scenario.strategies import AuxLoss, LossFree, NoBalancing

GATE_DIR = Path(__file__).resolve().parents[2] / "moesim" / "gate"


@pytest.fixture
def tiny(make_scenario):  # type: ignore[no-untyped-def]
    """12 updates of a 16-expert top-2 gate, 2 layers."""
    return make_scenario(
        gate={"batch_sequences": 8, "tokens_per_sequence": 16, "layers_simulated": 2},
        stream={"dim": 16},
        training={"total_tokens": 12 * 64 * 1024},
    )


@pytest.fixture(scope="module")
def behaviour(make_scenario) -> dict[str, GateTrajectory]:  # type: ignore[no-untyped-def]
    scenario = make_scenario(
        gate={
            "batch_sequences": 64,
            "tokens_per_sequence": 32,
            "layers_simulated": 1,
            "objective": "teacher",
        },
        stream={"dim": 32},
        training={"total_tokens": 600 * 64 * 1024},
    )
    assert scenario.total_steps == 600
    specs = {
        "none": NoBalancing(kind="none"),
        "aux_strong": AuxLoss(kind="aux_loss", alpha=0.1, name="aux_strong"),
        "loss_free": LossFree(kind="loss_free", gamma=1e-3),
    }
    return {
        name: train_gate(scenario, spec, [0, 600], np.random.SeedSequence(11))
        for name, spec in specs.items()
    }


def _final(trajectory: GateTrajectory, key: str, window: int = 50) -> float:
    return float(trajectory.column(key)[-window:].mean())


def test_same_seed_same_run(tiny) -> None:  # type: ignore[no-untyped-def]
    seed = np.random.SeedSequence(5)
    spec = LossFree(kind="loss_free", gamma=0.01)
    a = train_gate(tiny, spec, [0, 6], seed)
    b = train_gate(tiny, spec, [0, 6], seed)  # the same object: it must not have been advanced
    c = train_gate(tiny, spec, [0, 6], np.random.SeedSequence(5))
    assert a.records == b.records == c.records
    for x, y in zip(a.final, c.final, strict=True):
        np.testing.assert_array_equal(x.weights, y.weights)
        np.testing.assert_array_equal(x.bias, y.bias)
    d = train_gate(tiny, spec, [], np.random.SeedSequence(6))
    assert d.records != a.records


def test_records_and_snapshots(tiny) -> None:  # type: ignore[no-untyped-def]
    trajectory = train_gate(
        tiny, AuxLoss(kind="aux_loss", alpha=0.01), [0, 5, 12], np.random.SeedSequence(1)
    )
    assert trajectory.strategy == "aux_loss"
    assert len(trajectory.records) == tiny.total_steps == 12
    assert [r["step"] for r in trajectory.records] == list(range(12))
    assert trajectory.records[3]["tokens"] == 4 * tiny.tokens_per_step
    keys = {
        "step",
        "tokens",
        "maxvio_batch",
        "task_loss",
        "aux_loss",
        "interference_cos",
        "interference_ratio",
        "bias_abs_mean",
        "bias_moved",
        "task_loss_unbiased",
        "gamma",
    }
    assert all(set(r) == keys for r in trajectory.records)
    assert all(r["aux_loss"] > 0 for r in trajectory.records)
    # Without a bias nothing is moved and the unbiased loss is the loss.
    assert all(r["bias_moved"] == 0 for r in trajectory.records)
    assert all(r["task_loss_unbiased"] == r["task_loss"] for r in trajectory.records)
    assert sorted(trajectory.states) == [0, 5, 12]
    assert all(len(states) == 2 for states in trajectory.states.values())
    initial = trajectory.states[0][0]
    assert (initial.bias == 0).all()
    # Initial logits spread by init_logit_std whatever the token norm: in expectation over the
    # router's draw (the common direction makes one router's spread depend on how its 16 rows
    # happen to project on it), so the mean square is averaged over 40 seeds.
    squares = []
    for seed in range(40):
        run = train_gate(tiny, NoBalancing(kind="none"), [0], np.random.SeedSequence(seed))
        tokens, _ = run.stream.sample(64, 16, np.random.default_rng(0))
        logits = tokens.reshape(-1, tiny.stream.dim) @ run.states[0][0].weights.T
        squares.append(float(np.mean(logits.astype(np.float64) ** 2)))
    assert np.sqrt(np.mean(squares)) == pytest.approx(tiny.gate.init_logit_std, rel=0.1)
    # Snapshots are copies taken before the step's update; the last equals the final routers.
    assert not np.array_equal(trajectory.states[5][0].weights, trajectory.states[12][0].weights)
    np.testing.assert_array_equal(trajectory.states[12][1].weights, trajectory.final[1].weights)
    trajectory.final[1].weights[:] = 0
    assert trajectory.states[12][1].weights.any()


def test_teacher_objective_records_the_capture(tiny) -> None:  # type: ignore[no-untyped-def]
    gate = tiny.gate.model_copy(update={"objective": "teacher"})
    scenario = tiny.model_copy(update={"gate": gate})
    records = train_gate(
        scenario, AuxLoss(kind="aux_loss", alpha=0.01), [], np.random.SeedSequence(1)
    ).records
    assert all(0 <= r["teacher_capture"] <= 1 for r in records)


def test_bias_only_moves_under_loss_free(tiny) -> None:  # type: ignore[no-untyped-def]
    seed = np.random.SeedSequence(2)
    for spec in (NoBalancing(kind="none"), AuxLoss(kind="aux_loss", alpha=0.1)):
        assert all((s.bias == 0).all() for s in train_gate(tiny, spec, [], seed).final)
    gamma = 0.01
    final = train_gate(tiny, LossFree(kind="loss_free", gamma=gamma), [], seed).final
    for state in final:
        steps = state.bias / gamma
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)  # whole sign-rule steps
        assert np.abs(steps).max() <= tiny.total_steps
        assert state.bias.any()


def test_strategies_share_stream_and_teachers(tiny) -> None:  # type: ignore[no-untyped-def]
    """Same seed, different strategies: identical initial routers and first-update records."""
    seed = np.random.SeedSequence(8)
    a = train_gate(tiny, NoBalancing(kind="none"), [0], seed)
    b = train_gate(tiny, LossFree(kind="loss_free", gamma=0.01), [0], seed)
    np.testing.assert_array_equal(a.states[0][0].weights, b.states[0][0].weights)
    assert a.records[0]["task_loss"] == b.records[0]["task_loss"]
    assert a.records[0]["maxvio_batch"] == b.records[0]["maxvio_batch"]


def test_sample_steps_validated(tiny) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="sample_steps"):
        train_gate(tiny, NoBalancing(kind="none"), [13], np.random.SeedSequence(0))


def test_micro_batches_and_seeds(make_scenario) -> None:  # type: ignore[no-untyped-def]
    scenario = make_scenario(
        parallelism={"micro_batch_size": 3},
        training={"global_batch_sequences": 48, "total_tokens": 5 * 48 * 1024},
        gate={"batch_sequences": 8, "tokens_per_sequence": 4},
    )
    assert gate_micro_batches(scenario) == [12, 12, 8]
    parent = np.random.SeedSequence(3)
    children = child_seeds(parent, 3)
    assert parent.n_children_spawned == 0
    assert [c.generate_state(2).tolist() for c in children] == [
        c.generate_state(2).tolist() for c in np.random.SeedSequence(3).spawn(3)
    ]
    trajectory = train_gate(scenario, AuxLoss(kind="aux_loss", alpha=0.1), [], parent)
    assert all(np.isfinite(r["aux_loss"]) for r in trajectory.records)


def test_loss_free_balances_better_than_none(behaviour: dict[str, GateTrajectory]) -> None:
    none = _final(behaviour["none"], "maxvio_batch")
    loss_free = _final(behaviour["loss_free"], "maxvio_batch")
    assert loss_free < 0.5 * none, (loss_free, none)


def test_balancing_has_a_price(behaviour: dict[str, GateTrajectory]) -> None:
    """Loss-free balancing reroutes tokens off the teacher's overloaded choices: it pays in task
    loss and teacher capture."""
    none, loss_free = behaviour["none"], behaviour["loss_free"]
    assert _final(none, "task_loss") < _final(loss_free, "task_loss")
    assert _final(none, "teacher_capture") > _final(loss_free, "teacher_capture")


def test_strong_aux_loss_balances(behaviour: dict[str, GateTrajectory]) -> None:
    """α = 0.1 lowers MaxVio. (At this short horizon it does not cost task loss: unselected
    experts get no task gradient, and the aux loss's push towards them acts as exploration.)"""
    assert _final(behaviour["aux_strong"], "maxvio_batch") < _final(
        behaviour["none"], "maxvio_batch"
    )


def test_learning_happens(behaviour: dict[str, GateTrajectory]) -> None:
    none = behaviour["none"]
    first = float(none.column("task_loss")[:20].mean())
    assert _final(none, "task_loss") < first
    assert _final(none, "teacher_capture") > float(none.column("teacher_capture")[:20].mean())


def test_gate_is_pure_numpy() -> None:
    """Nothing under moesim/gate imports simpy, pandas, or the engine and cluster packages."""
    banned = ("simpy", "pandas", "moesim.engine", "moesim.cluster")
    for path in GATE_DIR.glob("*.py"):
        # The trace reader needs pandas to read Parquet and CSV (imported inside its functions).
        rules = tuple(b for b in banned if b != "pandas") if path.name == "trace.py" else banned
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(rules), f"{path.name} imports {name}"
