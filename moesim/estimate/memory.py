"""The per-GPU memory check of a run: the worst GPU's estimate against its HBM.

The estimate itself is :func:`moesim.cluster.memory.gpu_memory`; this module gives it the
engine's pipeline pieces (``layer_split: balanced`` cuts them by compute) and turns a layout
that does not fit into one :class:`~moesim.errors.ScenarioError`, before anything is simulated
or written. ``moesim validate`` and every run call it.
"""

from __future__ import annotations

from collections.abc import Sequence

from moesim import units
from moesim.cluster import ComputeModel
from moesim.cluster.memory import MemoryEstimate, gpu_memory, scenario_pieces
from moesim.engine.step import balanced_split
from moesim.errors import ScenarioError
from moesim.scenario.schema import Scenario


def memory_estimate(
    scenario: Scenario, pieces: Sequence[Sequence[int]] | None = None
) -> MemoryEstimate:
    """The worst GPU's peak memory under the scenario's pipeline pieces (``pieces``: the
    layers of each piece, as the engine cut them; default: cut them as the engine does)."""
    p = scenario.parallelism
    if pieces is None:
        if p.layer_split == "balanced":
            n = p.pipeline * p.virtual_stages
            pieces = balanced_split(scenario, ComputeModel(scenario), n)
        else:
            pieces = scenario_pieces(scenario)
    return gpu_memory(scenario, pieces)


def check_memory(
    scenario: Scenario, pieces: Sequence[Sequence[int]] | None = None
) -> MemoryEstimate:
    """:func:`memory_estimate`, refused when it exceeds the GPU's HBM.

    Raises
    ------
    ScenarioError
        ``parallelism``: the estimate, its components and the capacity, on one line.
    """
    est = memory_estimate(scenario, pieces)
    if not est.fits:
        raise ScenarioError(
            "parallelism",
            f"the estimated peak memory per GPU (pipeline stage {est.stage}) is "
            f"{est.describe()} but one {est.gpu} has {est.capacity / units.GiB:.1f} GiB "
            "(cluster.gpu.hbm_gib); shard more, recompute (parallelism.recompute), shard the "
            "optimizer (parallelism.zero1) or use smaller micro-batches",
        )
    return est
