"""``moesim schema``: a JSON Schema that every shipped scenario file passes and that refuses
what the loader refuses by type."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from moesim.cli import main
from moesim.scenario.loader import parse_yaml

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    """The schema exactly as the command prints it."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["schema"]) == 0
    schema = json.loads(out.getvalue())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _raw(path: Path) -> dict:
    return parse_yaml(path.read_text(), str(path))


def test_the_scenarios_are_there():
    assert len(SCENARIOS) >= 5


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_every_shipped_scenario_passes_the_schema(validator, path):
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(_raw(path))]
    assert errors == []


def test_exponent_floats_load_as_numbers():
    """YAML 1.2 floats: PyYAML's YAML 1.1 rules would read these as strings."""
    doc = parse_yaml("a: 5e9\nb: 14.8e12\nc: -1E-4\nd: 1.5\ne: '5e9'\nf: 12\n")
    assert doc == {"a": 5e9, "b": 14.8e12, "c": -1e-4, "d": 1.5, "e": "5e9", "f": 12}
    assert isinstance(doc["a"], float)
    assert isinstance(doc["f"], int)


def test_gpu_presets_by_name_and_with_overrides(validator):
    raw = _raw(ROOT / "scenarios" / "quickstart.yaml")
    for gpu in ("H800", {"preset": "H100", "sms": 120}):
        doc = copy.deepcopy(raw)
        doc["cluster"]["gpu"] = gpu
        assert validator.is_valid(doc), gpu


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("cluster", "nodes"), "four"),  # a string where an integer belongs
        (("training", "total_tokens"), [1, 2]),
        (("cluster", "gpu"), "H900"),  # not in the catalogue
        (("cluster", "gpu"), {"preset": "H100", "warp_drive": 1}),  # not a GPU field
        (("cluster", "colour"), "blue"),  # unknown key
    ],
)
def test_wrong_values_are_refused(validator, path, value):
    doc = _raw(ROOT / "scenarios" / "quickstart.yaml")
    doc[path[0]][path[1]] = value
    assert not validator.is_valid(doc)


def test_schema_piped_into_a_short_reader_ends_quietly():
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "import sys; from moesim.cli import main; sys.exit(main())"]
    schema = subprocess.Popen([*cmd, "schema"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert schema.stdout is not None
    schema.stdout.read(10)
    schema.stdout.close()  # like `| head -c 10`; the schema outgrows a 64 KiB pipe buffer
    _, err = schema.communicate(timeout=60)
    assert schema.returncode == 0
    assert err == b""
