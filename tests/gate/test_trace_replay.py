"""Trace replay: loading and validating recorded expert loads, and turning a step of them into
the engine's routing sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moesim.errors import ScenarioError
from moesim.gate.trace import (
    load_trace,
    rescale_loads,
    scenario_trace,
    split_loads,
    trace_sample,
    trace_samples,
)

HEADER = "step,layer,expert,tokens\n"


def _write(tmp_path: Path, body: str, name: str = "trace.csv") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + body)
    return path


def _frame(steps: list[int], n_layers: int, n_experts: int, seed: int = 0) -> pd.DataFrame:
    """A dense trace with Zipf-like skew, one row per (step, layer, expert)."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in steps:
        for layer in range(n_layers):
            weights = rng.permutation(1.0 / np.arange(1, n_experts + 1))
            loads = rng.multinomial(10_000, weights / weights.sum())
            rows += [(step, layer, e, int(t)) for e, t in enumerate(loads)]
    return pd.DataFrame(rows, columns=["step", "layer", "expert", "tokens"])


def _error(path: Path, **kwargs: int) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        load_trace(path, n_experts=kwargs.get("n_experts", 4), n_layers=kwargs.get("n_layers", 1))
    assert info.value.path == str(path)
    return info.value


def test_load_csv_sparse_rows_and_nearest_step(tmp_path: Path) -> None:
    path = _write(tmp_path, "10,0,1,5\n10,0,3,7\n0,0,0,4\n30,0,2,1\n", "t.csv")
    trace = load_trace(path, n_experts=4, n_layers=1)
    np.testing.assert_array_equal(trace.steps, [0, 10, 30])
    np.testing.assert_array_equal(trace.loads[:, 0], [[4, 0, 0, 0], [0, 5, 0, 7], [0, 0, 1, 0]])
    assert trace.recorded_step(4) == 0
    assert trace.recorded_step(5) == 0  # a tie goes to the earlier step
    assert trace.recorded_step(6) == 10
    assert trace.recorded_step(1000) == 30
    np.testing.assert_array_equal(trace.loads_at(27), [[0, 0, 1, 0]])


def test_load_parquet_with_extra_columns(tmp_path: Path) -> None:
    frame = _frame([0, 5], 2, 8)
    frame["rank"] = 0
    frame.to_parquet(tmp_path / "t.parquet")
    trace = load_trace(tmp_path / "t.parquet", n_experts=8, n_layers=2)
    assert trace.loads.shape == (2, 2, 8)
    assert trace.loads.sum() == 4 * 10_000
    # Float columns holding whole numbers are fine.
    frame["tokens"] = frame["tokens"].astype(float)
    frame.to_parquet(tmp_path / "f.pq")
    np.testing.assert_array_equal(
        load_trace(tmp_path / "f.pq", n_experts=8, n_layers=2).loads, trace.loads
    )


def test_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("step,layer,expert,count\n0,0,0,5\n")
    err = _error(path)
    assert "missing column(s) 'tokens'" in err.message
    assert "count" in err.message


@pytest.mark.parametrize(
    ("body", "row", "column", "what"),
    [
        ("0,0,0,5\n0,0,4,1\n", "row 2 (line 3)", "expert", "outside 0..3"),
        ("0,0,-1,5\n", "row 1 (line 2)", "expert", "outside 0..3"),
        ("0,0,0,5\n0,0,1,-2\n", "row 2 (line 3)", "tokens", "negative"),
        ("0,0,0,5\n0,0,1,2.5\n", "row 2 (line 3)", "tokens", "not an integer"),
        ("0,0,0,abc\n", "row 1 (line 2)", "tokens", "not an integer"),
        ("0,0,0,5\n0,1,1,3\n", "row 2 (line 3)", "layer", "outside 0..0"),
        ("-1,0,0,5\n", "row 1 (line 2)", "step", "negative"),
        ("0,0,0,5\n0,0,1,\n", "row 2 (line 3)", "tokens", "not an integer"),
        ("0,0,0,5\n0,0,1,3\n0,0,0,2\n", "row 3 (line 4)", "expert", "repeats row 1"),
    ],
)
def test_bad_rows_name_the_row_and_column(
    tmp_path: Path, body: str, row: str, column: str, what: str
) -> None:
    err = _error(_write(tmp_path, body))
    assert row in err.message
    assert f"column {column!r}" in err.message
    assert what in err.message


def test_parquet_rows_are_numbered_without_lines(tmp_path: Path) -> None:
    frame = pd.DataFrame({"step": [0, 0], "layer": [0, 0], "expert": [0, 9], "tokens": [1, 2]})
    frame.to_parquet(tmp_path / "t.parquet")
    err = _error(tmp_path / "t.parquet")
    assert "row 2, column 'expert': 9 is outside 0..3" in err.message


def test_whole_file_problems(tmp_path: Path) -> None:
    assert "no rows for layer 1" in _error(_write(tmp_path, "0,0,0,5\n"), n_layers=2).message
    assert "no tokens" in _error(_write(tmp_path, "0,0,0,0\n")).message
    assert "no data rows" in _error(_write(tmp_path, "")).message
    assert "no such trace file" in _error(tmp_path / "missing.csv").message
    (tmp_path / "t.json").write_text("{}")
    assert "suffix" in _error(tmp_path / "t.json").message
    (tmp_path / "bad.parquet").write_text("not parquet")
    assert "cannot read" in _error(tmp_path / "bad.parquet").message


def test_rescale_and_split() -> None:
    loads = np.array([[50, 30, 20, 0], [1, 1, 1, 1]])
    scaled = rescale_loads(loads, 7)
    np.testing.assert_array_equal(scaled.sum(axis=1), [7, 7])
    np.testing.assert_array_equal(scaled[0], [4, 2, 1, 0])  # 3.5, 2.1, 1.4: remainder to 3.5
    np.testing.assert_array_equal(rescale_loads(loads, 100)[0], loads[0])
    with pytest.raises(ValueError, match="without load"):
        rescale_loads([[0, 0]], 4)
    c = np.array([7, 5, 0, 12])
    even = split_loads(c, 5, "even")
    np.testing.assert_array_equal(even.sum(axis=0), c)
    assert np.ptp(even, axis=0).max() <= 1
    np.testing.assert_array_equal(even.sum(axis=1), [5, 5, 5, 5, 4])
    random = split_loads(c, 5, "multinomial", np.random.default_rng(0))
    np.testing.assert_array_equal(random.sum(axis=0), c)
    np.testing.assert_array_equal(random.sum(axis=1), [5, 5, 5, 5, 4])
    assert np.ptp(random, axis=0).max() > 1
    with pytest.raises(ValueError, match="split"):
        split_loads(c, 5, "round")


@pytest.fixture
def traced(make_scenario, tmp_path: Path):
    """The gate tests' base scenario (16 experts, top-2, EP 8, 8 micro-batches) with a trace."""
    _frame([0, 100, 200], 2, 16).to_csv(tmp_path / "loads.csv", index=False)
    return make_scenario(
        model={"seq_len": 256},
        gate={"layers_simulated": 2, "trace": {"path": str(tmp_path / "loads.csv")}},
    )


@pytest.mark.parametrize("split", ["multinomial", "even"])
def test_trace_sample_shapes_totals_and_proportions(traced, split: str) -> None:
    trace = scenario_trace(traced)
    sample = trace_sample(traced, trace, 90, 8, 8, np.random.default_rng(0), split=split)
    tokens, k = traced.model.seq_len, traced.model.moe.top_k
    assert sample.counts.shape == (2, traced.micro_batches, 8, 16)
    assert sample.counts.dtype == sample.dest_tokens.dtype == np.int64
    np.testing.assert_array_equal(sample.counts.sum(axis=3), k * tokens)
    assert not sample.dropped.any()
    assert sample.metrics["trace_step"] == 100.0
    # Per layer, the step's loads rescaled to the scenario's batch, summed over cells.
    total = k * tokens * traced.micro_batches * 8
    np.testing.assert_array_equal(
        sample.counts.sum(axis=(1, 2)), rescale_loads(trace.loads_at(100), total)
    )
    # Dispatch bounds of a rank with a assignments: ceil(a / min(k, 2)) ≤ dest ≤ min(T, a).
    per_rank = sample.counts.reshape(2, -1, 8, 8, 2).sum(axis=4)
    assert (sample.dest_tokens <= np.minimum(per_rank, tokens)).all()
    assert (sample.dest_tokens * 2 >= per_rank).all()
    assert sample.metrics["maxvio_batch"] > 0.5  # the Zipf skew is there
    assert sample.metrics["nodes_per_token"] == 1.0


def test_trace_sample_without_rescale_keeps_raw_counts(traced) -> None:
    trace = scenario_trace(traced)
    sample = trace_sample(traced, trace, 0, 8, 8, np.random.default_rng(0), rescale=False)
    np.testing.assert_array_equal(sample.counts.sum(axis=(1, 2)), trace.loads_at(0))


def test_balanced_trace_reproduces_the_balanced_dispatch(make_scenario, tmp_path: Path) -> None:
    from moesim.gate.sampling import balanced_sample

    rows = [(0, 0, e, 1000) for e in range(16)]
    pd.DataFrame(rows, columns=["step", "layer", "expert", "tokens"]).to_csv(
        tmp_path / "flat.csv", index=False
    )
    scenario = make_scenario(
        model={"seq_len": 256},
        gate={
            "layers_simulated": 1,
            "trace": {"path": str(tmp_path / "flat.csv"), "split": "even"},
        },
    )
    sample = trace_samples(scenario, [0], 8, 8, np.random.default_rng(0))[0]
    reference = balanced_sample(scenario, 0, 8, 8)
    np.testing.assert_array_equal(sample.counts, reference.counts)
    np.testing.assert_array_equal(sample.dest_tokens, reference.dest_tokens)
    assert sample.metrics["maxvio_batch"] == 0.0


def test_trace_must_match_the_scenario(traced, make_scenario) -> None:
    trace = scenario_trace(traced)
    three = make_scenario(model={"seq_len": 256}, gate={"layers_simulated": 3})
    with pytest.raises(ValueError, match="trace"):
        trace_sample(three, trace, 0, 8, 8, np.random.default_rng(0))
    with pytest.raises(ScenarioError, match="no trace"):
        scenario_trace(three)


def test_trace_sample_drives_the_engine(traced) -> None:
    from moesim.engine.step import build_context, simulate_step
    from moesim.gate.sampling import gate_layer_map

    ctx = build_context(traced)
    lay = ctx.layout
    sample = trace_samples(traced, [100], lay.gpus_per_stage, lay.expert, np.random.default_rng(0))[
        0
    ]
    result = simulate_step(ctx, sample.counts, sample.dest_tokens)
    # Token conservation: each MoE layer's expert processes every assignment the trace routed
    # to it in the simulated layer that layer maps to.
    routed = sample.counts[gate_layer_map(traced)].sum(axis=(0, 1, 2))
    processed = np.zeros(routed.shape)
    np.add.at(
        processed, lay.expert_slots(lay.experts_per_rank).ravel(), result.expert_tokens.ravel()
    )
    np.testing.assert_array_equal(processed, routed)
    # Time conservation: every GPU's time split adds up to the step.
    np.testing.assert_allclose(result.gpu_time_s, result.step_time_s, rtol=1e-12)
