"""Hardware stragglers: seeded draws, fractions and distributions on average, explicit GPUs,
mean-1 jitter, throttled op durations against the closed form and against the work integral,
and the stationary coverage of the episode process."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moesim.cluster.stragglers import (
    HardwareState,
    JitterSource,
    Windows,
    compute_end,
    compute_multiplier,
    draw_run_state,
    draw_slow_gpus,
    draw_step_state,
    draw_windows,
    expected_group_slowdown,
    expected_link_factor,
    expected_max_jitter,
    mean_stretch,
    onset_rate,
    sample_slowdown,
    stationary_coverage,
    throttled_end,
)
from moesim.scenario.faults import (
    Faults,
    FixedSlowdown,
    LinkDegradation,
    LognormalSlowdown,
    SlowGpus,
    UniformSlowdown,
)

HOUR = 3600.0

BUSY = Faults.model_validate(
    {
        "slow_gpus": {"fraction": 0.05, "gpus": {7: 1.8}},
        "jitter": {"sigma": 0.05},
        "throttling": {"rate_per_gpu_hour": 3.0, "duration_seconds": 20.0, "slowdown": 2.5},
        "degraded_links": {
            "nic": {"fraction": 0.1, "bandwidth_factor": 0.5},
            "nvlink": {"episodes": {"rate_per_gpu_hour": 6.0}, "bandwidth_factor": 0.25},
        },
    }
)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _state(gpus: int, windows: Windows) -> HardwareState:
    ones = np.ones(gpus)
    empty = Windows.empty(gpus)
    return HardwareState(ones, ones, ones, windows, empty, empty, horizon_s=100.0)


def _accrued(t0: float, t1: float, windows: list[tuple[float, float, float]]) -> float:
    """Work done on [t0, t1): full rate outside windows, 1/f inside (independent of the code)."""
    done = t1 - t0
    for a, b, f in windows:
        overlap = max(0.0, min(b, t1) - max(a, t0))
        done -= overlap * (1 - 1 / f)
    return done


# --------------------------------------------------------------------------- off by default


def test_default_faults_give_a_healthy_state():
    run = draw_run_state(Faults(), 64, _rng(0))
    step = draw_step_state(Faults(), run, 64, 10.0, _rng(1))
    assert run.is_healthy
    assert step.is_healthy
    assert len(step.nic_windows) == len(step.nvlink_windows) == 0
    start = np.linspace(0, 5, 64)
    np.testing.assert_array_equal(compute_end(step, slice(0, 64), start, 0.01), start + 0.01)


# --------------------------------------------------------------------------- determinism


def test_draws_are_deterministic_per_seed():
    a = draw_run_state(BUSY, 512, _rng(42))
    b = draw_run_state(BUSY, 512, _rng(42))
    c = draw_run_state(BUSY, 512, _rng(43))
    np.testing.assert_array_equal(a.gpu_speed, b.gpu_speed)
    np.testing.assert_array_equal(a.nic_factor, b.nic_factor)
    assert not np.array_equal(a.gpu_speed, c.gpu_speed)
    sa = draw_step_state(BUSY, a, 512, 30.0, _rng(7))
    sb = draw_step_state(BUSY, b, 512, 30.0, _rng(7))
    sc = draw_step_state(BUSY, a, 512, 30.0, _rng(8))
    for name in ("gpu", "start_s", "end_s", "factor"):
        np.testing.assert_array_equal(getattr(sa.throttle, name), getattr(sb.throttle, name))
    np.testing.assert_array_equal(sa.nvlink_factor, sb.nvlink_factor)
    assert not np.array_equal(sa.throttle.start_s, sc.throttle.start_s)
    ja, jb = JitterSource(0.1, _rng(5)), JitterSource(0.1, _rng(5))
    np.testing.assert_array_equal(np.concatenate([ja(100) for _ in range(50)]), jb(5000))


def test_effects_draw_from_independent_streams():
    """Switching one effect on does not move another's draws (common random numbers)."""
    only_slow = Faults.model_validate({"slow_gpus": {"fraction": 0.05}})
    both = Faults.model_validate(
        {"slow_gpus": {"fraction": 0.05}, "degraded_links": {"nic": {"fraction": 0.3}}}
    )
    a = draw_run_state(only_slow, 1024, _rng(3))
    b = draw_run_state(both, 1024, _rng(3))
    np.testing.assert_array_equal(a.gpu_speed, b.gpu_speed)
    assert np.all(a.nic_factor == 1)
    assert np.any(b.nic_factor < 1)
    # A larger fraction under the same seed keeps the slow GPUs of a smaller one, same factors.
    small = draw_slow_gpus(SlowGpus(fraction=0.02), 4096, _rng(9))
    large = draw_slow_gpus(SlowGpus(fraction=0.10), 4096, _rng(9))
    was_slow = small > 1
    assert was_slow.sum() > 40
    np.testing.assert_array_equal(large[was_slow], small[was_slow])
    assert (large > 1).sum() > 3 * was_slow.sum()


# --------------------------------------------------------------------------- persistent parts


def test_slow_gpu_fraction_is_right_on_average():
    p, gpus, seeds = 0.03, 2048, 60
    spec = Faults.model_validate({"slow_gpus": {"fraction": p}})
    fractions = [np.mean(draw_run_state(spec, gpus, _rng(s)).gpu_speed > 1) for s in range(seeds)]
    se = math.sqrt(p * (1 - p) / (gpus * seeds))
    assert abs(np.mean(fractions) - p) < 4 * se
    # Per-run counts vary (independent parts), they are not a fixed rounded count.
    assert np.std(fractions) > 0


def test_degraded_port_fraction_and_expected_factor():
    spec = LinkDegradation(fraction=0.2, bandwidth_factor=0.4)
    faults = Faults(degraded_links={"nic": spec})
    draws = np.concatenate([draw_run_state(faults, 1024, _rng(s)).nic_factor for s in range(20)])
    assert set(np.unique(draws)) == {0.4, 1.0}
    p_hat = np.mean(draws < 1)
    assert abs(p_hat - 0.2) < 4 * math.sqrt(0.2 * 0.8 / draws.size)
    assert np.mean(draws) == pytest.approx(expected_link_factor(spec), abs=4 * 0.6 * 0.0028)


def test_explicit_gpus_are_honoured():
    faults = Faults.model_validate(
        {
            "slow_gpus": {"gpus": {3: 2.0, 60: 1.25}},
            "degraded_links": {"nic": {"gpus": {5: 0.3}}, "nvlink": {"gpus": {0: 0.7}}},
        }
    )
    st = draw_run_state(faults, 64, _rng(0))
    expected = np.ones(64)
    expected[[3, 60]] = [2.0, 1.25]
    np.testing.assert_array_equal(st.gpu_speed, expected)
    assert st.nic_factor[5] == 0.3
    assert np.count_nonzero(st.nic_factor != 1) == 1
    assert st.nvlink_factor[0] == 0.7
    assert np.count_nonzero(st.nvlink_factor != 1) == 1
    # With every GPU slow, the listed factor still overrides the drawn one.
    all_slow = Faults.model_validate(
        {"slow_gpus": {"fraction": 1.0, "slowdown": 1.5, "gpus": {3: 3.0}}}
    )
    speed = draw_run_state(all_slow, 8, _rng(0)).gpu_speed
    np.testing.assert_array_equal(speed, [1.5, 1.5, 1.5, 3.0, 1.5, 1.5, 1.5, 1.5])


def test_explicit_gpu_beyond_the_cluster_is_refused():
    faults = Faults.model_validate({"slow_gpus": {"gpus": {64: 1.5}}})
    with pytest.raises(ValueError, match=r"faults\.slow_gpus\.gpus: GPU 64 beyond the 64 GPUs"):
        draw_run_state(faults, 64, _rng(0))


@pytest.mark.parametrize(
    "dist",
    [
        FixedSlowdown(factor=1.4),
        UniformSlowdown(low=1.1, high=1.5),
        LognormalSlowdown(median=1.3, sigma=0.4),
    ],
    ids=["fixed", "uniform", "lognormal"],
)
def test_slowdown_distributions(dist):
    x = sample_slowdown(dist, 200_000, _rng(1))
    assert x.min() >= 1
    if isinstance(dist, FixedSlowdown):
        assert np.all(x == 1.4)
    elif isinstance(dist, UniformSlowdown):
        assert x.min() >= 1.1
        assert x.max() <= 1.5
        assert np.mean(x) == pytest.approx(1.3, abs=4 * 0.4 / math.sqrt(12 * x.size))
    else:
        assert np.median(x) == pytest.approx(1.3, abs=0.003)
        # The excess over 1 is lognormal with log-sigma 0.4.
        assert np.std(np.log(x - 1)) == pytest.approx(0.4, rel=0.01)


@pytest.mark.parametrize(
    "dist",
    [
        FixedSlowdown(factor=1.4),
        UniformSlowdown(low=1.1, high=1.5),
        LognormalSlowdown(median=1.2, sigma=0.5),
        LognormalSlowdown(median=1.2, sigma=0.01),
    ],
    ids=["fixed", "uniform", "lognormal", "narrow-lognormal"],
)
@pytest.mark.parametrize("group", [1, 16])
def test_expected_group_slowdown_matches_monte_carlo(dist, group):
    spec = SlowGpus(fraction=0.04, slowdown=dist)
    runs = 40_000
    worst = draw_slow_gpus(spec, runs * group, _rng(2)).reshape(runs, group).max(axis=1)
    se = worst.std() / math.sqrt(runs)
    assert abs(worst.mean() - expected_group_slowdown(spec, group)) < 4 * se + 1e-9
    assert expected_group_slowdown(SlowGpus(fraction=0.0, slowdown=dist), group) == 1.0


def test_group_slowdown_closed_form_for_a_fixed_factor():
    # 1 − (1 − p)^n of 8-GPU groups hold a slow GPU; each such group runs at the slow speed.
    spec = SlowGpus(fraction=0.1, slowdown=2.0)
    assert expected_group_slowdown(spec, 8) == pytest.approx(1 + (1 - 0.9**8))


# --------------------------------------------------------------------------- jitter


def test_jitter_has_mean_one_and_the_right_sigma():
    sigma = 0.2
    jitter = JitterSource(sigma, _rng(11), block=10_000)
    x = np.concatenate([jitter(128) for _ in range(4000)])
    assert np.mean(x) == pytest.approx(1.0, abs=4 * x.std() / math.sqrt(x.size))
    assert np.std(np.log(x)) == pytest.approx(sigma, rel=0.01)
    # Mean 1 puts the median at exp(−σ²/2), below 1.
    assert np.median(x) == pytest.approx(math.exp(-(sigma**2) / 2), abs=0.002)


def test_jitter_stream_does_not_depend_on_block_or_request_sizes():
    sizes = [3, 128, 1, 500, 77, 128, 2000, 5]
    streams = []
    for block in (7, 100, 1 << 16):
        source = JitterSource(0.1, _rng(4), block=block)
        streams.append(np.concatenate([source(n).copy() for n in sizes]))
    reference = np.exp(0.1 * _rng(4).standard_normal(sum(sizes)) - 0.005)
    for s in streams:
        np.testing.assert_allclose(s, reference, rtol=1e-14)


def test_jitter_views_are_read_only_and_survive_refills():
    source = JitterSource(0.3, _rng(0), block=16)
    first = source(10)
    kept = first.copy()
    for _ in range(20):
        source(15)  # many refills
    np.testing.assert_array_equal(first, kept)
    with pytest.raises(ValueError, match="read-only"):
        first[0] = 2.0


def test_zero_jitter_is_ones_and_leaves_the_rng_alone():
    rng = _rng(0)
    before = rng.bit_generator.state
    source = JitterSource(0.0, rng, block=8)
    for n in (3, 8, 20, 1):
        np.testing.assert_array_equal(source(n), np.ones(n))
    assert rng.bit_generator.state == before


@pytest.mark.parametrize(("group", "sigma"), [(1, 0.3), (8, 0.05), (128, 0.1)])
def test_expected_max_jitter_matches_monte_carlo(group, sigma):
    source = JitterSource(sigma, _rng(6))
    worst = np.array([source(group).max() for _ in range(20_000)])
    se = worst.std() / math.sqrt(worst.size)
    assert abs(worst.mean() - expected_max_jitter(group, sigma)) < 4 * se
    if group == 1:
        assert expected_max_jitter(1, sigma) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- throttling


def test_throttled_end_closed_form_by_hand():
    # Window [1, 2) at factor 2: half speed inside.
    assert throttled_end(0.0, 0.5, 1.0, 2.0, 2.0) == pytest.approx(0.5)  # ends before
    assert throttled_end(2.0, 0.5, 1.0, 2.0, 2.0) == pytest.approx(2.5)  # starts after
    # 0.5 s of work before the window, the other 0.5 s at half speed takes 1 s.
    assert throttled_end(0.5, 1.0, 1.0, 2.0, 2.0) == pytest.approx(2.0)
    # Inside the window the whole way: twice as long.
    assert throttled_end(1.2, 0.3, 1.0, 2.0, 2.0) == pytest.approx(1.8)
    # Straddles the whole window: 0.5 before, 0.5 of work in the 1 s window, 1.0 after.
    assert throttled_end(0.5, 2.0, 1.0, 2.0, 2.0) == pytest.approx(3.0)
    # Starts inside, leaves: 0.4 s of window left holds 0.2 of work, 0.8 remains.
    assert throttled_end(1.6, 1.0, 1.0, 2.0, 2.0) == pytest.approx(2.8)


def test_compute_end_matches_the_closed_form_for_one_window():
    gpus = 16
    w = Windows(gpus, [5], [1.0], [4.0], [3.0])
    state = _state(gpus, w)
    rng = _rng(0)
    start = rng.uniform(0, 6, 500)
    work = rng.uniform(0, 3, 500)
    got = np.array([compute_end(state, 5, s, x) for s, x in zip(start, work, strict=True)])
    np.testing.assert_allclose(got, throttled_end(start, work, 1.0, 4.0, 3.0), rtol=1e-12)
    # GPUs without windows are untouched.
    np.testing.assert_array_equal(compute_end(state, 4, start, work), start + work)


def test_compute_end_solves_the_work_integral_through_many_windows():
    gpus = 8
    windows = {2: [(0.0, 0.3, 2.0), (0.5, 0.9, 4.0), (1.0, 3.0, 1.5)], 6: [(0.2, 0.25, 10.0)]}
    rows = [(g, a, b, f) for g, ws in windows.items() for a, b, f in ws]
    g, a, b, f = (np.array(c) for c in zip(*rows, strict=True))
    state = _state(gpus, Windows(gpus, g[::-1], a[::-1], b[::-1], f[::-1]))  # any order
    starts, ends, factors = state.throttle.of(2)
    np.testing.assert_array_equal(starts, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(factors, [2.0, 4.0, 1.5])
    assert state.throttle.of(6)[1].tolist() == [0.25]
    assert state.throttle.of(0)[0].size == 0
    rng = _rng(1)
    for _ in range(300):
        start = rng.uniform(0, 2, gpus)
        work = rng.uniform(0, 1.5, gpus)
        end = compute_end(state, slice(0, gpus), start, work)
        for gpu in range(gpus):
            ws = windows.get(gpu, [])
            assert _accrued(start[gpu], end[gpu], ws) == pytest.approx(work[gpu], abs=1e-12)
            # The op takes at least its work and at most its work at the worst factor.
            worst = max([f for _, _, f in ws], default=1.0)
            assert work[gpu] - 1e-12 <= end[gpu] - start[gpu] <= worst * work[gpu] + 1e-12


def test_compute_end_index_forms_agree():
    gpus = 32
    state = _state(gpus, Windows(gpus, [3, 3, 20], [0.0, 2.0, 0.5], [1.0, 3.0, 1.5], [2, 3, 4]))
    start = np.linspace(0, 2.5, gpus)
    work = np.full(gpus, 0.7)
    full = compute_end(state, slice(None), start, work)
    np.testing.assert_array_equal(compute_end(state, np.arange(gpus), start, work), full)
    np.testing.assert_array_equal(
        compute_end(state, slice(16, 32), start[16:], work[16:]), full[16:]
    )
    np.testing.assert_array_equal(compute_end(state, slice(1, 32, 2), start[1::2], 0.7), full[1::2])
    idx = np.array([20, 3, 4])
    np.testing.assert_array_equal(compute_end(state, idx, start[idx], work[idx]), full[idx])
    assert compute_end(state, 3, start[3], 0.7) == full[3]
    # A scalar start over a slice broadcasts to every GPU of the slice.
    one = compute_end(state, slice(0, 8), 0.5, 0.7)
    assert one.shape == (8,)
    assert one[3] == pytest.approx(throttled_end(0.5, 0.7, 0.0, 1.0, 2.0))
    assert one[0] == pytest.approx(1.2)
    # The inputs are not modified.
    np.testing.assert_array_equal(start, np.linspace(0, 2.5, gpus))


def test_compute_multiplier():
    gpus = 4
    state = _state(gpus, Windows(gpus, [1], [10.0], [20.0], [2.5]))
    m = compute_multiplier(state, slice(0, 4), 12.0, np.array([1.0, 1.0, 0.0, 1.0]))
    np.testing.assert_allclose(m, [1.0, 2.5, 1.0, 1.0])
    # Half the op's span before the window: (0.5 + 2.5 × 0.5) / 1.
    assert compute_multiplier(state, 1, 9.5, 1.0) == pytest.approx(1.75)


def test_windows_reject_bad_input():
    with pytest.raises(ValueError, match="overlap"):
        Windows(4, [1, 1], [0.0, 0.5], [1.0, 2.0], [2.0, 2.0])
    with pytest.raises(ValueError, match="end_s > start_s"):
        Windows(4, [1], [1.0], [1.0], [2.0])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        Windows(4, [4], [0.0], [1.0], [2.0])
    with pytest.raises(ValueError, match="gpu_speed"):
        HardwareState(np.full(4, 0.9), np.ones(4), np.ones(4), *[Windows.empty(4)] * 3)
    with pytest.raises(ValueError, match="nic_factor"):
        HardwareState(np.ones(4), np.full(4, 1.1), np.ones(4), *[Windows.empty(4)] * 3)
    st = HardwareState.healthy(4)
    with pytest.raises(ValueError, match="read-only"):
        st.gpu_speed[0] = 3.0


# --------------------------------------------------------------------------- episode process


def test_episode_process_closed_forms():
    r, d = 2.0 / HOUR, 90.0
    assert stationary_coverage(r, d) == pytest.approx(0.05)
    lam = onset_rate(r, d)
    # Mean cycle: a healthy gap 1/λ plus an episode d, one episode per cycle at rate r.
    assert 1 / lam + d == pytest.approx(1 / r)
    assert mean_stretch(0.05, 3.0) == pytest.approx(1.1)


def test_episodes_have_the_stationary_coverage():
    r, d, gpus, horizon = 30.0 / HOUR, 60.0, 40_000, 600.0
    c = stationary_coverage(r, d)  # 0.5
    w = draw_windows(r, d, 2.0, gpus, horizon, _rng(12))
    se = math.sqrt(c * (1 - c) / gpus)
    for t in (0.0, 1.0, 0.5 * horizon, horizon - 1e-9):
        inside = np.mean(w.factor_at(t) > 1)
        assert abs(inside - c) < 4 * se, t
    assert np.mean(w.covered_s(0.0, horizon)) / horizon == pytest.approx(c, abs=0.01)
    # Episodes under way at t = 0 have a residual uniform on [0, d): mean d / 2.
    ongoing = (w.start_s == 0) & (w.end_s < d)
    assert np.mean(w.end_s[ongoing]) == pytest.approx(d / 2, rel=0.02)
    # Onsets inside the horizon at the long-run rate r.
    onsets = np.count_nonzero(w.start_s > 0) / gpus
    assert onsets == pytest.approx(r * horizon, rel=0.02)
    # Windows of one GPU never overlap and each lasts d, but for the residual one.
    started = w.start_s > 0
    np.testing.assert_allclose(w.end_s[started] - w.start_s[started], d)
    same = w.gpu[1:] == w.gpu[:-1]
    assert np.all(w.start_s[1:][same] >= w.end_s[:-1][same])


def test_rare_episodes_coverage_over_many_draws():
    # A realistic rate: coverage rd = 0.1/h × 60 s ≈ 0.17%, checked over many step draws.
    r, d, gpus, horizon = 0.1 / HOUR, 60.0, 2048, 20.0
    c = stationary_coverage(r, d)
    covered = [
        np.sum(draw_windows(r, d, 2.0, gpus, horizon, _rng(s)).covered_s(0.0, horizon))
        for s in range(200)
    ]
    frac = np.mean(covered) / (gpus * horizon)
    assert frac == pytest.approx(c, rel=0.15)


def test_short_ops_are_stretched_by_the_mean_stretch():
    faults = Faults.model_validate(
        {"throttling": {"rate_per_gpu_hour": 36.0, "duration_seconds": 20.0, "slowdown": 3.0}}
    )
    gpus, horizon = 20_000, 100.0
    run = draw_run_state(faults, gpus, _rng(0))
    step = draw_step_state(faults, run, gpus, horizon, _rng(1))
    assert np.all(step.throttle.factor == 3.0)
    start = _rng(2).uniform(0, horizon - 1, gpus)
    m = compute_multiplier(step, slice(None), start, 1e-3)
    c = faults.throttling.coverage  # 0.2
    se = 2.0 * math.sqrt(c * (1 - c) / gpus)
    assert abs(np.mean(m) - mean_stretch(c, 3.0)) < 4 * se


def test_step_state_combines_persistent_and_episodic_parts():
    gpus, horizon = 4096, 50.0
    run = draw_run_state(BUSY, gpus, _rng(0))
    step = draw_step_state(BUSY, run, gpus, horizon, _rng(1))
    assert step.gpu_speed is run.gpu_speed or np.array_equal(step.gpu_speed, run.gpu_speed)
    assert step.gpu_speed[7] == 1.8
    assert step.horizon_s == horizon
    # NIC: persistent only; NVLink: episodic only, averaged over the horizon.
    np.testing.assert_array_equal(step.nic_factor, run.nic_factor)
    assert len(step.nic_windows) == 0
    np.testing.assert_allclose(step.nvlink_factor, step.nvlink_windows.mean_factor(0, horizon))
    assert np.all(step.nvlink_windows.factor == 0.25)
    assert np.mean(step.nvlink_factor) == pytest.approx(
        expected_link_factor(BUSY.degraded_links.nvlink), abs=0.004
    )
    # Averaging over a shorter span (the step) uses that span.
    short = draw_step_state(BUSY, run, gpus, horizon, _rng(1), link_average_s=5.0)
    np.testing.assert_allclose(short.nvlink_factor, short.nvlink_windows.mean_factor(0, 5.0))
    np.testing.assert_array_equal(short.nvlink_windows.start_s, step.nvlink_windows.start_s)
    with pytest.raises(ValueError, match="run state is for"):
        draw_step_state(BUSY, run, gpus // 2, horizon, _rng(1))


def test_a_slow_gpu_is_the_straggler_of_its_group():
    """Per-GPU effects: one slow GPU makes its group's synchronised op as slow as itself."""
    faults = Faults.model_validate({"slow_gpus": {"gpus": {5: 1.6}}})
    run = draw_run_state(faults, 16, _rng(0))
    step = draw_step_state(faults, run, 16, 1.0, _rng(1))
    work = 0.01 * step.gpu_speed[0:8]
    end = compute_end(step, slice(0, 8), 0.0, work)
    assert int(np.argmax(end)) == 5
    assert end.max() == pytest.approx(0.016)
    assert np.all(compute_end(step, slice(8, 16), 0.0, 0.01 * step.gpu_speed[8:16]) == 0.01)
