"""Sweeps: design expansion, validation up front, resume after a killed sweep, and the same
table from the process pool and from Dask."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moesim.cli import main
from moesim.errors import ScenarioError
from moesim.sweep import (
    expand,
    load_design,
    parse_axis,
    plan,
    point_name,
    run_sweep,
    sweep_table,
    varied_keys,
)

GAMMA = "strategies[1].gamma"


def test_parse_axis():
    assert parse_axis("strategies[1].gamma=1e-3, 1e-4") == (GAMMA, [1e-3, 1e-4])
    assert parse_axis("cluster.gpu=H100,H800") == ("cluster.gpu", ["H100", "H800"])
    assert parse_axis("x=[1, 2],[3]") == ("x", [[1, 2], [3]])
    with pytest.raises(ScenarioError, match=r"^--grid: 'cluster\.nodes' is not KEY=V1,V2"):
        parse_axis("cluster.nodes")
    with pytest.raises(ScenarioError, match=r"^cluster\.nodes: empty value"):
        parse_axis("cluster.nodes=1,,2")
    with pytest.raises(ScenarioError, match="not a field path"):
        parse_axis("a..b=1")


def test_grid_is_a_cartesian_product_first_axis_slowest():
    points = expand([("a", [1, 2]), ("b", ["x", "y", "z"])])
    assert points == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 1, "b": "z"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
        {"a": 2, "b": "z"},
    ]


def test_zipped_axes_vary_together_crossed_with_the_grid():
    points = expand([("a", [1, 2])], [("b", [10, 20, 30]), ("c", [0.1, 0.2, 0.3])])
    assert len(points) == 6
    assert points[:3] == [
        {"a": 1, "b": 10, "c": 0.1},
        {"a": 1, "b": 20, "c": 0.2},
        {"a": 1, "b": 30, "c": 0.3},
    ]
    assert expand([], [("b", [1, 2]), ("c", [3, 4])]) == [{"b": 1, "c": 3}, {"b": 2, "c": 4}]


@pytest.mark.parametrize(
    ("grid", "zipped", "message"),
    [
        ([], [], "nothing to sweep"),
        ([("a", [1]), ("a", [2])], [], r"^a: varied twice"),
        ([("a", [1])], [("a", [2])], r"^a: varied twice"),
        ([], [("b", [1, 2]), ("c", [1])], r"^b: zipped lists differ in length \(b: 2, c: 1\)"),
        ([("a", [])], [], r"^a: no values"),
    ],
)
def test_bad_designs(grid, zipped, message):
    with pytest.raises(ScenarioError, match=message):
        expand(grid, zipped)


def test_point_names_are_stable_and_distinct():
    assert point_name({"a": 1, "b": 2}) == point_name({"b": 2, "a": 1})
    assert point_name({"a": 1}) != point_name({"a": 2})


def test_design_file(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text(
        yaml.safe_dump({"grid": {GAMMA: [1e-3, 1e-4]}, "zip": {"seed": [1, 2]}, "set": {"x": 1}})
    )
    assert load_design(path) == ([(GAMMA, [1e-3, 1e-4])], [("seed", [1, 2])], [("x", 1)])
    path.write_text(yaml.safe_dump({"grid": {"seed": 3}}))
    with pytest.raises(ScenarioError, match=r"^grid\.seed: must be a list"):
        load_design(path)
    path.write_text(yaml.safe_dump({"grids": {}}))
    with pytest.raises(ScenarioError, match=r"^grids: unknown key"):
        load_design(path)


@pytest.fixture
def tiny_file(tmp_path, tiny_dict) -> Path:
    path = tmp_path / "tiny.yaml"
    tiny_dict["output"] = {"trace": False}
    path.write_text(yaml.safe_dump(tiny_dict))
    return path


def test_every_point_is_validated_before_any_runs(tmp_path, capsys, tiny_file):
    """A bad value at one point fails the sweep at once, one line, nothing written."""
    out = tmp_path / "sweep"
    args = ["sweep", str(tiny_file), "--grid", "cluster.nodes=2,three", "--out", str(out)]
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cluster.nodes: Input should be a valid integer")
    assert "'three'" in err
    assert len(err.splitlines()) == 1
    assert not out.exists()
    with pytest.raises(ScenarioError, match=r"^strategies\[4\]: index out of range"):
        plan(tiny_file, expand([("strategies[4].gamma", [1.0])]))


def _sweep_cmd(scenario: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "moesim.cli",
        "sweep",
        str(scenario),
        "--grid",
        f"{GAMMA}=1e-3,1e-2",
        "--set",
        "training.total_tokens=1e6",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def _finished(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("point-*") if (p / "summary.json").is_file())


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory) -> tuple[Path, Path, dict[str, int]]:
    """A process-pool sweep killed (with its worker) after its first point, then resumed."""
    from base_scenario import TINY

    root = tmp_path_factory.mktemp("sweep")
    scenario = root / "tiny.yaml"
    scenario.write_text(yaml.safe_dump({**TINY, "output": {"trace": False}}))
    out = root / "out"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _sweep_cmd(scenario, out, "--workers", "1"),
        start_new_session=True,  # its own process group: the sweep and its worker
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 180
        while not _finished(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    first = _finished(out)
    assert len(first) == 1
    # What was in flight left no visible directory and no table.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [first[0].name]
    inode = {first[0].name: first[0].stat().st_ino}
    done = subprocess.run(_sweep_cmd(scenario, out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return scenario, out, inode


def test_killed_sweep_resumes_skipping_finished_points(killed_and_resumed):
    _, out, inode = killed_and_resumed
    finished = _finished(out)
    assert len(finished) == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".point-")]  # leftovers removed
    (name, ino), *_ = inode.items()
    assert (out / name).stat().st_ino == ino  # the finished point was not redone
    table = pd.read_parquet(out / "sweep.parquet")
    assert varied_keys(table) == [GAMMA]
    assert list(table[GAMMA]) == [1e-3, 1e-3, 1e-2, 1e-2]
    assert list(table["strategy"]) == ["aux_loss", "loss_free"] * 2
    summary = json.loads((out / table["point"].iloc[0] / "summary.json").read_text())
    assert set(summary["aux_loss"]) <= set(table.columns)
    assert (out / "sweep_strategies_1_gamma.png").is_file()
    assert (out / "sweep_strategies_1_gamma.svg").is_file()
    assert (out / "sweep_attribution.png").is_file()
    assert (out / "sweep_cost_over_balanced.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in (out / "sweep_cost_over_balanced.svg").read_bytes()[:1000]
    # γ only moves the loss-free runs; the aux-loss runs are the same run twice.
    aux = table[table["strategy"] == "aux_loss"]
    assert aux["gpu_hours"].nunique() == 1
    free = table[table["strategy"] == "loss_free"]
    assert free["maxvio_batch"].nunique() == 2


def test_rerun_of_a_finished_sweep_runs_nothing(killed_and_resumed, monkeypatch):
    scenario, out, _ = killed_and_resumed
    points = plan(scenario, expand([(GAMMA, [1e-3, 1e-2])]), ["training.total_tokens=1e6"])

    def must_not_run(*_args):  # pragma: no cover - fails the test if called
        raise AssertionError("a finished point ran again")

    monkeypatch.setattr("moesim.sweep._run_processes", must_not_run)
    seen: list[str] = []
    table = run_sweep(points, out, progress=seen.append)
    assert len(seen) == 2
    assert all("done before" in s for s in seen)
    pd.testing.assert_frame_equal(table, pd.read_parquet(out / "sweep.parquet"))


def test_a_point_dir_of_another_scenario_is_refused(killed_and_resumed):
    scenario, out, _ = killed_and_resumed
    points = plan(scenario, expand([(GAMMA, [1e-3])]), ["training.total_tokens=2e6"])
    with pytest.raises(ScenarioError, match="holds a run of another scenario"):
        run_sweep(points, out)


def test_dask_local_cluster_gives_the_identical_table(killed_and_resumed, tmp_path):
    pytest.importorskip("dask.distributed")
    scenario, out, _ = killed_and_resumed
    points = plan(scenario, expand([(GAMMA, [1e-3, 1e-2])]), ["training.total_tokens=1e6"])
    table = run_sweep(points, tmp_path / "dask", executor="dask", workers=2)
    expected = pd.read_parquet(out / "sweep.parquet")
    pd.testing.assert_frame_equal(table, expected)
    pd.testing.assert_frame_equal(sweep_table(points, tmp_path / "dask"), expected)
    for point in table["point"].unique():
        for name in ("timeline.parquet", "steps.parquet"):
            pd.testing.assert_frame_equal(
                pd.read_parquet(tmp_path / "dask" / point / name),
                pd.read_parquet(out / point / name),
            )


def test_random_design_is_deterministic_and_in_range(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "grid:\n  cluster.nodes: [2, 4]\n"
        "random:\n  points: 6\n  seed: 7\n  vary:\n"
        f"    {GAMMA}: {{low: 1e-5, high: 1e-2, log: true}}\n"
        "    cluster.price_usd_per_gpu_hour: {low: 2.0, high: 5.0}\n"
        "    parallelism.micro_batches: {low: 2, high: 8}\n"
        "    router.score: [sigmoid, softmax]\n"
    )
    grid, zipped, sets = load_design(path)
    assert grid == [("cluster.nodes", [2, 4])]
    assert sets == []
    again = load_design(path)[1]
    assert zipped == again  # same seed, same points
    values = dict(zipped)
    assert all(len(v) == 6 for v in values.values())
    gammas = values[GAMMA]
    assert all(1e-5 <= g <= 1e-2 for g in gammas)
    assert max(gammas) / min(gammas) > 3  # log-uniform over three decades spreads out
    assert all(
        2.0 <= p <= 5.0 and isinstance(p, float) for p in values["cluster.price_usd_per_gpu_hour"]
    )
    assert all(isinstance(m, int) and 2 <= m <= 8 for m in values["parallelism.micro_batches"])
    assert set(values["router.score"]) <= {"sigmoid", "softmax"}
    # Crossed with the grid: 2 × 6 points.
    assert len(expand(grid, zipped)) == 12
    path.write_text(path.read_text().replace("seed: 7", "seed: 8"))
    assert load_design(path)[1] != zipped


@pytest.mark.parametrize(
    ("random", "message"),
    [
        ({"points": 0, "seed": 1, "vary": {"seed": [1]}}, r"^random\.points: must be"),
        ({"points": 2, "vary": {"seed": [1]}}, r"^random\.seed: must be"),
        ({"points": 2, "seed": 1, "vary": {}}, r"^random\.vary: must map"),
        ({"points": 2, "seed": 1, "vary": {"x": {"low": 0, "high": 1, "log": True}}}, "low > 0"),
        ({"points": 2, "seed": 1, "vary": {"x": {"low": 2, "high": 1}}}, "above high"),
        ({"points": 2, "seed": 1, "vary": {"x": 3}}, r"^random\.vary\.x: must be"),
        ({"points": 2, "seed": 1, "vary": {"x": [1]}, "extra": 1}, r"^random\.extra: unknown"),
    ],
)
def test_bad_random_designs(tmp_path, random, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"random": random}))
    with pytest.raises(ScenarioError, match=message):
        load_design(path)


def test_random_design_and_zip_are_exclusive(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {"zip": {"seed": [1]}, "random": {"points": 1, "seed": 0, "vary": {"x": [1]}}}
        )
    )
    with pytest.raises(ScenarioError, match=r"^random: a sweep file has zip: or random:"):
        load_design(path)
