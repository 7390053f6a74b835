"""Where each run's routing comes from: the gate trained under each strategy over the whole
run (in parallel processes when asked), or a recorded trace replayed; and the final routers'
topic × expert load (their specialisation) and load skew per data domain."""

from __future__ import annotations

import functools
import multiprocessing
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing.queues import Queue
from queue import Empty
from typing import Any

import numpy as np
import numpy.typing as npt

from moesim.estimate.gate_cache import (
    GateCache,
    GateCacheWarning,
    gate_key,
    gate_key_inputs,
    sample_key_inputs,
)
from moesim.estimate.seeds import SeedPlan
from moesim.estimate.threads import blas_threads
from moesim.estimate.timeline import trace_run_name
from moesim.gate import GateTrajectory, RoutingSample, merge_layers, routing_sample, train_gate
from moesim.gate.metrics import SKEW_STATS, expert_counts, load_skew, pooled_load, topic_expert_load
from moesim.gate.router import route, route_options
from moesim.gate.sampling import dropless_loads
from moesim.gate.trace import ExpertTrace, scenario_trace, trace_sample
from moesim.scenario.schema import Scenario
from moesim.scenario.strategies import Strategy

SampleAt = Callable[[int, int, np.random.Generator], RoutingSample]
"""The routing sample of a run at (point index, step) from a generator."""


GateProgress = Callable[[str, float], None]
"""Called with a strategy's name and the share of its gate training done (0 to 1)."""


@dataclass(frozen=True)
class RoutingSource:
    """One run's routing: its name, its gate (None for a trace replay) and its samples.

    ``cache`` says where the gate came from: ``"hit"`` (the gate cache), ``"miss"`` (trained
    and stored), ``"off"`` (trained, no cache), or None for a trace replay.
    """

    name: str
    gate: GateTrajectory | None
    sample: SampleAt
    cache: str | None = None

    @property
    def records(self) -> list[dict[str, float]]:
        """The gate's per-update records (none for a trace replay)."""
        return [] if self.gate is None else self.gate.records

    def record_at(self, step: int) -> dict[str, float] | None:
        """The gate's record of the last update at or before ``step`` (None without a gate)."""
        return None if self.gate is None else self.gate.record_at(step)


def routing_sources(
    scenario: Scenario,
    points: list[int],
    seeds: SeedPlan,
    n_src: int,
    n_dest: int,
    workers: int = 1,
    cache: GateCache | None = None,
    progress: GateProgress | None = None,
) -> Iterator[RoutingSource]:
    """Per run, in order: where its routing samples come from.

    With ``gate.trace`` the recorded loads replace the gate (no records, no strategies); a
    dense model routes nothing and runs once, under the scenario's name; otherwise each
    strategy's gate comes from ``cache`` when it holds it, else trains, keeping router
    snapshots at ``points``, and goes into ``cache``. ``progress`` hears how far each gate's
    training is (a gate from the cache is done at once).
    """
    if scenario.model.moe is None:
        yield RoutingSource(scenario.name, None, _DenseSamples(scenario, n_src))
        return
    if scenario.gate.trace is not None:
        replay = _TraceSamples(scenario, scenario_trace(scenario), n_src, n_dest)
        yield RoutingSource(trace_run_name(scenario), None, replay)
        return
    gates = _gates(scenario, points, seeds, workers, cache, progress)
    for strategy, (trajectory, origin, key) in zip(scenario.strategies, gates, strict=True):
        samples_cache = None if cache is None else (cache, key)
        routed = _GateSamples(scenario, trajectory, n_src, n_dest, samples_cache)
        yield RoutingSource(strategy.name, trajectory, routed, origin)


def dense_sample(scenario: Scenario, step: int, n_src: int) -> RoutingSample:
    """The empty routing sample of a dense model: no MoE layer, no expert, no token sent."""
    cells = (0, scenario.micro_batches_at(step), n_src)
    return RoutingSample(
        step,
        np.zeros((*cells, 0), dtype=np.int64),
        np.zeros((*cells, 1), dtype=np.int64),
        {},
    )


@dataclass(frozen=True)
class _DenseSamples:
    """A dense model's empty samples (a picklable :data:`SampleAt`)."""

    scenario: Scenario
    n_src: int

    def __call__(self, _i: int, step: int, _rng: np.random.Generator) -> RoutingSample:
        return dense_sample(self.scenario, step, self.n_src)


@dataclass(frozen=True)
class _TraceSamples:
    """A recorded trace's samples (a picklable :data:`SampleAt`)."""

    scenario: Scenario
    trace: ExpertTrace
    n_src: int
    n_dest: int

    def __call__(self, _i: int, step: int, rng: np.random.Generator) -> RoutingSample:
        return trace_sample(self.scenario, self.trace, step, self.n_src, self.n_dest, rng)


@dataclass(frozen=True)
class _GateSamples:
    """A gate's samples from its router snapshots (a picklable :data:`SampleAt`), looked up
    in and stored to the gate cache under the gate's key when ``cache`` names them."""

    scenario: Scenario
    gate: GateTrajectory
    n_src: int
    n_dest: int
    cache: tuple[GateCache, str] | None = None

    def __call__(self, _i: int, step: int, rng: np.random.Generator) -> RoutingSample:
        gate, sc = self.gate, self.scenario
        key, inputs = "", {}
        if self.cache is not None:
            cache, gate_key_ = self.cache
            inputs = sample_key_inputs(gate_key_, step, rng, self._shape(step))
            key = gate_key(inputs)
            hit = cache.load_sample(key)
            if hit is not None:
                return hit
        sample = routing_sample(
            sc, gate.states[step], gate.stream, step, self.n_src, self.n_dest, rng
        )
        if self.cache is not None:
            try:
                self.cache[0].store_sample(key, inputs, sample)
            except OSError as err:  # a full or read-only disk costs the reuse, not the run
                warnings.warn(
                    f"gate cache: could not store a sample in {self.cache[0].directory}: {err}",
                    GateCacheWarning,
                    stacklevel=1,
                )
        return sample

    def _shape(self, step: int) -> dict[str, Any]:
        """What :func:`~moesim.gate.routing_sample` reads besides the gate, the step and the
        generator (the gate's key holds the rest: stream, router, timeline)."""
        sc = self.scenario
        return {
            "n_src": self.n_src,
            "n_dest": self.n_dest,
            "micro_batches": sc.micro_batches_at(step),
            "micro_batch_size": sc.parallelism.micro_batch_size,
            "seq_len": sc.model.seq_len,
            "routed_tokens_per_sequence": sc.gate.routed_tokens_per_sequence,
            "layers_simulated": sc.gate.layers_simulated,
            "ep_nodes": sc.ep_nodes,
            "route_options": dict(route_options(sc)),
        }


@dataclass(frozen=True)
class _Job:
    """One gate to train (``layer`` None: every layer; else that layer alone, to be merged with
    the others, :func:`moesim.gate.merge_layers`)."""

    index: int
    scenario: Scenario
    strategy: Strategy
    points: list[int]
    seed: np.random.SeedSequence
    layer: int | None = None
    threads: int = 1  # train_gate's threads: 2 where a core would otherwise idle


# The queue a gate-training worker process reports its progress on (set by _init_worker).
_worker_queue: Queue[tuple[int, int]] | None = None


def _init_worker(queue: Queue[tuple[int, int]] | None) -> None:
    global _worker_queue
    _worker_queue = queue


def _train_one(
    job: _Job, report: Callable[[int, int], None] | None = None, tag: int = 0
) -> GateTrajectory:
    """Train one gate, or one layer of it, in this or a worker process (progress reported
    under ``tag``)."""
    if report is None and _worker_queue is not None:
        queue = _worker_queue

        def report(index: int, steps: int) -> None:
            queue.put((index, steps))

    on_step = None if report is None else functools.partial(report, tag)
    with blas_threads():  # in a worker process too
        return train_gate(
            job.scenario, job.strategy, job.points, job.seed, on_step, layer=job.layer,
            threads=job.threads,
        )  # fmt: skip


def _store(cache: GateCache | None, key: str, inputs: dict[str, Any], gate: GateTrajectory) -> None:
    """Keep a trained gate in the cache; a full or read-only disk costs the reuse, not the run."""
    if cache is None:
        return
    try:
        cache.store(key, inputs, gate)
    except OSError as err:
        warnings.warn(
            f"gate cache: could not store in {cache.directory}: {err}",
            GateCacheWarning,
            stacklevel=1,
        )


def _gates(
    scenario: Scenario,
    points: list[int],
    seeds: SeedPlan,
    workers: int,
    cache: GateCache | None,
    progress: GateProgress | None,
) -> Iterator[tuple[GateTrajectory, str, str]]:
    """Each strategy's gate trajectory, its origin (hit, miss, off) and its cache key ("" with
    no cache), in strategy order.

    Gates in the cache load first. With ``workers > 1`` the others train in a process pool, one
    task per strategy and simulated layer (the layers' routers never interact, and each task
    draws the tokens of the whole run, so the merged gate is the one trained at once: the
    result does not depend on where it ran, and the slowest strategy's layers do not queue
    behind one another); else one gate after the other, every layer at once."""
    names = [s.name for s in scenario.strategies]
    total = scenario.total_steps
    n_layers = scenario.gate.layers_simulated

    found: dict[int, GateTrajectory] = {}
    jobs: list[_Job] = []
    keys: list[str] = []
    inputs: dict[int, dict[str, Any]] = {}
    for i, strategy in enumerate(scenario.strategies):
        key = ""
        if cache is not None:
            inputs[i] = gate_key_inputs(scenario, strategy, points, seeds.gate)
            key = gate_key(inputs[i])
        keys.append(key)
        if cache is not None:
            hit = cache.load(key, scenario)
            if hit is not None:
                found[i] = hit
                continue
        jobs.append(_Job(i, scenario, strategy, points, seeds.gate))
    origin = "off" if cache is None else "miss"

    def finished(i: int, gate: GateTrajectory) -> Iterator[tuple[GateTrajectory, str, str]]:
        """The gate, then (once the caller asks for the next one, having started on this
        one's steps) its store in the cache."""
        yield gate, "hit" if i in found else origin, keys[i]
        if i not in found:
            _store(cache, keys[i], inputs.get(i, {}), gate)

    # The units of work: one per strategy to train, or one per strategy and layer in a pool.
    parallel = workers > 1 and len(jobs) * n_layers > 1
    parts = [replace(job, layer=layer) for job in jobs for layer in range(n_layers)]
    if not parallel:
        parts = jobs
    # Gates that train alone or beside fewer gates than cores pipeline their bias steps on
    # two threads (the same trajectory, sooner).
    if workers >= 2 * len(parts):
        parts = [replace(part, threads=2) for part in parts]
    done = [0] * len(parts)  # steps each part has trained

    def report(tag: int, steps: int) -> None:
        done[tag] = steps
        if progress is not None:
            strategy = parts[tag].index
            mine = [d for p, d in zip(parts, done, strict=True) if p.index == strategy]
            progress(names[strategy], min(1.0, sum(mine) / (len(mine) * total)))

    if not parallel:
        for i in range(len(names)):
            if i in found:
                gate = found[i]
                if progress is not None:
                    progress(names[i], 1.0)
            else:
                tag = next(t for t, part in enumerate(parts) if part.index == i)
                gate = _train_one(parts[tag], report, tag)
            yield from finished(i, gate)
        return

    context = multiprocessing.get_context()
    queue: Queue[tuple[int, int]] | None = None if progress is None else context.Queue()

    def drain(wait: float) -> None:
        if queue is None:
            return
        try:
            while True:
                report(*queue.get(timeout=wait))
                wait = 0.0
        except Empty:
            return

    with ProcessPoolExecutor(
        max_workers=min(workers, len(parts)),
        mp_context=context,
        initializer=_init_worker,
        initargs=(queue,),
    ) as pool:
        futures = [pool.submit(_train_one, part, None, tag) for tag, part in enumerate(parts)]
        for i in range(len(names)):
            if i in found:
                if progress is not None:
                    progress(names[i], 1.0)
                yield from finished(i, found[i])
                continue
            mine = [f for f, part in zip(futures, parts, strict=True) if part.index == i]
            while not all(f.done() for f in mine):
                drain(0.1)
            layers = [f.result() for f in mine]
            drain(0.0)
            yield from finished(i, layers[0] if n_layers == 1 else merge_layers(layers))


def topic_load(
    scenario: Scenario, trajectory: GateTrajectory, seeds: SeedPlan
) -> npt.NDArray[np.int64]:
    """Topic × expert assignments of the final first-layer router on one fresh gate batch."""
    gate = scenario.gate
    rng = np.random.default_rng(seeds.specialisation)
    tokens, topics = trajectory.stream.sample(
        gate.batch_sequences,
        gate.tokens_per_sequence,
        rng,
        tokens_trained=scenario.training.total_tokens,
        sequences_per_micro_batch=scenario.parallelism.micro_batch_size,
    )
    routing = route(
        tokens.reshape(-1, tokens.shape[-1]), trajectory.final[0], **route_options(scenario)
    )
    return topic_expert_load(
        routing.selected,
        topics.ravel(),
        scenario.stream.topics,
        scenario.model.moe_spec.routed_experts,
        routing.dropped,
    )


DOMAIN_TOKENS = 100_000
"""Routed tokens per domain (at least) for ``routing_by_domain``: with sequences of one
topic-dominated mixture each, MaxVio's sampling noise falls with the number of sequences, and
this many tokens keep it to a few hundredths at the quickstart's size."""

DOMAIN_COLUMNS = ("strategy", "layer", "domain", *SKEW_STATS, "tokens")


def domain_skew(
    scenario: Scenario,
    name: str,
    trajectory: GateTrajectory,
    seeds: SeedPlan,
    tokens_per_domain: int = DOMAIN_TOKENS,
) -> list[dict[str, float | int | str]]:
    """The final routers' load skew per data domain, and pooled over the stream's domain mix.

    Per domain of the stream (``stream.domains``; one domain without them), sequences of that
    domain only are drawn at the popularity the stream has at the end of training (packed as in
    training) until at least ``tokens_per_domain`` tokens, and every simulated layer's final
    router routes them in micro-batches (bias and capacity as in training). A row per strategy,
    layer and domain gives MaxVio, the coefficient of variation and min/mean of that domain's
    expert loads (:func:`~moesim.gate.metrics.load_skew`), and one row ``pooled`` per layer
    those of the domains' loads mixed by their shares (:func:`~moesim.gate.metrics.pooled_load`).
    A stream without domains has only the ``pooled`` rows. ``name`` labels the rows (the run's
    strategy). Every strategy routes the same
    sequences (the ``domains`` seed).
    """
    gate, stream = scenario.gate, trajectory.stream
    n_experts = scenario.model.moe_spec.routed_experts
    tps = gate.tokens_per_sequence
    micro = scenario.parallelism.micro_batch_size
    per_micro = micro * tps
    sequences = -(-tokens_per_domain // per_micro) * micro
    options = route_options(scenario)
    rng = np.random.default_rng(seeds.domains)
    n_layers = len(trajectory.final)
    loads = np.zeros((n_layers, stream.n_domains, n_experts), dtype=np.int64)
    tokens = np.zeros(stream.n_domains, dtype=np.int64)
    for d in range(stream.n_domains):
        x, _ = stream.sample(
            sequences,
            tps,
            rng,
            tokens_trained=scenario.training.total_tokens,
            sequences_per_micro_batch=micro,
            domain=d,
        )
        flat = x.reshape(-1, x.shape[-1])
        tokens[d] = flat.shape[0]
        for layer, state in enumerate(trajectory.final):
            if options["capacity"] is None:
                loads[layer, d] = dropless_loads(flat, state, options)
                continue
            routing = route(
                flat, state, **options, segments=flat.shape[0] // per_micro, tokens_per_sequence=tps
            )
            loads[layer, d] = expert_counts(routing.selected, n_experts, dropped=routing.dropped)
    rows: list[dict[str, float | int | str]] = []
    for layer in range(n_layers):
        named = [] if scenario.stream.domains is None else list(enumerate(stream.domain_names))
        for d, domain in named:
            stats = load_skew(loads[layer, d])
            rows.append(
                {
                    "strategy": name,
                    "layer": layer,
                    "domain": domain,
                    **{k: float(v) for k, v in stats.items()},
                    "tokens": int(tokens[d]),
                }
            )
        pooled = load_skew(pooled_load(loads[layer], tokens, stream.domain_shares))
        rows.append(
            {
                "strategy": name,
                "layer": layer,
                "domain": "pooled",
                **{k: float(v) for k, v in pooled.items()},
                "tokens": int(tokens.sum()),
            }
        )
    return rows
