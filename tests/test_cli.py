"""The command line: one-line errors, exit status 2, no run directory on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moesim.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, raw) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["cluster"].update(bogus=1), "error: cluster.bogus: unknown key"),
        (lambda d: d["model"].update(layers="four"), "error: model.layers:"),
        (
            lambda d: d["parallelism"].update(pipeline=4),
            "error: parallelism: pipeline×expert_tensor×expert×data",
        ),
    ],
    ids=["unknown-key", "wrong-type", "impossible-parallelism"],
)
def test_bad_scenario_one_line_no_run_dir(tmp_path, capsys, tiny_dict, mutate, expected):
    mutate(tiny_dict)
    scenario = _write(tmp_path, tiny_dict)
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(expected)
    assert len(err.splitlines()) == 1
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s.yaml"]


def test_malformed_yaml_via_subprocess(tmp_path):
    """Through the real entry point: exit 2, one line on stderr, no traceback."""
    scenario = _write(tmp_path, "model: [unclosed\n")
    proc = subprocess.run(
        [sys.executable, "-m", "moesim.cli", "run", str(scenario), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(f"error: {scenario}: malformed YAML at line")
    assert not (tmp_path / "r").exists()


def test_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "no such scenario file" in capsys.readouterr().err


def test_validate_ok(capsys):
    assert main(["validate", str(ROOT / "scenarios" / "quickstart.yaml")]) == 0
    assert "valid" in capsys.readouterr().out


def test_schema_is_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "Scenario"
    assert "parallelism" in schema["properties"]
    assert schema["additionalProperties"] is False


def test_existing_out_dir_is_refused(tmp_path, capsys, tiny_dict):
    scenario = _write(tmp_path, tiny_dict)
    (tmp_path / "taken").mkdir()
    assert main(["run", str(scenario), "--out", str(tmp_path / "taken"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
