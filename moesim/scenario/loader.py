"""Loading scenario files: YAML → presets resolved → validated, frozen :class:`Scenario`.

Every failure becomes one :class:`~moesim.errors.ScenarioError` naming the dotted field path, so
the CLI can print a single line. The resolved scenario (presets expanded, defaults filled) can be
dumped back to YAML with :func:`dump_scenario`, and reloads to an equal scenario.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from moesim.errors import ScenarioError
from moesim.scenario.overrides import apply_overrides
from moesim.scenario.presets import GPU_PRESETS
from moesim.scenario.schema import Scenario


def _error_path(loc: tuple[int | str, ...]) -> str:
    """('strategies', 1, 'gamma') → 'strategies[1].gamma'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _from_validation_error(exc: ValidationError) -> ScenarioError:
    first = exc.errors()[0]
    path = _error_path(tuple(first["loc"]))
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (not part of the scenario schema)"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        # Cross-field validators start their message with the field they blame.
        head, sep, rest = msg.partition(": ")
        if sep and " " not in head:
            path = f"{path}.{head}" if path else head
            msg = rest
    if "input" in first and first["type"] not in ("extra_forbidden", "missing"):
        value = first["input"]
        if not isinstance(value, dict | list):
            msg = f"{msg} (got {value!r})"
    more = len(exc.errors()) - 1
    if more:
        msg += f" (and {more} more error{'s' if more > 1 else ''})"
    return ScenarioError(path or "scenario", msg)


def _resolve_gpu(raw: dict[str, Any]) -> dict[str, Any]:
    """Expand ``cluster.gpu: NAME`` or ``{preset: NAME, field: override}`` from the catalogue."""
    cluster = raw.get("cluster")
    if not isinstance(cluster, dict):
        return raw
    gpu = cluster.get("gpu")
    preset_name: str | None = None
    overrides: dict[str, Any] = {}
    if isinstance(gpu, str):
        preset_name = gpu
    elif isinstance(gpu, dict) and "preset" in gpu:
        overrides = {k: v for k, v in gpu.items() if k != "preset"}
        preset_name = gpu["preset"]
    if preset_name is None:
        return raw
    if preset_name not in GPU_PRESETS:
        raise ScenarioError(
            "cluster.gpu",
            f"unknown GPU {preset_name!r}; the catalogue has {', '.join(sorted(GPU_PRESETS))}",
        )
    resolved = {**GPU_PRESETS[preset_name], **overrides}
    return {**raw, "cluster": {**cluster, "gpu": resolved}}


def scenario_from_dict(raw: Any, source: str = "scenario") -> Scenario:
    """Validate a mapping (as parsed from YAML) into a :class:`Scenario`."""
    if not isinstance(raw, dict):
        raise ScenarioError(source, "the file must hold a mapping of sections (model, cluster, …)")
    try:
        return Scenario.model_validate(_resolve_gpu(raw))
    except ValidationError as exc:
        raise _from_validation_error(exc) from None


def load_scenario(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    sets: Sequence[str | tuple[str, Any]] = (),
) -> Scenario:
    """Read and validate a scenario file.

    Parameters
    ----------
    path : str or Path
        A YAML scenario file.
    overrides : dict, optional
        Top-level keys replacing the file's (the CLI's ``--seed`` uses this).
    sets : sequence, optional
        ``KEY=VALUE`` overrides with dotted paths (``strategies[1].gamma=1e-4``; see
        :mod:`moesim.scenario.overrides`), applied after ``overrides``.
    """
    p = Path(path)
    if not p.is_file():
        raise ScenarioError(str(p), "no such scenario file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ScenarioError(str(p), f"malformed YAML{where}: {problem}") from None
    if overrides and isinstance(raw, dict):
        raw = {**raw, **overrides}
    raw = apply_overrides(raw, sets)
    return scenario_from_dict(raw, source=str(p))


def dump_scenario(scenario: Scenario) -> str:
    """The resolved scenario as YAML (every default and preset value written out)."""
    return yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False)
