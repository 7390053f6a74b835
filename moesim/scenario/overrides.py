"""``--set KEY=VALUE`` overrides: dotted paths with list indices applied to a parsed scenario.

A key is a dotted path through the scenario's sections, with ``[i]`` for an item of a list:
``cluster.nodes``, ``strategies[1].gamma``, ``faults.failures.rate``. A value is YAML
(``4``, ``1e-4``, ``true``, ``[1, 2]``, ``{kind: aux_loss, alpha: 1e-3}``); a number written
in scientific notation without a decimal point (``1e-4``, which PyYAML's YAML 1.1 reads as a
string) is read as a number, as YAML 1.2 does. Missing mappings along the path are created, so
``uncertainty.seeds=4`` works on a file without an ``uncertainty`` section; an unknown key
is left for the schema to reject with its usual one-line message. A ``cluster.gpu`` given as a
catalogue name becomes ``{preset: NAME}`` when a path goes inside it
(``cluster.gpu.hbm_gib=96``).

Everything here is pure: it takes and returns plain mappings and raises
:class:`~moesim.errors.ScenarioError` naming the override's path.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

import yaml

from moesim.errors import ScenarioError

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_SEGMENT = re.compile(rf"({_NAME})((?:\[\d+\])*)")
_INDEX = re.compile(r"\[(\d+)\]")

PathPart = str | int


def parse_path(key: str) -> tuple[PathPart, ...]:
    """``'strategies[1].gamma'`` → ``('strategies', 1, 'gamma')``."""
    parts: list[PathPart] = []
    for segment in key.split("."):
        m = _SEGMENT.fullmatch(segment)
        if m is None:
            raise ScenarioError(
                key or "--set",
                "not a field path (expected names joined by dots, with [i] for list items, "
                "e.g. strategies[1].gamma)",
            )
        parts.append(m.group(1))
        parts.extend(int(i) for i in _INDEX.findall(m.group(2)))
    return tuple(parts)


def format_path(parts: Iterable[PathPart]) -> str:
    """``('strategies', 1, 'gamma')`` → ``'strategies[1].gamma'``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


YAML12_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
"""Floats in scientific notation as YAML 1.2 reads them. PyYAML follows YAML 1.1, whose float
needs a decimal point and a signed exponent, so it reads ``5e9`` and ``14.8e12`` as strings."""


def read_yaml12_floats(loader: type[yaml.SafeLoader]) -> None:
    """Make ``loader`` (a SafeLoader subclass) read :data:`YAML12_EXPONENT_FLOAT` as floats."""
    loader.add_implicit_resolver(
        "tag:yaml.org,2002:float", YAML12_EXPONENT_FLOAT, list("-+0123456789.")
    )


class Yaml12Loader(yaml.SafeLoader):
    """YAML with floats as YAML 1.2 writes them: ``1e-4`` is a number, not a string."""


read_yaml12_floats(Yaml12Loader)


def parse_value(text: str, key: str = "--set") -> Any:
    """A YAML value; scientific notation without a decimal point (``1e-4``) is a number too."""
    try:
        return yaml.load(text, Loader=Yaml12Loader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ScenarioError(key, f"value {text!r} is not valid YAML: {problem}") from None


def split_assignment(text: str) -> tuple[str, str]:
    """``'a.b=1'`` → ``('a.b', '1')``; the first ``=`` separates key and value."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ScenarioError("--set", f"{text!r} is not KEY=VALUE (e.g. cluster.nodes=4)")
    return key, value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``'strategies[1].gamma=1e-4'`` → ``('strategies[1].gamma', 0.0001)`` (path checked)."""
    key, value = split_assignment(text)
    parse_path(key)
    return key, parse_value(value, key)


def split_values(text: str) -> list[str]:
    """Split a comma-separated list of YAML values at top-level commas only (not inside
    brackets, braces or quotes): ``'1,[2, 3],"a,b"'`` → ``['1', '[2, 3]', '"a,b"']``."""
    items: list[str] = []
    depth = 0
    quote = ""
    start = 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items]


def set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (a dotted path) to ``value`` in ``raw``, in place."""
    parts = parse_path(key)
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        nxt = parts[depth + 1]
        where = format_path(parts[: depth + 1])
        node = _child(node, part, where, make_list=isinstance(nxt, int))
        if isinstance(nxt, int) and not isinstance(node, list):
            raise ScenarioError(where, f"is not a list, so [{nxt}] does not apply")
        if isinstance(nxt, str) and not isinstance(node, dict):
            if parts[: depth + 1] == ("cluster", "gpu") and isinstance(node, str):
                node = {"preset": node}
                raw["cluster"]["gpu"] = node
            elif isinstance(node, list):
                raise ScenarioError(
                    where, f"is a list, so .{nxt} does not apply (use {where}[i].{nxt})"
                )
            else:
                raise ScenarioError(where, f"is {node!r}, not a section, so .{nxt} does not apply")
    last = parts[-1]
    if isinstance(last, int):
        _check_index(node, last, format_path(parts))
        node[last] = value
    else:
        node[last] = value


def _check_index(node: list[Any], index: int, where: str) -> None:
    if index >= len(node):
        raise ScenarioError(
            where, f"index out of range (the list has {len(node)} item{'s' * (len(node) != 1)})"
        )


def _child(node: Any, part: PathPart, where: str, make_list: bool) -> Any:
    if isinstance(part, int):
        _check_index(node, part, where)
        return node[part]
    if part not in node or node[part] is None:
        node[part] = [] if make_list else {}
    return node[part]


def apply_overrides(raw: Any, assignments: Iterable[str | tuple[str, Any]]) -> Any:
    """A deep copy of ``raw`` (a parsed scenario mapping) with each assignment applied in order.

    Parameters
    ----------
    raw
        The scenario as parsed from YAML.
    assignments
        ``'KEY=VALUE'`` strings (the value parsed as YAML) or ``(key, value)`` pairs (the value
        used as it is).
    """
    items = list(assignments)
    if not items:
        return raw
    if not isinstance(raw, dict):
        raise ScenarioError("--set", "the scenario must be a mapping of sections to override")
    out = copy.deepcopy(raw)
    for item in items:
        key, value = parse_assignment(item) if isinstance(item, str) else item
        set_path(out, key, value)
    return out
