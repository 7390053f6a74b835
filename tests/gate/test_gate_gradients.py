"""Analytic gradients against central finite differences, in a float64 harness.

The routing decision (which experts are selected, and the counts of the auxiliary loss) is held
fixed while the logits move by ±ε: a top-k is piecewise constant, so the loss is smooth in the
logits for a fixed selection, and that smooth function is what the analytic gradients
differentiate (routing.md §2.1, §5.1, §6.2 item 5).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from moesim.gate.balancing import aux_loss_and_grad
from moesim.gate.router import Routing, gather_rows, scores_from_logits, top_k_indices
from moesim.gate.teacher import Teacher, TeacherChoice, task_loss_and_grad, teacher_capture

EPS = 1e-6
RTOL = 1e-4


def _routing(logits: np.ndarray, score: str, selected: np.ndarray) -> Routing:
    scores = scores_from_logits(logits, score)  # type: ignore[arg-type]
    gates = gather_rows(scores, selected)
    return Routing(logits=logits, scores=scores, selected=selected, gates=gates)


def _finite_difference(loss: Callable[[np.ndarray], float], z: np.ndarray) -> np.ndarray:
    grad = np.zeros_like(z)
    for index in np.ndindex(z.shape):
        up, down = z.copy(), z.copy()
        up[index] += EPS
        down[index] -= EPS
        grad[index] = (loss(up) - loss(down)) / (2 * EPS)
    return grad


def _assert_gradient_close(analytic: np.ndarray, numeric: np.ndarray) -> None:
    scale = np.abs(numeric).max()
    assert scale > 0
    relative = np.abs(analytic - numeric).max() / scale
    assert relative < RTOL, f"max relative error {relative:.2e}"


def _logits(rng: np.random.Generator, n_tokens: int, n_experts: int) -> np.ndarray:
    return rng.normal(0.0, 1.5, (n_tokens, n_experts))


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("micro_batches", [1, 3, [5, 2, 5]])
def test_aux_loss_gradient_matches_finite_differences(
    rng: np.random.Generator, score: str, micro_batches: int | list[int]
) -> None:
    n_tokens, n_experts, top_k, alpha = 12, 8, 3, 0.37
    z = _logits(rng, n_tokens, n_experts)
    # Counts come from the unbiased top-k; they are constants of the loss (no gradient).
    selected = top_k_indices(scores_from_logits(z, score), top_k)  # type: ignore[arg-type]

    def loss(logits: np.ndarray) -> float:
        routing = _routing(logits, score, selected)
        return aux_loss_and_grad(routing, score, top_k, alpha, micro_batches, selected)[0]  # type: ignore[arg-type]

    value, analytic = aux_loss_and_grad(
        _routing(z, score, selected), score, top_k, alpha, micro_batches
    )  # type: ignore[arg-type]
    assert analytic.dtype == np.float64
    assert value == pytest.approx(loss(z), rel=1e-12)
    _assert_gradient_close(analytic, _finite_difference(loss, z))


def _choice(rng: np.random.Generator, n_tokens: int, n_experts: int, k: int) -> TeacherChoice:
    experts = np.argsort(rng.random((n_tokens, n_experts)), axis=1)[:, :k].astype(np.int64)
    weights = rng.dirichlet(np.ones(k), size=n_tokens)
    return TeacherChoice(experts=experts, weights=weights)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_task_loss_gradient_matches_finite_differences(
    rng: np.random.Generator, score: str
) -> None:
    n_tokens, n_experts, top_k = 10, 8, 3
    z = _logits(rng, n_tokens, n_experts)
    choice = _choice(rng, n_tokens, n_experts, top_k)
    selected = top_k_indices(z + rng.normal(0, 1.0, n_experts), top_k)  # e.g. a biased choice
    target, target_sq = choice.at(selected), (choice.weights**2).sum(axis=1)

    def loss(logits: np.ndarray) -> float:
        return task_loss_and_grad(_routing(logits, score, selected), target, target_sq, score)[0]  # type: ignore[arg-type]

    value, analytic = task_loss_and_grad(_routing(z, score, selected), target, target_sq, score)  # type: ignore[arg-type]
    _assert_gradient_close(analytic, _finite_difference(loss, z))
    unselected = np.ones_like(z, dtype=bool)
    np.put_along_axis(unselected, selected, False, axis=1)
    assert (analytic[unselected] == 0).all()
    # The loss is ½‖w − q‖² over all experts, w the renormalised gates at the selection.
    s = gather_rows(scores_from_logits(z, score), selected)  # type: ignore[arg-type]
    w = np.zeros_like(z)
    np.put_along_axis(w, selected, s / s.sum(axis=1, keepdims=True), axis=1)
    q = choice.dense(n_experts)
    assert value == pytest.approx(float((0.5 * ((w - q) ** 2).sum(axis=1)).mean()))


def test_task_loss_is_zero_at_the_teacher_choice(rng: np.random.Generator) -> None:
    """The teacher's experts with the teacher's weights cost nothing: a finite optimum."""
    choice = _choice(rng, 5, 8, 3)
    z = np.full((5, 8), -5.0)
    np.put_along_axis(z, choice.experts, np.log(choice.weights), axis=1)
    routing = _routing(z, "softmax", choice.experts)
    loss, grad = task_loss_and_grad(
        routing, choice.at(choice.experts), (choice.weights**2).sum(axis=1), "softmax"
    )
    assert loss == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(grad, 0.0, atol=1e-12)
    assert teacher_capture(choice.at(choice.experts)) == pytest.approx(1.0)


def test_task_loss_ignores_gate_scaling_and_normalisation(rng: np.random.Generator) -> None:
    z = _logits(rng, 6, 8)
    choice = _choice(rng, 6, 8, 2)
    selected = top_k_indices(z, 2)
    plain = _routing(z, "sigmoid", selected)
    scaled = Routing(plain.logits, plain.scores, plain.selected, 2.5 * plain.gates)
    target, sq = choice.at(selected), (choice.weights**2).sum(axis=1)
    a = task_loss_and_grad(plain, target, sq, "sigmoid")
    b = task_loss_and_grad(scaled, target, sq, "sigmoid")
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_aux_loss_is_alpha_at_perfect_balance() -> None:
    """Uniform probabilities and equal counts give L = α (routing.md §5.1)."""
    n_experts, top_k, alpha = 8, 2, 0.01
    n_tokens = n_experts * 3
    selected = np.array(
        [[(2 * t) % n_experts, (2 * t + 1) % n_experts] for t in range(n_tokens)], dtype=np.int64
    )
    for score in ("softmax", "sigmoid"):
        z = np.zeros((n_tokens, n_experts))
        routing = _routing(z, score, selected)
        loss, grad = aux_loss_and_grad(routing, score, top_k, alpha, 1, selected)  # type: ignore[arg-type]
        assert loss == pytest.approx(alpha)
        np.testing.assert_allclose(grad, 0.0, atol=1e-15)


def test_aux_loss_is_mean_over_micro_batches(rng: np.random.Generator) -> None:
    z = _logits(rng, 12, 6)
    selected = top_k_indices(z, 2)
    whole = aux_loss_and_grad(_routing(z, "softmax", selected), "softmax", 2, 0.1, 3)[0]
    parts = [
        aux_loss_and_grad(
            _routing(z[i : i + 4], "softmax", selected[i : i + 4]), "softmax", 2, 0.1, 1
        )[0]
        for i in (0, 4, 8)
    ]
    assert whole == pytest.approx(np.mean(parts))


def test_aux_loss_rejects_bad_micro_batches(rng: np.random.Generator) -> None:
    z = _logits(rng, 10, 4)
    routing = _routing(z, "softmax", top_k_indices(z, 1))
    with pytest.raises(ValueError, match="micro-batch"):
        aux_loss_and_grad(routing, "softmax", 1, 0.1, 3)
    with pytest.raises(ValueError, match="partition"):
        aux_loss_and_grad(routing, "softmax", 1, 0.1, [4, 4])


def test_teacher_choice_is_its_top_k(rng: np.random.Generator) -> None:
    teacher = Teacher.random(16, 8, 0.5, rng)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    choice = teacher.choice(x, 4)
    logits = x @ teacher.weights.T
    expected = np.sort(np.argsort(-logits, axis=1)[:, :4], axis=1)
    np.testing.assert_array_equal(np.sort(choice.experts, axis=1), expected)
    np.testing.assert_allclose(choice.weights.sum(axis=1), 1.0, rtol=1e-5)
    # Weights follow the teacher's logits: the best expert gets the largest weight.
    best = np.take_along_axis(choice.experts, choice.weights.argmax(axis=1)[:, None], 1)[:, 0]
    np.testing.assert_array_equal(best, logits.argmax(axis=1))


def test_teacher_capture_extremes(rng: np.random.Generator) -> None:
    choice = _choice(rng, 50, 10, 3)
    assert teacher_capture(choice.at(choice.experts)) == pytest.approx(1.0)
    others = np.array([[e for e in range(10) if e not in row][:3] for row in choice.experts])
    assert teacher_capture(choice.at(others)) == 0.0
    one = others.copy()
    one[:, 0] = choice.experts[:, 0]
    assert teacher_capture(choice.at(one)) == pytest.approx(choice.weights[:, 0].mean())
