"""Parameter counts, FLOPs and bytes of one transformer layer, per token, from the architecture.

These are model facts, independent of the cluster: the compute cost model turns them into
seconds and the estimate turns them into MFU. Conventions: a multiply-add is 2 FLOP; FFNs are
SwiGLU (three d×f matrices); the backward pass of a GEMM costs twice its forward (input and
weight gradients); causal attention does half of the full score matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.scenario.schema import Attention, Model


@dataclass(frozen=True)
class AttentionCosts:
    """Per-token costs of one attention block."""

    params: int
    """Projection weights (Q, K, V, output; MLA: down and up projections)."""
    projection_flops: float
    """Forward FLOP per token of the projections (2 × params)."""
    core_flops: float
    """Forward FLOP per token of QKᵀ and PV under a causal mask."""


def attention_costs(att: Attention, hidden: int, seq_len: int) -> AttentionCosts:
    """Parameters and forward FLOP per token of an attention block (MHA, GQA or MLA)."""
    h, hd = att.heads, att.head_dim
    v_hd = att.v_head_dim or hd
    if att.kind == "mla":
        qk_hd = hd + att.rope_head_dim
        kv_rank = att.kv_lora_rank or 0
        if att.q_lora_rank:
            q_params = hidden * att.q_lora_rank + att.q_lora_rank * h * qk_hd
        else:
            q_params = hidden * h * qk_hd
        kv_params = hidden * (kv_rank + att.rope_head_dim) + kv_rank * h * (hd + v_hd)
        params = q_params + kv_params + h * v_hd * hidden
    else:
        qk_hd = hd
        kv_heads = (att.kv_heads or h) if att.kind == "gqa" else h
        params = hidden * h * hd + 2 * hidden * kv_heads * hd + h * v_hd * hidden
    # Causal: each token attends on average to half the sequence.
    core = 2.0 * seq_len * h * (qk_hd + v_hd) / 2.0
    return AttentionCosts(params=params, projection_flops=2.0 * params, core_flops=core)


def swiglu_params(hidden: int, ffn: int) -> int:
    """Weights of one SwiGLU FFN (gate, up and down projections)."""
    return 3 * hidden * ffn


@dataclass(frozen=True)
class ModelCosts:
    """Per-token forward FLOP and parameter counts of the whole model."""

    attention: AttentionCosts
    dense_ffn_params: int
    expert_params: int
    """Weights of one routed (or shared) expert."""
    router_params: int
    embedding_params: int
    head_params: int
    hidden: int

    def moe_layer_forward_flops(self, top_k: int, shared: int) -> float:
        """Forward FLOP per token of one MoE layer (attention + router + activated experts)."""
        a = self.attention
        return (
            a.projection_flops
            + a.core_flops
            + 2.0 * self.router_params
            + 2.0 * self.expert_params * (top_k + shared)
        )

    def mtp_params(self, top_k: int, shared: int) -> int:
        """Weights of one multi-token-prediction module as simulated: the 2·hidden → hidden
        projection and a transformer block at its activated width (the output head is shared
        with the main model)."""
        return (
            2 * self.hidden * self.hidden
            + self.attention.params
            + self.expert_params * (top_k + shared)
        )

    def mtp_forward_flops(self, top_k: int, shared: int) -> float:
        """Forward FLOP per token of one MTP module, including its pass through the head."""
        return (
            2.0 * self.mtp_params(top_k, shared)
            + self.attention.core_flops
            + 2.0 * self.head_params
        )

    def dense_layer_forward_flops(self) -> float:
        a = self.attention
        return a.projection_flops + a.core_flops + 2.0 * self.dense_ffn_params


def model_costs(model: Model) -> ModelCosts:
    """Per-token costs of ``model`` (a dense model has no expert or router weights)."""
    moe = model.moe
    return ModelCosts(
        attention=attention_costs(model.attention, model.hidden, model.seq_len),
        dense_ffn_params=swiglu_params(model.hidden, model.dense_ffn or 0),
        expert_params=0 if moe is None else swiglu_params(model.hidden, moe.expert_ffn),
        router_params=0 if moe is None else model.hidden * moe.routed_experts,
        embedding_params=model.vocab * model.hidden,
        head_params=model.vocab * model.hidden,
        hidden=model.hidden,
    )


def model_flops_per_token(model: Model) -> float:
    """Model FLOP per trained token, forward + backward (3 × forward), no recomputation.

    This is the numerator of MFU: the work the model needs, not the work the schedule does.
    """
    c = model_costs(model)
    forward = model.ffn_dense_layers * c.dense_layer_forward_flops() + 2.0 * c.head_params
    if model.moe is not None:
        top_k, shared = model.moe.top_k, model.moe.shared_experts
        forward += model.moe_layers * c.moe_layer_forward_flops(top_k, shared)
        forward += model.mtp_depth * c.mtp_forward_flops(top_k, shared)
    return 3.0 * forward


def total_params(model: Model) -> int:
    """All parameters (every routed expert counted)."""
    c = model_costs(model)
    moe = model.moe
    per_moe = (
        0
        if moe is None
        else c.attention.params
        + c.router_params
        + c.expert_params * (moe.routed_experts + moe.shared_experts)
    )
    per_dense = c.attention.params + c.dense_ffn_params
    return (
        model.ffn_dense_layers * per_dense
        + model.moe_layers * per_moe
        + c.embedding_params
        + c.head_params
    )
