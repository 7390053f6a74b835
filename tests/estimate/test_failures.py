"""Failures and checkpoint/restart: closed form against Monte Carlo, the optimal interval, the
Llama 3 defaults, determinism, and the scenario section's validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from moesim.estimate.failures import (
    daly_interval,
    expected_overhead,
    failure_estimate,
    optimal_interval,
    overhead_rate,
    simulate_failures,
    simulate_failures_many,
    young_interval,
)
from moesim.scenario.faults import Failures

HOUR = 3600.0

# (work, interval, write, restart, job MTBF), seconds.
MODERATE = (2 * 86400.0, optimal_interval(60.0, 3 * HOUR), 60.0, 600.0, 3 * HOUR)
# Segments and restarts comparable to the MTBF, and a remainder segment: far from first order.
HARSH = (20 * HOUR + 1234.0, 3000.0, 600.0, 1200.0, HOUR)


def test_llama3_default_gives_a_three_hour_job_mtbf():
    f = Failures()
    # 16,384 GPUs × 54 days / 419 unexpected interruptions (arXiv 2407.21783, Table 5).
    assert f.gpu_mtbf_hours == pytest.approx(16_384 * 54 * 24 / 419, rel=1e-12)
    assert 5.0e4 < f.gpu_mtbf_hours < 5.1e4
    job_mtbf_h = f.job_mtbf_s(16_384) / HOUR
    assert job_mtbf_h == pytest.approx(54 * 24 / 419, rel=1e-12)
    assert 2.9 < job_mtbf_h < 3.2
    # Halving the GPUs doubles the job MTBF (independent per-GPU failures).
    assert f.job_mtbf_s(8192) == pytest.approx(2 * f.job_mtbf_s(16_384))
    # Default write time: a 4 GB shard from each of 16,384 GPUs through 2 TB/s.
    assert f.checkpoint_write_s == pytest.approx(4e9 * 16_384 / 2e12)


def test_optimal_interval_minimises_expected_overhead_on_a_grid():
    for write, mtbf, restart in ((60.0, 3 * HOUR, 600.0), (900.0, HOUR, 300.0), (30.0, 1e6, 0)):
        best = optimal_interval(write, mtbf)
        grid = best * np.linspace(0.2, 5.0, 2001)
        rates = np.array([overhead_rate(t, write, restart, mtbf) for t in grid])
        best_rate = overhead_rate(best, write, restart, mtbf)
        assert best_rate <= rates.min() * (1 + 1e-12)
        assert grid[rates.argmin()] == pytest.approx(best, rel=5e-3)
        # A run of whole intervals: the total overhead is minimal there as well.
        work = 40 * best
        at_best = expected_overhead(work, best, write, restart, mtbf).overhead_s
        for factor in (0.8, 0.95, 1.05, 1.25):
            other = expected_overhead(work, best * factor, write, restart, mtbf).overhead_s
            assert other > at_best


def test_young_and_daly_approach_the_exact_optimum_when_writes_are_short():
    mtbf = HOUR
    for write in (1.0, 10.0, 60.0):
        exact = optimal_interval(write, mtbf)
        assert young_interval(write, mtbf) == pytest.approx(math.sqrt(2 * write * mtbf))
        daly_err = abs(daly_interval(write, mtbf) - exact)
        young_err = abs(young_interval(write, mtbf) - exact)
        assert daly_err < young_err
        assert daly_err / exact < 1e-3
    # Long writes: Young's estimate is far off, Daly's switches to τ = M past δ = 2M.
    assert young_interval(HOUR, HOUR) / optimal_interval(HOUR, HOUR) > 1.5
    assert daly_interval(3 * HOUR, HOUR) == HOUR


@pytest.mark.parametrize("case", [MODERATE, HARSH], ids=["moderate", "harsh"])
def test_expected_overhead_matches_monte_carlo_within_its_error(case):
    expected = expected_overhead(*case)
    runs = simulate_failures_many(*case, runs=4000, rng=np.random.default_rng(20240721))
    assert runs.checkpoint_s == pytest.approx(expected.checkpoint_s)
    for name in ("lost_s", "restart_s", "failures", "wall_s"):
        sample = np.asarray(getattr(runs, name), dtype=float)
        stderr = sample.std(ddof=1) / math.sqrt(sample.size)
        assert stderr > 0
        assert abs(sample.mean() - getattr(expected, name)) < 3 * stderr, name
    # The event-by-event wall-clock is the sum of its parts in every run.
    parts = runs.work_s + runs.checkpoint_s + runs.lost_s + runs.restart_s
    np.testing.assert_allclose(runs.wall_s, parts, rtol=1e-12)


def test_monte_carlo_comparison_rejects_a_first_order_model():
    """The comparison above has power: in the harsh case, the usual first-order estimate (each
    of W/M failures loses half a segment plus a restart) and a model whose restarts cannot fail
    are both many standard errors off."""
    work, interval, write, restart, mtbf = HARSH
    runs = simulate_failures_many(*HARSH, runs=4000, rng=np.random.default_rng(7))
    segments = math.ceil(work / interval)
    first_order = work + segments * write + work / mtbf * ((interval + write) / 2 + restart)
    stderr = runs.wall_s.std(ddof=1) / math.sqrt(runs.wall_s.size)
    assert abs(runs.wall_s.mean() - first_order) > 20 * stderr
    # It also tells apart a restart that failures cannot interrupt, (M + R)(e^{L/M} − 1).
    full, last = divmod(work, interval)
    immune = sum(
        n * (mtbf + restart) * math.expm1((w + write) / mtbf)
        for n, w in ((full, interval), (1, last))
    )
    assert abs(runs.wall_s.mean() - immune) > 10 * stderr


def test_same_seed_same_result():
    a = simulate_failures(*HARSH, rng=np.random.default_rng(3))
    b = simulate_failures(*HARSH, rng=np.random.default_rng(3))
    c = simulate_failures(*HARSH, rng=np.random.default_rng(4))
    assert a == b
    assert a != c
    many_a = simulate_failures_many(*MODERATE, runs=50, rng=np.random.default_rng(9))
    many_b = simulate_failures_many(*MODERATE, runs=50, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(many_a.wall_s, many_b.wall_s)
    np.testing.assert_array_equal(many_a.failures, many_b.failures)


def test_without_failures_the_overhead_is_checkpoint_writes_only():
    work, interval, write = 10 * HOUR + 100.0, 1800.0, 45.0
    writes = math.ceil(work / interval) * write  # 20 full intervals + the remainder's write
    for mtbf in (1e15, math.inf):
        e = expected_overhead(work, interval, write, 600.0, mtbf)
        assert e.checkpoint_s == pytest.approx(writes)
        assert e.overhead_s == pytest.approx(writes, rel=1e-9)
        assert e.failures < 1e-9
        s = simulate_failures(work, interval, write, 600.0, mtbf, np.random.default_rng(0))
        assert s.failures == 0
        assert s.wall_s == pytest.approx(work + writes)
    assert optimal_interval(write, math.inf) == math.inf
    single = expected_overhead(work, math.inf, write, 600.0, math.inf)
    assert single.overhead_s == pytest.approx(write)


def test_expected_split_of_one_segment():
    """Closed forms (module docstring (1)) on one segment, by hand."""
    tau, write, restart, mtbf = 1000.0, 100.0, 300.0, 2000.0
    e = expected_overhead(tau, tau, write, restart, mtbf)
    length = tau + write
    assert e.wall_s == pytest.approx(mtbf * math.exp(restart / mtbf) * math.expm1(length / mtbf))
    assert e.lost_s == pytest.approx(mtbf * math.expm1(length / mtbf) - length)
    assert e.failures == pytest.approx(math.expm1(length / mtbf) * math.exp(restart / mtbf))


def test_failure_estimate_charges_every_gpu_and_rounds_to_steps():
    f = Failures(enabled=True, restart_minutes=15, checkpoint_write_seconds=40)
    step, steps, gpus, price = 7.0, 200_000, 2048, 2.0
    est = failure_estimate(
        f, gpus=gpus, step_time_s=step, steps=steps, price_usd_per_gpu_hour=price
    )
    assert est.job_mtbf_s == pytest.approx(f.gpu_mtbf_s / gpus)
    assert est.optimal_interval_s == pytest.approx(optimal_interval(40.0, est.job_mtbf_s))
    assert (est.interval_s / step) == pytest.approx(round(est.interval_s / step))
    assert abs(est.interval_s - est.optimal_interval_s) <= step / 2
    direct = expected_overhead(steps * step, est.interval_s, 40.0, 900.0, est.job_mtbf_s)
    assert est.overhead == direct
    summary = est.summary()
    assert summary["failure_gpu_hours"] == pytest.approx(gpus * direct.overhead_s / HOUR)
    assert summary["failure_cost_usd"] == pytest.approx(price * gpus * direct.overhead_s / HOUR)
    split = sum(summary[f"failure_{k}_gpu_hours"] for k in ("checkpoint", "lost", "restart"))
    assert split == pytest.approx(summary["failure_gpu_hours"])
    # A fixed interval is used as given (rounded to whole steps); far from optimal, it costs more.
    fixed = Failures(
        enabled=True,
        checkpoint_interval_minutes=240,
        checkpoint_write_seconds=40,
        restart_minutes=15,
    )
    est_fixed = failure_estimate(
        fixed, gpus=gpus, step_time_s=step, steps=steps, price_usd_per_gpu_hour=price
    )
    assert est_fixed.interval_s == pytest.approx(round(240 * 60 / step) * step)
    assert est_fixed.overhead_gpu_hours > est.overhead_gpu_hours


def test_scenario_section_units_and_defaults():
    f = Failures(gpu_mtbf_hours=1000, checkpoint_interval_minutes=30, restart_minutes=5)
    assert not f.enabled
    assert f.gpu_mtbf_s == 1000 * HOUR
    assert f.checkpoint_interval_s == 1800.0
    assert f.restart_s == 300.0
    assert Failures().checkpoint_interval_s is None
    assert Failures(checkpoint_interval_minutes="optimal").checkpoint_interval_minutes == "optimal"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gpu_mtbf_hours", 0),
        ("gpu_mtbf_hours", -5),
        ("checkpoint_interval_minutes", 0),
        ("checkpoint_interval_minutes", -1.5),
        ("checkpoint_interval_minutes", "best"),
        ("checkpoint_interval_minutes", True),
        ("checkpoint_write_seconds", 0),
        ("restart_minutes", -1),
        ("monte_carlo_seeds", 10),
    ],
)
def test_scenario_section_rejects_bad_values(field, value):
    with pytest.raises(ValidationError) as info:
        Failures(**{field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_functions_reject_bad_arguments():
    with pytest.raises(ValueError, match="interval_s"):
        expected_overhead(100.0, 0.0, 1.0, 1.0, 10.0)
    with pytest.raises(ValueError, match="mtbf_s"):
        expected_overhead(100.0, 10.0, 1.0, 1.0, -1.0)
    with pytest.raises(ValueError, match="job MTBFs"):
        expected_overhead(1e6, 1e6, 1.0, 1.0, 10.0)
    with pytest.raises(ValueError, match="gpus"):
        Failures().job_mtbf_s(0)


def test_run_summary_reports_failure_overhead_apart(tiny_dict):
    """With failures on, the summary keeps the failure-free GPU-hours and adds the expected
    overhead separately; the totals are their sums."""
    from moesim.estimate import estimate_run
    from moesim.scenario import scenario_from_dict

    tiny_dict["strategies"] = tiny_dict["strategies"][:1]
    plain = estimate_run(scenario_from_dict(tiny_dict)).summary["aux_loss"]
    assert plain.failure is None
    assert plain.as_dict()["failure_gpu_hours"] is None
    assert plain.gpu_hours_with_failures == plain.gpu_hours
    # A fragile cluster: every GPU fails once an hour on average, so the job fails often.
    tiny_dict["faults"] = {"failures": {"enabled": True, "gpu_mtbf_hours": 1.0}}
    s = estimate_run(scenario_from_dict(tiny_dict)).summary["aux_loss"]
    assert s.gpu_hours == pytest.approx(plain.gpu_hours)
    assert s.failure_gpu_hours > 0
    assert s.gpu_hours_with_failures == pytest.approx(s.gpu_hours + s.failure_gpu_hours)
    assert s.cost_usd_with_failures == pytest.approx(s.cost_usd + s.failure_cost_usd)
    # The flat summary.json entry carries the failure model's scalars under its own keys.
    flat = s.as_dict()
    assert flat["failure_gpu_hours"] == s.failure_gpu_hours
    assert flat["failure_checkpoint_interval_s"] == s.failure.interval_s
