"""One regression test per crash class found by fuzzing moesim (loader, schema, resources,
paths, interruption, concurrency, output invariants)."""

from __future__ import annotations

import copy
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from moesim.errors import ScenarioError, SimulationError
from moesim.estimate import estimate_run, montecarlo
from moesim.estimate.invariants import check_invariants
from moesim.results import load
from moesim.results.store import PARTIAL, TABLES, build_tables, clean_stale_partials, write_run
from moesim.scenario import load_scenario, scenario_from_dict
from moesim.scenario.loader import MAX_DEPTH, MAX_SCENARIO_BYTES, parse_yaml
from tests.reliability.fuzzlib import SMALL, run_cli

ROOT = Path(__file__).resolve().parents[2]


def _small(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SMALL)
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return doc


def _refused(doc: dict[str, Any]) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(doc)
    return info.value


def _cli(argv: list[str]) -> tuple[int | None, str, str]:
    return run_cli(argv, timeout_s=60)


def _one_error_line(code: int | None, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert "internal error" not in lines[0]
    return lines[0]


# --------------------------------------------------------------------------- loader


def test_deep_nesting_is_one_error_not_recursion(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("name: x\nmodel: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ScenarioError, match=f"nested deeper than {MAX_DEPTH}"):
        load_scenario(path)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"name: caf\xe9\n", "not UTF-8"),
        ("name: x\n".encode("utf-16"), "UTF-16"),
        (bytes(range(256)), "not UTF-8"),
    ],
)
def test_non_utf8_is_one_error(tmp_path, data, fragment):
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    with pytest.raises(ScenarioError, match=fragment):
        load_scenario(path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(SMALL).encode())
    assert load_scenario(path).name == "fuzz"


def test_special_files_and_long_paths_are_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, fragment in [
        ("/dev/zero", "not a regular file"),
        (str(fifo), "not a regular file"),
        (str(tmp_path), "is a directory"),
        ("x" * 5000, "too long"),
        (str(tmp_path / ("y" * 300)), "too long"),
        ("a\x00b", "NUL"),
    ]:
        with pytest.raises(ScenarioError, match=fragment):
            load_scenario(path)


def test_oversized_file_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (MAX_SCENARIO_BYTES + 1))
    with pytest.raises(ScenarioError, match="at most"):
        load_scenario(path)


def test_duplicate_keys_aliases_and_tags():
    with pytest.raises(ScenarioError, match="duplicate key 'seed'"):
        parse_yaml("seed: 1\nseed: 2\n")
    laughs = "a0: &a0 [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 9)
    )
    with pytest.raises(ScenarioError, match="expands to more than"):
        parse_yaml(laughs)
    with pytest.raises(ScenarioError, match="expands to more than"):
        parse_yaml("a: &a [*a]\n")
    with pytest.raises(ScenarioError, match="constructor"):
        parse_yaml("a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ScenarioError, match="malformed YAML"):
        parse_yaml("a: !!timestamp 2024-13-45\n")
    with pytest.raises(ScenarioError, match="malformed YAML"):
        parse_yaml("a: \x00\n")
    # Merge keys are not duplicates.
    assert parse_yaml("b: &b {x: 1}\nc: {<<: *b, x: 2}\n")["c"] == {"x": 2}


@pytest.mark.parametrize("preset", [["H100"], {"a": 1}, 3])
def test_gpu_preset_of_wrong_type_is_one_error(preset):
    doc = _small()
    doc["cluster"]["gpu"] = {"preset": preset}
    assert _refused(doc).path == "cluster.gpu.preset"


# --------------------------------------------------------------------------- physical bounds


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"training__total_tokens": 1e20}, "training.total_tokens"),
        ({"training__total_tokens": math.inf}, "training.total_tokens"),
        ({"faults__failures__restart_minutes": math.inf}, "faults.failures.restart_minutes"),
        ({"faults__failures__restart_minutes": 1e308}, "faults.failures.restart_minutes"),
        (
            {"faults__failures__checkpoint_write_seconds": 1e308},
            "faults.failures.checkpoint_write_seconds",
        ),
        ({"faults__failures__gpu_mtbf_hours": 1e-9}, "faults.failures.gpu_mtbf_hours"),
        ({"cluster__nic__bandwidth_gbits_per_s": 1e-9}, "cluster.nic.bandwidth_gbits_per_s"),
        ({"stream__noise": 1e308}, "stream.noise"),
        ({"cluster__price_usd_per_gpu_hour": 1e308}, "cluster.price_usd_per_gpu_hour"),
        ({"cluster__price_usd_per_gpu_hour": math.inf}, "cluster.price_usd_per_gpu_hour"),
        ({"cluster__nvlink__efficiency": 1e-12}, "cluster.nvlink.efficiency"),
        ({"cluster__nvlink__latency_us": math.inf}, "cluster.nvlink.latency_us"),
        ({"cluster__network__oversubscription": math.inf}, "cluster.network.oversubscription"),
        ({"model__seq_len": 1}, "model.seq_len"),
        ({"model__layers": 100_000}, "model.layers"),
        ({"model__moe__routed_experts": 1_000_000}, "model.moe.routed_experts"),
        ({"seed": 2**70}, "seed"),
    ],
)
def test_extremes_are_refused_with_the_field(changes, path):
    assert _refused(_small(**changes)).path == path


def test_gpu_overrides_are_bounded():
    doc = _small()
    doc["cluster"]["gpu"] = {"preset": "H100", "bf16_tflops": 1e-6}
    assert _refused(doc).path == "cluster.gpu.bf16_tflops"
    doc["cluster"]["gpu"] = {"preset": "H100", "bf16_gemm_half_gflop": math.inf}
    assert _refused(doc).path == "cluster.gpu.bf16_gemm_half_gflop"


def test_bounds_are_in_the_json_schema():
    from moesim.scenario import Scenario

    schema = json.dumps(Scenario.model_json_schema())
    assert '"maximum": 100000' in schema  # price
    assert '"maximum": 1e+16' in schema  # token budget


# --------------------------------------------------------------------------- resources


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        (
            {
                "cluster__nodes": 600_000,
                "parallelism__data": 600_000,
                "training__global_batch_sequences": 1_200_000,
            },
            "cluster.nodes",
        ),
        ({"training__total_tokens": 1e16}, "training.total_tokens"),
        ({"training__total_tokens": 1e9}, "engine.time_budget_minutes"),
        (
            {"gate__batch_sequences": 1_000_000, "gate__tokens_per_sequence": 64},
            "engine.memory_limit_gib",
        ),
        (
            {
                "training__total_tokens": 1e12,
                "training__batch_ramp": {"start_sequences": 2, "over_tokens": 1e16},
            },
            "training.batch_ramp.over_tokens",
        ),
        ({"training__global_batch_sequences": 2**22}, "training.global_batch_sequences"),
    ],
)
def test_oversized_scenarios_are_refused_before_work(changes, path):
    err = _refused(_small(**changes))
    assert err.path == path
    assert "about" in err.message or "at most" in err.message or "more than" in err.message


def test_worker_count_is_capped_at_available_cores(monkeypatch):
    seen: dict[str, int] = {}

    class Pool:
        def __init__(self, max_workers: int) -> None:
            seen["pool"] = max_workers

        def __enter__(self) -> Pool:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def map(self, fn, items):  # type: ignore[no-untyped-def]
            return []

    def fake_run(scenario, progress=None, workers=1, cache=None):  # type: ignore[no-untyped-def]
        seen["run"] = workers
        raise RuntimeError("stop")

    monkeypatch.setattr(montecarlo, "estimate_run", fake_run)
    monkeypatch.setattr(montecarlo, "available_cores", lambda: 2)
    sc = scenario_from_dict(_small(uncertainty={"seeds": 3, "workers": 16}))
    with pytest.raises(RuntimeError):
        montecarlo.estimate_with_bands(sc)
    assert seen["run"] == 2


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    """One small run through the worst corners that used to crash or write NaN: the highest
    price, EPLB on one strategy set, token dropping, strong jitter, failures on."""
    doc = _small(
        cluster__price_usd_per_gpu_hour=100_000.0,
        eplb={"enabled": True},
        router={"capacity": {"factor": 0.5}},
        faults={
            "jitter": {"sigma": 1.0},
            "failures": {"enabled": True, "gpu_mtbf_hours": 1.0, "restart_minutes": 10},
        },
    )
    path = tmp_path_factory.mktemp("odd") / "odd.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = path.parent / "run"
    code, _, err = _cli(["run", str(path), "--out", str(out), "--quiet"])
    assert code == 0, err
    return out


def test_odd_run_writes_strict_json_and_nulls(odd_run):
    def refuse(constant: str) -> None:
        raise ValueError(constant)

    summary = json.loads((odd_run / "summary.json").read_text(), parse_constant=refuse)
    assert summary
    steps = pq.read_table(odd_run / "steps.parquet").to_pandas()
    plain = steps[~steps["strategy"].str.endswith("+eplb")]
    assert plain["routing_eplb_migration_s"].isna().all()  # null: not applicable
    table = pq.read_table(odd_run / "steps.parquet")
    assert table.column("routing_eplb_migration_s").null_count == len(plain)
    assert (pd.read_parquet(odd_run / "experts.parquet")["mean_wait_s"] >= 0).all()
    for name in ("cost.png", "gpu_hours.png"):
        assert (odd_run / name).is_file()


def test_odd_run_satisfies_invariants(odd_run):
    run = load(odd_run)
    frames = {name: getattr(run, name) for name in TABLES}
    check_invariants(run.scenario.name, frames, run.summary, run.scenario.training.total_tokens)


def test_failures_that_never_finish_are_a_scenario_error():
    from moesim.estimate.attribution import failure_totals

    sc = scenario_from_dict(
        _small(
            cluster__nodes=1,
            faults={
                "failures": {
                    "enabled": True,
                    "gpu_mtbf_hours": 1.0,
                    "restart_minutes": 10_080,
                    "checkpoint_write_seconds": 86_400,
                }
            },
        )
    )
    with pytest.raises(ScenarioError) as info:
        failure_totals(sc, 1.0, 1.0)
    assert info.value.path == "faults.failures"


def test_blas_is_single_threaded_inside_estimate_run(monkeypatch):
    from threadpoolctl import threadpool_info, threadpool_limits

    from moesim.estimate import run as run_module

    seen: list[int] = []

    def probe(scenario, progress, workers, cache):  # type: ignore[no-untyped-def]
        seen.extend(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
        return "done"

    monkeypatch.setattr(run_module, "_estimate_run", probe)
    with threadpool_limits(limits=2, user_api="blas"):
        assert estimate_run(scenario_from_dict(_small())) == "done"
    assert seen
    assert set(seen) == {1}


# --------------------------------------------------------------------------- paths and CLI


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"name": "../../x"}, "name"),
        ({"name": "/etc/x"}, "name"),
        ({"name": "a\x00b"}, "name"),
        ({"name": "\x1b[31mred"}, "name"),
        ({"name": "cost $\\alpha$"}, "name"),
        ({"output": {"dir": "/abs"}}, "output.dir"),
        ({"output": {"dir": "runs/../../x"}}, "output.dir"),
        ({"output": {"dir": "a\nb"}}, "output.dir"),
    ],
)
def test_unsafe_names_and_dirs_are_refused(changes, path):
    assert _refused(_small(**changes)).path == path


def test_strategy_names_are_safe_labels():
    doc = _small()
    doc["strategies"][0]["name"] = "a$b"
    assert _refused(doc).path.startswith("strategies[0]")


def test_error_lines_are_short_and_printable(tmp_path):
    doc = _small(cluster__nodes="\x1b[2J" + "n" * 10_000)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, _, err = _cli(["validate", str(path)])
    line = _one_error_line(code, err)
    assert len(line) < 500
    assert "\x1b" not in line


def test_trace_errors_do_not_echo_the_file(tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("root:s3cr3t-hash:0:0\n1\n")
    doc = _small(gate={"trace": {"path": str(secret)}})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, _, err = _cli(["validate", str(path)])
    line = _one_error_line(code, err)
    assert "s3cr3t" not in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_fails_before_work(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    _unwritable_out(tmp_path, monkeypatch, locked / "run")


def test_dangling_symlink_out_fails_before_work(tmp_path, monkeypatch):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    _unwritable_out(tmp_path, monkeypatch, link)


def test_out_under_a_file_fails_before_work(tmp_path, monkeypatch):
    afile = tmp_path / "file"
    afile.write_text("x")
    _unwritable_out(tmp_path, monkeypatch, afile / "run")


def _unwritable_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: Path) -> None:
    import moesim.estimate as estimate

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the run started")

    monkeypatch.setattr(estimate, "estimate_with_bands", never)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    code, _, err = _cli(["run", str(path), "--out", str(out), "--quiet"])
    assert "--out" in _one_error_line(code, err)


def test_ctrl_c_is_130_without_traceback(tmp_path, monkeypatch):
    import moesim.scenario as scenario_pkg

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(scenario_pkg, "load_scenario", interrupted)
    code, _, err = _cli(["validate", str(tmp_path / "x.yaml")])
    assert code == 130
    assert err.strip() == "error: interrupted"


def test_unexpected_errors_are_one_line(tmp_path, monkeypatch):
    import moesim.scenario as scenario_pkg

    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("boom\nsecond line")

    monkeypatch.setattr(scenario_pkg, "load_scenario", broken)
    code, _, err = _cli(["validate", str(tmp_path / "x.yaml")])
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "internal error (TypeError" in err


# --------------------------------------------------------------------------- run directories


@pytest.fixture(scope="module")
def small_estimate():
    return estimate_run(scenario_from_dict(_small()))


def test_killed_runs_leave_nothing_load_accepts(tmp_path, small_estimate):
    host = socket.gethostname()
    stale = tmp_path / f".fuzz{PARTIAL}{host}-{2**22 + 12345}-abc"
    stale.mkdir()
    (stale / "summary.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="partial"):
        load(stale)
    live = tmp_path / f".other{PARTIAL}{host}-{os.getpid()}-def"
    live.mkdir()
    assert clean_stale_partials(tmp_path) == [stale]
    assert live.exists()
    write_run(small_estimate, tmp_path / "fuzz")
    assert not stale.exists()
    assert load(tmp_path / "fuzz").summary


def test_incomplete_directory_is_not_a_run(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load(tmp_path)


def test_racing_runs_to_one_target_fail_cleanly(tmp_path, small_estimate, monkeypatch):
    from moesim.results import store

    target = tmp_path / "same"
    real = store.plots.write_all

    def other_run_finishes_first(*args: Any, **kwargs: Any) -> Any:
        target.mkdir()
        (target / "summary.json").write_text("{}")
        return real(*args, **kwargs)

    monkeypatch.setattr(store.plots, "write_all", other_run_finishes_first)
    with pytest.raises(ScenarioError, match="another run"):
        write_run(small_estimate, target)
    assert [p.name for p in tmp_path.iterdir()] == ["same"]  # no partial left behind
    with pytest.raises(ScenarioError, match="already exists"):
        write_run(small_estimate, target)


# --------------------------------------------------------------------------- invariants


def _good(small_estimate):  # type: ignore[no-untyped-def]
    frames = build_tables(small_estimate)
    summary = copy.deepcopy(small_estimate.summary_dict())
    return frames, summary


def test_invariants_hold_on_a_real_run(small_estimate):
    frames, summary = _good(small_estimate)
    check_invariants("fuzz", frames, summary, small_estimate.scenario.training.total_tokens)


@pytest.mark.parametrize(
    ("breaks", "invariant"),
    [
        ("summary_nan", "finite"),
        ("summary_inf", "finite"),
        ("table_inf", "finite"),
        ("table_nan", "finite"),
        ("negative_time", "no negative times"),
        ("attribution", "attribution adds up"),
        ("tokens", "tokens conserved"),
        ("bands", "bands ordered"),
    ],
)
def test_each_invariant_catches_its_violation(small_estimate, breaks, invariant):
    frames, summary = _good(small_estimate)
    name = next(iter(summary))
    if breaks == "summary_nan":
        summary[name]["gpu_hours"] = math.nan
    elif breaks == "summary_inf":
        summary[name]["cost_usd"] = math.inf
    elif breaks == "table_inf":
        frames["links"].loc[0, "busy_s"] = np.inf
    elif breaks == "table_nan":
        frames["gpus"].loc[0, "compute_s"] = np.nan
    elif breaks == "negative_time":
        frames["experts"].loc[0, "mean_wait_s"] = -2e-4
    elif breaks == "attribution":
        summary[name]["attribution_compute_gpu_hours"] += 1.0
    elif breaks == "tokens":
        frames["experts"].loc[0, "tokens"] += 1
    elif breaks == "bands":
        summary[name].update(gpu_hours_p10=2.0, gpu_hours_p50=1.0, gpu_hours_p90=3.0)
    with pytest.raises(SimulationError) as info:
        check_invariants("fuzz", frames, summary, small_estimate.scenario.training.total_tokens)
    assert f"'{invariant}'" in str(info.value)
    assert "'fuzz'" in str(info.value)


def test_a_violation_writes_nothing(tmp_path, small_estimate, monkeypatch):
    from moesim.results import store

    def broken_tables(est):  # type: ignore[no-untyped-def]
        frames = build_tables(est)
        frames["gpus"].loc[0, "compute_s"] = np.nan
        return frames

    monkeypatch.setattr(store, "build_tables", broken_tables)
    with pytest.raises(SimulationError):
        write_run(small_estimate, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_figures_drawn_in_a_forked_process_are_the_files_drawn_here(
    tmp_path, small_estimate, monkeypatch
):
    """write_run draws the figures in a forked process when it can: byte for byte the files
    it writes when it draws them itself (another thread alive), every table and the trace
    too. Not compared: metadata.json (its timestamp) and SVG files (matplotlib names an
    SVG's clip paths by hashing, among others, the objects' addresses)."""
    from moesim.results import store

    forks = []
    real_context = store.multiprocessing.get_context

    def counting(method):  # type: ignore[no-untyped-def]
        forks.append(method)
        return real_context(method)

    monkeypatch.setattr(store.multiprocessing, "get_context", counting)
    forked = write_run(small_estimate, tmp_path / "forked")
    assert forks == ["fork"]
    monkeypatch.setattr(store.threading, "active_count", lambda: 2)
    here = write_run(small_estimate, tmp_path / "here")
    assert forks == ["fork"]  # the second run drew its figures itself
    names = sorted(p.name for p in forked.iterdir())
    assert names == sorted(p.name for p in here.iterdir())
    assert {"gpu_hours.png", "wait_heatmap.png", "steps.parquet"} <= set(names)
    for name in names:
        if name != "metadata.json" and not name.endswith(".svg"):
            assert (forked / name).read_bytes() == (here / name).read_bytes(), name


def test_a_figure_that_fails_in_its_process_fails_the_run(tmp_path, small_estimate, monkeypatch):
    from moesim.results import plots

    def broken(*_args: object) -> None:
        raise ValueError("no figure")

    monkeypatch.setattr(plots, "write_all", broken)  # the forked process inherits it
    with pytest.raises(RuntimeError, match="figures failed: ValueError: no figure"):
        write_run(small_estimate, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_eplb_with_an_expert_group_smaller_than_a_node():
    doc = _small(
        cluster__gpus_per_node=4,
        parallelism__data=2,
        training__global_batch_sequences=8,
        eplb={"enabled": True},
    )
    est = estimate_run(scenario_from_dict(doc))
    assert any(name.endswith("+eplb") for name in est.summary)


def test_undefined_interference_ratio_is_null_not_inf():
    """Two experts, top-1, one step: the task gradient on the router can vanish, and
    ‖∂L_aux‖/‖∂L_task‖ is undefined — NaN (null), never inf (found by the fuzzer)."""
    doc = _small(model__moe__routed_experts=2, model__moe__top_k=1, training__total_tokens=1.0)
    est = estimate_run(scenario_from_dict(doc))
    gate = build_tables(est)["gate"]
    assert not np.isinf(gate["interference_ratio"].to_numpy(float)).any()
    check_invariants(
        "fuzz", build_tables(est), est.summary_dict(), est.scenario.training.total_tokens
    )


def test_scenario_error_crosses_process_boundaries():
    import pickle

    err = pickle.loads(pickle.dumps(ScenarioError("a.b", "bad")))
    assert (err.path, err.message) == ("a.b", "bad")


def test_long_checkpoints_on_a_tiny_run_with_seed_workers(tmp_path):
    """Found by the fuzzer: a checkpoint write far longer than the run's useful work is a large
    relative overhead but a finite run; and errors from seed workers arrive whole."""
    doc = _small(
        faults={
            "failures": {
                "enabled": True,
                "gpu_mtbf_hours": 1e8,
                "checkpoint_write_seconds": 26_117.0,
                "restart_minutes": 7_121.0,
            }
        },
        uncertainty={"seeds": 2, "workers": 17},
    )
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, _, err = _cli(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 0, err
    assert "Traceback" not in err
