"""Scenario file → gate → engine → estimate → run directory, as a user runs it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from nbclient import NotebookClient

from moesim.cli import main
from moesim.results import load
from moesim.results.store import TABLES

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {
    "step_time_s",
    "balanced_step_time_s",
    "straggler_overhead",
    "tokens_per_s",
    "mfu",
    "gpu_hours",
    "cost_usd",
    "maxvio_batch",
    "task_loss",
    "maxvio_global",
    "maxvio_compute_batch",
    "teacher_capture",
    "interference_cos",
}


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qs") / "quickstart"
    assert (
        main(["run", str(ROOT / "scenarios" / "quickstart.yaml"), "--out", str(out), "--quiet"])
        == 0
    )
    return out


def test_quickstart_run_directory(quickstart_run):
    names = {p.name for p in quickstart_run.iterdir()}
    assert {
        "scenario.resolved.yaml",
        "metadata.json",
        "summary.json",
        "gpu_hours.png",
        "cost.png",
        "step_breakdown.png",
        "trace.json.gz",
    } <= names
    assert {f"{t}.parquet" for t in TABLES} <= names
    summary = json.loads((quickstart_run / "summary.json").read_text())
    assert set(summary) == {"aux_loss", "loss_free"}
    for values in summary.values():
        assert set(values) >= SUMMARY_KEYS
        assert values["step_time_s"] >= values["balanced_step_time_s"] > 0
        assert 0 <= values["straggler_overhead"] < 1
        assert 0 < values["mfu"] < 1
        assert values["cost_usd"] == pytest.approx(values["gpu_hours"] * 4.92)


def test_quickstart_routing_quality_lands_in_the_run(quickstart_run):
    run = load(quickstart_run)
    spec = run.specialisation
    assert set(spec["strategy"]) == {"aux_loss", "loss_free"}
    assert len(spec) == 2 * run.scenario.stream.topics * run.scenario.model.moe.routed_experts
    assert (spec.groupby("strategy")["tokens"].sum() > 0).all()
    # Loss-free balances the global load better and has no gradient interference.
    assert run.summary["loss_free"]["maxvio_global"] < run.summary["aux_loss"]["maxvio_global"]
    assert run.summary["loss_free"]["interference_cos"] == 0.0
    assert run.summary["aux_loss"]["interference_cos"] != 0.0


def test_quickstart_kernel_table(quickstart_run):
    """The run directory lists every kernel of one micro-batch, per op and pass, and the
    routed experts' forward FLOPs are the micro-batch's assignments through three matrices."""
    run = load(quickstart_run)
    k = run.kernels
    assert set(k["phase"]) == {"forward", "backward_input", "backward_weight"}
    assert {"attention", "router", "shared_experts", "routed_experts", "head"} <= set(k["op"])
    assert (k["seconds"] >= 0).all()
    m = run.scenario.model
    tokens = run.scenario.parallelism.micro_batch_size * m.seq_len
    routed = k[(k["op"] == "routed_experts") & (k["phase"] == "forward")]["flops"].sum()
    # Rows are padded to the 128-row tile per expert: at least the unpadded work.
    assert routed >= 2 * tokens * m.moe.top_k * 3 * m.hidden * m.moe.expert_ffn


def test_quickstart_physical_plausibility(quickstart_run):
    """GPU-hours = GPUs × wall-hours, and tokens/s × wall = the token budget."""
    run = load(quickstart_run)
    sc = run.scenario
    for values in run.summary.values():
        wall_s = sc.training.total_tokens / values["tokens_per_s"]
        assert values["gpu_hours"] == pytest.approx(sc.cluster.gpus * wall_s / 3600)
    last = run.timeline.groupby("strategy").tail(1)
    assert (last["tokens"] == sc.training.total_tokens).all()


def test_quickstart_notebook_executes(quickstart_run):
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    os.environ["MOESIM_RUN_DIR"] = str(quickstart_run)
    try:
        NotebookClient(
            nb,
            timeout=300,
            kernel_name="python3",
            resources={"metadata": {"path": str(ROOT / "notebooks")}},
        ).execute()
    finally:
        del os.environ["MOESIM_RUN_DIR"]
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    figures = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(figures) == 4  # the figures show inline: moesim leaves the backend alone


def test_same_seed_identical_tables(tmp_path, tiny_dict):
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(yaml.safe_dump(tiny_dict))
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", str(scenario), "--out", str(a), "--quiet"]) == 0
    assert main(["run", str(scenario), "--out", str(b), "--quiet"]) == 0
    for table in TABLES:
        pd.testing.assert_frame_equal(
            pd.read_parquet(a / f"{table}.parquet"), pd.read_parquet(b / f"{table}.parquet")
        )
    assert (a / "summary.json").read_text() == (b / "summary.json").read_text()
    c = tmp_path / "c"
    assert main(["run", str(scenario), "--out", str(c), "--seed", "99", "--quiet"]) == 0
    assert (a / "summary.json").read_text() != (c / "summary.json").read_text()


def test_quickstart_summary_holds_the_memory_estimate(quickstart_run):
    from moesim import units
    from moesim.estimate.memory import memory_estimate
    from moesim.scenario import load_scenario

    expected = memory_estimate(load_scenario(ROOT / "scenarios" / "quickstart.yaml"))
    summary = json.loads((quickstart_run / "summary.json").read_text())
    for values in summary.values():
        assert values["memory_total_gib"] == pytest.approx(expected.total / units.GiB)
        assert values["memory_activations_gib"] == pytest.approx(expected.activations / units.GiB)
        assert values["memory_capacity_gib"] == pytest.approx(
            units.gigabytes_in_gib(80)  # the H100's 80 GB
        )
        parts = ("weights", "gradients", "optimizer", "activations", "buffers", "reserved")
        total = sum(values[f"memory_{p}_gib"] for p in parts)
        assert values["memory_total_gib"] == pytest.approx(total)
