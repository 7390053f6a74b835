"""The scenario schema: pydantic v2 models, frozen, unknown keys rejected.

A scenario describes one planned training run and the balancing strategies to compare on it.
User-facing fields carry unit suffixes (``latency_us``, ``bandwidth_gbytes_per_s``); each section
exposes the SI values the simulator uses as properties (``latency_s``, ``bandwidth_bytes_per_s``),
computed through :mod:`moesim.units` so the conversion lives in one place.

Layout of ranks (used throughout moesim): the cluster has ``nodes × gpus_per_node`` GPUs, global
rank ``r = node * gpus_per_node + local``. Parallel degrees multiply to the GPU count:
``pipeline × expert × data``. Rank ``r`` belongs to pipeline stage ``r // (expert*data)``; inside a
stage, expert-parallel rank ``r % expert`` of expert-parallel group ``(r // expert) % data``.
Each expert-parallel group holds one copy of every routed expert (so ``data`` is the
expert-data-parallel degree). Attention and dense layers fold onto the same GPUs (MoE parallel
folding, arXiv 2504.14960): tensor-parallel rank ``r % tensor``, context-parallel rank
``(r // tensor) % context``, so a stage's ``expert × data`` GPUs are ``tensor × context ×``
attention-data-parallel replicas. A dense model (no ``model.moe``) has ``expert = 1``.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from moesim import units
from moesim.scenario.base import Efficiency, Frozen, NonNegInt, PositiveFloat, PositiveInt
from moesim.scenario.faults import Faults, check_faults
from moesim.scenario.pipeline import (
    PieceSplit,
    PipelineRuleError,
    check_micro_batches,
    check_pieces,
    check_pipeline,
    micro_batch_rule,
)
from moesim.scenario.routing import Gate, Router, Stream
from moesim.scenario.strategies import Strategy, check_strategies

SAFE_NAME_PATTERN = r"^\w[\w.+-]{0,99}$"
"""Scenario and strategy names: they become directory names and plot labels, so no path
separators, no '..' prefix, no control, shell or TeX special characters."""
SAFE_DIR_PATTERN = r"^[^/\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
"""``output.dir``: relative, no control characters (and no '..' component, checked below)."""


def _no_parent_dir(value: str) -> str:
    if ".." in value.replace("\\", "/").split("/"):
        raise ValueError("must not climb out with '..'")
    return value


MAX_GPUS = 1 << 20
"""Largest cluster simulated (about 1M GPUs, 10× the largest announced training cluster)."""
MAX_STEPS = 10**10
"""Most optimizer steps in a run (the step index stays exact in float64 and int64)."""
MAX_SCHEDULE_SLOTS = 1 << 20
"""Most (micro-batch × stage × virtual stage) slots in one step's pipeline schedule."""
MAX_RAMP_STEPS = 10**6
"""Most steps a batch ramp may take (its per-step batches are listed one by one)."""

# --------------------------------------------------------------------------- model


class Attention(Frozen):
    """Attention block. ``mha``/``gqa``: standard multi-head or grouped-query attention.
    ``mla``: DeepSeek multi-head latent attention (low-rank Q and KV projections)."""

    kind: Literal["mha", "gqa", "mla"] = "gqa"
    heads: PositiveInt = Field(le=4096)
    head_dim: PositiveInt = Field(128, le=4096)
    kv_heads: PositiveInt | None = Field(None, description="GQA key/value heads (default: heads)")
    q_lora_rank: PositiveInt | None = Field(None, description="MLA query compression rank")
    kv_lora_rank: PositiveInt | None = Field(None, description="MLA KV compression rank")
    rope_head_dim: NonNegInt = Field(0, description="MLA decoupled RoPE dimension")
    v_head_dim: PositiveInt | None = Field(None, description="value head dim (default: head_dim)")

    @model_validator(mode="after")
    def _check(self) -> Attention:
        if self.kind == "mla" and (self.kv_lora_rank is None):
            raise ValueError("kv_lora_rank: required for attention kind 'mla'")
        if self.kind == "gqa" and self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"kv_heads: {self.kv_heads} does not divide heads {self.heads}")
        return self


class Moe(Frozen):
    """Routed and shared experts of every MoE layer."""

    routed_experts: PositiveInt = Field(le=16384, description="at most 16,384 (DeepSeek-V3: 256)")
    shared_experts: NonNegInt = Field(0, le=64)
    top_k: PositiveInt = Field(le=256, description="routed experts per token")
    expert_ffn: PositiveInt = Field(
        le=1_048_576, description="intermediate size of one expert (SwiGLU)"
    )

    @model_validator(mode="after")
    def _check(self) -> Moe:
        if self.top_k > self.routed_experts:
            raise ValueError(
                f"top_k: {self.top_k} is larger than routed_experts ({self.routed_experts})"
            )
        return self


class Model(Frozen):
    """Transformer architecture. FFNs are SwiGLU (three matrices)."""

    layers: PositiveInt = Field(le=1024, description="transformer layers (at most 1,024)")
    dense_layers: NonNegInt = Field(0, description="leading layers with a dense FFN")
    hidden: PositiveInt = Field(le=1_048_576)
    attention: Attention
    vocab: PositiveInt = Field(le=16_777_216)
    seq_len: PositiveInt = Field(
        ge=16,
        le=16_777_216,
        description="tokens per sequence (16 to 16M: a sequence shorter "
        "than a gate sample of tokens is not a training sequence)",
    )
    dense_ffn: PositiveInt | None = Field(
        None, le=4_194_304, description="intermediate size of dense FFNs"
    )
    moe: Moe | None = Field(
        None, description="routed experts; without it every layer has a dense FFN of dense_ffn"
    )
    gemm_precision: Literal["bf16", "fp8"] = "bf16"
    mtp_depth: NonNegInt = Field(
        0, le=16, description="multi-token-prediction modules (DeepSeek-V3: 1) on the last stage"
    )

    @model_validator(mode="after")
    def _check(self) -> Model:
        if self.moe is None:
            if self.dense_ffn is None:
                raise ValueError("dense_ffn: required for a dense model (no model.moe)")
            if self.dense_layers not in (0, self.layers):
                raise ValueError(
                    f"dense_layers: a dense model (no model.moe) has every layer dense; "
                    f"leave it out or set it to layers ({self.layers})"
                )
            if self.mtp_depth:
                raise ValueError("mtp_depth: multi-token prediction is priced for MoE models only")
            return self
        if self.dense_layers >= self.layers:
            raise ValueError(
                f"dense_layers: {self.dense_layers} leaves no MoE layer of {self.layers}"
            )
        if self.dense_layers > 0 and self.dense_ffn is None:
            raise ValueError("dense_ffn: required when dense_layers > 0")
        return self

    @property
    def is_dense(self) -> bool:
        return self.moe is None

    @property
    def ffn_dense_layers(self) -> int:
        """Leading layers with a dense FFN (all of them in a dense model)."""
        return self.layers if self.moe is None else self.dense_layers

    @property
    def moe_layers(self) -> int:
        return self.layers - self.ffn_dense_layers

    @property
    def moe_spec(self) -> Moe:
        """The MoE section, for code paths that only run on MoE models."""
        if self.moe is None:
            raise ValueError("model.moe: this is a dense model")
        return self.moe


# --------------------------------------------------------------------------- cluster


class Gpu(Frozen):
    """One GPU model. Peaks are dense tensor-core throughput (vendor spec); the efficiency
    fields come from kernel micro-benchmarks (see presets).

    A GEMM of ``F`` FLOP on ``s`` of the GPU's ``S`` SMs costs ``(F + F_half) / R(s)`` with
    ``R(s) = min(eff · s / S, ceiling) × peak``: a fixed tile/wave overhead plus the streaming
    rate, which grows with the SMs the GEMM gets until the chip's power and clock limit
    (``ceiling``, a fraction of the full-chip peak) binds.
    """

    name: str = Field(max_length=64, pattern=r"^[^\x00-\x1f\x7f]*$")
    bf16_tflops: PositiveFloat = Field(ge=1, le=100_000, description="1 TFLOP/s to 100 PFLOP/s")
    fp8_tflops: PositiveFloat | None = Field(None, ge=1, le=100_000)
    hbm_gib: PositiveFloat = Field(ge=1, le=65_536)
    hbm_tbytes_per_s: PositiveFloat = Field(ge=0.1, le=1_000)
    nvlink_gbytes_per_s: PositiveFloat = Field(
        ge=1, le=1e12, description="aggregate of both directions (at most 1e12: idealised)"
    )
    sms: PositiveInt = Field(le=100_000)
    bf16_gemm_efficiency: Efficiency = Field(
        description="large BF16 GEMM throughput per SM, as a fraction of the peak pro-rated to "
        "the SMs it runs on"
    )
    fp8_gemm_efficiency: Efficiency = Field(
        description="large FP8 GEMM (1×128 / 128×128 block scaling) throughput per SM, as a "
        "fraction of the peak pro-rated to the SMs it runs on"
    )
    bf16_gemm_ceiling: Efficiency = Field(
        description="most of the full-chip BF16 peak a GEMM reaches (power and clock limit)"
    )
    fp8_gemm_ceiling: Efficiency = Field(
        description="most of the full-chip FP8 peak a GEMM reaches (power and clock limit)"
    )
    bf16_gemm_half_gflop: PositiveFloat = Field(
        le=10_000, description="fixed cost of a BF16 GEMM launch, in GFLOP at the streaming rate"
    )
    fp8_gemm_half_gflop: PositiveFloat = Field(
        le=10_000, description="fixed cost of an FP8 GEMM launch, in GFLOP at the streaming rate"
    )
    attention_fwd_efficiency: Efficiency = Field(
        description="causal flash-attention forward at head dim 128, fraction of BF16 peak"
    )
    attention_bwd_efficiency: Efficiency = Field(
        description="causal flash-attention backward at head dim 128, fraction of BF16 peak"
    )
    memory_efficiency: Efficiency = Field(
        description="achievable fraction of HBM bandwidth (a device-to-device copy)"
    )
    kernel_launch_us: Annotated[float, Field(ge=0, le=1_000_000)] = Field(
        description="GPU-side cost of each kernel launch (back-to-back kernels in a graph; "
        "at most 1 s)"
    )

    @property
    def hbm_bytes_per_s(self) -> float:
        return units.tbytes_per_s(self.hbm_tbytes_per_s)

    def peak_flops(self, precision: str) -> float:
        """Dense tensor-core peak in FLOP/s for ``bf16`` or ``fp8``."""
        if precision == "fp8":
            if self.fp8_tflops is None:
                raise ValueError(f"{self.name} has no FP8 tensor cores")
            return units.tflops(self.fp8_tflops)
        return units.tflops(self.bf16_tflops)


class Link(Frozen):
    """A point-to-point link class: bandwidth per direction, latency, and the achievable fraction
    of nominal bandwidth (from collective micro-benchmarks)."""

    latency_us: Annotated[float, Field(ge=0, le=1_000_000)] = Field(
        description="one-way latency in µs (at most 1 s)"
    )
    efficiency: Efficiency = 1.0


class NvLink(Link):
    bandwidth_gbytes_per_s: PositiveFloat | None = Field(
        None,
        ge=0.1,
        le=1e12,
        description="per GPU per direction (default: half the GPU's NVLink aggregate)",
    )


class Nic(Link):
    bandwidth_gbits_per_s: PositiveFloat = Field(
        ge=1,
        le=1e12,
        description="per NIC per direction, in Gb/s (at least 1; at most 1e12, an idealised "
        "free link for what-if studies)",
    )

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return units.gbits_per_s(self.bandwidth_gbits_per_s) * self.efficiency


class Network(Frozen):
    """How the NICs are wired (see :mod:`moesim.cluster.topology`).

    ``fat_tree``: a two-layer fat-tree, NIC ``g`` under leaf ``g // leaf_nics``.
    ``rail_optimized``: NIC ``i`` of every node on rail ``i``'s leaves; traffic between rails
    crosses the spine. ``multi_plane``: one independent fat-tree per in-node index (DeepSeek's
    cluster, arXiv 2505.09343); traffic to another plane is first forwarded over NVLink to the
    GPU of the destination's in-node index.
    """

    topology: Literal["fat_tree", "rail_optimized", "multi_plane"] = "fat_tree"
    leaf_nics: PositiveInt = Field(
        32,
        le=1_000_000,
        description="NICs under one leaf switch (half the ports of a 64-port switch)",
    )
    oversubscription: Annotated[float, Field(ge=1, le=1024)] = Field(
        1.0, description="leaf downlink to uplink bandwidth ratio (1 = full bisection)"
    )
    cross_leaf_latency_us: Annotated[float, Field(ge=0, le=1_000_000)] | None = Field(
        None, description="IB latency between leaves (default: nic.latency_us)"
    )
    nvlink_domain_gpus: PositiveInt | None = Field(
        None, description="GPUs that share one NVLink domain (default: gpus_per_node; NVL72: 72)"
    )


class Cluster(Frozen):
    gpu: Gpu
    nodes: PositiveInt = Field(le=1_000_000)
    gpus_per_node: PositiveInt = Field(le=1024)
    nvlink: NvLink
    nic: Nic
    network: Network = Network()
    price_usd_per_gpu_hour: Annotated[float, Field(ge=0, le=100_000)] = Field(
        description="USD per GPU-hour (at most 100,000)"
    )

    @model_validator(mode="after")
    def _check(self) -> Cluster:
        domain = self.nvlink_domain_gpus
        if domain % self.gpus_per_node or self.gpus % domain:
            raise ValueError(
                f"network.nvlink_domain_gpus: {domain} must be a multiple of gpus_per_node "
                f"({self.gpus_per_node}) that divides the {self.gpus} GPUs"
            )
        return self

    @property
    def nvlink_domain_gpus(self) -> int:
        return self.network.nvlink_domain_gpus or self.gpus_per_node

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def nvlink_bytes_per_s(self) -> float:
        """Usable NVLink bandwidth per GPU per direction, efficiency applied."""
        per_direction = (
            self.nvlink.bandwidth_gbytes_per_s
            if self.nvlink.bandwidth_gbytes_per_s is not None
            else self.gpu.nvlink_gbytes_per_s / 2
        )
        return units.gbytes_per_s(per_direction) * self.nvlink.efficiency


# --------------------------------------------------------------------------- parallelism


class Parallelism(Frozen):
    pipeline: PositiveInt = 1
    tensor: PositiveInt = Field(
        1,
        le=1024,
        description="tensor-parallel degree of attention and dense layers (Megatron-style, "
        "with sequence parallelism); a pipeline stage's GPUs = tensor × attention data-parallel",
    )
    expert_tensor: PositiveInt = Field(
        1,
        le=1024,
        description="tensor-parallel degree inside each expert (Megatron-Core parallel "
        "folding); a pipeline stage's GPUs = expert_tensor × expert × data",
    )
    context: PositiveInt = Field(
        1,
        le=1024,
        description="context-parallel degree of attention and dense layers (ring attention "
        "over sequence chunks, Megatron-Core CP); a pipeline stage's GPUs = tensor × context "
        "× attention data-parallel",
    )
    tp_comm_overlap: bool = Field(
        False,
        description="overlap each tensor-parallel all-gather / reduce-scatter with its "
        "neighbouring GEMM in chunks (Megatron-Core / TransformerEngine userbuffers)",
    )
    expert: PositiveInt = 1
    data: PositiveInt = Field(
        1,
        description="expert-data-parallel degree (EP-group replicas); for a dense model, the "
        "GPUs of a pipeline stage (tensor × data-parallel replicas)",
    )
    micro_batch_size: PositiveInt = Field(
        1, le=65_536, description="sequences per GPU per micro-batch"
    )
    schedule: Literal["1f1b", "interleaved", "zb1p", "dualpipe"] = Field(
        "1f1b",
        description="pipeline schedule: 1f1b, interleaved (virtual_stages pieces per rank), "
        "zb1p (zero-bubble ZB-H1, split backward), dualpipe (DeepSeek-V3, bidirectional)",
    )
    virtual_stages: PositiveInt = Field(
        1, le=1024, description="model pieces per rank (interleaved)"
    )
    layer_split: Literal["even", "balanced"] = Field(
        "even",
        description="how layers are cut into pipeline pieces: even = equal layer counts "
        "(earlier pieces take the remainder); balanced = contiguous pieces of near-equal "
        "compute, counting the embedding, output head and MTP modules",
    )
    embedding_counts_as_layer: bool = Field(
        False,
        description="the embedding takes one layer's place in the first pipeline piece "
        "(Megatron-Core account_for_embedding_in_pipeline_split; layer_split even)",
    )
    head_counts_as_layer: bool = Field(
        False,
        description="the output head (and loss) takes one layer's place in the last pipeline "
        "piece (Megatron-Core account_for_loss_in_pipeline_split; layer_split even)",
    )
    first_stage_layers: NonNegInt | None = Field(
        None,
        le=1024,
        description="layers on the first pipeline stage, over all its virtual stages "
        "(Megatron-Core decoder_first_pipeline_num_layers; layer_split even)",
    )
    last_stage_layers: NonNegInt | None = Field(
        None,
        le=1024,
        description="layers on the last pipeline stage, over all its virtual stages "
        "(Megatron-Core decoder_last_pipeline_num_layers; layer_split even)",
    )
    dispatch: Literal["all_to_all", "node_limited"] = Field(
        "all_to_all",
        description="all_to_all: every GPU sends to every GPU hosting its tokens' experts; "
        "node_limited: a token crosses InfiniBand once per destination node, to the GPU of the "
        "same in-node index, which forwards it over NVLink (DeepSeek-V3 / DeepEP)",
    )
    dp_collective: Literal["ring", "hierarchical"] = Field(
        "ring",
        description="data-parallel collectives: one ring over all members, or hierarchical "
        "(inside the NVLink domain, then across domains on 1/n of the data, then inside)",
    )
    grad_dtype: Literal["bf16", "fp32"] = "bf16"
    zero1: bool = Field(
        True,
        description="shard optimizer states over the data-parallel group (ZeRO-1): gradients "
        "reduce-scatter, each GPU updates its shard, parameters all-gather",
    )
    recompute: Literal["none", "selective", "full"] = Field(
        "none",
        description="activation recomputation in the backward: selective = norms and "
        "element-wise ops (DeepSeek-V3), full = the whole forward compute of each layer",
    )
    comm_sms: NonNegInt = Field(
        0,
        description="streaming multiprocessors reserved for communication kernels (DeepSeek-V3: "
        "20 of 132); compute runs on the rest",
    )

    @property
    def piece_split(self) -> PieceSplit:
        """Megatron-Core's split options (:func:`~moesim.scenario.pipeline.piece_layer_counts`)."""
        return PieceSplit(
            embedding_counts_as_layer=self.embedding_counts_as_layer,
            head_counts_as_layer=self.head_counts_as_layer,
            first_stage_layers=self.first_stage_layers,
            last_stage_layers=self.last_stage_layers,
        )


# --------------------------------------------------------------------------- run


class BatchRamp(Frozen):
    """A global batch that grows linearly in tokens trained, from ``start_sequences`` to
    ``training.global_batch_sequences`` over the first ``over_tokens`` (DeepSeek-V3: 3,072 →
    15,360 over 469B tokens). Each step's batch is rounded down to a whole number of
    micro-batches per pipeline (an even number under DualPipe, a multiple of the stages when
    interleaved) and raised to the fewest the schedule can run (DualPipe: 2·(PP − 1) per
    pipeline), so a ramp may start above ``start_sequences``."""

    start_sequences: PositiveInt
    over_tokens: PositiveFloat = Field(ge=1, le=1e16, description="tokens (at most 1e16)")


class Training(Frozen):
    total_tokens: PositiveFloat = Field(
        ge=1, le=1e16, description="tokens trained (at most 1e16, 600× DeepSeek-V3's 14.8T)"
    )
    global_batch_sequences: PositiveInt = Field(le=16_777_216)
    batch_ramp: BatchRamp | None = None
    sample_points: PositiveInt = Field(
        6, le=1000, description="steps simulated in the engine along the run"
    )


class Eplb(Frozen):
    """Redundant experts (DeepSeek's EPLB): each GPU gets spare expert slots; every
    ``interval_steps`` the hottest experts are replicated into them from recent loads
    (hierarchical: groups to nodes, replicas within nodes, replicas to GPUs) and the moved
    expert state costs network time. The run reports ``<strategy>+eplb`` next to the static
    placement."""

    enabled: bool = False
    redundant_per_rank: PositiveInt = Field(1, le=1024, description="spare expert slots per GPU")
    interval_steps: PositiveInt = Field(
        100, description="optimizer steps between placement recomputations"
    )


class Uncertainty(Frozen):
    seeds: PositiveInt = Field(
        1,
        le=1000,
        description="independent seeds the run is estimated under (seed, seed + 1, …): "
        "P10/P50/P90 of step time, GPU-hours and cost, and bands on the curves",
    )
    workers: PositiveInt | None = Field(
        None,
        le=1024,
        description="processes for the extra seeds (default and cap: the cores available)",
    )


class Engine(Frozen):
    memory_limit_gib: PositiveFloat = Field(
        4.0,
        le=1024,
        description="refuse up front a scenario whose simulation state (gate training, routing "
        "samples, per-GPU records and tables) would exceed this",
    )
    time_budget_minutes: PositiveFloat = Field(
        60.0,
        le=100_000,
        description="refuse up front a scenario whose estimated single-core run time (gate "
        "training plus simulated steps, from its size) would exceed this",
    )


class Output(Frozen):
    dir: Annotated[str, AfterValidator(_no_parent_dir)] = Field(
        "runs",
        min_length=1,
        max_length=1024,
        pattern=SAFE_DIR_PATTERN,
        description="where run directories go: a relative path without '..' or control characters",
    )
    trace: bool = Field(True, description="write trace.json.gz of one simulated step")
    trace_gpus: list[NonNegInt] | None = Field(
        None, max_length=4096, description="GPUs to trace (default: the first 16; at most 4,096)"
    )


class Scenario(Frozen):
    """A validated, frozen scenario. Build it with :func:`moesim.scenario.load_scenario`."""

    name: str = Field(
        pattern=SAFE_NAME_PATTERN,
        description="names the run directory: 1 to 100 letters, digits, '.', '_', '-' or '+', "
        "starting with a letter, digit or '_'",
    )
    description: str = Field("", max_length=10_000)
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    model: Model
    cluster: Cluster
    parallelism: Parallelism
    router: Router = Router()
    strategies: list[Strategy] = Field(
        default_factory=list,
        max_length=64,
        description="balancing strategies to compare (at least one for an MoE model; none for a "
        "dense model)",
    )
    stream: Stream = Stream()
    gate: Gate = Gate()
    training: Training
    faults: Faults = Faults()
    eplb: Eplb = Eplb()
    uncertainty: Uncertainty = Uncertainty()
    engine: Engine = Engine()
    output: Output = Output()

    @model_validator(mode="after")
    def _cross_checks(self) -> Scenario:
        p, c, m = self.parallelism, self.cluster, self.model
        product = p.pipeline * p.expert_tensor * p.expert * p.data
        if product != c.gpus:
            raise ValueError(
                f"parallelism: pipeline×expert_tensor×expert×data = {p.pipeline}×"
                f"{p.expert_tensor}×{p.expert}×{p.data} = {product}, but the cluster has "
                f"{c.nodes}×{c.gpus_per_node} = {c.gpus} GPUs"
            )
        self._check_tensor()
        if m.moe is None:
            self._check_dense()
        elif not self.strategies and self.gate.trace is None:
            raise ValueError("strategies: an MoE model needs at least one balancing strategy")
        if m.moe is not None and m.moe.routed_experts % p.expert:
            raise ValueError(
                f"parallelism.expert: {p.expert} does not divide model.moe.routed_experts "
                f"({m.moe.routed_experts})"
            )
        if p.expert > c.gpus_per_node and p.expert % c.gpus_per_node:
            raise ValueError(
                f"parallelism.expert: an expert-parallel group of {p.expert} GPUs is not a whole "
                f"number of {c.gpus_per_node}-GPU nodes"
            )
        if p.expert < c.gpus_per_node and c.gpus_per_node % p.expert:
            raise ValueError(
                f"parallelism.expert: {p.expert} does not divide gpus_per_node ({c.gpus_per_node})"
            )
        per_step = self._sequences_per_micro_batch
        if self.training.global_batch_sequences % per_step:
            raise ValueError(
                f"training.global_batch_sequences: {self.training.global_batch_sequences} is not "
                f"a multiple of micro_batch_size×expert×data/(tensor×context) = {per_step}"
            )
        ramp = self.training.batch_ramp
        if ramp is not None and ramp.start_sequences > self.training.global_batch_sequences:
            raise ValueError(
                f"training.batch_ramp.start_sequences: {ramp.start_sequences} exceeds "
                f"global_batch_sequences ({self.training.global_batch_sequences})"
            )

        if (
            m.moe is not None
            and self.router.node_limit is not None
            and self.router.node_limit > self.ep_nodes
        ):
            raise ValueError(
                f"router.node_limit: {self.router.node_limit} exceeds the {self.ep_nodes} node(s) "
                f"an expert-parallel group spans"
            )
        if p.comm_sms >= c.gpu.sms:
            raise ValueError(
                f"parallelism.comm_sms: {p.comm_sms} reserved of the {c.gpu.sms} SMs of a "
                f"{c.gpu.name} leaves none for compute"
            )
        if m.gemm_precision == "fp8" and c.gpu.fp8_tflops is None:
            raise ValueError(f"model.gemm_precision: fp8, but {c.gpu.name} has no FP8 peak")
        names = [s.name for s in self.strategies]
        duplicate = sorted({n for n in names if names.count(n) > 1})
        if duplicate:
            raise ValueError(f"strategies: duplicate name(s) {', '.join(duplicate)}")
        bad_trace = [g for g in (self.output.trace_gpus or []) if g >= c.gpus]
        if bad_trace:
            raise ValueError(f"output.trace_gpus: GPU(s) {bad_trace} beyond the {c.gpus} GPUs")
        if m.moe is not None and self.gate.routed_tokens_per_sequence > m.seq_len:
            raise ValueError(
                f"gate.routed_tokens_per_sequence: {self.gate.routed_tokens_per_sequence} exceeds "
                f"model.seq_len ({m.seq_len})"
            )
        self._check_schedule()
        check_faults(self.faults, c.gpus)
        if m.moe is not None:
            check_strategies(self)
            self.router.check_scenario(self)
        return self

    def _check_tensor(self) -> None:
        """Tensor-parallel groups: inside one node's NVLink, whole groups per pipeline stage,
        and every split dimension divisible (Megatron-LM's own requirements)."""
        p, c, m = self.parallelism, self.cluster, self.model
        t = p.tensor
        if p.expert_tensor > 1:
            raise ValueError(
                f"parallelism.expert_tensor: {p.expert_tensor}; splitting each expert's GEMMs "
                "is not priced yet, so only 1 is accepted (experts use expert parallelism)"
            )
        cp = p.context
        if cp > 1:
            if c.gpus_per_node % (t * cp):
                raise ValueError(
                    f"parallelism.context: tensor×context = {t}×{cp} must divide gpus_per_node "
                    f"({c.gpus_per_node}): the ring attention stays inside one node's NVLink"
                )
            stage = p.expert_tensor * p.expert * p.data
            if stage % (t * cp):
                raise ValueError(
                    f"parallelism.context: tensor×context = {t * cp} does not divide the "
                    f"{stage} GPUs of a pipeline stage (expert_tensor×expert×data)"
                )
            if m.seq_len % (2 * cp * t):
                raise ValueError(
                    f"parallelism.context: model.seq_len ({m.seq_len}) is not a multiple of "
                    f"2×context×tensor = {2 * cp * t} (two load-balanced chunks per rank, "
                    "each split by sequence parallelism)"
                )
        if t == 1:
            return
        if t > c.gpus_per_node or c.gpus_per_node % t:
            raise ValueError(
                f"parallelism.tensor: {t} must divide gpus_per_node ({c.gpus_per_node}): a "
                "tensor-parallel group lives inside one node's NVLink"
            )
        stage = p.expert_tensor * p.expert * p.data
        if stage % t:
            raise ValueError(
                f"parallelism.tensor: {t} does not divide the {stage} GPUs of a pipeline stage "
                "(expert_tensor×expert×data)"
            )
        att = m.attention
        if att.heads % t:
            raise ValueError(
                f"parallelism.tensor: {t} does not divide model.attention.heads ({att.heads})"
            )
        kv = att.kv_heads or att.heads
        if att.kind == "gqa" and kv % t:
            raise ValueError(
                f"parallelism.tensor: {t} does not divide model.attention.kv_heads ({kv}); "
                "key/value heads are split over the tensor-parallel group"
            )
        if m.dense_ffn is not None and m.ffn_dense_layers and m.dense_ffn % t:
            raise ValueError(
                f"parallelism.tensor: {t} does not divide model.dense_ffn ({m.dense_ffn})"
            )
        if m.seq_len % t:
            raise ValueError(
                f"parallelism.tensor: {t} does not divide model.seq_len ({m.seq_len}); sequence "
                "parallelism shards each sequence over the group"
            )

    def _check_dense(self) -> None:
        """A dense model routes nothing: no strategies, experts or routing options."""
        p = self.parallelism
        if self.strategies:
            raise ValueError(
                "strategies: a dense model (no model.moe) routes no tokens; leave strategies out"
            )
        if p.expert > 1:
            raise ValueError(
                f"parallelism.expert: {p.expert}; a dense model has no experts, use data "
                "(expert = 1)"
            )
        if p.dispatch == "node_limited":
            raise ValueError("parallelism.dispatch: a dense model dispatches no tokens")
        if self.eplb.enabled:
            raise ValueError("eplb.enabled: a dense model has no experts to replicate")
        if self.gate.trace is not None:
            raise ValueError("gate.trace: a dense model has no routing to replay")

    @model_validator(mode="after")
    def _check_sizes(self) -> Scenario:
        """Derived sizes in exact integer arithmetic, then the resource estimate (memory and
        time) against ``engine``'s limits — before anything iterates over steps."""
        c, t = self.cluster, self.training
        if c.gpus > MAX_GPUS:
            raise ValueError(f"cluster.nodes: {c.gpus:,} GPUs; at most {MAX_GPUS:,} are simulated")
        tokens = math.ceil(t.total_tokens)
        steps = -(-tokens // self.tokens_per_step)
        if steps > MAX_STEPS:
            raise ValueError(
                f"training.total_tokens: {steps:,} optimizer steps of {self.tokens_per_step:,} "
                f"tokens; at most {MAX_STEPS:,}"
            )
        if self.micro_batches * self.parallelism.pipeline * self.parallelism.virtual_stages > (
            MAX_SCHEDULE_SLOTS
        ):
            raise ValueError(
                f"training.global_batch_sequences: {self.micro_batches:,} micro-batches × "
                f"{self.parallelism.pipeline} stages is more than {MAX_SCHEDULE_SLOTS:,} "
                "schedule slots per step"
            )
        ramp = t.batch_ramp
        if ramp is not None:
            smallest = self._batch_quantum * self.model.seq_len
            span = math.ceil(min(ramp.over_tokens, t.total_tokens))
            if -(-span // smallest) > MAX_RAMP_STEPS:
                raise ValueError(
                    f"training.batch_ramp.over_tokens: the ramp could take up to "
                    f"{-(-span // smallest):,} steps of {smallest:,} tokens; at most "
                    f"{MAX_RAMP_STEPS:,}"
                )
        from moesim.scenario.resources import check_resources

        check_resources(self)
        return self

    def _check_schedule(self) -> None:
        p, c, m = self.parallelism, self.cluster, self.model
        if p.layer_split == "balanced" and p.piece_split != PieceSplit():
            raise ValueError(
                "parallelism.layer_split: balanced cuts the layers by compute itself; "
                "embedding_counts_as_layer, head_counts_as_layer, first_stage_layers and "
                "last_stage_layers apply to layer_split even"
            )
        if p.dispatch == "node_limited" and p.expert % c.gpus_per_node:
            raise ValueError(
                f"parallelism.dispatch: node_limited needs an expert-parallel group of whole "
                f"{c.gpus_per_node}-GPU nodes, but expert = {p.expert}"
            )
        if p.dispatch == "node_limited" and c.nvlink_domain_gpus != c.gpus_per_node:
            raise ValueError(
                "parallelism.dispatch: node_limited relays through one GPU per node, but "
                f"NVLink domains of {c.nvlink_domain_gpus} GPUs span several nodes; use "
                "all_to_all (it moves everything inside a domain over NVLink)"
            )
        try:
            check_pipeline(p.schedule, p.pipeline, p.virtual_stages)
            check_micro_batches(p.schedule, p.pipeline, self.micro_batches)
            check_pieces(m.layers, p.pipeline, p.virtual_stages, p.piece_split)
        except PipelineRuleError as err:
            raise ValueError(f"{err.field}: {err.message}") from None

    # Derived quantities used across moesim -------------------------------------------------

    @property
    def ep_nodes(self) -> int:
        """Nodes spanned by one expert-parallel group."""
        return max(1, math.ceil(self.parallelism.expert / self.cluster.gpus_per_node))

    @property
    def micro_batches(self) -> int:
        """Micro-batches per pipeline per step (gradient-accumulation steps)."""
        return self.training.global_batch_sequences // self._sequences_per_micro_batch

    @property
    def tokens_per_step(self) -> int:
        return self.training.global_batch_sequences * self.model.seq_len

    @property
    def traced_gpus(self) -> list[int]:
        """GPUs whose timeline goes into the trace."""
        if self.output.trace_gpus is not None:
            return sorted(set(self.output.trace_gpus))
        return list(range(min(16, self.cluster.gpus)))

    @property
    def _micro_batch_rule(self) -> tuple[int, int]:
        """(fewest, multiple of) micro-batches per pipeline the schedule can run."""
        p = self.parallelism
        return micro_batch_rule(p.schedule, p.pipeline)

    @property
    def attention_data(self) -> int:
        """Attention-data-parallel replicas per pipeline stage: its GPUs over
        ``tensor × context``, each replica taking its own sequences."""
        p = self.parallelism
        return p.expert_tensor * p.expert * p.data // (p.tensor * p.context)

    @property
    def _sequences_per_micro_batch(self) -> int:
        """Sequences of one micro-batch over a pipeline stage's GPUs: ``micro_batch_size``
        per tensor × context group."""
        return self.parallelism.micro_batch_size * self.attention_data

    @property
    def _batch_quantum(self) -> int:
        """Smallest batch (sequences) the layout can run; ramped batches are multiples of
        the per-micro-batch sequences and never smaller than this."""
        return self._sequences_per_micro_batch * self._micro_batch_rule[0]

    @functools.cached_property
    def _ramp_batches(self) -> tuple[int, ...]:
        """Batch (sequences) of each step of the ramp, in order; empty without a ramp."""
        ramp = self.training.batch_ramp
        if ramp is None:
            return ()
        step_quantum = self._sequences_per_micro_batch * self._micro_batch_rule[1]
        end = self.training.global_batch_sequences
        limit = min(ramp.over_tokens, self.training.total_tokens)
        batches: list[int] = []
        tokens = 0.0
        while tokens < limit:
            want = ramp.start_sequences + (end - ramp.start_sequences) * tokens / ramp.over_tokens
            batch = max(self._batch_quantum, int(want) // step_quantum * step_quantum)
            batch = min(batch, end)
            batches.append(batch)
            tokens += batch * self.model.seq_len
        return tuple(batches)

    @functools.cached_property
    def _ramp_sequences_before(self) -> tuple[int, ...]:
        """Sequences trained before each step of the ramp and after it (exact prefix sums:
        :meth:`tokens_before` is called for every step of a gate trajectory)."""
        return tuple(itertools.accumulate(self._ramp_batches, initial=0))

    @property
    def ramp_steps(self) -> int:
        """Optimizer steps taken during the batch ramp (0 without one)."""
        return len(self._ramp_batches)

    def batch_sequences_at(self, step: int) -> int:
        """Global batch (sequences) of optimizer step ``step`` (0-based)."""
        ramp = self._ramp_batches
        return ramp[step] if step < len(ramp) else self.training.global_batch_sequences

    def micro_batches_at(self, step: int) -> int:
        """Micro-batches per pipeline in optimizer step ``step``."""
        return self.batch_sequences_at(step) // self._sequences_per_micro_batch

    def tokens_before(self, step: int) -> float:
        """Tokens trained before optimizer step ``step``."""
        ramp = self._ramp_batches
        ramped = min(step, len(ramp))
        tokens = float(self._ramp_sequences_before[ramped]) * self.model.seq_len
        return tokens + float(step - ramped) * self.tokens_per_step

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the run (the last partial batch counts as a step)."""
        ramp = self._ramp_batches
        rest = (
            self.training.total_tokens - float(self._ramp_sequences_before[-1]) * self.model.seq_len
        )
        return max(1, len(ramp) + max(0, math.ceil(rest / self.tokens_per_step)))
