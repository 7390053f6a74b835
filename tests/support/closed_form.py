"""The per-port closed form of one exchange whose senders start at different times.

The engine (:class:`~moesim.engine.exchange_tables.ExchangeTables`) prices every flow once with
all senders starting together and replays those durations shifted by each sender's ready time.
This module prices one exchange at a time from the senders' actual ready times ``r``, on the
same ports (:class:`~moesim.engine.alltoall.ExchangePorts`) and the same port bounds, except at
a receiver's in-port, which here is a work-conserving server of flows released at different
times: its last byte arrives at ``max_k (r_k + Σ_{j: r_j ≥ r_k} x_j) / C`` (senders in
release order). With synchronous senders both give the same receivers' done times
(``tests/engine/test_exchange_tables.py``); both are measured against the flow-level reference
in :mod:`.flow_reference`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from moesim.engine.alltoall import NEVER, ExchangePorts, processor_sharing_finish, shared_bounds

Array = npt.NDArray[np.float64]


def released_makespan(sizes: Array, release: Array, capacity: float) -> Array:
    """Last arrival at an in-port fed by flows released at different times.

    ``sizes`` (..., n, m): flow from sender ``j`` (axis -2) to port ``i`` (axis -1);
    ``release`` (..., n): sender ``j``'s start. Returns (..., m); ``-inf`` for a port without
    flows.
    """
    order = np.argsort(release, axis=-1, kind="stable")
    r = np.take_along_axis(release, order, axis=-1)
    x = np.take_along_axis(sizes, order[..., None], axis=-2)
    suffix = np.cumsum(x[..., ::-1, :], axis=-2)[..., ::-1, :]
    # A sender without bytes for this port must not pin it to its release time.
    finish = np.where(x > 0, r[..., None] + suffix / capacity, NEVER).max(axis=-2)
    return np.where(sizes.sum(axis=-2) > 0, finish, NEVER)


def _shared(
    ports: ExchangePorts, which: npt.NDArray[np.int64], sizes: Array, release: Array
) -> Array:
    """Per flow, its latest finish at the shared ports ``which`` (relays, leaf links)."""
    topo = ports.topo
    return shared_bounds(which, sizes[None], topo.links, topo.capacity, release[None])[0]


def all_to_all(ports: ExchangePorts, ready: Array, sizes: Array) -> Array:
    """Receivers' done times of a plain exchange in which member ``s`` sends ``sizes[:, s, d]``
    bytes to member ``d`` of its group, starting at ``ready[:, s]``. Shapes (groups,
    members[, members]); a receiver without incoming bytes is done at its own ready time."""
    p = ports
    sizes, nvl, direct_ib, relayed = p.split_plain(sizes)
    ib_in = direct_ib + relayed
    # Out-ports: NVLink carries intra-domain and (multi-plane) first-hop traffic.
    finish = np.maximum(
        processor_sharing_finish(nvl + relayed, ready, p.nvl_cap),
        processor_sharing_finish(direct_ib, ready, p.nic_cap),
    )
    # In-ports bound only the flows that cross them: NVLink from the domain, the NIC from
    # everywhere else (so each flow then gets its own path latency).
    nvl_in = released_makespan(nvl, ready, p.nvl_cap)[:, None, :]
    nic_in = released_makespan(ib_in, ready, p.nic_cap)[:, None, :]
    finish = np.maximum(finish, np.where(nvl > 0, nvl_in, NEVER))
    finish = np.maximum(finish, np.where(ib_in > 0, nic_in, NEVER))
    if p.extra_ports is not None:
        release = np.broadcast_to(ready[:, :, None], sizes.shape)
        finish = np.maximum(finish, _shared(p, p.extra_ports, sizes, release))
    finish = np.where(sizes > 0, finish + p.latency, NEVER)
    return np.maximum(finish.max(axis=1), ready)


def _ib_hop(p: ExchangePorts, ib: Array, release: Array, reverse: bool) -> Array:
    """Finish of each InfiniBand flow between owner ``s`` and its relay on node ``k``
    (``ib``: (g, n, K) bytes, zero for ``s``'s own node), latency included.

    Dispatch: ``s`` sends all its flows from ``release[:, s]``; the relay's in-port serves
    flows released at different times. Combine (``reverse``): relay ``m`` sends its flows
    from ``release[:, m]``; the owner's in-port serves the relays of the other nodes.
    """
    g, k_n, loc = p.groups, p.nodes, p.local
    ib4 = ib.reshape(g, k_n, loc, k_n)  # [owner node, local, relay node]
    rel3 = release.reshape(g, k_n, loc)  # [node, local]
    by_local = rel3.transpose(0, 2, 1)  # (g, local, node)
    if not reverse:
        out = processor_sharing_finish(ib, release, p.nic_cap)
        # Relay (k, l) receives from (k', l): senders k', ports k, per (g, l).
        inn = released_makespan(ib4.transpose(0, 2, 1, 3), by_local, p.nic_cap)
        inn = np.broadcast_to(inn[:, None], ib4.shape)  # (g, k', l, k)
        flow_release = np.broadcast_to(release[:, :, None], ib.shape)
    else:
        # Relay (k, l) sends to (k', l): processor sharing over k' per (g, k, l).
        sends = ib4.transpose(0, 3, 2, 1)  # (g, k, l, k')
        out = processor_sharing_finish(sends, rel3, p.nic_cap).transpose(0, 3, 2, 1)
        out = out.reshape(ib.shape)
        # Owner (k', l) receives from relays (k, l): senders k, ports k', per (g, l).
        inn = released_makespan(ib4.transpose(0, 2, 3, 1), by_local, p.nic_cap)
        inn = np.broadcast_to(inn.transpose(0, 2, 1)[..., None], ib4.shape)
        flow_release = release[:, p.relay_of]
    finish = np.maximum(out, inn.reshape(ib.shape))
    if p.relay_leaf is not None:
        finish = np.maximum(finish, _shared(p, p.ib_leaf_ports(reverse), ib, flow_release))
    return np.where(ib > 0, finish + p.relay_latency, NEVER)


def node_limited_dispatch(
    ports: ExchangePorts, ready: Array, node_bytes: Array, rank_bytes: Array
) -> Array:
    """DeepEP-style dispatch. ``node_bytes[:, s, k]``: bytes ``s`` sends to node ``k`` of its
    group (each token once per node); ``rank_bytes[:, s, d]``: bytes that must reach member
    ``d`` (each token once per GPU). Returns the receivers' done times."""
    p = ports
    p.check_node_local()
    g, n = p.gpus.shape
    k_n, loc = p.nodes, p.local
    nvl_lat = p.topo.nvlink_latency_s
    ib = np.where(p.remote_node[None], node_bytes, 0.0)
    arrive = _ib_hop(p, ib, ready, reverse=False)  # (g, n, K): s's tokens at the relay
    # NVLink hop: relay (k, l) → (k, l'). Forwarding is the relay's kernel's work, so it
    # starts when the relay is ready; then it streams from the first data it holds (its
    # own tokens, a remote sender's as soon as they start to arrive).
    z = p.forwarded(rank_bytes)
    own = np.where(p.nvlink & p.same_node, rank_bytes, 0.0)
    first = np.where(ib > 0, ready[:, :, None] + p.relay_latency, np.inf)
    first = np.where(
        p.remote_node[None], first, np.where(own.sum(axis=2) > 0, ready, np.inf)[:, :, None]
    )
    relay_first = first.reshape(g, k_n, loc, k_n).min(axis=1).transpose(0, 2, 1)  # (g, K, l)
    relay_first = np.maximum(relay_first, ready.reshape(g, k_n, loc))
    fwd_out = processor_sharing_finish(z, relay_first, p.nvl_cap)
    fwd_in = released_makespan(z, relay_first, p.nvl_cap)  # (g, K, l')
    fwd = np.maximum(fwd_out, np.where(z > 0, fwd_in[:, :, None, :], NEVER))
    done = (fwd.max(axis=2) + nvl_lat).reshape(g, n)
    # A sender's own-node tokens leave its NVLink port only once it is ready.
    own_sent = processor_sharing_finish(own, ready, p.nvl_cap)
    done = np.maximum(done, (own_sent + nvl_lat).max(axis=1))
    # A receiver waits for the InfiniBand arrival of every remote token routed to it, and
    # then (unless it is the relay) for the last piece's NVLink hop, which its relay
    # forwards once ready.
    needs = (rank_bytes > 0) & p.pair_remote  # (g, s, d)
    at_relay = arrive[:, :, p.own_node]  # (g, s, d): s's tokens at d's node
    forwarded = np.maximum(at_relay, ready[:, p.pair_relay]) + nvl_lat
    last = np.where(p.pair_relay == np.arange(n), at_relay, forwarded)
    done = np.maximum(done, np.where(needs, last, NEVER).max(axis=1))
    return np.maximum(done, ready)


def node_limited_combine(
    ports: ExchangePorts, ready: Array, node_bytes: Array, rank_bytes: Array
) -> Array:
    """The reverse of :func:`node_limited_dispatch`: member ``d`` returns
    ``rank_bytes[:, s, d]`` to the relay of ``s`` in its node over NVLink, each relay sends
    ``node_bytes[:, s, k]`` to ``s`` over InfiniBand. ``ready[:, d]``: when member ``d``'s
    experts are done. Returns the token owners' done times."""
    p = ports
    p.check_node_local()
    g, n = p.gpus.shape
    k_n, loc = p.nodes, p.local
    nvl_lat = p.topo.nvlink_latency_s
    # NVLink: expert GPU (k, l') → relay (k, l), the partial results of every token owner
    # with in-node index l (the relay itself included).
    z = np.swapaxes(p.forwarded(rank_bytes), -1, -2)  # (g, K, l', l)
    r3 = ready.reshape(g, k_n, loc)
    out_done = processor_sharing_finish(z, r3, p.nvl_cap)
    in_done = released_makespan(z, r3, p.nvl_cap)  # (g, K, l)
    gathered = np.where(z > 0, np.maximum(out_done, in_done[:, :, None, :]) + nvl_lat, NEVER)
    # Owners in the relay's own node are the relays themselves: done when gathered.
    done = gathered.max(axis=2).reshape(g, n)
    # InfiniBand: relay (k, l) → owner (k', l). A relay reduces a token once all its partial
    # results are in and works through its tokens in order, so its stream starts once every
    # node-mate that sends to it (and the relay itself) is ready.
    ib = np.where(p.remote_node[None], node_bytes, 0.0)
    start = np.where(z > 0, r3[:, :, :, None] + nvl_lat, NEVER).max(axis=2)  # (g, K, l)
    start = np.maximum(start, r3).reshape(g, n)
    arrive = _ib_hop(p, ib, start, reverse=True)
    done = np.maximum(done, arrive.max(axis=2))
    # The last partial result from a node-mate d reaches s's relay when the gather flow
    # d → relay ends; the reduced token then crosses InfiniBand.
    local = np.arange(n) % loc
    via = gathered[:, p.own_node[None, :], local[None, :], local[:, None]]  # (g, s, d)
    lat_ib = p.relay_latency[:, :, p.own_node]
    needs = (rank_bytes > 0) & p.pair_remote
    done = np.maximum(done, np.where(needs, via + lat_ib, NEVER).max(axis=2))
    return np.maximum(done, ready)
