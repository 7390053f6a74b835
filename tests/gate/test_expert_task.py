"""The learning-expert task (moesim.gate.experts): exact gradients and what the experts learn.

Gradients are checked end to end against central finite differences in float64: the router
weights move by ±ε and :func:`~moesim.gate.router.route` recomputes logits, scores and gate values
(the selection and any capacity drops stay as they are for so small a move: both are piecewise
constant), so the check covers the gate values' vector-Jacobian product for every router form.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from moesim.gate import experts as experts_module
from moesim.gate.experts import ExpertTask, gate_backward
from moesim.gate.router import CapacitySpec, RouteOptions, RouterState, Routing, route

EPS = 1e-6


def _options(**changes: Any) -> RouteOptions:
    base = RouteOptions(
        top_k=3,
        score="sigmoid",
        normalize=True,
        scaling_factor=1.0,
        n_groups=1,
        group_topk=None,
        topk_before_softmax=False,
        capacity=None,
    )
    return RouteOptions(**{**base, **changes})  # type: ignore[typeddict-item]


def _problem(rng: np.random.Generator, shared: bool = True) -> tuple[Any, ...]:
    n_tokens, dim, n_experts, n_topics = 24, 6, 8, 5
    x = rng.normal(size=(n_tokens, dim))
    topics = rng.integers(0, n_topics, n_tokens).astype(np.int64)
    task = ExpertTask(n_topics, dim, n_experts, 3, shared, rng, dtype=np.float64)
    # Experts well away from their small start, so the gate gradient is large.
    task.down[...] = rng.normal(0, 0.5, task.down.shape)
    if task.shared is not None:
        task.shared[...] = rng.normal(0, 0.5, task.shared.shape)
    weights = rng.normal(0, 1.0, (n_experts, dim))
    return x, topics, task, weights


CASES = [
    {"score": "sigmoid", "normalize": True},
    {"score": "sigmoid", "normalize": False, "scaling_factor": 2.5},
    {"score": "softmax", "normalize": True},
    {"score": "softmax", "normalize": False},
    {"score": "softmax", "normalize": True, "topk_before_softmax": True, "scaling_factor": 1.7},
    {"score": "sigmoid", "normalize": True, "n_groups": 4, "group_topk": 2},
    {
        "score": "sigmoid",
        "normalize": True,
        "capacity": CapacitySpec(factor=0.8, policy="probs", level="expert", n_devices=2),
    },
]


@pytest.mark.parametrize("changes", CASES)
@pytest.mark.parametrize("shared", [True, False])
def test_router_gradient_matches_finite_differences(
    rng: np.random.Generator, changes: dict[str, Any], shared: bool
) -> None:
    x, topics, task, weights = _problem(rng, shared)
    options = _options(**changes)

    def loss(w: np.ndarray) -> float:
        routing = route(x, RouterState(weights=w, bias=np.zeros(w.shape[0])), **options)
        return task.evaluate(x, topics, routing)

    routing = route(x, RouterState(weights=weights, bias=np.zeros(weights.shape[0])), **options)
    if options["capacity"] is not None:
        assert routing.dropped.any()  # the case exercises dropped assignments
    result = task.step(x, topics, routing, options, update=False)
    assert result.loss == pytest.approx(loss(weights), rel=1e-12)
    assert result.dlogits is not None
    analytic = result.dlogits.T @ x / experts_module.TASK_GRADIENT_SCALE
    numeric = np.zeros_like(weights)
    for index in np.ndindex(weights.shape):
        up, down = weights.copy(), weights.copy()
        up[index] += EPS
        down[index] -= EPS
        numeric[index] = (loss(up) - loss(down)) / (2 * EPS)
    scale = np.abs(numeric).max()
    assert scale > 0
    assert np.abs(analytic - numeric).max() / scale < 1e-5


def test_expert_gradients_match_finite_differences(rng: np.random.Generator) -> None:
    x, topics, task, weights = _problem(rng)
    options = _options()
    routing = route(x, RouterState(weights=weights, bias=np.zeros(weights.shape[0])), **options)
    task.step(x, topics, routing, options, update=False)
    grads = task.expert_gradients()
    assert grads is not None
    assert set(grads) == {"up", "down", "shared"}
    for name, grad in grads.items():
        flat, flat_grad = getattr(task, name).reshape(-1), grad.reshape(-1)
        for i in rng.choice(flat.size, 12, replace=False):
            old = flat[i]
            flat[i] = old + EPS
            up = task.evaluate(x, topics, routing)
            flat[i] = old - EPS
            down = task.evaluate(x, topics, routing)
            flat[i] = old
            assert flat_grad[i] == pytest.approx((up - down) / (2 * EPS), rel=1e-5, abs=1e-10)
    # An expert no token reached has no gradient.
    idle = np.setdiff1d(np.arange(task.n_experts), routing.selected)
    assert not grads["up"][idle].any()
    assert not grads["down"][idle].any()


def test_gate_backward_is_zero_outside_the_selection_except_for_all_expert_softmax(
    rng: np.random.Generator,
) -> None:
    x, _, _, weights = _problem(rng)
    for changes in CASES[:5]:
        options = _options(**changes)
        routing = route(x, RouterState(weights=weights, bias=np.zeros(weights.shape[0])), **options)
        d = gate_backward(routing, rng.normal(size=routing.selected.shape), options)
        outside = np.ones(d.shape, bool)
        np.put_along_axis(outside, routing.selected, False, axis=1)
        dense = changes["score"] == "softmax" and not changes["normalize"]
        assert bool(np.abs(d[outside]).max() > 0) == dense


def test_experts_learn_their_topics(rng: np.random.Generator) -> None:
    """Fixed routing, topic t always to experts {t, t+1}: the loss falls towards 0 (each
    expert's compromise between two topics plus the shared map), and a routing that sends every
    topic to the same two experts fits worse — specialisation pays."""
    n_topics, dim = 4, 16
    x_rng = np.random.default_rng(3)
    centroids = x_rng.normal(size=(n_topics, dim))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)

    def batch() -> tuple[np.ndarray, np.ndarray]:
        topics = x_rng.integers(0, n_topics, 512).astype(np.int64)
        x = centroids[topics] + 0.5 * x_rng.normal(size=(512, dim)) / np.sqrt(dim)
        return x.astype(np.float32), topics

    options = _options(top_k=2)

    def train(spread: bool) -> tuple[float, float]:
        task = ExpertTask(n_topics, dim, 8, 2, True, np.random.default_rng(5))
        losses = []
        for _ in range(600):
            x, topics = batch()
            selected = (
                np.stack([2 * topics, 2 * topics + 1], axis=1)
                if spread
                else np.tile(np.array([0, 1]), (topics.size, 1))
            )
            logits = np.zeros((topics.size, 8), np.float32)
            scores = np.full_like(logits, 0.5)
            gates = np.full(selected.shape, 0.5, np.float32)
            routing = Routing(logits=logits, scores=scores, selected=selected, gates=gates)
            losses.append(task.step(x, topics, routing, options).loss)
        return float(np.mean(losses[-50:])), losses[0]

    specialised, first = train(True)
    collapsed, _ = train(False)
    assert specialised < 0.1 * first
    assert specialised < 0.5 * collapsed
