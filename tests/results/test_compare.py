"""Comparing runs: the tidy frame, the CLI table and figure; a loaded run's short repr and
its metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import moesim.results
from moesim.cli import main
from moesim.estimate import estimate_with_bands
from moesim.results.compare import compare, headline
from moesim.scenario import scenario_from_dict


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny scenario, and the same at twice the price with two seeds."""
    from base_scenario import TINY

    root = tmp_path_factory.mktemp("runs")
    one = scenario_from_dict({**TINY, "output": {"trace": False}})
    raw = {**TINY, "output": {"trace": False}, "uncertainty": {"seeds": 2}}
    raw["cluster"] = {**TINY["cluster"], "price_usd_per_gpu_hour": 4.0}
    two = scenario_from_dict(raw)
    a = moesim.results.write_run(estimate_with_bands(one, workers=1), root / "a" / "run")
    b = moesim.results.write_run(
        estimate_with_bands(two, workers=1), root / "b" / "run", command=["moesim", "run", "x"]
    )
    return a, b


def test_compare_is_one_row_per_run_and_strategy(two_runs):
    a, b = two_runs
    df = moesim.results.compare([a, moesim.results.load(b)])
    assert list(df[["run", "strategy"]].itertuples(index=False, name=None)) == [
        ("a/run", "aux_loss"),
        ("a/run", "loss_free"),
        ("b/run", "aux_loss"),
        ("b/run", "loss_free"),
    ]
    summary = json.loads((a / "summary.json").read_text())
    assert set(summary["aux_loss"]) <= set(df.columns)
    first = df[df["run"] == "a/run"]
    np.testing.assert_allclose(first["gpu_hours_vs_first"], 1.0)
    # Twice the price, two seeds: the headline is the lower median of the two seeds (the
    # first of which is the single run's), so at most its GPU-hours, and twice the dollars
    # per GPU-hour.
    second = df[df["run"] == "b/run"].reset_index(drop=True)
    assert (second["gpu_hours_vs_first"] <= 1.0).all()
    np.testing.assert_allclose(second["cost_usd_vs_first"], 2.0 * second["gpu_hours_vs_first"])
    at_base = second["headline_seed"] == df["seed"].iloc[0]
    np.testing.assert_allclose(second["gpu_hours_vs_first"][at_base], 1.0)
    assert (second["seeds"] == 2).all()
    assert (first["seeds"] == 1).all()


def test_headline_is_the_p50_with_its_band(two_runs):
    df = compare(list(two_runs))
    value, lo, hi = headline(df, "gpu_hours")
    banded = df["seeds"] == 2
    pd.testing.assert_series_equal(value[banded], df["gpu_hours_p50"][banded], check_names=False)
    assert (lo <= value).all()
    assert (value <= hi).all()
    pd.testing.assert_series_equal(value[~banded], df["gpu_hours"][~banded], check_names=False)


def test_compare_cli_prints_a_table_and_writes_a_figure(two_runs, tmp_path, capsys):
    figure = tmp_path / "cmp.svg"
    assert main(["compare", *map(str, two_runs), "--figure", str(figure)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["run", "strategy", "GPU-hours", "cost"]
    assert sum(line.startswith(("a/run", "b/run")) for line in lines) == 4
    assert "–" in out  # the two-seed run shows its P10–P90 range
    assert figure.read_text().lstrip().startswith("<?xml")


def test_compare_cli_bad_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "not a moesim run directory" in capsys.readouterr().err


def test_repr_is_short(two_runs):
    run = moesim.results.load(two_runs[0])
    text = repr(run)
    assert text.startswith("RunResults(")
    assert "scenario='tiny'" in text
    assert "strategies=['aux_loss', 'loss_free']" in text
    assert len(text) < 200


def test_metadata_records_when_how_and_what(two_runs):
    meta = json.loads((two_runs[1] / "metadata.json").read_text())
    assert meta["command"] == "moesim run x"
    assert meta["moesim_version"] == moesim.__version__
    assert meta["created_utc"].endswith("+00:00")
    if meta["git"] is not None:  # a git checkout
        assert len(meta["git"]["commit"]) == 40
    assert json.loads((two_runs[0] / "metadata.json").read_text())["command"] is None


def test_summary_table_headline_is_the_median_with_its_band(two_runs):
    from moesim.cli import format_summary

    summary = json.loads((two_runs[1] / "summary.json").read_text())
    text = format_summary(summary)
    header = text.splitlines()[0]
    for label in ("lost vs balanced", "imbalance", "hw straggler", "imbalance $"):
        assert label in header
    row = next(line for line in text.splitlines() if line.startswith("aux_loss"))
    values = summary["aux_loss"]
    p50 = values["gpu_hours_p50"]
    assert f"{p50:.4g} ({values['gpu_hours_p10']:.4g}–{values['gpu_hours_p90']:.4g})" in row
    assert "P50 over 2 seeds (P10–P90 in brackets)" in text
    footnote = text.splitlines()[-1]
    assert "median-GPU-hours seed (" in footnote
    assert f"aux_loss {values['headline_seed']}" in footnote
    # The headline is the P50, a run inside its own band, even with two seeds.
    assert values["gpu_hours"] == p50
    assert values["gpu_hours_p10"] <= values["gpu_hours"] <= values["gpu_hours_p90"]
    # Small dollar amounts keep their significant digits instead of rounding to 0.
    assert 0 < values["cost_usd_p50"] < 1
    assert f"{values['cost_usd_p50']:.4g}" in row
    single = format_summary(json.loads((two_runs[0] / "summary.json").read_text()))
    assert "(" not in single
    assert "seeds" not in single
