"""Scenario fields of the router, stream and gate sections: bad input is one ScenarioError
naming the field path; good input round-trips through YAML."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from moesim.errors import ScenarioError
from moesim.scenario import dump_scenario, scenario_from_dict


@pytest.fixture
def raw(make_scenario) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The gate tests' base scenario as a plain mapping (16 experts, top-2, EP 8 on one node)."""
    return make_scenario().model_dump(mode="json")


def _error(raw: dict[str, Any], **sections: dict[str, Any]) -> ScenarioError:
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(raw)
    return info.value


def _two_nodes(raw: dict[str, Any]) -> dict[str, Any]:
    raw["cluster"]["nodes"] = 2
    raw["parallelism"]["expert"] = 16
    raw["training"]["global_batch_sequences"] = 32
    return raw


@pytest.mark.parametrize(
    ("capacity", "path"),
    [
        ({"factor": 0.0}, "router.capacity.factor"),
        ({"factor": -1.0}, "router.capacity.factor"),
        ({"factor": 1.0, "exempt_fraction": 1.5}, "router.capacity.exempt_fraction"),
        ({"factor": 1.0, "exempt_fraction": -0.1}, "router.capacity.exempt_fraction"),
        ({"factor": 1.0, "policy": "random"}, "router.capacity.policy"),
        ({"factor": 1.0, "level": "node"}, "router.capacity.level"),
        ({"policy": "probs"}, "router.capacity.factor"),
    ],
)
def test_bad_capacity(raw: dict[str, Any], capacity: dict[str, Any], path: str) -> None:
    assert _error(raw, router={"capacity": capacity}).path == path


def test_groups_must_divide_the_experts(raw: dict[str, Any]) -> None:
    err = _error(raw, router={"num_groups": 3, "group_topk": 1})
    assert err.path == "router.num_groups"
    assert "divide" in err.message


def test_group_topk_at_most_the_groups(raw: dict[str, Any]) -> None:
    err = _error(raw, router={"num_groups": 4, "group_topk": 5})
    assert err.path == "router.group_topk"
    assert "larger than num_groups" in err.message
    assert _error(raw, router={"num_groups": 4}).path == "router.group_topk"


def test_kept_groups_must_hold_top_k(raw: dict[str, Any]) -> None:
    raw["model"]["moe"]["top_k"] = 6
    err = _error(raw, router={"num_groups": 8, "group_topk": 2})  # 2 groups × 2 experts < 6
    assert err.path == "router.group_topk"
    assert "top_k" in err.message


def test_device_limit_at_most_the_ranks(raw: dict[str, Any]) -> None:
    err = _error(raw, router={"device_limit": 9})
    assert err.path == "router.device_limit"
    assert "8 expert-parallel" in err.message
    raw["model"]["moe"]["top_k"] = 6
    err = _error(raw, router={"device_limit": 2})  # 2 ranks × 2 experts < 6
    assert err.path == "router.device_limit"


def test_node_limit_must_hold_top_k(raw: dict[str, Any]) -> None:
    raw = _two_nodes(raw)
    raw["model"]["moe"]["top_k"] = 10
    err = _error(raw, router={"node_limit": 1})  # one node holds 8 experts
    assert err.path == "router.node_limit"
    assert _error(raw, router={"node_limit": 3}).path == "router.node_limit"  # > 2 nodes


def test_one_group_level_only(raw: dict[str, Any]) -> None:
    err = _error(raw, router={"node_limit": 1, "device_limit": 2})
    assert err.path == "router.device_limit"
    assert "node_limit" in err.message


def test_topk_before_softmax_needs_softmax_and_normalize(raw: dict[str, Any]) -> None:
    err = _error(raw, router={"topk_before_softmax": True})  # score defaults to sigmoid
    assert err.path == "router.topk_before_softmax"
    raw["strategies"] = [{"kind": "aux_loss"}]
    err = _error(raw, router={"score": "softmax", "topk_before_softmax": True, "normalize": False})
    assert err.path == "router.normalize"


def test_top_k_larger_than_experts(raw: dict[str, Any]) -> None:
    raw["model"]["moe"]["top_k"] = 17
    assert _error(raw).path == "model.moe.top_k"


def test_stream_and_gate_fields(raw: dict[str, Any]) -> None:
    assert _error(dict(raw), stream={"domain_share": 1.2}).path == "stream.domain_share"
    assert _error(dict(raw), stream={"drift_tokens": 0}).path == "stream.drift_tokens"
    assert _error(dict(raw), stream={"packing": "sorted"}).path == "stream.packing"
    assert _error(dict(raw), gate={"layer_map": "random"}).path == "gate.layer_map"


def test_trace_format_from_the_suffix(raw: dict[str, Any]) -> None:
    err = _error(dict(raw), gate={"trace": {"path": "loads.txt"}})
    assert err.path == "gate.trace.format"
    assert "suffix" in err.message
    ok = scenario_from_dict({**raw, "gate": {**raw["gate"], "trace": {"path": "a/b.PQ"}}})
    assert ok.gate.trace is not None
    assert ok.gate.trace.format == "parquet"
    assert ok.gate.trace.split == "multinomial"
    explicit = {"path": "loads.txt", "format": "csv", "split": "even"}
    ok = scenario_from_dict({**raw, "gate": {**raw["gate"], "trace": explicit}})
    assert ok.gate.trace is not None
    assert ok.gate.trace.format == "csv"


def test_trace_excludes_capacity(raw: dict[str, Any]) -> None:
    raw["gate"] = {**raw["gate"], "trace": {"path": "t.csv"}}
    err = _error(raw, router={"capacity": {"factor": 1.0}})
    assert err.path == "router.capacity"


def test_new_fields_round_trip_through_yaml(raw: dict[str, Any]) -> None:
    text = """
router:
  device_limit: 3
  capacity: {factor: 1.0, level: device, policy: probs, exempt_fraction: 0.1}
stream: {packing: domain, domain_share: 0.8, drift_tokens: 2.0e9}
gate: {layers_simulated: 3, layer_map: blocks, trace: {path: run/loads.parquet, split: even}}
"""
    changes = yaml.safe_load(text)
    changes["router"].pop("capacity")  # a trace replays loads as processed: no capacity
    for name, values in changes.items():
        raw[name] = {**raw[name], **values}
    scenario = scenario_from_dict(raw)
    assert scenario.router.device_limit == 3
    assert scenario.stream.packing == "domain"
    assert scenario.gate.layer_map == "blocks"
    again = scenario_from_dict(yaml.safe_load(dump_scenario(scenario)))
    assert again == scenario
    raw["gate"].pop("trace")
    raw["router"]["capacity"] = yaml.safe_load(text)["router"]["capacity"]
    with_capacity = scenario_from_dict(raw)
    assert with_capacity.router.capacity is not None
    assert with_capacity.router.capacity.level == "device"
    assert scenario_from_dict(yaml.safe_load(dump_scenario(with_capacity))) == with_capacity
