"""The compute cost model: roofline pieces, recomputation, SM reservation, MTP, optimizer."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from moesim.cluster import ComputeModel, model_flops_per_token
from moesim.scenario import scenario_from_dict


def _model(tiny_dict, **parallelism):
    raw = copy.deepcopy(tiny_dict)
    raw["parallelism"].update(parallelism)
    return ComputeModel(scenario_from_dict(raw))


def test_cold_expert_still_reads_its_weights(tiny_dict):
    c = _model(tiny_dict)
    cold = c.experts(np.zeros(4), backward=False)
    weights = 4 * 3 * c.hidden * c.expert_ffn * c.weight_bytes
    assert cold == pytest.approx(weights / c.hbm + c.launch)


def test_hot_expert_is_compute_bound(tiny_dict):
    c = _model(tiny_dict)
    rows = np.array([8192.0, 0, 0, 0])
    flops = 2 * 8192 * 3 * c.hidden * c.expert_ffn
    expected = (flops + 3 * c.f_half) / (c.peak * c.eff_max) + c.launch
    assert c.experts(rows, backward=False) == pytest.approx(expected)


def test_backward_gemms_cost_twice_the_forward(tiny_dict):
    c = _model(tiny_dict)
    rows = np.array([8192.0, 8192, 8192, 8192])
    fwd = c.experts(rows, False) - c.launch
    bwd = c.experts(rows, True) - c.launch
    assert bwd == pytest.approx(2 * fwd)


def test_recomputation_adds_forward_work_to_the_backward(tiny_dict):
    none = _model(tiny_dict, recompute="none")
    selective = _model(tiny_dict, recompute="selective")
    full = _model(tiny_dict, recompute="full")
    rows = np.full(4, 1024.0)
    assert none.attention(False) == selective.attention(False) == full.attention(False)
    assert none.attention(True) < selective.attention(True) < full.attention(True)
    extra = full.attention(True) - none.attention(True)
    assert extra == pytest.approx(none.attention(False))  # the whole forward, launch included
    assert full.experts(rows, True) == pytest.approx(
        none.experts(rows, True) + none.experts(rows, False) - none.launch
    )
    assert selective.experts(rows, True) == none.experts(rows, True)


def test_sms_reserved_for_communication_slow_compute(tiny_dict):
    plain = _model(tiny_dict)
    reserved = _model(tiny_dict, comm_sms=20)
    assert reserved.peak == pytest.approx(plain.peak * (132 - 20) / 132)
    rows = np.array([8192.0, 8192, 8192, 8192])
    ratio = (reserved.experts(rows, False) - reserved.launch) / (
        plain.experts(rows, False) - plain.launch
    )
    assert ratio == pytest.approx(132 / 112)


def test_mtp_module_adds_model_flops(tiny_dict):
    base = scenario_from_dict(tiny_dict)
    tiny_dict["model"]["mtp_depth"] = 1
    mtp = scenario_from_dict(tiny_dict)
    assert model_flops_per_token(mtp.model) > model_flops_per_token(base.model)
    assert ComputeModel(mtp).mtp_module(True) > ComputeModel(mtp).mtp_module(False) > 0


def test_comm_sms_cannot_take_every_sm(tiny_dict):
    from moesim.errors import ScenarioError

    tiny_dict["parallelism"]["comm_sms"] = 132
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(tiny_dict)
    assert info.value.path == "parallelism.comm_sms"
