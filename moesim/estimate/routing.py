"""Where each run's routing comes from: the gate trained under each strategy over the whole
run (in parallel processes when asked), or a recorded trace replayed; and the final routers'
topic × expert load (their specialisation)."""

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
from moesim.gate.metrics import topic_expert_load
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
