"""Performance figures (``make bench``). Prints; asserts nothing about wall-clock time.

- engine: wall time, SimPy events and network flows of one quickstart step, balanced and with
  the gate's routing;
- gate: milliseconds per update of the quickstart gate (all simulated layers);
- end to end: the whole quickstart estimate.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from moesim.engine import build_context, simulate_step
from moesim.estimate import estimate_run
from moesim.gate import balanced_sample, routing_sample, train_gate
from moesim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    sc = load_scenario(ROOT / "scenarios" / "quickstart.yaml")
    ctx = build_context(sc)
    lay = ctx.layout
    print(
        f"quickstart: {sc.cluster.gpus} GPUs, {sc.micro_batches} micro-batches, "
        f"{sc.model.moe_layers} MoE layers, {sc.total_steps} steps"
    )

    bal = balanced_sample(sc, 0, lay.gpus_per_stage, lay.expert)
    result, wall = _timed(lambda: simulate_step(ctx, bal.counts, bal.dest_tokens))
    print(
        f"engine, balanced step:  {wall * 1e3:8.1f} ms wall, {result.events:7d} events, "
        f"{result.exchanges:6d} exchanges, {result.events / wall / 1e3:6.0f} k events/s"
    )

    strategy = sc.strategies[-1]
    steps = min(sc.total_steps, 500)
    short = sc.model_copy(
        update={
            "training": sc.training.model_copy(
                update={"total_tokens": float(steps * sc.tokens_per_step)}
            )
        }
    )
    traj, wall = _timed(lambda: train_gate(short, strategy, [steps - 1], np.random.SeedSequence(1)))
    tokens = sc.gate.batch_sequences * sc.gate.tokens_per_sequence
    print(
        f"gate ({strategy.name}): {wall / steps * 1e3:8.2f} ms per update "
        f"({sc.gate.layers_simulated} layers × {tokens} tokens)"
    )

    sample, wall_s = _timed(
        lambda: routing_sample(
            sc,
            traj.states[steps - 1],
            traj.stream,
            steps - 1,
            lay.gpus_per_stage,
            lay.expert,
            np.random.default_rng(3),
        )
    )
    result, wall = _timed(lambda: simulate_step(ctx, sample.counts, sample.dest_tokens))
    print(f"routing sample:         {wall_s * 1e3:8.1f} ms")
    print(
        f"engine, routed step:    {wall * 1e3:8.1f} ms wall, {result.events:7d} events, "
        f"{result.exchanges:6d} exchanges, {result.events / wall / 1e3:6.0f} k events/s"
    )

    _, wall = _timed(lambda: estimate_run(sc))
    print(
        f"quickstart estimate end to end: {wall:6.1f} s "
        f"({len(sc.strategies)} strategies × {sc.training.sample_points} points)"
    )


if __name__ == "__main__":
    main()
