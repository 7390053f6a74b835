"""Tests of the max-min fair-share network."""

from __future__ import annotations

from collections.abc import Generator, Sequence

import numpy as np
import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.fair_share import FairShareNetwork, max_min_rates


def _flow(
    env: simpy.Environment,
    net: FairShareNetwork,
    path: Sequence[int],
    nbytes: float,
    at: float,
    done: dict[str, float],
    name: str,
    latency: float = 0.0,
) -> Generator[simpy.Event, None, None]:
    """Wait until ``at``, send one flow, and record its completion time under ``name``."""
    yield env.timeout(at)
    yield net.transfer(path, nbytes, latency)
    done[name] = env.now


def test_golden_single_link() -> None:
    env = simpy.Environment()
    net = FairShareNetwork(env, np.array([10.0]))
    done: dict[str, float] = {}
    env.process(_flow(env, net, [0], 50, 0.0, done, "a"))
    env.process(_flow(env, net, [0], 50, 0.0, done, "b"))
    env.process(_flow(env, net, [0], 10, 2.0, done, "c"))
    env.run()
    assert done == {
        "a": pytest.approx(11.0),
        "b": pytest.approx(11.0),
        "c": pytest.approx(5.0),
    }
    assert net.link_bytes == pytest.approx([110.0])
    assert net.link_busy_s == pytest.approx([11.0])
    assert net.recomputes == 3  # at t = 0, 2 and 5; nothing is left to share at t = 11
    assert net.flows_started == 3


def test_lone_flow_takes_latency_plus_serialisation() -> None:
    env = simpy.Environment()
    net = FairShareNetwork(env, np.array([25e9, 50e9]))
    done: dict[str, float] = {}
    env.process(_flow(env, net, [1], 3e6, 0.5, done, "x", latency=2e-6))
    env.run()
    assert done["x"] == pytest.approx(0.5 + 2e-6 + 3e6 / 50e9, rel=1e-12)
    assert net.link_bytes == pytest.approx([0.0, 3e6])
    assert net.link_busy_s == pytest.approx([0.0, 3e6 / 50e9], rel=1e-9)


def test_all_to_all_without_contention() -> None:
    n, cap, size, lat = 8, 50e9, 1e6, 3e-6
    env = simpy.Environment()
    net = FairShareNetwork(env, np.full(2 * n, cap))  # egress i is link i, ingress j is n + j
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    events = net.start([[i, n + j] for i, j in pairs], [size] * len(pairs), lat)
    times: list[float] = []
    for event in events:
        event.callbacks.append(lambda _e: times.append(env.now))
    env.run()
    assert times == pytest.approx([lat + (n - 1) * size / cap] * len(pairs), rel=1e-12)
    assert net.link_bytes == pytest.approx(np.full(2 * n, (n - 1) * size))
    assert net.recomputes == 1


def test_incast_shares_the_receiver_link() -> None:
    cap, size = 10e9, 4e6
    env = simpy.Environment()
    net = FairShareNetwork(env, np.full(5, cap))  # senders 0..3, receiver ingress 4
    done: dict[str, float] = {}
    for s in range(4):
        env.process(_flow(env, net, [s, 4], size, 0.0, done, str(s)))
    env.run()
    assert list(done.values()) == pytest.approx([4 * size / cap] * 4, rel=1e-12)
    assert net.link_busy_s == pytest.approx([4 * size / cap] * 5, rel=1e-12)


def test_max_min_rates_verified_cases() -> None:
    # Two links of capacity 1: flow 0 crosses both, flow 1 only link 0, flow 2 only link 1.
    rates = max_min_rates(np.array([0, 0, 1, 2]), np.array([0, 1, 0, 1]), 3, np.ones(2))
    assert rates == pytest.approx([0.5, 0.5, 0.5])
    # A link of 10 shared by A (only there) and B, which also crosses a link of 2.
    rates = max_min_rates(np.array([0, 1, 1]), np.array([0, 0, 1]), 2, np.array([10.0, 2.0]))
    assert rates == pytest.approx([8.0, 2.0])
    assert max_min_rates(np.array([], int), np.array([], int), 0, np.ones(1)).shape == (0,)
    with pytest.raises(ValueError, match="at least one link"):
        max_min_rates(np.array([0]), np.array([0]), 2, np.ones(1))


@st.composite
def _incidences(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    n_links = draw(st.integers(1, 6))
    capacity = np.array(draw(st.lists(st.floats(0.1, 100.0), min_size=n_links, max_size=n_links)))
    paths = draw(
        st.lists(
            st.lists(st.integers(0, n_links - 1), min_size=1, max_size=n_links, unique=True),
            min_size=1,
            max_size=10,
        )
    )
    flows = np.array([f for f, path in enumerate(paths) for _ in path])
    links = np.array([link for path in paths for link in path])
    return flows, links, len(paths), capacity


@settings(max_examples=300, deadline=None)
@given(_incidences())
def test_max_min_rates_properties(
    case: tuple[np.ndarray, np.ndarray, int, np.ndarray],
) -> None:
    flows, links, n_flows, capacity = case
    rates = max_min_rates(flows, links, n_flows, capacity)
    assert rates.shape == (n_flows,)
    assert np.all(rates >= 0)
    load = np.bincount(links, weights=rates[flows], minlength=capacity.size)
    assert np.all(load <= capacity * (1 + 1e-9))
    saturated = load >= capacity * (1 - 1e-9)
    # Max-min bottleneck property: each flow crosses a saturated link on which its rate is the
    # largest of all the flows crossing that link.
    largest = np.zeros(capacity.size)
    np.maximum.at(largest, links, rates[flows])
    bottleneck = saturated[links] & (rates[flows] >= largest[links] * (1 - 1e-9))
    assert np.all(np.bincount(flows[bottleneck], minlength=n_flows) > 0)


def test_coalescing_across_processes() -> None:
    cap, size = 1e9, 1e6
    env = simpy.Environment()
    net = FairShareNetwork(env, np.array([cap]))
    done: dict[str, float] = {}
    for k in range(100):
        env.process(_flow(env, net, [0], size, 1.0, done, str(k)))
    env.run()
    assert list(done.values()) == pytest.approx([1.0 + 100 * size / cap] * 100, rel=1e-12)
    assert net.recomputes == 1  # one for the start; all finish together, leaving nothing


def test_coalescing_two_finish_groups() -> None:
    cap, size = 1e9, 1e6
    env = simpy.Environment()
    net = FairShareNetwork(env, np.array([cap]))
    done: dict[str, float] = {}
    for k in range(100):
        env.process(_flow(env, net, [0], size * (1 + k % 2), 0.0, done, str(k)))
    env.run()
    assert [done[str(k)] for k in range(0, 100, 2)] == pytest.approx([100 * size / cap] * 50)
    assert [done[str(k)] for k in range(1, 100, 2)] == pytest.approx([150 * size / cap] * 50)
    assert net.recomputes == 2


def test_flows_started_on_completion_share_one_recompute() -> None:
    env = simpy.Environment()
    net = FairShareNetwork(env, np.array([10.0]))
    done: list[float] = []

    def chain() -> Generator[simpy.Event, None, None]:
        yield net.transfer([0], 10.0)
        yield net.transfer([0], 10.0)
        done.append(env.now)

    env.process(chain())
    env.process(chain())
    env.run()
    assert done == pytest.approx([4.0, 4.0])
    assert net.recomputes == 2  # t = 0, and t = 2 for both finishes plus both restarts


def test_trivial_flows_finish_after_latency() -> None:
    env = simpy.Environment()
    net = FairShareNetwork(env, np.array([1.0]))
    done: dict[str, float] = {}
    env.process(_flow(env, net, [0], 0.0, 1.0, done, "zero", latency=3e-6))
    env.process(_flow(env, net, [], 1e9, 1.0, done, "empty", latency=5e-6))
    env.run()
    assert done == {
        "zero": pytest.approx(1.0 + 3e-6),
        "empty": pytest.approx(1.0 + 5e-6),
    }
    assert net.recomputes == 0
    assert net.link_bytes == pytest.approx([0.0])
    assert net.flows_started == 2


def test_staggered_two_links() -> None:
    # Link 0 has 10 B/s, link 1 has 4 B/s. A (20 B) crosses both, C (30 B) only link 0, both from
    # t = 0; B (6 B) joins link 1 at t = 1.
    # [0, 1): A = 4 (link 1), C = 6.  [1, 4): A = B = 2, C = 8: B and C finish together at t = 4.
    # Then A, with 10 B left, gets 4 B/s and finishes at 6.5.
    env = simpy.Environment()
    net = FairShareNetwork(env, np.array([10.0, 4.0]))
    done: dict[str, float] = {}
    env.process(_flow(env, net, [0, 1], 20, 0.0, done, "a"))
    env.process(_flow(env, net, [0], 30, 0.0, done, "c"))
    env.process(_flow(env, net, [1], 6, 1.0, done, "b"))
    env.run()
    assert done == {
        "a": pytest.approx(6.5),
        "b": pytest.approx(4.0),
        "c": pytest.approx(4.0),
    }
    assert net.link_bytes == pytest.approx([50.0, 26.0])
    assert net.link_busy_s == pytest.approx([6.5, 6.5])
    assert net.recomputes == 3


def test_tiny_flow_late_in_time_does_not_hang() -> None:
    # 1 byte at 1e12 B/s lasts 1e-12 s, below the clock resolution at t = 1e6 s.
    env = simpy.Environment()
    net = FairShareNetwork(env, np.array([1e12]))
    done: dict[str, float] = {}
    env.process(_flow(env, net, [0], 1.0, 1e6, done, "tiny"))
    env.process(_flow(env, net, [0], 1e12, 1e6, done, "big"))
    env.run()
    assert done["tiny"] == pytest.approx(1e6, rel=1e-12)
    assert done["big"] == pytest.approx(1e6 + 1.0, rel=1e-12)
    assert net.link_bytes == pytest.approx([1e12 + 1.0], rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 5.0), st.floats(0.1, 50.0)),
        min_size=1,
        max_size=12,
    )
)
def test_single_link_matches_processor_sharing(
    flows: list[tuple[float, float]],
) -> None:
    cap = 3.0
    env = simpy.Environment()
    net = FairShareNetwork(env, np.array([cap]))
    done: dict[str, float] = {}
    for k, (at, size) in enumerate(flows):
        env.process(_flow(env, net, [0], size, at, done, str(k)))
    env.run()
    # Reference: egalitarian processor sharing, stepped from event to event.
    left = {k: size for k, (_, size) in enumerate(flows)}
    expect: dict[str, float] = {}
    t = 0.0
    while left:
        live = [k for k in left if flows[k][0] <= t]
        arrivals = [flows[k][0] for k in left if flows[k][0] > t]
        step = min(arrivals, default=np.inf)
        if live:
            rate = cap / len(live)
            step = min(step - t, min(left[k] for k in live) / rate)
            for k in live:
                left[k] -= rate * step
                if left[k] <= 1e-9 * flows[k][1]:
                    expect[str(k)] = t + step
                    del left[k]
            t += step
        else:
            t = step
    assert done == pytest.approx(expect, rel=1e-9, abs=1e-12)
    assert net.link_bytes == pytest.approx([sum(size for _, size in flows)], rel=1e-9)


def _finish_times(seed: int, force_global: bool, monkeypatch) -> list[float]:
    """Random flows over four separate groups of links, started at random times."""
    if force_global:
        original = FairShareNetwork._recompute_dirty

        def everything(self, n_flows):
            self._dirty[:] = True
            return original(self, n_flows)

        monkeypatch.setattr(FairShareNetwork, "_recompute_dirty", everything)
    rng = np.random.default_rng(seed)
    env = simpy.Environment()
    net = FairShareNetwork(env, rng.uniform(1.0, 5.0, 24))
    times: list[float] = []

    def flow(start: float, path: list[int], size: float):
        yield env.timeout(start)
        yield net.transfer(path, size)
        times.append(env.now)

    for _ in range(60):
        group = int(rng.integers(0, 4))
        path = sorted(set((6 * group + rng.integers(0, 6, 2)).tolist()))
        env.process(flow(float(rng.uniform(0, 3)), path, float(rng.uniform(0.5, 8))))
    env.run()
    if force_global:
        monkeypatch.undo()
    return times


def test_component_recompute_equals_global_recompute(monkeypatch):
    """Recomputing only the connected component of a change gives the same schedule."""
    for seed in range(3):
        local = _finish_times(seed, False, monkeypatch)
        full = _finish_times(seed, True, monkeypatch)
        assert local == pytest.approx(full, rel=1e-9)
