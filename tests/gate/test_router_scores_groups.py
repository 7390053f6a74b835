"""Softmax gate orders (top-k before/after the softmax) and group-limited routing: node-,
device- and explicitly group-limited (docs/model/gate.md)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.gate.router import (
    RouterState,
    group_limits,
    route,
    route_options,
    select_experts,
    top_k_indices,
    top_k_mask,
)
from moesim.scenario import Scenario, scenario_from_dict


def _state(rng: np.random.Generator, n_experts: int, dim: int, std: float = 1.0) -> RouterState:
    return RouterState.initial(n_experts, dim, std, rng)


def softmax_scenario(make_scenario, **sections: dict) -> Scenario:  # type: ignore[no-untyped-def]
    """``make_scenario`` with a softmax router and an aux-loss strategy only (a sign-rule bias
    needs a sigmoid router)."""
    raw = make_scenario().model_dump(mode="json")
    raw["strategies"] = [{"kind": "aux_loss", "alpha": 0.001}]
    raw["router"] = {**raw["router"], "score": "softmax"}
    for name, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(raw[name].get(key), dict):
                raw[name][key] = {**raw[name][key], **value}
            else:
                raw[name][key] = value
    return scenario_from_dict(raw)


def test_topk_before_softmax_is_a_softmax_over_the_selected_logits(
    rng: np.random.Generator,
) -> None:
    state = _state(rng, 32, 16)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    routing = route(x, state, 4, "softmax", True, 1.0, topk_before_softmax=True)
    z = np.take_along_axis(routing.logits.astype(np.float64), routing.selected, axis=1)
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(routing.gates, expected, rtol=1e-5, atol=1e-7)
    # Without a bias the selection is the top-k of the raw logits (Megatron pre_softmax=False).
    reference = np.argsort(-routing.logits, axis=1)[:, :4]
    np.testing.assert_array_equal(np.sort(routing.selected, axis=1), np.sort(reference, axis=1))
    # Scaling multiplies the gates.
    scaled = route(x, state, 4, "softmax", True, 2.5, topk_before_softmax=True)
    np.testing.assert_allclose(scaled.gates, 2.5 * routing.gates, rtol=1e-6)


def test_softmax_then_topk_is_not_renormalised_without_normalize(
    rng: np.random.Generator,
) -> None:
    """DeepSeek-V2: gates are the all-expert softmax at the selection, summing to < 1."""
    state = _state(rng, 32, 16, std=0.3)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    v2 = route(x, state, 4, "softmax", False, 1.0)
    np.testing.assert_array_equal(v2.gates, np.take_along_axis(v2.scores, v2.selected, axis=1))
    assert (v2.gates.sum(axis=1) < 1).all()
    assert v2.gates.sum(axis=1).mean() < 0.8
    # Renormalised, the two orders agree (the all-expert denominator cancels).
    mixtral = route(x, state, 4, "softmax", True, 1.0, topk_before_softmax=True)
    renormalised = route(x, state, 4, "softmax", True, 1.0)
    np.testing.assert_array_equal(mixtral.selected, renormalised.selected)
    np.testing.assert_allclose(mixtral.gates, renormalised.gates, rtol=1e-5)
    assert not np.allclose(mixtral.gates, v2.gates)


def test_topk_before_softmax_stays_exact_where_probabilities_underflow() -> None:
    """Selected logits far below the best one: the all-expert softmax clips them alike, the
    selected-logit softmax still tells them apart."""
    state = RouterState(
        weights=np.eye(3, dtype=np.float32) * 1.0,
        bias=np.array([-10.0, 0.0, 0.0], dtype=np.float32),  # forces experts 1 and 2
    )
    x = np.array([[200.0, 0.0, -1.0]], dtype=np.float32)
    direct = route(x, state, 2, "softmax", True, 1.0, topk_before_softmax=True)
    order = np.argsort(direct.selected[0])
    np.testing.assert_allclose(direct.gates[0][order], [1 / (1 + np.exp(-1)), 1 / (1 + np.e)])
    # The all-expert probabilities are both clipped to exp(-80): renormalising them loses the
    # gates altogether.
    clipped = route(x, state, 2, "softmax", True, 1.0)
    assert clipped.gates[0, 0] == clipped.gates[0, 1]
    assert clipped.gates.sum() < 1e-6


def test_topk_before_softmax_needs_softmax(rng: np.random.Generator) -> None:
    state = _state(rng, 8, 4)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="topk_before_softmax"):
        route(x, state, 2, "sigmoid", True, 1.0, topk_before_softmax=True)


@st.composite
def group_cases(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    n_groups = draw(st.sampled_from([2, 4, 8]))
    group_size = draw(st.sampled_from([1, 2, 4, 8]))
    group_topk = draw(st.integers(1, n_groups))
    top_k = draw(st.integers(1, group_topk * group_size))
    seed = draw(st.integers(0, 2**31))
    return n_groups, group_size, group_topk, top_k, seed


@given(group_cases())
@settings(max_examples=150, deadline=None)
def test_group_limited_never_selects_outside_the_kept_groups(
    case: tuple[int, int, int, int, int],
) -> None:
    """Groups are kept by the sum of their top ``k // group_topk`` *biased* scores (at least
    one); the selection stays in the kept groups and is the top-k there."""
    n_groups, group_size, group_topk, top_k, seed = case
    rng = np.random.default_rng(seed)
    n_experts = n_groups * group_size
    scores = rng.random((30, n_experts)).astype(np.float32)
    bias = rng.normal(0, 0.3, n_experts).astype(np.float32)
    selected = select_experts(scores, bias, top_k, n_groups, group_topk)
    biased = (scores + bias).reshape(30, n_groups, group_size)
    per_group = max(1, top_k // group_topk)
    group_score = -np.sort(-biased, axis=2)[:, :, :per_group].sum(axis=2)
    kept = np.argsort(-group_score, axis=1, kind="stable")[:, :group_topk]
    group_of = selected // group_size
    for t in range(30):
        assert set(group_of[t]) <= set(kept[t])
        assert len(set(selected[t])) == top_k
        allowed = np.concatenate([np.arange(g * group_size, (g + 1) * group_size) for g in kept[t]])
        values = (scores + bias)[t]
        best = np.sort(values[allowed])[::-1][:top_k]
        np.testing.assert_allclose(np.sort(values[selected[t]])[::-1], best)


def test_group_scores_use_the_bias(rng: np.random.Generator) -> None:
    """A bias on one group's experts moves tokens into that group (scores are biased)."""
    scores = rng.random((500, 16)).astype(np.float32)
    bias = np.zeros(16, dtype=np.float32)
    plain = select_experts(scores, bias, 2, n_groups=4, group_topk=1)
    bias[12:] = 1.0  # group 3
    biased = select_experts(scores, bias, 2, n_groups=4, group_topk=1)
    assert (biased // 4 == 3).all()
    assert (plain // 4 != 3).any()


def test_device_limit_from_scenario(make_scenario, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
    scenario = softmax_scenario(
        make_scenario,
        router={"normalize": False, "device_limit": 3},
        model={"moe": {"routed_experts": 32, "top_k": 6}},
    )
    options = route_options(scenario)
    assert (options["n_groups"], options["group_topk"]) == (8, 3)
    state = _state(rng, 32, 16)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    routing = route(x, state, **options)
    devices = routing.selected // 4
    distinct = [len(set(row)) for row in devices.tolist()]
    assert max(distinct) <= 3
    unlimited = route(x, state, **{**options, "group_topk": None})
    assert max(len(set(row)) for row in (unlimited.selected // 4).tolist()) > 3


def test_explicit_groups_and_no_limit(make_scenario) -> None:  # type: ignore[no-untyped-def]
    grouped = make_scenario(router={"num_groups": 4, "group_topk": 2})
    assert group_limits(grouped) == (4, 2)
    assert group_limits(make_scenario()) == (1, None)
    # device_limit on EP 1 limits nothing.
    single = make_scenario(
        parallelism={"expert": 1, "data": 8},
        training={"global_batch_sequences": 64},
        router={"device_limit": 1},
    )
    assert group_limits(single) == (1, None)
    options = route_options(softmax_scenario(make_scenario, router={"topk_before_softmax": True}))
    assert options["topk_before_softmax"] is True
    assert options["capacity"] is None


def test_top_k_mask_is_the_top_k_indices_set() -> None:
    """The sort-based mask marks exactly what argpartition selects, ties (and NaN) included."""
    rng = np.random.default_rng(12)
    values = rng.random((400, 24)).astype(np.float32)
    values[:50] = np.round(values[:50] * 4) / 4  # many exact ties at the threshold
    values[50, 3] = np.nan
    for k in (1, 3, 8, 24):
        expected = np.zeros(values.shape, dtype=bool)
        np.put_along_axis(expected, top_k_indices(values, k), True, axis=1)
        np.testing.assert_array_equal(top_k_mask(values, k), expected)
    with pytest.raises(ValueError, match="top_k"):
        top_k_mask(values, 25)
