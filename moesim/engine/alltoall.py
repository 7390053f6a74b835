"""The port model of the expert-parallel all-to-alls, and their link accounting.

An exchange (a dispatch or a combine of one MoE layer, for every expert-parallel group of a
stage at once) is a set of flows. Instead of simulating the flows' max-min fair sharing event
by event, each flow's finish is bounded by the ports on its path, in closed form:

- a sender's out-port shares its bandwidth among its flows (processor sharing): a flow of ``x``
  bytes among flows ``x_i`` started together finishes ``Σ_i min(x_i, x) / C`` after the start
  (:func:`processor_sharing_finish`); a receiver's in-port likewise among the flows into it;
- a relay or leaf-switch port carrying flows of many senders shares its bandwidth the same way,
  from the earliest start among its flows (:func:`shared_port_finish`, :func:`shared_bounds`).

A flow finishes at the latest of the bounds of the ports it crosses plus its path latency.
:class:`ExchangePorts` knows which ports each (sender, receiver) pair crosses: NVLink inside an
NVLink domain; the NIC otherwise (with a multi-plane fabric, a transfer to another plane goes
over NVLink to the node-mate on that plane first, arXiv 2505.09343); leaf up- and downlinks
between leaves; and, for node-limited dispatch (DeepSeek-V3, arXiv 2412.19437 §3.2.2; DeepEP,
deepseek-ai/DeepEP), the relay on each destination node that receives a token once over
InfiniBand and forwards it over NVLink. :mod:`moesim.engine.exchange_tables` prices every
exchange of a step on these ports; per-link bytes and busy time (bytes / capacity) accumulate
in a :class:`LinkLoad`.

When one port is the bottleneck of every flow through it (a hot receiver's incast, a hot
sender's fan-out) the bounds are what max-min sharing gives. Otherwise they are an
approximation: a flow held at two shared ports in turn finishes later than either port's
bound, and a flow finishes earlier than its share of a port when its siblings there are held
back elsewhere. ``docs/model/network.md`` gives the equations and the error measured against a
flow-level max-min reference (``tests/engine/test_alltoall.py``,
``tests/engine/test_exchange_tables.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moesim.cluster.topology import NIC_IN, NIC_OUT, NVLINK_IN, NVLINK_OUT, Topology

Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
NEVER = -np.inf


def processor_sharing_finish(sizes: Array, release: Array, capacity: float) -> Array:
    """Finish of each flow of a port that shares ``capacity`` equally among its active flows.

    ``sizes`` (..., m): the port's flows (zeros are absent flows); ``release`` (...): when the
    port's flows start (all together). Returns (..., m) finish times; ``-inf`` for absent flows.
    """
    order = np.argsort(sizes, axis=-1)
    m = sizes.shape[-1]
    # Flat positions of each row's flows in size order (one index array: cheaper than
    # take_along_axis / put_along_axis over many leading axes).
    rows = order.size // m if m else 0
    flat = (order.reshape(rows, m) + (np.arange(rows) * m)[:, None]).reshape(order.shape)
    ordered = np.ascontiguousarray(sizes).ravel()[flat]
    after = np.arange(m - 1, -1, -1, dtype=np.float64)  # flows larger than (after) this one
    shared = np.cumsum(ordered, axis=-1) + after * ordered
    finish = np.empty_like(shared)
    finish.ravel()[flat] = shared
    finish = np.asarray(release)[..., None] + finish / capacity
    return np.where(sizes > 0, finish, NEVER)


def shared_port_finish(port: IntArray, size: Array, release: Array, capacity: Array) -> Array:
    """Processor sharing at ports whose flows come from many senders (relays, leaf switches).

    ``port``, ``size``, ``release``: one entry per (flow, port) crossing, 1-D. Each port shares
    its capacity among its flows from the earliest release among them; returns, per crossing,
    ``r_min + Σ_i min(x_i, x) / C`` over the port's flows ``x_i``.
    """
    if port.size == 0:
        return np.empty(0)
    # One float key orders by port, then by size (sizes scaled below 1; ties are harmless).
    order = np.argsort(port + size / (2.0 * size.max()))
    p, x = port[order], size[order]
    starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
    ends = np.r_[starts[1:], p.size]
    segment = np.repeat(np.arange(starts.size), ends - starts)
    total = np.cumsum(x)
    within = total - (total - x)[starts][segment]
    after = ends[segment] - 1 - np.arange(p.size)  # larger (later) flows of the same port
    first = np.minimum.reduceat(release[order], starts)[segment]
    finish = np.empty(p.size)
    finish[order] = first + (within + after * x) / capacity[p]
    return finish


def shared_bounds(
    ports: IntArray, sizes: Array, links: int, capacity: Array, release: Array | None = None
) -> Array:
    """Per flow, the latest :func:`shared_port_finish` of the shared ports it crosses.

    ``sizes`` (cells, *flows): independent exchanges along the first axis (flows of different
    cells never share a port); ``ports`` (P, *flows): link ids crossed by each flow, ``-1`` for
    none; ``release``: broadcast to ``sizes``, when each flow starts (default 0). ``links``
    and ``capacity``: the topology's link count and capacities. Returns (cells, *flows),
    ``-inf`` where a flow crosses no shared port.
    """
    cells = sizes.shape[0]
    offset = (np.arange(cells) * links).reshape((1, cells) + (1,) * (sizes.ndim - 1))
    full = np.broadcast_to(ports[:, None], (ports.shape[0], *sizes.shape))
    valid = (full >= 0) & (sizes > 0)[None]
    idx = (full + offset)[valid]
    bound = np.full(full.shape, NEVER)
    flow = np.broadcast_to(sizes, full.shape)[valid]
    if release is None:
        start = np.zeros(idx.size)
    else:
        start = np.broadcast_to(np.broadcast_to(release, sizes.shape)[None], full.shape)[valid]
    bound[valid] = shared_port_finish(idx, flow, start, np.tile(capacity, cells))
    return bound.max(axis=0)


@dataclass
class LinkLoad:
    """Bytes and busy seconds per link, accumulated over a step."""

    bytes: Array
    busy_s: Array

    @classmethod
    def zeros(cls, links: int) -> LinkLoad:
        return cls(np.zeros(links), np.zeros(links))

    def add(self, links: IntArray, nbytes: Array, capacity: Array) -> None:
        """Charge ``nbytes`` to each of ``links`` (repeats add up)."""
        size = self.bytes.size
        carried = np.bincount(links.ravel(), weights=nbytes.ravel(), minlength=size)
        self.bytes += carried
        self.busy_s += carried / capacity


class ExchangePorts:
    """The ports crossed by the exchanges of one pipeline rank's expert-parallel groups, and
    their link accounting.

    Which path each (sender, receiver) pair takes (NVLink, direct InfiniBand, relayed to
    another plane, through which leaf links), its latency, the relays of node-limited
    dispatch, and how a step's exchanged bytes are charged to the links.
    :class:`~moesim.engine.exchange_tables.ExchangeTables` prices the exchanges on them.

    Parameters
    ----------
    topology : Topology
    gpus : ndarray, shape (groups, members), int
        Global GPU ids, one row per expert-parallel group, ordered by expert-parallel rank.
    load : LinkLoad
        Where per-link traffic accumulates.
    """

    def __init__(self, topology: Topology, gpus: npt.NDArray[np.int64], load: LinkLoad) -> None:
        self.topo = topology
        self.gpus = np.asarray(gpus)
        self.load = load
        g, n = self.gpus.shape
        self.groups, self.members = g, n
        domain = topology.domain_of(self.gpus)
        self.same_domain = domain[:, :, None] == domain[:, None, :]
        self.off_diagonal = ~np.eye(n, dtype=bool)[None]
        self.nvlink = self.same_domain & self.off_diagonal
        self.remote = ~self.same_domain
        self.nvl_cap = topology.nvlink_bytes_per_s
        self.nic_cap = topology.nic_bytes_per_s
        self._plain_ports()
        gpn = topology.gpus_per_node
        self.node_local = n % gpn == 0 and n >= gpn
        if self.node_local:
            self.nodes = n // gpn
            self.local = gpn
            self._relay_ports()

    def _leaf_ports(self, src: IntArray, dst: IntArray) -> tuple[IntArray, IntArray, Array]:
        """Uplink and downlink crossed between the NICs of ``src`` and ``dst`` (``-1`` where
        both sit under one leaf) and the InfiniBand latency of each pair."""
        topo = self.topo
        leaf_src, leaf_dst = topo.leaf_of(src), topo.leaf_of(dst)
        crossing = leaf_src != leaf_dst
        up = np.where(crossing, topo.leaf_link(leaf_src, False), -1)
        down = np.where(crossing, topo.leaf_link(leaf_dst, True), -1)
        cross_leaf = topo.cross_leaf_latency_s or topo.nic_latency_s
        latency = np.where(crossing, cross_leaf, topo.nic_latency_s)
        return up, down, latency

    # ------------------------------------------------------------------ plain all-to-all

    def _plain_ports(self) -> None:
        """Ports on each (sender, receiver) path that are not the sender's out-port or the
        receiver's in-port (relays and leaf switches), as indices into the link array."""
        topo, gpus = self.topo, self.gpus
        g, n = gpus.shape
        extra: list[IntArray] = []
        src = np.broadcast_to(gpus[:, :, None], (g, n, n))
        dst = np.broadcast_to(gpus[:, None, :], (g, n, n))
        hop = src
        self.cross_plane = np.zeros((g, n, n), dtype=bool)
        gpn = topo.gpus_per_node
        if topo.kind == "multi_plane":
            self.cross_plane = self.remote & (src % gpn != dst % gpn)
            hop = np.where(self.cross_plane, src - src % gpn + dst % gpn, src)
            extra += [
                np.where(self.cross_plane, topo.link_id(src, NVLINK_OUT), -1),
                np.where(self.cross_plane, topo.link_id(hop, NVLINK_IN), -1),
                np.where(self.cross_plane, topo.link_id(hop, NIC_OUT), -1),
            ]
        self.hop = hop
        up, down, ib_latency = self._leaf_ports(hop, dst)
        if (up >= 0).any():
            extra += [np.where(self.remote, up, -1), np.where(self.remote, down, -1)]
        self.extra_ports = np.stack(extra) if extra else None
        self.latency = np.where(
            self.same_domain,
            topo.nvlink_latency_s,
            ib_latency + np.where(self.cross_plane, topo.nvlink_latency_s, 0.0),
        )

    def split_plain(self, sizes: Array) -> tuple[Array, Array, Array, Array]:
        """A plain exchange's bytes (self-traffic dropped) and their parts by path: NVLink
        inside a domain, InfiniBand direct, InfiniBand relayed over NVLink to another plane."""
        sizes = np.where(self.off_diagonal, sizes, 0.0)
        nvl = np.where(self.nvlink, sizes, 0.0)
        direct_ib = np.where(self.remote & ~self.cross_plane, sizes, 0.0)
        relayed = np.where(self.cross_plane, sizes, 0.0)
        return sizes, nvl, direct_ib, relayed

    def _account(self, nvl_out: Array, nvl_in: Array, direct_ib: Array, relayed: Array) -> None:
        """Charge the GPU ports of a plain exchange (leaf ports: :meth:`_charge_leaves`)."""
        g, n = self.gpus.shape
        src = np.broadcast_to(self.gpus[:, :, None], (g, n, n))
        dst = np.broadcast_to(self.gpus[:, None, :], (g, n, n))
        ib = direct_ib + relayed
        load, topo = self.load, self.topo
        cap = topo.capacity
        load.add(topo.link_id(src, NVLINK_OUT), nvl_out, cap)
        load.add(topo.link_id(dst, NVLINK_IN), nvl_in, cap)
        load.add(topo.link_id(self.hop, NVLINK_IN), relayed, cap)  # the relay's NVLink in-port
        load.add(topo.link_id(self.hop, NIC_OUT), ib, cap)
        load.add(topo.link_id(dst, NIC_IN), ib, cap)

    def _charge_leaves(self, ports: IntArray, sizes: Array) -> None:
        """Charge leaf-switch ports among ``ports`` (P, *flows) with the flows' bytes."""
        valid = (ports >= self.topo.gpu_links) & (sizes > 0)[None]
        flow_bytes = np.broadcast_to(sizes, ports.shape)[valid]
        self.load.add(ports[valid], flow_bytes, self.topo.capacity)

    def charge_plain(self, sizes: Array) -> None:
        """Charge the links with a plain exchange's bytes: ``sizes[:, s, d]`` from member ``s``
        to member ``d`` of each group, possibly summed over many exchanges."""
        sizes, nvl, direct_ib, relayed = self.split_plain(sizes)
        self._account(nvl + relayed, nvl, direct_ib, relayed)
        if self.extra_ports is not None:
            self._charge_leaves(self.extra_ports, sizes)

    def charge_node_limited(self, node_bytes: Array, rank_bytes: Array, reverse: bool) -> None:
        """Charge the links with a node-limited dispatch's (or, ``reverse``, combine's) bytes,
        possibly summed over many exchanges (``node_bytes`` (g, n, K) and ``rank_bytes``
        (g, n, n) as for :meth:`ExchangeTables <moesim.engine.exchange_tables.ExchangeTables>`,
        in bytes)."""
        self.check_node_local()
        ib = np.where(self.remote_node[None], node_bytes, 0.0)
        self._account_node_limited(ib, self.forwarded(rank_bytes), reverse=reverse)
        if self.relay_leaf is not None:
            self._charge_leaves(self.ib_leaf_ports(reverse), ib)

    # ------------------------------------------------------------------ node-limited

    def _relay_ports(self) -> None:
        """Leaf ports and latency of each InfiniBand hop (member ``s`` → node ``k``'s GPU with
        ``s``'s in-node index), shape (groups, members, nodes)."""
        n, k_n, loc = self.members, self.nodes, self.local
        self.own_node = np.arange(n) // loc
        relay = np.arange(k_n)[None, :] * loc + (np.arange(n) % loc)[:, None]  # (n, K)
        self.relay_of = relay
        self.relay_gpu = self.gpus[:, relay]  # (g, n, K)
        src = np.broadcast_to(self.gpus[:, :, None], self.relay_gpu.shape)
        up, down, latency = self._leaf_ports(src, self.relay_gpu)
        self.relay_leaf = np.stack([up, down]) if (up >= 0).any() else None
        self.relay_latency = latency
        self.remote_node = self.own_node[:, None] != np.arange(k_n)[None, :]  # (n, K)
        self.same_node = (self.own_node[:, None] == self.own_node[None, :])[None]  # (1, n, n)
        # Per (token owner s, receiver d): s's relay in d's node, and whether that is remote.
        self.pair_relay = relay[:, self.own_node]  # (n, n)
        self.pair_remote = self.remote_node[:, self.own_node]  # (n, n)

    def ib_leaf_ports(self, reverse: bool) -> IntArray:
        """Leaf ports (2, g, n, K) of the InfiniBand hops between owners and relays: the
        sender's uplink and the receiver's downlink, ``-1`` inside one leaf. Dispatch sends
        owner → relay; the combine (``reverse``) relay → owner."""
        assert self.relay_leaf is not None
        up, down = self.relay_leaf  # owner's uplink, relay's downlink
        if reverse:  # relay's uplink, owner's downlink (a leaf's ports are adjacent ids)
            up, down = np.where(down >= 0, down - 1, -1), np.where(up >= 0, up + 1, -1)
        return np.stack([up, down])

    def check_node_local(self) -> None:
        if not self.node_local:
            raise ValueError("node-limited dispatch needs expert-parallel groups of whole nodes")

    def forwarded(self, rank_bytes: Array) -> Array:
        """NVLink bytes between relay ``(k, l)`` and its node-mate ``(k, l')``: everything the
        members with in-node index ``l`` exchange with ``(k, l')``. ``rank_bytes`` (..., n, n)
        by (member, member); returns (..., K, l, l')."""
        k_n, loc = self.nodes, self.local
        lead = rank_bytes.shape[:-2]
        y = rank_bytes.reshape(*lead, k_n, loc, k_n, loc)  # [s node, s local, d node, d local]
        z = np.swapaxes(y.sum(axis=-4), -3, -2)
        return np.where(np.eye(loc, dtype=bool), 0.0, z)

    def _account_node_limited(self, ib: Array, z: Array, reverse: bool) -> None:
        """``ib`` (g, n, K) InfiniBand bytes per (token owner, node); ``z`` (g, node, relay
        local, other local) NVLink bytes between a relay and its node-mates. Dispatch sends
        owner → relay → peer; the combine (``reverse``) peer → relay → owner."""
        g, n = self.gpus.shape
        k_n, loc = self.nodes, self.local
        owner = np.broadcast_to(self.gpus[:, :, None], ib.shape)
        nodes = self.gpus.reshape(g, k_n, loc)
        relay = np.broadcast_to(nodes[:, :, :, None], z.shape)
        peer = np.broadcast_to(nodes[:, :, None, :], z.shape)
        if reverse:
            owner_port, relay_port, relay_nvl, peer_port = NIC_IN, NIC_OUT, NVLINK_IN, NVLINK_OUT
        else:
            owner_port, relay_port, relay_nvl, peer_port = NIC_OUT, NIC_IN, NVLINK_OUT, NVLINK_IN
        topo, load = self.topo, self.load
        cap = topo.capacity
        load.add(topo.link_id(owner, owner_port), ib, cap)
        load.add(topo.link_id(self.relay_gpu, relay_port), ib, cap)
        load.add(topo.link_id(relay, relay_nvl), z, cap)
        load.add(topo.link_id(peer, peer_port), z, cap)
