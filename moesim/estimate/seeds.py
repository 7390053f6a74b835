"""The seed plan: every stochastic part of a run draws from one named child of the scenario's
root seed (``numpy.random.SeedSequence(seed).spawn``), so the parts never share a stream and
adding one part does not shift the others.

Children of the root, by index:

0. ``gate``: token stream, teacher and router initialisation of every strategy's gate (each
   strategy gets the same seed: common random numbers).
1. ``samples``: one child per sampled point for the engine's routing samples (the same for every
   strategy).
2. ``hardware``: the run's persistent hardware faults (its first child) and each point's
   episodes and jitter (the others). The batch on which the final routers' topic × expert load
   is measured (``specialisation``) is drawn from this child's own stream, which the hardware
   draws never use (they use its children).
3. ``domains``: the per-domain held-out sequences on which the final routers' skew by data
   domain is measured (``routing_by_domain``).

Each accessor builds its ``SeedSequence`` afresh, so the order in which the parts ask for their
seeds does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GATE, SAMPLES, HARDWARE, DOMAINS = 0, 1, 2, 3


@dataclass(frozen=True)
class SeedPlan:
    """The named seeds of a run with root seed ``seed``."""

    seed: int

    def _child(self, index: int) -> np.random.SeedSequence:
        """Child ``index`` of the root (what ``SeedSequence(seed).spawn(3)[index]`` gives)."""
        return np.random.SeedSequence(self.seed, spawn_key=(index,))

    @property
    def gate(self) -> np.random.SeedSequence:
        """The gate trainings' seed (the same for every strategy)."""
        return self._child(GATE)

    def samples(self, points: int) -> list[np.random.SeedSequence]:
        """One routing-sample seed per sampled point."""
        return self._child(SAMPLES).spawn(points)

    def hardware(self, points: int) -> tuple[np.random.SeedSequence, list[np.random.SeedSequence]]:
        """The seed of the run's persistent hardware state and one seed per sampled point."""
        run, *per_point = self._child(HARDWARE).spawn(1 + points)
        return run, per_point

    @property
    def specialisation(self) -> np.random.SeedSequence:
        """The seed of the held-out batch that measures the final routers' specialisation."""
        return self._child(HARDWARE)

    @property
    def domains(self) -> np.random.SeedSequence:
        """The seed of the per-domain held-out sequences that measure the final routers' skew."""
        return self._child(DOMAINS)
