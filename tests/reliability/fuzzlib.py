"""Scenario fuzzing: hypothesis strategies and the one oracle every case must satisfy.

Inputs: scenarios drawn from the schema (small, valid), near-valid ones (one field replaced by
an extreme, a wrong type or junk, or deleted), the shipped scenarios mutated the same way, and
raw-text mutations (bytes, nesting, duplicate keys, aliases, tags). The oracle runs the CLI in
this process (``moesim validate`` or, small, ``moesim run``) under an alarm and accepts exactly:

- exit 0 — and for ``run`` a run directory whose ``summary.json`` is strict JSON and whose
  tables satisfy :mod:`moesim.estimate.invariants`;
- exit 2 with exactly one stderr line, starting ``error:``, that is not an internal error.

Anything else is a crash (traceback, other exit status, internal error), a hang (the alarm
fired) or an invariant violation.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from moesim.cli import main
from moesim.estimate.invariants import check_invariants
from moesim.results import load
from moesim.results.store import TABLES

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "scenarios").glob("*.yaml"))

SMALL: dict[str, Any] = {
    "name": "fuzz",
    "seed": 1,
    "model": {
        "layers": 2,
        "dense_layers": 0,
        "hidden": 256,
        "attention": {"kind": "gqa", "heads": 4, "kv_heads": 2, "head_dim": 64},
        "vocab": 1000,
        "seq_len": 64,
        "moe": {"routed_experts": 4, "shared_experts": 0, "top_k": 2, "expert_ffn": 128},
    },
    "cluster": {
        "gpu": "H100",
        "nodes": 1,
        "gpus_per_node": 2,
        "nvlink": {"latency_us": 3.0, "efficiency": 0.8},
        "nic": {"bandwidth_gbits_per_s": 400, "latency_us": 2.8, "efficiency": 0.9},
        "price_usd_per_gpu_hour": 2.0,
    },
    "parallelism": {"pipeline": 1, "expert": 2, "data": 1, "micro_batch_size": 1},
    "strategies": [
        {"name": "aux", "kind": "aux_loss", "alpha": 1e-3},
        {"name": "free", "kind": "loss_free", "gamma": 1e-3},
    ],
    "stream": {"topics": 8, "dim": 16},
    "gate": {
        "layers_simulated": 1,
        "batch_sequences": 4,
        "tokens_per_sequence": 8,
        "routed_tokens_per_sequence": 8,
    },
    "training": {"total_tokens": 4096.0, "global_batch_sequences": 4, "sample_points": 1},
    "engine": {"time_budget_minutes": 2.0},
    "output": {"trace": False},
}
"""A scenario that runs in about a second: 2 GPUs, 4 experts, 16 steps of 256 tokens."""

JUNK: list[Any] = [
    None,
    True,
    0,
    -1,
    1,
    2**31,
    2**70,
    -(2**63),
    0.0,
    -0.0,
    1e-300,
    5e-324,
    1e308,
    -1e308,
    math.inf,
    -math.inf,
    math.nan,
    "",
    "x" * 500,
    "../../x",
    "/abs/path",
    "a\x00b",
    "\x1b[31mred\x1b[0m",
    "$\\alpha_{x}$",
    "optimal",
    "H100",
    [],
    [1, 2, 3],
    ["H100"],
    {},
    {"preset": ["H100"]},
    {"preset": {"a": 1}},
    {"kind": "none"},
]
"""Values a hand-edited YAML file may hold where a number, string or section was expected."""


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((*prefix, i))
            out.extend(_paths(v, (*prefix, i)))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any, delete: bool = False) -> Any:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def scale_value(value: Any, factor: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    out = value * factor
    return int(out) if isinstance(value, int) and math.isfinite(out) else out


@st.composite
def valid_small(draw: st.DrawFn) -> dict[str, Any]:
    """Small scenarios drawn from the schema's ranges (most validate; some cross-field
    combinations are refused, which the oracle accepts as a clean error)."""
    doc = copy.deepcopy(SMALL)
    ep = draw(st.sampled_from([1, 2, 4]))
    pp = draw(st.sampled_from([1, 2]))
    gpn = draw(st.sampled_from([ep, 2 * ep] if ep < 4 else [4]))
    dp = gpn // ep
    nodes = pp
    experts = ep * draw(st.sampled_from([1, 2, 4]))
    doc["cluster"].update(nodes=nodes, gpus_per_node=gpn)
    doc["parallelism"].update(pipeline=pp, expert=ep, data=dp)
    schedules = ["1f1b", "zb1p", "dualpipe"] if pp % 2 == 0 else ["1f1b", "zb1p"]
    doc["parallelism"]["schedule"] = draw(st.sampled_from(schedules))
    doc["model"]["layers"] = draw(st.integers(max(2, pp), 4))
    doc["model"]["moe"]["routed_experts"] = experts
    doc["model"]["moe"]["top_k"] = draw(st.integers(1, min(2, experts)))
    doc["training"]["global_batch_sequences"] = ep * dp * draw(st.sampled_from([2, 4]))
    doc["training"]["total_tokens"] = float(draw(st.integers(1, 4096 * 4)))
    doc["router"] = {"score": draw(st.sampled_from(["sigmoid", "softmax"]))}
    if doc["router"]["score"] == "softmax":  # loss-free bias needs sigmoid scores
        doc["strategies"][1] = {"name": "none", "kind": "none"}
    if draw(st.booleans()):
        doc["router"]["capacity"] = {"factor": draw(st.floats(0.5, 2.0))}
    doc["cluster"]["price_usd_per_gpu_hour"] = draw(st.floats(0, 100_000))
    doc["cluster"]["nvlink"]["efficiency"] = draw(st.floats(0.01, 1))
    doc["cluster"]["nic"]["latency_us"] = draw(st.floats(0, 1e6))
    doc["stream"]["noise"] = draw(st.floats(0, 100))
    if draw(st.booleans()):
        doc["faults"] = {
            "failures": {
                "enabled": True,
                "gpu_mtbf_hours": draw(st.floats(1, 1e9)),
                "restart_minutes": draw(st.floats(0, 10_080)),
                "checkpoint_write_seconds": draw(st.floats(1e-3, 86_400)),
            },
            "jitter": {"sigma": draw(st.floats(0, 1))},
        }
    if draw(st.booleans()):
        doc["uncertainty"] = {"seeds": 2, "workers": draw(st.integers(1, 64))}
    if draw(st.booleans()):
        doc["eplb"] = {"enabled": True}
    return doc


@st.composite
def near_valid(draw: st.DrawFn, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """One field of a scenario replaced by junk, scaled to an extreme, or deleted."""
    doc = base if base is not None else draw(valid_small())
    path = draw(st.sampled_from(_paths(doc)))
    how = draw(st.sampled_from(["junk", "scale", "delete"]))
    if how == "delete":
        return _set(doc, path, None, delete=True)
    if how == "scale":
        node = doc
        for key in path:
            node = node[key]
        factor = draw(st.sampled_from([0.0, -1.0, 1e-9, 1e3, 1e6, 1e12, 1e300]))
        return _set(doc, path, scale_value(node, factor))
    return _set(doc, path, draw(st.sampled_from(JUNK)))


_SHIPPED_DOCS = {p.stem: yaml.safe_load(p.read_text()) for p in SHIPPED}


@st.composite
def shipped_mutants(draw: st.DrawFn) -> dict[str, Any]:
    """A shipped scenario with one or two fields mutated (validate only: they are big)."""
    doc = _SHIPPED_DOCS[draw(st.sampled_from(sorted(_SHIPPED_DOCS)))]
    doc = draw(near_valid(doc))
    return draw(near_valid(doc)) if draw(st.booleans()) else doc


def _nest(depth: int) -> str:
    return "a: " + "[" * depth + "]" * depth + "\n"


TEXT_MUTATIONS = {
    "deep": lambda text, n: text + _nest(10 + n % 5000),
    "dup_key": lambda text, n: text + "seed: 1\n",
    "latin1": lambda text, n: ("# caf\xe9\n" + text).encode("latin-1", "replace"),
    "utf16": lambda text, n: text.encode("utf-16"),
    "bom": lambda text, n: b"\xef\xbb\xbf" + text.encode(),
    "binary": lambda text, n: bytes((n * 7919 + i * 31) % 256 for i in range(64 + n % 500)),
    "truncate": lambda text, n: text[: n % max(1, len(text))],
    "tag": lambda text, n: text + "x: !!python/object/apply:os.system ['true']\n",
    "timestamp": lambda text, n: text + "y: !!timestamp 2024-13-45\n",
    "laughs": lambda text, n: (
        "l0: &l0 [a,a,a,a,a,a,a,a,a,a]\n"
        + "".join(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(1, 8))
    ),
    "control": lambda text, n: text.replace("name: ", "name: \x1b[2J", 1),
    "tab": lambda text, n: text.replace("  ", "\t", 1),
    "nul": lambda text, n: text[: n % max(1, len(text))] + "\x00" + text[n % max(1, len(text)) :],
}


@st.composite
def raw_texts(draw: st.DrawFn) -> bytes:
    """Scenario files mutated as text or bytes."""
    doc = draw(st.one_of(valid_small(), st.sampled_from(list(_SHIPPED_DOCS.values()))))
    text = yaml.safe_dump(doc, sort_keys=False)
    kind = draw(st.sampled_from(sorted(TEXT_MUTATIONS)))
    out = TEXT_MUTATIONS[kind](text, draw(st.integers(0, 10**6)))
    return out if isinstance(out, bytes) else out.encode("utf-8", "surrogatepass")


def dump(doc: dict[str, Any]) -> bytes:
    """YAML of a (possibly junk-holding) document; NaN and inf become .nan / .inf."""
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode()


class Hang(BaseException):
    """The alarm fired: the case ran past its time limit."""


def _alarm(signum: int, frame: object) -> None:
    raise Hang


OUTCOMES = ("ok", "clean_error", "crash", "hang", "violation")


def run_cli(argv: list[str], timeout_s: int) -> tuple[int | None, str, str]:
    """Run the CLI in this process: (exit status or None on a hang, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout_s)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code: int | None = main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 2
            except Hang:
                code = None
            except BaseException as exc:  # a crash: report it as one
                err.write(f"Traceback (uncaught {type(exc).__name__}: {exc})\n")
                code = 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, out.getvalue(), err.getvalue()


def classify(
    data: bytes, workdir: Path, command: str = "validate", timeout_s: int = 20
) -> tuple[str, str]:
    """Write ``data`` as a scenario, run ``moesim <command>`` on it: (outcome, detail)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "case.yaml"
    path.write_bytes(data)
    out_dir = workdir / "out"
    argv = [command, str(path)]
    if command == "run":
        argv += ["--out", str(out_dir), "--quiet"]
    code, _stdout, stderr = run_cli(argv, timeout_s)
    lines = [line for line in stderr.splitlines() if line.strip()]
    if code is None:
        return "hang", f"over {timeout_s} s"
    if code == 2:
        if len(lines) != 1 or not lines[0].startswith("error: "):
            return "crash", f"exit 2 with {len(lines)} lines: {stderr[-500:]}"
        if "internal error" in lines[0]:
            return "crash", lines[0]
        if "output invariant" in lines[0]:
            return "violation", lines[0]
        if out_dir.exists():
            return "crash", "a failed run left its directory"
        return "clean_error", lines[0]
    if code != 0:
        return "crash", f"exit {code}: {stderr[-1000:]}"
    if command == "run":
        try:
            json.loads(
                (out_dir / "summary.json").read_text(),
                parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)),
            )
            run = load(out_dir)
            frames = {name: getattr(run, name) for name in TABLES}
            check_invariants(
                run.scenario.name, frames, run.summary, run.scenario.training.total_tokens
            )
        except Exception as exc:  # noqa: BLE001 - any failure here is a violation
            return "violation", f"{type(exc).__name__}: {exc}"
    return "ok", ""


def tally(counts: Counter[str]) -> str:
    return ", ".join(f"{k}={counts.get(k, 0)}" for k in OUTCOMES)
