"""Base model and constrained types shared by every scenario section.

Every number a scenario holds is finite (``allow_inf_nan=False`` on every section: YAML's
``.inf`` and ``.nan`` are refused) and every count fits in a signed 32-bit integer, so index
arithmetic in NumPy cannot overflow. Fields with a physical meaning carry their own, tighter
range (documented next to the field and shown by ``moesim schema``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_COUNT = 2**31 - 1
"""Largest count a scenario field may hold (int32: NumPy index arithmetic stays exact)."""


class Frozen(BaseModel):
    """Base of every scenario section: immutable, unknown keys are an error, no inf or NaN."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _count(value: int) -> int:
    # An AfterValidator, not ``le``: a field's own, tighter ``le`` would otherwise be replaced.
    if value > MAX_COUNT:
        raise ValueError(f"at most {MAX_COUNT:,} (a 32-bit count)")
    return value


PositiveInt = Annotated[int, Field(gt=0), AfterValidator(_count)]
NonNegInt = Annotated[int, Field(ge=0), AfterValidator(_count)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Efficiency = Annotated[float, Field(ge=0.01, le=1)]
"""An achievable fraction of a hardware peak. Below 1 % the part is broken, not slow (a
micro-benchmark of a healthy part never measures that little), and the step-time model
degenerates towards infinite times."""
