"""Static cluster description: GPUs, links, paths, and where ranks and experts live.

Each GPU has four directed ports: NVLink out/in to its node's NVSwitch and NIC out/in to the
InfiniBand fabric. A transfer inside a node crosses the sender's NVLink-out and the receiver's
NVLink-in; between nodes it crosses the sender's NIC-out and the receiver's NIC-in, the fabric
itself being non-blocking (a two-layer fat-tree at full bisection). Contention therefore appears
where it does on real machines with a non-blocking fabric: at the ports (incast at a hot
receiver, fan-out at a busy sender). Link capacities already include the link efficiency.

Rank layout (see :mod:`moesim.scenario.schema`): GPU ``g`` is global rank ``g``; stage
``g // (expert·data)``; inside the stage, index ``i = g % (expert·data)``, expert-parallel rank
``i % expert`` of expert-parallel group ``i // expert``. Routed expert ``e`` lives on
expert-parallel rank ``e // (experts / expert)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moesim import units
from moesim.scenario.schema import Scenario

PORTS = ("nvlink_out", "nvlink_in", "nic_out", "nic_in")
NVLINK_OUT, NVLINK_IN, NIC_OUT, NIC_IN = range(4)


@dataclass(frozen=True)
class Topology:
    """Links of the cluster and the path between any two GPUs."""

    gpus: int
    gpus_per_node: int
    capacity: npt.NDArray[np.float64]
    """Usable bandwidth per link, bytes/s, shape (4 · gpus,)."""
    nvlink_latency_s: float
    nic_latency_s: float

    @property
    def links(self) -> int:
        return len(self.capacity)

    def link_id(self, gpu: int, port: int) -> int:
        return 4 * gpu + port

    def link_name(self, link: int) -> str:
        return f"gpu{link // 4}.{PORTS[link % 4]}"

    def node_of(self, gpu: int) -> int:
        return gpu // self.gpus_per_node

    def path(self, src: int, dst: int) -> list[int]:
        """Links crossed from ``src`` to ``dst`` (empty for a GPU to itself)."""
        if src == dst:
            return []
        if self.node_of(src) == self.node_of(dst):
            return [4 * src + NVLINK_OUT, 4 * dst + NVLINK_IN]
        return [4 * src + NIC_OUT, 4 * dst + NIC_IN]

    def latency(self, src: int, dst: int) -> float:
        if src == dst:
            return 0.0
        same_node = self.node_of(src) == self.node_of(dst)
        return self.nvlink_latency_s if same_node else self.nic_latency_s


def build_topology(scenario: Scenario) -> Topology:
    c = scenario.cluster
    per_gpu = np.array(
        [
            c.nvlink_bytes_per_s,
            c.nvlink_bytes_per_s,
            c.nic.bandwidth_bytes_per_s,
            c.nic.bandwidth_bytes_per_s,
        ]
    )
    return Topology(
        gpus=c.gpus,
        gpus_per_node=c.gpus_per_node,
        capacity=np.tile(per_gpu, c.gpus),
        nvlink_latency_s=units.microseconds(c.nvlink.latency_us),
        nic_latency_s=units.microseconds(c.nic.latency_us),
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
        experts_per_rank=m.moe.routed_experts // p.expert,
    )
