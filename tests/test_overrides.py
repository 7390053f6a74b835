"""``--set KEY=VALUE`` overrides: path parsing, YAML values, errors naming the field path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moesim.cli import main
from moesim.errors import ScenarioError
from moesim.scenario import load_scenario, scenario_from_dict
from moesim.scenario.overrides import (
    apply_overrides,
    format_path,
    parse_assignment,
    parse_path,
    parse_value,
    split_values,
)


def test_parse_path_with_indices():
    assert parse_path("strategies[1].gamma") == ("strategies", 1, "gamma")
    assert parse_path("a[0][2].b") == ("a", 0, 2, "b")
    assert format_path(parse_path("a[0][2].b_c")) == "a[0][2].b_c"


@pytest.mark.parametrize("key", ["", "a..b", ".a", "a.", "a[x]", "a[-1]", "1a", "a b"])
def test_bad_paths(key):
    with pytest.raises(ScenarioError, match="not a field path"):
        parse_path(key)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4", 4),
        ("1e-4", 1e-4),  # PyYAML 1.1 would read this as a string
        ("-2.5E3", -2500.0),
        ("1.0e-3", 1e-3),
        ("true", True),
        ("H100", "H100"),
        ("'1e-4'", "1e-4"),  # quoted: stays a string
        ("[1, 2]", [1, 2]),
        ("{kind: aux_loss, alpha: 1e-3}", {"kind": "aux_loss", "alpha": 1e-3}),
        ("", None),
    ],
)
def test_values_are_yaml(text, value):
    assert parse_value(text) == value


def test_assignment_splits_at_first_equals():
    assert parse_assignment("name=a=b") == ("name", "a=b")
    with pytest.raises(ScenarioError, match="is not KEY=VALUE"):
        parse_assignment("cluster.nodes")
    with pytest.raises(ScenarioError, match=r"^cluster\.nodes: value '\[1' is not valid YAML"):
        parse_assignment("cluster.nodes=[1")


def test_split_values_top_level_commas_only():
    assert split_values('1, [2, 3],{a: 1, b: 2},"x,y"') == ["1", "[2, 3]", "{a: 1, b: 2}", '"x,y"']


def test_apply_overrides_is_a_copy_and_creates_sections(tiny_dict):
    out = apply_overrides(
        tiny_dict,
        ["strategies[1].gamma=1e-4", "uncertainty.seeds=3", "cluster.nodes=4", ("seed", 11)],
    )
    assert out["strategies"][1]["gamma"] == 1e-4
    assert out["uncertainty"] == {"seeds": 3}
    assert out["seed"] == 11
    assert tiny_dict["strategies"][1]["gamma"] == 1e-3  # input untouched
    assert "uncertainty" not in tiny_dict
    sc = scenario_from_dict(apply_overrides(tiny_dict, ["strategies[1].gamma=1e-4"]))
    assert sc.strategies[1].gamma == pytest.approx(1e-4)


def test_gpu_preset_name_becomes_a_preset_mapping(tiny_dict):
    out = apply_overrides(tiny_dict, ["cluster.gpu.hbm_gib=96"])
    assert out["cluster"]["gpu"] == {"preset": "H100", "hbm_gib": 96}
    assert scenario_from_dict(out).cluster.gpu.hbm_gib == 96


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("strategies[5].gamma=1", r"^strategies\[5\]: index out of range \(the list has 2 items\)"),
        ("strategies.gamma=1", r"^strategies: is a list, so \.gamma does not apply"),
        ("seed[0]=1", r"^seed: is not a list"),
        ("training.total_tokens.x=1", r"^training\.total_tokens: is 2000000\.0, not a section"),
    ],
)
def test_path_errors_name_the_field(tiny_dict, assignment, message):
    with pytest.raises(ScenarioError, match=message):
        apply_overrides(tiny_dict, [assignment])


def _write(tmp_path: Path, raw) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_load_scenario_applies_sets(tmp_path, tiny_dict):
    sc = load_scenario(_write(tmp_path, tiny_dict), {"seed": 5}, sets=["seed=6", "name=other"])
    assert sc.seed == 6
    assert sc.name == "other"


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("cluster.nodes=abc", "error: cluster.nodes: Input should be a valid integer"),
        ("cluster.bogus=1", "error: cluster.bogus: unknown key"),
        ("strategies[1].gamma=-1", "error: strategies[1].gamma:"),
        ("strategies[3].gamma=1", "error: strategies[3]: index out of range"),
        ("nokey", "error: --set: 'nokey' is not KEY=VALUE"),
    ],
)
def test_cli_set_errors_are_one_line(tmp_path, capsys, tiny_dict, assignment, expected):
    scenario = _write(tmp_path, tiny_dict)
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--quiet", "--set", assignment]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(expected)
    assert len(err.splitlines()) == 1
    assert not out.exists()
    assert main(["validate", str(scenario), "--set", assignment]) == 2
    assert capsys.readouterr().err.strip().startswith(expected)


def test_cli_validate_with_sets(tmp_path, capsys, tiny_dict):
    scenario = _write(tmp_path, tiny_dict)
    assert main(["validate", str(scenario), "--set", "cluster.nodes=4", "--set", "data=2"]) == 2
    assert "error: data: unknown key" in capsys.readouterr().err
    assert (
        main(["validate", str(scenario), "--set", "cluster.nodes=4", "--set", "parallelism.data=2"])
        == 0
    )
    assert "16 × H100" in capsys.readouterr().out
