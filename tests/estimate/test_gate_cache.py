"""The gate cache: what its key holds, that a cached gate gives the same run as a trained one,
that unusable entries are replaced, where it lives, and the progress the run reports."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from base_scenario import derive

from moesim.cli import main
from moesim.estimate import SeedPlan
from moesim.estimate.gate_cache import (
    ARRAYS,
    MANIFEST,
    RECORDS,
    GateCache,
    GateCacheWarning,
    default_cache_dir,
    gate_key,
    gate_key_inputs,
)
from moesim.estimate.montecarlo import bands_work, estimate_with_bands
from moesim.estimate.run import estimate_run
from moesim.gate import GateTrajectory, train_gate
from moesim.results.store import build_tables
from moesim.scenario import Scenario, scenario_from_dict

POINTS = [0, 5, 10]


def _key(raw: dict[str, Any], points: list[int] = POINTS) -> str:
    sc = scenario_from_dict(raw)
    return gate_key(gate_key_inputs(sc, sc.strategies[0], points, SeedPlan(sc.seed).gate))


# Each changes something train_gate reads: the key must change.
GATE_INPUTS = {
    "routed experts": {"model": {"moe": {"routed_experts": 32}}},
    "top-k": {"model": {"moe": {"top_k": 3}}},
    "shared experts": {"model": {"moe": {"shared_experts": 0}}},
    "router score": {"router": {"score": "softmax"}},
    "router scaling": {"router": {"scaling_factor": 2.5}},
    "router capacity": {"router": {"capacity": {"factor": 1.25}}},
    "strategy coefficient": {
        "strategies": [{"name": "aux_loss", "kind": "aux_loss", "alpha": 2e-3}]
    },
    "strategy name": {"strategies": [{"name": "aux", "kind": "aux_loss", "alpha": 1e-3}]},
    "stream dim": {"stream": {"dim": 32}},
    "stream topics": {"stream": {"topics": 4}},
    "gate layers": {"gate": {"layers_simulated": 3}},
    "gate batch": {"gate": {"batch_sequences": 8}},
    "gate tokens": {"gate": {"tokens_per_sequence": 32}},
    "gate learning rate": {"gate": {"learning_rate": 2e-3}},
    "gate coarsening": {"gate": {"steps_per_update": 2}},
    "gate init": {"gate": {"init_logit_std": 0.3}},
    "gate objective": {"gate": {"objective": "teacher"}},
    "seed": {"seed": 4},
    "micro-batch size": {"parallelism": {"micro_batch_size": 2}},
    "expert-parallel layout": {"parallelism": {"expert": 2, "data": 2}},
    "total tokens": {"training": {"total_tokens": 4.0e6}},
    "global batch": {"training": {"global_batch_sequences": 32}},
    "batch ramp": {"training": {"batch_ramp": {"start_sequences": 8, "over_tokens": 1.0e6}}},
    "sequence length": {"model": {"seq_len": 2048}},
}

# Each changes nothing train_gate reads: the key must stay.
OTHER_INPUTS = {
    "price": {"cluster": {"price_usd_per_gpu_hour": 3.0}},
    "nic": {"cluster": {"nic": {"bandwidth_gbits_per_s": 200}}},
    "network": {"cluster": {"network": {"oversubscription": 2.0}}},
    "gpu": {"cluster": {"gpu": "H800"}},
    "faults": {"faults": {"failures": {"enabled": True}}},
    "eplb": {"eplb": {"enabled": True, "redundant_per_rank": 2}},
    "output": {"output": {"trace": False}},
    "uncertainty": {"uncertainty": {"seeds": 3}},
    "hidden size": {"model": {"hidden": 2048}},
    "layers": {"model": {"layers": 6}},
    "gate layer map": {"gate": {"layer_map": "blocks"}},
    "engine sample tokens": {"gate": {"routed_tokens_per_sequence": 32}},
    "comm SMs": {"parallelism": {"comm_sms": 16}},
}


AUX_ONLY = [{"name": "aux_loss", "kind": "aux_loss", "alpha": 1e-3}]  # valid under softmax too


@pytest.mark.parametrize("change", GATE_INPUTS.values(), ids=list(GATE_INPUTS))
def test_a_gate_input_changes_the_key(tiny_dict, change):
    base = derive(tiny_dict, strategies=AUX_ONLY)
    assert _key(derive(base, **change)) != _key(base)


@pytest.mark.parametrize("change", OTHER_INPUTS.values(), ids=list(OTHER_INPUTS))
def test_other_settings_keep_the_key(tiny_dict, change):
    base = derive(tiny_dict, strategies=AUX_ONLY)
    assert _key(derive(base, **change)) == _key(base)


def test_snapshot_steps_and_version_change_the_key(tiny_dict, monkeypatch):
    base = _key(tiny_dict)
    assert _key(tiny_dict, [0, 5]) != base
    monkeypatch.setattr("moesim.estimate.gate_cache.__version__", "999")
    assert _key(tiny_dict) != base


def test_expert_parallel_nodes_change_the_key_under_a_node_limit(tiny_dict):
    # Group-limited routing groups the experts by the EP group's nodes: their count is read.
    limited = derive(tiny_dict, router={"node_limit": 1})
    finer = derive(limited, cluster={"nodes": 4, "gpus_per_node": 2})
    assert _key(finer) != _key(limited)


def _trajectories_equal(a: GateTrajectory, b: GateTrajectory) -> None:
    assert a.strategy == b.strategy
    assert a.steps_per_update == b.steps_per_update
    assert json.dumps(a.records) == json.dumps(b.records)  # NaN-aware, exact floats
    assert a.tail_updates == b.tail_updates
    np.testing.assert_array_equal(a.tail_loads, b.tail_loads)
    assert sorted(a.states) == sorted(b.states)
    for step in a.states:
        for x, y in zip(a.states[step] + a.final, b.states[step] + b.final, strict=True):
            assert x.bias_mode == y.bias_mode
            assert x.weights.dtype == y.weights.dtype
            assert x.bias.dtype == y.bias.dtype
            np.testing.assert_array_equal(x.weights, y.weights)
            np.testing.assert_array_equal(x.bias, y.bias)
    assert vars(a.stream).keys() == vars(b.stream).keys()
    for name, value in vars(a.stream).items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, getattr(b.stream, name))


def _stored(sc: Scenario, cache: GateCache) -> tuple[str, GateTrajectory]:
    strategy, seed = sc.strategies[1], SeedPlan(sc.seed).gate
    inputs = gate_key_inputs(sc, strategy, POINTS, seed)
    key = gate_key(inputs)
    trained = train_gate(sc, strategy, POINTS, seed)
    assert cache.store(key, inputs, trained)
    return key, trained


def test_a_stored_trajectory_loads_bit_for_bit(tiny_scenario, tmp_path):
    cache = GateCache(tmp_path)
    key, trained = _stored(tiny_scenario, cache)
    loaded = cache.load(key, tiny_scenario)
    assert loaded is not None
    _trajectories_equal(trained, loaded)
    manifest = json.loads((cache.entry(key) / MANIFEST).read_text())
    assert manifest["key"] == key
    assert manifest["inputs"]["seed"]["spawn_key"] == [0]
    assert not [p for p in (tmp_path / "gate").iterdir() if p.name.startswith(".")]


def test_a_second_store_of_a_key_keeps_the_first(tiny_scenario, tmp_path):
    cache = GateCache(tmp_path)
    key, trained = _stored(tiny_scenario, cache)
    before = (cache.entry(key) / MANIFEST).read_bytes()
    inputs = gate_key_inputs(
        tiny_scenario, tiny_scenario.strategies[1], POINTS, SeedPlan(tiny_scenario.seed).gate
    )
    assert not cache.store(key, inputs, trained)  # the loser discards its copy
    assert (cache.entry(key) / MANIFEST).read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "gate").iterdir()) == [key]


def _truncate(entry: Path) -> None:
    data = (entry / ARRAYS).read_bytes()
    (entry / ARRAYS).write_bytes(data[: len(data) // 2])


def _bad_checksum(entry: Path) -> None:
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["sha256"][RECORDS] = "0" * 64
    (entry / MANIFEST).write_text(json.dumps(manifest))


def _no_manifest(entry: Path) -> None:
    (entry / MANIFEST).unlink()


def _other_format(entry: Path) -> None:
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["format"] = -1
    (entry / MANIFEST).write_text(json.dumps(manifest))


def _no_payload(entry: Path) -> None:
    (entry / ARRAYS).unlink()


@pytest.mark.parametrize(
    "damage", [_truncate, _bad_checksum, _no_manifest, _other_format, _no_payload]
)
def test_an_unusable_entry_is_reported_deleted_and_replaced(tiny_scenario, tmp_path, damage):
    cache = GateCache(tmp_path)
    key, trained = _stored(tiny_scenario, cache)
    damage(cache.entry(key))
    with pytest.warns(GateCacheWarning, match="unusable"):
        assert cache.load(key, tiny_scenario) is None
    assert not cache.entry(key).exists()
    assert cache.store(
        key,
        gate_key_inputs(
            tiny_scenario, tiny_scenario.strategies[1], POINTS, SeedPlan(tiny_scenario.seed).gate
        ),
        trained,
    )
    loaded = cache.load(key, tiny_scenario)
    assert loaded is not None
    _trajectories_equal(trained, loaded)


def test_a_run_retrains_a_damaged_gate_and_replaces_its_entry(tiny_scenario, tmp_path):
    cache = GateCache(tmp_path)
    first = estimate_run(tiny_scenario, cache=cache)
    keys = _entries(tmp_path)
    assert len(keys) == 2
    _truncate(cache.entry(keys[0]))
    with pytest.warns(GateCacheWarning, match="unusable"):
        again = estimate_run(tiny_scenario, cache=cache)
    assert sorted(again.gate_cache.values()) == ["hit", "miss"]
    assert _entries(tmp_path) == keys
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.load(keys[0], tiny_scenario) is not None
    assert again.summary_dict() == first.summary_dict()


def _tables(est: Any) -> dict[str, pd.DataFrame]:
    return build_tables(est)


def test_a_cached_run_equals_a_trained_one(tiny_dict, tmp_path):
    tiny_dict["eplb"] = {"enabled": True, "redundant_per_rank": 1, "interval_steps": 20}
    sc = scenario_from_dict(tiny_dict)
    cache = GateCache(tmp_path)
    fresh = estimate_run(sc, cache=None)
    first = estimate_run(sc, cache=cache)
    again = estimate_run(sc, cache=cache)
    assert fresh.gate_cache == {"aux_loss": "off", "loss_free": "off"}
    assert first.gate_cache == {"aux_loss": "miss", "loss_free": "miss"}
    assert again.gate_cache == {"aux_loss": "hit", "loss_free": "hit"}
    expected = _tables(fresh)
    for est in (first, again):
        tables = _tables(est)
        assert tables.keys() == expected.keys()
        for name, frame in expected.items():
            pd.testing.assert_frame_equal(tables[name], frame, check_exact=True)
        assert est.summary_dict() == fresh.summary_dict()
        assert json.dumps(est.gate_records) == json.dumps(fresh.gate_records)


def test_no_cache_neither_reads_nor_writes(tiny_scenario, tmp_path, monkeypatch):
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the cache was used")

    monkeypatch.setattr(GateCache, "load", refuse)
    monkeypatch.setattr(GateCache, "store", refuse)
    monkeypatch.setenv("MOESIM_CACHE_DIR", str(tmp_path / "env"))
    est = estimate_run(tiny_scenario, cache=None)
    assert est.gate_cache == {"aux_loss": "off", "loss_free": "off"}
    assert not (tmp_path / "env").exists()


def test_the_cache_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESIM_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    assert GateCache.default().directory == tmp_path / "explicit"
    monkeypatch.delenv("MOESIM_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "moesim"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "moesim"


def _scenario_file(tmp_path: Path, raw: dict[str, Any]) -> str:
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _entries(directory: Path) -> list[str]:
    gate = directory / "gate"
    return sorted(p.name for p in gate.iterdir()) if gate.exists() else []


def test_cli_cache_dir_env_and_no_cache(tiny_dict, tmp_path, monkeypatch):
    tiny_dict["output"] = {"trace": False}
    path = _scenario_file(tmp_path, tiny_dict)
    env_dir, flag_dir = tmp_path / "env", tmp_path / "flag"
    monkeypatch.setenv("MOESIM_CACHE_DIR", str(env_dir))

    def run(out: str, *flags: str) -> dict[str, str]:
        assert main(["run", path, "--out", str(tmp_path / out), "--quiet", *flags]) == 0
        meta = json.loads((tmp_path / out / "metadata.json").read_text())
        return dict(meta["gate_cache"])

    assert run("a") == {"aux_loss": "miss", "loss_free": "miss"}
    assert len(_entries(env_dir)) == 2
    assert run("b", "--cache-dir", str(flag_dir)) == {"aux_loss": "miss", "loss_free": "miss"}
    assert _entries(flag_dir) == _entries(env_dir)
    assert run("c", "--cache-dir", str(flag_dir)) == {"aux_loss": "hit", "loss_free": "hit"}
    before = {p: os.stat(p).st_mtime_ns for p in (env_dir / "gate").rglob("*")}
    assert run("d", "--no-cache") == {"aux_loss": "off", "loss_free": "off"}
    assert {p: os.stat(p).st_mtime_ns for p in (env_dir / "gate").rglob("*")} == before
    for name in ("timeline", "steps"):
        a = pd.read_parquet(tmp_path / "a" / f"{name}.parquet")
        for other in ("c", "d"):
            pd.testing.assert_frame_equal(
                pd.read_parquet(tmp_path / other / f"{name}.parquet"), a, check_exact=True
            )


def test_progress_ends_at_its_total_with_eplb_and_seeds(tiny_dict, tmp_path):
    tiny_dict["eplb"] = {"enabled": True, "redundant_per_rank": 1, "interval_steps": 20}
    tiny_dict["uncertainty"] = {"seeds": 2, "workers": 1}
    tiny_dict["output"] = {"trace": False}
    sc = scenario_from_dict(tiny_dict)
    seen: list[tuple[str, float]] = []
    for cache in (GateCache(tmp_path), GateCache(tmp_path)):  # trained, then from the cache
        seen.clear()
        estimate_with_bands(
            sc, progress=lambda label, units: seen.append((label, units)), cache=cache
        )
        assert all(units > 0 for _, units in seen)
        assert sum(units for _, units in seen) == bands_work(sc)
    eplb_steps = [label for label, _ in seen if "+eplb: step" in label]
    assert len(eplb_steps) == len(sc.strategies) * sc.training.sample_points


def test_gate_training_reports_its_progress(tiny_scenario):
    steps: list[int] = []
    sc = tiny_scenario
    train_gate(sc, sc.strategies[0], [0], SeedPlan(sc.seed).gate, steps.append)
    assert len(steps) > 10
    assert steps == sorted(steps)
    assert steps[0] == 0
    assert steps[-1] == sc.total_steps


def test_sweep_points_share_the_cache_and_report_their_work(tiny_dict, tmp_path):
    from moesim.sweep import expand, plan, point_work, run_sweep

    tiny_dict["output"] = {"trace": False}
    path = _scenario_file(tmp_path, tiny_dict)
    points = plan(path, expand([("cluster.price_usd_per_gpu_hour", [2.0, 3.0])]))
    seen: list[float] = []
    out = tmp_path / "sweep"
    cache = GateCache(tmp_path / "cache")
    run_sweep(points, out, workers=1, cache=cache, work=lambda _label, units: seen.append(units))
    assert len(seen) > len(points)  # the points' steps, not one tick per point
    assert sum(seen) == sum(point_work(p) for p in points)
    origins = [
        json.loads((out / p.name / "metadata.json").read_text())["gate_cache"] for p in points
    ]
    # One process, one point after the other: the second point's gates come from the cache.
    assert origins == [
        {"aux_loss": "miss", "loss_free": "miss"},
        {"aux_loss": "hit", "loss_free": "hit"},
    ]


def test_steps_in_worker_processes_give_the_same_run(tiny_dict, tmp_path):
    # EPLB (its seeds continue from run to run), hardware jitter and the trace: everything a
    # sampled step draws or records must come out the same from a worker process.
    tiny_dict["eplb"] = {"enabled": True, "redundant_per_rank": 1, "interval_steps": 20}
    tiny_dict["faults"] = {"jitter": {"sigma": 0.05}}
    sc = scenario_from_dict(tiny_dict)
    cache = GateCache(tmp_path)
    one = estimate_run(sc, workers=1, cache=cache)
    two = estimate_run(sc, workers=2, cache=cache)
    assert two.gate_cache == {"aux_loss": "hit", "loss_free": "hit"}
    expected = _tables(one)
    for name, frame in _tables(two).items():
        pd.testing.assert_frame_equal(frame, expected[name], check_exact=True)
    assert two.summary_dict() == one.summary_dict()
    assert [s.result.trace for s in two.steps] == [s.result.trace for s in one.steps]


def _sample_entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "sample").iterdir() if not p.name.startswith("."))


def _refuse_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("routed again")

    monkeypatch.setattr("moesim.estimate.routing.routing_sample", refuse)


def test_routing_samples_are_cached_and_reused_across_hardware_changes(
    tiny_dict, tmp_path, monkeypatch
):
    cache = GateCache(tmp_path)
    first = estimate_run(scenario_from_dict(tiny_dict), cache=cache)
    assert len(_sample_entries(tmp_path)) == len(first.steps)  # one per sampled step
    _refuse_routing(monkeypatch)
    cheaper = derive(tiny_dict, cluster={"price_usd_per_gpu_hour": 1.0, "nic": {"latency_us": 9}})
    again = estimate_run(scenario_from_dict(cheaper), cache=cache)
    for a, b in zip(first.steps, again.steps, strict=True):
        assert a.routing_metrics == b.routing_metrics
        np.testing.assert_array_equal(a.expert_load, b.expert_load)
    # A sampling setting outside the gate's key: the gate hits, the samples route again.
    finer = derive(tiny_dict, gate={"routed_tokens_per_sequence": 32})
    with pytest.raises(AssertionError, match="routed again"):
        estimate_run(scenario_from_dict(finer), cache=cache)


def test_a_damaged_sample_entry_is_reported_and_routed_again(tiny_scenario, tmp_path):
    cache = GateCache(tmp_path)
    first = estimate_run(tiny_scenario, cache=cache)
    entries = _sample_entries(tmp_path)
    _truncate(cache.sample_entry(entries[0]))
    with pytest.warns(GateCacheWarning, match="unusable"):
        again = estimate_run(tiny_scenario, cache=cache)
    assert _sample_entries(tmp_path) == entries
    assert again.summary_dict() == first.summary_dict()
