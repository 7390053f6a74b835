"""What a scenario will cost to simulate, estimated from its size before any work starts.

A scenario that validates can still be far too big to run: a million nodes, a trillion
optimizer steps of gate training, a table with a row per GPU and expert at every sampled step.
:func:`estimate_resources` sizes the run from the scenario alone (pure arithmetic, no NumPy
arrays allocated) and :func:`check_resources` refuses it, with the estimate, when it would
exceed ``engine.memory_limit_gib`` or ``engine.time_budget_minutes``. The scenario validator
calls it, so ``moesim validate`` refuses exactly what ``moesim run`` would.

Memory counts the largest simultaneous state: one step's routing sample (int64 counts per
simulated layer, micro-batch, source rank and expert, plus the per-destination-rank and
per-node volumes; the same formula as the engine's own guard,
:func:`moesim.engine.step.memory_estimate_bytes`), the gate's training state (router weights
with Adam moments, one batch of token vectors and scores), the gate records kept for every
update, and the output tables (rows × columns × 8 bytes, twice for the pandas copy).

Time is a single-core estimate: gate updates (a fixed cost per update plus the batch's
token × expert × dimension products) and engine steps (a cost per all-to-all exchange). The
per-unit costs are moesim's own measurements on the reference container (one core, OpenBLAS
single-threaded): the quickstart gate trains 191 updates of 64 × 32 tokens × 64 experts × 64
dimensions in 1.9 s (1.2e-9 s per token-expert-dimension, ~1 ms fixed per update); its engine
step of 224 exchanges takes 16 ms (70 µs per exchange); a dense Llama-3-70B step, no exchange,
64 micro-batches × 80 layers, takes 0.13 s (25 µs per layer and micro-batch). Estimates are
meant to be within a small factor, enough to refuse a run that would take days instead of
minutes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moesim import units
from moesim.errors import ScenarioError

if TYPE_CHECKING:
    from moesim.scenario.schema import Scenario

_INT64 = 8
GATE_UPDATE_FIXED_S = 1e-3
"""Fixed cost of one router gradient update per simulated layer (measured, see module doc)."""
GATE_UNIT_S = 1.2e-9
"""Seconds per token × expert × dimension of a gradient update (measured)."""
BIAS_STEP_FIXED_S = 3e-4
"""Fixed cost of a bias-only step between gradients (about a third of an update)."""
BIAS_UNIT_S = 0.4e-9
"""Seconds per token × expert × dimension of a bias-only step (scoring only, no gradient)."""
EXCHANGE_S = 6e-5
"""Engine cost of one all-to-all exchange with its compute ops (measured: 70 µs at EP8)."""
EXCHANGE_ELEMENT_S = 2e-9
"""Extra engine cost per (source rank × destination) element of an exchange's NumPy work."""
LAYER_MICRO_S = 2.5e-5
"""Engine cost of one layer's compute ops for one micro-batch, exchanges aside (measured: a
Llama-3-70B dense step, 64 micro-batches × 80 layers, 0.13 s)."""
GATE_RECORD_COLUMNS = 12
"""Floats per gate record (MaxVio, losses, capture, interference, bias, γ, …)."""


@dataclass(frozen=True)
class ResourceEstimate:
    """The estimate, split by part (bytes and single-core seconds)."""

    routing_sample_bytes: float
    gate_state_bytes: float
    gate_records_bytes: float
    tables_bytes: float
    engine_steps: int
    gate_seconds: float
    engine_seconds: float

    @property
    def memory_bytes(self) -> float:
        return (
            self.routing_sample_bytes
            + self.gate_state_bytes
            + self.gate_records_bytes
            + self.tables_bytes
        )

    @property
    def seconds(self) -> float:
        return self.gate_seconds + self.engine_seconds


def engine_steps(scenario: Scenario) -> int:
    """Steps the engine simulates over the whole estimate (every seed)."""
    # A dense model runs once, under its own name.
    runs = len(scenario.strategies) if scenario.model.moe is not None else 1
    runs *= 2 if scenario.eplb.enabled else 1
    points = min(scenario.training.sample_points, scenario.total_steps)
    points += 1 if scenario.ramp_steps else 0
    hardware = 2 if scenario.faults.hardware_active else 1
    return scenario.uncertainty.seeds * (1 + points + runs * points * hardware)


def estimate_resources(scenario: Scenario) -> ResourceEstimate:
    """Memory and single-core time the scenario's estimate would take (see the module doc)."""
    sc = scenario
    m, p, c, g = sc.model, sc.parallelism, sc.cluster, sc.gate
    experts = 0 if m.moe is None else m.moe.routed_experts
    stage_gpus = p.expert * p.data
    micro = sc.micro_batches

    cells = g.layers_simulated * micro * stage_gpus
    routing = cells * (experts + p.expert + sc.ep_nodes) * _INT64
    routing += c.gpus * (16 + experts // p.expert) * _INT64

    dim = sc.stream.dim
    tokens = g.batch_sequences * g.tokens_per_sequence
    bias_tokens = (g.bias_batch_sequences or g.batch_sequences) * g.tokens_per_sequence
    gate_state = 0 if m.moe is None else g.layers_simulated * experts * dim * _INT64 * 8
    gate_state += 0 if m.moe is None else max(tokens, bias_tokens) * (dim + 4 * experts) * _INT64
    gate_state += 0 if m.moe is None else sc.stream.topics * (dim + experts) * _INT64

    steps = sc.total_steps
    updates = -(-steps // g.steps_per_update)
    bias_steps = steps - updates if g.steps_per_update > 1 else 0
    strategies = len(sc.strategies) if g.trace is None else 0
    records = strategies * updates * GATE_RECORD_COLUMNS * _INT64 * 3

    n_steps = engine_steps(sc)
    links = 4 * c.gpus + 2 * math.ceil(c.gpus / sc.cluster.network.leaf_nics)
    rows = c.gpus * (20 + 8 * (experts // p.expert)) + links * 7
    tables = n_steps * rows * _INT64 * 2
    tables += strategies * sc.stream.topics * experts * 5 * _INT64

    layers = g.layers_simulated * strategies * sc.uncertainty.seeds
    gate_s = layers * (
        updates * (GATE_UPDATE_FIXED_S + GATE_UNIT_S * tokens * experts * dim)
        + bias_steps * (BIAS_STEP_FIXED_S + BIAS_UNIT_S * bias_tokens * experts * dim)
    )
    exchanges = 4 * micro * m.moe_layers
    per_exchange = EXCHANGE_S + EXCHANGE_ELEMENT_S * stage_gpus * (experts + stage_gpus)
    engine_s = n_steps * (exchanges * per_exchange + micro * m.layers * LAYER_MICRO_S)
    return ResourceEstimate(
        routing_sample_bytes=float(routing),
        gate_state_bytes=float(gate_state),
        gate_records_bytes=float(records),
        tables_bytes=float(tables),
        engine_steps=n_steps,
        gate_seconds=float(gate_s),
        engine_seconds=float(engine_s),
    )


def _biggest(parts: dict[str, float]) -> str:
    name, _ = max(parts.items(), key=lambda kv: kv[1])
    return name


def check_resources(scenario: Scenario) -> ResourceEstimate:
    """Refuse a scenario whose estimate exceeds its memory limit or time budget.

    Raises
    ------
    ScenarioError
        On ``engine.memory_limit_gib`` or ``engine.time_budget_minutes``, with the estimate
        and its largest part.
    """
    est = estimate_resources(scenario)
    limit = scenario.engine.memory_limit_gib * units.GiB
    if est.memory_bytes > limit:
        part = _biggest(
            {
                "routing samples of one step": est.routing_sample_bytes,
                "gate training state": est.gate_state_bytes,
                "gate records": est.gate_records_bytes,
                "output tables": est.tables_bytes,
            }
        )
        raise ScenarioError(
            "engine.memory_limit_gib",
            f"the run would need about {est.memory_bytes / units.GiB:,.1f} GiB (mostly "
            f"{part}), more than the {scenario.engine.memory_limit_gib:g} GiB allowed; shrink "
            "the scenario or raise the limit",
        )
    budget = scenario.engine.time_budget_minutes * 60.0
    if est.seconds > budget:
        part = _biggest(
            {
                f"gate training over {scenario.total_steps:,} steps": est.gate_seconds,
                f"{est.engine_steps:,} simulated engine steps": est.engine_seconds,
            }
        )
        raise ScenarioError(
            "engine.time_budget_minutes",
            f"the run would take about {est.seconds / 60.0:,.0f} minutes on one core (mostly "
            f"{part}), more than the {scenario.engine.time_budget_minutes:g} minutes budgeted; "
            "coarsen the gate (gate.steps_per_update, gate.batch_sequences), simulate fewer "
            "points, or raise the budget",
        )
    return est
