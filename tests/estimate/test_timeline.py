"""The timeline integration: a pure function of the simulated steps that reads the gate's
record at each sampled step."""

from __future__ import annotations

from moesim.estimate import estimate_run, integrate, sample_steps
from moesim.scenario import scenario_from_dict


def test_segments_cover_the_run_with_midpoints():
    points, lengths = sample_steps(100, 3)
    assert sum(lengths) == 100
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert points == [s + n // 2 for s, n in zip(starts, lengths, strict=True)]
    points, lengths = sample_steps(100, 3, ramp_steps=10)
    assert lengths[0] == 10  # the ramp is a segment of its own
    assert sum(lengths) == 100


def test_integrate_reproduces_the_estimate_and_reads_coarse_gate_records(tiny_dict):
    """Integrating the estimate's own steps again gives its timeline and summary (nothing is
    filled in place); with a gate that records every k-th step, each sampled step reads the
    last record at or before it."""
    k = 4
    tiny_dict["strategies"] = tiny_dict["strategies"][:1]
    tiny_dict["gate"]["steps_per_update"] = k
    tiny_dict["output"] = {"trace": False}
    est = estimate_run(scenario_from_dict(tiny_dict))
    timeline, summary = integrate(
        est.scenario,
        est.steps,
        est.balanced,
        est.balanced_step_s,
        est.gate_records,
        est.gate_windows,
    )
    assert timeline == est.timeline
    assert summary == est.summary
    records = est.gate_records["aux_loss"]
    assert [r["step"] for r in records[:3]] == [0, k, 2 * k]
    for step, row in zip(est.steps, est.timeline, strict=True):
        assert step.gate_record is not None
        assert step.step - k < step.gate_record["step"] <= step.step
        assert row.maxvio_batch == step.gate_record["maxvio_batch"]
