"""The fuzz suite: no scenario makes moesim crash, hang or write NaN.

``make test`` runs a bounded profile (a few hundred validate cases, a handful of small runs,
derandomised). ``make fuzz`` sets ``MOESIM_FUZZ=full``: at least 5,000 validate cases and 300
small runs, outcomes counted rather than stopped at, and the counts printed at the end.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.fuzzlib import (
    SMALL,
    classify,
    dump,
    near_valid,
    raw_texts,
    shipped_mutants,
    tally,
    valid_small,
)

FULL = os.environ.get("MOESIM_FUZZ") == "full"
# (validate cases per source, small runs per source); full: 4 × 1,300 = 5,200 and 2 × 160 = 320.
VALIDATE_N, RUN_N = (1300, 160) if FULL else (60, 4)
if os.environ.get("MOESIM_FUZZ_N"):  # "validate,run" per source, for a reduced profile
    VALIDATE_N, RUN_N = (int(x) for x in os.environ["MOESIM_FUZZ_N"].split(","))
COUNTS: dict[str, Counter[str]] = {"validate": Counter(), "run": Counter()}
FAILURES: list[str] = []

SETTINGS = settings(
    max_examples=VALIDATE_N,
    deadline=None,
    derandomize=not FULL,
    database=None,
    suppress_health_check=list(HealthCheck),
)
RUN_SETTINGS = settings(SETTINGS, max_examples=RUN_N)


def _check(data: bytes, command: str) -> None:
    with tempfile.TemporaryDirectory(prefix="moesim-fuzz-") as tmp:
        outcome, detail = classify(
            data, Path(tmp), command, timeout_s=20 if command == "validate" else 90
        )
    COUNTS[command][outcome] += 1
    if outcome not in ("ok", "clean_error"):
        keep = Path(tempfile.gettempdir()) / "moesim-fuzz-failures"
        keep.mkdir(exist_ok=True)
        case = keep / f"case-{len(FAILURES)}-{command}.yaml"
        case.write_bytes(data)
        FAILURES.append(f"{command} {outcome} ({case}): {detail[:300]}")
        if not FULL:
            pytest.fail(f"{outcome}: {detail}\n--- case ---\n{data[:2000]!r}")


@SETTINGS
@given(valid_small())
def test_validate_schema_drawn(doc):
    _check(dump(doc), "validate")


@SETTINGS
@given(near_valid())
def test_validate_near_valid(doc):
    _check(dump(doc), "validate")


@SETTINGS
@given(shipped_mutants())
def test_validate_mutated_shipped(doc):
    _check(dump(doc), "validate")


@SETTINGS
@given(raw_texts())
def test_validate_raw_text(data):
    _check(data, "validate")


@RUN_SETTINGS
@given(valid_small())
def test_run_schema_drawn(doc):
    _check(dump(doc), "run")


@RUN_SETTINGS
@given(near_valid(SMALL) | st.builds(lambda: SMALL))
def test_run_near_valid(doc):
    _check(dump(doc), "run")


def test_zz_report():
    """Last in the file: the counts (``make fuzz`` prints them) and none of the bad kinds."""
    for command, counts in COUNTS.items():
        print(f"\nfuzz {command}: {sum(counts.values())} cases: {tally(counts)}")
    for line in FAILURES[:20]:
        print("  ", line)
    if FULL and not os.environ.get("MOESIM_FUZZ_N"):
        validate, run = sum(COUNTS["validate"].values()), sum(COUNTS["run"].values())
        assert validate >= 5000, validate
        assert run >= 300, run
    assert not FAILURES
