"""Static cluster description: GPUs, links, paths, and where ranks and experts live.

Links. Each GPU has four directed ports: NVLink out/in to its NVLink domain's switch (a node of
8 GPUs, or a larger domain such as NVL72) and NIC out/in to the InfiniBand fabric. The fabric is
a two-layer fat-tree of leaf switches under a spine; each leaf has an uplink and a downlink port
(aggregates of its spine links) whose capacity is its NICs' bandwidth divided by the
oversubscription. Three wirings (``cluster.network.topology``):

- ``fat_tree``: NIC ``g`` (global rank) sits under leaf ``g // leaf_nics``.
- ``rail_optimized``: NIC ``i`` of every node belongs to rail ``i``, whose leaves hold rail
  ``i``'s NICs of ``leaf_nics`` consecutive nodes; traffic between rails crosses the spine.
- ``multi_plane``: rail ``i`` is an independent fat-tree (a plane). A transfer to a GPU of
  another in-node index is first forwarded over NVLink to the sender's node-mate with the
  destination's index, then crosses that plane (arXiv 2505.09343).

Contention appears where it does on real machines: at the ports (incast at a hot receiver,
fan-out at a busy sender) and, with oversubscription, at leaf uplinks. Link capacities already
include the link efficiency.

Rank layout (see :mod:`moesim.scenario.schema`): GPU ``g`` is global rank ``g``; stage
``g // (expert·data)``; inside the stage, index ``i = g % (expert·data)``, expert-parallel rank
``i % expert`` of expert-parallel group ``i // expert``. Routed expert ``e`` lives on
expert-parallel rank ``e // (experts / expert)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from moesim import units
from moesim.scenario.schema import Scenario

PORTS = ("nvlink_out", "nvlink_in", "nic_out", "nic_in")
NVLINK_OUT, NVLINK_IN, NIC_OUT, NIC_IN = range(4)
LEAF_PORTS = ("uplink", "downlink")

Index = TypeVar("Index", int, npt.NDArray[np.int64])
"""A GPU or leaf index, or an array of them (link ids come back in the same form)."""


@dataclass(frozen=True)
class Topology:
    """Links of the cluster and the path between any two GPUs."""

    gpus: int
    gpus_per_node: int
    capacity: npt.NDArray[np.float64]
    """Usable bandwidth per link, bytes/s: ``4 · gpus`` GPU ports, then an uplink and a
    downlink per leaf switch."""
    nvlink_latency_s: float
    nic_latency_s: float
    kind: str = "fat_tree"
    domain_gpus: int = 0
    """GPUs per NVLink domain (0: one node)."""
    leaf_nics: int = 1 << 30
    cross_leaf_latency_s: float | None = None

    @property
    def links(self) -> int:
        return len(self.capacity)

    @property
    def domain(self) -> int:
        return self.domain_gpus or self.gpus_per_node

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node

    @property
    def gpu_links(self) -> int:
        """Links of the GPUs' ports (four per GPU, ids ``0 .. gpu_links - 1``); the leaf
        switches' links come after them."""
        return len(PORTS) * self.gpus

    @property
    def leaves(self) -> int:
        return (self.links - self.gpu_links) // 2

    @property
    def nvlink_bytes_per_s(self) -> float:
        return float(self.capacity[NVLINK_OUT])

    @property
    def nic_bytes_per_s(self) -> float:
        return float(self.capacity[NIC_OUT])

    def link_id(self, gpu: Index, port: int) -> Index:
        """Link of ``gpu``'s ``port`` (:data:`NVLINK_OUT` … :data:`NIC_IN`); elementwise for
        an array of GPUs."""
        return len(PORTS) * gpu + port

    def leaf_link(self, leaf: Index, downlink: bool) -> Index:
        """Uplink (or downlink) of leaf switch ``leaf``; elementwise for an array of leaves."""
        return self.gpu_links + len(LEAF_PORTS) * leaf + int(downlink)

    def link_name(self, link: int) -> str:
        if link < self.gpu_links:
            gpu, port = divmod(link, len(PORTS))
            return f"gpu{gpu}.{PORTS[port]}"
        leaf, port = divmod(link - self.gpu_links, len(LEAF_PORTS))
        return f"leaf{leaf}.{LEAF_PORTS[port]}"

    def node_of(self, gpu: int) -> int:
        return gpu // self.gpus_per_node

    def domain_of(self, gpus: npt.ArrayLike) -> npt.NDArray[np.int64]:
        return np.asarray(gpus) // self.domain

    def leaf_of(self, gpus: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Leaf switch of each GPU's NIC."""
        g = np.asarray(gpus)
        if self.kind == "fat_tree":
            return g // self.leaf_nics
        per_rail = -(-self.nodes // self.leaf_nics)
        return (g % self.gpus_per_node) * per_rail + (g // self.gpus_per_node) // self.leaf_nics

    def path(self, src: int, dst: int) -> list[int]:
        """Links crossed from ``src`` to ``dst`` (empty for a GPU to itself)."""
        if src == dst:
            return []
        if src // self.domain == dst // self.domain:
            return [self.link_id(src, NVLINK_OUT), self.link_id(dst, NVLINK_IN)]
        links: list[int] = []
        hop = src
        if self.kind == "multi_plane" and src % self.gpus_per_node != dst % self.gpus_per_node:
            # Forward over NVLink to the node-mate on the destination's plane.
            hop = src - src % self.gpus_per_node + dst % self.gpus_per_node
            links += [self.link_id(src, NVLINK_OUT), self.link_id(hop, NVLINK_IN)]
        links += [self.link_id(hop, NIC_OUT), self.link_id(dst, NIC_IN)]
        a, b = int(self.leaf_of(hop)), int(self.leaf_of(dst))
        if a != b:
            links += [self.leaf_link(a, False), self.leaf_link(b, True)]
        return links

    def latency(self, src: int, dst: int) -> float:
        if src == dst:
            return 0.0
        if src // self.domain == dst // self.domain:
            return self.nvlink_latency_s
        hop, extra = src, 0.0
        if self.kind == "multi_plane" and src % self.gpus_per_node != dst % self.gpus_per_node:
            hop = src - src % self.gpus_per_node + dst % self.gpus_per_node
            extra = self.nvlink_latency_s
        crosses = int(self.leaf_of(hop)) != int(self.leaf_of(dst))
        if crosses and self.cross_leaf_latency_s is not None:
            return self.cross_leaf_latency_s + extra
        return self.nic_latency_s + extra


def build_topology(scenario: Scenario) -> Topology:
    c = scenario.cluster
    net = c.network
    nic = c.nic.bandwidth_bytes_per_s
    per_gpu = np.array([c.nvlink_bytes_per_s, c.nvlink_bytes_per_s, nic, nic])
    leaf_nics = net.leaf_nics
    if net.topology == "fat_tree":
        leaves = -(-c.gpus // leaf_nics)
        nics_per_leaf = min(leaf_nics, c.gpus)
    else:
        leaves = c.gpus_per_node * -(-c.nodes // leaf_nics)
        nics_per_leaf = min(leaf_nics, c.nodes)
    uplink = nics_per_leaf * nic / net.oversubscription
    cross = net.cross_leaf_latency_us
    return Topology(
        gpus=c.gpus,
        gpus_per_node=c.gpus_per_node,
        capacity=np.concatenate([np.tile(per_gpu, c.gpus), np.full(2 * leaves, uplink)]),
        nvlink_latency_s=units.microseconds(c.nvlink.latency_us),
        nic_latency_s=units.microseconds(c.nic.latency_us),
        kind=net.topology,
        domain_gpus=c.nvlink_domain_gpus,
        leaf_nics=leaf_nics,
        cross_leaf_latency_s=None if cross is None else units.microseconds(cross),
    )


@dataclass(frozen=True)
class Layout:
    """Which GPU is which rank, and where the layers and experts are."""

    stages: int
    expert: int
    data: int
    stage_layers: list[list[int]]
    """Model layer indices held by each pipeline stage."""
    experts_per_rank: int
    tensor: int = 1
    """Tensor-parallel degree of attention and dense layers (folded onto the same GPUs)."""
    context: int = 1
    """Context-parallel degree of attention and dense layers."""

    @property
    def gpus_per_stage(self) -> int:
        return self.expert * self.data

    def stage_gpus(self, stage: int) -> range:
        n = self.gpus_per_stage
        return range(stage * n, (stage + 1) * n)

    def ep_group(self, gpu: int) -> list[int]:
        """GPUs of ``gpu``'s expert-parallel group, ordered by expert-parallel rank."""
        first = gpu - gpu % self.expert
        return list(range(first, first + self.expert))

    def expert_slots(self, slots_per_rank: int) -> npt.NDArray[np.int64]:
        """Global index of each (GPU, local expert slot), shape (gpus, slots_per_rank): slot
        ``l`` of expert-parallel rank ``r`` is ``r · slots_per_rank + l`` (the routed expert
        itself under the static placement, where ``slots_per_rank = experts_per_rank``)."""
        gpus = np.arange(self.stages * self.gpus_per_stage)
        return (gpus % self.expert)[:, None] * slots_per_rank + np.arange(slots_per_rank)

    def tp_group(self, gpu: int) -> list[int]:
        """GPUs of ``gpu``'s tensor-parallel group: ``tensor`` consecutive ranks (inside one
        node), ordered by tensor-parallel rank."""
        first = gpu - gpu % self.tensor
        return list(range(first, first + self.tensor))

    def cp_group(self, gpu: int) -> list[int]:
        """GPUs of ``gpu``'s context-parallel ring: same tensor-parallel rank, the
        ``context`` consecutive TP groups of its block."""
        block = self.tensor * self.context
        first = gpu - gpu % block + gpu % self.tensor
        return list(range(first, first + block, self.tensor))

    def attention_dp_peers(self, gpu: int) -> list[int]:
        """GPUs of the same stage holding the same attention and dense-layer shard (the same
        tensor-parallel rank; context-parallel ranks hold the same weights): the group that
        reduces the non-expert gradients."""
        stage = gpu // self.gpus_per_stage
        base = stage * self.gpus_per_stage
        return list(range(base + gpu % self.tensor, base + self.gpus_per_stage, self.tensor))

    def dp_peers(self, gpu: int) -> list[int]:
        """GPUs of the same stage holding the same experts (expert-data-parallel group)."""
        stage = gpu // self.gpus_per_stage
        ep_rank = gpu % self.expert
        base = stage * self.gpus_per_stage
        return [base + g * self.expert + ep_rank for g in range(self.data)]


def build_layout(scenario: Scenario) -> Layout:
    p, m = scenario.parallelism, scenario.model
    split = np.array_split(np.arange(m.layers), p.pipeline)
    return Layout(
        stages=p.pipeline,
        expert=p.expert,
        data=p.data,
        stage_layers=[[int(x) for x in s] for s in split],
        experts_per_rank=0 if m.moe is None else m.moe.routed_experts // p.expert,
        tensor=p.tensor,
        context=p.context,
    )
