"""The routing sample: the expert load the engine simulates for one optimizer step.

The engine does not route tokens. For each step it simulates, it receives a
:class:`RoutingSample` that says, per simulated MoE layer, micro-batch and source rank of an
expert-parallel group, how many (token, expert) assignments go to each expert — the work of each
expert's GEMMs — and how many distinct tokens travel to each destination expert-parallel rank —
the all-to-all dispatch volume (a token whose experts share a rank is sent there once). Loads are
counted in assignments as in routing.md §1, and MaxVio is routing.md §2.4's. With an expert
capacity (routing.md §4, §6.2 item 4) the counts and dispatch volumes hold the *kept* assignments
only; the dropped ones are counted separately (they skip the expert through the residual).

Shapes use ``L`` = ``gate.layers_simulated`` (MoE layer ``i`` uses sample layer
:func:`~moesim.gate.sampling.gate_layer_of` ``(scenario, i)``, set by ``gate.layer_map``),
``M`` = micro-batches per step, ``n_src`` source ranks, ``n_dest`` destination ranks, ``E`` experts.
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

    def __post_init__(self) -> None:
        if self.dropped is None:
            object.__setattr__(self, "dropped", np.zeros(self.counts.shape[:3], dtype=np.int64))
        elif self.dropped.shape != self.counts.shape[:3]:
            raise ValueError(f"dropped: shape {self.dropped.shape} is not {self.counts.shape[:3]}")

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
    def n_experts(self) -> int:
        """``E``."""
        return int(self.counts.shape[3])
