"""Fixtures for the numerical-gate tests: a small valid scenario and seeded generators.

``make_scenario`` builds a scenario from a minimal dictionary (16 experts, top-2, one 8-GPU node,
expert parallelism 8) with section-level overrides, so a test states only what it varies.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from moesim.scenario import Scenario, scenario_from_dict

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


def build_scenario(**sections: dict[str, Any]) -> Scenario:
    """The base scenario with each named section updated key by key (nested dicts merged)."""
    raw = copy.deepcopy(BASE)
    for name, values in sections.items():
        target = raw.setdefault(name, {})
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key] = {**target[key], **value}
            else:
                target[key] = value
    return scenario_from_dict(raw)


@pytest.fixture(scope="session")
def make_scenario() -> Callable[..., Scenario]:
    """Factory: ``make_scenario(model={"moe": {"top_k": 4}}, gate={...})``."""
    return build_scenario


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator, fresh for every test."""
    return np.random.default_rng(20240601)
