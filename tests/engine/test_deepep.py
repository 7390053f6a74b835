"""DeepEP's normal-kernel benchmark, reproduced with the engine's exchange tables.

What DeepEP measures (deepseek-ai/DeepEP ``tests/test_intranode.py``, ``tests/test_internode.py``):

- Routing: every rank draws 4,096 tokens with scores ``|N(0, 1)| + 1`` over 256 experts
  (intranode: ``(256 // ranks) · ranks``). Internode, the experts form one group per node, a
  group scores its best expert, each token keeps the top ``min(nodes, 4)`` groups and then
  picks its top-8 experts among them. Expert ``e`` lives on rank ``e // (256 / ranks)``.
- Bytes counted: FP8 dispatch moves ``7168`` bytes plus one 4-byte scale per 128 values
  (``56 · 4``), 7,392 bytes a token (``fp8_factor = (1 + 4/128) / 2`` of BF16); the BF16
  combine 14,336. Intranode the figure is ``recv_x.numel()``: the tokens rank 0 *receives*,
  its own included. Internode it is the "RDMA" figure, ``num_rdma_token_sent``: rank 0's
  (token, destination node) pairs, *its own node included*. Both count bytes that never cross
  the reported link (a rank's tokens for its own experts, a node's tokens for itself).
- Time: rank 0's kernel time (the mean over repetitions), best chunk configuration.

The model: the same routing statistics (NumPy, seeded, every rank drawn), priced by the
engine's exchange tables (:class:`~moesim.engine.exchange_tables.ExchangeTables`) on H800
nodes (plain all-to-all inside a node for EP8, node-limited dispatch and combine for
EP16-64), all ranks ready together; the bandwidth is DeepEP's counted bytes over the
exchange's makespan (rank 0's own done time is within 1% of it).

Link efficiencies, from link specifications, not from this benchmark: NVLink 160 GB/s per
direction (0.8 of the H800's 200), the H800 NVLink bandwidth DeepSeek states (DeepSeek-V3
report §3.2.2 "NVLink offers a bandwidth of 160 GB/s"; DeepEP's README "H800 (~160 GB/s NVLink
maximum bandwidth)"); InfiniBand 50 GB/s (1.0 of a CX7's 400 Gb/s; DeepEP's README "~50 GB/s
maximum bandwidth"). The efficiencies in the reference notes (153/200 and 45/50) are taken from
this very benchmark, so comparing with them would be circular.

Result (model vs measured, GB/s; measured after DeepEP's April 2025 internode optimisation):

====  ========  ===========  ========  ===========
EP    dispatch  measured     combine   measured
====  ========  ===========  ========  ===========
8     181.8     153 (+19%)   182.1     158 (+15%)
16    55.3      43 (+29%)    55.3      43 (+29%)
32    65.9      58 (+14%)    66.1      57 (+16%)
64    55.9      51 (+10%)    55.9      50 (+12%)
====  ========  ===========  ========  ===========

The model is optimistic everywhere; three of eight points are within 15%. Why:

- In the model every exchange runs at the line rate of its bottleneck link. DeepEP's kernels
  do not: rank 0 of EP8 receives 160.6 MB, of which 7/8 over NVLink, so 153 GB/s counted is
  134 GB/s on the wire, 84% of 160. At EP16 the model's bottleneck is NVLink
  forwarding at the relays (half of the counted "RDMA" pairs are a node's tokens for itself,
  and the InfiniBand carries only 21.5 GB/s), and 43 GB/s counted is 124 GB/s on the relays'
  NVLink, 78% of 160: DeepEP's README calls EP16 RDMA-bound, but by its own byte counts it is
  not. At EP32 and EP64 InfiniBand is the bottleneck; the measured figures are 43.8 and
  45.5 GB/s on the busiest NIC, 88% and 91% of 50.
- So the gap is one constant per link kind, the fraction of line rate that DeepEP's kernels
  reach (copy engines on 20-24 SMs, chunked buffers with per-chunk signalling, launch and
  barrier costs), not a mistake in which link limits or how bytes scale with EP: calibrating
  that constant on one point per link kind (EP8 dispatch for NVLink, EP64 dispatch for
  InfiniBand) predicts the other six points within 9% (``test_one_kernel_efficiency_per_link``).
- For scenario files this means: a link efficiency meant to reproduce DeepEP should be its
  wire-level fraction, about 0.67 of NVLink's 200 GB/s (134 GB/s) and 0.9 of the NIC, not
  153/200, which counts a rank's own tokens as NVLink traffic.
- The pre-optimisation internode figures (EP32 44/47, EP64 46/45 GB/s) were kernel limits that
  DeepEP has since removed; the model is not compared with them.
"""

from __future__ import annotations

from math import comb
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from moesim.cluster.topology import Topology, build_topology
from moesim.engine.alltoall import ExchangePorts, LinkLoad
from moesim.engine.exchange_tables import ExchangeTables
from moesim.scenario import scenario_from_dict

Array = npt.NDArray[np.float64]

TOKENS, HIDDEN, TOP_K, EXPERTS = 4096, 7168, 8, 256
FP8_TOKEN = HIDDEN + HIDDEN // 128 * 4  # FP8 values + one FP32 scale per 128 of them
BF16_TOKEN = 2 * HIDDEN
# DeepEP README, H800 + CX7, normal kernels (GB/s): EP → (dispatch, combine).
MEASURED = {8: (153.0, 158.0), 16: (43.0, 43.0), 32: (58.0, 57.0), 64: (51.0, 50.0)}
NVLINK_SPEC = 160.0 / 200.0  # DeepSeek's stated H800 NVLink bandwidth over the nominal
NIC_SPEC = 50.0 / 50.0  # CX7 400 Gb/s


def deepep_routing(rng: np.random.Generator, ranks: int) -> tuple[Array, Array]:
    """Tokens each rank sends to each rank and to each node, routed as DeepEP's tests do:
    (ranks, ranks), (ranks, nodes). A token counts once per destination rank and node."""
    nodes = max(1, ranks // 8)
    groups = min(nodes, 4)
    per_rank = EXPERTS // ranks
    to_rank = np.zeros((ranks, ranks))
    to_node = np.zeros((ranks, nodes))
    for s in range(ranks):
        scores = np.abs(rng.standard_normal((TOKENS, EXPERTS), dtype=np.float32)) + 1.0
        if groups < nodes:
            best = scores.reshape(TOKENS, nodes, -1).max(axis=2)
            kept = np.argpartition(-best, groups - 1, axis=1)[:, :groups]
            allowed = np.zeros((TOKENS, nodes), dtype=bool)
            np.put_along_axis(allowed, kept, True, axis=1)
            scores *= np.repeat(allowed, EXPERTS // nodes, axis=1)  # scores ≥ 1 elsewhere
        chosen = np.argpartition(-scores, TOP_K - 1, axis=1)[:, :TOP_K]
        hit = np.zeros((TOKENS, ranks), dtype=bool)
        np.put_along_axis(hit, chosen // per_rank, True, axis=1)
        to_rank[s] = hit.sum(axis=0)
        to_node[s] = hit.reshape(TOKENS, nodes, -1).any(axis=2).sum(axis=0)
    return to_rank, to_node


@pytest.fixture(scope="module")
def routing() -> dict[int, tuple[Array, Array]]:
    """Routing of EP8 to EP64, one seeded stream each."""
    seeds = np.random.SeedSequence(2025).spawn(4)
    return {
        ep: deepep_routing(np.random.default_rng(seed), ep)
        for ep, seed in zip((8, 16, 32, 64), seeds, strict=True)
    }


def h800(base: dict[str, Any], nodes: int, nvlink: float, nic: float) -> Topology:
    """``nodes`` × 8 H800 (NVLink 400 GB/s aggregate), one CX7 400 Gb/s NIC per GPU, on
    DeepSeek's multi-plane fabric; 64-byte latencies from arXiv 2505.09343 Table 5."""
    d = dict(base)
    gpus = 8 * nodes
    d["cluster"] = {
        **base["cluster"],
        "gpu": "H800",
        "nodes": nodes,
        "gpus_per_node": 8,
        "nvlink": {"latency_us": 3.33, "efficiency": nvlink},
        "nic": {"bandwidth_gbits_per_s": 400, "latency_us": 2.8, "efficiency": nic},
        "network": {"topology": "multi_plane"},
    }
    d["model"] = {**base["model"], "moe": {**base["model"]["moe"], "routed_experts": EXPERTS}}
    d["parallelism"] = {
        "pipeline": 1,
        "expert": gpus,
        "data": 1,
        "micro_batch_size": 1,
        "dispatch": "node_limited" if nodes > 1 else "all_to_all",
    }
    d["training"] = {**base["training"], "global_batch_sequences": gpus}
    d["gate"] = {**base["gate"], "batch_sequences": gpus}
    return build_topology(scenario_from_dict(d))


def bandwidth(
    base: dict[str, Any], ep: int, routed: tuple[Array, Array], nvlink: float, nic: float
) -> tuple[float, float, LinkLoad]:
    """DeepEP's dispatch and combine bandwidths (GB/s) as the model prices them, and the
    dispatch's link load."""
    to_rank, to_node = routed
    topo = h800(base, max(1, ep // 8), nvlink, nic)
    gpus = np.arange(ep)[None]
    ready = np.zeros((1, ep))
    # DeepEP's counted tokens on rank 0: received (intranode) or (token, node) pairs sent.
    counted = to_rank[:, 0].sum() if ep == 8 else to_node[0].sum()
    result: list[float] = []
    loads: list[LinkLoad] = []
    for per_token, combine in ((FP8_TOKEN, False), (BF16_TOKEN, True)):
        load = LinkLoad.zeros(topo.links)
        ports = ExchangePorts(topo, gpus, load)
        node_tokens = None if ep == 8 else to_node[None, None]
        tables = ExchangeTables(ports, to_rank[None, None], node_tokens)
        done, _ = tables.exchange(ready, 0, toward_experts=not combine, per_token=per_token)
        uses = np.zeros((1, 2))
        uses[0, int(combine)] = per_token
        tables.charge(ports, uses)
        result.append(counted * per_token / done.max() / 1e9)
        loads.append(load)
    return result[0], result[1], loads[0]


def test_token_bytes() -> None:
    """DeepEP's FP8 factor (1 + 4/128) / 2 of BF16 is 7,168 FP8 bytes plus 56 FP32 scales."""
    assert FP8_TOKEN == 7168 + 56 * 4 == 7392
    assert pytest.approx(2 * HIDDEN * (1 + 4 / 128) / 2, rel=1e-15) == FP8_TOKEN
    assert BF16_TOKEN == 14336


def test_routing_statistics(routing: dict[int, tuple[Array, Array]]) -> None:
    """Distinct ranks and nodes per token match the combinatorics of a uniform top-8 draw
    (EP8-32 keep every node), and EP64's group limit caps a token at 4 nodes."""

    def distinct(groups: int, size: int) -> float:
        # expected groups of ``size`` experts hit by 8 distinct experts out of 256
        return groups * (1 - comb(EXPERTS - size, TOP_K) / comb(EXPERTS, TOP_K))

    tokens = {ep: ep * TOKENS for ep in routing}
    for ep, (to_rank, to_node) in routing.items():
        ranks_per_token = to_rank.sum() / tokens[ep]
        nodes_per_token = to_node.sum() / tokens[ep]
        if ep <= 32:
            assert ranks_per_token == pytest.approx(distinct(ep, EXPERTS // ep), rel=0.005)
            nodes = max(1, ep // 8)
            assert nodes_per_token == pytest.approx(distinct(nodes, EXPERTS // nodes), rel=0.005)
    # EP64: 4 of 8 nodes; within them the best expert of each kept group nearly always wins.
    to_rank, to_node = routing[64]
    assert 3.95 < to_node.sum() / tokens[64] <= 4.0
    assert to_node.sum(axis=1).max() <= 4 * TOKENS


def test_bandwidth_with_link_spec_efficiencies(
    tiny_dict: dict[str, Any], routing: dict[int, tuple[Array, Array]]
) -> None:
    """With link-spec efficiencies the model lands within 15% of DeepEP where its kernels
    come closest to line rate (EP64, EP32 dispatch), and is optimistic elsewhere by what the
    kernels leave of the line rate (the module docstring has the analysis). The other points
    are pinned to the measured gap, so that a change of the model shows."""
    gap = {}
    for ep, routed in routing.items():
        dispatch, combine, _ = bandwidth(tiny_dict, ep, routed, NVLINK_SPEC, NIC_SPEC)
        gap[ep] = (dispatch / MEASURED[ep][0] - 1, combine / MEASURED[ep][1] - 1)
    assert abs(gap[64][0]) < 0.15
    assert abs(gap[64][1]) < 0.15
    assert abs(gap[32][0]) < 0.15
    # Beyond 15%: DeepEP's NVLink kernels reach 78-84% of 160 GB/s, its RDMA 88% of 50 GB/s.
    assert gap[32][1] == pytest.approx(0.159, abs=0.02)
    assert gap[8][0] == pytest.approx(0.188, abs=0.02)
    assert gap[8][1] == pytest.approx(0.153, abs=0.02)
    assert gap[16][0] == pytest.approx(0.286, abs=0.02)
    assert gap[16][1] == pytest.approx(0.286, abs=0.02)


def test_bottleneck_links_and_wire_rates(
    tiny_dict: dict[str, Any], routing: dict[int, tuple[Array, Array]]
) -> None:
    """The model's busiest link is NVLink for EP8 and EP16 and InfiniBand for EP32 and EP64;
    DeepEP's measured figures, turned into bytes on that link per second, are a steady
    fraction of its line rate (measured: NVLink 83.8% and 77.6% of 160 GB/s, InfiniBand 87.6%
    and 91.0% of 50 GB/s)."""
    for ep, routed in routing.items():
        to_rank, to_node = routed
        _, _, load = bandwidth(tiny_dict, ep, routed, NVLINK_SPEC, NIC_SPEC)
        busy = load.busy_s[: 4 * ep].reshape(ep, 4)  # nvlink out, in, nic out, in
        carried = load.bytes[: 4 * ep].reshape(ep, 4)
        counted = (to_rank[:, 0].sum() if ep == 8 else to_node[0].sum()) * FP8_TOKEN
        measured_s = counted / (MEASURED[ep][0] * 1e9)
        nvlink_bound = busy[:, :2].max() > busy[:, 2:].max()
        assert nvlink_bound == (ep <= 16)
        if nvlink_bound:  # the busiest NVLink port's bytes in DeepEP's time, over 160 GB/s
            assert 0.75 < carried[:, :2].max() / measured_s / 160e9 < 0.86
        else:
            assert 0.85 < carried[:, 2:].max() / measured_s / 50e9 < 0.92


def test_one_kernel_efficiency_per_link(
    tiny_dict: dict[str, Any], routing: dict[int, tuple[Array, Array]]
) -> None:
    """One efficiency per link kind, calibrated on one benchmark point each (NVLink on EP8
    dispatch, InfiniBand on EP64 dispatch: circular for those two, which are not asserted),
    predicts the other six within 10%. Measured: EP8 combine -3.0%, EP16 +8.3% / +8.3%,
    EP32 +3.8% / +5.8%, EP64 combine +2.2%; the calibrated efficiencies are 0.673 of NVLink's
    200 GB/s (135 GB/s) and 0.913 of the NIC's 50 GB/s."""
    ep8, _, _ = bandwidth(tiny_dict, 8, routing[8], NVLINK_SPEC, NIC_SPEC)
    ep64, _, _ = bandwidth(tiny_dict, 64, routing[64], NVLINK_SPEC, NIC_SPEC)
    # Both are link-bound, so bandwidth scales with the bottleneck's efficiency.
    nvlink = NVLINK_SPEC * MEASURED[8][0] / ep8
    nic = NIC_SPEC * MEASURED[64][0] / ep64
    assert nvlink == pytest.approx(0.675, abs=0.01)
    assert nic == pytest.approx(0.913, abs=0.01)
    for ep, routed in routing.items():
        dispatch, combine, _ = bandwidth(tiny_dict, ep, routed, nvlink, nic)
        if ep not in (8, 64):
            assert dispatch == pytest.approx(MEASURED[ep][0], rel=0.10)
        assert combine == pytest.approx(MEASURED[ep][1], rel=0.10)
    assert bandwidth(tiny_dict, 8, routing[8], nvlink, nic)[0] == pytest.approx(153.0, rel=1e-3)
