"""Gate speed figures (``make bench``). Prints; asserts nothing about wall-clock time.

(a) Routing forward pass of a DeepSeek-V3-sized router — scores, group-limited top-k (256
    experts, k = 8, 8 groups of which 4 kept), expert counts — for 4096 tokens, side by side with
    the bare score product ``x @ Wᵀ`` in the same run, at the model's router input size
    (d = 7168) and at the gate's default d = 64. Two forms: :func:`moesim.gate.router.route`
    (expert indices, gates; counts by ``np.bincount``), and the counts-only path of the gate's
    bias steps (:func:`moesim.gate.training.routed_loads` on the sigmoid scores plus bias).
    Timings interleave the three, best of several repeats.
(b) A DeepSeek-V3-sized gate trajectory: 256 routed + 1 shared experts, top-8 sigmoid, normalised,
    scaling 2.5, node-limited to 4 of the 8 nodes an expert-parallel group of 64 spans, the
    loss-free bias (γ = 1e-3) plus the sequence-wise loss (α = 1e-4), one simulated layer, a
    global batch of 15360 × 4096 tokens and 235,000 optimizer steps (14.8T tokens) — one bias
    update and one Adam step per step — timed over all its steps with the coarsening of
    ``gate.steps_per_update`` (k) and the bias steps run in blocks of
    ``moesim.gate.training.BIAS_BLOCK_STEPS`` (j, chosen inside the gate); its first steps
    compared with a j = 1 run (the same records, bit for bit), with a run on the NumPy twins
    of the compiled kernels (``moesim.gate.kernels``: bias steps, selection, the experts'
    passes, the stream's gathers; the same records, bit for bit, and its time) and with a k = 1
    run (its time is that of the full updates alone). It runs with ``train_gate(threads=2)``
    (``--threads``): the sign-rule bias steps pipelined on two threads, the same records bit
    for bit as one thread (checked on the first steps, with both times).

Run ``python benchmarks/gate_speed.py`` (``--steps N`` shortens (b) for a quick look).

BLAS runs single-threaded unless ``OPENBLAS_NUM_THREADS`` is set: the gate's products are far
too small to gain from a second thread (uncontended, two threads gave the same wall time at
twice the CPU), and on a shared machine OpenBLAS's spinning threads made (b) about ten times
slower (5.4 ms instead of 0.55 ms per step).
"""

from __future__ import annotations

import os

# Before numpy loads OpenBLAS (module docstring).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from moesim.gate import kernels, train_gate, training
from moesim.gate.router import RouterState, route, scores_from_logits
from moesim.gate.training import bias_batch_sequences, routed_loads
from moesim.scenario import scenario_from_dict

N_TOKENS, N_EXPERTS, TOP_K, N_GROUPS, GROUP_TOPK = 4096, 256, 8, 8, 4
V3_STEPS = 235_000
V3_BATCH = 15360
V3_SEQ = 4096

# The coarsening used for (b): a new router gradient every STEPS_PER_UPDATE steps, on GATE_BATCH
# sequences; every step routes BIAS_BATCH fresh sequences for its bias update (as many as the
# gate batch, so the bias reads loads as noisy as at k = 1) and takes an Adam step. The learning
# rate is DeepSeek-V3's peak, the regime in which tests/gate/test_training_coarsening.py checks
# this k against k = 1. The bias steps between two gradients run in blocks of
# training.BIAS_BLOCK_STEPS (drawn and scored together; the trajectory is that of 1, as
# tests/gate/test_bias_coarsening.py checks). REFERENCE_STEPS: the j = 1 and k = 1 runs the
# trajectory's start is compared with.
STEPS_PER_UPDATE = 16
GATE_BATCH = 4
BIAS_BATCH = 4
TOKENS_PER_SEQUENCE = 32
LEARNING_RATE = 2.2e-4
REFERENCE_STEPS = 3000


def _best(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def route_forward(dim: int, repeats: int) -> None:
    """(a) at router input size ``dim``."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((N_TOKENS, dim)) / np.sqrt(dim)).astype(np.float32)
    state = RouterState.initial(N_EXPERTS, dim, 1.0, rng)
    state.bias[:] = rng.normal(0.0, 0.01, N_EXPERTS).astype(np.float32)

    def bare() -> None:
        x @ state.weights.T

    def routed() -> None:
        r = route(x, state, TOP_K, "sigmoid", True, 2.5, N_GROUPS, GROUP_TOPK)
        np.bincount(r.selected.ravel(), minlength=N_EXPERTS)

    def counted() -> None:
        scores = scores_from_logits(x @ state.weights.T, "sigmoid")
        routed_loads(scores + state.bias, TOP_K, N_GROUPS, GROUP_TOPK)

    reference = route(x, state, TOP_K, "sigmoid", True, 2.5, N_GROUPS, GROUP_TOPK)
    same = np.array_equal(
        np.bincount(reference.selected.ravel(), minlength=N_EXPERTS),
        routed_loads(reference.scores + state.bias, TOP_K, N_GROUPS, GROUP_TOPK),
    )
    times = {"bare x @ W.T": float("inf"), "route + bincount": float("inf")}
    times["scores + routed_loads"] = float("inf")
    for _ in range(repeats):  # interleaved: the three see the same machine state
        for name, fn in zip(times, (bare, routed, counted), strict=True):
            times[name] = min(times[name], _best(fn, 1))
    base = times["bare x @ W.T"]
    print(f"route forward, T={N_TOKENS}, E={N_EXPERTS}, k={TOP_K}, groups 8 keep 4, d={dim}:")
    for name, seconds in times.items():
        print(
            f"  {name:24s} {seconds * 1e3:9.2f} ms  {N_TOKENS / seconds / 1e3:10.1f} k tokens/s"
            f"  ratio to bare {base / seconds:5.2f}"
        )
    print(f"  counts of both forms equal: {same}")


def v3_scenario(steps: int = V3_STEPS) -> dict[str, Any]:
    """DeepSeek-V3 routing on 8 nodes × 8 H800, one expert-parallel group of 64 GPUs."""
    return {
        "name": "deepseek-v3-gate",
        "seed": 0,
        "model": {
            "layers": 61,
            "dense_layers": 3,
            "hidden": 7168,
            "attention": {
                "kind": "mla",
                "heads": 128,
                "head_dim": 128,
                "q_lora_rank": 1536,
                "kv_lora_rank": 512,
                "rope_head_dim": 64,
                "v_head_dim": 128,
            },
            "vocab": 129280,
            "seq_len": V3_SEQ,
            "dense_ffn": 18432,
            "moe": {"routed_experts": 256, "shared_experts": 1, "top_k": 8, "expert_ffn": 2048},
            "gemm_precision": "fp8",
            "mtp_depth": 1,
        },
        "cluster": {
            "gpu": "H800",
            "nodes": 8,
            "gpus_per_node": 8,
            "nvlink": {"latency_us": 3.33, "efficiency": 0.765},
            "nic": {"bandwidth_gbits_per_s": 400, "latency_us": 2.8, "efficiency": 0.9},
            "price_usd_per_gpu_hour": 2.0,
        },
        "parallelism": {"pipeline": 1, "expert": 64, "data": 1, "micro_batch_size": 1},
        "router": {"score": "sigmoid", "normalize": True, "scaling_factor": 2.5, "node_limit": 4},
        "strategies": [
            {
                "name": "v3",
                "kind": "composite",
                "losses": [{"kind": "sequence", "alpha": 1.0e-4}],
                "bias": {"rule": "sign", "gamma": 1.0e-3},
            }
        ],
        "gate": {
            "layers_simulated": 1,
            "batch_sequences": GATE_BATCH,
            "tokens_per_sequence": TOKENS_PER_SEQUENCE,
            "steps_per_update": STEPS_PER_UPDATE,
            "bias_batch_sequences": BIAS_BATCH,
            "learning_rate": LEARNING_RATE,
        },
        "training": {
            "total_tokens": float(steps * V3_BATCH * V3_SEQ),
            "global_batch_sequences": V3_BATCH,
        },
    }


def v3_trajectory(steps: int, threads: int) -> None:
    """(b): time ``train_gate`` over every step of the V3-sized run on ``threads`` threads, then
    compare its first ``REFERENCE_STEPS`` steps with a one-thread run (when ``threads > 1``),
    a j = 1 and a k = 1 run of the same scenario and seed."""
    scenario = scenario_from_dict(v3_scenario(steps))
    gate = scenario.gate
    strategy = scenario.strategies[0]
    start, cpu = time.perf_counter(), time.process_time()
    trajectory = train_gate(scenario, strategy, [], np.random.SeedSequence(0), threads=threads)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    maxvio = trajectory.column("maxvio_batch")
    tail = maxvio[-max(1, maxvio.size // 10) :]
    print(
        f"DeepSeek-V3 gate trajectory: {scenario.total_steps} optimizer steps (= bias updates and "
        f"Adam steps), {len(trajectory.records)} gradients (steps_per_update k = "
        f"{gate.steps_per_update}, {gate.batch_sequences}×{gate.tokens_per_sequence} tokens; "
        f"bias batches {bias_batch_sequences(scenario)}×{gate.tokens_per_sequence} tokens in "
        f"blocks of j = {training.BIAS_BLOCK_STEPS}), 1 layer, learning "
        f"rate {gate.learning_rate:g}, threads={threads}"
    )
    print(
        f"  {wall:7.1f} s wall ({cpu:.1f} s CPU), {wall / scenario.total_steps * 1e6:6.1f} µs per "
        f"step ({wall / scenario.total_steps * V3_STEPS:.1f} s for {V3_STEPS} steps); "
        f"MaxVio_batch mean {maxvio.mean():.3f}, last 10% {tail.mean():.3f}; final task loss "
        f"{trajectory.records[-1]['task_loss']:.4f}"
    )
    prefix = min(REFERENCE_STEPS, scenario.total_steps)
    head = train_gate(
        scenario_from_dict(v3_scenario(prefix)), strategy, [], np.random.SeedSequence(0)
    )
    raw = v3_scenario(prefix)
    if threads > 1:
        start = time.perf_counter()
        threaded = train_gate(
            scenario_from_dict(raw), strategy, [], np.random.SeedSequence(0), threads=threads
        )
        threaded_wall = time.perf_counter() - start
        start = time.perf_counter()
        head = train_gate(scenario_from_dict(raw), strategy, [], np.random.SeedSequence(0))
        alone_wall = time.perf_counter() - start
        same = threaded.records == head.records and all(
            np.array_equal(a.bias, b.bias) and np.array_equal(a.weights, b.weights)
            for a, b in zip(threaded.final, head.final, strict=True)
        )
        print(
            f"  steps 0..{prefix}: threads={threads} and 1 give the same records and routers: "
            f"{same}; {threaded_wall / prefix * 1e6:.1f} against "
            f"{alone_wall / prefix * 1e6:.1f} µs per step"
        )
    block, training.BIAS_BLOCK_STEPS = training.BIAS_BLOCK_STEPS, 1
    try:
        start = time.perf_counter()
        single = train_gate(scenario_from_dict(raw), strategy, [], np.random.SeedSequence(0))
        single_wall = time.perf_counter() - start
    finally:
        training.BIAS_BLOCK_STEPS = block
    same = single.records == head.records and all(
        np.array_equal(a.bias, b.bias) and np.array_equal(a.weights, b.weights)
        for a, b in zip(single.final, head.final, strict=True)
    )
    print(
        f"  steps 0..{prefix}: j={training.BIAS_BLOCK_STEPS} and j=1 give the same records and "
        f"routers: {same}; the j=1 run took {single_wall / prefix * 1e6:.1f} µs per step "
        f"({single_wall / prefix * V3_STEPS:.0f} s for {V3_STEPS} steps)"
    )
    if kernels.ENABLED:
        kernels.ENABLED = False
        try:
            start = time.perf_counter()
            twin = train_gate(scenario_from_dict(raw), strategy, [], np.random.SeedSequence(0))
            twin_wall = time.perf_counter() - start
        finally:
            kernels.ENABLED = True
        same = twin.records == head.records and all(
            np.array_equal(a.bias, b.bias) and np.array_equal(a.weights, b.weights)
            for a, b in zip(twin.final, head.final, strict=True)
        )
        print(
            f"  steps 0..{prefix}: compiled kernels and their NumPy twins give the same records "
            f"and routers: {same}; the NumPy run took {twin_wall / prefix * 1e6:.1f} µs per step "
            f"({twin_wall / prefix * V3_STEPS:.0f} s for {V3_STEPS} steps)"
        )
    else:
        print("  (numba unavailable or MOESIM_GATE_KERNELS=numpy: NumPy paths only)")
    raw["gate"]["steps_per_update"] = 1
    start = time.perf_counter()
    fine = train_gate(scenario_from_dict(raw), strategy, [], np.random.SeedSequence(0))
    fine_wall = time.perf_counter() - start
    coarse = maxvio[trajectory.column("step") < prefix].mean()
    exact = fine.column("maxvio_batch").mean()
    print(
        f"  steps 0..{prefix}: MaxVio_batch mean {coarse:.4f} at k={gate.steps_per_update} "
        f"against {exact:.4f} at k=1 ({coarse / exact - 1:+.1%}); the k=1 run took "
        f"{fine_wall / prefix * 1e3:.2f} ms per step ({fine_wall / prefix * V3_STEPS:.0f} s for "
        f"{V3_STEPS} steps)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=V3_STEPS, help="steps of (b)")
    parser.add_argument("--repeats", type=int, default=7, help="repeats of each (a) timing")
    parser.add_argument(
        "--threads", type=int, default=2, help="train_gate threads of (b) (2: both cores)"
    )
    args = parser.parse_args()
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(f"{os.cpu_count()} CPUs, OPENBLAS_NUM_THREADS={threads}")
    for dim in (7168, 64):
        route_forward(dim, args.repeats)
    v3_trajectory(args.steps, args.threads)


if __name__ == "__main__":
    main()
