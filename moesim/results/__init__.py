"""Results: tidy tables from run records, the run directory (write and load), plots.

In a notebook: ``run = moesim.results.load("runs/quickstart")`` then ``run.timeline``,
``run.summary_frame()``, ``run.gpus`` … as pandas DataFrames; ``moesim.results.compare(runs)``
puts several runs' summaries side by side.
"""

from __future__ import annotations

from moesim.results.compare import compare
from moesim.results.store import RunResults, build_tables, load, write_run

__all__ = ["RunResults", "build_tables", "compare", "load", "write_run"]
