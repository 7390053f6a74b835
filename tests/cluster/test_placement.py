"""EPLB placement: replica choice, packing, token splitting, dispatch estimates and migration."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.cluster.placement import (
    Placement,
    apply_placement,
    eplb_placement,
    expert_state_bytes,
    layer_loads,
    migration_bytes,
)


def _skewed(n_experts: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).gamma(0.3, size=n_experts) * 1000.0


def _tokens(rng, n_layers=2, n_micro=2, n_src=8, n_tokens=600, n_experts=32, top_k=4):
    """Per-token top-k selections from skewed popularities, shape (L, M, n_src, T, k)."""
    pop = rng.gamma(0.5, size=(n_layers, n_experts)) + 1e-3
    logits = np.log(pop / pop.sum(axis=1, keepdims=True))[:, None, None, None, :]
    noise = rng.gumbel(size=(n_layers, n_micro, n_src, n_tokens, n_experts))
    return np.argsort(-(logits + noise), axis=-1)[..., :top_k]


def _distinct(groups: np.ndarray, n: int) -> np.ndarray:
    """Distinct tokens per group, from (…, T, k) group labels, shape (…, n)."""
    hits = groups[..., None] == np.arange(n)
    return hits.any(axis=-2).sum(axis=-2)


def _counts(sel: np.ndarray, n_experts: int) -> np.ndarray:
    return (sel[..., None] == np.arange(n_experts)).sum(axis=(-3, -2))


def test_replicas_go_to_the_heaviest_experts():
    loads = np.array([1.0, 50.0, 2.0, 3.0, 30.0, 4.0, 5.0, 6.0])
    p = eplb_placement(loads, slots_per_rank=3, ranks=4)  # 12 slots, 4 redundant
    replicas = p.replicas[0]
    assert p.policy == "global"
    assert replicas.sum() == 12
    assert (replicas >= 1).all()
    # Each spare slot to the highest load per replica: 50 → 25, 30 → 15, 25 → 16.7, 16.7 → 12.5.
    assert replicas[1] == 4
    assert replicas[4] == 2
    assert (np.delete(replicas, [1, 4]) == 1).all()
    per_replica = loads / replicas
    assert per_replica.max() == pytest.approx(15.0)


def test_every_expert_has_a_slot_and_every_rank_its_slots():
    loads = np.zeros(16)
    loads[0] = 1e6  # one overwhelming expert must not starve the others of a slot
    p = eplb_placement(loads, slots_per_rank=6, ranks=4, nodes=2, groups=4)
    assert p.slot_expert.shape == (1, 4, 6)
    assert (p.replicas >= 1).all()
    assert p.replicas.sum() == 24
    # Hierarchical: the hot expert's node has 12 slots for its 8 experts, so 4 spare replicas.
    assert p.replicas[0, 0] == 12 - 8 + 1
    with pytest.raises(ValueError, match="no slot"):
        Placement(np.zeros((4, 4), dtype=np.int64), 16)


@pytest.mark.parametrize("seed", range(6))
def test_max_rank_load_not_above_static(seed):
    rng = np.random.default_rng(seed)
    loads = rng.gamma(0.5, size=(3, 64)) * 100
    static = Placement.static(64, 8).rank_loads(loads).max(axis=1)
    for extra, nodes, groups in [(0, 2, 4), (1, 2, 8), (2, 1, 1), (2, 4, 2)]:
        p = eplb_placement(loads, 8 + extra, ranks=8, nodes=nodes, groups=groups)
        assert (p.rank_loads(loads).max(axis=1) <= static + 1e-9).all()


def test_skewed_load_is_strictly_better_and_near_ideal():
    loads = _skewed(32)
    static = Placement.static(32, 8).rank_loads(loads).max()
    p = eplb_placement(loads, slots_per_rank=5, ranks=8, nodes=2, groups=2)
    placed = p.rank_loads(loads)
    assert placed.max() < 0.8 * static
    assert placed.sum() == pytest.approx(loads.sum())  # load is moved, never lost
    ideal = max(loads.sum() / 8, (loads / p.replicas[0]).max())
    assert placed.max() <= 1.5 * ideal


def test_uniform_load_stays_balanced():
    loads = np.full(32, 7.0)
    for spr, nodes, groups in [(4, 2, 4), (5, 2, 4), (6, 1, 1)]:
        rank = eplb_placement(loads, spr, ranks=8, nodes=nodes, groups=groups).rank_loads(loads)
        assert rank.max() == pytest.approx(rank.min())
        assert rank.max() == pytest.approx(32 * 7.0 / 8)


def test_layers_are_placed_independently():
    a, b = _skewed(16, 1), _skewed(16, 2)
    both = eplb_placement(np.stack([a, b]), 5, ranks=4, nodes=2, groups=2)
    alone = [eplb_placement(x, 5, ranks=4, nodes=2, groups=2) for x in (a, b)]
    assert both.layers == 2
    for layer, single in enumerate(alone):
        np.testing.assert_array_equal(both.slot_expert[layer], single.slot_expert[0])
    assert not np.array_equal(both.replicas[0], both.replicas[1])
    # Each layer's counts are split by that layer's placement.
    counts = np.zeros((2, 1, 1, 16), dtype=np.int64)
    counts[0, 0, 0, np.argmax(a)] = 100
    counts[1, 0, 0, np.argmax(a)] = 100
    out = apply_placement(counts, both).counts
    assert np.count_nonzero(out[0]) == both.replicas[0, np.argmax(a)]
    assert np.count_nonzero(out[1]) == both.replicas[1, np.argmax(a)]


def test_hierarchical_keeps_groups_on_their_node():
    loads = _skewed(32, 3)
    nodes, ranks, groups = 2, 8, 4
    p = eplb_placement(loads, 6, ranks=ranks, nodes=nodes, groups=groups)
    assert p.policy == "hierarchical"
    node_of_slot = p.slot_rank() // (ranks // nodes)
    expert = p.slot_expert[0].ravel()
    for e in range(32):
        assert len(set(node_of_slot[expert == e])) == 1  # all replicas on one node
    for g in range(groups):
        members = (expert // (32 // groups)) == g
        assert len(set(node_of_slot[members])) == 1  # a group never straddles nodes
    # Groups not divisible by nodes: the global policy may spread replicas over nodes.
    assert eplb_placement(loads, 6, ranks=ranks, nodes=nodes, groups=1).policy == "global"


def test_static_placement_is_the_identity():
    rng = np.random.default_rng(4)
    sel = _tokens(rng)
    counts = _counts(sel, 32)
    dest, node = _distinct(sel // 4, 8), _distinct(sel // 16, 2)
    out = apply_placement(counts, Placement.static(32, 8), dest, node, tokens=600)
    np.testing.assert_array_equal(out.counts, counts)
    np.testing.assert_array_equal(out.dest_tokens, dest)
    np.testing.assert_array_equal(out.node_tokens, node)


def test_split_conserves_counts_and_is_even():
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 1000, size=(2, 3, 8, 16))
    p = eplb_placement(layer_loads(counts), 6, ranks=4, nodes=2, groups=2)
    out = apply_placement(counts, p).counts
    assert out.shape == (2, 3, 8, 24)
    np.testing.assert_array_equal(out.sum(axis=3), counts.sum(axis=3))
    for layer in range(2):
        expert = p.slot_expert[layer].ravel()
        for e in range(16):
            share = out[layer][..., expert == e]
            np.testing.assert_array_equal(share.sum(axis=-1), counts[layer][..., e])
            assert (share.max(axis=-1) - share.min(axis=-1) <= 1).all()
    # Remainders rotate with the source: one token per source lands on different replicas.
    ones = np.ones((2, 1, 3, 16), dtype=np.int64)
    hot = int(np.argmax(p.replicas[0]))
    slots = apply_placement(ones, p).counts[0, 0][:, p.slot_expert[0].ravel() == hot]
    assert len({int(np.argmax(row)) for row in slots}) == min(3, p.replicas[0, hot])


def test_dispatch_estimates_track_a_recount_and_hold_their_bounds():
    rng = np.random.default_rng(6)
    n_tokens, top_k, ranks, nodes = 600, 4, 8, 2
    sel = _tokens(rng, n_tokens=n_tokens, top_k=top_k)
    counts = _counts(sel, 32)
    dest, node = _distinct(sel // 4, ranks), _distinct(sel // 16, nodes)
    p = eplb_placement(layer_loads(counts), 6, ranks=ranks, nodes=nodes, groups=1)
    out = apply_placement(counts, p, dest, node, tokens=n_tokens)
    # Recount: each source's assignments to an expert go round-robin over its replicas.
    true_dest = np.zeros_like(out.dest_tokens)
    true_node = np.zeros_like(out.node_tokens)
    for layer, m, src in np.ndindex(*sel.shape[:3]):
        x = sel[layer, m, src].ravel()
        slots = [np.flatnonzero(p.slot_expert[layer].ravel() == e) for e in range(32)]
        seen = np.zeros(32, dtype=np.int64)
        rank = np.empty_like(x)
        for i, e in enumerate(x):
            rank[i] = slots[e][(seen[e] + src) % len(slots[e])] // 6
            seen[e] += 1
        rank = rank.reshape(n_tokens, top_k)
        true_dest[layer, m, src] = _distinct(rank, ranks)
        true_node[layer, m, src] = _distinct(rank // (ranks // nodes), nodes)
    error = np.abs(out.dest_tokens - true_dest).sum() / true_dest.sum()
    stale = np.abs(dest - true_dest).sum() / true_dest.sum()
    assert error < 0.1
    assert error < stale / 3
    assert np.abs(out.node_tokens - true_node).sum() / true_node.sum() < 0.1
    # Bounds: largest expert share ≤ distinct ≤ min(assignments, tokens); node within its ranks.
    per_rank = out.counts.reshape(*out.counts.shape[:3], ranks, 6)
    assert (out.dest_tokens >= per_rank.max(axis=4)).all()
    assert (out.dest_tokens <= np.minimum(per_rank.sum(axis=4), n_tokens)).all()
    by_node = out.dest_tokens.reshape(*out.dest_tokens.shape[:3], nodes, ranks // nodes)
    assert (out.node_tokens >= by_node.max(axis=4)).all()
    assert (out.node_tokens <= by_node.sum(axis=4)).all()


def test_migration_is_zero_when_nothing_changes():
    loads = _skewed(32, 7)
    p = eplb_placement(loads, 5, ranks=8, nodes=2, groups=2)
    m = migration_bytes(p, p, expert_bytes=1e9, link_bytes_per_s=50e9)
    assert (m.bytes, m.transfers, m.seconds) == (0.0, 0.0, 0.0)
    # Recomputed from slightly changed loads, aligned to the old one: far less moves.
    nudged = loads * np.random.default_rng(8).uniform(0.9, 1.1, size=32)
    raw = eplb_placement(nudged, 5, ranks=8, nodes=2, groups=2)
    aligned = eplb_placement(nudged, 5, ranks=8, nodes=2, groups=2, previous=p)
    np.testing.assert_allclose(np.sort(aligned.rank_loads(nudged)), np.sort(raw.rank_loads(nudged)))
    assert migration_bytes(p, aligned, 1.0).bytes <= migration_bytes(p, raw, 1.0).bytes
    # Swapped group loads swap the nodes; renumbering them back halves the transfers.
    swapped = loads[::-1].copy()
    raw = eplb_placement(swapped, 5, ranks=8, nodes=2, groups=2)
    aligned = eplb_placement(swapped, 5, ranks=8, nodes=2, groups=2, previous=p)
    assert migration_bytes(p, aligned, 1.0).transfers < 0.7 * migration_bytes(p, raw, 1.0).transfers
    assert eplb_placement(loads, 5, 8, 2, 2, previous=p).slot_expert.tolist() == (
        p.slot_expert.tolist()
    )


def test_migration_counts_new_holders_and_the_slowest_link():
    old = Placement.static(8, 4)  # rank r holds experts 2r, 2r+1
    new = Placement(np.array([[0, 1, 0], [2, 3, 0], [4, 5, 0], [6, 7, 1]]), 8)
    m = migration_bytes(old, new, expert_bytes=10.0, link_bytes_per_s=5.0)
    # Rank 0 already holds expert 0 (local copy); ranks 1, 2 get expert 0, rank 3 expert 1.
    assert m.transfers == 3
    assert m.bytes == 30.0
    np.testing.assert_array_equal(m.received, [0, 10, 10, 10])
    np.testing.assert_array_equal(m.sent, [30, 0, 0, 0])
    assert m.seconds == pytest.approx(30.0 / 5.0)  # rank 0 sends three copies
    weighted = migration_bytes(old, new, 10.0, 5.0, layer_weight=[4])
    assert weighted.bytes == 120.0
    # With NVLink inside 2-GPU nodes, rank 1's copy comes over NVLink.
    split = migration_bytes(old, new, 10.0, 5.0, ranks_per_node=2, intra_node_bytes_per_s=100.0)
    assert split.seconds == pytest.approx(20.0 / 5.0)


def test_expert_state_bytes_includes_optimizer_state():
    assert expert_state_bytes(1e6) == pytest.approx(14e6)
    assert expert_state_bytes(1e6, optimizer_bytes=0) == pytest.approx(2e6)
    assert expert_state_bytes(1e6, optimizer_shards=4) == pytest.approx(5e6)


def test_rejects_impossible_layouts():
    with pytest.raises(ValueError, match="cannot hold"):
        eplb_placement(np.ones(16), 3, ranks=4)
    with pytest.raises(ValueError, match="nodes"):
        eplb_placement(np.ones(16), 4, ranks=4, nodes=3)
    with pytest.raises(ValueError, match="groups"):
        eplb_placement(np.ones(16), 4, ranks=4, groups=3)
    with pytest.raises(ValueError, match="counts"):
        apply_placement(np.ones((1, 1, 1, 8), dtype=np.int64), Placement.static(16, 4))
