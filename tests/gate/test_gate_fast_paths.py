"""The gate's compiled bias-step kernels against their NumPy twins, bit for bit.

moesim/gate/kernels.py promises the same values as the NumPy code it replaces at the coarsened
gate's bias steps: the load counts of LoadCounter (ties included, under the lower-index rule of
top_k_indices) and the repeated Adam update. A whole coarsened trajectory must not depend on
which path runs, and must repeat exactly from the same seed.
"""

from __future__ import annotations

import numpy as np
import pytest
from base_scenario import v3_like

from moesim.gate import TokenStream, kernels, train_gate
from moesim.gate.balancing import sign_rule_update
from moesim.gate.experts import ExpertTask
from moesim.gate.router import CapacitySpec, RouterState, route, select_experts, top_k_indices
from moesim.gate.training import LoadCounter, _Adam, _scores
from moesim.scenario import scenario_from_dict
from moesim.scenario.strategies import AuxLoss, Bias, Composite, LossTerm

needs_numba = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")

# (experts, top_k, groups, groups kept): DeepSeek-V3's node limit (two per group summed), groups
# of an odd size, one kept group, an insertion path (six per group summed), no group limit.
ROUTINGS = [
    (256, 8, 8, 4),
    (21, 4, 3, 2),
    (64, 6, 8, 1),
    (64, 12, 4, 2),
    (64, 6, 1, None),
    (32, 32, 1, None),
]


def _tied_selection(
    rng: np.random.Generator, n_tokens: int, n_experts: int, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and a bias on a coarse dyadic lattice: sums are exact and ties frequent, at the
    expert threshold and between group scores alike."""
    scores = (rng.integers(0, 24, (n_tokens, n_experts)) / 16).astype(dtype)
    bias = (rng.integers(-8, 8, n_experts) / 16).astype(dtype)
    return scores, bias


def test_top_k_ties_go_to_the_lower_index() -> None:
    values = np.zeros((50, 16), dtype=np.float32)
    values[:, ::3] = 1.0  # tied maxima at 0, 3, 6, 9, 12, 15
    chosen = np.sort(top_k_indices(values, 4), axis=1)
    np.testing.assert_array_equal(chosen, np.tile([0, 3, 6, 9], (50, 1)))
    # Group limit: groups 1 and 2 tie for the second place; group 1 is kept.
    row = np.array([[5, 5, 1, 1, 0, 0, 1, 1]], dtype=np.float32)
    np.testing.assert_array_equal(np.sort(select_experts(row, None, 3, 4, 2)[0]), [0, 1, 2])


@needs_numba
@pytest.mark.parametrize(("n_experts", "top_k", "n_groups", "group_topk"), ROUTINGS)
@pytest.mark.parametrize("tied", [True, False])
def test_compiled_counts_equal_the_load_counter(
    n_experts: int, top_k: int, n_groups: int, group_topk: int | None, tied: bool
) -> None:
    rng = np.random.default_rng(n_experts * 100 + top_k)
    n_tokens = 300
    if tied:
        scores, bias = _tied_selection(rng, n_tokens, n_experts)
    else:
        scores = rng.random((n_tokens, n_experts), dtype=np.float32)
        bias = rng.normal(0.0, 0.05, n_experts).astype(np.float32)
    sizes = [100, 50, 150]
    counter = LoadCounter(n_tokens, n_experts, top_k, n_groups, group_topk, sizes)
    expected = counter(scores + bias)
    got = kernels.routed_counts(
        scores, bias, False, top_k, n_groups, group_topk, counter.starts
    )  # fmt: skip
    np.testing.assert_array_equal(got, expected)
    # One group; and the selection's own counts (select_experts' indices) agree too.
    whole = kernels.routed_counts(scores, bias, False, top_k, n_groups, group_topk)
    chosen = select_experts(scores, bias, top_k, n_groups, group_topk)
    np.testing.assert_array_equal(whole[0], np.bincount(chosen.ravel(), minlength=n_experts))
    assert whole.sum() == n_tokens * top_k


@needs_numba
def test_compiled_counts_multiplicative() -> None:
    rng = np.random.default_rng(3)
    scores, _ = _tied_selection(rng, 200, 64)
    factors = (1 + rng.integers(-4, 5, 64) / 8).astype(np.float32)
    chosen = select_experts(scores, factors, 6, 8, 2, bias_mode="mul")
    got = kernels.routed_counts(scores, factors, True, 6, 8, 2)
    np.testing.assert_array_equal(got[0], np.bincount(chosen.ravel(), minlength=64))


@needs_numba
def test_compiled_adam_repeat_equals_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    shape = (32, 16)
    weights = rng.standard_normal(shape).astype(np.float32)
    grad = (rng.standard_normal(shape) * 1e-3).astype(np.float32)
    paths = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        w, adam = weights.copy(), _Adam(shape, 3e-4)
        adam.step(w, grad)
        for _ in range(20):
            adam.repeat(w)
        paths.append((w, adam.m, adam.v))
    # Many repeats in one compiled call (after one single repeat: t does not start at 1).
    monkeypatch.setattr(kernels, "ENABLED", True)
    w, adam = weights.copy(), _Adam(shape, 3e-4)
    adam.step(w, grad)
    adam.repeat(w)
    adam.repeat_many(w, 19)
    assert adam.t == 21
    paths.append((w, adam.m, adam.v))
    for compiled, reference, fused in zip(*paths, strict=True):
        np.testing.assert_array_equal(compiled, reference)
        np.testing.assert_array_equal(fused, reference)
    # A repeat that also writes the negated weights (the bias steps' exp form), on both paths.
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        w, adam = weights.copy(), _Adam(shape, 3e-4)
        adam.step(w, grad)
        negated = np.zeros(shape, dtype=np.float32)
        for _ in range(20):
            adam.repeat(w, negated)
        np.testing.assert_array_equal(w, paths[1][0])
        np.testing.assert_array_equal(negated, -paths[1][0])


STEPS = 320


def _v3_like(seed: int, bias: Bias, threads: int = 1) -> tuple[list, list]:
    """A short DeepSeek-V3-like coarsened run (benchmarks/gate_speed.py (b)): 256 experts,
    top-8 sigmoid, node-limited to 4 of 8 nodes, sequence loss plus loss-free bias, gradients
    every 16 steps; returns its records and final routers."""
    scenario = scenario_from_dict(v3_like(STEPS))
    assert scenario.total_steps == STEPS
    spec = Composite(
        kind="composite",
        name="v3",
        losses=[LossTerm(kind="sequence", alpha=1e-4)],
        bias=bias,
    )
    trajectory = train_gate(scenario, spec, [], np.random.SeedSequence(seed), threads=threads)
    return trajectory.records, [(s.weights.copy(), s.bias.copy()) for s in trajectory.final]


@needs_numba
@pytest.mark.parametrize(
    "bias",
    [
        Bias(gamma=1e-3),  # the fused block of sign-rule steps
        Bias(gamma=1e-3, recenter=True),  # compiled counts, NumPy bias rule
        Bias(gamma=1e-3, scope="micro_batch"),  # compiled counts per micro-batch
    ],
    ids=["fused", "recentred", "micro-batch"],
)
def test_coarsened_trajectory_is_the_same_on_both_paths(
    monkeypatch: pytest.MonkeyPatch, bias: Bias
) -> None:
    monkeypatch.setattr(kernels, "ENABLED", True)
    compiled = _v3_like(4, bias)
    again = _v3_like(4, bias)
    monkeypatch.setattr(kernels, "ENABLED", False)
    reference = _v3_like(4, bias)
    assert len(compiled[0]) == STEPS // 16
    for records, routers in (again, reference):
        assert records == compiled[0]
        for (w, b), (w0, b0) in zip(routers, compiled[1], strict=True):
            np.testing.assert_array_equal(w, w0)
            np.testing.assert_array_equal(b, b0)
    # The bias moved at the bias steps (the path under test did something).
    assert float(np.abs(compiled[1][0][1]).max()) > 16 * 1e-3


@needs_numba
def test_coarsened_aux_loss_trajectory_is_the_same_on_both_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A loss without a bias: the in-between steps are Adam repeats alone (one compiled call
    per block), the loss's plain top-k the compiled selection."""
    scenario = scenario_from_dict(v3_like(STEPS))
    spec = AuxLoss(kind="aux_loss", name="seq", alpha=1e-3, scope="sequence")
    runs = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        trajectory = train_gate(scenario, spec, [], np.random.SeedSequence(6))
        runs.append((trajectory.records, [s.weights.copy() for s in trajectory.final]))
    assert runs[0][0] == runs[1][0]
    for w, w0 in zip(runs[0][1], runs[1][1], strict=True):
        np.testing.assert_array_equal(w, w0)
    assert runs[0][0][-1]["aux_loss"] > 0


@needs_numba
@pytest.mark.parametrize(
    "bias", [Bias(gamma=1e-3), Bias(gamma=1e-3, recenter=True)], ids=["fused", "recentred"]
)
def test_pipelined_bias_steps_give_the_same_trajectory(bias: Bias) -> None:
    """threads=2 (scores on a second thread while the sign rule selects) changes nothing; a
    strategy the pipeline does not cover (re-centred bias) runs as before."""
    alone = _v3_like(4, bias)
    pipelined = _v3_like(4, bias, threads=2)
    assert pipelined[0] == alone[0]
    for (w, b), (w0, b0) in zip(pipelined[1], alone[1], strict=True):
        np.testing.assert_array_equal(w, w0)
        np.testing.assert_array_equal(b, b0)


def test_train_gate_rejects_zero_threads() -> None:
    scenario = scenario_from_dict(v3_like(STEPS))
    with pytest.raises(ValueError, match="threads: 0"):
        train_gate(scenario, scenario.strategies[0], [], np.random.SeedSequence(0), threads=0)


@needs_numba
def test_sign_rule_block_from_exp_equals_the_sigmoid_scores() -> None:
    """The exp form (the sigmoid inside the loop, the logits' clip as a clamp of exp) against
    the scores of the gate's sigmoid, on logits beyond ±80 (both signs, inf included), a NaN
    (that token selects nothing on both paths) and scores on a lattice (ties)."""
    rng = np.random.default_rng(3)
    logits = (rng.integers(-40, 40, (6 * 40, 256)) / 8).astype(np.float32)
    logits[3, 7], logits[50, 0], logits[51, 255] = 85.0, -81.5, np.inf
    logits[100, :64] = -1e4
    logits[120, 9] = np.nan
    bias = (rng.integers(-8, 8, 256) / 64).astype(np.float32)
    gammas = np.array([1e-3, 2e-3, 0.0, 1e-3, 5e-4, 1e-3], dtype=np.float32)
    from_scores = bias.copy()
    kernels.sign_rule_block(_scores(logits.copy(), "sigmoid"), from_scores, gammas, 8, 8, 4)
    with np.errstate(over="ignore"):
        exponentials = np.exp(-logits)
    from_exp = bias.copy()
    kernels.sign_rule_block(exponentials, from_exp, gammas, 8, 8, 4, from_exp=True)
    np.testing.assert_array_equal(from_exp, from_scores)
    assert not np.array_equal(from_exp, bias)
    low, high = kernels.exp_clip_bounds(np.dtype(np.float32))
    assert (low, high) == (np.float32(np.exp(np.float32(-80.0))), np.exp(np.float32(80.0)))


@needs_numba
def test_fused_sign_rule_block_equals_step_by_step() -> None:
    """sign_rule_block against routed_counts and sign_rule_update one step at a time, on tied
    inputs, with a γ of 0 in the middle (that step leaves the bias)."""
    rng = np.random.default_rng(9)
    scores, bias = _tied_selection(rng, 6 * 40, 256)
    gammas = np.array([1e-3, 2e-3, 0.0, 1e-3, 5e-4, 1e-3], dtype=np.float32)
    fused = bias.copy()
    kernels.sign_rule_block(scores, fused, gammas, 8, 8, 4)
    stepped = bias.copy()
    for r, gamma in enumerate(gammas):
        loads = kernels.routed_counts(scores[r * 40 : (r + 1) * 40], stepped, False, 8, 8, 4)
        if gamma > 0:
            sign_rule_update(stepped, loads[0], float(gamma))
    np.testing.assert_array_equal(fused, stepped)
    assert not np.array_equal(fused, bias)


@needs_numba
@pytest.mark.parametrize(
    ("n_experts", "top_k", "n_groups", "group_topk"),
    # routed_top_k's written-out loop (the kept groups' largest one or two values reach top_k):
    # groups of 32, of an odd size, of two, one summed per group; then the general loop.
    [
        (256, 8, 8, 4),
        (21, 4, 3, 2),
        (32, 4, 16, 2),
        (64, 4, 16, 4),
        (64, 6, 8, 1),
        (64, 6, 1, None),
    ],
)
@pytest.mark.parametrize("extreme", [False, True])
def test_compiled_top_k_equals_numpy_on_extreme_rows(
    n_experts: int,
    top_k: int,
    n_groups: int,
    group_topk: int | None,
    extreme: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each sign-rule step's loads against NumPy's selection of the same step (select_experts,
    kernels off) on tied inputs; ``extreme`` adds infinite scores, a row with every expert
    tied (many candidates: the insertion path) and a NaN row, which selects nothing on the
    compiled path (its other rows are compared). The compiled select_experts (the experts in
    order) on the rows without NaN too."""
    rng = np.random.default_rng(5 * n_experts + top_k)
    steps, tokens = 5, 60
    scores, bias = _tied_selection(rng, steps * tokens, n_experts)
    nan_row = -1
    if extreme:
        cells = rng.random(scores.shape) < 0.02
        scores[cells] = np.where(rng.random(int(cells.sum())) < 0.5, np.inf, -np.inf)
        scores[10::tokens] = 0.5 - bias  # the first step's row: every expert tied
        nan_row = 2 * tokens + 7
        scores[nan_row, 3] = np.nan
    gammas = np.array([1e-3, 2e-3, 0.0, 1e-3, 5e-4], dtype=np.float32)
    fused = bias.copy()
    kernels.sign_rule_block(scores, fused, gammas, top_k, n_groups, group_topk)
    stepped = bias.copy()
    for r, gamma in enumerate(gammas):
        rows = np.arange(r * tokens, (r + 1) * tokens)
        rows = rows[rows != nan_row]
        monkeypatch.setattr(kernels, "ENABLED", False)
        chosen = select_experts(scores[rows], stepped, top_k, n_groups, group_topk)
        monkeypatch.setattr(kernels, "ENABLED", True)
        if gamma > 0:
            loads = np.bincount(chosen.ravel(), minlength=n_experts)
            sign_rule_update(stepped, loads, float(gamma))
    np.testing.assert_array_equal(fused, stepped)
    assert not np.array_equal(fused, bias)
    without_nan = np.delete(scores, nan_row, axis=0) if extreme else scores
    chosen = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        chosen.append(select_experts(without_nan, bias, top_k, n_groups, group_topk))
    np.testing.assert_array_equal(chosen[0], chosen[1])


@needs_numba
@pytest.mark.parametrize(("n_experts", "top_k", "n_groups", "group_topk"), ROUTINGS[:4])
def test_compiled_group_limit_selects_the_same_experts(
    n_experts: int, top_k: int, n_groups: int, group_topk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """select_experts with the compiled group limit and with NumPy's: the same indices, in the
    same order, on tied inputs."""
    rng = np.random.default_rng(n_experts + top_k)
    scores, bias = _tied_selection(rng, 300, n_experts)
    monkeypatch.setattr(kernels, "ENABLED", True)
    compiled = select_experts(scores, bias, top_k, n_groups, group_topk)
    monkeypatch.setattr(kernels, "ENABLED", False)
    reference = select_experts(scores, bias, top_k, n_groups, group_topk)
    np.testing.assert_array_equal(compiled, reference)


@needs_numba
@pytest.mark.parametrize(("n_experts", "top_k", "n_groups", "group_topk"), ROUTINGS)
@pytest.mark.parametrize("mode", ["add", "mul", "none"])
def test_compiled_selection_equals_numpy(
    n_experts: int,
    top_k: int,
    n_groups: int,
    group_topk: int | None,
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """select_experts compiled and in NumPy: the same experts in the same order, by decreasing
    selection score, an exact tie in index order (tied inputs)."""
    rng = np.random.default_rng(n_experts * 7 + top_k)
    scores, bias = _tied_selection(rng, 300, n_experts)
    if mode == "mul":
        bias = 1 + bias
    chosen = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        if mode == "none":
            chosen.append(select_experts(scores, None, top_k, n_groups, group_topk))
        else:
            chosen.append(select_experts(scores, bias, top_k, n_groups, group_topk, mode))
    np.testing.assert_array_equal(chosen[0], chosen[1])
    selection = scores if mode == "none" else (scores * bias if mode == "mul" else scores + bias)
    values = np.take_along_axis(selection, chosen[0], axis=1)
    assert (np.diff(values, axis=1) <= 0).all()
    tied = np.diff(values, axis=1) == 0
    assert tied.any()  # the lattice makes ties: their order is under test
    assert (np.diff(chosen[0], axis=1)[tied] > 0).all()


# Group-limited routings of two (or one) summed per group on groups of a power-of-two size: the
# compiled tournament's path (moesim/gate/compiled.py group_top2), with several merge rounds,
# one, and none (groups of two).
TOURNAMENTS = [(256, 8, 8, 4), (128, 6, 8, 3), (64, 4, 16, 4), (32, 4, 16, 2)]


@needs_numba
@pytest.mark.parametrize(("n_experts", "top_k", "n_groups", "group_topk"), TOURNAMENTS)
@pytest.mark.parametrize("infinite", [False, True])
def test_compiled_group_tournament_selects_the_same_experts(
    n_experts: int,
    top_k: int,
    n_groups: int,
    group_topk: int,
    infinite: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The compiled group limit's tournament and rank counting against NumPy's selection: the
    same experts in the same order on tied inputs, with and without infinite scores (which
    compare like any other value: only NaN leaves the tournament)."""
    rng = np.random.default_rng(n_experts + 3 * top_k + group_topk)
    scores, bias = _tied_selection(rng, 400, n_experts)
    if infinite:
        cells = rng.random(scores.shape) < 0.02
        scores[cells] = np.where(rng.random(int(cells.sum())) < 0.5, np.inf, -np.inf)
    chosen = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        chosen.append(select_experts(scores, bias, top_k, n_groups, group_topk))
    np.testing.assert_array_equal(chosen[0], chosen[1])
    loads = kernels.routed_counts(scores, bias, False, top_k, n_groups, group_topk)[0]
    np.testing.assert_array_equal(loads, np.bincount(chosen[1].ravel(), minlength=n_experts))


def _lattice(rng: np.random.Generator, shape: tuple[int, ...], scale: int) -> np.ndarray:
    """Small multiples of 1/scale: exact sums, many exact zeros (a hidden unit at the ReLU's
    kink)."""
    return (rng.integers(-2, 3, shape) / scale).astype(np.float32)


@needs_numba
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("capacity", [None, 0.5])
@pytest.mark.parametrize("n_hidden", [8, 5])
def test_compiled_experts_equal_numpy(
    tied: bool, capacity: float | None, n_hidden: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ExpertTask.evaluate and step (loss, logit gradient, expert gradients, updated weights)
    on the compiled and the NumPy loops: the same values, with hidden units exactly at 0, with
    capacity drops (an odd number of kept assignments) and with a hidden width other than the
    compiled loop's eight-lane case."""
    n_tokens, dim, n_experts, top_k, topics = 96, 16, 32, 4, 5
    rng = np.random.default_rng(21)
    x = _lattice(rng, (n_tokens, dim), 4) if tied else rng.standard_normal((n_tokens, dim))
    x = x.astype(np.float32)
    topic_ids = rng.integers(0, topics, n_tokens)
    state = RouterState.initial(n_experts, dim, 0.5, rng)
    options = {
        "top_k": top_k, "score": "sigmoid", "normalize": True, "scaling_factor": 2.5,
        "n_groups": 4, "group_topk": 2,
    }  # fmt: skip
    limit = None if capacity is None else CapacitySpec(factor=capacity)
    routing = route(x, state, **options, capacity=limit)  # type: ignore[arg-type]
    assert routing.dropped.any() == (capacity is not None)
    if capacity is not None and int((~routing.dropped).sum()) % 2 == 0:
        # An odd number of kept assignments: the compiled loop's last one goes unpaired.
        t, j = np.argwhere(~routing.dropped)[0]
        routing.dropped[t, j] = True
    if capacity is not None:
        assert int((~routing.dropped).sum()) % 2 == 1
    weights_rng = np.random.default_rng(6)
    if tied:
        up = _lattice(weights_rng, (n_experts, n_hidden, dim), 8)
        down = _lattice(weights_rng, (n_experts, 8, n_hidden), 8)
    else:
        up = (weights_rng.standard_normal((n_experts, n_hidden, dim)) / 4).astype(np.float32)
        down = (weights_rng.standard_normal((n_experts, 8, n_hidden)) / 4).astype(np.float32)
    if tied:
        # Hidden units at exactly 0 (the ReLU's kink) occur among the routed pairs.
        hidden = np.einsum("tkhd,td->tkh", up[routing.selected].astype(np.float64), x)
        assert (hidden == 0).any()
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        task = ExpertTask(topics, dim, n_experts, top_k, True, np.random.default_rng(5))
        task.up, task.down = up.copy(), down.copy()
        plain = task.evaluate(x, topic_ids, routing)
        result = task.step(x, topic_ids, routing, options, steps=3)  # type: ignore[arg-type]
        grads = task.expert_gradients()
        assert grads is not None
        results.append((plain, result, grads, task))
    (plain, result, grads, task), (plain0, result0, grads0, task0) = results
    assert plain == plain0
    assert result.loss == result0.loss
    assert result.dlogits is not None
    assert result0.dlogits is not None
    np.testing.assert_array_equal(result.dlogits, result0.dlogits)
    for name in ("up", "down", "shared"):
        np.testing.assert_array_equal(grads[name], grads0[name])
        np.testing.assert_array_equal(getattr(task, name), getattr(task0, name))
    assert np.abs(grads["up"]).max() > 0


@needs_numba
def test_compiled_targets_equal_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """ExpertTask.target compiled and in NumPy: the same values (exact zeros included)."""
    rng = np.random.default_rng(8)
    x = _lattice(rng, (200, 24), 4)
    topic_ids = rng.integers(0, 7, 200)
    targets = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        task = ExpertTask(7, 24, 16, 2, False, np.random.default_rng(3))
        task.targets = _lattice(np.random.default_rng(4), task.targets.shape, 8)
        targets.append(task.target(x, topic_ids))
    np.testing.assert_array_equal(targets[0], targets[1])
    assert (targets[1] == 0).any()
    assert (targets[1] != 0).any()


# Streams whose mixtures hold exact zeros (a domain's sequences have no mass outside its
# topics), with and without a shared part over all topics.
_DOMAINS = [
    {"name": "web", "share": 0.5, "topics": 32},
    {"name": "code", "share": 0.3, "topics": 16},
    {"name": "papers", "share": 0.2, "topics": 16},
]


@needs_numba
@pytest.mark.parametrize(
    "stream",
    [
        {"packing": "mixed"},
        {"packing": "domain"},
        {"packing": "mixed", "domains": _DOMAINS, "domain_overlap": 0.0, "topics": 64},
        {"packing": "domain", "domains": _DOMAINS, "domain_overlap": 0.3, "topics": 64},
    ],
    ids=["mixed", "domain", "domains", "domains-overlap"],
)
def test_compiled_stream_draw_equals_numpy(
    stream: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TokenStream.sample with the compiled topic draw, gather and sum, and with NumPy's: the
    same tokens and topics from the same generator state, over many sequences (the compiled
    draw searches each sequence's row, NumPy all rows at once)."""
    from base_scenario import BASE, derive

    params = scenario_from_dict(derive(BASE, stream=stream)).stream
    for n_sequences, tokens in ((6, 16), (700, 48)):
        draws = []
        for enabled in (True, False):
            monkeypatch.setattr(kernels, "ENABLED", enabled)
            source = TokenStream(params, np.random.default_rng(2))
            rng = np.random.default_rng(n_sequences)
            draws.append(source.sample(n_sequences, tokens, rng, sequences_per_micro_batch=2))
        np.testing.assert_array_equal(draws[0][0], draws[1][0])
        np.testing.assert_array_equal(draws[0][1], draws[1][1])
        assert draws[0][0].dtype == np.float32
        assert draws[0][0].shape == (n_sequences, tokens, params.dim)
    assert np.unique(draws[0][1]).size > params.topics // 2  # the large draw spans the topics


@needs_numba
def test_compiled_assignment_sort_equals_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The experts' assignment order (by expert, stably) by the compiled counting sort and by
    NumPy's stable argsort: the same arrays, with drops and with experts left empty."""
    from moesim.gate.experts import _sort_assignments
    from moesim.gate.router import Routing

    rng = np.random.default_rng(12)
    selected = np.stack([rng.choice(40, 6, replace=False) for _ in range(50)]).astype(np.int64)
    scores = rng.random((50, 48), dtype=np.float32)  # experts 40..47 never selected
    routing = Routing(
        logits=scores, scores=scores, selected=selected, gates=np.ones((50, 6), np.float32),
        dropped=rng.random((50, 6)) < 0.2,
    )  # fmt: skip
    orders = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        orders.append(_sort_assignments(routing))
    for name in ("rows", "slot", "owner", "counts", "starts"):
        np.testing.assert_array_equal(getattr(orders[0], name), getattr(orders[1], name))
    assert orders[0].slot.size == int((~routing.dropped).sum())


@needs_numba
def test_compiled_selection_leaves_nan_scores_to_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN score (a diverged router) leaves the compiled selection without a full top-k:
    select_experts then takes NumPy's selection, on both paths the same (without a group
    limit, whose compiled keep mask assumes finite scores)."""
    rng = np.random.default_rng(4)
    scores = rng.random((20, 64), dtype=np.float32)
    scores[3, :] = np.nan
    scores[7, 5] = np.nan
    chosen = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        chosen.append(select_experts(scores, None, 6))
    np.testing.assert_array_equal(chosen[0], chosen[1])
    assert kernels.select_top_k(scores, None, False, 6, 1, None) is None
    assert kernels.select_top_k(scores[8:], None, False, 6, 1, None) is not None
