"""The engine's exchange tables against the per-call closed form and the flow-level reference.

:class:`~moesim.engine.exchange_tables.ExchangeTables` is what the engine runs: per-flow
durations computed once per routing cell with every sender starting together, replayed for each
exchange as ``done[d] = max(r[d], max_s (r[s] + T[s, d]))``. Two references check it:

- the per-call closed form (:mod:`tests.support.closed_form`), the same port bounds evaluated
  for one exchange from the senders' actual ready times. With synchronous senders the engine
  equals it on every fabric, plain and node-limited, to rounding; the one exception is a
  multi-plane fabric's plain exchange, where the closed form charges a receiver's in-port
  backlog to its slowest path (one NVLink hop more) and the tables to each flow's own path, so
  the engine is earlier by at most one NVLink latency
  (``test_tables_equal_the_closed_form_with_synchronous_senders``). The closed form's error
  against the flow-level reference (``test_alltoall.py``) is then the engine's error for
  synchronous senders.
- the flow-level reference (:mod:`tests.support.flow_reference`, max-min fair sharing flow by
  flow) for staggered senders, where the engine and the closed form part ways. A late sender's
  flows meet the contention they would have met at a common start, so the engine is mostly
  late where the closed form is early. Measured (makespan error relative to the reference's
  duration; receivers' extremes):

  - routing-derived EP16, ready times spread over 100 µs: +4% to +10%, receivers up to +10%;
    EP8: +12% to +28% (the closed form: -7% and -13%);
  - EP32 with log-normal (σ = 0.5) traffic, ready times spread over 300 µs: multi-plane +21%
    (receivers +8% to +30%), rail 4:1 +5.7%, fat-tree 4:1 +6.9%, fat-tree 2:1 +15%
    (receivers up to +21%), NVL16 +6.3%;
  - node-limited dispatch and combine with a straggler (on the sender's node or the other) or
    spread ready times: makespan within 1.2% of the pipelined limit of the two-hop reference,
    receivers within 4.4%.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from moesim.cluster.topology import Topology
from moesim.engine import kernels
from moesim.engine.alltoall import ExchangePorts, LinkLoad
from moesim.engine.exchange_tables import ExchangeTables
from tests.support import closed_form
from tests.support.flow_reference import reference_all_to_all, reference_node_limited
from tests.support.traffic import FP8_TOKEN, MB, h800_topology, hot, routed

Array = npt.NDArray[np.float64]
BF16_TOKEN = 2 * 7168

FABRICS: dict[str, tuple[int, dict[str, Any]]] = {
    "EP8": (1, {}),
    "EP16": (2, {}),
    "EP32": (4, {}),
    "EP64-two-leaves": (8, {}),
    "rail-4to1": (4, {"topology": "rail_optimized", "leaf_nics": 2, "oversubscription": 4}),
    "fat-tree-4to1": (4, {"topology": "fat_tree", "leaf_nics": 8, "oversubscription": 4}),
    "fat-tree-2to1": (4, {"topology": "fat_tree", "leaf_nics": 16, "oversubscription": 2}),
    "cross-leaf-latency": (4, {"leaf_nics": 8, "cross_leaf_latency_us": 5.0}),
    "nvl16": (4, {"nvlink_domain_gpus": 16}),
    "multi-plane": (4, {"topology": "multi_plane", "leaf_nics": 2}),
}
NODE_LIMITED = ["EP16", "EP32", "rail-4to1", "fat-tree-4to1", "multi-plane"]


@pytest.fixture
def make_topology(tiny_dict: dict[str, Any]) -> Callable[..., Topology]:
    """:func:`h800_topology` on the tiny scenario."""
    return partial(h800_topology, tiny_dict)


def traffic(rng: np.random.Generator, n: int) -> tuple[Array, Array]:
    """Token matrices of five routing cells (cells, 1, n, n) and their per-node counts
    (cells, 1, n, nodes): uniform, a hot receiver, a hot sender, log-normal and routed."""
    cells = [
        np.full((1, n, n), 2 * MB),
        hot(n, 5, receiver=True),
        hot(n, 5, receiver=False),
        rng.lognormal(0.0, 1.0, (1, n, n)) * MB,
    ]
    to_rank, to_node = routed(rng, n, 256)
    tokens = np.stack([*(np.round(c / FP8_TOKEN) for c in cells), to_rank[None]])
    # Per-node counts of the first four cells: every token to a node counts once per GPU
    # there (no sharing), bounded by the routed cell's realistic sharing in the last.
    nodes = max(1, n // 8)
    per_node = tokens.reshape(*tokens.shape[:-1], nodes, -1).max(axis=-1)
    per_node[-1] = to_node[None]
    return tokens, per_node


def tables_for(topo: Topology, tokens: Array, node_tokens: Array | None) -> ExchangeTables:
    n = tokens.shape[-1]
    ports = ExchangePorts(topo, np.arange(n)[None], LinkLoad.zeros(topo.links))
    return ExchangeTables(ports, tokens, node_tokens)


def engine(tables: ExchangeTables, ready: Array, cell: int, toward: bool, per_token: float):
    return tables.exchange(ready, cell, toward_experts=toward, per_token=per_token)


# --------------------------------------------------------------------------- engine = closed form


@pytest.mark.parametrize("fabric", FABRICS, ids=str)
def test_tables_equal_the_closed_form_with_synchronous_senders(
    make_topology: Callable[..., Topology], fabric: str
) -> None:
    nodes, network = FABRICS[fabric]
    topo = make_topology(nodes, **network)
    n = 8 * nodes
    tokens, per_node = traffic(np.random.default_rng(nodes), n)
    ready = np.zeros((1, n))
    plain = tables_for(topo, tokens, None)
    node_limited = tables_for(topo, tokens, per_node) if fabric in NODE_LIMITED else None
    ports = plain.ports
    for cell in range(tokens.shape[0]):
        for toward, per_token in ((True, FP8_TOKEN), (False, BF16_TOKEN)):
            sizes = tokens[cell] * per_token
            done, last = engine(plain, ready, cell, toward, per_token)
            ref = closed_form.all_to_all(ports, ready, sizes if toward else sizes.swapaxes(1, 2))
            tol = 1e-12 * ref.max()
            if network.get("topology") == "multi_plane":
                assert np.all(done <= ref + tol)
                assert np.all(done >= ref - topo.nvlink_latency_s - tol)
            else:
                assert done == pytest.approx(ref, abs=tol, rel=0)
            assert np.all(last == ready)  # every sender is ready at 0
            if node_limited is None:
                continue
            done, _ = engine(node_limited, ready, cell, toward, per_token)
            fn = closed_form.node_limited_dispatch if toward else closed_form.node_limited_combine
            ref = fn(ports, ready, per_node[cell] * per_token, sizes)
            assert done == pytest.approx(ref, abs=1e-12 * ref.max(), rel=0)


def test_replay_shifts_each_sender_by_its_delay(make_topology: Callable[..., Topology]) -> None:
    """A common delay shifts every receiver by it; a late sender holds up only the receivers
    it sends to, by its delay at most; each receiver's last sender is its latest sender."""
    topo = make_topology(2)
    n = 16
    tokens = np.full((1, 1, n, n), 100.0)
    tokens[0, 0, 3, :8] = 0.0  # sender 3 sends only to the other node
    tables = tables_for(topo, tokens, None)
    sync, _ = engine(tables, np.zeros((1, n)), 0, True, FP8_TOKEN)
    shifted, _ = engine(tables, np.full((1, n), 1e-3), 0, True, FP8_TOKEN)
    assert shifted == pytest.approx(sync + 1e-3, rel=1e-12)
    ready = np.zeros((1, n))
    ready[0, 3] = 1e-3
    done, last = engine(tables, ready, 0, True, FP8_TOKEN)
    others = np.arange(8) != 3
    assert done[0, :8][others] == pytest.approx(sync[0, :8][others], rel=1e-12)
    assert np.all(done[0, 8:] > 1e-3)
    assert np.all(done[0, 8:] <= sync[0, 8:] + 1e-3 + 1e-12)
    assert np.all(last[0, 8:] == 1e-3)
    assert np.all(last[0, :8][others] == 0.0)


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")
@pytest.mark.parametrize("node_limited", [False, True], ids=["plain", "node-limited"])
def test_compiled_replay_equals_numpy_bit_for_bit(
    make_topology: Callable[..., Topology], monkeypatch: pytest.MonkeyPatch, node_limited: bool
) -> None:
    """The compiled exchange replay and its NumPy twin (with its shift to the earliest sender
    and result cache) agree exactly, not to rounding, on staggered senders with exact ties, in
    both directions, two expert-parallel groups."""
    topo = make_topology(4)  # two groups of two nodes
    n = 16
    tokens, per_node = traffic(np.random.default_rng(7), n)
    tokens = np.concatenate([tokens, tokens[::-1]], axis=1)  # (cells, 2 groups, n, n)
    per_node = np.concatenate([per_node, per_node[::-1]], axis=1)
    gpus = np.arange(2 * n).reshape(2, n)
    ports = ExchangePorts(topo, gpus, LinkLoad.zeros(topo.links))
    tables = ExchangeTables(ports, tokens, per_node if node_limited else None)
    rng = np.random.default_rng(8)
    for cell in range(tokens.shape[0]):
        for toward, per_token in ((True, FP8_TOKEN), (False, BF16_TOKEN)):
            ready = 5.0 + np.round(rng.uniform(0.0, 1e-3, (2, n)), 5)  # rounded: ties
            monkeypatch.setattr(kernels, "ENABLED", True)
            fast = tables.exchange(ready, cell, toward, per_token)
            monkeypatch.setattr(kernels, "ENABLED", False)
            slow = tables.exchange(ready, cell, toward, per_token)
            assert np.array_equal(fast[0], slow[0])
            assert np.array_equal(fast[1], slow[1])
            assert np.all(fast[0] >= ready)


# --------------------------------------------------------------------------- flow-level reference


def errors(model: Array, ref: Array, ready: Array) -> tuple[float, Array]:
    """Makespan error and per-receiver errors, relative to the reference's duration."""
    span = ref.max() - ready.min()
    return float((model.max() - ref.max()) / span), (model - ref).ravel() / span


@pytest.mark.parametrize(("nodes", "late"), [(1, (0.10, 0.30)), (2, (0.03, 0.12))])
def test_routing_derived_staggered(
    make_topology: Callable[..., Topology], nodes: int, late: tuple[float, float]
) -> None:
    """Top-8-of-256 routing with skewed popularity, ready times spread over 100 µs: the
    replay is late, never early (measured EP8 +12% to +28%, EP16 +4% to +10%)."""
    topo = make_topology(nodes)
    n = 8 * nodes
    rng = np.random.default_rng(11)
    for _ in range(4):
        to_rank, _ = routed(rng, n, 512, rng.lognormal(0.0, 0.7, 256))
        ready = rng.uniform(0, 100e-6, (1, n))
        model, _ = engine(tables_for(topo, to_rank[None, None], None), ready, 0, True, FP8_TOKEN)
        ref, _ = reference_all_to_all(topo, np.arange(n)[None], ready, to_rank[None] * FP8_TOKEN)
        makespan, per_receiver = errors(model, ref, ready)
        assert late[0] < makespan < late[1]
        assert per_receiver.min() > -0.001
        assert per_receiver.max() < late[1]


@pytest.mark.parametrize(
    ("fabric", "late"),
    [("multi-plane", 0.25), ("rail-4to1", 0.10), ("fat-tree-4to1", 0.10), ("nvl16", 0.10)]
    + [("fat-tree-2to1", 0.20)],
)
def test_fabrics_staggered(
    make_topology: Callable[..., Topology], fabric: str, late: float
) -> None:
    """EP32, log-normal (σ = 0.5) traffic, ready times spread over 300 µs: the replay's
    makespan is late by a few to 21 per cent (see the module docstring), receivers within
    -4% and +31%."""
    nodes, network = FABRICS[fabric]
    topo = make_topology(nodes, **network)
    n = 32
    rng = np.random.default_rng(2)
    sizes = rng.lognormal(0.0, 0.5, (1, n, n)) * MB
    ready = rng.uniform(0, 300e-6, (1, n))
    model, _ = engine(tables_for(topo, sizes[None], None), ready, 0, True, 1.0)
    ref, _ = reference_all_to_all(topo, np.arange(n)[None], ready, sizes)
    makespan, per_receiver = errors(model, ref, ready)
    assert 0.03 < makespan < late
    assert per_receiver.min() > -0.05
    assert per_receiver.max() < late + 0.1


@pytest.mark.parametrize("combine", [False, True], ids=["dispatch", "combine"])
@pytest.mark.parametrize("straggler", [11, "spread"])
def test_node_limited_staggered(
    make_topology: Callable[..., Topology], straggler: int | str, combine: bool
) -> None:
    """EP16, DeepEP routing statistics: one GPU 300 µs late (on the sender's node or the
    other), or every GPU's ready time spread over 100 µs. Measured against the pipelined limit
    of the two-hop reference: makespan within 1.2%, receivers within 4.4%."""
    topo = make_topology(2)
    n = 16
    rng = np.random.default_rng(3)
    to_rank, to_node = routed(rng, n, 1024)
    if isinstance(straggler, int):
        ready = np.zeros((1, n))
        ready[0, straggler] = 300e-6
    else:
        ready = rng.uniform(0, 100e-6, (1, n))
    tables = tables_for(topo, to_rank[None, None], to_node[None, None])
    model, _ = engine(tables, ready, 0, not combine, FP8_TOKEN)
    rank_bytes, node_bytes = to_rank[None] * FP8_TOKEN, to_node[None] * FP8_TOKEN
    gpus = np.arange(n)[None]
    coarse, _ = reference_node_limited(topo, gpus, ready, node_bytes, rank_bytes, 4, combine)
    fine, _ = reference_node_limited(topo, gpus, ready, node_bytes, rank_bytes, 16, combine)
    limit = (16 * fine - 4 * coarse) / 12  # the pipeline fill costs one piece: error ∝ 1/chunks
    span = limit.max() - ready.min()
    assert abs(model.max() - limit.max()) / span < 0.02
    assert np.abs(model - limit).max() / span < 0.05


@pytest.mark.parametrize("node_limited", [False, True], ids=["plain", "node-limited"])
@pytest.mark.parametrize(
    "network",
    [{"topology": "multi_plane", "leaf_nics": 1}, {"leaf_nics": 8, "oversubscription": 4}],
    ids=["multi-plane", "fat-tree-4to1"],
)
def test_charged_links_equal_the_reference(
    make_topology: Callable[..., Topology], network: dict[str, Any], node_limited: bool
) -> None:
    """The bytes the tables charge at the end of a step (volumes summed over every exchange
    run) are, link by link, what the flow-level reference carried over those exchanges (EP16,
    one leaf per node)."""
    topo = make_topology(2, **network)
    n = 16
    rng = np.random.default_rng(9)
    cells = [routed(rng, n, 128) for _ in range(2)]
    tokens = np.stack([c[0][None] for c in cells])
    per_node = np.stack([c[1][None] for c in cells]) if node_limited else None
    tables = tables_for(topo, tokens, per_node)
    # Cell 0 dispatched once (FP8) and combined once (BF16); cell 1 dispatched twice.
    uses = np.array([[FP8_TOKEN, BF16_TOKEN], [2 * FP8_TOKEN, 0.0]])
    tables.charge(tables.ports, uses)
    expected = np.zeros(topo.links)
    gpus, ready = np.arange(n)[None], np.zeros((1, n))
    for cell, direction in ((0, 0), (0, 1), (1, 0)):
        rank_bytes = tokens[cell] * uses[cell, direction]
        if node_limited:
            assert per_node is not None
            node_bytes = per_node[cell] * uses[cell, direction]
            combine = direction == 1
            _, net = reference_node_limited(topo, gpus, ready, node_bytes, rank_bytes, 1, combine)
        else:
            sizes = rank_bytes if direction == 0 else rank_bytes.swapaxes(1, 2)
            _, net = reference_all_to_all(topo, gpus, ready, sizes)
        expected += net.link_bytes
    load = tables.ports.load
    assert load.bytes == pytest.approx(expected, rel=1e-9, abs=1.0)
    assert load.busy_s == pytest.approx(load.bytes / topo.capacity, rel=1e-12)
