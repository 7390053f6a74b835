"""Scenario sections for load-balancing strategies (routing.md §2, §3, §5, §6)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from moesim.scenario.base import Frozen


class NoBalancing(Frozen):
    kind: Literal["none"]
    name: str = "none"


class AuxLoss(Frozen):
    """Switch/GShard auxiliary loss α·N·Σ f_i·P_i at micro-batch scope (routing.md §5.1)."""

    kind: Literal["aux_loss"]
    name: str = "aux_loss"
    alpha: Annotated[float, Field(ge=0)] = 1e-3


class LossFree(Frozen):
    """Auxiliary-loss-free bias balancing, sign rule (routing.md §2.2)."""

    kind: Literal["loss_free"]
    name: str = "loss_free"
    gamma: Annotated[float, Field(ge=0)] = 1e-3


Strategy = Annotated[NoBalancing | AuxLoss | LossFree, Field(discriminator="kind")]
