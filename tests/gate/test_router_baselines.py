"""Baseline routers: Expert Choice (and its future-token leakage) and Sinkhorn
(docs/model/gate.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moesim.gate.baselines import (
    expert_choice,
    expert_choice_leakage_bits,
    sinkhorn,
    sinkhorn_route,
)
from moesim.gate.metrics import max_vio
from moesim.gate.router import RouterState, route, scores_from_logits


def _state(rng: np.random.Generator, n_experts: int = 16, dim: int = 8) -> RouterState:
    return RouterState.initial(n_experts, dim, 1.0, rng)


def test_expert_choice_is_balanced_and_picks_top_tokens(rng: np.random.Generator) -> None:
    state = _state(rng)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    ec = expert_choice(x, state, capacity_factor=2.0, chunk_size=64)
    assert ec.chosen.shape == (4, 16, 8)  # 2·64/16 = 8 tokens per expert per chunk
    np.testing.assert_array_equal(ec.loads(), np.full(16, 32))
    assignment = ec.assignment()
    np.testing.assert_array_equal(assignment.sum(axis=0), 32)
    assert ec.experts_per_token().mean() == pytest.approx(2.0)
    assert ec.experts_per_token().min() == 0 or ec.experts_per_token().max() > 2
    # Each expert's tokens are its top-8 of the chunk by score, and stay inside the chunk.
    for c in range(4):
        chunk = ec.scores[c * 64 : (c + 1) * 64]
        for e in range(16):
            picked = ec.chosen[c, e]
            assert ((picked >= c * 64) & (picked < (c + 1) * 64)).all()
            expected = np.sort(chunk[:, e])[::-1][:8]
            np.testing.assert_allclose(np.sort(ec.gates[c, e])[::-1], expected)


def test_expert_choice_leaks_future_tokens(rng: np.random.Generator) -> None:
    """Changing only the *last* token of a chunk changes an *earlier* token's experts (the
    selection is not causal, docs/model/gate.md); token-choice routing is unaffected."""
    state = _state(rng)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    before = expert_choice(x, state, capacity_factor=1.0, chunk_size=64).assignment()
    # Pick an expert that did not take the last token and aim the last token straight at it.
    expert = int(np.nonzero(~before[-1])[0][0])
    changed = x.copy()
    changed[-1] = 50.0 * state.weights[expert] / np.linalg.norm(state.weights[expert])
    after = expert_choice(changed, state, capacity_factor=1.0, chunk_size=64).assignment()
    assert after[-1, expert]
    assert (before[:-1] != after[:-1]).any(), "an earlier token's experts must change"
    displaced = np.nonzero(before[:-1, expert] & ~after[:-1, expert])[0]
    assert displaced.size == 1
    # Token choice: earlier tokens route exactly as before.
    tc_before = route(x, state, 2, "softmax", True, 1.0).selected
    tc_after = route(changed, state, 2, "softmax", True, 1.0).selected
    np.testing.assert_array_equal(tc_before[:-1], tc_after[:-1])


def test_expert_choice_chunks_are_independent(rng: np.random.Generator) -> None:
    """A later chunk never affects an earlier chunk (the leak is bounded by the chunk)."""
    state = _state(rng)
    x = rng.standard_normal((128, 8)).astype(np.float32)
    changed = x.copy()
    changed[64:] = rng.standard_normal((64, 8)).astype(np.float32)
    a = expert_choice(x, state, 2.0, chunk_size=64).assignment()
    b = expert_choice(changed, state, 2.0, chunk_size=64).assignment()
    np.testing.assert_array_equal(a[:64], b[:64])
    with pytest.raises(ValueError, match="chunk_size"):
        expert_choice(x, state, 2.0, chunk_size=48)


def test_leakage_bound() -> None:
    """K·log2((1−R)/R) bits per token per layer; R = 2/16 over 9 layers > 50 bits."""
    assert expert_choice_leakage_bits(2, 16) == pytest.approx(2 * math.log2(7))
    assert expert_choice_leakage_bits(2, 16, layers=9) == pytest.approx(18 * math.log2(7))
    assert expert_choice_leakage_bits(2, 16, layers=9) > 50
    assert expert_choice_leakage_bits(8, 16) == 0.0  # R = 1/2
    with pytest.raises(ValueError, match="top_k"):
        expert_choice_leakage_bits(16, 16)


def test_sinkhorn_normalises_rows_and_columns(rng: np.random.Generator) -> None:
    logits = (rng.standard_normal((512, 16)) * 2 + np.linspace(3, 0, 16)).astype(np.float32)
    plan = sinkhorn(logits)
    assert plan.dtype == np.float32
    np.testing.assert_allclose(plan.sum(axis=0), 1 / 16, rtol=1e-3)
    np.testing.assert_allclose(plan.sum(axis=1), 1 / 512, rtol=0.05)
    # Large logits stay finite (the max shift).
    assert np.isfinite(sinkhorn(logits + 500)).all()
    np.testing.assert_allclose(sinkhorn(logits + 500), plan, rtol=1e-4)


def test_sinkhorn_routing_balances_a_skewed_router(rng: np.random.Generator) -> None:
    state = _state(rng, 16, 8)
    state.weights[:4] *= 3  # a few experts dominate plain top-k
    x = rng.standard_normal((2048, 8)).astype(np.float32)
    plain = route(x, state, 2, "softmax", False, 1.0)
    balanced = sinkhorn_route(x, state, 2)
    vio_plain = float(max_vio(np.bincount(plain.selected.ravel(), minlength=16)))
    vio_sinkhorn = float(max_vio(np.bincount(balanced.selected.ravel(), minlength=16)))
    assert vio_sinkhorn < 0.5 * vio_plain
    # Gates: the all-expert softmax at the selection, not renormalised.
    expected = np.take_along_axis(
        scores_from_logits(balanced.logits, "softmax"), balanced.selected, 1
    )
    np.testing.assert_allclose(balanced.gates, expected)
    assert (balanced.gates.sum(axis=1) <= 1 + 1e-6).all()
    assert balanced.gates.sum(axis=1).mean() < 0.9
    # Evaluation: plain top-k of the activations.
    evaluation = sinkhorn_route(x, state, 2, training=False)
    np.testing.assert_array_equal(np.sort(evaluation.selected, 1), np.sort(plain.selected, 1))
    # Top-1 uses sigmoid gates.
    top1 = sinkhorn_route(x, state, 1)
    np.testing.assert_allclose(
        top1.gates[:, 0],
        1 / (1 + np.exp(-top1.logits[np.arange(2048), top1.selected[:, 0]].astype(np.float64))),
        rtol=1e-5,
    )
