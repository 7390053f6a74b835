"""Static pipeline schedules: op coverage, dependencies, deadlocks and closed-form bubbles."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from moesim.engine.schedules import Op, Schedule, build_schedule, evaluate
from moesim.errors import ScenarioError, SimulationError
from moesim.scenario import scenario_from_dict
from moesim.scenario.pipeline import PipelineRuleError, micro_batch_rule


def dualpipe_min_micro_batches(stages: int) -> int:
    return micro_batch_rule("dualpipe", stages)[0]


def _grid() -> list[tuple[str, int, int, int]]:
    cases = []
    for s in (1, 2, 3, 4, 8, 16):
        for m in sorted({1, 2, 3, s, 2 * s + 1}):
            cases += [("1f1b", s, m, 1), ("zb1p", s, m, 1)]
    for s in (1, 2, 4, 8):
        for v in (2, 3, 4):
            for m in (s, 2 * s, 3 * s):
                cases.append(("interleaved", s, m, v))
    for s in (2, 4, 6, 8, 16):
        for m in sorted({dualpipe_min_micro_batches(s), 2 * s, 2 * s + 2, 3 * s + 3 * s % 2}):
            cases.append(("dualpipe", s, m, 1))
    return cases


GRID = _grid()


def _ids(case: tuple[str, int, int, int]) -> str:
    return "{}-pp{}-m{}-v{}".format(*case)


@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_every_op_once_on_its_rank(case):
    kind, s, m, v = case
    sch = build_schedule(kind, s, m, v)
    seen = Counter(key for order in sch.orders for op in order for key in op.halves)
    assert set(seen) == sch.required()
    assert max(seen.values()) == 1
    for rank, order in enumerate(sch.orders):
        for op in order:
            for _, micro, piece in op.halves:
                assert sch.rank_of(micro, piece) == rank
    expected_split = {"1f1b": 0, "interleaved": 0, "zb1p": m * s}.get(kind)
    if expected_split is not None:
        assert len(sch.split) == expected_split
    assert sum(1 for key in seen if key[0] == "W") == len(sch.split)


@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_dependencies_hold_under_random_durations(case):
    kind, s, m, v = case
    sch = build_schedule(kind, s, m, v)
    rng = np.random.default_rng(len(GRID) + s * 100 + m)
    price = {}
    for order in sch.orders:
        for op in order:
            price[op] = float(rng.uniform(0.1, 3.0))
    p2p = 0.37
    t = evaluate(sch, 0, 0, duration=price.__getitem__, p2p=p2p)
    for rank, order in enumerate(sch.orders):
        prev_end = 0.0
        for i, op in enumerate(order):
            key = op.halves[0]
            assert t.start[key] >= prev_end - 1e-12
            prev_end = t.finish[key]
            for dep in sch.dependencies(op):
                same = sch.rank_of(dep[1], dep[2]) == rank
                if same:
                    # A same-rank dependency must come earlier in the order, not just in time.
                    assert dep in {k for o in order[:i] for k in o.halves}
                assert t.start[key] >= t.finish[dep] + (0.0 if same else p2p) - 1e-12
        assert t.busy[rank] == pytest.approx(sum(price[op] for op in order))
    assert t.makespan == pytest.approx(max(t.finish.values()))


def _uniform(t, expected):
    assert t.bubble == pytest.approx([expected] * len(t.bubble), abs=1e-9)


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize(("f", "b"), [(1.0, 2.0), (1.5, 2.5), (2.0, 1.0)])
def test_1f1b_bubble_closed_form(pp, f, b):
    for m in (1, pp - 1, pp, 3 * pp):
        _uniform(evaluate(build_schedule("1f1b", pp, m), f, b), (pp - 1) * (f + b))


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("v", [2, 3])
@pytest.mark.parametrize(("f", "b"), [(1.0, 2.0), (1.5, 2.5)])
def test_interleaved_bubble_closed_form(pp, v, f, b):
    # f, b are a stage's full forward/backward; each of the v chunk ops takes a v-th.
    for m in (pp, 2 * pp):
        t = evaluate(build_schedule("interleaved", pp, m, v), f / v, b / v)
        _uniform(t, (pp - 1) * (f + b) / v)
        assert max(t.bubble) < (pp - 1) * (f + b)


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize(("f", "b", "w"), [(1.0, 2.0, 0.8), (1.2, 3.0, 1.0), (1.0, 2.0, 1.0)])
def test_zb1p_bubble_closed_form(pp, f, b, w):
    # b is the full backward (DeepSeek-V3 Table 2); holds for w <= f and 2w <= b.
    for m in (pp, 2 * pp + 3):
        _uniform(evaluate(build_schedule("zb1p", pp, m), f, b, w), (pp - 1) * (f + b - 2 * w))


def test_zb1p_closed_form_needs_w_at_most_f():
    # A weight gradient longer than the forward cannot hide in the warm-up gap it fills.
    t = evaluate(build_schedule("zb1p", 8, 16), 0.5, 2.0, 0.8)
    assert min(t.bubble) > 7 * (0.5 + 2.0 - 1.6) + 0.1


def _dualpipe_cases():
    # f = b - w: a forward chunk costs what an input-gradient chunk costs; and w <= f.
    return [(1.0, 1.8, 0.8), (1.5, 2.5, 1.0), (1.0, 2.0, 1.0)]


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize(("f", "b", "w"), _dualpipe_cases())
def test_dualpipe_bubble_closed_form(pp, f, b, w):
    half = pp // 2
    for m in (2 * pp - 2, 2 * pp, 2 * pp + 6):
        sch = build_schedule("dualpipe", pp, m)
        for fb in (f + b, f + b - 0.4, max(f, b)):
            t = evaluate(sch, f, b, w, fb)
            closed = (half - 1) * (fb + b - 3 * w)
            assert max(t.bubble) == pytest.approx(closed, abs=1e-9)
            for rank, bubble in enumerate(t.bubble):
                if min(rank, pp - 1 - rank) >= half - 2:
                    # The middle ranks run the most overlapped units: the largest bubble.
                    assert bubble == pytest.approx(closed, abs=1e-9)
            if fb == f + b:
                _uniform(t, closed)


@pytest.mark.parametrize("pp", [4, 8, 16])
def test_bubbles_rank_as_deepseek_table(pp):
    f, b, w = 1.0, 2.0, 1.0
    m = 2 * pp
    one = max(evaluate(build_schedule("1f1b", pp, m), f, b).bubble)
    zb = max(evaluate(build_schedule("zb1p", pp, m), f, b, w).bubble)
    dual = max(evaluate(build_schedule("dualpipe", pp, m), f, b, w, fb=2.5).bubble)
    assert dual < zb < one


def test_dualpipe_closed_form_needs_w_at_most_f():
    sch = build_schedule("dualpipe", 8, 16)
    f, w = 0.5, 1.0
    b = f + w
    t = evaluate(sch, f, b, w)
    assert max(t.bubble) > 3 * (f + b + b - 3 * w) + 0.1


def test_dualpipe_pairs_and_directions():
    pp, m = 8, 20
    sch = build_schedule("dualpipe", pp, m)
    assert sch.n_pieces == pp
    assert sch.param_copies == 2
    for micro in range(m):
        d = sch.direction(micro)
        assert d == (micro >= m // 2)
        ranks = [sch.rank_of(micro, p) for p in sch.pieces_of(micro)]
        assert ranks == (list(range(pp)) if d == 0 else list(range(pp - 1, -1, -1)))
    assert sch.orders[0][0] == Op("F", 0, 0)
    assert sch.orders[pp - 1][0] == Op("F", m // 2, 0)
    for rank, order in enumerate(sch.orders):
        assert sch.pieces_on(rank) == [(0, rank), (1, pp - 1 - rank)]
        units = [op for op in order if op.kind == "FB"]
        assert units
        # Each overlapped unit pairs a forward of one direction with a backward of the other.
        for op in units:
            assert sch.direction(op.micro) != sch.direction(op.b_micro)


@pytest.mark.parametrize("pp", [2, 4, 8, 16])
def test_activation_peaks(pp):
    m = 2 * pp + 2
    one = build_schedule("1f1b", pp, m).peak_in_flight()
    assert one == [pp - r for r in range(pp)]
    assert build_schedule("1f1b", pp, 2).peak_in_flight() == [min(pp - r, 2) for r in range(pp)]
    assert build_schedule("zb1p", pp, m).peak_in_flight() == [pp] * pp
    assert max(build_schedule("dualpipe", pp, m).peak_in_flight()) == pp + 1
    for v in (2, 3):
        inter = build_schedule("interleaved", pp, m - 2, v).peak_in_flight()
        assert inter == [min(2 * (pp - 1 - r) + (v - 1) * pp + 1, (m - 2) * v) for r in range(pp)]


def test_interleaved_layout():
    sch = build_schedule("interleaved", 4, 8, 3)
    assert sch.n_pieces == 12
    assert [sch.rank_of(0, p) for p in range(12)] == [0, 1, 2, 3] * 3
    assert sch.pieces_on(1) == [(0, 1), (0, 5), (0, 9)]
    assert sch.param_copies == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("dualpipe", 3, 8), "even number of stages"),
        (("dualpipe", 4, 7), "even number of micro-batches"),
        (("dualpipe", 8, 12), r"at least 14"),
        (("interleaved", 4, 6, 2), r"\(6\) to be a multiple of the pipeline stages \(4\)"),
        (("interleaved", 4, 8, 1), "at least 2 virtual stages"),
        (("zb1p", 4, 8, 2), "only meaningful with schedule interleaved"),
        (("1f1b", 0, 4), "stages must be >= 1"),
        (("1f1b", 4, 0), "micro-batches must be >= 1"),
        (("gpipe", 4, 8), "unknown pipeline schedule"),
    ],
)
def test_impossible_settings_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        build_schedule(*args)


@pytest.mark.parametrize(
    ("parallelism", "batch"),
    [
        ({"schedule": "dualpipe", "pipeline": 2, "data": 1}, 4),  # 1 micro-batch
        ({"schedule": "dualpipe", "pipeline": 2, "data": 1}, 12),  # 3 micro-batches
        ({"schedule": "interleaved", "virtual_stages": 2}, 12),  # 3 on 2 stages
        ({"schedule": "interleaved", "virtual_stages": 1}, 16),
        ({"schedule": "zb1p", "virtual_stages": 2}, 16),
        ({"schedule": "interleaved", "virtual_stages": 3}, 16),  # 6 pieces for 4 layers
    ],
)
def test_schema_and_engine_refuse_with_one_message(tiny_dict, parallelism, batch):
    """One rule, one message: the scenario schema and the schedule builder refuse a setting
    with the same text, the schema naming the field to blame."""
    tiny_dict["parallelism"].update(parallelism)
    tiny_dict["parallelism"]["expert"] = 4
    tiny_dict["training"]["global_batch_sequences"] = batch
    p = tiny_dict["parallelism"]
    micro = batch // (p["micro_batch_size"] * p["expert"] * p["data"])
    with pytest.raises(ScenarioError) as schema_err:
        scenario_from_dict(tiny_dict)

    def build() -> None:
        sch = build_schedule(p["schedule"], p["pipeline"], micro, p.get("virtual_stages", 1))
        sch.piece_layers(tiny_dict["model"]["layers"])

    with pytest.raises(PipelineRuleError) as engine_err:
        build()
    assert schema_err.value.path == engine_err.value.field
    assert engine_err.value.message in str(schema_err.value)


def test_held_pieces_and_replicas():
    dual = build_schedule("dualpipe", 8, 14)
    assert [dual.held_pieces(r) for r in (0, 3, 5)] == [(0, 7), (3, 4), (2, 5)]
    assert [dual.replicas(r) for r in (0, 3, 4, 7)] == [(0, 7), (3, 4), (3, 4), (0, 7)]
    inter = build_schedule("interleaved", 4, 8, 3)
    for rank, order in enumerate(inter.orders):
        ran = {piece for op in order for _, _, piece in op.halves}
        assert inter.held_pieces(rank) == tuple(sorted(ran))
        assert inter.replicas(rank) == (rank,)
    assert build_schedule("1f1b", 4, 8).held_pieces(2) == (2,)


def test_dualpipe_smallest_micro_batches():
    assert dualpipe_min_micro_batches(2) == 2
    assert dualpipe_min_micro_batches(16) == 30
    build_schedule("dualpipe", 16, 30)
    with pytest.raises(ValueError, match="dualpipe"):
        build_schedule("dualpipe", 16, 28)


def test_deadlock_is_detected():
    # Rank 0 wants the backward of micro-batch 0 before running its forward.
    orders = (
        (Op("B", 0, 0), Op("F", 0, 0)),
        (Op("F", 0, 1), Op("B", 0, 1)),
    )
    with pytest.raises(SimulationError, match="deadlock"):
        evaluate(Schedule("1f1b", 2, 1, 1, orders), 1.0, 2.0)


def test_p2p_latency_on_cross_rank_dependencies_only():
    pp, f, b, c = 4, 1.0, 2.0, 0.3
    t = evaluate(build_schedule("1f1b", pp, 1), f, b, p2p=c)
    assert t.makespan == pytest.approx(pp * (f + b) + 2 * (pp - 1) * c)
    single = evaluate(build_schedule("1f1b", 1, 5), f, b, p2p=c)
    assert single.makespan == pytest.approx(5 * (f + b))
    assert single.bubble == pytest.approx((0.0,))


def test_unit_duration_defaults_to_forward_plus_backward():
    sch = build_schedule("dualpipe", 4, 8)
    assert evaluate(sch, 1.0, 2.0, 0.5).makespan == evaluate(sch, 1.0, 2.0, 0.5, 3.0).makespan
    assert evaluate(sch, 1.0, 2.0, 0.5, 2.2).makespan < evaluate(sch, 1.0, 2.0, 0.5).makespan


def test_split_backward_prices():
    sch = build_schedule("zb1p", 1, 1)
    t = evaluate(sch, 1.0, 2.0, 0.5)
    assert t.finish[("B", 0, 0)] - t.start[("B", 0, 0)] == pytest.approx(1.5)
    assert t.finish[("W", 0, 0)] - t.start[("W", 0, 0)] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="w"):
        evaluate(sch, 1.0, 0.5, 0.8)


def test_dependencies():
    sch = build_schedule("zb1p", 4, 4)
    assert sch.dependencies(Op("F", 2, 0)) == []
    assert sch.dependencies(Op("F", 2, 3)) == [("F", 2, 2)]
    assert sch.dependencies(Op("B", 2, 3)) == [("F", 2, 3)]
    assert sch.dependencies(Op("B", 2, 1)) == [("B", 2, 2)]
    assert sch.dependencies(Op("W", 2, 1)) == [("B", 2, 1)]
    dual = build_schedule("dualpipe", 4, 8)
    unit = Op.pair(("F", 5, 2), ("B", 1, 3))
    assert dual.dependencies(unit) == [("F", 5, 1), ("F", 1, 3)]
    assert str(unit) == "F5.2+B1.3"


def test_piece_layers():
    inter = build_schedule("interleaved", 4, 8, 2)
    split = inter.piece_layers(61)
    assert len(split) == 8
    assert [i for piece in split for i in piece] == list(range(61))
    assert {len(piece) for piece in split} == {7, 8}
    assert [len(piece) for piece in split] == sorted((len(p) for p in split), reverse=True)
    dual = build_schedule("dualpipe", 16, 32).piece_layers(61)
    assert len(dual) == 16
    assert [i for piece in dual for i in piece] == list(range(61))
    with pytest.raises(ValueError, match="8 model pieces for 7 layers"):
        inter.piece_layers(7)
