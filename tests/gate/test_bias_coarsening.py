"""Blocks of bias steps (moesim.gate.training, ``BIAS_BLOCK_STEPS = j``).

Between two gradients (``gate.steps_per_update = k``) a coarsened gate takes one bias update and
one Adam step per optimizer step. With j > 1 those steps run in blocks of up to j: the block's
sub-batches are drawn and scored together, each with the weights of its own step (Adam reads no
bias), and then the bias updates run in order, each from its own sub-batch's loads under the
bias its step starts from. That is the j = 1 computation reordered, so a trajectory is the same
bit for bit whatever j — the tests below check it across bias scopes, rules and modes, group
limits, capacity, γ schedules, snapshots and chunk ends, and against records of coarsened runs
taken before blocks existed. j is a speed setting chosen inside the gate, not a scenario field.

Why no coarser rule: at DeepSeek-V3-like settings (the fidelity run below; 16,000 steps, two
seeds, k = 16) one γ step moves an expert's load by 4 % of the mean at the start and by 13 % and
36 % after 4,000 and 8,000 steps, so the bias must read the loads after every step. Rules that
apply several steps' updates from loads read once changed the time-averaged MaxVio_batch
(j = 1: 2.52) by: one update of j·γ from one batch +16 % (j = 2), +56 % (j = 4); j updates from
j sub-batches all routed with the block's first bias and weights +6 % (j = 2), +27 % (j = 4),
+82 % (j = 8); one batch re-selected at each step's bias +4 % (j = 2), +18 % (j = 8); sub-batches
selected at each step's bias but scored with the block's first weights +2 % (j = 4), +8 %
(j = 8). The last is no cheaper than the exact block (the cost is in the scores and the counts
of every step's tokens), so the exact one is the rule (moesim.gate.training, *Blocks of bias
steps*; docs/decisions/2026-12-04-gate-coarsening.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from base_scenario import v3_like

from moesim.errors import ScenarioError
from moesim.gate import train_gate, training
from moesim.gate.training import GateTrajectory
from moesim.scenario import Scenario, scenario_from_dict
from moesim.scenario.strategies import AuxLoss, Bias, Composite, LossFree, LossTerm

# The j of benchmarks/gate_speed.py (b).
BENCHMARK_J = 8

TINY = {
    "gate": {
        "batch_sequences": 8,
        "tokens_per_sequence": 16,
        "layers_simulated": 2,
        "steps_per_update": 4,
        "bias_batch_sequences": 3,
        # The records below were taken with the teacher objective; blocks do not depend on it.
        "objective": "teacher",
    },
    # The records below were taken before the stream's common direction existed.
    "stream": {"dim": 16, "common": 0.0},
    "training": {"total_tokens": 14 * 64 * 1024},
}


def _tiny(make_scenario, *, gate=None, steps=14, **sections):  # type: ignore[no-untyped-def]
    return make_scenario(
        gate={**TINY["gate"], **(gate or {})},
        stream=TINY["stream"],
        training={"total_tokens": steps * 64 * 1024},
        **sections,
    )


def _train_j(
    scenario: Scenario, spec: object, samples: Sequence[int], seed: int, j: int
) -> GateTrajectory:
    """``train_gate`` with bias-step blocks of up to ``j`` steps."""
    saved = training.BIAS_BLOCK_STEPS
    training.BIAS_BLOCK_STEPS = j
    try:
        return train_gate(scenario, spec, samples, np.random.SeedSequence(seed))  # type: ignore[arg-type]
    finally:
        training.BIAS_BLOCK_STEPS = saved


def _assert_same(a: GateTrajectory, b: GateTrajectory) -> None:
    assert a.records == b.records
    assert sorted(a.states) == sorted(b.states)
    pairs = [(a.states[s], b.states[s]) for s in a.states] + [(a.final, b.final)]
    for left, right in pairs:
        for x, y in zip(left, right, strict=True):
            np.testing.assert_array_equal(x.weights, y.weights)
            np.testing.assert_array_equal(x.bias, y.bias)


# --------------------------------------------------------------------------- schema


def test_block_length_is_not_a_scenario_field(make_scenario) -> None:  # type: ignore[no-untyped-def]
    """The block length changes no result, so the scenario does not set it."""
    with pytest.raises(ScenarioError, match="gate.bias_steps_per_update"):
        _tiny(make_scenario, gate={"steps_per_update": 4, "bias_steps_per_update": 2})


# --------------------------------------------------------------------------- exactness

# Records and final biases of coarsened runs (k = 4, or 6 with a capacity; seed 3) computed
# before blocks of bias steps existed (both layers): the loss-free gate of TINY, a group-limited
# V3-like gate (64 experts, top-6, 4 of 8 groups, sequence loss, micro-batch bias scope) and a
# capacity-limited gate with a rank-scope bias.
GOLDEN = {
    "loss_free": {
        "maxvio_batch": [1.71875, 0.9375, 1.28125, 1.125],
        "task_loss": [
            0.4898799345828593, 0.45747564488556236, 0.448847456718795, 0.46818254434037954
        ],
        "bias_abs_mean": [
            0.009999999776482582, 0.013124999706633389, 0.014687499613501132, 0.015312499657738954
        ],
        "bias": [
            [
                0.03999999910593033, 0.0, 0.019999999552965164, -0.019999999552965164, 0.0,
                0.029999999329447746, -0.019999999552965164, -0.009999999776482582, 0.0,
                0.009999999776482582, 0.019999999552965164, 0.03999999910593033, 0.0,
                0.029999999329447746, 0.03999999910593033, 0.0
            ],
            [
                0.029999999329447746, 0.009999999776482582, -0.009999999776482582,
                0.019999999552965164, 0.019999999552965164, 0.009999999776482582,
                0.019999999552965164, 0.009999999776482582, 0.029999999329447746,
                0.019999999552965164, 0.009999999776482582, -0.009999999776482582,
                0.029999999329447746, 0.009999999776482582, 0.0, 0.009999999776482582
            ],
        ],
    },
    "grouped_v3": {
        "maxvio_batch": [3.0, 2.208333333333333, 2.041666666666667, 1.5],
        "task_loss": [
            0.17691613800707273, 0.1769205748278182, 0.1749117522558663, 0.17489701538579538
        ],
        "bias_abs_mean": [
            0.0005683593935827957, 0.002460937593014023, 0.004214844031139364, 0.005636719157337211
        ],
        "bias": [
            [
                0.013750000856816769, -0.011250000447034836, 0.003833333496004343,
                -0.005000000353902578, -0.008416667580604553, 0.011416667141020298,
                -0.00866666715592146, -0.005333333741873503, -0.0022499999031424522,
                0.0050833337008953094, 0.0012499999720603228, 0.0038333339616656303,
                -0.0028333335649222136, 0.008500000461935997, 0.01100000087171793,
                -0.0010833332780748606, 0.008333333767950535, 0.003750000149011612,
                0.0004166667931713164, 0.008250000886619091, 0.004833333659917116,
                0.008833333849906921, 0.012416668236255646, 0.007583334110677242,
                0.008083334192633629, 0.004583333618938923, 0.004000000189989805,
                0.0019166667480021715, 0.00866666715592146, 0.0069166673347353935,
                0.0036666670348495245, 0.004666666965931654, 0.0020000000949949026,
                0.005250000394880772, -0.01075000036507845, -0.0015000002458691597,
                -0.005750000476837158, 0.006083333864808083, 0.012416667304933071,
                0.0016666667070239782, 0.001416666666045785, 0.004000000189989805,
                -0.00024999998277053237, -0.0005000000237487257, 0.007666666992008686,
                0.0100833335891366, -0.006333333905786276, -0.010916667059063911,
                0.0005833333707414567, 0.005416667088866234, -0.0035833334550261497,
                0.008250000886619091, -0.004916667006909847, 0.0009166667005047202,
                -0.00016666663577780128, 0.008750000968575478, 0.006250000558793545,
                0.009583333507180214, 0.0005833333707414567, 0.008583334274590015,
                0.00741666741669178, 0.010916667990386486, 0.003000000026077032,
                -0.008083334192633629
            ],
            [
                -0.010333334095776081, 0.001833333633840084, 0.006416667252779007,
                -0.0019166665151715279, -0.011250000447034836, 0.008250000886619091,
                0.01308333408087492, -0.0016666669398546219, 0.0017500000540167093,
                0.004416666924953461, 0.007333334069699049, -0.0003333333588670939,
                -0.00033333327155560255, -0.0004166667931713164, 0.004583333618938923,
                0.00083333341171965, 0.01191666815429926, 0.011750001460313797,
                0.007166667375713587, 0.0060000005178153515, 0.004500000271946192,
                0.011083334684371948, 0.003000000026077032, 0.004750000312924385,
                0.009250001050531864, 0.012750000692903996, 0.00891666766256094,
                0.00033333341707475483, 0.01308333408087492, -0.009166667237877846,
                0.0066666672937572, 0.0100833335891366, 0.010250001214444637, 0.004666666965931654,
                0.011416668072342873, 0.007083334028720856, -0.0017500000540167093,
                0.000750000006519258, 0.011416668072342873, 0.0060000005178153515,
                -0.0005833333125337958, -0.0035833334550261497, -0.008166667073965073,
                0.009666667319834232, -0.005333333741873503, -0.006416667252779007,
                -1.1641532182693481e-10, -0.012666667811572552, 0.00041666673496365547,
                0.007250000722706318, 0.004166666883975267, 0.004500000271946192,
                -0.010750001296401024, -0.00591666717082262, 0.013750000856816769,
                0.003083333373069763, 0.012833334505558014, -0.0032500000670552254,
                -0.003833333496004343, -0.00208333320915699, -0.0050833337008953094,
                0.0018333334010094404, 0.009083334356546402, 0.0020833336748182774
            ],
        ],
    },
    "capacity_rank": {
        "maxvio_batch": [0.5624278962450224, 0.40697569077457346, 0.3337038066129481],
        "task_loss": [0.5760168281849474, 0.5619828534545377, 0.5603869416518137],
        "bias_abs_mean": [0.0047656248934799805, 0.01270833304442931, 0.013541666543460451],
        "bias": [
            [
                0.014166664332151413, -0.038333334028720856, -0.002500000409781933,
                -0.030833331868052483, -0.032499998807907104, 0.007500000763684511,
                -0.0208333358168602, -0.017500003799796104, -0.01666666567325592,
                -0.014999999664723873, -0.013333333656191826, -0.009166667237877846,
                -0.014999998733401299, -0.0033333334140479565, 0.0033333334140479565,
                -0.014166664332151413
            ],
            [
                -0.005833333823829889, -0.012499997392296791, -0.03916666656732559,
                0.002499999478459358, -0.004166665952652693, -0.0058333356864750385,
                -0.0016666688024997711, -0.015833334997296333, -0.011666666716337204,
                -0.028333332389593124, -0.019166667014360428, -0.032499998807907104,
                -0.0008333334699273109, -0.008333333767950535, -0.008333330973982811,
                -0.004166667815297842
            ],
        ],
    },
}  # fmt: skip


def _golden_run(name: str, make_scenario):  # type: ignore[no-untyped-def]
    if name == "loss_free":
        return _tiny(make_scenario), LossFree(kind="loss_free", gamma=0.01)
    if name == "grouped_v3":
        scenario = _tiny(
            make_scenario,
            model={"moe": {"routed_experts": 64, "top_k": 6}},
            router={"num_groups": 8, "group_topk": 4},
        )
        spec = Composite(
            kind="composite",
            name="v3",
            losses=[LossTerm(kind="sequence", alpha=1e-4)],
            bias=Bias(gamma=1e-3, scope="micro_batch"),
        )
        return scenario, spec
    scenario = _tiny(
        make_scenario, gate={"steps_per_update": 6}, router={"capacity": {"factor": 1.0}}
    )
    return scenario, Composite(kind="composite", bias=Bias(gamma=0.01, scope="rank"))


@pytest.mark.parametrize(
    ("name", "j"),
    [(name, j) for name in ("loss_free", "grouped_v3") for j in (1, 2, 4)]
    + [("capacity_rank", j) for j in (1, 2, 3, 6)],
)
def test_matches_records_from_before_blocks(name: str, j: int, make_scenario) -> None:  # type: ignore[no-untyped-def]
    scenario, spec = _golden_run(name, make_scenario)
    k = scenario.gate.steps_per_update
    trajectory = _train_j(scenario, spec, [], 3, j)
    golden = GOLDEN[name]
    assert [r["step"] for r in trajectory.records] == list(range(0, 14, k))
    for key in ("maxvio_batch", "task_loss", "bias_abs_mean"):
        assert [r[key] for r in trajectory.records] == pytest.approx(golden[key], rel=1e-6)
    for state, bias in zip(trajectory.final, golden["bias"], strict=True):
        np.testing.assert_array_equal(state.bias, np.array(bias, dtype=np.float32))


_CASES = {
    "global": ({}, Composite(kind="composite", bias=Bias(gamma=0.01))),
    "micro_batch": ({}, Composite(kind="composite", bias=Bias(gamma=0.01, scope="micro_batch"))),
    "rank_groups": (
        {"router": {"num_groups": 4, "group_topk": 2}},
        Composite(
            kind="composite",
            losses=[LossTerm(kind="sequence", alpha=1e-3)],
            bias=Bias(gamma=0.01, scope="rank"),
        ),
    ),
    "capacity": (
        {"router": {"capacity": {"factor": 1.0}}},
        Composite(kind="composite", bias=Bias(gamma=0.01, scope="micro_batch")),
    ),
    "mul": ({}, Composite(kind="composite", bias=Bias(gamma=0.01, mode="mul"))),
    "recenter": ({}, Composite(kind="composite", bias=Bias(gamma=0.01, recenter=True))),
    "proportional": ({}, Composite(kind="composite", bias=Bias(gamma=0.01, rule="proportional"))),
    # γ moves the bias for 9 steps, stops for 4 and moves again: blocks end where it changes.
    "schedule": (
        {},
        Composite(
            kind="composite",
            bias=Bias(
                gamma=0.02,
                schedule=[  # type: ignore[list-item]
                    {"until_tokens": 9 * 64 * 1024, "gamma": 0.01},
                    {"until_tokens": 13 * 64 * 1024, "gamma": 0.0},
                ],
            ),
        ),
    ),
    "no_bias": ({}, AuxLoss(kind="aux_loss", alpha=0.01)),
    # 64 sequences of 512 tokens: two steps per chunk of bias tokens, so blocks end at chunk
    # ends.
    # The learning-expert task: the experts step at full updates only, so blocks change nothing.
    "experts": ({"gate": {"objective": "experts"}}, LossFree(kind="loss_free", gamma=0.01)),
    "chunk_ends": (
        {"gate": {"bias_batch_sequences": 64, "tokens_per_sequence": 512, "batch_sequences": 2}},
        LossFree(kind="loss_free", gamma=0.01),
    ),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_blocks_are_bit_identical_to_single_steps(case: str, make_scenario) -> None:  # type: ignore[no-untyped-def]
    """Every j dividing k gives the j = 1 trajectory: records, snapshots (several inside
    blocks) and final routers."""
    sections, spec = _CASES[case]
    gate = {"steps_per_update": 8, **sections.get("gate", {})}
    others = {key: value for key, value in sections.items() if key != "gate"}
    scenario = _tiny(make_scenario, gate=gate, steps=27, **others)
    samples = [0, 3, 6, 9, 10, 17, 22, 27]
    one = _train_j(scenario, spec, samples, 11, 1)
    assert sorted(one.states) == samples
    for j in (2, 4, 8):
        _assert_same(_train_j(scenario, spec, samples, 11, j), one)
    _assert_same(train_gate(scenario, spec, samples, np.random.SeedSequence(11)), one)


def test_softmax_router_with_blocks(make_scenario) -> None:  # type: ignore[no-untyped-def]
    """Softmax scores (the proportional rule, App. C) in blocks, as one step at a time."""
    base = _tiny(make_scenario, gate={"steps_per_update": 6})
    spec = Composite(kind="composite", bias=Bias(rule="proportional", gamma=0.01))
    router = base.router.model_copy(update={"score": "softmax"})
    scenario = base.model_copy(update={"router": router, "strategies": []})
    one = _train_j(scenario, spec, [4, 7], 2, 1)
    for j in (2, 3, 6):
        _assert_same(_train_j(scenario, spec, [4, 7], 2, j), one)


def test_every_requested_step_is_snapshot_exactly(make_scenario) -> None:  # type: ignore[no-untyped-def]
    """Snapshots at every step of a j = 4 run: each is the state at the start of its step, and
    each bias step moved the bias and the weights."""
    scenario = _tiny(make_scenario, gate={"steps_per_update": 8})
    spec = LossFree(kind="loss_free", gamma=0.01)
    every = list(range(15))
    blocks = _train_j(scenario, spec, every, 4, 4)
    one = _train_j(scenario, spec, every, 4, 1)
    _assert_same(blocks, one)
    for step in range(14):
        for before, after in zip(blocks.states[step], blocks.states[step + 1], strict=True):
            assert not np.array_equal(before.bias, after.bias), step
            assert not np.array_equal(before.weights, after.weights), step


# --------------------------------------------------------------------------- fidelity

STEPS = 3000
SEEDS = (1, 2, 3)


def _v3_run(j: int, seed: int) -> GateTrajectory:
    """DeepSeek-V3-like routing as in benchmarks/gate_speed.py (b): 256 experts, top-8 sigmoid,
    normalised, scaling 2.5, node-limited to 4 of the 8 nodes of an EP-64 group, the sequence
    loss (α = 1e-4) plus the loss-free bias (γ = 1e-3), learning rate 2.2e-4, gradients every 16
    steps on 4 × 32 tokens, bias batches of 4 sequences."""
    scenario = scenario_from_dict(v3_like(STEPS))
    assert scenario.total_steps == STEPS
    spec = Composite(
        kind="composite",
        name="v3",
        losses=[LossTerm(kind="sequence", alpha=1e-4)],
        bias=Bias(gamma=1e-3),
    )
    return _train_j(scenario, spec, [], seed, j)


def test_v3_maxvio_and_task_loss_unchanged_by_blocks() -> None:
    """Time-averaged MaxVio_batch and the final task loss over 3,000 steps, three seeds, at the
    benchmark's j against j = 1: the same numbers (so well within the 10 % the coarsening may
    cost); on the learning-expert task, so the experts' steps at full updates are covered too."""
    for seed in SEEDS:
        one = _v3_run(1, seed)
        blocks = _v3_run(BENCHMARK_J, seed)
        assert blocks.records == one.records
        fine, coarse = one.column("maxvio_batch").mean(), blocks.column("maxvio_batch").mean()
        assert abs(coarse / fine - 1) < 0.10
        task_fine = one.column("task_loss")[-20:].mean()
        task_coarse = blocks.column("task_loss")[-20:].mean()
        assert abs(task_coarse / task_fine - 1) < 0.10
