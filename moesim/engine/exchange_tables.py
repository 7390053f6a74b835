"""The exchanges of a step, priced once per routing cell and then replayed as max-plus products.

The engine prices tens of thousands of all-to-alls per step (DeepSeek-V3: 58 MoE layers × 120
micro-batches × 2 passes × 2 exchanges × 16 ranks). Their volumes repeat: every layer that a
simulated router stands for, on every pipeline rank, moves the bytes of the same routing cell
(simulated layer, micro-batch). So before the step, for every cell and direction, the closed form
of :mod:`moesim.engine.alltoall` is evaluated with every sender ready at time 0, flow by flow:
each flow's duration is the latest of its ports' processor-sharing finishes (the sender's
out-port, the receiver's in-port, relays and leaf switches) plus its path latency. For
node-limited dispatch the flows are the InfiniBand hop (owner → relay), the NVLink forwarding
(relay → GPU) and, in the combine, the NVLink gather, the relay's wait for its node-mates and
the InfiniBand return.

During the step an exchange whose senders are ready at ``r`` is then

    done[d] = max(r[d], max_s (r[s] + T[s, d]))        (one max-plus product per flow kind):

the closed form's result when the senders start together (equal to the per-call closed form
of ``tests/support/closed_form.py``; with a multi-plane fabric a receiver whose flows differ in
path latency may be done up to one NVLink hop earlier), and otherwise the synchronous schedule
shifted by each sender's delay: a late sender's flows still meet the contention they would have
met at a common start (conservative for that sender's receivers), and an early sender does not
get the ports to itself. ``tests/engine/test_exchange_tables.py`` checks both against the
per-call closed form and the flow-level reference; ``docs/model/network.md`` lists the errors.

Per-link bytes are linear in the volumes, so they are charged once at the end of the step from
the volumes summed over every exchange a rank ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from moesim.cluster.topology import Topology
from moesim.engine import kernels
from moesim.engine.alltoall import NEVER, ExchangePorts, processor_sharing_finish, shared_bounds

Array = npt.NDArray[np.float64]
# Exchange results kept for reuse (about 2 KiB each at EP64): a bound on a step's memory.
RESULT_CACHE_ENTRIES = 50_000


def max_plus(ready: Array, table: Array) -> Array:
    """``max_s (ready[..., s] + table[..., s, d])`` for every ``d``."""
    return (ready[..., :, None] + table).max(axis=-2)


def _ps_rows(sizes: Array, capacity: float) -> Array:
    """Processor-sharing finish (seconds from a common start) of each flow of each row's port;
    ``-inf`` for absent flows."""
    zero = np.zeros(sizes.shape[:-1])
    return processor_sharing_finish(sizes, zero, capacity)


def _ps_cols(sizes: Array, capacity: float) -> Array:
    """The same for the port of each column (flows into one receiver)."""
    return np.swapaxes(_ps_rows(np.swapaxes(sizes, -1, -2), capacity), -1, -2)


@dataclass
class _Tables:
    """Per-flow durations (cells, groups, n, n) of one direction at one byte size per token."""

    from_ready: Array
    """Durations counted from the senders' ready times (every kind of flow whose clock that
    is, merged by taking the latest: ``max_plus`` distributes over the maximum)."""
    from_relay: Array | None = None
    """Node-limited combine: InfiniBand durations counted from the relays' start."""
    start: Array | None = None
    """Node-limited combine: relay start dependencies (latency where a node-mate feeds a
    relay, ``-inf`` elsewhere)."""
    last_sender: Array | None = None
    """0 where a receiver waits for a sender, ``-inf`` elsewhere."""
    packed: kernels.PackedTables | None = None
    """The same for the compiled replay."""


@dataclass
class ExchangeTables:
    """Exchange durations of one pipeline rank's expert-parallel groups, by routing cell.

    Parameters
    ----------
    ports : ExchangePorts
        Gives the rank's topology structure (masks, relays, latencies) and link accounting.
    rank_tokens : ndarray, shape (cells, groups, n, n)
        Distinct tokens member ``s`` sends member ``d`` per cell (dispatch direction).
    node_tokens : ndarray, shape (cells, groups, n, nodes), or None
        Distinct tokens member ``s`` sends each node of its group (node-limited dispatch).
    """

    ports: ExchangePorts
    rank_tokens: Array
    node_tokens: Array | None
    _cache: dict[tuple[bool, float], _Tables] = field(default_factory=dict)
    _results: dict[tuple[int, bool, float, bytes], tuple[Array, Array]] = field(
        default_factory=dict
    )

    # ------------------------------------------------------------------ tables

    def _tables(self, toward_experts: bool, per_token: float) -> _Tables:
        key = (toward_experts, per_token)
        tables = self._cache.get(key)
        if tables is None:
            if self.node_tokens is None:
                tables = self._plain(toward_experts, per_token)
            elif toward_experts:
                tables = self._node_dispatch(per_token)
            else:
                tables = self._node_combine(per_token)
            senders = self.rank_tokens > 0  # [s, d]: d waits for s toward the experts
            if not toward_experts:
                senders = np.swapaxes(senders, -1, -2)
            tables.last_sender = np.where(senders, 0.0, NEVER)
            if kernels.ENABLED:
                tables.packed = kernels.pack(
                    tables.from_ready, tables.start, tables.from_relay, tables.last_sender
                )
            self._cache[key] = tables
        return tables

    def _plain(self, toward_experts: bool, per_token: float) -> _Tables:
        p = self.ports
        sizes = self.rank_tokens * per_token
        if not toward_experts:
            sizes = np.swapaxes(sizes, -1, -2)
        sizes, nvl, direct_ib, relayed = p.split_plain(sizes)
        ib_in = direct_ib + relayed
        finish = np.maximum(_ps_rows(nvl + relayed, p.nvl_cap), _ps_rows(direct_ib, p.nic_cap))
        finish = np.maximum(finish, np.where(nvl > 0, _ps_cols(nvl, p.nvl_cap), NEVER))
        finish = np.maximum(finish, np.where(ib_in > 0, _ps_cols(ib_in, p.nic_cap), NEVER))
        if p.extra_ports is not None:
            topo = p.topo
            bound = shared_bounds(p.extra_ports, sizes, topo.links, topo.capacity)
            finish = np.maximum(finish, bound)
        table = np.where(sizes > 0, finish + p.latency, NEVER)
        return _Tables(table)

    def _expand_nodes(self, per_node: Array) -> Array:
        """(cells, g, n, K) indexed by (member, node) → (cells, g, n, n) by (member, member of
        that node)."""
        return per_node[..., self.ports.own_node]

    def _block(self, per_node: Array) -> Array:
        """(cells, g, K, l, l') node-local matrices → (cells, g, n, n), ``-inf`` across nodes."""
        p = self.ports
        cells, g = per_node.shape[:2]
        n = p.members
        out = np.full((cells, g, n, n), NEVER)
        for k in range(p.nodes):
            sl = slice(k * p.local, (k + 1) * p.local)
            out[:, :, sl, sl] = per_node[:, :, k]
        return out

    def _ib_hop(self, ib: Array, reverse: bool) -> Array:
        """Seconds of each InfiniBand flow (cells, g, n, K) between owner ``s`` and its relay on
        node ``k``, all senders starting together, latency excluded."""
        p = self.ports
        cells, g = ib.shape[:2]
        k_n, loc = p.nodes, p.local
        ib4 = ib.reshape(cells, g, k_n, loc, k_n)  # [owner node, local, relay node]
        if not reverse:
            out = _ps_rows(ib, p.nic_cap)
            # Relay (k, l) receives from owners (k', l).
            inn = _ps_rows(ib4.transpose(0, 1, 3, 4, 2), p.nic_cap)  # (c, g, l, k, k')
            inn = inn.transpose(0, 1, 4, 2, 3).reshape(ib.shape)
        else:
            sends = ib4.transpose(0, 1, 4, 3, 2)  # relay (k, l) → owners k': (c, g, k, l, k')
            out = _ps_rows(sends, p.nic_cap).transpose(0, 1, 4, 3, 2).reshape(ib.shape)
            # Owner (k', l) receives from relays (k, l).
            inn = _ps_rows(ib4, p.nic_cap)  # (c, g, k', l, k)
            inn = inn.reshape(ib.shape)
        finish = np.maximum(out, inn)
        if p.relay_leaf is not None:
            topo = p.topo
            leaf = shared_bounds(p.ib_leaf_ports(reverse), ib, topo.links, topo.capacity)
            finish = np.maximum(finish, leaf)
        return np.where(ib > 0, finish, NEVER)

    def _node_dispatch(self, per_token: float) -> _Tables:
        p = self.ports
        assert self.node_tokens is not None
        rank_bytes = self.rank_tokens * per_token
        ib = np.where(p.remote_node[None, None], self.node_tokens * per_token, 0.0)
        arrive = self._ib_hop(ib, reverse=False) + p.relay_latency  # (c, g, n, K)
        # Owner s → receiver d through its relay in d's node (plus the NVLink hop unless the
        # relay is d itself), for every remote token routed to d.
        at_relay = self._expand_nodes(arrive)  # (c, g, s, d)
        hop = np.where(p.pair_relay == np.arange(p.members), 0.0, p.topo.nvlink_latency_s)
        needs = (rank_bytes > 0) & p.pair_remote
        via_ib = np.where(needs, at_relay + hop, NEVER)
        # NVLink forwarding relay (k, l) → (k, l'), from the relay's own start.
        z = p.forwarded(rank_bytes)
        fwd = np.maximum(_ps_rows(z, p.nvl_cap), _ps_cols(z, p.nvl_cap))
        fwd = np.where(z > 0, fwd + p.topo.nvlink_latency_s, NEVER)
        return _Tables(np.maximum(via_ib, self._block(fwd)))

    def _node_combine(self, per_token: float) -> _Tables:
        p = self.ports
        assert self.node_tokens is not None
        rank_bytes = self.rank_tokens * per_token
        nvl_lat = p.topo.nvlink_latency_s
        # NVLink gather: expert GPU (k, l') → relay (k, l).
        z = np.swapaxes(p.forwarded(rank_bytes), -1, -2)  # (c, g, K, l', l)
        gather = np.maximum(_ps_rows(z, p.nvl_cap), _ps_cols(z, p.nvl_cap))
        gather = np.where(z > 0, gather + nvl_lat, NEVER)
        gathered = self._block(gather)  # [d', q]
        # A relay's InfiniBand stream starts once every node-mate feeding it is ready.
        start = self._block(np.where(z > 0, nvl_lat, NEVER))
        # InfiniBand: relay q = (k, l) → owner s = (k', l).
        ib = np.where(p.remote_node[None, None], self.node_tokens * per_token, 0.0)
        hop = self._ib_hop(ib, reverse=True) + p.relay_latency  # (c, g, s, k)
        cells, g = ib.shape[:2]
        n = p.members
        ib_table = np.full((cells, g, n, n), NEVER)  # [q, s]
        relay = p.relay_of  # (s, k) → relay member
        s_idx = np.broadcast_to(np.arange(n)[:, None], relay.shape)
        ib_table[:, :, relay, s_idx] = hop
        # The last partial result from expert GPU d reaches s's relay in d's node, then crosses.
        local = np.arange(n) % p.local
        # gather[:, :, node of d, local rank of d, local rank of s] as [d, s], through one
        # flat index: the result is then laid out in order (which the later passes stream).
        at = (p.own_node[:, None] * p.local + local[:, None]) * p.local + local[None, :]
        via = gather.reshape(*gather.shape[:2], -1)[:, :, at]
        via += np.swapaxes(p.relay_latency[:, :, p.own_node], -1, -2)  # (g, d, s)
        needs = np.swapaxes((rank_bytes > 0) & p.pair_remote, -1, -2)  # [d, s]
        np.copyto(via, NEVER, where=~needs)  # in place: one 16 MB temporary less at EP64
        return _Tables(np.maximum(gathered, via), from_relay=ib_table, start=start)

    # ------------------------------------------------------------------ per exchange

    def exchange(
        self, ready: Array, cell: int, toward_experts: bool, per_token: float
    ) -> tuple[Array, Array]:
        """Receivers' done times (groups, n) of the exchange of routing cell ``cell`` whose
        senders are ready at ``ready`` (groups, n), and each receiver's last sender's ready
        time (for the straggler attribution)."""
        if kernels.ENABLED:
            # The compiled loop, bit for bit the NumPy path below without its result cache:
            # computing costs it less than the cache's key.
            packed = self._tables(toward_experts, per_token).packed
            if packed is not None:
                done, last = kernels.exchange(np.ascontiguousarray(ready), packed, cell)
                return done, last
        # Max-plus products commute with a common shift of the ready times: an exchange whose
        # senders are ready in the same pattern as before (balanced routing, a steady pipeline)
        # reuses that result, shifted.
        base = ready.min(axis=-1, keepdims=True)
        rel = ready - base
        key = (cell, toward_experts, per_token, rel.tobytes())
        hit = self._results.get(key)
        if hit is None:
            if len(self._results) >= RESULT_CACHE_ENTRIES:
                self._results.clear()
            hit = self._results[key] = self._exchange(rel, cell, toward_experts, per_token)
        return hit[0] + base, hit[1] + base

    def packed(self, toward_experts: bool, per_token: float) -> kernels.PackedTables | None:
        """The tables of one direction as the compiled replay reads them (None when the
        compiled loops are off)."""
        return self._tables(toward_experts, per_token).packed

    def _exchange(
        self, ready: Array, cell: int, toward_experts: bool, per_token: float
    ) -> tuple[Array, Array]:
        tables = self._tables(toward_experts, per_token)
        assert tables.last_sender is not None
        done = np.maximum(ready, max_plus(ready, tables.from_ready[cell]))
        if tables.from_relay is not None:
            assert tables.start is not None
            relay_start = np.maximum(ready, max_plus(ready, tables.start[cell]))
            done = np.maximum(done, max_plus(relay_start, tables.from_relay[cell]))
        last = max_plus(ready, tables.last_sender[cell])
        return done, np.maximum(last, ready)

    def charge(self, ports: ExchangePorts, uses: Array) -> None:
        """Charge ``ports``' links (its rank's GPUs; its load) for the exchanges run there:
        ``uses[cell, direction]`` sums the bytes per token of each exchange of that cell
        (direction 0: toward the experts, 1: back)."""
        for direction in (0, 1):
            weight = uses[:, direction]
            if not weight.any():
                continue
            rank_bytes = np.tensordot(weight, self.rank_tokens, axes=(0, 0))
            if self.node_tokens is None:
                sizes = rank_bytes if direction == 0 else np.swapaxes(rank_bytes, -1, -2)
                ports.charge_plain(sizes)
            else:
                node_bytes = np.tensordot(weight, self.node_tokens, axes=(0, 0))
                ports.charge_node_limited(node_bytes, rank_bytes, reverse=direction == 1)


def structure_key(topology: Topology, gpus: npt.NDArray[np.int64]) -> tuple:
    """What a rank's exchange durations depend on besides the volumes: the relative placement
    of its GPUs in NVLink domains, nodes and leaf switches (ranks with equal keys share
    tables)."""
    flat = gpus.ravel()
    rel = lambda v: tuple((np.asarray(v) - np.asarray(v).min()).tolist())  # noqa: E731
    return (
        gpus.shape,
        rel(flat),
        rel(topology.domain_of(flat)),
        rel(topology.leaf_of(flat)),
    )
