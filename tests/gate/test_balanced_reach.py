"""The balanced reference's dispatch volumes under group-limited routing."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.gate.sampling import uniform_reach


def _simulated_reach(n_experts, top_k, n_groups, group_topk, block, tokens=40_000, seed=0):
    """Monte Carlo: each token keeps group_topk random groups, then top_k random experts among
    them; the fraction of tokens with an expert in each block, averaged over blocks."""
    rng = np.random.default_rng(seed)
    size = n_experts // n_groups
    groups = np.argsort(rng.random((tokens, n_groups)), axis=1)[:, :group_topk]
    pool = (groups[:, :, None] * size + np.arange(size)).reshape(tokens, -1)
    pick = np.argsort(rng.random(pool.shape), axis=1)[:, :top_k]
    experts = np.take_along_axis(pool, pick, axis=1)
    blocks = experts // block
    reached = np.zeros((tokens, n_experts // block), dtype=bool)
    np.put_along_axis(reached, blocks, True, axis=1)
    return reached.mean()


@pytest.mark.parametrize(
    ("n_groups", "group_topk", "block"),
    [
        (8, 4, 32),  # DeepSeek-V3: nodes under a node limit of 4
        (8, 4, 4),  # ... and its GPUs (4 experts each)
        (8, 3, 20),  # DeepSeek-V2-like device limit: blocks = groups
        (8, 4, 64),  # blocks of two whole groups (32 experts each)
        (8, 8, 32),  # no effective limit
    ],
)
def test_reach_matches_monte_carlo(n_groups, group_topk, block):
    n_experts = 160 if n_groups == 8 and block == 20 else 256
    top_k = 6 if block == 20 else 8
    exact = uniform_reach(n_experts, top_k, n_groups, group_topk, block)
    assert exact == pytest.approx(
        _simulated_reach(n_experts, top_k, n_groups, group_topk, block), abs=0.005
    )


def test_node_limit_cuts_nodes_per_token():
    limited = 8 * uniform_reach(256, 8, 8, 4, 32)
    free = 8 * uniform_reach(256, 8, 8, None, 32)
    assert limited < 4 < free
