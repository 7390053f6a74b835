"""Flow-level reference of all-to-all exchanges on a max-min fair-share network.

Every flow starts at its sender's ready time on ``Topology.path`` with ``Topology.latency``
and shares the links it crosses max-min fairly with the flows active at the same time
(:class:`~.fair_share.FairShareNetwork`); the harness records, per receiver, its last
completion.

Node-limited (DeepEP) exchanges have two hops, built explicitly: an InfiniBand flow from the
sender to its relay (the GPU of the destination node with the sender's in-node index), then
NVLink flows from the relay to the GPUs that host the tokens' experts. With ``chunks = 1`` the
relay forwards only once the whole InfiniBand flow is in (store-and-forward: pessimistic,
DeepEP pipelines); with ``chunks = c`` each flow is sent as ``c`` back-to-back pieces and each
piece is forwarded as soon as it arrives, so the reference tends to the pipelined exchange as
``1/c``. The combine is the mirror image: partial results are gathered over NVLink and the
relay sends piece ``j`` over InfiniBand once piece ``j`` of every node-mate is in (and once it
is ready itself).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import numpy.typing as npt
import simpy

from moesim.cluster.topology import Topology
from tests.support.fair_share import FairShareNetwork

Array = npt.NDArray[np.float64]


class Reference:
    """Flows between members of expert-parallel groups on a FairShareNetwork."""

    def __init__(self, topo: Topology, gpus: npt.NDArray[np.int64], ready: Array) -> None:
        self.topo, self.gpus = topo, np.asarray(gpus)
        self.env = simpy.Environment()
        self.net = FairShareNetwork(self.env, topo.capacity)
        self.ready = np.asarray(ready, dtype=np.float64)
        self.done = self.ready.copy()

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run ``action`` at simulated time ``when`` (now if it is past)."""
        self.env.timeout(max(when - self.env.now, 0.0)).callbacks.append(lambda _e: action())

    def latency(self, group: int, a: int, b: int) -> float:
        return self.topo.latency(int(self.gpus[group, a]), int(self.gpus[group, b]))

    def send(
        self,
        group: int,
        a: int,
        b: int,
        nbytes: float,
        then: Callable[[], None],
        latency: bool = True,
    ) -> None:
        """Start a flow from member ``a`` to member ``b`` now; ``then`` runs when its last byte
        has arrived (or, with ``latency=False``, has been sent)."""
        ga, gb = int(self.gpus[group, a]), int(self.gpus[group, b])
        lat = self.topo.latency(ga, gb) if latency else 0.0
        event = self.net.transfer(self.topo.path(ga, gb), nbytes, lat)
        event.callbacks.append(lambda _e: then())

    def arrived(self, group: int, member: int) -> None:
        self.done[group, member] = max(self.done[group, member], self.env.now)

    def run(self) -> Array:
        self.env.run()
        return self.done


def reference_all_to_all(
    topo: Topology, gpus: npt.NDArray[np.int64], ready: Array, sizes: Array
) -> tuple[Array, FairShareNetwork]:
    """Every member sends ``sizes[g, s, d]`` to every other member from ``ready[g, s]``."""
    ref = Reference(topo, gpus, ready)
    for g, s, d in zip(*np.nonzero(sizes), strict=True):
        if s != d:
            send = partial(ref.send, g, s, d, sizes[g, s, d], partial(ref.arrived, g, d))
            ref.at(ready[g, s], send)
    return ref.run(), ref.net


class Pieces:
    """``nbytes`` from member ``a`` to ``b`` as ``chunks`` back-to-back flows; ``on_piece(j)``
    runs when piece ``j`` has arrived."""

    def __init__(
        self,
        ref: Reference,
        group: int,
        a: int,
        b: int,
        nbytes: float,
        chunks: int,
        on_piece: Callable[[int], None],
    ) -> None:
        self.ref, self.group, self.a, self.b = ref, group, a, b
        self.piece, self.chunks, self.on_piece = nbytes / chunks, chunks, on_piece
        self.lat = ref.latency(group, a, b)

    def start(self, j: int = 0) -> None:
        self.ref.send(self.group, self.a, self.b, self.piece, partial(self._sent, j), False)

    def _sent(self, j: int) -> None:
        if j + 1 < self.chunks:
            self.start(j + 1)
        self.ref.at(self.ref.env.now + self.lat, partial(self.on_piece, j))


class Forward:
    """Dispatch at a relay: each arriving piece of ``s``'s tokens goes on to the relay's
    node-mates over NVLink, once the relay is ready (forwarding is its kernel's work)."""

    def __init__(
        self, ref: Reference, group: int, s: int, relay: int, rank_bytes: Array, chunks: int
    ) -> None:
        self.ref, self.group, self.s, self.relay = ref, group, s, relay
        self.rank_bytes, self.chunks = rank_bytes, chunks
        node = relay // ref.topo.gpus_per_node
        gpn = ref.topo.gpus_per_node
        self.peers = [
            d for d in range(node * gpn, (node + 1) * gpn) if d != relay and rank_bytes[s, d] > 0
        ]

    def piece_in(self, _j: int) -> None:
        if self.rank_bytes[self.s, self.relay] > 0:
            self.ref.arrived(self.group, self.relay)
        self.ref.at(max(self.ref.env.now, self.ref.ready[self.group, self.relay]), self._go)

    def _go(self) -> None:
        for d in self.peers:
            nbytes = self.rank_bytes[self.s, d] / self.chunks
            self.ref.send(
                self.group, self.relay, d, nbytes, partial(self.ref.arrived, self.group, d)
            )


class Gather:
    """Combine at a relay: piece ``j`` of the results for owner ``s`` leaves over InfiniBand
    once piece ``j`` of every contributing node-mate is in, the previous piece is sent and the
    relay is ready."""

    def __init__(
        self,
        ref: Reference,
        group: int,
        relay: int,
        owner: int,
        nbytes: float,
        chunks: int,
        sources: int,
        relay_ready: float,
    ) -> None:
        self.ref, self.group, self.relay, self.owner = ref, group, relay, owner
        self.piece, self.chunks, self.sources = nbytes / chunks, chunks, sources
        self.relay_ready = relay_ready
        self.count = [0] * chunks
        self.next, self.busy = 0, False
        self.lat = ref.latency(group, relay, owner)

    def got(self, j: int) -> None:
        self.count[j] += 1
        self.try_send()

    def try_send(self) -> None:
        j = self.next
        if self.busy or j >= self.chunks or self.count[j] < self.sources:
            return
        if self.ref.env.now < self.relay_ready:
            return
        self.busy = True
        self.ref.send(self.group, self.relay, self.owner, self.piece, self._sent, False)

    def _sent(self) -> None:
        self.busy = False
        self.next += 1
        if self.next == self.chunks:
            self.ref.at(
                self.ref.env.now + self.lat, partial(self.ref.arrived, self.group, self.owner)
            )
        self.try_send()


def reference_node_limited(
    topo: Topology,
    gpus: npt.NDArray[np.int64],
    ready: Array,
    node_bytes: Array,
    rank_bytes: Array,
    chunks: int,
    combine: bool,
) -> tuple[Array, FairShareNetwork]:
    """Two-hop node-limited dispatch (or, ``combine``, its combine) of every group."""
    ref = Reference(topo, gpus, ready)
    groups, n = ref.gpus.shape
    gpn = topo.gpus_per_node
    for g in range(groups):
        for s in range(n):
            own, local = divmod(s, gpn)
            for k in range(n // gpn):
                relay = k * gpn + local
                mates = [d for d in range(k * gpn, (k + 1) * gpn) if d != relay]
                mates = [d for d in mates if rank_bytes[g, s, d] > 0]
                if k == own:  # in-node tokens: NVLink only, the sender is its own relay
                    for d in mates:
                        a, b = (d, s) if combine else (s, d)
                        then = partial(ref.arrived, g, b)
                        ref.at(ready[g, a], partial(ref.send, g, a, b, rank_bytes[g, s, d], then))
                    continue
                if node_bytes[g, s, k] <= 0:
                    continue
                if not combine:
                    fwd = Forward(ref, g, s, relay, rank_bytes[g], chunks)
                    pipe = Pieces(ref, g, s, relay, node_bytes[g, s, k], chunks, fwd.piece_in)
                    ref.at(ready[g, s], pipe.start)
                    continue
                gather = Gather(
                    ref, g, relay, s, node_bytes[g, s, k], chunks, len(mates), ready[g, relay]
                )
                for d in mates:
                    pipe = Pieces(ref, g, d, relay, rank_bytes[g, s, d], chunks, gather.got)
                    ref.at(ready[g, d], pipe.start)
                ref.at(ready[g, relay], gather.try_send)
    return ref.run(), ref.net
