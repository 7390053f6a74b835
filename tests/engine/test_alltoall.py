"""The per-port closed form of an exchange against the flow-level reference.

:mod:`tests.support.closed_form` prices one all-to-all port by port, senders starting at their
own ready times, on the engine's ports (:class:`~moesim.engine.alltoall.ExchangePorts`);
:mod:`tests.support.flow_reference` runs the same exchange flow by flow on a max-min fair-share
network and is the reference. The engine's exchange tables give the closed form's results when
the senders start together (``test_exchange_tables.py``), so the synchronous figures below are
the engine's too. The link accounting tested here is the engine's own
(:meth:`ExchangePorts.charge_plain`, :meth:`ExchangePorts.charge_node_limited`).

Measured agreement (closed form minus reference, relative to the reference's duration;
synchronous unless stated):

- uniform traffic, EP8 to EP64, every fabric: 0.0%;
- a hot receiver (incast) or a hot sender on a full-bisection fabric: 0.0%;
- routing-derived matrices (top-8 of 256 experts, skewed popularity): makespan 0.0%, receivers
  within 2%; with senders' ready times spread over about the exchange's own duration the
  makespan is up to 7% (EP16) and 13% (EP8) early;
- random log-normal matrices (σ = 1, a stress test far more uneven than routing gives), 400
  each: makespan never late, median 0.0%, nine in ten within 2.3%, worst 16% early (EP8) and
  9% (EP16); staggered, worst 17% and 15% early; receivers within ±20%;
- fabrics, EP32 with σ = 0.5 traffic: multi-plane, rail 4:1, fat-tree 4:1 and NVL16 within
  5.2%, fat-tree 2:1 (uplinks the bottleneck) 9.9% early;
- hot spots held at two shared ports in turn (test_known_tandem_gaps): behind a 4:1 leaf 28%
  early; a multi-plane hot sender 7.6% early, one receiver 50% late;
- node-limited dispatch and combine: makespan within 3% of the pipelined limit of the
  reference (extrapolated from 4 and 16 pieces), receivers within 5%, and never later than the
  store-and-forward reference (which is 3-42% slower).

Where the closed form errs it is a flow held at two shared ports in turn (its sender's share
first, a receiver's or a leaf link's later), which bounds on single ports cannot see.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from moesim.cluster.topology import Topology
from moesim.engine.alltoall import ExchangePorts, LinkLoad
from tests.support import closed_form
from tests.support.flow_reference import reference_all_to_all, reference_node_limited
from tests.support.traffic import FP8_TOKEN, MB, h800_topology, hot, routed

Array = npt.NDArray[np.float64]


@pytest.fixture
def make_topology(tiny_dict: dict[str, Any]) -> Callable[..., Topology]:
    """:func:`h800_topology` on the tiny scenario."""
    return partial(h800_topology, tiny_dict)


def price(topo: Topology, ready: Array, sizes: Array) -> tuple[Array, LinkLoad]:
    """Closed-form plain all-to-all of one group of all GPUs, and the links it charges."""
    load = LinkLoad.zeros(topo.links)
    ports = ExchangePorts(topo, np.arange(ready.shape[1])[None], load)
    ports.charge_plain(sizes)
    return closed_form.all_to_all(ports, ready, sizes), load


def errors(model: Array, ref: Array, ready: Array) -> tuple[float, Array]:
    """Makespan error and per-receiver errors, relative to the reference's duration."""
    span = ref.max() - ready.min()
    return float((model.max() - ref.max()) / span), (model - ref).ravel() / span


# --------------------------------------------------------------------------- plain all-to-all


@pytest.mark.parametrize("nodes", [1, 2, 4, 8])
def test_uniform_traffic_matches_the_reference(
    make_topology: Callable[..., Topology], nodes: int
) -> None:
    """EP8 inside a node, EP16 to EP64 across nodes (EP64 spans two leaves): every port
    carries equal flows released together, so per-port sharing is exact."""
    topo = make_topology(nodes)
    n = 8 * nodes
    ready = np.zeros((1, n))
    sizes = np.full((1, n, n), 2 * MB)
    model, _ = price(topo, ready, sizes)
    ref, _ = reference_all_to_all(topo, np.arange(n)[None], ready, sizes)
    makespan, per_receiver = errors(model, ref, ready)
    assert abs(makespan) < 0.01
    assert np.abs(per_receiver).max() < 0.01


@pytest.mark.parametrize("receiver", [True, False], ids=["incast", "fan-out"])
@pytest.mark.parametrize(
    ("nodes", "network"),
    [
        (1, {}),
        (4, {}),
        (8, {}),
        (4, {"topology": "rail_optimized", "leaf_nics": 2, "oversubscription": 4}),
        (4, {"nvlink_domain_gpus": 16}),
    ],
    ids=["EP8", "EP32", "EP64", "rail-4to1", "nvl16"],
)
def test_hot_receiver_and_hot_sender(
    make_topology: Callable[..., Topology], nodes: int, network: dict[str, Any], receiver: bool
) -> None:
    """One GPU receives (or sends) six times the traffic of the others: its port is the
    bottleneck of every flow through it, where the per-port bound is max-min sharing. (A
    multi-plane incast is exact too; the other hot spots are in test_known_tandem_gaps.)"""
    topo = make_topology(nodes, **network)
    n = 8 * nodes
    ready = np.zeros((1, n))
    sizes = hot(n, 5, receiver)
    model, _ = price(topo, ready, sizes)
    ref, _ = reference_all_to_all(topo, np.arange(n)[None], ready, sizes)
    makespan, per_receiver = errors(model, ref, ready)
    assert abs(makespan) < 0.01
    if not (receiver is False and "oversubscription" in network):
        assert np.abs(per_receiver).max() < 0.01


@pytest.mark.parametrize(("nodes", "staggered"), [(1, False), (1, True), (2, False), (2, True)])
def test_random_matrices_error_distribution(
    make_topology: Callable[..., Topology], nodes: int, staggered: bool
) -> None:
    """Log-normal (σ = 1) matrices, a stress test far more uneven than routing gives.

    Measured over 400 matrices per case (makespan error: median, 10th percentile, 1st,
    worst): EP8 0.0 / -2.0 / -7.3 / -16.2%, staggered over 100 µs 0.0 / -9.5 / -15.1 / -17.3%;
    EP16 0.0 / -2.3 / -7.4 / -8.9%, staggered -2.1 / -7.7 / -11.0 / -15.2%. Never late.
    Receivers: always within ±20%, 97-99.6% of them within ±10%. The closed form errs where a
    flow is held at both of its ports in turn (the sender's share first, the receiver's later),
    which bounds on single ports cannot see. Asserted on 40 matrices, with margins over those
    figures: never late, median within 1% (3% staggered), nine in ten within 5% (10%), all
    within 20%; receivers all within 25%, 95% within 10%.
    """
    topo = make_topology(nodes)
    n = 8 * nodes
    rng = np.random.default_rng(7 + nodes)
    spans, receivers = [], []
    for _ in range(40):
        sizes = rng.lognormal(0.0, 1.0, (1, n, n)) * MB
        ready = rng.uniform(0, 100e-6, (1, n)) if staggered else np.zeros((1, n))
        model, _ = price(topo, ready, sizes)
        ref, _ = reference_all_to_all(topo, np.arange(n)[None], ready, sizes)
        makespan, per_receiver = errors(model, ref, ready)
        spans.append(makespan)
        receivers.append(per_receiver)
    spans_a, recv = np.array(spans), np.concatenate(receivers)
    assert spans_a.max() < 0.001  # never late
    assert abs(np.median(spans_a)) < (0.03 if staggered else 0.01)
    assert np.percentile(-spans_a, 90) < (0.10 if staggered else 0.05)
    assert spans_a.min() > -0.20
    assert np.abs(recv).max() < 0.25
    assert np.mean(np.abs(recv) < 0.10) > 0.95


@pytest.mark.parametrize("staggered", [False, True])
def test_routing_derived_matrices(make_topology: Callable[..., Topology], staggered: bool) -> None:
    """EP16 matrices from top-8-of-256 routing with skewed expert popularity (the engine's
    traffic): synchronous makespans are exact and receivers within 2% (measured 0.0% and
    ±2.1%); ready times spread over 100 µs (about the exchange's own length) make the makespan
    up to 7.4% early (measured, seed 11)."""
    topo = make_topology(2)
    rng = np.random.default_rng(11)
    worst_span, worst_receiver = 0.0, 0.0
    for _ in range(12):
        popularity = rng.lognormal(0.0, 0.7, 256)
        to_rank, _ = routed(rng, 16, 512, popularity)
        sizes = to_rank[None] * FP8_TOKEN
        ready = rng.uniform(0, 100e-6, (1, 16)) if staggered else np.zeros((1, 16))
        model, _ = price(topo, ready, sizes)
        ref, _ = reference_all_to_all(topo, np.arange(16)[None], ready, sizes)
        makespan, per_receiver = errors(model, ref, ready)
        assert makespan < 0.001
        worst_span = min(worst_span, makespan)
        worst_receiver = max(worst_receiver, float(np.abs(per_receiver).max()))
    if staggered:
        assert worst_span > -0.10
        assert worst_receiver < 0.12
    else:
        assert worst_span > -0.001
        assert worst_receiver < 0.03


def test_late_sender_delays_only_its_receivers(make_topology: Callable[..., Topology]) -> None:
    """A sender ready 1 ms late holds up the receivers it sends to, by at least its own
    transfer, and nobody else (the in-port bound ignores senders without bytes for it)."""
    topo = make_topology(2)
    n = 16
    sizes = np.full((1, n, n), 1 * MB)
    sizes[0, 3, :8] = 0.0  # the late sender 3 sends only to the other node
    ready = np.zeros((1, n))
    ready[0, 3] = 1e-3
    model, _ = price(topo, ready, sizes)
    ref, _ = reference_all_to_all(topo, np.arange(n)[None], ready, sizes)
    others = np.arange(8) != 3
    assert model[0, :8][others].max() < 0.5e-3
    assert model[0, 8:].min() > 1e-3 + 1 * MB / topo.nic_bytes_per_s
    assert model == pytest.approx(ref, rel=0.01)


@pytest.mark.parametrize(
    ("network", "receivers"),
    [
        ({"topology": "multi_plane", "leaf_nics": 2}, 0.25),
        ({"topology": "rail_optimized", "leaf_nics": 2, "oversubscription": 4}, 0.15),
        ({"topology": "fat_tree", "leaf_nics": 8, "oversubscription": 4}, 0.15),
        ({"topology": "fat_tree", "leaf_nics": 16, "oversubscription": 2}, 0.15),
        ({"nvlink_domain_gpus": 16}, 0.15),
    ],
    ids=["multi-plane", "rail-4to1", "fat-tree-4to1", "fat-tree-2to1", "nvl16"],
)
def test_fabrics_with_random_traffic(
    make_topology: Callable[..., Topology], network: dict[str, Any], receivers: float
) -> None:
    """EP32 over four nodes, moderately uneven traffic (log-normal σ = 0.5), synchronous and
    with ready times spread over 300 µs.

    Measured (makespan; receivers): multi-plane 0.0 / -5.2%; -23% to +0.3% (relayed flows
    share the sender's NVLink port, then the relay's NIC: a tandem); rail 4:1 0.0 / -3.3%;
    ±9%; fat-tree 4:1 (a leaf per node) -0.8 / -1.2%; ±3%; fat-tree 2:1 (two nodes a leaf,
    the uplinks the bottleneck) -9.9 / -0.1%; -14% to +3%; NVL16 0.0 / 0.0%; -7% to +6%.
    Leaf ports share like out-ports, so a small flow through a busy leaf link is not charged
    the link's whole backlog.
    """
    topo = make_topology(4, **network)
    rng = np.random.default_rng(2)
    n = 32
    sizes = rng.lognormal(0.0, 0.5, (1, n, n)) * MB
    for ready in (np.zeros((1, n)), rng.uniform(0, 300e-6, (1, n))):
        model, _ = price(topo, ready, sizes)
        ref, _ = reference_all_to_all(topo, np.arange(n)[None], ready, sizes)
        makespan, per_receiver = errors(model, ref, ready)
        assert -0.12 < makespan < 0.001
        assert np.abs(per_receiver).max() < receivers


@pytest.mark.parametrize(
    ("network", "receiver", "measured"),
    [
        ({"topology": "multi_plane", "leaf_nics": 2}, True, (0.0, 0.0, 0.0)),
        ({"topology": "fat_tree", "leaf_nics": 8, "oversubscription": 4}, True, (-0.278,) * 2),
        ({"topology": "fat_tree", "leaf_nics": 8, "oversubscription": 4}, False, (-0.278,) * 2),
        ({"topology": "multi_plane", "leaf_nics": 2}, False, (-0.076, -0.172, 0.497)),
        (
            {"topology": "rail_optimized", "leaf_nics": 2, "oversubscription": 4},
            False,
            (0.0, 0.161),
        ),
    ],
    ids=[
        "multi-plane-incast",
        "leaf-4to1-incast",
        "leaf-4to1-fan-out",
        "multi-plane-fan-out",
        "rail-4to1-fan-out",
    ],
)
def test_known_tandem_gaps(
    make_topology: Callable[..., Topology],
    network: dict[str, Any],
    receiver: bool,
    measured: tuple[float, ...],
) -> None:
    """Where the closed form errs: hot flows held at two shared ports in turn.

    Four nodes, one leaf each, 4:1 oversubscribed: the 24 cross-leaf 6 MB flows into a hot GPU
    share its leaf's 100 GB/s downlink with 168 1 MB flows to its node-mates (each flow gets
    0.5 GB/s), and only once those are gone are they held at the hot GPU's 50 GB/s in-port:
    1.92 ms + 120 MB / 50 GB/s = 4.32 ms, where the closed form takes the later of the two
    ports' totals, 3.12 ms (-28%). A multi-plane hot sender is the same shape: its relayed
    flows first share the relays' NICs, then its own NVLink port (makespan -7.6%); and since
    they are held at its NVLink port, the relays' NICs have room for the other flows, which
    the shared-port bound does not see (a receiver +50% late). Behind a rail's 4:1 spine the
    hot sender's small flows are likewise early (+16%). ``measured``: the makespan error and
    the extreme receivers' errors; the test pins them so that a change of the model shows.
    """
    topo = make_topology(4, **network)
    n = 32
    ready = np.zeros((1, n))
    sizes = hot(n, 5, receiver)
    model, _ = price(topo, ready, sizes)
    ref, _ = reference_all_to_all(topo, np.arange(n)[None], ready, sizes)
    makespan, per_receiver = errors(model, ref, ready)
    assert makespan == pytest.approx(measured[0], abs=0.005)
    extremes = [per_receiver.min(), per_receiver.max()]
    for value in measured[1:]:
        assert min(abs(e - value) for e in extremes) < 0.005


@pytest.mark.parametrize(
    "network",
    [
        {},
        {"topology": "multi_plane", "leaf_nics": 2},
        {"topology": "rail_optimized", "leaf_nics": 2, "oversubscription": 4},
        {"topology": "fat_tree", "leaf_nics": 8, "oversubscription": 4},
        {"nvlink_domain_gpus": 16},
    ],
    ids=["fat-tree", "multi-plane", "rail", "fat-tree-4to1", "nvl16"],
)
def test_plain_link_accounting(
    make_topology: Callable[..., Topology], network: dict[str, Any]
) -> None:
    """The link load of an exchange is, port by port (GPU ports, relays' ports, leaf links),
    the bytes that crossed it in the reference; busy time is bytes / capacity."""
    topo = make_topology(4, **network)
    rng = np.random.default_rng(5)
    n = 32
    sizes = rng.lognormal(0.0, 1.0, (2, n // 2, n // 2)) * MB
    sizes[0, 1, 2] = 0.0
    gpus = np.arange(n).reshape(2, n // 2)  # two groups of two nodes
    ready = np.zeros((2, n // 2))
    load = LinkLoad.zeros(topo.links)
    ExchangePorts(topo, gpus, load).charge_plain(sizes)
    _, net = reference_all_to_all(topo, gpus, ready, sizes)
    assert load.bytes == pytest.approx(net.link_bytes, rel=1e-9, abs=1.0)
    assert load.busy_s == pytest.approx(load.bytes / topo.capacity, rel=1e-12)
    # Every byte enters its receiver once, by NVLink or by NIC (a multi-plane relay's NVLink
    # in-port sees the relayed bytes too).
    if network.get("topology") != "multi_plane":
        off_diagonal = sizes.sum() - np.trace(sizes, axis1=1, axis2=2).sum()
        into_gpus = load.bytes[3 : 4 * n : 4].sum() + load.bytes[1 : 4 * n : 4].sum()
        assert into_gpus == pytest.approx(off_diagonal, rel=1e-12)


# --------------------------------------------------------------------------- node-limited


def node_limited(
    topo: Topology, ready: Array, node_bytes: Array, rank_bytes: Array, combine: bool
) -> tuple[Array, LinkLoad]:
    load = LinkLoad.zeros(topo.links)
    ports = ExchangePorts(topo, np.arange(ready.shape[1])[None], load)
    ports.charge_node_limited(node_bytes, rank_bytes, reverse=combine)
    fn = closed_form.node_limited_combine if combine else closed_form.node_limited_dispatch
    return fn(ports, ready, node_bytes, rank_bytes), load


def pipelined_limit(
    topo: Topology,
    ready: Array,
    node_bytes: Array,
    rank_bytes: Array,
    combine: bool,
    pieces: tuple[int, int],
) -> tuple[Array, Array]:
    """The reference with ``pieces`` chunks each, extrapolated to infinitely many pieces (its
    pipeline fill costs one piece, an error ∝ 1/chunks), and the store-and-forward reference."""
    gpus = np.arange(ready.shape[1])[None]
    a, b = pieces
    coarse, _ = reference_node_limited(topo, gpus, ready, node_bytes, rank_bytes, a, combine)
    fine, _ = reference_node_limited(topo, gpus, ready, node_bytes, rank_bytes, b, combine)
    whole, _ = reference_node_limited(topo, gpus, ready, node_bytes, rank_bytes, 1, combine)
    return (b * fine - a * coarse) / (b - a), whole


@pytest.mark.parametrize("combine", [False, True], ids=["dispatch", "combine"])
@pytest.mark.parametrize(
    ("nodes", "network", "straggler"),
    [
        (2, {}, None),
        (2, {}, 3),
        (2, {}, 11),
        (4, {"topology": "fat_tree", "leaf_nics": 8, "oversubscription": 4}, None),
        (4, {"topology": "multi_plane", "leaf_nics": 2}, None),
    ],
    ids=["EP16", "EP16-late-3", "EP16-late-11", "EP32-leaf-4to1", "EP32-multi-plane"],
)
def test_node_limited_matches_the_pipelined_reference(
    make_topology: Callable[..., Topology],
    nodes: int,
    network: dict[str, Any],
    straggler: int | None,
    combine: bool,
) -> None:
    """DeepEP routing statistics (1,024 tokens per GPU, top-8 of 256, FP8 tokens): the closed
    form is close to the pipelined limit of the two-hop reference and never later than the
    store-and-forward reference. A straggler (ready 300 µs late) holds up its own node-mates'
    dispatch (GPU 3) or the other node's (GPU 11) and, in the combine, every owner whose
    tokens it computed; an oversubscribed leaf bounds the InfiniBand hop.

    Measured (makespan; worst receiver, relative to the exchange's duration): dispatch within
    0.6%; 1.7% everywhere; combine EP16 -2.8%; -4.2%, with a straggler -1.4%; -1.4%, EP32
    0.0%; 0.5%. The store-and-forward reference is 3-35% (dispatch) and 15-42% (combine)
    slower. Asserted: makespan within 3%, receivers within 5%.
    """
    topo = make_topology(nodes, **network)
    n = 8 * nodes
    rng = np.random.default_rng(3)
    to_rank, to_node = routed(rng, n, 1024)
    rank_bytes, node_bytes = to_rank[None] * FP8_TOKEN, to_node[None] * FP8_TOKEN
    ready = np.zeros((1, n))
    if straggler is not None:
        ready[0, straggler] = 300e-6
    model, _ = node_limited(topo, ready, node_bytes, rank_bytes, combine)
    pieces = (4, 16) if nodes == 2 else (2, 8)
    limit, whole = pipelined_limit(topo, ready, node_bytes, rank_bytes, combine, pieces)
    span = limit.max() - ready.min()
    assert abs(model.max() - limit.max()) / span < 0.03
    assert np.abs(model - limit).max() / span < 0.05
    assert model.max() <= whole.max() * (1 + 1e-9)
    if straggler is not None:
        late = ready[0, straggler] + FP8_TOKEN / topo.nvlink_bytes_per_s
        waits = rank_bytes[0, :, straggler] if combine else rank_bytes[0, straggler]
        waits = (waits > 0) & (np.arange(n) != straggler)
        assert model[0, waits].min() > late


def test_node_limited_skewed_receiver(make_topology: Callable[..., Topology]) -> None:
    """EP16 with GPU 9's experts three times as popular: its NVLink in-port is the
    bottleneck of the dispatch (exact, measured 0.0%) and of the combine's gather."""
    topo = make_topology(2)
    rng = np.random.default_rng(5)
    popularity = np.ones(256)
    popularity[9 * 16 : 10 * 16] = 3.0
    to_rank, to_node = routed(rng, 16, 1024, popularity)
    rank_bytes, node_bytes = to_rank[None] * FP8_TOKEN, to_node[None] * FP8_TOKEN
    ready = np.zeros((1, 16))
    for combine in (False, True):
        model, _ = node_limited(topo, ready, node_bytes, rank_bytes, combine)
        limit, _ = pipelined_limit(topo, ready, node_bytes, rank_bytes, combine, (4, 16))
        assert model.max() == pytest.approx(limit.max(), rel=0.01)


@pytest.mark.parametrize("combine", [False, True], ids=["dispatch", "combine"])
@pytest.mark.parametrize(
    "network",
    [{}, {"topology": "fat_tree", "leaf_nics": 8, "oversubscription": 4}],
    ids=["one-leaf", "four-leaves"],
)
def test_node_limited_link_accounting(
    make_topology: Callable[..., Topology], network: dict[str, Any], combine: bool
) -> None:
    """NIC, NVLink and leaf bytes of a node-limited exchange equal the reference's: each
    token crosses InfiniBand once per remote node and NVLink once per GPU of a node other
    than its relay."""
    topo = make_topology(4, **network)
    rng = np.random.default_rng(9)
    to_rank, to_node = routed(rng, 32, 256)
    rank_bytes, node_bytes = to_rank[None] * FP8_TOKEN, to_node[None] * FP8_TOKEN
    ready = rng.uniform(0, 50e-6, (1, 32))
    _, load = node_limited(topo, ready, node_bytes, rank_bytes, combine)
    _, net = reference_node_limited(
        topo, np.arange(32)[None], ready, node_bytes, rank_bytes, 1, combine
    )
    assert load.bytes == pytest.approx(net.link_bytes, rel=1e-9, abs=1.0)
    assert load.busy_s == pytest.approx(load.bytes / topo.capacity, rel=1e-12)
    remote = to_node.sum() - sum(to_node[s, s // 8] for s in range(32))
    assert load.bytes[2::4][:32].sum() == pytest.approx(remote * FP8_TOKEN, rel=1e-12)


def test_node_limited_needs_whole_nodes(make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(1)
    ports = ExchangePorts(topo, np.arange(4).reshape(2, 2), LinkLoad.zeros(topo.links))
    with pytest.raises(ValueError, match="whole nodes"):
        ports.charge_node_limited(np.zeros((2, 2, 1)), np.zeros((2, 2, 2)), reverse=False)
