"""Engine speed at DeepSeek-V3 scale and beyond (``make bench``). Prints; asserts nothing.

(a) One training step of ``scenarios/deepseek_v3.yaml`` at full detail (2,048 GPUs, PP16
    DualPipe × EP64 × DP2, 120 micro-batches, 58 MoE layers, node-limited dispatch): wall and
    CPU time, the process's peak resident memory, SimPy events and all-to-all exchanges, with a
    routing sample of the scenario's simulated layers, balanced, skewed (Zipf) and varied (every
    cell's volumes scaled by its own random factors, as a gate's samples vary between
    micro-batches). An untimed balanced step comes first: the first step of a process loads
    the engine's compiled loops (``moesim/engine/kernels.py``; compiles them on a new machine).
(b) The same DeepSeek-V3 step with hardware stragglers switched on (5% slow GPUs, 3% per-op
    jitter, a 60 s throttling episode per GPU every 2 h, 2% half-rate NICs: faults_demo.yaml's
    rates) against the healthy step: the cost of
    modelling them.
(c) Scaling: the same model from 256 to 16,384 GPUs (PP4 → PP16 at EP64, then data-parallel
    replicas DP1 → DP16), 120 micro-batches per pipeline, one step each; the fitted exponent of
    wall time against GPUs.

Run ``python benchmarks/engine_scale.py`` (``--quick`` skips the 8,192 and 16,384 points).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import yaml

from moesim.cluster.stragglers import JitterSource, draw_run_state, draw_step_state
from moesim.engine import build_context, simulate_step
from moesim.gate import balanced_sample
from moesim.gate.sample import RoutingSample
from moesim.scenario import scenario_from_dict
from moesim.scenario.schema import Scenario

ROOT = Path(__file__).resolve().parents[1]
MICRO_BATCHES = 120
SCALES = ((4, 1), (8, 1), (16, 1), (16, 2), (16, 4), (16, 8), (16, 16))  # (PP, DP) at EP64


def v3_dict() -> dict:
    return yaml.safe_load((ROOT / "scenarios" / "deepseek_v3.yaml").read_text())


def skewed(sample: RoutingSample, rng: np.random.Generator) -> RoutingSample:
    """The balanced sample's tokens re-routed with Zipf-skewed expert popularity (exponent 0.6),
    per-node volumes scaled the same way: a straggler-heavy load for timing."""
    experts = sample.counts.shape[-1]
    weights = 1.0 / np.arange(1, experts + 1) ** 0.6
    weights = rng.permutation(weights / weights.sum())
    totals = sample.counts.sum(axis=-1, keepdims=True)
    counts = np.floor(totals * weights).astype(np.int64)
    ranks = sample.dest_tokens.shape[-1]
    rank_share = weights.reshape(ranks, -1).sum(axis=1)
    dest = np.floor(sample.dest_tokens * rank_share * ranks).astype(np.int64)
    return RoutingSample(
        sample.step, counts, dest, dict(sample.metrics), node_tokens=sample.node_tokens
    )


def varied(sample: RoutingSample, rng: np.random.Generator) -> RoutingSample:
    """The sample with every entry scaled by its own factor, uniform in [0.3, 1.7), rounded
    down: no two cells alike."""

    def scale(a: np.ndarray) -> np.ndarray:
        return np.floor(a * rng.uniform(0.3, 1.7, a.shape)).astype(np.int64)

    nodes = None if sample.node_tokens is None else scale(sample.node_tokens)
    return RoutingSample(
        sample.step,
        scale(sample.counts),
        scale(sample.dest_tokens),
        dict(sample.metrics),
        node_tokens=nodes,
    )


def time_step(sc: Scenario, sample: RoutingSample) -> tuple[float, float, float, object]:
    """Wall and CPU time of one step, and the process's peak resident memory so far
    (everything: interpreter, libraries, the routing sample, the step's tables)."""
    ctx = build_context(sc)
    start, cpu = time.perf_counter(), time.process_time()
    result = simulate_step(ctx, sample.counts, sample.dest_tokens, node_tokens=sample.node_tokens)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return wall, cpu, peak, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="stop at 4,096 GPUs")
    args = parser.parse_args()

    sc = scenario_from_dict(v3_dict())
    lay = build_context(sc).layout
    bal = balanced_sample(sc, sc.total_steps - 1, lay.gpus_per_stage, lay.expert)
    sample_bytes = bal.counts.nbytes + bal.dest_tokens.nbytes + bal.node_tokens.nbytes
    print(
        f"deepseek_v3: {sc.cluster.gpus} GPUs, PP{sc.parallelism.pipeline} "
        f"{sc.parallelism.schedule}, EP{sc.parallelism.expert}, DP{sc.parallelism.data}, "
        f"{sc.micro_batches} micro-batches, {sc.gate.layers_simulated} simulated routers "
        f"(sample {sample_bytes / 2**20:.0f} MiB)"
    )
    wall, _, _, _ = time_step(sc, bal)
    print(f"  first step of the process (loads the compiled loops): {wall:6.2f} s wall")
    for label, sample in (
        ("balanced", bal),
        ("skewed", skewed(bal, np.random.default_rng(0))),
        ("varied", varied(bal, np.random.default_rng(0))),
    ):
        wall, cpu, peak, r = time_step(sc, sample)
        print(
            f"  {label:8s} step: {wall:6.2f} s wall, {cpu:6.2f} s CPU, process peak RSS "
            f"{peak / 2**20:6.0f} MiB, {r.events:6d} SimPy events, {r.exchanges:6d} exchanges; "
            f"simulated step {r.step_time_s:.2f} s"
        )

    d = v3_dict()
    d["faults"] = {
        "slow_gpus": {"fraction": 0.05},
        "jitter": {"sigma": 0.03},
        "throttling": {"rate_per_gpu_hour": 0.5, "duration_seconds": 60},
        "degraded_links": {"nic": {"fraction": 0.02}},
    }
    faulty = scenario_from_dict(d)
    rng = np.random.default_rng(0)
    run_state = draw_run_state(faulty.faults, faulty.cluster.gpus, rng)
    state = draw_step_state(faulty.faults, run_state, faulty.cluster.gpus, 60.0, rng)
    ctx = build_context(faulty)
    walls = {}
    for label, kwargs in (
        ("healthy", {}),
        ("faulty", {"hardware": state, "jitter": JitterSource(0.03, np.random.default_rng(1))}),
    ):
        start = time.perf_counter()
        r = simulate_step(ctx, bal.counts, bal.dest_tokens, node_tokens=bal.node_tokens, **kwargs)
        walls[label] = time.perf_counter() - start
        print(
            f"  {label:8s} step: {walls[label]:6.2f} s wall; simulated step {r.step_time_s:.2f} s"
        )
    print(f"  hardware stragglers cost {walls['faulty'] / walls['healthy'] - 1:+.0%} wall time")

    print("scaling (EP64, 120 micro-batches per pipeline, balanced routing, 1 simulated router):")
    gpus, walls = [], []
    for pp, dp in SCALES:
        if args.quick and pp * 64 * dp > 4096:
            break
        d = v3_dict()
        d["cluster"]["nodes"] = pp * 64 * dp // 8
        d["parallelism"].update(pipeline=pp, data=dp)
        d["training"]["global_batch_sequences"] = MICRO_BATCHES * 64 * dp
        d["gate"]["layers_simulated"] = 1
        d["output"]["trace_gpus"] = None
        sc = scenario_from_dict(d)
        lay = build_context(sc).layout
        sample = balanced_sample(sc, sc.total_steps - 1, lay.gpus_per_stage, lay.expert)
        wall, _, peak, r = time_step(sc, sample)
        gpus.append(sc.cluster.gpus)
        walls.append(wall)
        print(
            f"  {sc.cluster.gpus:6d} GPUs (PP{pp} × EP64 × DP{dp}): {wall:6.2f} s wall, "
            f"peak RSS {peak / 2**20:6.0f} MiB, {r.events:6d} events, {r.exchanges:6d} exchanges"
        )
    if len(gpus) > 1:
        slope = np.polyfit(np.log(gpus), np.log(walls), 1)[0]
        print(f"  wall ∝ GPUs^{slope:.2f} over {gpus[0]} → {gpus[-1]} GPUs")


if __name__ == "__main__":
    main()
