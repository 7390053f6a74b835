"""Where each run's routing comes from: the gate trained under each strategy over the whole
run (in parallel processes when asked), or a recorded trace replayed; and the final routers'
topic × expert load (their specialisation) and load skew per data domain."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moesim.estimate.seeds import SeedPlan
from moesim.estimate.threads import blas_threads
from moesim.estimate.timeline import trace_run_name
from moesim.gate import GateTrajectory, RoutingSample, routing_sample, train_gate
from moesim.gate.metrics import SKEW_STATS, expert_counts, load_skew, pooled_load, topic_expert_load
from moesim.gate.router import route, route_options
from moesim.gate.trace import scenario_trace, trace_sample
from moesim.scenario.schema import Scenario
from moesim.scenario.strategies import Strategy

SampleAt = Callable[[int, int, np.random.Generator], RoutingSample]
"""The routing sample of a run at (point index, step) from a generator."""


@dataclass(frozen=True)
class RoutingSource:
    """One run's routing: its name, its gate (None for a trace replay) and its samples."""

    name: str
    gate: GateTrajectory | None
    sample: SampleAt

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
) -> Iterator[RoutingSource]:
    """Per run, in order: where its routing samples come from.

    With ``gate.trace`` the recorded loads replace the gate (no records, no strategies); a
    dense model routes nothing and runs once, under the scenario's name; otherwise the gate
    trains under each strategy, keeping router snapshots at ``points``.
    """
    if scenario.model.moe is None:

        def unrouted(_i: int, step: int, _rng: np.random.Generator) -> RoutingSample:
            return dense_sample(scenario, step, n_src)

        yield RoutingSource(scenario.name, None, unrouted)
        return
    if scenario.gate.trace is not None:
        trace = scenario_trace(scenario)

        def replay(_i: int, step: int, rng: np.random.Generator) -> RoutingSample:
            return trace_sample(scenario, trace, step, n_src, n_dest, rng)

        yield RoutingSource(trace_run_name(scenario), None, replay)
        return
    for strategy, trajectory in zip(
        scenario.strategies, _train_gates(scenario, points, seeds, workers), strict=True
    ):

        def routed(
            _i: int, step: int, rng: np.random.Generator, gate: GateTrajectory = trajectory
        ) -> RoutingSample:
            return routing_sample(
                scenario, gate.states[step], gate.stream, step, n_src, n_dest, rng
            )

        yield RoutingSource(strategy.name, trajectory, routed)


def dense_sample(scenario: Scenario, step: int, n_src: int) -> RoutingSample:
    """The empty routing sample of a dense model: no MoE layer, no expert, no token sent."""
    cells = (0, scenario.micro_batches_at(step), n_src)
    return RoutingSample(
        step,
        np.zeros((*cells, 0), dtype=np.int64),
        np.zeros((*cells, 1), dtype=np.int64),
        {},
    )


def _train_one(
    args: tuple[Scenario, Strategy, list[int], np.random.SeedSequence],
) -> GateTrajectory:
    with blas_threads():  # in a worker process too
        return train_gate(*args)


def _train_gates(
    scenario: Scenario, points: list[int], seeds: SeedPlan, workers: int
) -> Iterator[GateTrajectory]:
    """Each strategy's gate trajectory, in strategy order: in a process pool when there are
    several strategies and ``workers > 1`` (the trajectories are independent and seeded alike,
    so the result does not depend on where they ran), else one after the other."""
    jobs = [(scenario, s, points, seeds.gate) for s in scenario.strategies]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            yield from pool.map(_train_one, jobs)
    else:
        for job in jobs:
            yield _train_one(job)


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
    n_experts = scenario.model.moe.routed_experts
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
