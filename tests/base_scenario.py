"""The one base scenario of the tests, and how the test scenarios derive from it.

``BASE`` is a small MoE (4 layers, one dense; 16 routed experts, top-2, one shared) on one
8-GPU H100 node with expert parallelism 8, comparing the auxiliary loss and the loss-free bias.
Every test scenario is ``derive(BASE, ...)`` with its differences written out:

- the gate tests' scenario (``tests/gate/conftest.py``, ``make_scenario``) is ``BASE`` itself
  plus each test's overrides;
- the estimate and end-to-end tests' ``tiny`` scenario (``tests/conftest.py``) is ``TINY``
  below: two 4-GPU nodes, two pipeline stages, a short run and a small gate, so a whole
  estimate runs in seconds.

``notebooks/build_balancing_dilemma.py`` writes a notebook that cannot import the tests; its
scenario is ``BASE`` with the differences listed there.
"""

from __future__ import annotations

import copy
from typing import Any

BASE: dict[str, Any] = {
    "name": "t",
    "seed": 1,
    "model": {
        "layers": 4,
        "dense_layers": 1,
        "hidden": 1024,
        "dense_ffn": 4096,
        "attention": {"kind": "gqa", "heads": 8, "kv_heads": 2, "head_dim": 128},
        "vocab": 32000,
        "seq_len": 1024,
        "moe": {"routed_experts": 16, "shared_experts": 1, "top_k": 2, "expert_ffn": 512},
    },
    "cluster": {
        "gpu": "H100",
        "nodes": 1,
        "gpus_per_node": 8,
        "nvlink": {"latency_us": 3, "efficiency": 0.77},
        "nic": {"latency_us": 3, "bandwidth_gbits_per_s": 400, "efficiency": 0.9},
        "price_usd_per_gpu_hour": 2.0,
    },
    "parallelism": {"pipeline": 1, "expert": 8, "data": 1, "micro_batch_size": 1},
    "strategies": [{"kind": "aux_loss", "alpha": 0.001}, {"kind": "loss_free", "gamma": 0.001}],
    "training": {"total_tokens": 1.0e8, "global_batch_sequences": 64, "sample_points": 4},
}


def derive(base: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with each named section updated key by key: a dict value merges
    into the section's dict of that key (one level down), anything else replaces it; a
    section that is not a dict (``name``, ``seed``, ``strategies``) is replaced whole."""
    raw = copy.deepcopy(base)
    for name, values in sections.items():
        if not isinstance(values, dict):
            raw[name] = copy.deepcopy(values)
            continue
        target = raw.setdefault(name, {})
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key] = {**target[key], **copy.deepcopy(value)}
            else:
                target[key] = copy.deepcopy(value)
    return raw


TINY = derive(
    BASE,
    name="tiny",
    seed=3,
    cluster={
        "nodes": 2,
        "gpus_per_node": 4,
        "nvlink": {"latency_us": 3.33, "efficiency": 0.765},
        "nic": {"latency_us": 2.8},
    },
    parallelism={"pipeline": 2, "expert": 4},
    strategies=[
        {"name": "aux_loss", "kind": "aux_loss", "alpha": 1e-3},
        {"name": "loss_free", "kind": "loss_free", "gamma": 1e-3},
    ],
    gate={"batch_sequences": 16, "tokens_per_sequence": 64, "routed_tokens_per_sequence": 64},
    training={"total_tokens": 2.0e6, "global_batch_sequences": 16, "sample_points": 2},
)


def v3_like(steps: int) -> dict[str, Any]:
    """DeepSeek-V3-like routing as in benchmarks/gate_speed.py (b), shrunk: 256 experts, top-8
    sigmoid, normalised, scaling 2.5, node-limited to 4 of the 8 nodes of an EP-64 group,
    learning rate 2.2e-4, gradients every 16 steps on 4 × 32 tokens, bias batches of 4
    sequences, ``steps`` optimizer steps (64 sequences of 1,024 tokens each)."""
    return derive(
        BASE,
        model={"moe": {"routed_experts": 256, "top_k": 8}},
        cluster={"nodes": 8, "gpus_per_node": 8},
        parallelism={"expert": 64},
        router={"score": "sigmoid", "normalize": True, "scaling_factor": 2.5, "node_limit": 4},
        gate={
            "layers_simulated": 1,
            "batch_sequences": 4,
            "tokens_per_sequence": 32,
            "bias_batch_sequences": 4,
            "steps_per_update": 16,
            "learning_rate": 2.2e-4,
        },
        training={"total_tokens": steps * 64 * 1024},
    )
