"""Gate throughput (deselected by default; run with ``-m benchmark``).

The reference workload is one update of a 64-expert top-6 sigmoid router: 4096 tokens of
dimension 64, two simulated layers. Single-threaded BLAS is assumed (``OPENBLAS_NUM_THREADS=1``).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from moesim.gate import train_gate
from moesim.scenario.strategies import LossFree


@pytest.mark.benchmark
def test_gate_update_time(make_scenario) -> None:  # type: ignore[no-untyped-def]
    steps = 200
    scenario = make_scenario(
        model={"moe": {"routed_experts": 64, "top_k": 6}},
        training={"total_tokens": steps * 64 * 1024},
    )
    assert scenario.gate.batch_sequences * scenario.gate.tokens_per_sequence == 4096
    start = time.perf_counter()
    train_gate(scenario, LossFree(kind="loss_free"), [], np.random.SeedSequence(0))
    per_update = (time.perf_counter() - start) / steps
    # About 13 ms on the 2-core development VM (noise generation ≈ 2.5 ms, six GEMMs ≈ 2 ms,
    # two argpartitions ≈ 2 ms); the bound only catches gross regressions.
    assert per_update < 0.05, f"{per_update * 1e3:.1f} ms per update"
