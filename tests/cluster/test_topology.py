"""Topology: paths, latencies and capacities of the three fabrics, and impossible layouts."""

from __future__ import annotations

import pytest

from moesim.cluster import build_topology
from moesim.cluster.topology import NIC_IN, NIC_OUT, NVLINK_IN, NVLINK_OUT
from moesim.errors import ScenarioError
from moesim.scenario import scenario_from_dict


def _cluster(tiny_dict, nodes=4, gpus_per_node=4, **network):
    d = tiny_dict
    d["cluster"]["nodes"] = nodes
    d["cluster"]["gpus_per_node"] = gpus_per_node
    d["cluster"]["network"] = network
    d["parallelism"] = {"pipeline": 1, "expert": 4, "data": nodes * gpus_per_node // 4}
    d["training"]["global_batch_sequences"] = nodes * gpus_per_node
    return build_topology(scenario_from_dict(d))


def test_fat_tree_paths(tiny_dict):
    topo = _cluster(tiny_dict, leaf_nics=8, cross_leaf_latency_us=3.7)
    assert topo.path(0, 1) == [4 * 0 + NVLINK_OUT, 4 * 1 + NVLINK_IN]
    same_leaf = topo.path(0, 5)  # NICs 0 and 5 under leaf 0
    assert same_leaf == [4 * 0 + NIC_OUT, 4 * 5 + NIC_IN]
    crossing = topo.path(0, 9)  # leaf 0 → leaf 1
    assert crossing == [NIC_OUT, 4 * 9 + NIC_IN, topo.leaf_link(0, False), topo.leaf_link(1, True)]
    assert topo.latency(0, 5) == pytest.approx(2.8e-6)
    assert topo.latency(0, 9) == pytest.approx(3.7e-6)
    assert topo.link_name(topo.leaf_link(1, True)) == "leaf1.downlink"


def test_oversubscription_shrinks_leaf_uplinks(tiny_dict):
    full = _cluster(tiny_dict, leaf_nics=8)
    half = _cluster(tiny_dict, leaf_nics=8, oversubscription=2.0)
    up = full.leaf_link(0, False)
    assert full.capacity[up] == pytest.approx(8 * full.nic_bytes_per_s)
    assert half.capacity[up] == pytest.approx(full.capacity[up] / 2)


def test_rail_optimized_keeps_a_rail_under_its_leaf(tiny_dict):
    topo = _cluster(tiny_dict, topology="rail_optimized", leaf_nics=4)
    # GPU 1 (node 0, rail 1) → GPU 5 (node 1, rail 1): same rail leaf, no spine.
    assert topo.path(1, 5) == [4 * 1 + NIC_OUT, 4 * 5 + NIC_IN]
    # Rail 1 → rail 2 crosses the spine.
    assert len(topo.path(1, 6)) == 4


def test_multi_plane_forwards_across_planes_over_nvlink(tiny_dict):
    topo = _cluster(tiny_dict, topology="multi_plane", leaf_nics=4)
    # GPU 1 (node 0, plane 1) → GPU 6 (node 1, plane 2): NVLink to GPU 2, then plane 2.
    assert topo.path(1, 6) == [
        4 * 1 + NVLINK_OUT,
        4 * 2 + NVLINK_IN,
        4 * 2 + NIC_OUT,
        4 * 6 + NIC_IN,
    ]
    assert topo.latency(1, 6) == pytest.approx(2.8e-6 + 3.33e-6)
    assert topo.path(1, 5) == [4 * 1 + NIC_OUT, 4 * 5 + NIC_IN]


def test_nvlink_domain_spans_nodes(tiny_dict):
    topo = _cluster(tiny_dict, nodes=4, gpus_per_node=4, nvlink_domain_gpus=8)
    assert topo.path(0, 7) == [4 * 0 + NVLINK_OUT, 4 * 7 + NVLINK_IN]
    assert topo.path(0, 8)[0] == 4 * 0 + NIC_OUT


@pytest.mark.parametrize(
    ("section", "change", "field", "message"),
    [
        ("network", {"oversubscription": 0.5}, "oversubscription", "greater than or equal to 1"),
        ("network", {"nvlink_domain_gpus": 6}, "nvlink_domain_gpus", "multiple of gpus_per_node"),
        ("parallelism", {"schedule": "dualpipe", "pipeline": 3}, "schedule", "even number of st"),
        ("parallelism", {"schedule": "interleaved"}, "virtual_stages", "at least 2"),
        ("parallelism", {"virtual_stages": 2}, "virtual_stages", "only meaningful"),
        ("parallelism", {"dispatch": "node_limited", "expert": 2}, "dispatch", "whole"),
    ],
)
def test_impossible_layouts_are_refused(tiny_dict, section, change, field, message):
    d = tiny_dict
    if section == "network":
        d["cluster"]["network"] = change
    else:
        d["parallelism"].update(change)
        if change.get("pipeline") == 3:
            d["cluster"]["nodes"] = 3
            d["training"]["global_batch_sequences"] = 16
        if change.get("expert") == 2:
            d["parallelism"]["data"] = 2
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict(d)
    assert field in err.value.path or field in str(err.value)
    assert message in str(err.value)


def test_dualpipe_needs_enough_even_micro_batches(tiny_dict):
    d = tiny_dict
    d["parallelism"].update(schedule="dualpipe")
    d["training"]["global_batch_sequences"] = 4  # 1 micro-batch per pipeline
    with pytest.raises(ScenarioError, match="even number of micro-batches"):
        scenario_from_dict(d)
