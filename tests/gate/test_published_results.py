"""Qualitative reproductions of published load-balancing results (docs/model/gate.md, Published
results), on the learning-expert task.

A small gate (16 routed experts top-2 plus a shared one, 64 sequences × 16 tokens per update,
1,000 updates, the default stream) is trained under each setting from the same seed, so
differences come from the setting alone. α values are the papers' own: the task gradient's
scale is calibrated once (``moesim.gate.experts.TASK_GRADIENT_SCALE``, on the loss-free paper's
Table 2 point), not per test. The assertions are on the direction of each effect; the values in
the docstrings were measured at seed 11 (R5, whose gap is small against its seed-to-seed spread,
is stated over four seeds).

Reproduced: R1 (collapse without balancing, the aux-loss dilemma), R2 (loss-free beats the
aux-loss frontier), R3 (γ too small is slow, too large oscillates), R5 (softmax and the sign
rule), R6 (loss-free balance keeps improving with the computation batch, the aux loss's
flattens), interference growing with α (arXiv 2408.15664 Table 1), R8 for the aux loss.

Not reproduced: R8 for the loss-free bias (local counts do not cost task loss here;
:func:`test_r8_loss_free_local_counts_balance_less` says why); the collapse under no balancing
is present from initialisation and persists, rather than growing during training.
"""

from __future__ import annotations

import numpy as np
import pytest

from moesim.gate import train_gate
from moesim.gate.study import frontier_at, head_mean, maxvio_by_batch, tail_mean
from moesim.scenario.strategies import AuxLoss, Bias, Composite, LossFree, NoBalancing

STEPS = 1000


@pytest.fixture(scope="module")
def scenario(make_scenario):  # type: ignore[no-untyped-def]
    return make_scenario(
        gate={"batch_sequences": 64, "tokens_per_sequence": 16, "layers_simulated": 1},
        stream={"dim": 32},
        training={"total_tokens": STEPS * 64 * 1024},
    )


@pytest.fixture(scope="module")
def runs(scenario):  # type: ignore[no-untyped-def]
    specs = {
        "none": NoBalancing(kind="none"),
        "aux_1e-4": AuxLoss(kind="aux_loss", alpha=1e-4, name="aux_1e-4"),
        "aux_1e-3": AuxLoss(kind="aux_loss", alpha=1e-3, name="aux_1e-3"),
        "aux_3e-3": AuxLoss(kind="aux_loss", alpha=3e-3, name="aux_3e-3"),
        "aux_1e-2": AuxLoss(kind="aux_loss", alpha=1e-2, name="aux_1e-2"),
        "lf_1e-4": LossFree(kind="loss_free", gamma=1e-4, name="lf_1e-4"),
        "lf_1e-3": LossFree(kind="loss_free", gamma=1e-3, name="lf_1e-3"),
        "lf_1e-2": LossFree(kind="loss_free", gamma=1e-2, name="lf_1e-2"),
    }
    return {
        name: train_gate(scenario, spec, [], np.random.SeedSequence(11))
        for name, spec in specs.items()
    }


def _tail(run, key: str) -> float:  # type: ignore[no-untyped-def]
    return tail_mean(run, key, 0.25)


def _maxvio_by_batch(scenario, run, sequences: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(mean MaxVio of batches of ``sequences`` sequences, MaxVio of all of them pooled)."""
    return maxvio_by_batch(scenario, run, sequences, batches=30, seed=9)


def _global(run) -> float:  # type: ignore[no-untyped-def]
    """MaxVio_global over the last tenth of the updates (pooled gate-batch loads)."""
    return run.tail_summary()["maxvio_global"]


def test_r1_collapse_without_balancing(runs):  # type: ignore[no-untyped-def]
    """R1, α = 0: without balancing the routing stays collapsed — MaxVio_batch 4.3 over the
    first 200 updates (the stream's common direction hands a few router rows every token),
    still 1.6 late in training, the least-loaded expert at 14 % of the mean load — and the
    starved experts cost task loss: a weak aux loss (α = 1e-4) that keeps them fed ends lower
    (0.127 against 0.136)."""
    none = runs["none"]
    assert head_mean(none, "maxvio_batch", 200) > 3
    assert _tail(none, "maxvio_batch") > 1
    loads = none.tail_loads[0]
    assert loads.min() < 0.25 * loads.mean()
    assert _tail(none, "task_loss") > 1.03 * _tail(runs["aux_1e-4"], "task_loss")


def test_r1_aux_loss_dilemma(runs):  # type: ignore[no-untyped-def]
    """R1: a larger α lowers MaxVio_global (1.58, 1.54, 0.16, 0.06 for α = 0, 1e-4, 1e-3,
    3e-3) and, from α = 1e-3 on, raises the task loss (0.127 at 1e-4; 0.138, 0.145, 0.184 at
    1e-3, 3e-3, 1e-2): the α that balances costs quality."""
    names = ["none", "aux_1e-4", "aux_1e-3", "aux_3e-3"]
    maxvio = [_global(runs[n]) for n in names]
    assert maxvio[0] > maxvio[2] > maxvio[3]
    assert maxvio[1] > 3 * maxvio[2]
    task = [_tail(runs[n], "task_loss") for n in ("aux_1e-4", "aux_1e-3", "aux_3e-3", "aux_1e-2")]
    assert task[0] < task[1] < task[2] < task[3]


def test_r2_loss_free_beats_the_aux_loss_frontier(runs):  # type: ignore[no-untyped-def]
    """R2: loss-free (γ = 1e-3) reaches a lower MaxVio_global than every α (0.03 against at best
    0.06) and no α beats it on both balance and task loss; its task loss (0.129) is below that
    of every α that balances (MaxVio_global < 1)."""
    names = ("none", "aux_1e-4", "aux_1e-3", "aux_3e-3", "aux_1e-2")
    x = np.array([_global(runs[n]) for n in names])
    y = np.array([_tail(runs[n], "task_loss") for n in names])
    lf_x, lf_y = _global(runs["lf_1e-3"]), _tail(runs["lf_1e-3"], "task_loss")
    assert lf_x < 0.7 * x.min()
    assert not np.any((x <= lf_x) & (y <= lf_y))
    assert lf_y < y[x < 1].min()
    assert lf_y <= frontier_at(x, y, lf_x)


def test_bias_perturbation_is_measured(runs):  # type: ignore[no-untyped-def]
    """The bias's interference is not a gradient but a perturbation of the routing: loss-free
    moves about two thirds of the assignments off the router's own top-k, and the same weights
    routed without the bias would have a much higher task loss (0.33 against 0.13) — the router
    has come to rely on the bias. Strategies without a bias move nothing."""
    window = runs["lf_1e-3"].tail_summary()
    assert 0.2 < window["bias_moved"] < 1
    assert window["task_loss_unbiased"] > 1.5 * window["task_loss"]
    for name in ("none", "aux_1e-3"):
        assert runs[name].tail_summary()["bias_moved"] == 0.0
        assert not runs[name].column("bias_moved").any()


def test_r3_update_rate(runs):  # type: ignore[no-untyped-def]
    """R3: γ = 1e-4 converges slowly, 1e-2 oscillates, 1e-3 balances best late in training
    (late MaxVio_batch 1.60, 0.34 and 0.20 for γ = 1e-4, 1e-2, 1e-3)."""
    late = {g: _tail(runs[f"lf_{g}"], "maxvio_batch") for g in ("1e-4", "1e-3", "1e-2")}
    assert late["1e-3"] < late["1e-4"]
    assert late["1e-3"] < late["1e-2"]
    early = {g: head_mean(runs[f"lf_{g}"], "maxvio_batch", 200) for g in late}
    assert early["1e-4"] > early["1e-3"]  # slow start
    assert early["1e-2"] < early["1e-4"]  # fast start …
    assert late["1e-2"] > 1.5 * late["1e-3"]  # … but it keeps oscillating


def test_r6_computation_batch(scenario, runs):  # type: ignore[no-untyped-def]
    """R6: loss-free MaxVio keeps falling as the computation batch grows (0.80, 0.39, 0.20, 0.11
    for 4, 16, 64, 256 sequences); the aux loss's flattens (0.83, 0.49, 0.27, 0.21: it balances
    each micro-batch's probabilities, not the global load), ending about twice as high."""
    sizes = (4, 16, 64, 256)
    lf = [_maxvio_by_batch(scenario, runs["lf_1e-3"], b)[0] for b in sizes]
    aux = [_maxvio_by_batch(scenario, runs["aux_1e-3"], b)[0] for b in sizes]
    assert all(a > b for a, b in zip(lf, lf[1:], strict=False))
    assert lf[-1] < 0.25 * lf[0]
    assert lf[-1] < 0.65 * lf[-2]
    assert aux[-1] > 0.7 * aux[-2]
    assert aux[-1] > 1.5 * lf[-1]


def test_interference_grows_with_alpha(runs):  # type: ignore[no-untyped-def]
    """Loss-free paper Table 1 (arXiv 2408.15664): the aux-loss gradient opposes the task gradient
    (negative cosine) and its relative size grows with α; loss-free has none by construction."""
    for name in ("aux_1e-4", "aux_1e-3", "aux_3e-3"):
        assert _tail(runs[name], "interference_cos") < -0.2
    names = ("aux_1e-4", "aux_1e-3", "aux_3e-3", "aux_1e-2")
    ratio = [_tail(runs[n], "interference_ratio") for n in names]
    assert ratio == sorted(ratio)
    assert ratio[-1] > 1  # at α = 1e-2 the aux gradient outweighs the task gradient
    for name in ("none", "lf_1e-3"):
        assert not runs[name].column("interference_cos").any()
        assert not runs[name].column("interference_ratio").any()


# R5 compares two noisy late-training averages whose gap varies from seed to seed (+5 % to
# +18 % at seeds 11–14), so it is stated over these seeds rather than at one.
R5_SEEDS = (11, 12, 13, 14)


@pytest.fixture(scope="module")
def softmax_runs(scenario):  # type: ignore[no-untyped-def]
    """The sign rule on a sigmoid router, and on a softmax router with the sign and the
    proportional rule, at each of ``R5_SEEDS``. A scenario file refuses softmax with the sign
    rule (``check_strategies``; arXiv 2408.15664 App. C, Megatron-LM): ``model_copy`` bypasses
    that check so the refused configuration can be measured."""
    softmax = scenario.model_copy(
        update={"router": scenario.router.model_copy(update={"score": "softmax"})}
    )
    sign = LossFree(kind="loss_free", gamma=1e-3)
    proportional = Composite(
        kind="composite", bias=Bias(rule="proportional", gamma=1e-3), name="proportional"
    )
    cases = {
        "sigmoid_sign": (scenario, sign),
        "sign": (softmax, sign),
        "proportional": (softmax, proportional),
    }
    return {
        name: [train_gate(sc, spec, [], np.random.SeedSequence(seed)) for seed in R5_SEEDS]
        for name, (sc, spec) in cases.items()
    }


def test_r5_softmax_needs_the_proportional_rule(softmax_runs):  # type: ignore[no-untyped-def]
    """R5: at the paper's γ = 1e-3, the sign rule balances a softmax router worse late in
    training than a sigmoid one (softmax scores are ~1/N, so a fixed step is relatively too
    large and the bias dithers more), and the proportional rule restores the balance. (A smaller
    sign step, γ ≈ 3e-4, also restores it in this model: see the notebook.) Over
    ``R5_SEEDS``: softmax worse at every seed and by at least 5 % on average, the proportional
    rule better than the sign rule at every seed."""
    late = {
        name: np.array([_tail(run, "maxvio_batch") for run in runs])
        for name, runs in softmax_runs.items()
    }
    ratio = late["sign"] / late["sigmoid_sign"]
    assert (ratio > 1).all(), ratio
    assert ratio.mean() > 1.05, ratio
    assert (late["proportional"] < late["sign"]).all(), late


@pytest.fixture(scope="module")
def packed(make_scenario):  # type: ignore[no-untyped-def]
    """Domain-homogeneous micro-batches of 4 sequences (16 per gate batch), Demons §5.7."""
    return make_scenario(
        gate={"batch_sequences": 64, "tokens_per_sequence": 16, "layers_simulated": 1},
        stream={"dim": 32, "packing": "domain"},
        parallelism={"micro_batch_size": 4},
        training={"total_tokens": STEPS * 64 * 1024},
    )


@pytest.fixture(scope="module")
def scope_runs(packed):  # type: ignore[no-untyped-def]
    specs = {
        "aux_micro": AuxLoss(kind="aux_loss", alpha=3e-3, scope="micro_batch"),
        "aux_global": AuxLoss(kind="aux_loss", alpha=3e-3, scope="global"),
        "lf_micro": Composite(
            kind="composite", bias=Bias(rule="sign", gamma=1e-3, scope="micro_batch")
        ),
        "lf_global": Composite(kind="composite", bias=Bias(rule="sign", gamma=1e-3)),
    }
    return {
        name: train_gate(packed, spec, [], np.random.SeedSequence(11))
        for name, spec in specs.items()
    }


def test_r8_micro_batch_aux_loss_blocks_specialisation(packed, scope_runs):  # type: ignore[no-untyped-def]
    """R8 (aux loss): with single-domain micro-batches, a balance loss counted per micro-batch
    forces every domain to spread over all experts: a far higher task loss than the same α
    counted over the global batch (0.229 against 0.154), and computation batches of 256
    sequences no better balanced (MaxVio 0.57 against 0.24)."""
    micro, glob = scope_runs["aux_micro"], scope_runs["aux_global"]
    assert _tail(micro, "task_loss") > 1.2 * _tail(glob, "task_loss")
    assert maxvio_by_batch(packed, micro, 256)[0] > maxvio_by_batch(packed, glob, 256)[0]


def test_r8_loss_free_local_counts_balance_less(packed, scope_runs):  # type: ignore[no-untyped-def]
    """R8 (loss-free), NOT reproduced: Demons in the Detail (arXiv 2501.11873) finds a bias
    updated from micro-batch counts hurts quality (PPL 8.080 → 8.521). Here it balances much
    less (MaxVio_global 0.73 against 0.18) at the same task loss (0.138 against 0.139): the bias
    is one vector shared by all micro-batches, and averaging the 16 micro-batches' sign updates
    balances the median micro-batch load, not the mean, so it neither forces each domain to
    spread nor balances the global load. This asserts what the model does."""
    micro, glob = scope_runs["lf_micro"], scope_runs["lf_global"]
    assert _global(micro) > 2 * _global(glob)
    assert _tail(micro, "task_loss") < 1.03 * _tail(glob, "task_loss")
