"""Shared fixtures: a small valid scenario (as a dict and validated) and a seeded RNG."""

from __future__ import annotations

import copy
import os
from typing import Any

# Small matrices: BLAS threads only add overhead (and contention on a 2-core CI machine).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from moesim.scenario import Scenario, scenario_from_dict  # noqa: E402

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 3,
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
        "nodes": 2,
        "gpus_per_node": 4,
        "nvlink": {"latency_us": 3.33, "efficiency": 0.765},
        "nic": {"bandwidth_gbits_per_s": 400, "latency_us": 2.8, "efficiency": 0.9},
        "price_usd_per_gpu_hour": 2.0,
    },
    "parallelism": {"pipeline": 2, "expert": 4, "data": 1, "micro_batch_size": 1},
    "strategies": [
        {"name": "aux_loss", "kind": "aux_loss", "alpha": 1e-3},
        {"name": "loss_free", "kind": "loss_free", "gamma": 1e-3},
    ],
    "gate": {"batch_sequences": 16, "tokens_per_sequence": 64, "routed_tokens_per_sequence": 64},
    "training": {"total_tokens": 2.0e6, "global_batch_sequences": 16, "sample_points": 2},
}


@pytest.fixture
def tiny_dict() -> dict[str, Any]:
    """A deep copy of a small valid scenario, free to modify."""
    return copy.deepcopy(TINY)


@pytest.fixture
def tiny_scenario(tiny_dict: dict[str, Any]) -> Scenario:
    return scenario_from_dict(tiny_dict)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
