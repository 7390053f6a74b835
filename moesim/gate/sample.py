"""The routing sample: the expert load the engine simulates for one optimizer step.

The engine does not route tokens. For each step it simulates, it receives a
:class:`RoutingSample` that says, per simulated MoE layer, micro-batch and source rank of an
expert-parallel group, how many (token, expert) assignments go to each expert — the work of each
expert's GEMMs — how many distinct tokens travel to each destination expert-parallel rank —
the all-to-all dispatch volume (a token whose experts share a rank is sent there once) — and how
many distinct tokens travel to each node of the expert-parallel group, the inter-node volume of
DeepSeek-style node-limited dispatch, which sends a token once per destination node and forwards
it over NVLink there (DeepSeek-V3, arXiv 2412.19437 §2.1.2 "Node-limited routing"). Loads are
counted in assignments (docs/model/gate.md), and MaxVio is arXiv 2408.15664 Eq. 4's. With an
expert capacity (DeepSeek-V2, arXiv 2405.04434 §2.2; Megatron-LM
``megatron/core/transformer/moe/router.py``) the counts and dispatch volumes hold the *kept*
assignments only; the dropped ones are counted separately (they skip the expert through the
residual).

Shapes use ``L`` = ``gate.layers_simulated`` (MoE layer ``i`` uses sample layer
:func:`~moesim.gate.sampling.gate_layer_of` ``(scenario, i)``, set by ``gate.layer_map``),
``M`` = micro-batches per step, ``n_src`` source ranks, ``n_dest`` destination ranks, ``n_nodes``
nodes of the expert-parallel group (``scenario.ep_nodes`` for samples moesim builds), ``E``
experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, eq=False)
class RoutingSample:
    """Expert loads and dispatch volumes standing for one optimizer step.

    Attributes
    ----------
    step : int
        The optimizer step this sample stands for.
    counts : ndarray, shape (L, M, n_src, E), int64
        Kept (token, expert) assignments routed from source rank ``src`` in micro-batch ``m`` of
        layer ``l``. Sums over ``E`` to ``top_k · tokens`` of that rank's micro-batch minus
        ``dropped``.
    dest_tokens : ndarray, shape (L, M, n_src, n_dest), int64
        Distinct tokens ``src`` sends to expert-parallel rank ``d`` (for at least one kept
        assignment); expert ``e`` lives on rank ``e // (E // n_dest)``.
    node_tokens : ndarray, shape (L, M, n_src, n_nodes), int64
        Distinct tokens ``src`` sends to node ``j`` of the expert-parallel group: a token counts
        once per node hosting at least one of its kept experts, node ``j`` hosting experts
        ``[j·E/n_nodes, (j+1)·E/n_nodes)``. Bounded below by the largest ``dest_tokens`` of the
        node's ranks and above by their sum (and by the cell's tokens). Default when not given:
        ``dest_tokens`` itself, i.e. every destination rank counted as a node of its own — exact
        when each node hosts one rank, and in particular with a single destination rank, where
        it is the cell's tokens with at least one kept assignment; otherwise an upper bound on
        the inter-node volume (no dedup inside a node). Compare :attr:`n_nodes` with the
        cluster's before using a sample built without it.
    metrics : dict of str to float
        At least ``maxvio_batch`` (MaxVio of the per-expert loads of the whole sample, mean over
        layers) and ``maxvio_micro`` (mean over layers and micro-batches of the MaxVio of one
        micro-batch's loads summed over source ranks); samples built by moesim also carry
        ``maxvio_compute_batch``, ``cv_batch``, ``rank_maxvio_micro``, ``dead_experts``,
        ``dropped_fraction`` and ``nodes_per_token``
        (:func:`~moesim.gate.sampling.sample_metrics`).
    dropped : ndarray, shape (L, M, n_src), int64
        (token, expert) assignments dropped by the capacity in each cell; all zero for dropless
        routing (the default when constructed without it).
    """

    step: int
    counts: npt.NDArray[np.int64]
    dest_tokens: npt.NDArray[np.int64]
    metrics: dict[str, float]
    dropped: npt.NDArray[np.int64] = None  # type: ignore[assignment]
    node_tokens: npt.NDArray[np.int64] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        cells = self.counts.shape[:3]
        if self.dropped is None:
            object.__setattr__(self, "dropped", np.zeros(cells, dtype=np.int64))
        elif self.dropped.shape != cells:
            raise ValueError(f"dropped: shape {self.dropped.shape} is not {cells}")
        if self.node_tokens is None:
            # Without node information each destination rank stands as its own node.
            object.__setattr__(self, "node_tokens", self.dest_tokens)
        elif self.node_tokens.ndim != 4 or self.node_tokens.shape[:3] != cells:
            raise ValueError(f"node_tokens: shape {self.node_tokens.shape} is not {cells} + (n,)")
        n_nodes = self.node_tokens.shape[3]
        if n_nodes < 1 or self.counts.shape[3] % n_nodes:
            raise ValueError(
                f"node_tokens: {n_nodes} nodes do not evenly hold {self.counts.shape[3]} experts"
            )

    @property
    def layers(self) -> int:
        """``L``, layers simulated."""
        return int(self.counts.shape[0])

    @property
    def micro_batches(self) -> int:
        """``M``."""
        return int(self.counts.shape[1])

    @property
    def n_src(self) -> int:
        """Source ranks."""
        return int(self.counts.shape[2])

    @property
    def n_dest(self) -> int:
        """Destination ranks."""
        return int(self.dest_tokens.shape[3])

    @property
    def n_nodes(self) -> int:
        """Nodes of the expert-parallel group (the last axis of ``node_tokens``)."""
        return int(self.node_tokens.shape[3])

    @property
    def n_experts(self) -> int:
        """``E``."""
        return int(self.counts.shape[3])
