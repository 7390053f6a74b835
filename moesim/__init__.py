"""moesim: a discrete-event simulator of Mixture-of-Experts training clusters.

It predicts step time, GPU-hours, stragglers and dollar cost of an MoE training run, with the
expert load produced by a real numerical router trained under the balancing method you choose.
"""

from __future__ import annotations

__version__ = "0.1.0"
