"""Output invariants, checked on every run's final tables and summary before anything is written.

A run directory is only written when its numbers obey what they mean:

- **finite**: no NaN or infinity in ``summary.json`` (a value that does not apply is ``null``);
  in the tables no infinity anywhere, and NaN (written to Parquet as null, "not applicable")
  only in the columns listed in :data:`NOT_APPLICABLE` — metrics a strategy or run does not
  have (an auxiliary loss without one, EPLB migrations without EPLB, the task loss of a trace
  replay);
- **no negative times**: every ``*_s`` column and summary value, GPU-hours, costs, tokens and
  bytes are ≥ 0 (up to float rounding);
- **attribution adds up**: the ``attribution_*_gpu_hours`` causes sum to
  ``gpu_hours_with_failures``;
- **tokens conserved**: each strategy's timeline reaches exactly ``training.total_tokens``,
  never going back, and at every simulated step the experts' tokens add up to the GPUs';
- **bands ordered**: P10 ≤ P50 ≤ P90 in the bands table and in the summary;
- **headline in its band**: the summary's step time, GPU-hours and cost lie within their own
  P10–P90 (:mod:`moesim.estimate.montecarlo` takes them from the median-GPU-hours seed).

A violation is a :class:`~moesim.errors.SimulationError` naming the scenario, the invariant and
where it failed — a bug to report, never a table to trust.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from moesim.errors import SimulationError

HEADLINE_IN_BAND = ("step_time_s", "gpu_hours", "cost_usd")
"""Summary scalars that are the headline seed's and must lie in their own P10–P90 band (they
are all the run's wall time scaled, and the headline seed is the median-GPU-hours one)."""
REL_TOL = 1e-6
"""Relative tolerance of sums (attribution, tokens): float64 sums of a few hundred terms."""
NEG_TOL = 1e-9
"""Rounding allowed below zero, relative to the column's largest magnitude (≥ 1 s)."""

NOT_APPLICABLE: dict[str, tuple[str, ...]] = {
    "timeline": ("task_loss", "maxvio_batch", "maxvio_sample", "maxvio_micro"),
    "gate": ("*",),
    "steps": ("routing_*",),
}
"""Columns that may hold NaN (null in Parquet): the metric does not apply to that row.
``*`` matches every non-key column, ``prefix*`` every column with that prefix."""

_KEYS = {"strategy", "point", "step", "stage", "gpu", "expert", "link", "topic"}
_SIGNED_SUMMARY = {
    "straggler_overhead",
    "imbalance_gpu_hours",
    "imbalance_cost_usd",
    "straggler_gpu_hours",
    "straggler_cost_usd",
    "attribution_routing_imbalance_gpu_hours",
    "attribution_hardware_stragglers_gpu_hours",
    "interference_cos",
}
"""Counterfactual differences (routed minus balanced, actual minus healthy hardware) and
correlations: their sign is the finding, not an error."""


def _nonnegative_name(name: str) -> bool:
    return (
        name.endswith(("_s", "_bytes", "gpu_hours", "cost_usd", "_days"))
        or name in {"tokens", "bytes", "expert_tokens", "wall_s"}
    ) and name not in _SIGNED_SUMMARY


def _may_be_na(table: str, column: str) -> bool:
    for pattern in NOT_APPLICABLE.get(table, ()):
        if pattern == "*" and column not in _KEYS:
            return True
        if pattern.endswith("*") and pattern != "*" and column.startswith(pattern[:-1]):
            return True
        if pattern == column:
            return True
    return False


class _Checker:
    def __init__(self, scenario: str) -> None:
        self.scenario = scenario

    def fail(self, invariant: str, where: str) -> None:
        raise SimulationError(
            f"scenario {self.scenario!r}: output invariant '{invariant}' violated ({where}); "
            "nothing was written — this is a moesim bug, please report it with the scenario"
        )


def _check_tables(chk: _Checker, frames: Mapping[str, pd.DataFrame]) -> None:
    for table, df in frames.items():
        for column in df.columns:
            values = df[column]
            if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
                continue
            arr = values.to_numpy(dtype=np.float64, na_value=np.nan)
            if np.isinf(arr).any():
                chk.fail("finite", f"{table}.{column} holds an infinity")
            if np.isnan(arr).any() and not _may_be_na(table, column):
                chk.fail("finite", f"{table}.{column} holds NaN")
            if _nonnegative_name(column) and arr.size:
                scale = max(1.0, float(np.nanmax(np.abs(arr))) if not np.isnan(arr).all() else 1)
                low = np.nanmin(arr) if not np.isnan(arr).all() else 0.0
                if low < -NEG_TOL * scale:
                    chk.fail("no negative times", f"{table}.{column} has {low:.3g}")
    _check_tokens(chk, frames)
    bands = frames.get("bands")
    if bands is not None and len(bands):
        for measure in ("gpu_hours", "cost_usd"):
            p10, p50, p90 = (bands[f"{measure}_p{q}"].to_numpy(float) for q in (10, 50, 90))
            tol = REL_TOL * np.maximum(1.0, np.abs(p90))
            if (p10 > p50 + tol).any() or (p50 > p90 + tol).any():
                chk.fail("bands ordered", f"bands.{measure}: P10 ≤ P50 ≤ P90 fails")


def _check_tokens(chk: _Checker, frames: Mapping[str, pd.DataFrame]) -> None:
    experts, gpus = frames.get("experts"), frames.get("gpus")
    if experts is not None and gpus is not None and len(experts) and len(gpus):
        keys = ["strategy", "point", "step"]
        a = experts.groupby(keys)["tokens"].sum()
        b = gpus.groupby(keys)["expert_tokens"].sum()
        joined = pd.concat([a, b], axis=1).fillna(-1)
        if (joined["tokens"] != joined["expert_tokens"]).any():
            bad = joined[joined["tokens"] != joined["expert_tokens"]].index[0]
            chk.fail("tokens conserved", f"experts vs gpus tokens at {bad}")


def _check_timeline(chk: _Checker, timeline: pd.DataFrame | None, total_tokens: float) -> None:
    if timeline is None or not len(timeline):
        return
    for name, rows in timeline.groupby("strategy", sort=False):
        tokens = rows["tokens"].to_numpy(float)
        if (np.diff(tokens) < 0).any():
            chk.fail("tokens conserved", f"timeline tokens of {name} go back")
        if not math.isclose(tokens[-1], total_tokens, rel_tol=REL_TOL):
            chk.fail(
                "tokens conserved",
                f"timeline of {name} ends at {tokens[-1]:.6g} tokens, not {total_tokens:.6g}",
            )


def _check_summary(chk: _Checker, summary: Mapping[str, Mapping[str, Any]]) -> None:
    for name, values in summary.items():
        for key, value in values.items():
            if value is None or isinstance(value, bool | str):
                continue
            if not isinstance(value, int | float):
                chk.fail("finite", f"summary {name}.{key} is a {type(value).__name__}")
            if not math.isfinite(value):
                chk.fail("finite", f"summary {name}.{key} is {value}")
            if _nonnegative_name(
                key.removesuffix("_p10").removesuffix("_p50").removesuffix("_p90")
            ) and value < -NEG_TOL * max(1.0, abs(value)):
                chk.fail("no negative times", f"summary {name}.{key} = {value:.3g}")
        parts = [v for k, v in values.items() if k.startswith("attribution_") and v is not None]
        total = values.get("gpu_hours_with_failures")
        if (
            parts
            and total is not None
            and not math.isclose(math.fsum(parts), total, rel_tol=REL_TOL, abs_tol=1e-9)
        ):
            chk.fail(
                "attribution adds up",
                f"{name}: causes sum to {math.fsum(parts):.6g} of {total:.6g} GPU-hours",
            )
        for key in values:
            if key.endswith("_p50"):
                base = key[: -len("_p50")]
                p10, p50, p90 = (values.get(f"{base}_p{q}") for q in (10, 50, 90))
                if p10 is None or p50 is None or p90 is None:
                    continue
                tol = REL_TOL * max(1.0, abs(p90))
                if p10 > p50 + tol or p50 > p90 + tol:
                    chk.fail("bands ordered", f"summary {name}.{base}: P10 ≤ P50 ≤ P90 fails")
                headline = values.get(base)
                if (
                    base in HEADLINE_IN_BAND
                    and isinstance(headline, int | float)
                    and not p10 - tol <= headline <= p90 + tol
                ):
                    chk.fail(
                        "headline in its band",
                        f"summary {name}.{base} = {headline:.6g} outside P10–P90 "
                        f"[{p10:.6g}, {p90:.6g}]",
                    )


def check_invariants(
    scenario_name: str,
    frames: Mapping[str, pd.DataFrame],
    summary: Mapping[str, Mapping[str, Any]],
    total_tokens: float | None = None,
) -> None:
    """Check a run's final tables and summary (see the module doc).

    Raises
    ------
    SimulationError
        On the first violated invariant, naming the scenario, the invariant and where.
    """
    chk = _Checker(scenario_name)
    _check_summary(chk, summary)
    _check_tables(chk, frames)
    if total_tokens is not None:
        _check_timeline(chk, frames.get("timeline"), total_tokens)
