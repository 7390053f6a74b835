"""Loading scenario files: YAML → presets resolved → validated, frozen :class:`Scenario`.

Every failure becomes one :class:`~moesim.errors.ScenarioError` naming the dotted field path, so
the CLI can print a single line. The resolved scenario (presets expanded, defaults filled) can be
dumped back to YAML with :func:`dump_scenario`, and reloads to an equal scenario.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from moesim.errors import ScenarioError
from moesim.scenario.overrides import apply_overrides, read_yaml12_floats
from moesim.scenario.presets import GPU_PRESETS
from moesim.scenario.schema import Scenario

MAX_SCENARIO_BYTES = 1 << 20
"""Largest scenario file read (1 MiB; the shipped scenarios are a few KiB)."""
MAX_PATH_CHARS = 4096
"""Longest scenario path accepted (Linux PATH_MAX)."""
MAX_NAME_BYTES = 255
"""Longest path component accepted (Linux NAME_MAX)."""
MAX_DEPTH = 32
"""Deepest YAML nesting accepted (the schema nests six levels)."""
MAX_NODES = 50_000
"""Most YAML nodes after alias expansion (a billion-laughs file expands exponentially)."""
_SHOWN_CHARS = 60


def show(value: Any, limit: int = _SHOWN_CHARS) -> str:
    """``repr`` of a value for an error message: control characters escaped, at most ``limit``
    characters (a message never carries more than a glimpse of what the user wrote)."""
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in repr(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _where(path: str | Path) -> str:
    """The path as an error message shows it (escaped, shortened)."""
    text = "".join(c if c.isprintable() else "?" for c in str(path))
    return text if len(text) <= 120 else "…" + text[-119:]


def read_scenario_text(path: str | Path) -> tuple[str, str]:
    """The decoded text of a scenario file and the name errors use for it.

    Refuses, with one :class:`ScenarioError` each: paths too long or holding NUL, missing or
    unreadable files, directories, devices, FIFOs and sockets (never opened, so ``/dev/zero`` or
    a FIFO cannot hang the reader), files over :data:`MAX_SCENARIO_BYTES`, and bytes that are
    not UTF-8 (a UTF-8 byte-order mark is skipped)."""
    name = str(path)
    where = _where(name)
    if "\0" in name:
        raise ScenarioError(where, "the path holds a NUL character")
    if len(name) > MAX_PATH_CHARS or any(
        len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for part in Path(name).parts
    ):
        raise ScenarioError(where, "the path is too long")
    try:
        info = os.stat(name)
    except FileNotFoundError:
        raise ScenarioError(where, "no such scenario file") from None
    except OSError as exc:
        raise ScenarioError(where, f"cannot read the scenario file ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ScenarioError(where, "is a directory, not a scenario file")
    if not stat.S_ISREG(info.st_mode):
        raise ScenarioError(where, "not a regular file (a device, FIFO or socket)")
    if info.st_size > MAX_SCENARIO_BYTES:
        raise ScenarioError(
            where, f"{info.st_size:,} bytes; a scenario file holds at most {MAX_SCENARIO_BYTES:,}"
        )
    try:
        # O_NONBLOCK: should the file be swapped for a FIFO after the check, open does not wait.
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise ScenarioError(where, "not a regular file (a device, FIFO or socket)")
            data = fh.read(MAX_SCENARIO_BYTES + 1)
    except OSError as exc:
        raise ScenarioError(where, f"cannot read the scenario file ({exc.strerror})") from None
    if len(data) > MAX_SCENARIO_BYTES:
        raise ScenarioError(where, f"a scenario file holds at most {MAX_SCENARIO_BYTES:,} bytes")
    return decode_scenario_bytes(data, where), where


def decode_scenario_bytes(data: bytes, where: str = "scenario") -> str:
    """UTF-8 text of a scenario file (a leading byte-order mark is dropped)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ScenarioError(where, "the file is UTF-16; save it as UTF-8")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ScenarioError(
            where, f"not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save as UTF-8"
        ) from None


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python tags) that also refuses duplicate keys, nesting deeper
    than :data:`MAX_DEPTH` and documents that alias expansion would blow up, and reads
    ``5e9`` as the number YAML 1.2 says it is."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.MarkedYAMLError(
                    problem=f"nested deeper than {MAX_DEPTH} levels", problem_mark=mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                    key_node, yaml.ScalarNode
                ):
                    continue
                key = self.construct_object(key_node)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    continue
                if duplicate:
                    raise yaml.MarkedYAMLError(
                        problem=f"duplicate key {show(key)}", problem_mark=key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


read_yaml12_floats(_StrictLoader)


def _expanded_nodes(root: Any) -> int:
    """Nodes of the document with every alias expanded (memoised; a cycle counts as too many)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            return MAX_NODES + 1
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                if total > MAX_NODES:
                    break
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += size(k) + size(v)
                if total > MAX_NODES:
                    break
        active.discard(key)
        sizes[key] = min(total, MAX_NODES + 1)
        return sizes[key]

    return size(root)


def parse_yaml(text: str, where: str = "scenario") -> Any:
    """Parse scenario YAML into Python objects; any parser failure is one ScenarioError."""
    loader = None
    try:
        loader = _StrictLoader(text)  # the reader already refuses control characters here
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node) > MAX_NODES:
            raise ScenarioError(
                where, f"the YAML expands to more than {MAX_NODES:,} values (aliases or cycles)"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["parse error"])[0]
        raise ScenarioError(where, f"malformed YAML{at}: {problem}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # Constructors of tagged scalars (!!timestamp, !!int, !!binary) raise these.
        raise ScenarioError(where, f"malformed YAML: {show(str(exc))}") from None
    finally:
        if loader is not None:
            loader.dispose()


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
            msg = f"{msg} (got {show(value)})"
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
    where = "cluster.gpu.preset" if isinstance(gpu, dict) else "cluster.gpu"
    if not isinstance(preset_name, str) or preset_name not in GPU_PRESETS:
        raise ScenarioError(
            where,
            f"unknown GPU {show(preset_name)}; the catalogue has {', '.join(sorted(GPU_PRESETS))}",
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
        A YAML scenario file (UTF-8, with or without a byte-order mark, at most
        :data:`MAX_SCENARIO_BYTES`).
    overrides : dict, optional
        Top-level keys replacing the file's (the CLI's ``--seed`` uses this).
    sets : sequence, optional
        ``KEY=VALUE`` overrides with dotted paths (``strategies[1].gamma=1e-4``; see
        :mod:`moesim.scenario.overrides`), applied after ``overrides``.
    """
    text, where = read_scenario_text(path)
    raw = parse_yaml(text, where)
    if overrides and isinstance(raw, dict):
        raw = {**raw, **overrides}
    raw = apply_overrides(raw, sets)
    return scenario_from_dict(raw, source=where)


def dump_scenario(scenario: Scenario) -> str:
    """The resolved scenario as YAML (every default and preset value written out)."""
    return yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False)
