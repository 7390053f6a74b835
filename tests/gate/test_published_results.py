"""Qualitative reproductions of published load-balancing results (routing.md §7).

A small gate (16 experts, top-2, 64 sequences × 16 tokens per update, 1,000 updates) is trained
under each setting from the same seed, so differences come from the setting alone. The
assertions are on the direction of each effect, as the issue asks; the notebook
``notebooks/balancing_dilemma.ipynb`` plots the same experiments, at the same size and seed, with
a few more settings (a wider α sweep, more computation-batch sizes). Every assertion here was
checked on seeds 11, 12 and 13.

Scale of α: the gate's task loss is not a language-model loss, so α values do not transfer
from the papers; in this model the trade-off appears for α in roughly 0.1–1 (below that the aux
loss is negligible next to the task gradient).

Not reproduced (R8, loss-free half): a bias updated from micro-batch counts does not cost task
loss in this model; :func:`test_r8_loss_free_local_counts_balance_less` asserts what the model
does and explains why.
"""

from __future__ import annotations

import numpy as np
import pytest

from moesim.gate import train_gate
from moesim.gate.study import frontier_at, head_mean, maxvio_by_batch, pareto_front, tail_mean
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
        "aux_0.1": AuxLoss(kind="aux_loss", alpha=0.1, name="aux_0.1"),
        "aux_0.3": AuxLoss(kind="aux_loss", alpha=0.3, name="aux_0.3"),
        "aux_1": AuxLoss(kind="aux_loss", alpha=1.0, name="aux_1"),
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


def test_r1_aux_loss_dilemma(runs):  # type: ignore[no-untyped-def]
    """R1: a larger α lowers MaxVio; the α strong enough to balance costs task loss. (A weak α
    can even help the task loss a little: unselected experts get no task gradient, and the aux
    loss's push towards them acts as exploration.)"""
    alphas = ["none", "aux_0.3", "aux_1"]
    maxvio = [_tail(runs[a], "maxvio_batch") for a in alphas]
    task = [_tail(runs[a], "task_loss") for a in alphas]
    assert maxvio[0] > maxvio[1] > maxvio[2]
    assert task[2] > max(task[0], task[1])


def test_r2_loss_free_beats_the_aux_loss_frontier(scenario, runs):  # type: ignore[no-untyped-def]
    """R2: loss-free reaches lower MaxVio_global than every α tried, and lies on or below the
    aux-loss frontier of (MaxVio_global, task loss): no α beats it on both, and its task loss is
    no worse than what the frontier offers at its balance (there, the most balanced α's)."""
    names = ("none", "aux_0.1", "aux_0.3", "aux_1")
    x = np.array([_maxvio_by_batch(scenario, runs[n], 64)[1] for n in names])
    y = np.array([_tail(runs[n], "task_loss") for n in names])
    lf_x = _maxvio_by_batch(scenario, runs["lf_1e-3"], 64)[1]
    lf_y = _tail(runs["lf_1e-3"], "task_loss")
    assert lf_x < 0.5 * x.min()
    assert not np.any((x <= lf_x) & (y <= lf_y))
    assert names[pareto_front(x, y)[0]] == "aux_1"
    assert lf_y <= frontier_at(x, y, lf_x)
    assert lf_y <= _tail(runs["aux_1"], "task_loss")


def test_r3_update_rate(runs):  # type: ignore[no-untyped-def]
    """R3: γ = 1e-4 converges slowly, 1e-2 oscillates, 1e-3 balances best late in training."""
    late = {g: _tail(runs[f"lf_{g}"], "maxvio_batch") for g in ("1e-4", "1e-3", "1e-2")}
    assert late["1e-3"] < late["1e-4"]
    assert late["1e-3"] < late["1e-2"]
    early = {g: head_mean(runs[f"lf_{g}"], "maxvio_batch", 200) for g in late}
    assert early["1e-4"] > early["1e-3"]  # slow start
    assert early["1e-2"] < early["1e-4"]  # fast start …
    assert late["1e-2"] > 2 * late["1e-3"]  # … but it keeps oscillating


def test_r6_computation_batch(scenario, runs):  # type: ignore[no-untyped-def]
    """R6: loss-free MaxVio keeps falling as the computation batch grows; the aux loss stays
    high (it balances each micro-batch's probabilities, not the global load)."""
    sizes = (4, 16, 64, 256)
    lf = [_maxvio_by_batch(scenario, runs["lf_1e-3"], b)[0] for b in sizes]
    aux = [_maxvio_by_batch(scenario, runs["aux_0.3"], b)[0] for b in sizes]
    assert all(a > b for a, b in zip(lf, lf[1:], strict=False))
    assert lf[-1] < 0.25 * lf[0]
    assert aux[-1] > 0.6 * aux[0]
    assert aux[-1] > 3 * lf[-1]


def test_interference_grows_with_alpha(runs):  # type: ignore[no-untyped-def]
    """Loss-Free Table 1 (routing.md §2.6): the aux-loss gradient opposes the task gradient
    (negative cosine) and its relative size grows with α; loss-free has none by construction."""
    for name in ("aux_0.1", "aux_0.3"):
        assert _tail(runs[name], "interference_cos") < -0.2
    ratio = [_tail(runs[n], "interference_ratio") for n in ("aux_0.1", "aux_0.3", "aux_1")]
    assert ratio[0] < ratio[1] < ratio[2]
    assert ratio[2] > 1  # at α = 1 the aux gradient outweighs the task gradient
    for name in ("none", "lf_1e-3"):
        assert not runs[name].column("interference_cos").any()
        assert not runs[name].column("interference_ratio").any()


@pytest.fixture(scope="module")
def softmax_runs(scenario):  # type: ignore[no-untyped-def]
    """Loss-free on a softmax router. A scenario file refuses softmax with the sign rule
    (``check_strategies``; routing.md App. C, Megatron §6.1): ``model_copy`` bypasses that check
    so the refused configuration can be measured."""
    softmax = scenario.model_copy(
        update={"router": scenario.router.model_copy(update={"score": "softmax"})}
    )
    specs = {
        "sign": LossFree(kind="loss_free", gamma=1e-3),
        "proportional": Composite(
            kind="composite", bias=Bias(rule="proportional", gamma=1e-3), name="proportional"
        ),
    }
    return {
        name: train_gate(softmax, spec, [], np.random.SeedSequence(11))
        for name, spec in specs.items()
    }


def test_r5_softmax_needs_the_proportional_rule(runs, softmax_runs):  # type: ignore[no-untyped-def]
    """R5: at the paper's γ = 1e-3, the sign rule balances a softmax router worse late in
    training than a sigmoid one (softmax scores are ~1/N, so a fixed step is relatively too
    large and the bias dithers more), and the proportional rule restores the balance. (A smaller
    sign step, γ ≈ 3e-4, also restores it in this model: see the notebook.)"""
    sigmoid_sign = _tail(runs["lf_1e-3"], "maxvio_batch")
    softmax_sign = _tail(softmax_runs["sign"], "maxvio_batch")
    softmax_proportional = _tail(softmax_runs["proportional"], "maxvio_batch")
    assert softmax_sign > 1.05 * sigmoid_sign
    assert softmax_proportional < softmax_sign


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
        "aux_micro": AuxLoss(kind="aux_loss", alpha=0.3, scope="micro_batch"),
        "aux_global": AuxLoss(kind="aux_loss", alpha=0.3, scope="global"),
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
    makes every domain spread over all experts: a higher task loss and a lower teacher capture
    than the same α counted over the global batch, without even a better global balance."""
    micro, glob = scope_runs["aux_micro"], scope_runs["aux_global"]
    assert _tail(micro, "task_loss") > 1.05 * _tail(glob, "task_loss")
    assert _tail(micro, "teacher_capture") < _tail(glob, "teacher_capture")
    assert maxvio_by_batch(packed, micro, 64)[1] > maxvio_by_batch(packed, glob, 64)[1]


def test_r8_loss_free_local_counts_balance_less(packed, scope_runs):  # type: ignore[no-untyped-def]
    """R8 (loss-free), NOT reproduced: Demons finds a bias updated from micro-batch counts hurts
    quality (PPL 8.080 → 8.521). Here it gives a *lower* task loss than global counts, because it
    balances much less: the bias is one vector shared by all micro-batches, and averaging the
    16 micro-batches' sign updates balances the median micro-batch load, not the mean, so it
    neither forces each domain to spread nor balances the global load. With fixed experts, less
    balance costs less task loss in this model. This asserts what the model does."""
    micro, glob = scope_runs["lf_micro"], scope_runs["lf_global"]
    assert maxvio_by_batch(packed, micro, 64)[1] > 2 * maxvio_by_batch(packed, glob, 64)[1]
    assert _tail(micro, "task_loss") < _tail(glob, "task_loss")
