"""One layer at a time (``train_gate(..., layer=i)`` and ``merge_layers``).

The simulated layers' routers see the same tokens but never interact, so a run can train them in
separate processes: each one-layer run draws every generator exactly as the run of all layers
does, and the merged trajectory must equal that run record for record and weight for weight.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from base_scenario import v3_like

from moesim.gate import merge_layers, train_gate
from moesim.gate.training import GateTrajectory
from moesim.scenario import Scenario, scenario_from_dict
from moesim.scenario.strategies import AuxLoss, Bias, Composite, LossTerm, NoBalancing

SEED = 5


def _same_value(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _assert_identical(a: GateTrajectory, b: GateTrajectory) -> None:
    assert a.strategy == b.strategy
    assert a.steps_per_update == b.steps_per_update
    assert len(a.records) == len(b.records)
    for left, right in zip(a.records, b.records, strict=True):
        assert left.keys() == right.keys()
        assert all(_same_value(left[k], right[k]) for k in left), (left, right)
    assert sorted(a.states) == sorted(b.states)
    pairs = [(a.states[s], b.states[s]) for s in a.states] + [(a.final, b.final)]
    for left_states, right_states in pairs:
        assert len(left_states) == len(right_states)
        for x, y in zip(left_states, right_states, strict=True):
            np.testing.assert_array_equal(x.weights, y.weights)
            np.testing.assert_array_equal(x.bias, y.bias)
    assert a.tail_updates == b.tail_updates
    np.testing.assert_array_equal(a.tail_loads, b.tail_loads)  # type: ignore[arg-type]
    np.testing.assert_array_equal(a.stream.topics, b.stream.topics)


def _split(scenario: Scenario, spec: object, samples: list[int]) -> GateTrajectory:
    parts = [
        train_gate(scenario, spec, samples, np.random.SeedSequence(SEED), layer=i)  # type: ignore[arg-type]
        for i in range(scenario.gate.layers_simulated)
    ]
    for part in parts:
        assert len(part.final) == 1
        assert part.tail_loads is not None
        assert part.tail_loads.shape[0] == 1
    return merge_layers(parts)


@pytest.mark.parametrize(
    "spec",
    [
        Composite(
            kind="composite",
            losses=[LossTerm(kind="sequence", alpha=1e-4)],
            bias=Bias(rule="sign", gamma=1e-3),
        ),
        AuxLoss(kind="aux_loss", alpha=1e-3, scope="sequence"),
        Composite(kind="composite", bias=Bias(rule="proportional", gamma=1e-3)),
    ],
    ids=["v3_loss_free", "aux_loss", "proportional"],
)
def test_layers_trained_apart_merge_into_the_joint_run(spec) -> None:  # type: ignore[no-untyped-def]
    """V3-like routing (group limit, bias steps between coarsened gradients, snapshots), three
    layers: trained apart and merged, the trajectory is the joint one."""
    raw = v3_like(64)
    raw["gate"]["layers_simulated"] = 3
    scenario = scenario_from_dict(raw)
    samples = [0, 17, 40, 64]
    joint = train_gate(scenario, spec, samples, np.random.SeedSequence(SEED))
    assert len(joint.final) == 3
    _assert_identical(_split(scenario, spec, samples), joint)


def test_teacher_objective_and_every_step_updates(make_scenario) -> None:  # type: ignore[no-untyped-def]
    """The fixed-teacher objective (teachers drawn per layer) at ``steps_per_update = 1``."""
    scenario = make_scenario(
        gate={"layers_simulated": 2, "objective": "teacher", "batch_sequences": 8},
        training={"total_tokens": 30 * 64 * 1024},
    )
    spec = NoBalancing(kind="none")
    _assert_identical(
        _split(scenario, spec, [10]),
        train_gate(scenario, spec, [10], np.random.SeedSequence(SEED)),
    )


def test_layers_differ_so_the_check_can_fail(make_scenario) -> None:  # type: ignore[no-untyped-def]
    """The layers' routers differ from each other (their own initial weights and tasks): a
    merge that mixed them up would not equal the joint run."""
    scenario = make_scenario(gate={"layers_simulated": 2}, training={"total_tokens": 8 * 64 * 1024})
    spec = NoBalancing(kind="none")
    first, second = (
        train_gate(scenario, spec, [], np.random.SeedSequence(SEED), layer=i) for i in (0, 1)
    )
    assert not np.array_equal(first.final[0].weights, second.final[0].weights)
    with pytest.raises(AssertionError):
        _assert_identical(
            merge_layers([second, first]),
            train_gate(scenario, spec, [], np.random.SeedSequence(SEED)),
        )


def test_bad_layer_and_bad_merges_are_refused(make_scenario) -> None:  # type: ignore[no-untyped-def]
    scenario = make_scenario(gate={"layers_simulated": 2}, training={"total_tokens": 4 * 64 * 1024})
    spec = NoBalancing(kind="none")
    with pytest.raises(ValueError, match=r"layer: 2 outside 0\.\.1"):
        train_gate(scenario, spec, [], np.random.SeedSequence(SEED), layer=2)
    both = train_gate(scenario, spec, [], np.random.SeedSequence(SEED))
    with pytest.raises(ValueError, match="one-layer ones only"):
        merge_layers([both])
    with pytest.raises(ValueError, match="no trajectories"):
        merge_layers([])
    longer = make_scenario(gate={"layers_simulated": 2}, training={"total_tokens": 6 * 64 * 1024})
    with pytest.raises(ValueError, match="not of one training run"):
        merge_layers(
            [
                train_gate(scenario, spec, [], np.random.SeedSequence(SEED), layer=0),
                train_gate(longer, spec, [], np.random.SeedSequence(SEED), layer=1),
            ]
        )


def test_merged_records_are_numpys_means_signed_zeros_included(make_scenario) -> None:  # type: ignore[no-untyped-def]
    """merge_layers' column sums give each record np.mean's float over the layers, a −0.0 in
    every layer too (NumPy adds to 0.0, so the mean is +0.0), for one layer and for two."""
    scenario = make_scenario(gate={"layers_simulated": 2}, training={"total_tokens": 4 * 64 * 1024})
    spec = NoBalancing(kind="none")
    parts = [train_gate(scenario, spec, [], np.random.SeedSequence(SEED), layer=i) for i in (0, 1)]
    for part in parts:
        part.records[0]["task_loss"] = -0.0
    for chosen in (parts[:1], parts):
        merged = merge_layers(chosen).records
        for i, record in enumerate(merged):
            for key, value in record.items():
                if key in ("step", "tokens", "gamma"):
                    continue
                expected = float(np.mean([p.records[i][key] for p in chosen]))
                assert value == expected or (value != value and expected != expected), key
                assert math.copysign(1.0, value) == math.copysign(1.0, expected), key
