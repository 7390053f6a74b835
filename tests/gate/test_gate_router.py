"""Router specification: top-k selection, the selection-only bias, group limits, gate values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from moesim.gate.router import (
    RouterState,
    Routing,
    gather_rows,
    route,
    route_options,
    scores_from_logits,
    select_experts,
    top_k_indices,
)


@st.composite
def score_matrices(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """A (T, E) float32 matrix with frequent exact ties, and a k in 1..E."""
    n_tokens = draw(st.integers(1, 12))
    n_experts = draw(st.integers(1, 24))
    values = draw(
        arrays(
            np.float32,
            (n_tokens, n_experts),
            elements=st.sampled_from([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0])
            | st.floats(-5, 5, width=32),
        )
    )
    k = draw(st.integers(1, n_experts))
    return values, k


@given(score_matrices())
@settings(max_examples=200, deadline=None)
def test_top_k_picks_the_k_largest(case: tuple[np.ndarray, int]) -> None:
    """The selected values are exactly the k largest of the row (ties allowed), no repeats."""
    values, k = case
    selected = top_k_indices(values, k)
    assert selected.shape == (values.shape[0], k)
    assert selected.dtype == np.int64
    for row, chosen in zip(values, selected, strict=True):
        assert len(set(chosen.tolist())) == k
        expected = np.sort(row)[::-1][:k]
        np.testing.assert_array_equal(np.sort(row[chosen])[::-1], expected)
        unchosen = np.setdiff1d(np.arange(row.size), chosen)
        if unchosen.size:
            assert row[chosen].min() >= row[unchosen].max()


def test_top_k_matches_full_argsort_on_continuous_data(rng: np.random.Generator) -> None:
    values = rng.standard_normal((500, 64)).astype(np.float32)
    selected = top_k_indices(values, 6)
    reference = np.argsort(-values, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(np.sort(selected, axis=1), np.sort(reference, axis=1))


def test_top_k_is_deterministic_under_ties() -> None:
    values = np.zeros((50, 16), dtype=np.float32)
    values[:, ::3] = 1.0  # 6 tied maxima per row, pick 4 of them
    first = top_k_indices(values, 4)
    np.testing.assert_array_equal(first, top_k_indices(values.copy(), 4))
    assert (values[np.arange(50)[:, None], first] == 1.0).all()


def test_top_k_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="top_k"):
        top_k_indices(np.zeros((2, 4), dtype=np.float32), 5)


def _state(rng: np.random.Generator, n_experts: int, dim: int, std: float = 1.0) -> RouterState:
    return RouterState.initial(n_experts, dim, std, rng)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_selection_is_top_k_of_score_plus_bias(rng: np.random.Generator, score: str) -> None:
    state = _state(rng, 32, 16)
    state.bias[:] = rng.normal(0, 0.2, 32).astype(np.float32)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    routing = route(x, state, 4, score, True, 1.0)  # type: ignore[arg-type]
    reference = np.argsort(-(routing.scores + state.bias), axis=1)[:, :4]
    np.testing.assert_array_equal(np.sort(routing.selected, axis=1), np.sort(reference, axis=1))


def test_route_shapes_and_dtypes(rng: np.random.Generator) -> None:
    state = _state(rng, 16, 8)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    routing = route(x, state, 3, "softmax", False, 2.5)
    assert isinstance(routing, Routing)
    assert routing.logits.shape == routing.scores.shape == (40, 16)
    assert routing.selected.shape == routing.gates.shape == (40, 3)
    assert routing.logits.dtype == routing.scores.dtype == routing.gates.dtype == np.float32
    assert routing.selected.dtype == np.int64
    np.testing.assert_allclose(routing.scores.sum(axis=1), 1.0, rtol=1e-5)
    sig = scores_from_logits(routing.logits, "sigmoid")
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-routing.logits.astype(np.float64))), rtol=1e-6)


def test_bias_never_changes_gate_values(rng: np.random.Generator) -> None:
    """Two biases that leave the selection unchanged give identical gates (docs/model/gate.md)."""
    base = _state(rng, 24, 12)
    x = rng.standard_normal((200, 12)).astype(np.float32)
    unbiased = route(x, base, 4, "sigmoid", True, 2.5)
    # A constant shift of every bias leaves every ranking unchanged.
    shifted = base.copy()
    shifted.bias[:] = 0.37
    biased = route(x, shifted, 4, "sigmoid", True, 2.5)
    np.testing.assert_array_equal(biased.selected, unbiased.selected)
    np.testing.assert_array_equal(biased.gates, unbiased.gates)
    # Per token: a bias that lifts exactly the already-selected experts keeps the selection.
    for t in range(20):
        one = x[t : t + 1]
        plain = route(one, base, 4, "sigmoid", True, 1.0)
        lifted = base.copy()
        lifted.bias[:] = -1.0
        lifted.bias[plain.selected[0]] = 1.0
        lifted.bias += rng.normal(0, 0.05, 24).astype(np.float32)
        again = route(one, lifted, 4, "sigmoid", True, 1.0)
        assert set(again.selected[0]) == set(plain.selected[0])
        order = np.argsort(again.selected[0])
        reference = np.argsort(plain.selected[0])
        np.testing.assert_array_equal(again.gates[0][order], plain.gates[0][reference])


@pytest.mark.parametrize(("normalize", "scaling"), [(True, 1.0), (True, 2.5), (False, 1.0)])
def test_gates_are_unbiased_scores_at_selection(
    rng: np.random.Generator, normalize: bool, scaling: float
) -> None:
    state = _state(rng, 32, 16)
    state.bias[:] = rng.normal(0, 0.5, 32).astype(np.float32)  # changes the selection
    x = rng.standard_normal((100, 16)).astype(np.float32)
    routing = route(x, state, 6, "sigmoid", normalize, scaling)
    at_selection = gather_rows(routing.scores, routing.selected).astype(np.float64)
    if normalize:
        at_selection /= at_selection.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(routing.gates, scaling * at_selection, rtol=1e-5)


def _kept_groups_reference(
    selection: np.ndarray, top_k: int, n_groups: int, group_topk: int
) -> np.ndarray:
    """Boolean (T, G): the groups a token may use, by a full sort."""
    n_tokens, n_experts = selection.shape
    grouped = selection.reshape(n_tokens, n_groups, n_experts // n_groups)
    per_group = max(1, top_k // group_topk)
    group_score = -np.sort(-grouped, axis=2)[:, :, :per_group].sum(axis=2)
    best = np.argsort(-group_score, axis=1)[:, :group_topk]
    keep = np.zeros((n_tokens, n_groups), dtype=bool)
    np.put_along_axis(keep, best, True, axis=1)
    return keep


@pytest.mark.parametrize(
    ("n_experts", "top_k", "n_groups", "group_topk"),
    [(64, 6, 8, 3), (64, 8, 8, 4), (32, 4, 4, 1), (16, 2, 2, 1), (256, 8, 8, 4)],
)
def test_group_limited_stays_in_kept_groups(
    rng: np.random.Generator, n_experts: int, top_k: int, n_groups: int, group_topk: int
) -> None:
    scores = rng.random((400, n_experts)).astype(np.float32)
    bias = rng.normal(0, 0.1, n_experts).astype(np.float32)
    selected = select_experts(scores, bias, top_k, n_groups, group_topk)
    keep = _kept_groups_reference(scores + bias, top_k, n_groups, group_topk)
    group_of = selected // (n_experts // n_groups)
    assert np.take_along_axis(keep, group_of, axis=1).all()
    assert (np.unique(group_of, axis=None).size) <= n_groups
    assert max(len(set(row)) for row in group_of.tolist()) <= group_topk
    # Within the kept groups it is the plain top-k.
    masked = np.where(np.repeat(keep, n_experts // n_groups, axis=1), scores + bias, -np.inf)
    reference = np.argsort(-masked, axis=1)[:, :top_k]
    np.testing.assert_array_equal(np.sort(selected, axis=1), np.sort(reference, axis=1))


def test_group_limit_off_when_all_groups_kept(rng: np.random.Generator) -> None:
    scores = rng.random((300, 64)).astype(np.float32)
    plain = select_experts(scores, None, 6)
    for group_topk in (8, None):
        limited = select_experts(scores, None, 6, n_groups=8, group_topk=group_topk)
        np.testing.assert_array_equal(limited, plain)


def test_group_limit_rejects_impossible_configurations(rng: np.random.Generator) -> None:
    scores = rng.random((4, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="n_groups"):
        select_experts(scores, None, 2, n_groups=3, group_topk=1)
    with pytest.raises(ValueError, match="group_topk"):
        select_experts(scores, None, 6, n_groups=4, group_topk=1)


def test_route_options_from_scenario(make_scenario) -> None:  # type: ignore[no-untyped-def]
    single_node = make_scenario(router={"node_limit": 1})
    assert route_options(single_node)["group_topk"] is None  # one node: nothing to limit
    two_nodes = make_scenario(
        cluster={"nodes": 2},
        parallelism={"expert": 16},
        router={"node_limit": 1, "score": "sigmoid"},
    )
    options = route_options(two_nodes)
    assert options["n_groups"] == 2
    assert options["group_topk"] == 1
    assert options["top_k"] == 2


def test_router_state_copy_is_deep(rng: np.random.Generator) -> None:
    state = _state(rng, 8, 4)
    clone = state.copy()
    clone.weights[0, 0] += 1
    clone.bias[0] += 1
    assert state.weights[0, 0] != clone.weights[0, 0]
    assert state.bias[0] == 0
    assert state.weights.dtype == state.bias.dtype == np.float32
