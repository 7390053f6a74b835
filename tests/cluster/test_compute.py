"""The kernel-level compute model: each kernel model in closed form, FLOP accounting,
recomputation, SMs reserved for communication, MTP, the optimizer."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from moesim.cluster import ComputeModel, model_flops_per_token
from moesim.cluster.kernels import GEMM_TILE_ROWS, MEMORY_KIND_FRACTION, KernelPricer
from moesim.cluster.model_costs import model_costs
from moesim.scenario import scenario_from_dict


def _model(tiny_dict, **parallelism):
    raw = copy.deepcopy(tiny_dict)
    raw["parallelism"].update(parallelism)
    return ComputeModel(scenario_from_dict(raw))


def _fp8(tiny_dict, **parallelism):
    raw = copy.deepcopy(tiny_dict)
    raw["model"]["gemm_precision"] = "fp8"
    raw["parallelism"].update(parallelism)
    return ComputeModel(scenario_from_dict(raw))


def test_gemm_closed_form(tiny_dict):
    """(F + F_half) / R with R = min(eff · s/S, ceiling) · peak, plus one launch."""
    sc = scenario_from_dict(tiny_dict)
    gpu = sc.cluster.gpu
    for comm in (0, 20):
        p = KernelPricer(gpu, comm)
        share = (gpu.sms - comm) / gpu.sms
        rate = min(gpu.bf16_gemm_efficiency * share, gpu.bf16_gemm_ceiling) * gpu.bf16_tflops * 1e12
        flops = 2 * 8192 * 7168 * 4096
        expected = (flops + gpu.bf16_gemm_half_gflop * 1e9) / rate + gpu.kernel_launch_us * 1e-6
        assert float(p.gemm_seconds(flops, 0.0, "bf16")) == pytest.approx(expected)
    # A tiny GEMM with huge operands is memory-bound: bytes over achievable bandwidth.
    nbytes = 1e10
    assert float(p.gemm_seconds(1e6, nbytes, "bf16")) == pytest.approx(nbytes / p.hbm + p.launch)


def test_bf16_power_ceiling_and_fp8_sm_scaling(tiny_dict):
    """Measured: BF16 GEMMs do not slow down when 20 SMs are taken (the power ceiling binds at
    132), FP8 GEMMs slow down in proportion to the SMs."""
    gpu = scenario_from_dict(tiny_dict).cluster.gpu
    full, carved = KernelPricer(gpu, 0), KernelPricer(gpu, 20)
    assert full.rate["bf16"] == pytest.approx(gpu.bf16_gemm_ceiling * gpu.bf16_tflops * 1e12)
    assert carved.rate["bf16"] >= full.rate["bf16"] * 0.99
    assert carved.rate["fp8"] / full.rate["fp8"] == pytest.approx(
        gpu.fp8_gemm_efficiency * 112 / 132 / gpu.fp8_gemm_ceiling
    )


def test_attention_closed_form(tiny_dict):
    """Flash attention: FLOP over the measured efficiency × BF16 peak pro-rated to the SMs left,
    the MLA head dims scaled by their measured factor; the backward does 2.5× the FLOP."""
    from moesim.cluster.kernels import MLA_ATTENTION_FACTOR

    gpu = scenario_from_dict(tiny_dict).cluster.gpu
    p = KernelPricer(gpu, 20)
    peak = gpu.bf16_tflops * 1e12 * 112 / 132
    flops = 1e12
    launch = gpu.kernel_launch_us * 1e-6
    assert p.attention_seconds(flops, backward=False, mla=False) == pytest.approx(
        flops / (gpu.attention_fwd_efficiency * peak) + launch
    )
    assert p.attention_seconds(flops, backward=True, mla=True) == pytest.approx(
        flops / (gpu.attention_bwd_efficiency * peak * MLA_ATTENTION_FACTOR[1]) + launch
    )
    c = ComputeModel(scenario_from_dict(tiny_dict))
    core = [k for k in c.kernels(c.balanced_rows(4)) if k.kind == "attention"]
    fwd = next(k for k in core if k.phase == "forward")
    bwd = next(k for k in core if k.phase == "backward_input")
    assert bwd.flops == pytest.approx(2.5 * fwd.flops)
    m = c.model
    att = m.attention
    # Causal: each token attends to half the sequence, QKᵀ and PV over every head.
    assert fwd.flops == pytest.approx(
        c.tokens * 2 * m.seq_len * att.heads * (att.head_dim + att.head_dim) / 2
    )


def test_memory_kernel_closed_form(tiny_dict):
    p = KernelPricer(scenario_from_dict(tiny_dict).cluster.gpu, 0)
    for kind, fraction in MEMORY_KIND_FRACTION.items():
        assert float(p.memory_seconds(1e9, kind)) == pytest.approx(
            1e9 / (p.hbm * fraction) + p.launch
        )
    assert float(p.memory_seconds(0.0, "copy")) == 0.0


def test_cold_expert_still_reads_its_weights(tiny_dict):
    c = _model(tiny_dict)
    cold = c.experts(np.zeros(4))
    weights = 4 * c.hidden * 2 * c.expert_ffn * 2 + 4 * c.expert_ffn * c.hidden * 2
    gemms = weights / c.hbm + 2 * c.launch
    assert float(cold.forward) == pytest.approx(gemms)
    assert float(cold.backward_weight) == 0.0


def test_expert_rows_are_padded_to_the_tile(tiny_dict):
    c = _model(tiny_dict)
    one = c.experts(np.array([1.0, 0, 0, 0]))
    full_tile = c.experts(np.array([float(GEMM_TILE_ROWS), 0, 0, 0]))
    gemm = [k for k in c._expert_kernels(np.array([[1.0, 0, 0, 0]])) if k[2] == "grouped_gemm"]
    assert gemm[0][3][0] == 2.0 * GEMM_TILE_ROWS * c.hidden * 2 * c.expert_ffn
    assert float(one.forward) < float(full_tile.forward)


def test_kernel_flops_add_up_to_model_flops(tiny_dict):
    """Forward GEMM and attention FLOPs of one MoE layer equal the model's per-token count ×
    tokens (no recomputation, rows a multiple of the tile); every weight GEMM's input and
    weight gradients each do its forward FLOPs; flash attention's backward does 2.5×."""
    c = _model(tiny_dict, recompute="none")
    m = c.model
    rows = c.balanced_rows(scenario_from_dict(tiny_dict).parallelism.expert)
    assert np.all(rows % GEMM_TILE_ROWS == 0)
    kernels = c.kernels(rows)
    moe_ops = {"attention", "router", "shared_experts", "routed_experts"}

    def flops(phase, kinds=("gemm", "grouped_gemm", "attention"), ops=moe_ops):
        return sum(k.flops for k in kernels if k.phase == phase and k.kind in kinds and k.op in ops)

    per_token = model_costs(m).moe_layer_forward_flops(m.moe.top_k, m.moe.shared_experts)
    # Each GPU serves its own tokens' share of routed work: tokens × top_k rows in all.
    assert flops("forward") == pytest.approx(c.tokens * per_token, rel=1e-12)
    gemm = ("gemm", "grouped_gemm")
    assert flops("backward_input", gemm) == pytest.approx(flops("forward", gemm))
    assert flops("backward_weight", gemm) == pytest.approx(flops("forward", gemm))
    assert flops("backward_input", ("attention",)) == pytest.approx(
        2.5 * flops("forward", ("attention",))
    )
    assert rows.size == m.moe.routed_experts // 4  # EP 4
    # The whole model: forward FLOPs of every op add up to model_flops_per_token / 3.
    ops = c.op_costs()
    assert ops.head.forward > 0
    assert ops.embedding.forward > 0
    dense = flops("forward", ops=("attention", "dense_ffn"))
    head = flops("forward", ops=("head",))
    total = m.dense_layers * dense + m.moe_layers * flops("forward") + head
    assert total == pytest.approx(c.tokens * model_flops_per_token(m) / 3, rel=1e-12)


def test_fp8_gemms_pay_for_their_casts(tiny_dict):
    c = _fp8(tiny_dict)
    names = [k.name for k in c.kernels(c.balanced_rows(4))]
    casts = [n for n in names if n.startswith("FP8 cast")]
    assert casts, "no quantisation kernels in an FP8 model"
    assert "permute tokens" in names
    assert "unpermute outputs" in names
    bf16 = _model(tiny_dict)
    assert not [k for k in bf16.kernels(bf16.balanced_rows(4)) if k.name.startswith("FP8 cast")]


def test_recomputation_adds_forward_work_to_the_backward(tiny_dict):
    none = _model(tiny_dict, recompute="none")
    selective = _model(tiny_dict, recompute="selective")
    full = _model(tiny_dict, recompute="full")
    rows = np.full(4, 1024.0)
    a = [x.op_costs().attention for x in (none, selective, full)]
    assert a[0].forward == a[1].forward == a[2].forward
    assert a[0].backward_input < a[1].backward_input < a[2].backward_input
    assert a[2].backward_input - a[0].backward_input == pytest.approx(a[0].forward)
    e = [x.experts(rows) for x in (none, selective, full)]
    assert float(e[2].backward_input - e[0].backward_input) == pytest.approx(float(e[0].forward))
    assert float(e[0].backward_input) < float(e[1].backward_input) < float(e[2].backward_input)
    # Selective redoes norms and activations, never a GEMM of a GQA model; the forward
    # kernels themselves are not marked, only their copies in the backward.
    assert all(k.phase == "backward_input" for k in full.kernels(rows) if k.recompute)
    redone = [k for k in selective.kernels(rows) if k.recompute]
    assert redone
    assert all(k.kind == "memory" for k in redone)


def test_selective_recompute_redoes_mla_up_projections(tiny_dict):
    raw = copy.deepcopy(tiny_dict)
    raw["model"]["attention"] = {
        "kind": "mla",
        "heads": 8,
        "head_dim": 64,
        "q_lora_rank": 256,
        "kv_lora_rank": 128,
        "rope_head_dim": 32,
    }
    raw["parallelism"]["recompute"] = "selective"
    c = ComputeModel(scenario_from_dict(raw))
    redone = {k.name for k in c.kernels(c.balanced_rows(4)) if k.recompute and k.kind == "gemm"}
    assert redone == {"MLA q up", "MLA kv up"}


def test_sms_reserved_for_communication_slow_fp8_compute(tiny_dict):
    plain = _fp8(tiny_dict)
    reserved = _fp8(tiny_dict, comm_sms=20)
    rows = np.array([8192.0, 8192, 8192, 8192])
    assert float(reserved.experts(rows).forward) > float(plain.experts(rows).forward)
    a, b = plain.op_costs().attention, reserved.op_costs().attention
    assert b.forward > a.forward


def test_kernel_table_lists_only_what_the_model_has(tiny_dict):
    tiny_dict["model"]["dense_layers"] = 0
    c = ComputeModel(scenario_from_dict(tiny_dict))
    ops = {k.op for k in c.kernels(c.balanced_rows(4))}
    assert "mtp" not in ops
    assert "dense_ffn" not in ops
    assert {"attention", "router", "routed_experts", "head", "embedding"} <= ops


def test_mtp_module_adds_model_flops(tiny_dict):
    base = scenario_from_dict(tiny_dict)
    tiny_dict["model"]["mtp_depth"] = 1
    mtp = scenario_from_dict(tiny_dict)
    assert model_flops_per_token(mtp.model) > model_flops_per_token(base.model)
    cost = ComputeModel(mtp).op_costs().mtp
    assert cost.backward > cost.forward > 0


def test_optimizer_is_memory_bound(tiny_dict):
    c = _model(tiny_dict)
    params = 1e9
    nbytes = params * (c.grad_bytes + 26)
    assert c.optimizer_step(params) == pytest.approx(
        nbytes / (c.hbm * MEMORY_KIND_FRACTION["adam"]) + c.launch
    )


def test_comm_sms_cannot_take_every_sm(tiny_dict):
    from moesim.errors import ScenarioError

    tiny_dict["parallelism"]["comm_sms"] = 132
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(tiny_dict)
    assert info.value.path == "parallelism.comm_sms"
