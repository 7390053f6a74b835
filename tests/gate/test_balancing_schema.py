"""Balancing strategies in the scenario: the composite form, shorthands, and bad input.

Every bad strategy must give one :class:`~moesim.errors.ScenarioError` whose path names the
offending field as the user wrote it (``strategies[2].bias.schedule[1].until_tokens``).
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from moesim.errors import ScenarioError
from moesim.scenario import dump_scenario, scenario_from_dict
from moesim.scenario.strategies import AuxLoss, Bias, Composite, GammaStage, LossFree, LossTerm

V3_YAML = """
name: v3
kind: composite
losses: [{kind: sequence, alpha: 1.0e-4}]
bias:
  rule: sign
  gamma: 0.0
  schedule: [{until_tokens: 14.3e12, gamma: 1.0e-3}]
"""


@pytest.fixture
def raw_with(tiny_dict: dict[str, Any]):  # type: ignore[no-untyped-def]
    """Factory: the shared tiny scenario (aux_loss, loss_free) plus ``extra`` strategies."""

    def build(*extra: dict[str, Any], score: str = "sigmoid") -> dict[str, Any]:
        raw = dict(tiny_dict)
        raw["strategies"] = [*tiny_dict["strategies"], *extra]
        raw["router"] = {"score": score}
        return raw

    return build


def _error(raw: dict[str, Any]) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(raw)
    return info.value


def test_v3_composite_and_shorthands_validate_and_round_trip(raw_with) -> None:  # type: ignore[no-untyped-def]
    v3 = yaml.safe_load(V3_YAML)
    scenario = scenario_from_dict(
        raw_with(v3, {"name": "seq", "kind": "aux_loss", "alpha": 1e-2, "scope": "sequence"})
    )
    spec = scenario.strategies[2]
    assert isinstance(spec, Composite)
    assert spec.losses == [LossTerm(kind="sequence", alpha=1e-4)]
    assert spec.bias == Bias(
        rule="sign", gamma=0.0, schedule=[GammaStage(until_tokens=14.3e12, gamma=1e-3)]
    )
    assert isinstance(scenario.strategies[3], AuxLoss)
    assert scenario.strategies[3].scope == "sequence"
    assert scenario_from_dict(yaml.safe_load(dump_scenario(scenario))) == scenario
    # The shipped shorthands keep their meaning.
    assert isinstance(scenario.strategies[0], AuxLoss)
    assert scenario.strategies[0].scope == "micro_batch"
    assert isinstance(scenario.strategies[1], LossFree)


def test_composite_defaults(raw_with) -> None:  # type: ignore[no-untyped-def]
    scenario = scenario_from_dict(raw_with({"kind": "composite", "bias": {}}))
    spec = scenario.strategies[2]
    assert spec.name == "composite"
    assert spec.losses == []
    assert spec.bias == Bias(rule="sign", gamma=1e-3, scope="global", schedule=None)


@pytest.mark.parametrize(
    ("strategy", "path"),
    [
        ({"kind": "aux_loss", "alpha": -1e-3, "name": "x"}, "strategies[2].alpha"),
        ({"kind": "aux_loss", "scope": "rank", "name": "x"}, "strategies[2].scope"),
        ({"kind": "loss_free", "gamma": -1e-3, "name": "x"}, "strategies[2].gamma"),
        (
            {"kind": "composite", "losses": [{"kind": "z_loss", "alpha": -1}]},
            "strategies[2].losses[0].alpha",
        ),
        (
            {"kind": "composite", "losses": [{"kind": "seq", "alpha": 1}]},
            "strategies[2].losses[0].kind",
        ),
        ({"kind": "composite", "losses": [{"kind": "switch"}]}, "strategies[2].losses[0].alpha"),
        ({"kind": "composite", "bias": {"gamma": -1e-3}}, "strategies[2].bias.gamma"),
        ({"kind": "composite", "bias": {"gamma": float("nan")}}, "strategies[2].bias.gamma"),
        ({"kind": "composite", "bias": {"rule": "multiplicative"}}, "strategies[2].bias.rule"),
        ({"kind": "composite", "bias": {"scope": "node"}}, "strategies[2].bias.scope"),
        ({"kind": "composite", "bias": {"rul": "sign"}}, "strategies[2].bias.rul"),
        ({"kind": "composite", "bias": {"schedule": []}}, "strategies[2].bias.schedule"),
        (
            {"kind": "composite", "bias": {"schedule": [{"until_tokens": 1e9, "gamma": -1}]}},
            "strategies[2].bias.schedule[0].gamma",
        ),
        (
            {"kind": "composite", "bias": {"schedule": [{"until_tokens": -5, "gamma": 1}]}},
            "strategies[2].bias.schedule[0].until_tokens",
        ),
        ({"kind": "composite", "alpha": 1e-3}, "strategies[2].alpha"),
        ({"kind": "auxloss"}, "strategies[2].kind"),
        ({"name": "nameless"}, "strategies[2].kind"),
    ],
)
def test_bad_strategy_names_its_field(raw_with, strategy: dict[str, Any], path: str) -> None:  # type: ignore[no-untyped-def]
    assert _error(raw_with(strategy)).path == path


def test_schedule_must_increase(raw_with) -> None:  # type: ignore[no-untyped-def]
    stages = [
        {"until_tokens": 1e9, "gamma": 1e-3},
        {"until_tokens": 2e9, "gamma": 1e-4},
        {"until_tokens": 2e9, "gamma": 0.0},
    ]
    err = _error(raw_with({"kind": "composite", "bias": {"schedule": stages}}))
    assert err.path == "strategies[2].bias.schedule[2].until_tokens"
    assert "increase" in err.message


def test_duplicate_loss_kinds(raw_with) -> None:  # type: ignore[no-untyped-def]
    terms = [{"kind": "sequence", "alpha": 1e-4}, {"kind": "sequence", "alpha": 1e-3}]
    err = _error(raw_with({"kind": "composite", "losses": terms}))
    assert err.path == "strategies[2].losses"
    assert "sequence" in err.message


def test_sign_rule_with_softmax_is_refused_with_the_reason(raw_with) -> None:  # type: ignore[no-untyped-def]
    """The loss-free shorthand blames its kind; a composite blames its bias rule
    (docs/model/gate.md)."""
    err = _error(raw_with(score="softmax"))  # BASE's strategies[1] is the loss_free shorthand
    assert err.path == "strategies[1].kind"
    assert "softmax" in err.message
    assert "proportional" in err.message
    raw = raw_with({"kind": "composite", "bias": {"rule": "sign"}}, score="softmax")
    raw["strategies"] = [raw["strategies"][0], raw["strategies"][2]]
    err = _error(raw)
    assert err.path == "strategies[1].bias.rule"
    assert "score gap" in err.message
    # Proportional bias and any loss are fine with softmax.
    raw["strategies"][1]["bias"]["rule"] = "proportional"
    scenario_from_dict(raw)


def test_sign_rule_with_sigmoid_is_fine(raw_with) -> None:  # type: ignore[no-untyped-def]
    scenario_from_dict(raw_with({"kind": "composite", "bias": {"rule": "sign"}}))
