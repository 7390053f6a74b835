"""The engine samples' compiled counting (:func:`moesim.gate.kernels.sample_counts`) against a
brute-force count and against the NumPy path of :func:`moesim.gate.sampling.routing_sample`."""

from __future__ import annotations

import numpy as np
import pytest
from base_scenario import v3_like

from moesim.gate import kernels
from moesim.gate.router import RouterState, route, route_options, select_experts
from moesim.gate.sampling import dropless_loads, routing_sample
from moesim.gate.stream import TokenStream
from moesim.scenario import Scenario, scenario_from_dict

needs_numba = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")

# (experts, top_k, groups, groups kept, ranks, nodes): DeepSeek-V3's node limit on an EP-64
# group, groups of an odd size, one kept group, no group limit with one node.
ROUTINGS = [
    (256, 8, 8, 4, 64, 8),
    (21, 4, 3, 2, 7, 3),
    (64, 6, 8, 1, 16, 4),
    (16, 4, 1, None, 8, 1),
]


def _brute_force(
    selected: np.ndarray, weights: np.ndarray, n_cells: int, n_experts: int, ranks: int, nodes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = np.zeros((n_cells, n_experts), dtype=np.int64)
    dest = np.zeros((n_cells, ranks), dtype=np.int64)
    node = np.zeros((n_cells, nodes), dtype=np.int64)
    per_cell = selected.shape[0] // n_cells
    for t, experts in enumerate(selected):
        cell = t // per_cell
        for e in experts:
            counts[cell, e] += weights[t]
        for r in {int(e) // (n_experts // ranks) for e in experts}:
            dest[cell, r] += weights[t]
        for h in {int(e) // (n_experts // nodes) for e in experts}:
            node[cell, h] += weights[t]
    return counts, dest, node


@needs_numba
@pytest.mark.parametrize(
    ("n_experts", "top_k", "n_groups", "group_topk", "ranks", "nodes"), ROUTINGS
)
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("multiply", [False, True])
def test_sample_counts_equal_brute_force(
    n_experts: int,
    top_k: int,
    n_groups: int,
    group_topk: int | None,
    ranks: int,
    nodes: int,
    tied: bool,
    multiply: bool,
) -> None:
    rng = np.random.default_rng(n_experts + top_k + tied + 2 * multiply)
    n_cells, per_cell = 5, 12
    shape = (n_cells * per_cell, n_experts)
    if tied:  # a coarse dyadic lattice: exact ties at the expert and group thresholds
        scores = (rng.integers(0, 24, shape) / 16).astype(np.float32)
        bias = (rng.integers(-8, 8, n_experts) / 16).astype(np.float32)
    else:
        scores = rng.random(shape, dtype=np.float32)
        bias = (rng.normal(0, 0.1, n_experts)).astype(np.float32)
    if multiply:
        bias = (1 + np.abs(bias)).astype(np.float32)
    weights = rng.integers(1, 50, shape[0]).astype(np.int64)
    selected = select_experts(
        scores, bias, top_k, n_groups, group_topk, "mul" if multiply else "add"
    )
    expected = _brute_force(selected, weights, n_cells, n_experts, ranks, nodes)
    got = kernels.sample_counts(
        scores, bias, multiply, top_k, n_groups, group_topk, weights, n_cells, ranks, nodes
    )
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def _both_paths(
    scenario: Scenario,
    monkeypatch: pytest.MonkeyPatch,
    n_src: int,
    n_dest: int,
    weight_std: float = 0.5,
) -> list[object]:
    """The sample of biased random routers on the compiled and on the NumPy path."""
    samples = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        rng = np.random.default_rng(4)
        stream = TokenStream(scenario.stream, rng)
        moe, dim = scenario.model.moe_spec, scenario.stream.dim
        states = [
            RouterState(
                weights=rng.normal(0, weight_std, (moe.routed_experts, dim)).astype(np.float32),
                bias=rng.normal(0, 0.05, moe.routed_experts).astype(np.float32),
            )
            for _ in range(scenario.gate.layers_simulated)
        ]
        samples.append(routing_sample(scenario, states, stream, 3, n_src, n_dest, rng))
    return samples


@needs_numba
@pytest.mark.parametrize("weight_std", [0.5, 300.0], ids=["usual", "logits-past-the-clip"])
def test_routing_sample_is_the_same_on_both_paths(
    monkeypatch: pytest.MonkeyPatch, weight_std: float
) -> None:
    """The compiled counts (the sigmoid finished in the loop from exp(−logits), the clip of
    the logits at ±80 as a clamp) against the NumPy path's route and bincount."""
    scenario = scenario_from_dict(v3_like(200))
    fast, slow = _both_paths(scenario, monkeypatch, n_src=64, n_dest=64, weight_std=weight_std)
    np.testing.assert_array_equal(fast.counts, slow.counts)
    np.testing.assert_array_equal(fast.dest_tokens, slow.dest_tokens)
    np.testing.assert_array_equal(fast.node_tokens, slow.node_tokens)
    assert fast.metrics == slow.metrics
    assert fast.metrics["nodes_per_token"] <= 4  # the node limit holds


@needs_numba
@pytest.mark.parametrize("bias_mode", ["add", "mul"])
def test_dropless_loads_equal_routed_counts(bias_mode: str) -> None:
    scenario = scenario_from_dict(v3_like(200))
    options = route_options(scenario)
    rng = np.random.default_rng(9)
    x = rng.normal(0, 1, (3000, 16)).astype(np.float32)  # more rows than one score block
    bias = rng.normal(0, 0.05, 256) + (1.0 if bias_mode == "mul" else 0.0)
    state = RouterState(
        weights=rng.normal(0, 0.5, (256, 16)).astype(np.float32),
        bias=bias.astype(np.float32),
        bias_mode=bias_mode,  # type: ignore[arg-type]
    )
    selected = route(x, state, **options).selected  # type: ignore[misc]
    np.testing.assert_array_equal(
        dropless_loads(x, state, options), np.bincount(selected.ravel(), minlength=256)
    )
