"""Scenario validation: every kind of bad input gives one ScenarioError naming the field path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from moesim.errors import ScenarioError
from moesim.scenario import dump_scenario, load_scenario, scenario_from_dict

ROOT = Path(__file__).resolve().parents[2]


def _error(raw: Any) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(raw)
    return info.value


def test_tiny_scenario_is_valid_and_derives_counts(tiny_scenario):
    assert tiny_scenario.cluster.gpus == 8
    assert tiny_scenario.micro_batches == 4  # 16 sequences / (1 × EP4 × DP1)
    assert tiny_scenario.tokens_per_step == 16 * 1024
    assert tiny_scenario.total_steps == 123  # ceil(2e6 / 16384)
    assert tiny_scenario.cluster.gpu.bf16_tflops == pytest.approx(989.4)


def test_si_conversions(tiny_scenario):
    c = tiny_scenario.cluster
    assert c.nic.bandwidth_bytes_per_s == pytest.approx(400e9 / 8 * 0.9)
    # H100 NVLink: 900 GB/s aggregate → 450 GB/s per direction, times the efficiency.
    assert c.nvlink_bytes_per_s == pytest.approx(450e9 * 0.765)
    assert c.gpu.peak_flops("fp8") == pytest.approx(1979e12)


def test_unknown_key_names_its_path(tiny_dict):
    tiny_dict["cluster"]["nic"]["bandwith_gbits_per_s"] = 400
    err = _error(tiny_dict)
    assert err.path == "cluster.nic.bandwith_gbits_per_s"
    assert "unknown key" in err.message


def test_wrong_type_names_its_path(tiny_dict):
    tiny_dict["model"]["hidden"] = "big"
    err = _error(tiny_dict)
    assert err.path == "model.hidden"
    assert "'big'" in err.message


def test_missing_field(tiny_dict):
    del tiny_dict["training"]["global_batch_sequences"]
    assert _error(tiny_dict).path == "training.global_batch_sequences"


def test_strategy_field_path_has_index(tiny_dict):
    tiny_dict["strategies"][1]["gamma"] = -1.0
    assert _error(tiny_dict).path == "strategies[1].gamma"


def test_parallel_degrees_must_multiply_to_gpus(tiny_dict):
    tiny_dict["parallelism"]["pipeline"] = 4
    err = _error(tiny_dict)
    assert err.path == "parallelism"
    assert "4×1×4×1 = 16" in err.message
    assert "8 GPUs" in err.message


def test_experts_divisible_by_expert_parallel(tiny_dict):
    tiny_dict["model"]["moe"]["routed_experts"] = 18
    err = _error(tiny_dict)
    assert err.path == "parallelism.expert"


def test_top_k_at_most_experts(tiny_dict):
    tiny_dict["model"]["moe"]["top_k"] = 17
    err = _error(tiny_dict)
    assert err.path == "model.moe.top_k"


def test_node_limit_at_most_nodes_of_ep_group(tiny_dict):
    tiny_dict["router"] = {"node_limit": 2}  # EP4 sits inside one 4-GPU node
    err = _error(tiny_dict)
    assert err.path == "router.node_limit"
    assert "1 node" in err.message


def test_ep_group_must_be_whole_nodes(tiny_dict):
    # 3 nodes × 4 GPUs; an EP group of 6 GPUs would span one and a half nodes.
    tiny_dict["cluster"]["nodes"] = 3
    tiny_dict["parallelism"] = {"pipeline": 2, "expert": 6, "data": 1}
    tiny_dict["model"]["moe"]["routed_experts"] = 18
    tiny_dict["training"]["global_batch_sequences"] = 12
    err = _error(tiny_dict)
    assert err.path == "parallelism.expert"
    assert "whole number" in err.message


def test_global_batch_must_fill_micro_batches(tiny_dict):
    tiny_dict["training"]["global_batch_sequences"] = 18
    assert _error(tiny_dict).path == "training.global_batch_sequences"


def test_unknown_gpu(tiny_dict):
    tiny_dict["cluster"]["gpu"] = "Z100"
    err = _error(tiny_dict)
    assert err.path == "cluster.gpu"
    assert "H100" in err.message


def test_gpu_preset_override(tiny_dict):
    tiny_dict["cluster"]["gpu"] = {"preset": "H800", "hbm_tbytes_per_s": 3.0}
    sc = scenario_from_dict(tiny_dict)
    assert sc.cluster.gpu.hbm_tbytes_per_s == 3.0
    assert sc.cluster.gpu.nvlink_gbytes_per_s == 400.0


def test_duplicate_strategy_names(tiny_dict):
    tiny_dict["strategies"][1]["name"] = "aux_loss"
    assert _error(tiny_dict).path == "strategies"


def test_malformed_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {layers: 4\ncluster: [\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(bad)
    assert info.value.path == str(bad)
    assert "malformed YAML at line" in info.value.message


def test_missing_file(tmp_path):
    with pytest.raises(ScenarioError, match="no such scenario file"):
        load_scenario(tmp_path / "nope.yaml")


def test_resolved_dump_round_trips(tiny_scenario, tmp_path):
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_scenario(tiny_scenario))
    assert load_scenario(path) == tiny_scenario
    assert yaml.safe_load(path.read_text())["cluster"]["gpu"]["name"] == "H100-SXM"


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_scenarios_validate(path):
    load_scenario(path)


def test_trace_gpus_must_exist(tiny_dict):
    tiny_dict["output"] = {"trace_gpus": [0, 8]}
    err = _error(tiny_dict)
    assert err.path == "output.trace_gpus"
    assert "[8]" in err.message


def test_expert_tensor_parallelism_is_refused_until_priced(tiny_dict):
    tiny_dict["parallelism"].update(expert_tensor=2, expert=2)
    err = _error(tiny_dict)
    assert err.path == "parallelism.expert_tensor"
    assert "not priced yet" in err.message


def test_tensor_parallelism_is_accepted(tiny_dict):
    tiny_dict["parallelism"]["tensor"] = 2
    sc = scenario_from_dict(tiny_dict)
    assert sc.attention_data == sc.parallelism.expert * sc.parallelism.data // 2
