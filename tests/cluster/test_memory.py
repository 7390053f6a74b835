"""Per-GPU memory estimate: closed forms of each component on the tiny model, tensor and
expert-tensor sharding through the functions directly, ZeRO-1, recompute, and the refusal of
a layout that does not fit (CLI: exit status 2, one line, no run directory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moesim import units
from moesim.cli import main
from moesim.cluster.memory import (
    DP_BUCKET_ELEMENTS,
    RESERVED_BYTES,
    Degrees,
    gpu_memory,
    gpu_params,
    gradient_bytes,
    layer_activation_bytes,
    optimizer_bytes,
    scenario_pieces,
    stage_memory,
    weight_bytes,
)
from moesim.scenario import scenario_from_dict

ROOT = Path(__file__).resolve().parents[2]

# The tiny model (tests/base_scenario.py): h = 1024, GQA 8 heads of 128 with 2 KV heads,
# 4 layers (the first dense, FFN 4096), 16 routed experts of FFN 512, 1 shared, top-2,
# vocab 32,000, 1,024-token sequences; PP 2 × EP 4, so stage 0 holds layers 0 (dense) and 1
# (MoE) and the embedding, stage 1 layers 2 and 3 (MoE) and the head.
H = 1024
ATTENTION = H * 8 * 128 + 2 * H * 2 * 128 + 8 * 128 * H  # Q, K, V, output projections
DENSE_FFN = 3 * H * 4096
EXPERT = 3 * H * 512
ROUTER = H * 16
VOCAB = 32_000 * H
TOKENS = 1024


def stage0_params(t: int, et: int) -> tuple[float, float, float]:
    """(GEMM weights, BF16 weights, routed-expert weights) of one stage-0 GPU, by hand."""
    gemm = (2 * ATTENTION + DENSE_FFN + EXPERT) / t  # two attentions, dense FFN, shared
    plain = ROUTER + VOCAB / t
    expert = 4 * EXPERT / et  # 16 experts / EP 4
    return gemm, plain, expert


@pytest.mark.parametrize(("t", "et"), [(1, 1), (2, 1), (2, 2)])
def test_weights_gradients_optimizer_closed_form(tiny_scenario, t, et):
    m = tiny_scenario.model
    pieces = scenario_pieces(tiny_scenario)
    assert pieces == [[0, 1], [2, 3]]
    # A stage of EP 4 GPUs per expert-tensor rank: expert_tensor × expert × data GPUs.
    deg = Degrees(tensor=t, expert_tensor=et, expert=4, data=1)
    params = gpu_params(m, pieces, [0], deg)
    gemm, plain, expert = stage0_params(t, et)
    assert params.gemm == pytest.approx(gemm)
    assert params.plain == pytest.approx(plain)
    assert params.expert == pytest.approx(expert)
    total = gemm + plain + expert
    # BF16 model: 2 bytes per weight; FP8: GEMM weights 1 byte, embedding/head/router 2.
    assert weight_bytes(params, "bf16") == pytest.approx(2 * total)
    assert weight_bytes(params, "fp8") == pytest.approx(gemm + expert + 2 * plain)
    assert gradient_bytes(params, "bf16") == pytest.approx(2 * total)
    assert gradient_bytes(params, "fp32") == pytest.approx(4 * total)
    # Adam: 12 bytes per parameter; ZeRO-1 shards the non-expert part over the attention
    # data-parallel group (et·4·1 / t GPUs) and the experts over the expert-data group (1).
    assert optimizer_bytes(params, deg, zero1=False) == pytest.approx(12 * total)
    attention_dp = et * 4 // t
    sharded = 12 * ((gemm + plain) / attention_dp + expert)
    assert optimizer_bytes(params, deg, zero1=True) == pytest.approx(sharded)
    # DualPipe's mirrored ranks hold the same parameters and shard over twice the group.
    assert optimizer_bytes(params, deg, zero1=True, replicas=2) == pytest.approx(sharded / 2)


def test_expert_data_parallel_shards_expert_state(tiny_scenario):
    m = tiny_scenario.model
    deg = Degrees(tensor=1, expert_tensor=1, expert=4, data=2)
    params = gpu_params(m, [[0, 1], [2, 3]], [1], deg)
    dense = 2 * ATTENTION + 2 * (ROUTER + EXPERT) + VOCAB  # two MoE layers + the head
    expert = 2 * 4 * EXPERT
    assert params.dense == pytest.approx(dense)
    assert params.expert == pytest.approx(expert)
    assert optimizer_bytes(params, deg, zero1=True) == pytest.approx(12 * (dense / 8 + expert / 2))


# Bytes per token kept by one layer, by hand (BF16 = 2 bytes, FP32 = 4):
# attention, none: norm in + out 2·2h, Q/K/V 2·(8·128 + 2·128 + 2·128), core output 2·8·128,
#   softmax statistics 4·8                                   = 4096 + 3072 + 2048 + 32 = 9248
# attention, selective (norm output recomputed)             = 2048 + 3072 + 2048 + 32 = 7200
# dense FFN (f = 4096), none: norms 4096 + gate, up, product 3·2·4096       = 28672
# dense FFN, selective: norm in 2048 + gate, up 2·2·4096 (product recomputed) = 18432
# MoE FFN, none: norms 4096 + router scores 4·16 + shared SwiGLU 3·2·512
#   + 2 copies × (dispatched input 2h + SwiGLU 3·2·512)  = 4096 + 64 + 3072 + 2·5120 = 17472
# MoE FFN, selective: 2048 + 64 + 2·2·512 + 2·(2048 + 2·2·512)              = 12352
PER_TOKEN = {
    ("none", False): 9248 + 28672,
    ("none", True): 9248 + 17472,
    ("selective", False): 7200 + 18432,
    ("selective", True): 7200 + 12352,
}


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("moe", [False, True])
def test_layer_activations_closed_form(tiny_scenario, recompute, moe):
    m = tiny_scenario.model
    got = layer_activation_bytes(m, moe, TOKENS, recompute, Degrees())
    if recompute == "full":
        assert got == 2 * TOKENS * H  # only the layer's input
    else:
        assert got == TOKENS * PER_TOKEN[(recompute, moe)]


def test_layer_activations_tensor_parallel(tiny_scenario):
    # Sequence parallelism divides everything by t; expert tensor parallelism gathers each
    # routed copy onto et GPUs that hold 1/et of its SwiGLU width.
    m = tiny_scenario.model
    two = Degrees(tensor=2)
    assert layer_activation_bytes(m, False, TOKENS, "none", two) == TOKENS * (9248 + 28672) / 2
    assert layer_activation_bytes(m, False, TOKENS, "full", two) == TOKENS * H
    both = Degrees(tensor=2, expert_tensor=2)
    routed = 2 * 2 * (2 * H + 3 * 2 * 256)  # top-2 × et copies of (input + SwiGLU at 512/2)
    local = 9248 + 4096 + 64 + 3072
    assert layer_activation_bytes(m, True, TOKENS, "none", both) == TOKENS * (local + routed) / 2
    selective = 7200 + 2048 + 64 + 2048 + 2 * 2 * (2 * H + 2 * 2 * 256)
    assert layer_activation_bytes(m, True, TOKENS, "selective", both) == TOKENS * selective / 2


def test_stage_memory_adds_in_flight_micro_batches(tiny_scenario):
    # 1F1B on 2 stages, 4 micro-batches: stage 0 holds 2 in flight, stage 1 one.
    deg = Degrees(expert=4)
    pieces = scenario_pieces(tiny_scenario)
    first = stage_memory(tiny_scenario, 0, pieces, deg)
    per_micro = TOKENS * (PER_TOKEN[("none", False)] + PER_TOKEN[("none", True)])
    assert first.activations == pytest.approx(2 * per_micro)
    last = stage_memory(tiny_scenario, 1, pieces, deg)
    head = TOKENS * (2 * 2 * H + 4 * 32_000)  # final norm in + out, FP32 logits
    assert last.activations == pytest.approx(2 * TOKENS * PER_TOKEN[("none", True)] + head)
    # Buffers: one 40M-element BF16 gradient bucket, dispatch + combine (BF16) send and
    # receive buffers for the top-2 copies of 1,024 tokens.
    a2a = 2 * (2 * TOKENS) * H * (2 + 2)
    assert first.buffers == pytest.approx(DP_BUCKET_ELEMENTS * 2 + a2a)
    assert first.reserved == RESERVED_BYTES
    assert first.capacity == pytest.approx(tiny_scenario.cluster.gpu.hbm_gib * units.GiB)
    worst = gpu_memory(tiny_scenario)
    assert worst.total == max(first.total, last.total)
    assert worst.total == pytest.approx(
        worst.weights
        + worst.gradients
        + worst.optimizer
        + worst.activations
        + worst.buffers
        + worst.reserved
    )


def test_full_recompute_holds_inputs_plus_one_layer(tiny_dict):
    tiny_dict["parallelism"]["recompute"] = "full"
    sc = scenario_from_dict(tiny_dict)
    first = stage_memory(sc, 0, scenario_pieces(sc), Degrees(expert=4))
    inputs = 2 * (2 * (2 * TOKENS * H))  # 2 in flight × 2 layers × their BF16 input
    working = TOKENS * PER_TOKEN[("none", False)]  # the larger layer, rematerialised
    assert first.activations == pytest.approx(inputs + working)


def _unfit(raw: dict) -> dict:
    """The tiny scenario with sequences long enough that activations overflow an H100."""
    raw["model"]["seq_len"] = 524_288
    raw["gate"]["routed_tokens_per_sequence"] = 64
    return raw


def test_layout_that_does_not_fit_is_refused(tmp_path, capsys, tiny_dict):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_unfit(tiny_dict)))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    # The last stage, with the head's FP32 logits, is the worst.
    assert err.startswith(
        "error: parallelism: the estimated peak memory per GPU (pipeline stage 1)"
    )
    assert "activations" in err
    assert "but one H100-SXM has 74.5 GiB" in err
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    assert "estimated peak memory per GPU" in capsys.readouterr().err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s.yaml"]


def test_validate_prints_the_memory_estimate(capsys):
    assert main(["validate", str(ROOT / "scenarios" / "quickstart.yaml")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("peak memory per GPU"))
    assert "(worst: pipeline stage 0)" in line
    assert "GiB of 74.5 GiB (H100-SXM)" in line
    for name in ("weights", "gradients", "optimizer", "activations", "buffers", "reserved"):
        assert name in line


def test_context_parallelism_splits_activations_not_weights(tiny_dict, tiny_scenario):
    # Ring attention splits each sequence over the context group: a GPU keeps half the tokens'
    # activations (and half the dispatched copies), but every weight and its Adam shard.
    tiny_dict["parallelism"]["context"] = 2
    cp = scenario_from_dict(tiny_dict)
    deg = Degrees(expert=4)
    one = stage_memory(tiny_scenario, 0, scenario_pieces(tiny_scenario), deg)
    two = stage_memory(cp, 0, scenario_pieces(cp), deg)
    assert two.activations == pytest.approx(one.activations / 2)
    assert (two.weights, two.gradients, two.optimizer) == (
        one.weights,
        one.gradients,
        one.optimizer,
    )
