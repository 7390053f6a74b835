"""SI units and the conversions into them.

Everything inside moesim is SI: seconds, bytes, FLOP, FLOP/s, bytes/s, US dollars. Scenario
fields carry a unit suffix (``bandwidth_gbytes_per_s``, ``latency_us``) and are converted here,
once, when the scenario is loaded. No other module multiplies by a power of ten for a unit.
"""

from __future__ import annotations

KILO = 1e3
MEGA = 1e6
GIGA = 1e9
TERA = 1e12
PETA = 1e15

KiB = 2**10
MiB = 2**20
GiB = 2**30

MICROSECOND = 1e-6
MILLISECOND = 1e-3
MINUTE = 60.0
HOUR = 3600.0
DAY = 24 * HOUR

BITS_PER_BYTE = 8

# Bytes per element of the number formats a scenario may name.
BYTES_PER_ELEMENT = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}


def tflops(value: float) -> float:
    """TFLOP/s → FLOP/s."""
    return value * TERA


def gbytes_per_s(value: float) -> float:
    """GB/s (decimal gigabytes) → bytes/s."""
    return value * GIGA


def gbits_per_s(value: float) -> float:
    """Gb/s (decimal gigabits, as NICs are sold) → bytes/s."""
    return value * GIGA / BITS_PER_BYTE


def tbytes_per_s(value: float) -> float:
    """TB/s → bytes/s."""
    return value * TERA


def microseconds(value: float) -> float:
    """µs → s."""
    return value * MICROSECOND


def seconds_to_hours(value: float) -> float:
    """s → h."""
    return value / HOUR


def seconds_to_days(value: float) -> float:
    """s → days."""
    return value / DAY


def seconds_to_milliseconds(value: float) -> float:
    """s → ms (for display)."""
    return value * KILO


def seconds_to_microseconds(value: float) -> float:
    """s → µs (trace timestamps)."""
    return value * MEGA


def gigabytes_in_gib(value: float) -> float:
    """GB (decimal, as HBM is sold) → GiB."""
    return value * GIGA / GiB
