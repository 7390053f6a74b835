"""The test scenarios derive from one base scenario, with their differences written out."""

from __future__ import annotations

import ast
from pathlib import Path

from base_scenario import BASE, TINY, derive

ROOT = Path(__file__).resolve().parents[1]


def _notebook_base() -> dict:
    """``BASE`` of the balancing-dilemma notebook's first code cell (its constant assignments
    evaluated in order; nothing else of the cell runs)."""
    source = (ROOT / "notebooks" / "build_balancing_dilemma.py").read_text()
    cells = next(
        node.value
        for node in ast.parse(source).body
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "CELLS"
    )
    code = next(text for kind, text in ast.literal_eval(cells) if kind == "code")
    scope: dict = {}
    for node in ast.parse(code).body:
        if isinstance(node, ast.Assign) and node.targets[0].__class__ is not ast.Attribute:
            if isinstance(node.value, ast.Call):
                continue  # calls (training, timers) are not constants
            exec(compile(ast.Module([node], []), "cell", "exec"), {"__builtins__": {}}, scope)
            if "BASE" in scope:
                return scope["BASE"]
    raise AssertionError("no BASE in the notebook's first code cell")


def test_derive_merges_one_level_down_and_copies():
    out = derive(BASE, seed=9, model={"moe": {"top_k": 4}}, gate={"layers_simulated": 2})
    assert out["seed"] == 9
    assert out["model"]["moe"] == {**BASE["model"]["moe"], "top_k": 4}
    assert out["model"]["hidden"] == BASE["model"]["hidden"]
    assert out["gate"] == {"layers_simulated": 2}
    assert BASE["model"]["moe"]["top_k"] == 2  # the base is untouched


def test_tiny_differs_from_the_base_only_where_it_says():
    assert TINY["model"] == BASE["model"]
    assert TINY["cluster"]["gpus_per_node"] * TINY["cluster"]["nodes"] == 8
    assert TINY["cluster"]["nic"]["bandwidth_gbits_per_s"] == 400


def test_notebook_scenario_is_the_base_with_its_listed_differences():
    notebook = _notebook_base()
    expected = derive(
        BASE,
        name=notebook["name"],
        training={"total_tokens": notebook["training"]["total_tokens"]},
        gate=notebook["gate"],
        stream=notebook["stream"],
    )
    assert notebook == expected
