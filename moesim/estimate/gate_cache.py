"""A content-addressed cache of trained gate trajectories.

Training the gate is most of a cold run's time, and a trajectory depends on a small part of the
scenario: the model's routing shape, the router, the strategy, the token stream, the gate
settings, the expert-parallel layout the router and the balancing losses see, the training
timeline (steps and tokens before each), the router snapshot steps and the gate's seed. The key
is the SHA-256 of those inputs as canonical JSON (sorted keys), plus moesim's version and
:data:`CACHE_FORMAT`, so a change to the cluster's hardware, the network, prices, faults, EPLB or
output settings reuses the trajectory, and a change to any input of the gate trains it again.
:func:`gate_key_inputs` lists them.

An entry is one directory ``<cache dir>/gate/<key>/`` holding ``manifest.json`` (the format,
the key and its inputs, the SHA-256 of each payload file), ``arrays.npz`` (router snapshots,
final routers, the token stream's arrays, the tail loads; read with ``allow_pickle=False``) and
``records.json`` (the per-update records and the trajectory's scalars). Entries are written
into a temporary directory beside it and renamed into place, so a reader sees a whole entry
or none; of two processes storing the same key, the first rename wins and the other discards
its copy. An entry that fails any check (missing or unreadable file, checksum, format, key) is
reported once as a :class:`GateCacheWarning`, deleted and trained again.

The engine's routing samples drawn from a cached gate are kept too (``<cache dir>/sample/<key>/``,
the same entry form; :meth:`GateCache.load_sample`, :func:`sample_key_inputs`): their key is the
gate's key, the step, the generator's state and the layout and sampling settings they read, so a
sweep over hardware, network or prices reruns only the engine.

Where it lives: ``--cache-dir``, else ``$MOESIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/moesim``,
else ``~/.cache/moesim``. Deleting the directory clears it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moesim import __version__
from moesim.gate import GateTrajectory, RouterState, RoutingSample, TokenStream
from moesim.gate.router import route_options
from moesim.gate.training import balance_context
from moesim.scenario.schema import Scenario
from moesim.scenario.strategies import Strategy

CACHE_FORMAT = 1
"""Version of the entry layout; bump it when the stored fields or their meaning change."""

ENV_DIR = "MOESIM_CACHE_DIR"
MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"
RECORDS = "records.json"
# Gate fields train_gate never reads: the replayed trace (no training at all), which simulated
# router stands for which MoE layer and how many tokens an engine sample routes (both read when
# the engine's samples are drawn from the trajectory, not while it trains).
_GATE_FIELDS_NOT_TRAINED = {"trace", "layer_map", "routed_tokens_per_sequence"}


class GateCacheWarning(UserWarning):
    """A cache entry was unusable (corrupt, partial or of another format) and was replaced."""


def default_cache_dir() -> Path:
    """``$MOESIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/moesim``, else ``~/.cache/moesim``."""
    explicit = os.environ.get(ENV_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "moesim"


def _jsonable(value: Any) -> Any:
    """Dataclasses, tuples and NumPy scalars as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def gate_key_inputs(
    scenario: Scenario,
    strategy: Strategy,
    sample_steps: Sequence[int],
    seed_seq: np.random.SeedSequence,
) -> dict[str, Any]:
    """Everything :func:`moesim.gate.train_gate` reads, as JSON-ready values.

    The validated sections it reads whole (``router``, ``stream``, ``gate`` less the fields
    it never reads, the strategy), the parts of others it reads (the MoE shape, the
    micro-batch size), what it derives from the layout (the route options: group limits from
    the expert-parallel nodes, capacity per device; the balancing losses' ranks, devices and
    micro-batches), the timeline (steps, tokens per step, each ramp step's batch), the
    snapshot steps and the seed sequence.
    """
    moe = scenario.model.moe_spec
    ramp = [scenario.batch_sequences_at(s) for s in range(scenario.ramp_steps)]
    training = scenario.training
    return {
        "format": CACHE_FORMAT,
        "moesim": __version__,
        "moe": {
            "routed_experts": moe.routed_experts,
            "top_k": moe.top_k,
            "shared_experts": moe.shared_experts,
        },
        "router": scenario.router.model_dump(mode="json"),
        "strategy": strategy.model_dump(mode="json"),
        "stream": scenario.stream.model_dump(mode="json"),
        "gate": scenario.gate.model_dump(mode="json", exclude=_GATE_FIELDS_NOT_TRAINED),
        "micro_batch_size": scenario.parallelism.micro_batch_size,
        "route_options": _jsonable(dict(route_options(scenario))),
        "balance_context": _jsonable(balance_context(scenario)),
        "timeline": {
            "total_tokens": training.total_tokens,
            "global_batch_sequences": training.global_batch_sequences,
            "batch_ramp": None
            if training.batch_ramp is None
            else training.batch_ramp.model_dump(mode="json"),
            "seq_len": scenario.model.seq_len,
            "total_steps": scenario.total_steps,
            "ramp_batches_sha256": hashlib.sha256(json.dumps(ramp).encode()).hexdigest(),
        },
        "sample_steps": sorted({int(s) for s in sample_steps}),
        "seed": {
            "entropy": seed_seq.entropy,
            "spawn_key": list(seed_seq.spawn_key),
            "pool_size": seed_seq.pool_size,
        },
    }


def gate_key(inputs: dict[str, Any]) -> str:
    """SHA-256 of ``inputs`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _jsonable_scalar(value: Any) -> Any:
    """A NumPy scalar in a record as its Python value (json.dumps' fallback)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Unusable(Exception):
    """Why a stored entry cannot be used."""


def _stream_arrays(stream: TokenStream) -> dict[str, np.ndarray] | None:
    """The stream's state: its arrays (its parameters come from the scenario). None when it
    holds anything else, which this format cannot store."""
    arrays = {}
    for name, value in vars(stream).items():
        if name == "params":
            continue
        if not isinstance(value, np.ndarray):
            return None
        arrays[name] = value
    return arrays


@dataclass(frozen=True)
class GateCache:
    """Trained gate trajectories under ``directory`` (see the module docstring)."""

    directory: Path

    @classmethod
    def default(cls) -> GateCache:
        """The cache at :func:`default_cache_dir`."""
        return cls(default_cache_dir())

    def entry(self, key: str) -> Path:
        """The directory of ``key``'s entry."""
        return Path(self.directory) / "gate" / key

    def load(self, key: str, scenario: Scenario) -> GateTrajectory | None:
        """The stored trajectory of ``key``, or None when there is none. An unusable entry is
        reported (:class:`GateCacheWarning`), deleted, and None returned."""
        path = self.entry(key)
        if not os.path.lexists(path):
            return None
        try:
            return _read_entry(path, key, scenario)
        except _Unusable as why:
            warnings.warn(
                f"gate cache entry {path} is unusable ({why}); deleted, training again",
                GateCacheWarning,
                stacklevel=2,
            )
            _remove(path)
            return None

    def store(self, key: str, inputs: dict[str, Any], trajectory: GateTrajectory) -> bool:
        """Write ``trajectory`` under ``key`` atomically; False when it cannot be stored (a
        stream with state other than arrays) or another process stored it first."""
        stream = _stream_arrays(trajectory.stream)
        if stream is None:
            return False
        arrays, scalars = _payload(trajectory, stream)
        return _write_entry(self.entry(key), key, inputs, arrays, scalars)

    def sample_entry(self, key: str) -> Path:
        """The directory of the routing sample ``key``'s entry."""
        return Path(self.directory) / "sample" / key

    def load_sample(self, key: str) -> RoutingSample | None:
        """The stored routing sample of ``key``, or None when there is none; an unusable entry
        is reported (:class:`GateCacheWarning`), deleted, and None returned."""
        path = self.sample_entry(key)
        if not os.path.lexists(path):
            return None
        try:
            arrays, scalars = _read_checked(path, key)
            return _sample(arrays, scalars)
        except (_Unusable, KeyError, TypeError, ValueError) as why:
            warnings.warn(
                f"gate cache entry {path} is unusable ({why}); deleted, routing again",
                GateCacheWarning,
                stacklevel=2,
            )
            _remove(path)
            return None

    def store_sample(self, key: str, inputs: dict[str, Any], sample: RoutingSample) -> bool:
        """Write ``sample`` under ``key`` atomically (integer arrays in the narrowest dtype
        that holds them); False when another process stored it first."""
        arrays = {
            name: _narrow(getattr(sample, name))
            for name in _SAMPLE_ARRAYS
            if getattr(sample, name) is not None
        }
        scalars = {"step": sample.step, "metrics": sample.metrics}
        return _write_entry(self.sample_entry(key), key, inputs, arrays, scalars)


def sample_key_inputs(
    gate: str, step: int, rng: np.random.Generator, shape: dict[str, Any]
) -> dict[str, Any]:
    """What a routing sample drawn from gate ``gate`` depends on beyond the gate: the step, the
    generator's state when drawing starts, and ``shape`` (the layout and sampling settings the
    caller reads)."""
    return {
        "format": CACHE_FORMAT,
        "gate": gate,
        "step": int(step),
        "rng": _jsonable(rng.bit_generator.state),
        "shape": _jsonable(shape),
    }


# The arrays of a RoutingSample an entry holds (None ones are left out).
_SAMPLE_ARRAYS = ("counts", "dest_tokens", "node_tokens", "dropped")


def _narrow(values: np.ndarray) -> np.ndarray:
    """A non-negative int64 array in the narrowest unsigned dtype that holds its maximum (a
    DeepSeek-V3 sample's counts fit in 16 bits: a quarter of the bytes)."""
    top = int(values.max()) if values.size else 0
    if values.dtype != np.int64 or (values.size and int(values.min()) < 0):
        return values
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values


def _sample(arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> RoutingSample:
    """Rebuild a routing sample from :meth:`GateCache.store_sample`'s form."""
    wide = {name: arrays[name].astype(np.int64) for name in _SAMPLE_ARRAYS if name in arrays}
    return RoutingSample(
        step=int(scalars["step"]),
        counts=wide["counts"],
        dest_tokens=wide["dest_tokens"],
        metrics={str(k): float(v) for k, v in scalars["metrics"].items()},
        dropped=wide.get("dropped"),  # type: ignore[arg-type]
        node_tokens=wide.get("node_tokens"),  # type: ignore[arg-type]
    )


def _write_entry(
    entry: Path,
    key: str,
    inputs: dict[str, Any],
    arrays: dict[str, np.ndarray],
    scalars: dict[str, Any],
) -> bool:
    """Write an entry (arrays, JSON scalars, a manifest with their checksums) into a temporary
    directory beside ``entry`` and rename it into place; False when another process's rename
    won."""
    root = entry.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-{uuid.uuid4().hex[:8]}-", dir=root))
    try:
        # Numeric arrays only: nothing is pickled (numpy's stubs mistype **arrays).
        np.savez(tmp / ARRAYS, **arrays)  # type: ignore[arg-type]
        (tmp / RECORDS).write_text(json.dumps(scalars, default=_jsonable_scalar))
        manifest = {
            "format": CACHE_FORMAT,
            "key": key,
            "inputs": inputs,
            "sha256": {name: _sha256(tmp / name) for name in (ARRAYS, RECORDS)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process stored the same key first: keep its entry
            return False
        return True
    finally:
        if tmp.exists():
            _remove(tmp)


def _remove(path: Path) -> None:
    """Delete an entry; a concurrent delete of the same entry is not an error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _payload(
    trajectory: GateTrajectory, stream: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The trajectory as named arrays and JSON scalars (records included)."""
    arrays: dict[str, np.ndarray] = {f"stream.{name}": a for name, a in stream.items()}
    modes: dict[str, list[str]] = {}

    def routers(prefix: str, states: list[RouterState]) -> None:
        modes[prefix] = [s.bias_mode for s in states]
        for layer, state in enumerate(states):
            arrays[f"{prefix}.{layer}.weights"] = state.weights
            arrays[f"{prefix}.{layer}.bias"] = state.bias

    routers("final", trajectory.final)
    for step, states in trajectory.states.items():
        routers(f"state.{step}", states)
    if trajectory.tail_loads is not None:
        arrays["tail_loads"] = trajectory.tail_loads
    scalars = {
        "strategy": trajectory.strategy,
        "steps_per_update": trajectory.steps_per_update,
        "tail_updates": trajectory.tail_updates,
        "snapshots": sorted(trajectory.states),
        "bias_modes": modes,
        "stream": sorted(stream),
        "records": trajectory.records,
    }
    return arrays, scalars


def _read_entry(path: Path, key: str, scenario: Scenario) -> GateTrajectory:
    """Check an entry against its manifest and rebuild its trajectory; :class:`_Unusable`
    says why not."""
    arrays, scalars = _read_checked(path, key)
    try:
        return _trajectory(arrays, scalars, scenario)
    except (ValueError, KeyError, TypeError) as err:
        raise _Unusable(f"payload unreadable: {type(err).__name__}: {err}") from None


def _read_checked(path: Path, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """An entry's arrays and scalars, after checking its manifest (format, key, checksums);
    :class:`_Unusable` says why not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise _Unusable(f"manifest unreadable: {type(err).__name__}") from None
    if not isinstance(manifest, dict):
        raise _Unusable("manifest is not a mapping")
    if manifest.get("format") != CACHE_FORMAT:
        raise _Unusable(f"format {manifest.get('format')!r}, expected {CACHE_FORMAT}")
    if manifest.get("key") != key:
        raise _Unusable("manifest names another key")
    sums = manifest.get("sha256")
    if not isinstance(sums, dict):
        raise _Unusable("manifest has no checksums")
    for name in (ARRAYS, RECORDS):
        try:
            actual = _sha256(path / name)
        except OSError:
            raise _Unusable(f"{name} missing or unreadable") from None
        if actual != sums.get(name):
            raise _Unusable(f"{name} checksum mismatch")
    try:
        scalars = json.loads((path / RECORDS).read_text())
        with np.load(path / ARRAYS, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _Unusable(f"payload unreadable: {type(err).__name__}: {err}") from None
    return arrays, scalars


def _trajectory(
    arrays: dict[str, np.ndarray], scalars: dict[str, Any], scenario: Scenario
) -> GateTrajectory:
    """Rebuild a trajectory from :func:`_payload`'s form."""
    stream = TokenStream.__new__(TokenStream)
    stream.params = scenario.stream
    for name in scalars["stream"]:
        setattr(stream, name, arrays[f"stream.{name}"])
    modes = scalars["bias_modes"]

    def routers(prefix: str) -> list[RouterState]:
        return [
            RouterState(
                weights=arrays[f"{prefix}.{layer}.weights"],
                bias=arrays[f"{prefix}.{layer}.bias"],
                bias_mode=mode,
            )
            for layer, mode in enumerate(modes[prefix])
        ]

    return GateTrajectory(
        strategy=scalars["strategy"],
        stream=stream,
        records=scalars["records"],
        states={int(step): routers(f"state.{step}") for step in scalars["snapshots"]},
        final=routers("final"),
        steps_per_update=int(scalars["steps_per_update"]),
        tail_loads=arrays.get("tail_loads"),
        tail_updates=int(scalars["tail_updates"]),
    )
