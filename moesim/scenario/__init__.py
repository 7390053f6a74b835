"""Scenario files: schema, loading, presets.

``load_scenario(path)`` returns a frozen, validated :class:`Scenario` in which every quantity can
be read in SI units; ``dump_scenario`` writes the resolved form back.
"""

from __future__ import annotations

from moesim.scenario.loader import dump_scenario, load_scenario, scenario_from_dict
from moesim.scenario.schema import Scenario
from moesim.scenario.strategies import AuxLoss, LossFree, NoBalancing

__all__ = [
    "AuxLoss",
    "LossFree",
    "NoBalancing",
    "Scenario",
    "dump_scenario",
    "load_scenario",
    "scenario_from_dict",
]
