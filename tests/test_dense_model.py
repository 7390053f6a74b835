"""A dense model (no ``model.moe``): one run named after the scenario through ``moesim run``,
no gate and no strategies; and the one-line errors of impossible tensor-parallel layouts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from base_scenario import BASE, derive

import moesim.results
from moesim.cli import main
from moesim.cluster import total_params
from moesim.errors import ScenarioError
from moesim.scenario import load_scenario, scenario_from_dict

DENSE = derive(
    BASE,
    name="dense_tiny",
    model={"dense_layers": 0, "dense_ffn": 2048, "seq_len": 512},
    parallelism={"pipeline": 2, "tensor": 2, "expert": 1, "data": 4, "micro_batch_size": 1},
    training={"total_tokens": 2.0e6, "global_batch_sequences": 16, "sample_points": 2},
)
del DENSE["model"]["moe"], DENSE["strategies"]


def test_dense_model_runs_through_the_cli(tmp_path, capsys):
    path = tmp_path / "dense.yaml"
    path.write_text(yaml.safe_dump(DENSE))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 0
    assert "dense_tiny" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["dense_tiny"]
    values = summary["dense_tiny"]
    assert values["maxvio_batch"] is None
    assert 0 < values["mfu"] < 1
    assert values["step_time_s"] == pytest.approx(values["balanced_step_time_s"])
    assert not (out / "expert_load_heatmap.png").exists()
    assert (out / "step_breakdown.png").exists()
    run = moesim.results.load(out)
    assert len(run.experts) == 0
    assert len(run.gate) == 0
    assert set(run.timeline["strategy"]) == {"dense_tiny"}
    # Tensor parallelism 2: its collectives show in the stage split.
    assert (run.stages["tp_comm_s"] > 0).all()


def _error(raw) -> ScenarioError:  # type: ignore[no-untyped-def]
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(raw)
    return info.value


def test_strategies_refused_for_a_dense_model():
    raw = copy.deepcopy(DENSE)
    raw["strategies"] = [{"kind": "aux_loss", "alpha": 1e-3}]
    err = _error(raw)
    assert err.path == "strategies"
    assert "dense model" in err.message


def test_moe_model_needs_a_strategy():
    raw = copy.deepcopy(BASE)
    del raw["strategies"]
    assert _error(raw).path == "strategies"


def test_dense_model_needs_dense_ffn():
    raw = copy.deepcopy(DENSE)
    del raw["model"]["dense_ffn"]
    assert _error(raw).path == "model.dense_ffn"


def test_dense_model_has_no_expert_parallelism():
    raw = copy.deepcopy(DENSE)
    raw["parallelism"].update(expert=4, data=1)
    assert _error(raw).path == "parallelism.expert"


@pytest.mark.parametrize(
    ("tensor", "data", "heads", "kv_heads", "message"),
    [
        (3, 4, 12, 12, "must divide gpus_per_node"),  # 3 does not divide 8
        (16, 8, 16, 16, "must divide gpus_per_node"),  # beyond one node (pipeline 1 below)
        (4, 4, 6, 6, "does not divide model.attention.heads"),
        (4, 4, 8, 2, "does not divide model.attention.kv_heads"),
    ],
    ids=["not-dividing-node", "beyond-node", "heads", "kv-heads"],
)
def test_impossible_tensor_layouts(tensor, data, heads, kv_heads, message):
    raw = copy.deepcopy(DENSE)
    raw["parallelism"].update(tensor=tensor, data=data)
    if tensor == 16:
        raw["parallelism"].update(pipeline=1, data=16)
        raw["cluster"]["nodes"] = 2
    raw["model"]["attention"].update(heads=heads, kv_heads=kv_heads)
    err = _error(raw)
    assert err.path == "parallelism.tensor"
    assert message in err.message
    assert "\n" not in err.message


@pytest.mark.parametrize(
    ("tensor", "context", "seq_len", "message"),
    [
        (2, 8, 512, "must divide gpus_per_node"),  # 16 GPUs: beyond one node
        (2, 2, 516, "is not a multiple of 2×context×tensor"),
    ],
    ids=["beyond-node", "sequence"],
)
def test_impossible_context_layouts(tensor, context, seq_len, message):
    raw = copy.deepcopy(DENSE)
    raw["parallelism"].update(tensor=tensor, context=context, pipeline=1, data=8)
    raw["model"]["seq_len"] = seq_len
    err = _error(raw)
    assert err.path == "parallelism.context"
    assert message in err.message


def test_llama3_70b_parameter_count():
    """The dense parameter count of the shipped Llama-3-70B shape is the released checkpoint's
    70,553,706,496 (huggingface.co/meta-llama/Meta-Llama-3-70B, safetensors total) less the
    RMSNorm weights moesim does not count (two per layer and the final one, 8,192 each)."""
    sc = load_scenario(Path(__file__).resolve().parents[1] / "scenarios" / "llama3_70b_dense.yaml")
    norms = (2 * sc.model.layers + 1) * sc.model.hidden
    assert total_params(sc.model) + norms == 70_553_706_496
