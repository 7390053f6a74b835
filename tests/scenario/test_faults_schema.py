"""The hardware-straggler part of the ``faults`` section: defaults (off, with sourced shapes),
parsing of the slowdown distributions, validation messages naming the field, the GPU-count
cross-check, and a round trip through the resolved YAML."""

from __future__ import annotations

from typing import Any

import pytest

from moesim.errors import ScenarioError
from moesim.scenario import dump_scenario, scenario_from_dict
from moesim.scenario.faults import (
    Episodes,
    Faults,
    FixedSlowdown,
    LinkDegradation,
    LognormalSlowdown,
    SlowGpus,
    Throttling,
    UniformSlowdown,
    check_faults,
)
from moesim.scenario.loader import load_scenario


def _faults(tiny_dict: dict[str, Any], section: dict[str, Any]) -> Faults:
    tiny_dict["faults"] = section
    return scenario_from_dict(tiny_dict).faults


def _error(tiny_dict: dict[str, Any], section: dict[str, Any]) -> ScenarioError:
    tiny_dict["faults"] = section
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(tiny_dict)
    return info.value


def test_everything_is_off_by_default(tiny_scenario):
    f = tiny_scenario.faults
    assert not f.hardware_active
    for effect in (f.slow_gpus, f.jitter, f.throttling, f.degraded_links.nic):
        assert not effect.active
    assert not f.degraded_links.nvlink.active
    assert f.slow_gpus.fraction == 0
    assert f.slow_gpus.gpus == {}
    assert f.jitter.sigma == 0
    assert f.throttling.rate_per_gpu_hour == 0
    assert f.degraded_links.nic.fraction == 0
    assert f.degraded_links.nic.episodes.coverage == 0


def test_defaults_once_switched_on_follow_their_sources():
    slow = SlowGpus(fraction=0.01)
    # Sinha et al. (SC22): outliers up to 1.5× the median GPU; 1.1 is the assumed lower edge.
    assert slow.slowdown == UniformSlowdown(low=1.1, high=1.5)
    # NVML: hardware slowdown cuts the clocks by a factor of 2 or more.
    thr = Throttling(rate_per_gpu_hour=0.1)
    assert thr.slowdown == 2.0
    assert thr.duration_s == 60.0
    link = LinkDegradation(fraction=0.01)
    assert link.bandwidth_factor == 0.5
    assert link.episodes.duration_seconds == 60.0
    assert slow.active
    assert thr.active
    assert link.active


def test_si_properties_and_coverage():
    ep = Episodes(rate_per_gpu_hour=1.8, duration_seconds=100.0)
    assert ep.rate_per_s == pytest.approx(1.8 / 3600)
    assert ep.duration_s == 100.0
    assert ep.coverage == pytest.approx(0.05)  # 1.8 × 100 s per 3600 s


def test_slowdown_forms(tiny_dict):
    f = _faults(tiny_dict, {"slow_gpus": {"fraction": 0.1, "slowdown": 1.25}})
    assert f.slow_gpus.slowdown == FixedSlowdown(factor=1.25)
    f = _faults(
        tiny_dict, {"slow_gpus": {"slowdown": {"kind": "lognormal", "median": 1.2, "sigma": 0.3}}}
    )
    assert f.slow_gpus.slowdown == LognormalSlowdown(median=1.2, sigma=0.3)
    f = _faults(tiny_dict, {"slow_gpus": {"slowdown": {"kind": "uniform", "low": 1, "high": 1}}})
    assert f.slow_gpus.slowdown == UniformSlowdown(low=1.0, high=1.0)


def test_explicit_gpus_make_an_effect_active_without_a_fraction(tiny_dict):
    f = _faults(
        tiny_dict,
        {"slow_gpus": {"gpus": {3: 1.5}}, "degraded_links": {"nvlink": {"gpus": {2: 0.25}}}},
    )
    assert f.slow_gpus.gpus == {3: 1.5}
    assert f.slow_gpus.active
    assert f.degraded_links.nvlink.active
    assert f.hardware_active
    assert not f.degraded_links.nic.active
    # Listing a GPU at factor 1 changes nothing, and is not an active effect.
    assert not SlowGpus(gpus={3: 1.0}).active


@pytest.mark.parametrize(
    ("section", "path", "fragment"),
    [
        ({"slow_gpus": {"fraction": 1.5}}, "faults.slow_gpus.fraction", "[0, 1]"),
        ({"slow_gpus": {"fraction": -0.1}}, "faults.slow_gpus.fraction", "[0, 1]"),
        ({"slow_gpus": {"slowdown": 0.9}}, "faults.slow_gpus.slowdown.factor", "≥ 1"),
        (
            {"slow_gpus": {"slowdown": {"kind": "uniform", "low": 1.2, "high": 1.1}}},
            "faults.slow_gpus.slowdown.high",
            "below low",
        ),
        (
            {"slow_gpus": {"slowdown": {"kind": "uniform", "low": 0.5, "high": 1.1}}},
            "faults.slow_gpus.slowdown.low",
            "≥ 1",
        ),
        (
            {"slow_gpus": {"slowdown": {"kind": "gamma", "shape": 2}}},
            "faults.slow_gpus.slowdown.kind",
            "unknown slowdown kind 'gamma'",
        ),
        ({"slow_gpus": {"slowdown": {"low": 1.1}}}, "faults.slow_gpus.slowdown.kind", "missing"),
        (
            {"slow_gpus": {"slowdown": {"kind": "lognormal", "median": 1.2, "sigma": -1}}},
            "faults.slow_gpus.slowdown.sigma",
            "greater than or equal to 0",
        ),
        (
            {
                "slow_gpus": {
                    "slowdown": {"kind": "lognormal", "median": 1.2, "sigma": 0.1, "mu": 0}
                }
            },
            "faults.slow_gpus.slowdown.mu",
            "unknown key",
        ),
        ({"slow_gpus": {"slowdown": "big"}}, "faults.slow_gpus.slowdown", "fixed factor"),
        ({"slow_gpus": {"gpus": {3: 0.5}}}, "faults.slow_gpus.gpus[3]", "≥ 1"),
        ({"jitter": {"sigma": -0.1}}, "faults.jitter.sigma", "[0, 1]"),
        ({"jitter": {"sigma": 2.0}}, "faults.jitter.sigma", "[0, 1]"),
        ({"jitter": {"sigma": float("nan")}}, "faults.jitter.sigma", "[0, 1]"),
        (
            {"throttling": {"rate_per_gpu_hour": 100, "duration_seconds": 60}},
            "faults.throttling.rate_per_gpu_hour",
            "cover 167% of the time",
        ),
        ({"throttling": {"slowdown": 0.5}}, "faults.throttling.slowdown", "≥ 1"),
        ({"throttling": {"duration_seconds": 0}}, "faults.throttling.duration_seconds", "greater"),
        (
            {"degraded_links": {"nic": {"bandwidth_factor": 0}}},
            "faults.degraded_links.nic.bandwidth_factor",
            "(0, 1]",
        ),
        (
            {"degraded_links": {"nvlink": {"bandwidth_factor": 1.5}}},
            "faults.degraded_links.nvlink.bandwidth_factor",
            "(0, 1]",
        ),
        (
            {"degraded_links": {"nvlink": {"gpus": {2: 1.5}}}},
            "faults.degraded_links.nvlink.gpus[2]",
            "(0, 1]",
        ),
        (
            {"degraded_links": {"nic": {"episodes": {"rate_per_gpu_hour": 61}}}},
            "faults.degraded_links.nic.episodes.rate_per_gpu_hour",
            "rate × duration must stay below 1",
        ),
        ({"degraded_links": {"infiniband": {}}}, "faults.degraded_links.infiniband", "unknown key"),
        ({"stragglers": {}}, "faults.stragglers", "unknown key"),
    ],
)
def test_errors_name_the_field(tiny_dict, section, path, fragment):
    err = _error(tiny_dict, section)
    assert err.path == path
    assert fragment in err.message


def test_check_faults_accepts_ids_inside_the_cluster():
    f = Faults(
        slow_gpus=SlowGpus(gpus={0: 2.0, 2047: 1.5}),
        degraded_links={"nic": {"gpus": {2047: 0.5}}, "nvlink": {"gpus": {0: 0.5}}},
    )
    check_faults(f, 2048)  # no error
    check_faults(Faults(), 1)


def test_check_faults_names_the_field_and_the_gpu():
    f = Faults(slow_gpus=SlowGpus(gpus={4096: 1.5, 3: 1.2}))
    with pytest.raises(ValueError, match="GPU") as info:
        check_faults(f, 2048)
    assert (
        str(info.value) == "faults.slow_gpus.gpus: GPU 4096 beyond the 2048 GPUs (ids run 0–2047)"
    )
    # The part before ": " is a dotted path without spaces, as the scenario loader expects of
    # a cross-field message, so it becomes the error's path.
    head = str(info.value).partition(": ")[0]
    assert " " not in head

    several = Faults(degraded_links={"nvlink": {"gpus": {9: 0.5, 8: 0.5, 1: 0.5}}})
    with pytest.raises(ValueError, match=r"^faults\.degraded_links\.nvlink\.gpus: GPUs 8, 9 "):
        check_faults(several, 8)
    nic = Faults(degraded_links={"nic": {"gpus": {8: 0.5}}})
    with pytest.raises(ValueError, match=r"^faults\.degraded_links\.nic\.gpus: GPU 8 beyond"):
        check_faults(nic, 8)
    with pytest.raises(ValueError, match="positive"):
        check_faults(Faults(), 0)


def test_resolved_yaml_round_trips_with_faults(tiny_dict, tmp_path):
    faults = {
        "slow_gpus": {
            "fraction": 0.05,
            "slowdown": {"kind": "lognormal", "median": 1.2, "sigma": 0.2},
            "gpus": {3: 1.7},
        },
        "jitter": {"sigma": 0.03},
        "throttling": {"rate_per_gpu_hour": 0.2, "duration_seconds": 30},
        "degraded_links": {
            "nic": {"fraction": 0.02, "gpus": {5: 0.25}},
            "nvlink": {"episodes": {"rate_per_gpu_hour": 0.5}},
        },
    }
    tiny_dict["faults"] = faults
    sc = scenario_from_dict(tiny_dict)
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_scenario(sc))
    again = load_scenario(path)
    assert again == sc
    assert again.faults.slow_gpus.gpus == {3: 1.7}
    assert again.faults.degraded_links.nic.gpus == {5: 0.25}
    assert again.faults.throttling.coverage == pytest.approx(0.2 * 30 / 3600)
