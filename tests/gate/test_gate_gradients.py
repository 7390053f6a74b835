"""Analytic gradients against central finite differences, in a float64 harness.

The routing decision (which experts are selected, and the counts of the auxiliary loss) is held
fixed while the logits move by ±ε: a top-k is piecewise constant, so the loss is smooth in the
logits for a fixed selection, and that smooth function is what the analytic gradients
differentiate (docs/model/gate.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from moesim.gate.balancing import (
    BalanceContext,
    aux_loss_and_grad,
    combined_loss_and_grad,
    z_loss_and_grad,
)
from moesim.gate.router import Routing, gather_rows, scores_from_logits, top_k_indices
from moesim.gate.teacher import Teacher, TeacherChoice, task_loss_and_grad, teacher_capture
from moesim.scenario.strategies import LossTerm

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
    """Uniform probabilities and equal counts give L = α (docs/model/gate.md)."""
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


# --------------------------------------------------------------------------- every loss term

LOSS_KINDS = ["switch", "sequence", "global", "device", "communication", "z_loss"]


def _context(score: str, top_k: int, **kw: object) -> BalanceContext:
    defaults: dict[str, object] = {"tokens_per_sequence": 4, "micro_batches": (4, 8), "devices": 4}
    return BalanceContext(score=score, top_k=top_k, **{**defaults, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_every_loss_gradient_matches_finite_differences(
    rng: np.random.Generator, score: str, kind: str
) -> None:
    """12 tokens, 3 sequences of 4, micro-batches of 4 and 8 tokens, 8 experts on 4 devices."""
    n_tokens, n_experts, top_k = 12, 8, 3
    z = _logits(rng, n_tokens, n_experts)
    selected = top_k_indices(scores_from_logits(z, score), top_k)  # type: ignore[arg-type]
    ctx = _context(score, top_k)
    terms = [LossTerm(kind=kind, alpha=0.37)]  # type: ignore[arg-type]

    def loss(logits: np.ndarray) -> float:
        return combined_loss_and_grad(terms, _routing(logits, score, selected), ctx, selected)[0]

    value, analytic = combined_loss_and_grad(terms, _routing(z, score, selected), ctx)
    assert analytic.dtype == np.float64
    assert value == pytest.approx(loss(z), rel=1e-12)
    assert value > 0
    _assert_gradient_close(analytic, _finite_difference(loss, z))


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_switch_term_is_the_micro_batch_aux_loss(rng: np.random.Generator, score: str) -> None:
    z = _logits(rng, 12, 8)
    routing = _routing(z, score, top_k_indices(z, 2))
    term = combined_loss_and_grad(
        [LossTerm(kind="switch", alpha=0.2)], routing, _context(score, 2, micro_batches=(5, 2, 5))
    )
    direct = aux_loss_and_grad(routing, score, 2, 0.2, [5, 2, 5])  # type: ignore[arg-type]
    assert term[0] == pytest.approx(direct[0], rel=1e-12)
    np.testing.assert_allclose(term[1], direct[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_composite_is_the_sum_of_its_terms(rng: np.random.Generator, score: str) -> None:
    """Losses and gradients add, also when the terms' token groups do not line up."""
    z = _logits(rng, 12, 8)
    routing = _routing(z, score, top_k_indices(z, 3))
    ctx = _context(score, 3, micro_batches=(5, 7))  # micro-batches cut through sequences
    terms = [LossTerm(kind=k, alpha=0.1 * (i + 1)) for i, k in enumerate(LOSS_KINDS)]  # type: ignore[arg-type]
    total, grad = combined_loss_and_grad(terms, routing, ctx)
    parts = [combined_loss_and_grad([t], routing, ctx) for t in terms]
    assert total == pytest.approx(sum(p[0] for p in parts), rel=1e-12)
    np.testing.assert_allclose(grad, sum(p[1] for p in parts), rtol=1e-10, atol=1e-14)
    for a, b in zip(parts[:-1], parts[1:], strict=True):
        assert not np.allclose(a[1], b[1])  # the terms really differ


def _balanced_selection(n_tokens: int) -> np.ndarray:
    """8 experts, top-2, every 4 consecutive tokens use each expert once and reach two of the four
    2-expert devices each, each device twice: balanced per sequence, micro-batch and device."""
    return np.array([[(2 * t) % 8, (2 * t + 3) % 8] for t in range(n_tokens)], dtype=np.int64)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("kind", ["switch", "sequence", "global", "device", "communication"])
def test_every_balance_loss_is_alpha_at_perfect_balance(score: str, kind: str) -> None:
    selected = _balanced_selection(12)
    z = np.zeros((12, 8))  # uniform probabilities P_i = 1/N
    ctx = _context(score, 2)
    assert ctx.comm_limit == 2  # every token reaches M = min(K, D) = 2 devices
    loss, grad = combined_loss_and_grad(
        [LossTerm(kind=kind, alpha=0.03)],  # type: ignore[arg-type]
        _routing(z, score, selected),
        ctx,
        selected,
    )
    assert loss == pytest.approx(0.03, rel=1e-12)
    np.testing.assert_allclose(grad, 0.0, atol=1e-15)


def test_z_loss_value_and_gradient_formula(rng: np.random.Generator) -> None:
    """α·mean LSE², gradient (2α/T)·LSE·softmax (docs/model/gate.md), whatever the scores."""
    z = np.zeros((6, 8))
    loss, grad = z_loss_and_grad(z, 0.5)
    assert loss == pytest.approx(0.5 * np.log(8) ** 2)
    np.testing.assert_allclose(grad, 2 * 0.5 / 6 * np.log(8) / 8)
    z = _logits(rng, 5, 8) + 30.0  # large logits: no overflow
    loss, grad = z_loss_and_grad(z, 1e-3)
    lse = np.log(np.exp(z - 30).sum(axis=1)) + 30
    assert loss == pytest.approx(1e-3 * np.mean(lse**2))
    softmax = np.exp(z - z.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(grad, 2e-3 / 5 * lse[:, None] * softmax)


def test_global_loss_uses_the_whole_batch_counts() -> None:
    """Micro-batch 1 routes to experts {0, 1} and favours them, micro-batch 2 likewise {2, 3}:
    each micro-batch is maximally imbalanced, the whole batch is balanced. The switch loss sees
    the local imbalance (N·Σ f·P = 2e²/(e² + 1) > 1); the global loss sees balanced counts, so its
    coefficients are equal across experts: value α and no gradient at all."""
    z = np.array([[2.0, 2.0, 0.0, 0.0]] * 4 + [[0.0, 0.0, 2.0, 2.0]] * 4)
    selected = np.array([[0, 1]] * 4 + [[2, 3]] * 4, dtype=np.int64)
    routing = _routing(z, "softmax", selected)
    ctx = BalanceContext(score="softmax", top_k=2, tokens_per_sequence=4, micro_batches=2)
    switch = combined_loss_and_grad([LossTerm(kind="switch", alpha=0.1)], routing, ctx, selected)
    whole = combined_loss_and_grad([LossTerm(kind="global", alpha=0.1)], routing, ctx, selected)
    e2 = np.exp(2.0)
    assert switch[0] == pytest.approx(0.1 * 2 * e2 / (e2 + 1))
    assert whole[0] == pytest.approx(0.1)
    np.testing.assert_allclose(whole[1], 0.0, atol=1e-15)
    # The micro-batch loss pushes each micro-batch's own experts down, the others up.
    assert (switch[1][:4, :2] > 0).all()
    assert (switch[1][:4, 2:] < 0).all()
    assert (switch[1][4:, 2:] > 0).all()


def _probabilities(z: np.ndarray, score: str) -> np.ndarray:
    s = scores_from_logits(z, score)  # type: ignore[arg-type]
    return s / s.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize(("devices", "limit", "m"), [(4, None, 3), (2, None, 2), (4, 2, 2)])
def test_loss_values_against_the_papers_formulas(
    rng: np.random.Generator, score: str, devices: int, limit: int | None, m: int
) -> None:
    """Plain loops over V3 Eqs. 17–20 and V2's device and communication losses
    (docs/model/gate.md): 3 sequences of 4 tokens, 8 experts on D devices, K = 3, device limit
    M = min(K, D) or the node limit's devices."""
    n_experts, top_k, tps, alpha = 8, 3, 4, 0.3
    z = _logits(rng, 12, n_experts)
    selected = top_k_indices(scores_from_logits(z, score), top_k)  # type: ignore[arg-type]
    p = _probabilities(z, score)
    ctx = _context(score, top_k, devices=devices, device_limit=limit)
    per_device = n_experts // devices
    expected = {"sequence": 0.0, "device": 0.0, "communication": 0.0}
    for seq in range(3):
        rows = range(seq * tps, (seq + 1) * tps)
        f = np.zeros(n_experts)
        reach = np.zeros(devices)
        for t in rows:
            for i in selected[t]:
                f[i] += n_experts / (top_k * tps)
            for d in {int(i) // per_device for i in selected[t]}:
                reach[d] += devices / (m * tps)
        big_p = p[list(rows)].mean(axis=0)
        expected["sequence"] += alpha * (f * big_p).sum() / 3
        f_dev = f.reshape(devices, per_device).mean(axis=1)
        p_dev = big_p.reshape(devices, per_device).sum(axis=1)
        expected["device"] += alpha * (f_dev * p_dev).sum() / 3
        expected["communication"] += alpha * (reach * p_dev).sum() / 3
    routing = _routing(z, score, selected)
    for kind, value in expected.items():
        got = combined_loss_and_grad([LossTerm(kind=kind, alpha=alpha)], routing, ctx, selected)  # type: ignore[arg-type]
        assert got[0] == pytest.approx(value, rel=1e-12), kind
