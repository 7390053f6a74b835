"""Expert capacity and token dropping (docs/model/gate.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.gate.metrics import expert_counts
from moesim.gate.router import (
    CapacitySpec,
    RouterState,
    Routing,
    capacity_kept,
    capacity_spec,
    exempt_sequences,
    route,
    route_options,
)


def _skewed_state(rng: np.random.Generator, n_experts: int, dim: int) -> RouterState:
    """A router whose bias makes the first experts popular, so capacities bind."""
    state = RouterState.initial(n_experts, dim, 0.5, rng)
    state.bias[:] = np.linspace(0.6, -0.6, n_experts).astype(np.float32)
    return state


def test_budget_formula() -> None:
    cap = CapacitySpec(factor=1.25)
    assert cap.budget(2048, 6, 64) == math.ceil(2048 * 6 / 64 * 1.25)
    assert CapacitySpec(factor=1.0).budget(2048, 6, 64) == 192
    assert CapacitySpec(factor=1.1).budget(2048, 6, 64) == 212  # 211.2 rounds up
    device = CapacitySpec(factor=1.0, level="device", n_devices=8)
    assert device.budget(2048, 6, 64) == 2048 * 6 // 8
    with pytest.raises(ValueError, match="factor"):
        CapacitySpec(factor=0.0)
    with pytest.raises(ValueError, match="exempt_fraction"):
        CapacitySpec(factor=1.0, exempt_fraction=1.5)
    with pytest.raises(ValueError, match="n_devices"):
        CapacitySpec(factor=1.0, level="device", n_devices=3).n_bins(16)


@st.composite
def capacity_cases(draw: st.DrawFn) -> tuple:
    n_experts = draw(st.sampled_from([4, 8, 16]))
    top_k = draw(st.integers(1, min(4, n_experts)))
    n_segments = draw(st.integers(1, 3))
    seg_tokens = draw(st.integers(1, 40))
    factor = draw(st.sampled_from([0.25, 0.5, 1.0, 1.3, 2.0]))
    policy = draw(st.sampled_from(["probs", "position"]))
    level = draw(st.sampled_from(["expert", "device"]))
    n_devices = draw(st.sampled_from([d for d in (1, 2, 4) if n_experts % d == 0]))
    weighted = draw(st.booleans())
    seed = draw(st.integers(0, 2**31))
    return (
        n_experts,
        top_k,
        n_segments,
        seg_tokens,
        factor,
        policy,
        level,
        n_devices,
        weighted,
        seed,
    )


@given(capacity_cases())
@settings(max_examples=200, deadline=None)
def test_capacity_properties(case: tuple) -> None:
    """Tokens in = routed + dropped; no bin keeps more than its budget; a bin drops only when
    it is full; ``probs`` keeps the highest gates, ``position`` the earliest rows."""
    n_experts, top_k, n_seg, seg_tokens, factor, policy, level, n_devices, weighted, seed = case
    rng = np.random.default_rng(seed)
    n_tokens = n_seg * seg_tokens
    skew = np.linspace(3, 0, n_experts)
    selected = np.argsort(-(rng.random((n_tokens, n_experts)) + skew), axis=1)[:, :top_k]
    gates = rng.random((n_tokens, top_k)).astype(np.float32)
    weights = rng.integers(1, 5, n_tokens) if weighted else np.ones(n_tokens, dtype=np.int64)
    cap = CapacitySpec(factor=factor, policy=policy, level=level, n_devices=n_devices)
    kept = capacity_kept(
        selected, gates, n_experts, cap, segments=n_seg, weights=weights if weighted else None
    )
    assert kept.shape == selected.shape
    assert (kept >= 0).all()
    assert (kept <= weights[:, None]).all()
    n_bins = cap.n_bins(n_experts)
    per_bin = n_experts // n_bins
    for s in range(n_seg):
        rows = slice(s * seg_tokens, (s + 1) * seg_tokens)
        budget = cap.budget(int(weights[rows].sum()), top_k, n_experts)
        bins = selected[rows] // per_bin
        w = np.broadcast_to(weights[rows, None], bins.shape)
        routed_in = np.bincount(bins.ravel(), weights=w.ravel(), minlength=n_bins)
        kept_in = np.bincount(bins.ravel(), weights=kept[rows].ravel(), minlength=n_bins)
        assert (kept_in <= budget).all()
        # Nothing is dropped from a bin that has room left.
        np.testing.assert_array_equal(kept_in, np.minimum(routed_in, budget))
        for b in range(n_bins):
            mask = bins == b
            k_b, w_b = kept[rows][mask], w[mask]
            some, short = k_b > 0, k_b < w_b  # a row straddling the budget is both
            if not (some.any() and short.any()):
                continue
            if policy == "probs":
                g = gates[rows][mask]
                assert g[some].min() >= g[short].max()
            else:
                row = np.broadcast_to(np.arange(seg_tokens)[:, None], bins.shape)[mask]
                assert row[some].max() <= row[short].min()


def test_route_with_capacity_conserves_and_bounds(rng: np.random.Generator) -> None:
    state = _skewed_state(rng, 16, 12)
    x = rng.standard_normal((4 * 256, 12)).astype(np.float32)
    cap = CapacitySpec(factor=1.0)
    routing = route(x, state, 4, "sigmoid", True, 1.0, capacity=cap, segments=4)
    plain = route(x, state, 4, "sigmoid", True, 1.0)
    np.testing.assert_array_equal(routing.selected, plain.selected)
    np.testing.assert_array_equal(routing.gates, plain.gates)  # gates are pre-drop
    assert routing.dropped.dtype == bool
    assert routing.n_dropped > 0
    loads = routing.loads()
    assert loads.sum() + routing.n_dropped == 4 * x.shape[0]
    np.testing.assert_array_equal(
        loads, expert_counts(routing.selected, 16, dropped=routing.dropped)
    )
    budget = cap.budget(256, 4, 16)
    for s in range(4):
        seg = slice(s * 256, (s + 1) * 256)
        kept = routing.selected[seg][~routing.dropped[seg]]
        assert np.bincount(kept, minlength=16).max() <= budget
    # A generous factor drops nothing: capacity ≥ T per expert.
    roomy = route(x, state, 4, "sigmoid", True, 1.0, capacity=CapacitySpec(4.0), segments=4)
    assert roomy.n_dropped == 0
    # Segments have their own budgets: one call of 1024 differs from four of 256.
    whole = route(x, state, 4, "sigmoid", True, 1.0, capacity=cap)
    assert not np.array_equal(whole.dropped, routing.dropped)


def test_probs_drops_the_lowest_gates_position_the_latest(rng: np.random.Generator) -> None:
    """All tokens pick expert 0 (top-1); capacity keeps 1/4 of them."""
    n = 64
    selected = np.zeros((n, 1), dtype=np.int64)
    gates = rng.random((n, 1)).astype(np.float32)
    cap = CapacitySpec(factor=1.0)  # budget = ceil(64·1/4) = 16
    kept = capacity_kept(selected, gates, 4, cap)[:, 0]
    assert kept.sum() == 16
    assert set(np.argsort(-gates[:, 0])[:16]) == set(np.nonzero(kept)[0])
    by_position = capacity_kept(selected, gates, 4, CapacitySpec(1.0, policy="position"))[:, 0]
    np.testing.assert_array_equal(np.nonzero(by_position)[0], np.arange(16))


def test_position_is_the_position_in_the_sequence(rng: np.random.Generator) -> None:
    """With sequences, the last positions of every sequence are dropped first ([s, b] order)."""
    n_seq, seq_len = 4, 16
    state = RouterState(
        weights=np.zeros((4, 8), dtype=np.float32),
        bias=np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32),  # everyone picks expert 0
    )
    x = rng.standard_normal((n_seq * seq_len, 8)).astype(np.float32)
    cap = CapacitySpec(factor=1.0, policy="position")  # budget 16 of 64
    routing = route(x, state, 1, "sigmoid", True, 1.0, capacity=cap, tokens_per_sequence=seq_len)
    kept_positions = np.nonzero(~routing.dropped[:, 0])[0] % seq_len
    np.testing.assert_array_equal(np.sort(kept_positions), np.repeat(np.arange(4), 4))
    # Without sequences, the earliest rows are kept.
    rows = route(x, state, 1, "sigmoid", True, 1.0, capacity=cap)
    np.testing.assert_array_equal(np.nonzero(~rows.dropped[:, 0])[0], np.arange(16))


def test_device_level_dropping_and_exempt_sequences(rng: np.random.Generator) -> None:
    """DeepSeek-V2: a budget per device at CF 1.0, the lowest gates dropped, exempt sequences
    never dropped (docs/model/gate.md)."""
    n_experts, n_devices, top_k, seq_len = 16, 4, 2, 32
    state = _skewed_state(rng, n_experts, 12)
    x = rng.standard_normal((20 * seq_len, 12)).astype(np.float32)
    cap = CapacitySpec(factor=1.0, level="device", n_devices=n_devices, exempt_fraction=0.1)
    routing = route(
        x, state, top_k, "softmax", False, 1.0, capacity=cap, tokens_per_sequence=seq_len
    )
    exempt = exempt_sequences(20, 0.1)
    assert exempt.sum() == 2
    rows_exempt = np.repeat(exempt, seq_len)
    assert not routing.dropped[rows_exempt].any()
    assert routing.dropped[~rows_exempt].any()
    device_load = np.bincount((routing.selected // 4)[~routing.dropped], minlength=n_devices)
    budget = cap.budget(x.shape[0], top_k, n_experts)
    exempt_load = np.bincount((routing.selected // 4)[rows_exempt].ravel(), minlength=n_devices)
    assert (device_load <= np.maximum(budget, exempt_load)).all()
    assert device_load.max() == budget  # the hot device is full
    # Per device, dropped assignments have gates no higher than kept non-exempt ones.
    devices = routing.selected // 4
    hot = int(np.argmax(np.bincount(devices.ravel(), minlength=n_devices)))
    mask = (devices == hot) & ~rows_exempt[:, None]
    kept_g = routing.gates[mask & ~routing.dropped]
    dropped_g = routing.gates[mask & routing.dropped]
    assert kept_g.min() >= dropped_g.max()


def test_exempt_sequences_spread_evenly() -> None:
    picks = exempt_sequences(100, 0.1)
    assert picks.sum() == 10
    assert (np.diff(np.nonzero(picks)[0]) == 10).all()
    assert not exempt_sequences(50, 0.0).any()
    assert exempt_sequences(7, 1.0).all()
    assert exempt_sequences(10, 0.25, first=10).sum() == math.floor(20 * 0.25) - math.floor(2.5)


def test_dropless_routing_has_no_drops(rng: np.random.Generator) -> None:
    state = _skewed_state(rng, 16, 8)
    x = rng.standard_normal((100, 8)).astype(np.float32)
    routing = route(x, state, 3, "sigmoid", True, 1.0)
    assert routing.dropped.shape == (100, 3)
    assert not routing.dropped.any()
    assert routing.loads().sum() == 300
    legacy = Routing(routing.logits, routing.scores, routing.selected, routing.gates)
    assert not legacy.dropped.any()
    with pytest.raises(ValueError, match="dropped"):
        Routing(routing.logits, routing.scores, routing.selected, routing.gates, np.zeros(3, bool))


def test_capacity_from_scenario(make_scenario) -> None:  # type: ignore[no-untyped-def]
    scenario = make_scenario(
        router={
            "capacity": {"factor": 1.0, "level": "device", "exempt_fraction": 0.1},
        }
    )
    cap = capacity_spec(scenario)
    assert cap == CapacitySpec(
        factor=1.0, policy="probs", level="device", n_devices=8, exempt_fraction=0.1
    )
    assert route_options(scenario)["capacity"] == cap
    assert capacity_spec(make_scenario()) is None
