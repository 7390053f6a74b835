"""Per-GPU memory of a training layout, by component, in bytes.

Static arithmetic on the scenario (no simulation): the parameters a GPU holds (its pipeline
stage's pieces, sharded by tensor and expert parallelism), their gradients and Adam state
(sharded by ZeRO-1), the activations its schedule keeps in flight, communication buffers and a
fixed allowance for the CUDA context. The worst GPU of the layout is compared with the GPU's
HBM. Every formula and its source is in ``docs/model/memory.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moesim import units
from moesim.cluster.model_costs import attention_costs, swiglu_params
from moesim.scenario.pipeline import in_flight_at_peak, piece_layers, pieces_on_rank
from moesim.scenario.schema import Model, Parallelism, Scenario

ADAM_BYTES_PER_PARAM = 12
"""FP32 master weight plus Adam's two FP32 moments (ZeRO, arXiv 1910.02054 §3.1: K = 12)."""
DP_BUCKET_ELEMENTS = 40_000_000
"""Gradient elements in one data-parallel bucket: Megatron-Core's DistributedDataParallel
default, ``bucket_size = max(40_000_000, 1_000_000 × data-parallel size)``
(NVIDIA/Megatron-LM ``megatron/core/distributed/distributed_data_parallel.py``)."""
DP_BUCKET_ELEMENTS_PER_RANK = 1_000_000
RESERVED_BYTES = 1 * units.GiB
"""Allowance outside the framework's tensors: the CUDA context and loaded kernels, cuBLAS
workspaces and NCCL's communicator buffers (``NCCL_BUFFSIZE``, 4 MiB per channel and peer by
default, NCCL environment-variable documentation). An allowance, not a measurement."""

COMPONENTS = ("weights", "gradients", "optimizer", "activations", "buffers", "reserved")


@dataclass(frozen=True)
class Degrees:
    """The parallel degrees that shard a GPU's memory.

    ``tensor`` shards attention, dense FFNs, shared experts, embedding and head (Megatron
    tensor parallelism with sequence parallelism); ``expert_tensor`` shards each routed
    expert; ``expert`` spreads the routed experts; ``data`` is the expert-data-parallel degree
    (replicas of each routed expert). A stage has ``expert_tensor × expert × data`` GPUs, so
    attention is data-parallel over ``expert_tensor × expert × data / tensor`` of them.
    """

    tensor: int = 1
    expert_tensor: int = 1
    expert: int = 1
    data: int = 1

    @property
    def stage_gpus(self) -> int:
        return self.expert_tensor * self.expert * self.data

    @property
    def attention_data(self) -> int:
        """Data-parallel degree of the non-expert parameters (with context parallelism, the
        data × context group over which Megatron-Core's optimizer shards them)."""
        return max(1, self.stage_gpus // self.tensor)

    @staticmethod
    def of(p: Parallelism) -> Degrees:
        return Degrees(p.tensor, p.expert_tensor, p.expert, p.data)


@dataclass(frozen=True)
class GpuParams:
    """Parameters one GPU holds, in elements, by how they are stored and sharded."""

    gemm: float
    """Non-expert GEMM weights (attention projections, dense FFNs, shared experts, MTP), after
    tensor sharding."""
    plain: float
    """Embedding, output head (after tensor sharding) and routers: kept in BF16."""
    expert: float
    """Routed-expert weights, after expert and expert-tensor sharding."""
    expert_owned: float
    """The routed-expert weights among ``expert`` that this GPU's optimizer updates (EPLB's
    redundant replicas have weights and gradients but no optimizer state of their own)."""

    @property
    def dense(self) -> float:
        return self.gemm + self.plain

    @property
    def total(self) -> float:
        return self.gemm + self.plain + self.expert


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of the worst GPU, by component (bytes), and the GPU's capacity."""

    stage: int
    """Pipeline stage of the worst GPU."""
    weights: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    reserved: float
    capacity: float
    gpu: str

    @property
    def total(self) -> float:
        return sum(getattr(self, name) for name in COMPONENTS)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def gib(self) -> dict[str, float]:
        """Components, total and capacity in GiB (the ``memory_*_gib`` summary keys)."""
        out = {f"memory_{name}_gib": getattr(self, name) / units.GiB for name in COMPONENTS}
        out["memory_total_gib"] = self.total / units.GiB
        out["memory_capacity_gib"] = self.capacity / units.GiB
        return out

    def describe(self) -> str:
        """One line: total and components in GiB."""
        parts = ", ".join(f"{name} {getattr(self, name) / units.GiB:.1f}" for name in COMPONENTS)
        return f"{self.total / units.GiB:.1f} GiB ({parts})"


# --------------------------------------------------------------------------- parameters


def is_moe_layer(model: Model, layer: int) -> bool:
    """Whether ``layer`` has routed experts (a dense model has none)."""
    return model.moe is not None and layer >= model.dense_layers


def gpu_params(
    model: Model,
    pieces: Sequence[Sequence[int]],
    held: Sequence[int],
    degrees: Degrees,
    redundant_slots: int = 0,
) -> GpuParams:
    """Parameters of one GPU holding pieces ``held`` (a piece held twice, as DualPipe's two
    model copies may be, counts twice) of the path cut into ``pieces`` (layer indices)."""
    t = degrees.tensor
    attention = attention_costs(model.attention, model.hidden, model.seq_len).params
    moe = model.moe
    expert_size = swiglu_params(model.hidden, moe.expert_ffn) if moe is not None else 0
    own_experts = moe.routed_experts / degrees.expert if moe is not None else 0.0
    gemm = plain = expert = owned = 0.0
    last = len(pieces) - 1
    for piece in held:
        for layer in pieces[piece]:
            gemm += attention / t
            if is_moe_layer(model, layer):
                assert moe is not None
                plain += model.hidden * moe.routed_experts  # the router, replicated
                gemm += expert_size * moe.shared_experts / t
                slots = own_experts + redundant_slots
                expert += expert_size * slots / degrees.expert_tensor
                owned += expert_size * own_experts / degrees.expert_tensor
            else:
                gemm += swiglu_params(model.hidden, model.dense_ffn or 0) / t
        if piece == 0:
            plain += model.vocab * model.hidden / t
        if piece == last:
            plain += model.vocab * model.hidden / t
            if model.mtp_depth:
                # Each MTP module: the 2h → h projection and one transformer block; its
                # routed experts are spread like a main layer's.
                active = 2 * model.hidden * model.hidden + attention
                gemm += model.mtp_depth * active / t
                if moe is not None:
                    gemm += model.mtp_depth * expert_size * moe.shared_experts / t
                    plain += model.mtp_depth * model.hidden * moe.routed_experts
                    per = expert_size * own_experts / degrees.expert_tensor
                    expert += model.mtp_depth * per
                    owned += model.mtp_depth * per
                else:
                    gemm += model.mtp_depth * swiglu_params(model.hidden, model.dense_ffn or 0) / t
    return GpuParams(gemm=gemm, plain=plain, expert=expert, expert_owned=owned)


def weight_bytes(params: GpuParams, gemm_precision: str) -> float:
    """GEMM weights in the model's GEMM precision (FP8 weights as with Megatron-Core's
    ``--fp8-param-gather``), embedding, head and routers in BF16 (DeepSeek-V3 keeps them in
    higher precision, arXiv 2412.19437 §3.3)."""
    gemm_bytes = units.BYTES_PER_ELEMENT[gemm_precision]
    return (params.gemm + params.expert) * gemm_bytes + params.plain * units.BYTES_PER_ELEMENT[
        "bf16"
    ]


def gradient_bytes(params: GpuParams, grad_dtype: str) -> float:
    """One gradient per parameter held, in ``grad_dtype`` (FP32 main gradients, Megatron-style,
    or BF16); ZeRO-1 does not shard gradients."""
    return params.total * units.BYTES_PER_ELEMENT[grad_dtype]


def optimizer_bytes(params: GpuParams, degrees: Degrees, zero1: bool, replicas: int = 1) -> float:
    """Adam state, 12 bytes per parameter the GPU updates; with ZeRO-1 the non-expert state is
    sharded over the attention data-parallel group and the expert state over the
    expert-data-parallel group, each ``replicas`` times larger when that many pipeline ranks
    hold the same parameters (DualPipe's mirrored ranks synchronise together)."""
    dense, expert = params.dense, params.expert_owned
    if zero1:
        dense /= degrees.attention_data * replicas
        expert /= degrees.data * replicas
    return (dense + expert) * ADAM_BYTES_PER_PARAM


# --------------------------------------------------------------------------- activations


def _cached_bytes(model: Model) -> int:
    """Bytes per element of the GEMM inputs a layer keeps for its backward: FP8 under FP8
    GEMMs (DeepSeek-V3 caches the inputs of the linear after attention, of the experts and of
    SwiGLU in FP8, arXiv 2412.19437 §3.3.2), BF16 otherwise."""
    return units.BYTES_PER_ELEMENT[model.gemm_precision]


def attention_bytes(model: Model, recompute: str) -> float:
    """Bytes per token an attention block keeps for its backward (before tensor sharding):
    the norm's input and output, Q, K, V, the core output (the output projection's input,
    cached in the GEMM precision) and the flash-attention softmax statistics (FP32).
    ``selective`` recomputes the norm output and MLA's up-projections (DeepSeek-V3, arXiv
    2412.19437 §3.2.3)."""
    att, h = model.attention, model.hidden
    a, dh = att.heads, att.head_dim
    dv = att.v_head_dim or dh
    bf16 = units.BYTES_PER_ELEMENT["bf16"]
    selective = recompute == "selective"
    kept = h + (0 if selective else h)
    if att.kind == "mla":
        dqk = dh + att.rope_head_dim
        kv_rank = att.kv_lora_rank or 0
        kept += kv_rank + att.rope_head_dim  # the KV latent and the shared RoPE key
        kept += 0 if selective else kv_rank  # its norm output
        if att.q_lora_rank:
            kept += att.q_lora_rank + (0 if selective else att.q_lora_rank)
            kept += 0 if selective else a * dqk  # Q from its up-projection
        else:
            kept += a * dqk
        kept += 0 if selective else a * (dqk + dv)  # K and V from the KV up-projection
    else:
        kv = (att.kv_heads or a) if att.kind == "gqa" else a
        kept += a * dh + kv * dh + kv * dv
    softmax_stats = units.BYTES_PER_ELEMENT["fp32"] * a
    return float(bf16 * kept + _cached_bytes(model) * a * dv + softmax_stats)


def ffn_bytes(model: Model, moe_layer: bool, recompute: str, degrees: Degrees) -> float:
    """Bytes per token (of this GPU's sequence shard, after tensor sharding) an FFN block
    keeps: the norm's input and output (BF16); SwiGLU's input — the gate and up outputs, in
    the GEMM precision — and its product (``selective`` recomputes the norm output and the
    product, DeepSeek-V3 §3.2.3, §3.3.2); for an MoE block also the router scores (FP32) and,
    per routed copy of a token, the dispatched input (GEMM precision) and the expert's SwiGLU
    tensors. The gate value multiplies the SwiGLU output (Megatron-Core's fused
    ``weighted_bias_swiglu_impl`` in ``megatron/core/transformer/moe/experts.py``), so its
    gradient needs no stored expert output. Routing is taken as balanced: a GPU receives as
    many copies as its tokens send."""
    h, t = model.hidden, degrees.tensor
    bf16, cached = units.BYTES_PER_ELEMENT["bf16"], _cached_bytes(model)
    selective = recompute == "selective"

    def swiglu(ffn: float) -> float:
        return 2 * ffn * cached + (0 if selective else ffn * bf16)

    norms = bf16 * (h + (0 if selective else h))
    if not moe_layer:
        return (norms + swiglu(model.dense_ffn or 0)) / t
    moe = model.moe
    assert moe is not None
    scores = units.BYTES_PER_ELEMENT["fp32"] * moe.routed_experts
    local = norms + scores + moe.shared_experts * swiglu(moe.expert_ffn)
    et = degrees.expert_tensor
    # Expert tensor parallelism gathers each copy onto all ``et`` GPUs of the expert, which
    # each hold 1/et of its intermediate width.
    routed = moe.top_k * et * (h * cached + swiglu(moe.expert_ffn / et))
    return (local + routed) / t


def layer_activation_bytes(
    model: Model, moe_layer: bool, tokens: int, recompute: str, degrees: Degrees
) -> float:
    """Bytes one layer keeps per micro-batch of ``tokens`` tokens on one GPU until its
    backward. ``none`` and ``selective``: the attention and FFN tensors above (Korthikanti et
    al., arXiv 2205.05198, adapted: flash attention stores no score matrix, no dropout,
    SwiGLU, GQA/MLA, MoE); ``full``: only the layer's input (BF16), the rest recomputed in
    the backward."""
    t = degrees.tensor
    if recompute == "full":
        return float(units.BYTES_PER_ELEMENT["bf16"] * tokens * model.hidden / t)
    per_token = attention_bytes(model, recompute) / t
    per_token += ffn_bytes(model, moe_layer, recompute, degrees)
    return tokens * per_token


def head_activation_bytes(model: Model, tokens: int, degrees: Degrees, recompute: str) -> float:
    """Bytes the last piece keeps per micro-batch beyond its layers: the final norm's input
    and output and the FP32 logits of the cross-entropy (2205.05198 §4: ``4sbv/t``), and for
    each MTP module its two normed inputs, one MoE (or dense) layer and its own logits."""
    h, t = model.hidden, degrees.tensor
    bf16, fp32 = units.BYTES_PER_ELEMENT["bf16"], units.BYTES_PER_ELEMENT["fp32"]
    head = tokens * (bf16 * 2 * h + fp32 * model.vocab) / t
    mtp = tokens * bf16 * 2 * h / t + head
    mtp += layer_activation_bytes(model, model.moe is not None, tokens, recompute, degrees)
    return head + model.mtp_depth * mtp


def piece_activation_bytes(
    model: Model,
    pieces: Sequence[Sequence[int]],
    piece: int,
    tokens: int,
    recompute: str,
    degrees: Degrees,
) -> float:
    """Bytes one piece keeps per micro-batch in flight on one GPU."""
    total = sum(
        layer_activation_bytes(model, is_moe_layer(model, layer), tokens, recompute, degrees)
        for layer in pieces[piece]
    )
    if piece == len(pieces) - 1:
        total += head_activation_bytes(model, tokens, degrees, recompute)
    return total


# --------------------------------------------------------------------------- one GPU


def stage_memory(
    scenario: Scenario,
    rank: int,
    pieces: Sequence[Sequence[int]],
    degrees: Degrees,
) -> MemoryEstimate:
    """Peak memory of one GPU of pipeline stage ``rank`` (every GPU of a stage holds the same
    under balanced routing)."""
    m, p = scenario.model, scenario.parallelism
    held = [piece for _, piece in pieces_on_rank(p.schedule, p.pipeline, p.virtual_stages, rank)]
    replicas = 2 if p.schedule == "dualpipe" else 1
    redundant = scenario.eplb.redundant_per_rank if scenario.eplb.enabled else 0
    params = gpu_params(m, pieces, held, degrees, redundant)
    # Context parallelism splits each sequence over ``context`` GPUs: a GPU keeps the
    # activations of its share of the tokens (arXiv 2205.05198's formulas per token still hold).
    tokens = p.micro_batch_size * m.seq_len // p.context

    at_peak = in_flight_at_peak(
        p.schedule, p.pipeline, scenario.micro_batches, p.virtual_stages, rank
    )
    activations = sum(
        count * piece_activation_bytes(m, pieces, piece, tokens, p.recompute, degrees)
        for piece, count in at_peak.items()
    )
    held_layers = [layer for q in held for layer in pieces[q]]
    if p.recompute == "full" and held_layers:
        # The backward rematerialises one layer at a time: the largest one's full tensors.
        activations += max(
            layer_activation_bytes(m, is_moe_layer(m, layer), tokens, "none", degrees)
            for layer in held_layers
        )

    buffers = dp_bucket_bytes(p.grad_dtype, degrees)
    if any(is_moe_layer(m, layer) for layer in held_layers):
        chunks = 2 if p.schedule == "dualpipe" else 1  # DualPipe overlaps two chunks' exchanges
        buffers += chunks * alltoall_buffer_bytes(m, tokens, degrees)
    return MemoryEstimate(
        stage=rank,
        weights=weight_bytes(params, m.gemm_precision),
        gradients=gradient_bytes(params, p.grad_dtype),
        optimizer=optimizer_bytes(params, degrees, p.zero1, replicas),
        activations=activations,
        buffers=buffers,
        reserved=RESERVED_BYTES,
        capacity=scenario.cluster.gpu.hbm_gib * units.GiB,
        gpu=scenario.cluster.gpu.name,
    )


def alltoall_buffer_bytes(model: Model, tokens: int, degrees: Degrees) -> float:
    """Send and receive buffers of one MoE layer's dispatch (in the GEMM precision: FP8 when
    the GEMMs are FP8, as DeepSeek-V3 dispatches) and combine (BF16) on one GPU, for the
    ``top_k`` copies of its tokens under balanced routing."""
    moe = model.moe
    if moe is None:
        return 0.0
    copies = moe.top_k * tokens * degrees.expert_tensor / degrees.tensor
    per_copy = model.hidden * (
        units.BYTES_PER_ELEMENT[model.gemm_precision] + units.BYTES_PER_ELEMENT["bf16"]
    )
    return 2.0 * copies * per_copy


def dp_bucket_bytes(grad_dtype: str, degrees: Degrees) -> float:
    """One data-parallel gradient bucket in flight (Megatron-Core's bucket size)."""
    elements = max(DP_BUCKET_ELEMENTS, DP_BUCKET_ELEMENTS_PER_RANK * degrees.attention_data)
    return float(elements * units.BYTES_PER_ELEMENT[grad_dtype])


def scenario_pieces(scenario: Scenario) -> list[list[int]]:
    """The layers of each piece under the scenario's split rule (``layer_split: even``)."""
    m, p = scenario.model, scenario.parallelism
    return piece_layers(m.layers, p.pipeline, p.virtual_stages, p.piece_split)


def gpu_memory(
    scenario: Scenario,
    pieces: Sequence[Sequence[int]] | None = None,
    degrees: Degrees | None = None,
) -> MemoryEstimate:
    """The worst GPU's peak memory over the pipeline stages.

    Parameters
    ----------
    scenario : Scenario
    pieces : list of list of int, optional
        The layers of each piece (default: the split rule; pass the engine's pieces under
        ``layer_split: balanced``).
    degrees : Degrees, optional
        Parallel degrees (default: the scenario's).
    """
    pieces = scenario_pieces(scenario) if pieces is None else pieces
    degrees = Degrees.of(scenario.parallelism) if degrees is None else degrees
    stages = [
        stage_memory(scenario, rank, pieces, degrees)
        for rank in range(scenario.parallelism.pipeline)
    ]
    return max(stages, key=lambda e: (e.total, -e.stage))
