"""Every shipped scenario runs end to end at smoke size (a few optimizer steps, one sampled
point), so a scenario file can never rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesim.estimate import estimate_run, run_names
from moesim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))


def smoke(scenario):  # type: ignore[no-untyped-def]
    """The scenario with its run cut to 4 optimizer steps, one sampled point, a small gate."""
    return scenario.model_copy(
        update={
            "training": scenario.training.model_copy(
                update={"total_tokens": 4.0 * scenario.tokens_per_step, "sample_points": 1}
            ),
            "gate": scenario.gate.model_copy(
                update={"batch_sequences": 16, "tokens_per_sequence": 16, "layers_simulated": 1}
            ),
            "output": scenario.output.model_copy(update={"trace": False}),
        }
    )


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_runs_at_smoke_size(path):
    scenario = smoke(load_scenario(path))
    estimate = estimate_run(scenario)
    assert set(estimate.summary) == set(run_names(scenario))
    for values in estimate.summary.values():
        assert values.step_time_s >= values.balanced_step_time_s > 0
        assert 0 < values.mfu < 1
