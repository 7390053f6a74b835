"""Results read records without the engine, and their tables come from the records' fields."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest

from moesim.records import COLUMNS, StepResult, field_columns


def test_importing_results_does_not_import_simpy():
    code = (
        "import sys, moesim.results, moesim.results.plots, moesim.results.trace; "
        "print('simpy' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


def _result(gpus: int = 4, per_rank: int = 3, links: int = 5) -> StepResult:
    rng = np.random.default_rng(0)
    arrays = {
        f.name: rng.random(gpus)
        for f in fields(StepResult)
        if f.metadata.get("axis") == "gpu" and f.name != "gpu_stage"
    }
    return StepResult(
        step_time_s=2.0,
        gpu_stage=np.array([0, 0, 1, 1]),
        **arrays,
        expert_tokens=rng.random((gpus, per_rank)),
        expert_wait_s=rng.random((gpus, per_rank)),
        link_bytes=rng.random(links),
        link_busy_s=rng.random(links),
        stage_forward_s=rng.random(2),
        stage_backward_s=rng.random(2),
        events=7,
        exchanges=3,
        trace=[],
    )


def test_field_columns_reduce_each_field_as_its_metadata_says():
    r = _result()
    steps = field_columns(r, "steps")
    assert steps["step_time_s"] == 2.0
    assert steps["events"] == 7
    assert steps["compute_s"] == pytest.approx(r.compute_s.mean())
    assert steps["max_expert_compute_s"] == pytest.approx(r.expert_compute_s.max())
    assert "slowdown_s" not in steps  # a field without columns stays out of the tables
    gpus = field_columns(r, "gpus")
    np.testing.assert_array_equal(gpus["stage"], r.gpu_stage)
    np.testing.assert_allclose(gpus["expert_tokens"], r.expert_tokens.sum(axis=1))
    assert set(field_columns(r, "links")) == {"bytes", "busy_s"}
    assert set(field_columns(r, "experts")) == {"tokens", "mean_wait_s"}


def test_every_per_gpu_time_of_the_split_has_a_column():
    """The per-GPU split that adds up to the step (``gpu_time_s``) is in the gpus table, so a
    new cause of time cannot go missing from the tables silently."""
    per_gpu = {f.name for f in fields(StepResult) if f.metadata.get("axis") == "gpu"}
    tabled = {
        f.name for f in fields(StepResult) if any(c.table == "gpus" for c in f.metadata[COLUMNS])
    }
    assert per_gpu - tabled == {"slowdown_s", "ops_end_s"}
