"""Megatron-Core-style pipeline splits: embedding and head counted as layers, pinned first and
last stages, the errors for splits that cannot be built, and the engine following the rule."""

from __future__ import annotations

import itertools

import pytest

from moesim.cluster import model_costs
from moesim.engine import build_context
from moesim.engine.schedules import build_schedule
from moesim.errors import ScenarioError
from moesim.scenario import scenario_from_dict
from moesim.scenario.pipeline import (
    EVEN,
    PieceSplit,
    PipelineRuleError,
    micro_batch_rule,
    peak_in_flight,
    piece_layer_counts,
    pieces_on_rank,
)

BOTH = PieceSplit(embedding_counts_as_layer=True, head_counts_as_layer=True)


def test_94_layers_on_32_stages_by_3_with_embedding_and_head_counted():
    # 94 + 2 = 96 slots = 32 × 3 pieces of one: the first piece holds only the embedding,
    # the last only the head, every other piece one transformer layer (Megatron-Core's split).
    with pytest.raises(PipelineRuleError, match="96 model pieces for 94 layers"):
        piece_layer_counts(94, 32, 3)
    counts = piece_layer_counts(94, 32, 3, BOTH)
    assert len(counts) == 96
    assert counts == (0,) + (1,) * 94 + (0,)
    sch = build_schedule("interleaved", 32, 64, 3)
    pieces = sch.piece_layers(94, BOTH)
    assert pieces[0] == []
    assert pieces[-1] == []
    assert [layer for piece in pieces for layer in piece] == list(range(94))
    # Piece 0 and the last piece sit on ranks 0 and 31; every rank holds 3 slots.
    assert sch.rank_of(0, 0) == 0
    assert sch.rank_of(0, 95) == 31
    per_rank = [sum(len(pieces[p]) for p in sch.held_pieces(r)) for r in range(32)]
    assert per_rank == [2] + [3] * 30 + [2]


@pytest.mark.parametrize(
    ("layers", "stages", "virtual"), [(61, 16, 1), (61, 4, 2), (27, 4, 3), (8, 8, 1), (9, 2, 2)]
)
@pytest.mark.parametrize(("embedding", "head"), [(False, False), (True, False), (True, True)])
def test_counted_slots_closed_form(layers, stages, virtual, embedding, head):
    n = stages * virtual
    slots = layers + embedding + head
    counts = piece_layer_counts(layers, stages, virtual, PieceSplit(embedding, head))
    expected = [slots // n + (p < slots % n) for p in range(n)]
    expected[0] -= embedding
    expected[-1] -= head
    assert list(counts) == expected
    assert sum(counts) == layers


def test_even_split_is_the_old_rule():
    for layers, stages, virtual in itertools.product((7, 8, 61, 94), (1, 2, 4), (1, 2, 3)):
        if layers < stages * virtual:
            continue
        base, extra = divmod(layers, stages * virtual)
        expected = tuple(base + (p < extra) for p in range(stages * virtual))
        assert piece_layer_counts(layers, stages, virtual, EVEN) == expected


def test_pinned_first_and_last_stages():
    # DeepSeek-V3-like: 61 layers on 16 stages, 3 on the first, 2 on the last: the other
    # 56 spread evenly over the 14 middle stages.
    split = PieceSplit(first_stage_layers=3, last_stage_layers=2)
    assert piece_layer_counts(61, 16, 1, split) == (3,) + (4,) * 14 + (2,)
    # With virtual stages the pinned count is shared by the stage's chunks (pieces 0, 4 on
    # rank 0; 3, 7 on rank 3), the embedding's piece and the head's piece the lightest.
    counts = piece_layer_counts(20, 4, 2, PieceSplit(first_stage_layers=3, last_stage_layers=1))
    assert (counts[0], counts[4]) == (1, 2)
    assert (counts[3], counts[7]) == (1, 0)
    middle = [counts[p] for p in (1, 2, 5, 6)]
    assert middle == [4, 4, 4, 4]
    # Only one end pinned: the rest goes to the other stages in path order, earlier first.
    assert piece_layer_counts(10, 4, 1, PieceSplit(first_stage_layers=1)) == (1, 3, 3, 3)
    assert piece_layer_counts(11, 4, 1, PieceSplit(last_stage_layers=0)) == (4, 4, 3, 0)
    # Two stages, both pinned: nothing in the middle.
    assert piece_layer_counts(5, 2, 1, PieceSplit(first_stage_layers=2, last_stage_layers=3)) == (
        2,
        3,
    )


@pytest.mark.parametrize(
    ("args", "field", "message"),
    [
        ((94, 32, 3, EVEN), "parallelism", "96 model pieces for 94 layers"),
        ((93, 32, 3, BOTH), "parallelism", "96 model pieces for 93 layers + the embedding + the"),
        ((10, 1, 1, PieceSplit(first_stage_layers=2)), "parallelism.first_stage_layers", ">= 2"),
        (
            (10, 4, 3, PieceSplit(first_stage_layers=1)),
            "parallelism.first_stage_layers",
            "1 layers for the 3 virtual stages of pipeline stage 0",
        ),
        (
            (10, 4, 3, PieceSplit(last_stage_layers=1)),
            "parallelism.last_stage_layers",
            "1 layers for the 3 virtual stages of pipeline stage 3",
        ),
        (
            (10, 4, 1, PieceSplit(first_stage_layers=8, last_stage_layers=3)),
            "parallelism.first_stage_layers",
            "first_stage_layers 8 + last_stage_layers 3 pins more layers than the model's 10",
        ),
        (
            (10, 2, 1, PieceSplit(first_stage_layers=3, last_stage_layers=3)),
            "parallelism.first_stage_layers",
            "leaves 4 of the 10 layers with no stage",
        ),
        (
            (10, 4, 2, PieceSplit(first_stage_layers=4, last_stage_layers=3)),
            "parallelism",
            "3 layers left for the 4 model pieces of the other stages",
        ),
        (
            (10, 4, 1, PieceSplit(embedding_counts_as_layer=True, last_stage_layers=2)),
            "parallelism.last_stage_layers",
            "cannot be combined",
        ),
    ],
)
def test_impossible_splits(args, field, message):
    with pytest.raises(PipelineRuleError) as err:
        piece_layer_counts(*args)
    assert err.value.field == field
    assert message in err.value.message


def test_schema_refuses_with_dotted_path(tiny_dict):
    p = tiny_dict["parallelism"]
    p.update(pipeline=2, schedule="interleaved", virtual_stages=3)
    tiny_dict["training"]["global_batch_sequences"] = 32
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict(tiny_dict)
    assert err.value.path == "parallelism"
    assert "6 model pieces for 4 layers" in str(err.value)
    p.update(embedding_counts_as_layer=True, head_counts_as_layer=True)
    scenario_from_dict(tiny_dict)  # 4 + 2 slots fill the 6 pieces
    p.update(first_stage_layers=2)
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict(tiny_dict)
    assert err.value.path == "parallelism.first_stage_layers"
    del p["embedding_counts_as_layer"], p["head_counts_as_layer"], p["first_stage_layers"]
    p.update(virtual_stages=2, layer_split="balanced", last_stage_layers=1)
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict(tiny_dict)
    assert err.value.path == "parallelism.layer_split"


def test_engine_pieces_follow_the_rule(tiny_dict):
    # 4 layers on 2 stages × 3 chunks with the embedding and the head counted: pieces
    # 0 and 5 hold no transformer layer but still run the embedding and the head.
    p = tiny_dict["parallelism"]
    p.update(
        schedule="interleaved",
        virtual_stages=3,
        embedding_counts_as_layer=True,
        head_counts_as_layer=True,
    )
    tiny_dict["training"]["global_batch_sequences"] = 32
    ctx = build_context(scenario_from_dict(tiny_dict))
    assert ctx.piece_layers == [[], [0], [1], [2], [3], []]
    # Rank 0 holds pieces 0, 2, 4: the embedding and MoE layers 1 and 3; rank 1 pieces
    # 1, 3, 5: the dense layer 0, MoE layer 2 and the head.
    c = model_costs(ctx.scenario.model)
    moe_dense = c.attention.params + c.router_params + c.expert_params  # one shared expert
    dense_layer = c.attention.params + c.dense_ffn_params
    assert ctx.dense_params[0] == c.embedding_params + 2 * moe_dense
    assert ctx.dense_params[1] == dense_layer + moe_dense + c.head_params
    del p["embedding_counts_as_layer"], p["head_counts_as_layer"]
    p.update(schedule="1f1b", virtual_stages=1, first_stage_layers=1)
    tiny_dict["training"]["global_batch_sequences"] = 16
    assert build_context(scenario_from_dict(tiny_dict)).piece_layers == [[0], [1, 2, 3]]


def test_pieces_on_rank_matches_the_schedules():
    for kind, stages, virtual in [("1f1b", 4, 1), ("interleaved", 4, 3), ("dualpipe", 6, 1)]:
        micro = max(micro_batch_rule(kind, stages)[0], stages)
        sch = build_schedule(kind, stages, micro, virtual)
        for rank in range(stages):
            ran = {(sch.direction(op.micro), op.piece) for op in sch.orders[rank]}
            assert sorted(pieces_on_rank(kind, stages, virtual, rank)) == sorted(ran)


@pytest.mark.parametrize("kind", ["1f1b", "zb1p", "interleaved", "dualpipe"])
def test_peak_in_flight_closed_form_equals_the_schedule(kind):
    for stages in (1, 2, 3, 4, 6, 8):
        if kind == "dualpipe" and stages % 2:
            continue
        for virtual in (2, 3) if kind == "interleaved" else (1,):
            least, multiple = micro_batch_rule(kind, stages)
            for micro in range(least, least + 4 * multiple * stages + 1, multiple):
                sch = build_schedule(kind, stages, micro, virtual)
                expected = tuple(sch.peak_in_flight())
                assert peak_in_flight(kind, stages, micro, virtual) == expected, (stages, micro)
