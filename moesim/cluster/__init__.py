"""Static cluster description: topology and links, rank and expert layout, compute cost model,
and the model's FLOP and parameter counts. No simulation state lives here."""

from __future__ import annotations

from moesim.cluster.compute import ComputeModel
from moesim.cluster.model_costs import model_costs, model_flops_per_token, total_params
from moesim.cluster.topology import Layout, Topology, build_layout, build_topology

__all__ = [
    "ComputeModel",
    "Layout",
    "Topology",
    "build_layout",
    "build_topology",
    "model_costs",
    "model_flops_per_token",
    "total_params",
]
