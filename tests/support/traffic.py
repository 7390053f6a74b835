"""Topologies and traffic matrices shared by the exchange tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from moesim.cluster.topology import Topology, build_topology
from moesim.scenario import scenario_from_dict

Array = npt.NDArray[np.float64]
MB = 1e6
FP8_TOKEN = 7168 + 4 * 56  # bytes per dispatched token: FP8 hidden + one scale per 128


def h800_topology(base: dict[str, Any], nodes: int, **network: Any) -> Topology:
    """Topology of ``nodes`` × 8 H800 from scenario ``base`` (a valid scenario dict): NVLink
    160 GB/s, NIC 50 GB/s per direction; ``network`` goes to ``cluster.network``."""
    d = dict(base)
    gpus = nodes * 8
    d["cluster"] = {
        **base["cluster"],
        "gpu": "H800",
        "nodes": nodes,
        "gpus_per_node": 8,
        "nvlink": {"latency_us": 3.33, "efficiency": 0.8},
        "nic": {"bandwidth_gbits_per_s": 400, "latency_us": 2.8, "efficiency": 1.0},
        "network": network,
    }
    d["model"] = {**base["model"], "moe": {**base["model"]["moe"], "routed_experts": 256}}
    d["parallelism"] = {"pipeline": 1, "expert": gpus, "data": 1, "micro_batch_size": 1}
    d["training"] = {**base["training"], "global_batch_sequences": gpus}
    d["gate"] = {**base["gate"], "batch_sequences": gpus}
    return build_topology(scenario_from_dict(d))


def routed(
    rng: np.random.Generator, ranks: int, tokens: int, popularity: Array | None = None
) -> tuple[Array, Array]:
    """Tokens each rank sends to each rank and to each 8-GPU node under top-8 routing over
    256 experts (``popularity`` scales the experts' scores): (ranks, ranks), (ranks, nodes)."""
    experts, top_k = 256, 8
    nodes = max(1, ranks // 8)
    to_rank = np.zeros((ranks, ranks))
    to_node = np.zeros((ranks, nodes))
    for s in range(ranks):
        scores = np.abs(rng.standard_normal((tokens, experts))) + 1.0
        if popularity is not None:
            scores *= popularity
        chosen = np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]
        hit = np.zeros((tokens, ranks), dtype=bool)
        np.put_along_axis(hit, chosen // (experts // ranks), True, axis=1)
        to_rank[s] = hit.sum(axis=0)
        to_node[s] = hit.reshape(tokens, nodes, -1).any(axis=2).sum(axis=0)
    return to_rank, to_node


def hot(n: int, member: int, receiver: bool) -> Array:
    """1 MB between every pair, 6 MB to (or from) ``member``."""
    sizes = np.full((1, n, n), 1 * MB)
    if receiver:
        sizes[:, :, member] = 6 * MB
    else:
        sizes[:, member, :] = 6 * MB
    return sizes
