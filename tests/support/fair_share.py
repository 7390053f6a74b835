"""Max-min fair-share network of links, driven by SimPy.

Model
-----
A network is a set of links (NVLink ports, NIC ports, ...) with a capacity in bytes/s. A flow
has a path (a list of link ids), a size in bytes and a latency in seconds. All flows that are
active at the same time share every link max-min fairly: no flow can get more bandwidth without
taking it from a flow that already has less or the same. The allocation is computed by
*progressive filling*: every unfrozen flow's rate grows at the same pace until some link
saturates; the flows crossing a saturated link freeze, and the rest keep growing.

A flow consumes bandwidth from the simulated instant it starts until its last byte is sent; its
completion event succeeds ``latency`` seconds later (propagation delay holds no bandwidth), so a
lone flow on an idle link of capacity ``C`` completes after ``latency + nbytes / C``.

Rates are recomputed only when the set of active flows changes, and between two recomputes every
rate is constant. Every change (flows started, flows finished) marks the network dirty and
schedules a single zero-delay wake-up for that instant, so all changes of one instant (several
``start`` calls from several processes, several flows finishing together, and flows started by
processes reacting to those completions) cost one recompute. After each recompute one timeout is
scheduled for the earliest finish ``min(remaining / rate)``. It carries a generation number: a
later recompute bumps the generation, and a superseded timeout does nothing when it fires (lazy
invalidation: no polling, no process interrupts).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import simpy

# A link whose remaining capacity is at most this fraction of its capacity is saturated.
_SATURATION_RTOL = 1e-12
# A flow whose remaining bytes are at most this fraction of its size has finished.
_FINISH_RTOL = 1e-10


def max_min_rates(
    flow_of_pair: np.ndarray,
    link_of_pair: np.ndarray,
    n_flows: int,
    capacity: np.ndarray,
) -> np.ndarray:
    """Max-min fair rates of flows sharing capacitated links, by progressive filling.

    Parameters
    ----------
    flow_of_pair : np.ndarray, shape (n_pairs,), int
        Flow index of each incidence pair, in ``[0, n_flows)``.
    link_of_pair : np.ndarray, shape (n_pairs,), int
        Link index of each incidence pair: pair ``p`` says flow ``flow_of_pair[p]`` crosses link
        ``link_of_pair[p]``. A link listed twice for one flow is charged twice.
    n_flows : int
        Number of flows. Every flow must appear in at least one pair.
    capacity : np.ndarray, shape (n_links,), float
        Capacity of each link in bytes/s, all > 0.

    Returns
    -------
    np.ndarray, shape (n_flows,), float64
        Rate of each flow in bytes/s.

    Raises
    ------
    ValueError
        If a flow crosses no link.
    """
    flows = np.asarray(flow_of_pair, dtype=np.intp)
    links = np.asarray(link_of_pair, dtype=np.intp)
    cap = np.asarray(capacity, dtype=np.float64)
    rate = np.zeros(n_flows, dtype=np.float64)
    if n_flows == 0:
        return rate
    if np.any(np.bincount(flows, minlength=n_flows) == 0):
        raise ValueError("every flow must cross at least one link")
    remaining = cap.copy()
    tol = cap * _SATURATION_RTOL
    frozen = np.zeros(n_flows, dtype=bool)
    level = 0.0  # the common rate of every unfrozen flow
    while flows.size:  # flows and links now hold the pairs of the unfrozen flows only
        n = np.bincount(links, minlength=cap.size)
        used = np.flatnonzero(n)
        per_flow = remaining[used] / n[used]
        first = int(np.argmin(per_flow))
        share = max(float(per_flow[first]), 0.0)
        level += share
        remaining -= share * n
        saturated = (n > 0) & (remaining <= tol)
        saturated[used[first]] = True  # guarantees progress whatever the rounding
        remaining[saturated] = 0.0
        hit = flows[saturated[links]]
        rate[hit] = level
        frozen[hit] = True
        live = ~frozen[flows]
        flows, links = flows[live], links[live]
    return rate


class FairShareNetwork:
    """Links of fixed capacity shared max-min fairly by the flows active at each instant.

    Parameters
    ----------
    env : simpy.Environment
        Environment the flows run in.
    capacity : np.ndarray, shape (n_links,), float
        Capacity of each link in bytes/s, all finite and > 0.

    Attributes
    ----------
    link_bytes : np.ndarray, shape (n_links,), float64
        Bytes carried by each link so far.
    link_busy_s : np.ndarray, shape (n_links,), float64
        Simulated seconds during which each link carried at least one active flow.
    recomputes : int
        Number of rate recomputations (calls of :func:`max_min_rates`) so far.
    flows_started : int
        Number of flows started so far, including zero-byte and empty-path flows.
    """

    def __init__(self, env: simpy.Environment, capacity: np.ndarray) -> None:
        cap = np.array(capacity, dtype=np.float64)
        if cap.ndim != 1 or not np.all(np.isfinite(cap)) or np.any(cap <= 0):
            raise ValueError("capacity must be a 1-D array of finite values > 0")
        self.env = env
        self.capacity = cap
        self.link_bytes = np.zeros(cap.size, dtype=np.float64)
        self.link_busy_s = np.zeros(cap.size, dtype=np.float64)
        self.recomputes = 0
        self.flows_started = 0
        # Active flows, compacted on finish; pairs are their COO incidence with the links.
        self._events = np.empty(0, dtype=object)
        self._size = np.empty(0)
        self._remaining = np.empty(0)
        self._rate = np.empty(0)
        self._latency = np.empty(0)
        self._pair_flow = np.empty(0, dtype=np.intp)
        self._pair_link = np.empty(0, dtype=np.intp)
        self._busy = np.zeros(cap.size, dtype=bool)
        # Flows started since the last recompute: (path, nbytes, latency, event).
        self._pending: list[tuple[tuple[int, ...], float, float, simpy.Event]] = []
        # Links whose set of flows changed since the last recompute: only the flows connected
        # to them (through shared links, transitively) can change rate.
        self._dirty = np.zeros(cap.size, dtype=bool)
        self._wake_pending = False
        self._generation = 0
        self._next_dt = 0.0
        self._next_first = 0
        self._t = env.now

    def transfer(self, path: Sequence[int], nbytes: float, latency: float = 0.0) -> simpy.Event:
        """Start one flow now; see :meth:`start`.

        Returns
        -------
        simpy.Event
            Succeeds ``latency`` s after the flow's last byte is sent.
        """
        return self.start([path], [nbytes], latency)[0]

    def start(
        self,
        paths: Sequence[Sequence[int]],
        nbytes: Sequence[float],
        latency: Sequence[float] | float,
    ) -> list[simpy.Event]:
        """Start flows at the current simulated time.

        Parameters
        ----------
        paths : sequence of sequence of int, length n
            Link ids crossed by each flow.
        nbytes : sequence of float, length n
            Size of each flow in bytes, >= 0.
        latency : float or sequence of float (length n)
            Propagation delay in seconds, >= 0, added after the last byte is sent.

        Returns
        -------
        list of simpy.Event, length n
            Completion event of each flow. A zero-byte or empty-path flow completes after its
            latency alone and takes no bandwidth.
        """
        n = len(paths)
        sizes = np.asarray(nbytes, dtype=np.float64).reshape(-1)
        lats = np.broadcast_to(np.asarray(latency, dtype=np.float64), (n,))
        if sizes.size != n:
            raise ValueError("paths and nbytes must have the same length")
        if not (np.all(np.isfinite(sizes)) and np.all(sizes >= 0)):
            raise ValueError("nbytes must be finite and >= 0")
        if not (np.all(np.isfinite(lats)) and np.all(lats >= 0)):
            raise ValueError("latency must be finite and >= 0")
        events: list[simpy.Event] = []
        for path, size, lat in zip(paths, sizes.tolist(), lats.tolist(), strict=True):
            if size == 0 or len(path) == 0:
                events.append(self.env.timeout(lat))
                continue
            if min(path) < 0 or max(path) >= self.capacity.size:
                raise ValueError(
                    f"path {list(path)} names a link outside [0, {self.capacity.size})"
                )
            event = self.env.event()
            self._pending.append((tuple(path), size, lat, event))
            events.append(event)
        self.flows_started += n
        if self._pending:
            self._mark_dirty()
        return events

    def _mark_dirty(self) -> None:
        """Schedule the single zero-delay wake-up of this instant, if none is pending."""
        if not self._wake_pending:
            self._wake_pending = True
            self.env.timeout(0).callbacks.append(self._on_wake)

    def _advance(self, dt: float) -> None:
        """Move every active flow ``dt`` seconds forward at its current rate."""
        self._t = self.env.now
        if dt <= 0 or self._rate.size == 0:
            return
        sent = self._rate * dt
        self._remaining -= sent
        self.link_bytes += np.bincount(
            self._pair_link, weights=sent[self._pair_flow], minlength=self.capacity.size
        )
        self.link_busy_s[self._busy] += dt

    def _on_wake(self, _event: simpy.Event) -> None:
        """Merge the pending flows, recompute rates and schedule the next finish."""
        self._wake_pending = False
        self._advance(self.env.now - self._t)
        if self._pending:
            paths, sizes, lats, events = zip(*self._pending, strict=True)
            self._pending = []
            lengths = np.fromiter(map(len, paths), dtype=np.intp, count=len(paths))
            first = self._size.size
            new_links = np.fromiter(chain.from_iterable(paths), dtype=np.intp)
            new_flows = np.repeat(np.arange(first, first + len(paths)), lengths)
            self._pair_flow = np.concatenate([self._pair_flow, new_flows])
            self._pair_link = np.concatenate([self._pair_link, new_links])
            self._dirty[new_links] = True
            new_events = np.empty(len(events), dtype=object)
            new_events[:] = events
            self._events = np.concatenate([self._events, new_events])
            self._size = np.concatenate([self._size, sizes])
            self._remaining = np.concatenate([self._remaining, sizes])
            self._rate = np.concatenate([self._rate, np.zeros(len(sizes))])
            self._latency = np.concatenate([self._latency, lats])
        self._generation += 1
        n_flows = self._size.size
        if n_flows == 0:
            self._rate = np.empty(0)
            self._busy[:] = False
            return
        self._recompute_dirty(n_flows)
        self.recomputes += 1
        self._busy = np.bincount(self._pair_link, minlength=self.capacity.size) > 0
        time_left = self._remaining / self._rate
        self._next_first = int(np.argmin(time_left))
        self._next_dt = max(float(time_left[self._next_first]), 0.0)
        generation = self._generation
        self.env.timeout(self._next_dt).callbacks.append(lambda _event: self._on_finish(generation))

    def _recompute_dirty(self, n_flows: int) -> None:
        """Recompute the rates of the flows connected to a dirty link, and only those.

        Max-min rates in one connected component of the flow-link graph do not depend on
        flows elsewhere, so a change only affects its own component: at scale (many
        expert-parallel groups exchanging at once) this keeps each recompute small.
        """
        pair_flow, pair_link = self._pair_flow, self._pair_link
        links = self._dirty
        while True:
            flows = np.zeros(n_flows, dtype=bool)
            flows[pair_flow[links[pair_link]]] = True
            reached = np.zeros_like(links)
            reached[pair_link[flows[pair_flow]]] = True
            if not (reached & ~links).any():
                break
            links = links | reached
        self._dirty = np.zeros_like(self._dirty)
        members = np.flatnonzero(flows)
        if members.size == 0:
            return
        in_component = flows[pair_flow]
        local = np.full(n_flows, -1, dtype=np.intp)
        local[members] = np.arange(members.size)
        self._rate[members] = max_min_rates(
            local[pair_flow[in_component]], pair_link[in_component], members.size, self.capacity
        )

    def _on_finish(self, generation: int) -> None:
        """Finish the flows due now, unless a later recompute superseded this timeout."""
        if generation != self._generation:
            return
        self._generation += 1
        # Advance by the planned step, not by the rounded clock difference, so the earliest
        # flow lands on zero; also finish flows that could never make the clock move again.
        self._advance(self._next_dt)
        now = self.env.now
        done = self._remaining <= _FINISH_RTOL * self._size
        done |= now + self._remaining / self._rate <= now
        done[self._next_first] = True
        done_pair = done[self._pair_flow]
        self._dirty[self._pair_link[done_pair]] = True
        self.link_bytes += np.bincount(
            self._pair_link[done_pair],
            weights=self._remaining[self._pair_flow[done_pair]],
            minlength=self.capacity.size,
        )
        finished = zip(self._events[done].tolist(), self._latency[done].tolist(), strict=True)
        keep = ~done
        new_index = np.cumsum(keep) - 1
        self._pair_flow = new_index[self._pair_flow[~done_pair]]
        self._pair_link = self._pair_link[~done_pair]
        self._events = self._events[keep]
        self._size = self._size[keep]
        self._remaining = self._remaining[keep]
        self._rate = self._rate[keep]
        self._latency = self._latency[keep]
        for event, lat in finished:
            if lat == 0:
                event.succeed()
            else:
                self.env.timeout(lat).callbacks.append(lambda _t, ev=event: ev.succeed())
        # The recompute runs after the completions of this instant, so flows that the woken
        # processes start right away share it.
        self._mark_dirty()
