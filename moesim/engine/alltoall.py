"""All-to-all exchanges of expert-parallel groups, priced in NumPy per port.

An exchange (a dispatch or a combine of one MoE layer, for every expert-parallel group of a
stage at once) is a set of flows that start when their sender is ready. Its result is, per
receiving GPU, the time its last byte arrives. The engine needs thousands of exchanges per step,
so instead of simulating the flows' max-min fair sharing event by event
(:class:`~moesim.engine.network.FairShareNetwork`, which the tests use as the reference), each
flow's finish is bounded by the ports on its path, in closed form:

- a sender's out-port shares its bandwidth among its flows (processor sharing): a flow of ``x``
  bytes among flows ``x_i`` released together finishes ``Σ_i min(x_i, x) / C`` after release;
- a receiver's in-port is a work-conserving server of flows released at their senders' ready
  times ``r``: its last byte arrives at ``max_k (r_k + Σ_{j: r_j ≥ r_k} x_j) / C``;
- a relay or leaf-switch port carrying flows of many senders shares its bandwidth like an
  out-port, from the earliest release among its flows.

A flow finishes at the latest of the bounds of the ports it crosses plus its path latency; a
receiver is done when its last flow is. When one port is the bottleneck of every flow through it
(a hot receiver's incast, a hot sender's fan-out) the bounds are what max-min sharing gives.
Otherwise they are an approximation, neither an upper nor a lower bound: a flow held at two
shared ports in turn (first its share of one, then of the other) finishes later than either
port's bound, and a flow finishes earlier than its share of a port when its siblings there are
held back elsewhere. ``tests/engine/test_alltoall.py`` measures the error against the
flow-level reference: the makespan is exact for uniform traffic, hot spots on a full-bisection
fabric and synchronous routing-derived traffic, and never later than the reference's; random,
very uneven matrices are typically a few per cent early (worst seen -16%, -17% with staggered
senders), a hot spot behind a 4:1 oversubscribed leaf 28% early; receivers are within ±20%
but for a multi-plane hot sender (one receiver 50% late).

Two dispatch layouts (``parallelism.dispatch``):

- ``all_to_all``: every GPU sends each member of its group the tokens routed to that member's
  experts, over NVLink inside an NVLink domain and over its NIC otherwise (with a multi-plane
  fabric, a transfer to another plane goes over NVLink to the node-mate on that plane first);
- ``node_limited`` (DeepSeek-V3 / DeepEP): a token crosses InfiniBand once per destination node,
  to the GPU with the sender's in-node index (the relay), which forwards it over NVLink to the
  GPUs hosting its experts. The combine is the reverse: partial results are gathered over
  NVLink at the relay and sent back over InfiniBand once per node. Both hops are pipelined, as
  DeepEP's chunked kernels are: in the dispatch a relay forwards (once it is ready itself, as
  forwarding is its kernel's work) from the first data it holds, and a receiver also waits for
  the last byte of each sender through both hops (a late sender's tokens leave when it is
  ready); in the combine a relay reduces tokens in order, so its InfiniBand stream waits for
  its latest node-mate. Against a two-hop flow-level reference whose relays forward in ever
  smaller pieces, the closed form is within 3% of the pipelined limit.

Per-port bytes and busy time (bytes / capacity) accumulate into the caller's arrays.
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
    ordered = np.take_along_axis(sizes, order, axis=-1)
    m = sizes.shape[-1]
    after = np.arange(m - 1, -1, -1, dtype=np.float64)  # flows larger than (after) this one
    shared = np.cumsum(ordered, axis=-1) + after * ordered
    finish = np.empty_like(shared)
    np.put_along_axis(finish, order, shared, axis=-1)
    finish = np.asarray(release)[..., None] + finish / capacity
    return np.where(sizes > 0, finish, NEVER)


def released_makespan(sizes: Array, release: Array, capacity: float) -> Array:
    """Last arrival at an in-port fed by flows released at different times.

    ``sizes`` (..., n, m): flow from sender ``j`` (axis -2) to port ``i`` (axis -1);
    ``release`` (..., n): sender ``j``'s start. A work-conserving port of ``capacity`` finishes
    at ``max_k (r_k + Σ_{j: r_j ≥ r_k} x_j / C)`` (senders in release order). Returns (..., m);
    ``-inf`` for a port without flows.
    """
    order = np.argsort(release, axis=-1, kind="stable")
    r = np.take_along_axis(release, order, axis=-1)
    x = np.take_along_axis(sizes, order[..., None], axis=-2)
    suffix = np.cumsum(x[..., ::-1, :], axis=-2)[..., ::-1, :]
    # A sender without bytes for this port must not pin it to its release time.
    finish = np.where(x > 0, r[..., None] + suffix / capacity, NEVER).max(axis=-2)
    return np.where(sizes.sum(axis=-2) > 0, finish, NEVER)


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


class ExchangePricer:
    """Prices the dispatch and combine of the expert-parallel groups of one pipeline stage.

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
        up = np.where(crossing, topo.leaf_link(0, False) + 2 * leaf_src, -1)
        down = np.where(crossing, topo.leaf_link(0, True) + 2 * leaf_dst, -1)
        cross_leaf = topo.cross_leaf_latency_s or topo.nic_latency_s
        latency = np.where(crossing, cross_leaf, topo.nic_latency_s)
        return up, down, latency

    def _shared_bounds(self, ports: IntArray, sizes: Array, release: Array) -> Array:
        """Per flow, the latest :func:`shared_port_finish` of the ``ports`` (P, *flows; ``-1``
        for none) it crosses; leaf-switch bytes are charged to the link load here."""
        valid = (ports >= 0) & (sizes > 0)[None]
        idx = ports[valid]
        flow_bytes = np.broadcast_to(sizes, ports.shape)[valid]
        rel = np.broadcast_to(release, ports.shape)[valid]
        cap = self.topo.capacity
        bound = np.full(ports.shape, NEVER)
        bound[valid] = shared_port_finish(idx, flow_bytes, rel, cap)
        # GPU ports of relays are charged with the rest of the GPU ports; leaf ports here.
        leaf = idx >= 4 * self.topo.gpus
        self.load.add(idx[leaf], flow_bytes[leaf], cap)
        return bound.max(axis=0)

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
                np.where(self.cross_plane, 4 * src + NVLINK_OUT, -1),
                np.where(self.cross_plane, 4 * hop + NVLINK_IN, -1),
                np.where(self.cross_plane, 4 * hop + NIC_OUT, -1),
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

    def all_to_all(self, ready: Array, sizes: Array) -> Array:
        """Receivers' done times of an exchange in which member ``s`` sends ``sizes[:, s, d]``
        bytes to member ``d`` of its group, starting at ``ready[:, s]``. Shapes (groups,
        members[, members]); a receiver without incoming bytes is done at its own ready time."""
        sizes, nvl, direct_ib, relayed = self.split_plain(sizes)
        ib_in = direct_ib + relayed
        # Out-ports: NVLink carries intra-domain and (multi-plane) first-hop traffic.
        nvl_out = nvl + relayed
        finish = np.maximum(
            processor_sharing_finish(nvl_out, ready, self.nvl_cap),
            processor_sharing_finish(direct_ib, ready, self.nic_cap),
        )
        # In-ports bound only the flows that cross them: NVLink from the domain, the NIC from
        # everywhere else (so each flow then gets its own path latency).
        nvl_in = released_makespan(nvl, ready, self.nvl_cap)[:, None, :]
        nic_in = released_makespan(ib_in, ready, self.nic_cap)[:, None, :]
        finish = np.maximum(finish, np.where(nvl > 0, nvl_in, NEVER))
        finish = np.maximum(finish, np.where(ib_in > 0, nic_in, NEVER))
        self._account(nvl_out, nvl, direct_ib, relayed)
        if self.extra_ports is not None:
            release = np.broadcast_to(ready[:, :, None], sizes.shape)
            finish = np.maximum(finish, self._shared_bounds(self.extra_ports, sizes, release))
        finish = np.where(sizes > 0, finish + self.latency, NEVER)
        return np.maximum(finish.max(axis=1), ready)

    def _account(self, nvl_out: Array, nvl_in: Array, direct_ib: Array, relayed: Array) -> None:
        """Charge the GPU ports of a plain exchange (leaf ports: :meth:`_shared_bounds`)."""
        g, n = self.gpus.shape
        src = np.broadcast_to(self.gpus[:, :, None], (g, n, n))
        dst = np.broadcast_to(self.gpus[:, None, :], (g, n, n))
        ib = direct_ib + relayed
        load, topo = self.load, self.topo
        cap = topo.capacity
        load.add(4 * src + NVLINK_OUT, nvl_out, cap)
        load.add(4 * dst + NVLINK_IN, nvl_in, cap)
        load.add(4 * self.hop + NVLINK_IN, relayed, cap)  # the relay's NVLink in-port
        load.add(4 * self.hop + NIC_OUT, ib, cap)
        load.add(4 * dst + NIC_IN, ib, cap)

    def _charge_leaves(self, ports: IntArray, sizes: Array) -> None:
        """Charge leaf-switch ports among ``ports`` (P, *flows) with the flows' bytes."""
        valid = (ports >= 4 * self.topo.gpus) & (sizes > 0)[None]
        flow_bytes = np.broadcast_to(sizes, ports.shape)[valid]
        self.load.add(ports[valid], flow_bytes, self.topo.capacity)

    def charge_plain(self, sizes: Array) -> None:
        """Charge the links with a plain exchange's bytes (``sizes`` as for :meth:`all_to_all`,
        possibly summed over many exchanges) without pricing it."""
        sizes, nvl, direct_ib, relayed = self.split_plain(sizes)
        self._account(nvl + relayed, nvl, direct_ib, relayed)
        if self.extra_ports is not None:
            self._charge_leaves(self.extra_ports, sizes)

    def charge_node_limited(self, node_bytes: Array, rank_bytes: Array, reverse: bool) -> None:
        """Charge the links with a node-limited dispatch's (or, ``reverse``, combine's) bytes,
        possibly summed over many exchanges, without pricing it."""
        self._check_node_local()
        ib = np.where(self.remote_node[None], node_bytes, 0.0)
        self._account_node_limited(ib, self._forwarded(rank_bytes), reverse=reverse)
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

    def ib_leaf_ports(self, reverse: bool) -> IntArray:
        """Leaf ports (2, g, n, K) of the InfiniBand hops between owners and relays: the
        sender's uplink and the receiver's downlink, ``-1`` inside one leaf. Dispatch sends
        owner → relay; the combine (``reverse``) relay → owner."""
        assert self.relay_leaf is not None
        up, down = self.relay_leaf  # owner's uplink, relay's downlink
        if reverse:  # relay's uplink, owner's downlink (a leaf's ports are adjacent ids)
            up, down = np.where(down >= 0, down - 1, -1), np.where(up >= 0, up + 1, -1)
        return np.stack([up, down])

    def _check_node_local(self) -> None:
        if not self.node_local:
            raise ValueError("node-limited dispatch needs expert-parallel groups of whole nodes")

    def _ib_hop(self, ib: Array, release: Array, reverse: bool) -> Array:
        """Finish of each InfiniBand flow between owner ``s`` and its relay on node ``k``
        (``ib``: (g, n, K) bytes, zero for ``s``'s own node), latency included.

        Dispatch: ``s`` sends all its flows from ``release[:, s]``; the relay's in-port serves
        flows released at different times. Combine (``reverse``): relay ``m`` sends its flows
        from ``release[:, m]``; the owner's in-port serves the relays of the other nodes.
        """
        g = self.groups
        k_n, loc = self.nodes, self.local
        ib4 = ib.reshape(g, k_n, loc, k_n)  # [owner node, local, relay node]
        rel3 = release.reshape(g, k_n, loc)  # [node, local]
        by_local = rel3.transpose(0, 2, 1)  # (g, local, node)
        if not reverse:
            out = processor_sharing_finish(ib, release, self.nic_cap)
            # Relay (k, l) receives from (k', l): senders k', ports k, per (g, l).
            inn = released_makespan(ib4.transpose(0, 2, 1, 3), by_local, self.nic_cap)
            inn = np.broadcast_to(inn[:, None], ib4.shape)  # (g, k', l, k)
            flow_release = np.broadcast_to(release[:, :, None], ib.shape)
        else:
            # Relay (k, l) sends to (k', l): PS over k' per (g, k, l).
            sends = ib4.transpose(0, 3, 2, 1)  # (g, k, l, k')
            out = processor_sharing_finish(sends, rel3, self.nic_cap).transpose(0, 3, 2, 1)
            out = out.reshape(ib.shape)
            # Owner (k', l) receives from relays (k, l): senders k, ports k', per (g, l).
            inn = released_makespan(ib4.transpose(0, 2, 3, 1), by_local, self.nic_cap)
            inn = np.broadcast_to(inn.transpose(0, 2, 1)[..., None], ib4.shape)
            flow_release = release[:, self.relay_of]
        finish = np.maximum(out, inn.reshape(ib.shape))
        if self.relay_leaf is not None:
            leaves = self.ib_leaf_ports(reverse)
            finish = np.maximum(finish, self._shared_bounds(leaves, ib, flow_release))
        return np.where(ib > 0, finish + self.relay_latency, NEVER)

    def _forwarded(self, rank_bytes: Array) -> Array:
        """NVLink bytes between relay ``(k, l)`` and its node-mate ``(k, l')``: everything the
        members with in-node index ``l`` exchange with ``(k, l')``. Shape (g, K, l, l')."""
        g = self.groups
        k_n, loc = self.nodes, self.local
        y = rank_bytes.reshape(g, k_n, loc, k_n, loc)  # [s node, s local, d node, d local]
        z = y.sum(axis=1).transpose(0, 2, 1, 3)
        return np.where(np.eye(loc, dtype=bool)[None, None], 0.0, z)

    def node_limited_dispatch(self, ready: Array, node_bytes: Array, rank_bytes: Array) -> Array:
        """DeepEP-style dispatch. ``node_bytes[:, s, k]``: bytes ``s`` sends to node ``k`` of its
        group (each token once per node); ``rank_bytes[:, s, d]``: bytes that must reach member
        ``d`` (each token once per GPU). Returns the receivers' done times."""
        self._check_node_local()
        g, n = self.gpus.shape
        k_n, loc = self.nodes, self.local
        topo = self.topo
        ib = np.where(self.remote_node[None], node_bytes, 0.0)
        arrive = self._ib_hop(ib, ready, reverse=False)  # (g, n, K): s's tokens at the relay
        # NVLink hop: relay (k, l) → (k, l'). Forwarding is the relay's kernel's work, so it
        # starts when the relay is ready; then it streams from the first data it holds (its
        # own tokens, a remote sender's as soon as they start to arrive).
        z = self._forwarded(rank_bytes)
        own = np.where(self.nvlink & self.same_node, rank_bytes, 0.0)
        first = np.where(ib > 0, ready[:, :, None] + self.relay_latency, np.inf)
        first = np.where(
            self.remote_node[None],
            first,
            np.where(own.sum(axis=2) > 0, ready, np.inf)[:, :, None],
        )
        relay_first = first.reshape(g, k_n, loc, k_n).min(axis=1).transpose(0, 2, 1)  # (g, K, l)
        relay_first = np.maximum(relay_first, ready.reshape(g, k_n, loc))
        fwd_out = processor_sharing_finish(z, relay_first, self.nvl_cap)
        fwd_in = released_makespan(z, relay_first, self.nvl_cap)  # (g, K, l')
        fwd = np.maximum(fwd_out, np.where(z > 0, fwd_in[:, :, None, :], NEVER))
        done = (fwd.max(axis=2) + topo.nvlink_latency_s).reshape(g, n)
        # A sender's own-node tokens leave its NVLink port only once it is ready.
        own_sent = processor_sharing_finish(own, ready, self.nvl_cap)
        done = np.maximum(done, (own_sent + topo.nvlink_latency_s).max(axis=1))
        # A receiver waits for the InfiniBand arrival of every remote token routed to it, and
        # then (unless it is the relay) for the last piece's NVLink hop, which its relay
        # forwards once ready.
        needs = (rank_bytes > 0) & self.remote_node[None][:, :, self.own_node]  # (g, s, d)
        at_relay = arrive[:, :, self.own_node]  # (g, s, d): s's tokens at d's node
        relay = self.relay_of[:, self.own_node]  # (s, d): s's relay in d's node
        forwarded = np.maximum(at_relay, ready[:, relay]) + topo.nvlink_latency_s
        last = np.where(relay == np.arange(n)[None, :], at_relay, forwarded)
        done = np.maximum(done, np.where(needs, last, NEVER).max(axis=1))
        self._account_node_limited(ib, z, reverse=False)
        return np.maximum(done, ready)

    def node_limited_combine(self, ready: Array, node_bytes: Array, rank_bytes: Array) -> Array:
        """The reverse of :meth:`node_limited_dispatch`: member ``d`` returns
        ``rank_bytes[:, s, d]`` to the relay of ``s`` in its node over NVLink, each relay
        sends ``node_bytes[:, s, k]`` to ``s`` over InfiniBand. ``ready[:, d]``: when member
        ``d``'s experts are done. Returns the token owners' done times."""
        self._check_node_local()
        g, n = self.gpus.shape
        k_n, loc = self.nodes, self.local
        topo = self.topo
        nvl_lat = topo.nvlink_latency_s
        # NVLink: expert GPU (k, l') → relay (k, l), the partial results of every token owner
        # with in-node index l (the relay itself included).
        z = self._forwarded(rank_bytes).transpose(0, 1, 3, 2)  # (g, K, l', l)
        r3 = ready.reshape(g, k_n, loc)
        out_done = processor_sharing_finish(z, r3, self.nvl_cap)
        in_done = released_makespan(z, r3, self.nvl_cap)  # (g, K, l)
        gathered = np.where(z > 0, np.maximum(out_done, in_done[:, :, None, :]) + nvl_lat, NEVER)
        # Owners in the relay's own node are the relays themselves: done when gathered.
        done = gathered.max(axis=2).reshape(g, n)
        # InfiniBand: relay (k, l) → owner (k', l). A relay reduces a token once all its
        # partial results are in and works through its tokens in order, so it stalls at the
        # first token of its latest node-mate: its stream starts once every node-mate that
        # sends to it (and the relay itself) is ready.
        ib = np.where(self.remote_node[None], node_bytes, 0.0)
        start = np.where(z > 0, r3[:, :, :, None] + nvl_lat, NEVER).max(axis=2)  # (g, K, l)
        start = np.maximum(start, r3).reshape(g, n)
        arrive = self._ib_hop(ib, start, reverse=True)
        done = np.maximum(done, arrive.max(axis=2))
        # The last partial result from a node-mate d reaches s's relay when the gather flow
        # d → relay ends; the reduced token then crosses InfiniBand.
        local = np.arange(n) % loc
        via = gathered[:, self.own_node[None, :], local[None, :], local[:, None]]  # (g, s, d)
        lat_ib = self.relay_latency[:, :, self.own_node]
        needs = (rank_bytes > 0) & self.remote_node[None][:, :, self.own_node]
        done = np.maximum(done, np.where(needs, via + lat_ib, NEVER).max(axis=2))
        self._account_node_limited(ib, z.transpose(0, 1, 3, 2), reverse=True)
        return np.maximum(done, ready)

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
        cap, load = self.topo.capacity, self.load
        load.add(4 * owner + owner_port, ib, cap)
        load.add(4 * self.relay_gpu + relay_port, ib, cap)
        load.add(4 * relay + relay_nvl, z, cap)
        load.add(4 * peer + peer_port, z, cap)
