"""The scenario file's JSON Schema (``moesim schema``), for editors and external validators.

Pydantic describes the validated :class:`~moesim.scenario.schema.Scenario`; a scenario *file*
may say more than that model does before loading resolves it: ``cluster.gpu`` may name a
catalogue entry (``H100``) or a preset with overridden fields (``{preset: H800, sms: 120}``).
This schema accepts those forms too, so every file ``moesim validate`` accepts passes it (the
converse does not hold: cross-field rules live in the validators, not in the schema).
"""

from __future__ import annotations

import copy
from typing import Any

from moesim.scenario.presets import GPU_PRESETS
from moesim.scenario.schema import Scenario

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def scenario_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a scenario file."""
    schema = copy.deepcopy(Scenario.model_json_schema())
    defs = schema["$defs"]
    names = sorted(GPU_PRESETS)
    gpu = defs["Gpu"]
    defs["GpuPreset"] = {
        "title": "GpuPreset",
        "description": "A catalogue GPU with some of its fields overridden.",
        "type": "object",
        "properties": {
            "preset": {"enum": names, "description": "catalogue entry"},
            **gpu["properties"],
        },
        "required": ["preset"],
        "additionalProperties": False,
    }
    cluster_gpu = defs["Cluster"]["properties"]["gpu"]
    defs["Cluster"]["properties"]["gpu"] = {
        "anyOf": [
            {"type": "string", "enum": names, "description": "catalogue entry, by name"},
            {"$ref": "#/$defs/GpuPreset"},
            cluster_gpu,
        ],
        "description": "a catalogue name, a preset with overrides, or every field spelled out",
    }
    return {"$schema": DIALECT, **schema}
