"""Compute cost model: every kernel of a layer's forward, backward-input and backward-weight pass.

A pass is the kernel sequence a training framework launches for one micro-batch on one GPU
(Megatron-Core / DeepSeek-V3 style; see ``docs/model/compute.md``). Each kernel is priced by
:class:`~moesim.cluster.kernels.KernelPricer` on its own model; an op's time is the sum of its
kernels (they run one after another on the compute stream). Nothing is blended: a norm does not
hide under a GEMM, an FP8 GEMM pays for the quantisation of its input, a routed expert pays for
the permute that gathers its tokens.

The ops the engine schedules (:class:`OpCosts`): ``attention`` (norm, projections, RoPE, flash
attention, residual add), ``router`` (FFN norm, router GEMM, scores and top-k, FP8 cast of the
dispatched tokens, the MoE output add), ``shared_experts``, ``dense_ffn``, ``head`` (final norm,
output GEMM, cross-entropy), ``embedding``, ``mtp`` (one multi-token-prediction module), and the
routed experts (:meth:`ComputeModel.experts`, per GPU from its tokens per local expert).

Each op has a forward, a backward for inputs (with any recomputation) and a backward for
weights; schedules that split the backward (ZB-H1, DualPipe) run the last one later.
Recomputation: ``selective`` redoes the RMSNorms, SwiGLU activations and RoPE, and MLA's
up-projections (DeepSeek-V3 §3.3.3, arXiv 2412.19437); ``full`` redoes the whole forward.

Tensor parallelism with sequence parallelism (``parallelism.tensor = t``; Megatron-LM, arXiv
1909.08053 and 2205.05198): a micro-batch of ``b`` sequences belongs to a group of ``t`` GPUs.
Column-parallel GEMMs (QKV, MLA up-projections, FFN gate+up, output head) see the whole
``b·s``-token input and ``1/t`` of the output columns; row-parallel ones (attention output, FFN
down) ``1/t`` of the contraction; flash attention runs ``1/t`` of the heads; norms, residual adds,
the router and the routed and shared experts run on the GPU's ``b·s/t`` sequence shard. MLA's
down-projections are replicated (every GPU runs them on the gathered tokens). The all-gathers
and reduce-scatters between them are in :mod:`moesim.cluster.tensor_parallel`
(:meth:`ComputeModel.tp_collectives`).

Context parallelism (``parallelism.context = c``; ring attention as in Megatron-Core): each
GPU holds ``1/c`` of every sequence (two load-balanced chunks, so causal attention work is even),
so every op runs on ``b·s/c`` tokens and flash attention does ``1/c`` of the sequence's score
work; the key/value chunks travel around the ring of ``c`` GPUs beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moesim import units
from moesim.cluster.kernels import (
    ATTENTION_BACKWARD_FLOPS,
    FP8_BLOCK,
    FP32,
    GEMM_TILE_ROWS,
    Kernel,
    KernelPricer,
    quantise_bytes,
)
from moesim.cluster.model_costs import model_costs
from moesim.cluster.tensor_parallel import (
    Collective,
    TpCollective,
    exposed_seconds,
    ring_bytes,
    ring_seconds,
)
from moesim.scenario.schema import Scenario

Array = npt.NDArray[np.float64]
BF16 = units.BYTES_PER_ELEMENT["bf16"]
PHASES = ("forward", "backward_input", "backward_weight")
TpPlan = list[tuple[str, Collective, str, str]]
"""(phase, collective, what it moves, the GEMM it overlaps with) per collective of an op."""
# Adam per parameter besides the gradient read: FP32 master weight, first and second moments
# read and written (24 bytes) and the BF16 working copy written (2).
ADAM_STATE_BYTES = 26


@dataclass(frozen=True)
class OpCost:
    """Seconds of one op for one micro-batch on one GPU, per pass."""

    forward: float
    backward_input: float
    """Input gradients, with any recomputation."""
    backward_weight: float

    @property
    def backward(self) -> float:
        return self.backward_input + self.backward_weight

    def __add__(self, other: OpCost) -> OpCost:
        """Two ops run back to back."""
        return OpCost(
            self.forward + other.forward,
            self.backward_input + other.backward_input,
            self.backward_weight + other.backward_weight,
        )


@dataclass(frozen=True)
class ExpertCost:
    """Seconds of the routed experts per GPU (arrays over the leading axes of ``rows``)."""

    forward: Array
    backward_input: Array
    backward_weight: Array

    @property
    def backward(self) -> Array:
        return self.backward_input + self.backward_weight


@dataclass(frozen=True)
class OpCosts:
    attention: OpCost
    router: OpCost
    shared_experts: OpCost
    dense_ffn: OpCost
    head: OpCost
    embedding: OpCost
    mtp: OpCost


class _Kernels:
    """Collects the kernels of one op (scalar shapes) as :class:`Kernel` records."""

    def __init__(self, model: ComputeModel, op: str) -> None:
        self.m = model
        self.p = model.pricer
        self.op = op
        self.out: list[Kernel] = []

    def _add(
        self,
        phase: str,
        name: str,
        kind: str,
        flops: float,
        nbytes: float,
        s: float,
        recompute: bool = False,
    ) -> None:
        self.out.append(
            Kernel(self.op, phase, name, kind, float(flops), float(nbytes), float(s), recompute)
        )

    def memory(
        self, phase: str, name: str, nbytes: float, kind: str, recomputable: bool = False
    ) -> None:
        """A memory-bound kernel, and its recomputation in the backward if it is one the
        recompute policy redoes."""
        s = float(self.p.memory_seconds(nbytes, kind))
        self._add(phase, name, "memory", 0.0, nbytes, s)
        if phase == "forward" and self.m.redoes(recomputable):
            self._add("backward_input", name, "memory", 0.0, nbytes, s, recompute=True)

    def gemm(
        self,
        phase: str,
        name: str,
        m: float,
        k: float,
        n: float,
        precision: str,
        extra_bytes: float = 0.0,
        recomputable: bool = False,
    ) -> None:
        a = 1 if precision == "fp8" else BF16
        flops = 2.0 * m * k * n
        nbytes = (m * k + k * n) * a + m * n * BF16 + extra_bytes
        s = float(self.p.gemm_seconds(flops, nbytes, precision))
        self._add(phase, name, "gemm", flops, nbytes, s)
        if phase == "forward" and self.m.redoes(recomputable):
            self._add("backward_input", name, "gemm", flops, nbytes, s, recompute=True)

    def quantise(self, phase: str, name: str, elements: float, recomputable: bool = False) -> None:
        self.memory(
            phase, f"FP8 cast: {name}", float(quantise_bytes(elements)), "quantise", recomputable
        )

    def linear(
        self,
        name: str,
        m: float,
        k: float,
        n: float,
        precision: str,
        input_cast: bool = True,
        recomputable: bool = False,
    ) -> None:
        """A linear layer ``y = x W`` (x: m × k, W: k × n): forward, input-gradient and
        weight-gradient GEMMs, and in FP8 the casts each GEMM's operands need (1×128 blocks
        along the contraction: the weight gradient contracts over tokens, so its operands are
        cast again along that axis). The weight gradient accumulates into FP32."""
        fp8 = precision == "fp8"
        if fp8 and input_cast:
            self.quantise("forward", f"{name} input", m * k, recomputable)
        self.gemm("forward", name, m, k, n, precision, recomputable=recomputable)
        if fp8:
            self.quantise("backward_input", f"{name} output gradient", m * n)
        self.gemm("backward_input", f"{name} input gradient", m, n, k, precision)
        if fp8:
            self.quantise("backward_weight", f"{name} output gradient, transposed", m * n)
            # The input was kept in FP8 for the backward: re-cast along the token axis.
            self.memory(
                "backward_weight",
                f"FP8 cast: {name} input, transposed",
                2.0 * m * k + m * k / FP8_BLOCK * FP32,
                "quantise",
            )
        self.gemm(
            "backward_weight",
            f"{name} weight gradient",
            k,
            m,
            n,
            precision,
            extra_bytes=2.0 * k * n * FP32,
        )

    def rmsnorm(self, name: str, rows: float, width: float) -> None:
        self.memory(
            "forward", f"RMSNorm: {name}", 2.0 * rows * width * BF16, "rmsnorm", recomputable=True
        )
        # Backward reads x and dy, writes dx (the weight gradient reduces on the way).
        self.memory(
            "backward_input", f"RMSNorm backward: {name}", 3.0 * rows * width * BF16, "rmsnorm"
        )

    def add(self, name: str, rows: float, width: float, inputs: int = 2) -> None:
        """An element-wise sum (residual add). In the backward the gradient reaching the sum
        flows into each branch, and where a branch rejoins the residual stream its input
        gradient is added to the stream's: one add of two gradients."""
        self.memory("forward", name, (inputs + 1) * rows * width * BF16, "copy")
        self.memory("backward_input", f"{name}: gradient", 3 * rows * width * BF16, "copy")

    def swiglu(self, rows: float, ffn: float) -> None:
        self.memory("forward", "SwiGLU", 3.0 * rows * ffn * BF16, "swiglu", recomputable=True)
        # Backward reads both halves and the gradient, writes both halves' gradients.
        self.memory("backward_input", "SwiGLU backward", 5.0 * rows * ffn * BF16, "swiglu")

    def ffn(self, rows: float, width: float, input_cast: bool) -> None:
        """A SwiGLU FFN (gate and up fused into one GEMM) over ``rows`` tokens."""
        prec, d = self.m.precision, self.m.hidden
        self.linear("FFN gate+up", rows, d, 2.0 * width, prec, input_cast)
        self.swiglu(rows, width)
        self.linear("FFN down", rows, width, d, prec)

    def gemm_s(self, phase: str, name: str) -> float:
        """Seconds of this op's GEMM ``name`` in ``phase`` (0 when it has none)."""
        return float(
            sum(
                k.seconds
                for k in self.out
                if k.phase == phase and k.name == name and k.kind == "gemm" and not k.recompute
            )
        )

    def total(self, phase: str) -> float:
        return float(sum(k.seconds for k in self.out if k.phase == phase))

    def cost(self) -> OpCost:
        return OpCost(*(self.total(p) for p in PHASES))


class ComputeModel:
    """Seconds per op for one micro-batch on one GPU of the scenario's cluster, built from the
    kernels of :meth:`kernels`.

    Parameters
    ----------
    scenario : Scenario
        Supplies the GPU (peaks, efficiencies), the architecture, the micro-batch size, the
        recomputation policy and the SMs reserved for communication.
    """

    def __init__(self, scenario: Scenario) -> None:
        gpu, model, par = scenario.cluster.gpu, scenario.model, scenario.parallelism
        self.pricer = KernelPricer(gpu, par.comm_sms)
        self.precision = model.gemm_precision
        self.recompute = par.recompute
        self.model = model
        self.hidden = model.hidden
        self.tensor = par.tensor
        self.context = par.context
        self.tokens = float(par.micro_batch_size * model.seq_len) / par.context
        """Tokens of a micro-batch of the tensor-parallel group (the GEMMs' rows): its
        context-parallel chunk of the sequences."""
        self.local = self.tokens / par.tensor
        """The GPU's sequence shard of them (norms, adds, router, experts)."""
        self.costs = model_costs(model)
        moe = model.moe
        self.expert_ffn = 0 if moe is None else moe.expert_ffn
        self.top_k = 0 if moe is None else moe.top_k
        self.experts_per_gpu = 0 if moe is None else moe.routed_experts // par.expert
        self.tp_bandwidth = scenario.cluster.nvlink_bytes_per_s
        self.tp_latency = units.microseconds(scenario.cluster.nvlink.latency_us)
        self.tp_overlap = par.tp_comm_overlap
        self.grad_bytes = units.BYTES_PER_ELEMENT[par.grad_dtype]
        self.hbm = self.pricer.hbm
        self.launch = self.pricer.launch
        self._ops = self._build_ops()

    def redoes(self, recomputable: bool) -> bool:
        """Whether a forward kernel is run again in the backward."""
        return self.recompute == "full" or (self.recompute == "selective" and recomputable)

    # ------------------------------------------------------------------ dense ops

    def _attention(self, k: _Kernels) -> None:
        att, n, d, prec = self.model.attention, self.tokens, self.hidden, self.precision
        t, local = self.tensor, self.local
        # Heads split over the tensor-parallel group.
        h, hd = att.heads // t, att.head_dim
        v_hd = att.v_head_dim or hd
        k.rmsnorm("attention input", local, d)
        if prec == "fp8":
            k.quantise("forward", "attention input", local * d, recomputable=False)
        if att.kind == "mla":
            qk_hd = hd + att.rope_head_dim
            kv_rank = att.kv_lora_rank or 0
            if att.q_lora_rank:
                # Down-projections are replicated over the tensor-parallel group.
                k.linear("MLA q down", n, d, att.q_lora_rank, prec, input_cast=False)
                k.rmsnorm("q latent", n, att.q_lora_rank)
                k.linear("MLA q up", n, att.q_lora_rank, h * qk_hd, prec, recomputable=True)
            else:
                k.linear("MLA q", n, d, h * qk_hd, prec, input_cast=False)
            k.linear("MLA kv down", n, d, kv_rank + att.rope_head_dim, prec, input_cast=False)
            k.rmsnorm("kv latent", n, kv_rank)
            k.linear("MLA kv up", n, kv_rank, h * (hd + v_hd), prec, recomputable=True)
            rope = n * (h + 1) * att.rope_head_dim
            # Per-head queries and keys are assembled from their no-RoPE and (shared) RoPE
            # parts before flash attention: Q and K written whole; the backward splits them.
            heads = 2.0 * 2.0 * n * h * qk_hd * BF16
            k.memory("forward", "assemble Q and K heads", heads, "copy", recomputable=True)
            k.memory("backward_input", "split Q and K head gradients", heads, "copy")
        else:
            kv = (att.kv_heads or att.heads) // t if att.kind == "gqa" else h
            k.linear("QKV projection", n, d, (h + 2 * kv) * hd, prec, input_cast=False)
            rope = n * (h + kv) * hd
        k.memory("forward", "RoPE", 2.0 * rope * BF16, "copy", recomputable=True)
        k.memory("backward_input", "RoPE backward", 2.0 * rope * BF16, "copy")
        mla = att.kind == "mla"
        core = n * self.costs.attention.core_flops / t
        s = self.pricer.attention_seconds(core, backward=False, mla=mla)
        k._add("forward", "flash attention", "attention", core, 0.0, s)
        if self.recompute == "full":
            k._add("backward_input", "flash attention", "attention", core, 0.0, s, True)
        back = ATTENTION_BACKWARD_FLOPS * core
        s = self.pricer.attention_seconds(back, backward=True, mla=mla)
        k._add("backward_input", "flash attention backward", "attention", back, 0.0, s)
        # FlashAttention-2/3's backward launches a pre-processing kernel (rowsum of dO∘O) and
        # a post-processing one (the FP32 dQ accumulator cast to BF16).
        q_elems = n * h * (hd + att.rope_head_dim if mla else hd)
        pre_post = 2.0 * n * h * v_hd * BF16 + q_elems * (FP32 + BF16)
        k.memory("backward_input", "flash attention backward pre/post-processing", pre_post, "copy")
        k.linear("attention output", n, h * v_hd, d, prec)
        k.add("residual add (attention)", local, d)

    def _router(self, k: _Kernels) -> None:
        if self.model.moe is None:
            return
        n, d, e = self.local, self.hidden, self.model.moe.routed_experts
        k.rmsnorm("FFN input", n, d)
        # Gating stays in higher precision (DeepSeek-V3 §3.3.1): priced as a BF16 GEMM.
        k.linear("router", n, d, e, "bf16")
        # Scores (sigmoid or softmax), group limits and top-k: FP32 score rows read and written.
        k.memory("forward", "router scores and top-k", 3.0 * n * e * FP32, "copy")
        k.memory("backward_input", "router scores backward", 3.0 * n * e * FP32, "copy")
        if self.precision == "fp8":
            # Tokens are dispatched in FP8 (DeepSeek-V3 §3.3): one cast serves the shared expert.
            k.quantise("forward", "dispatched tokens", n * d)
        k.add("MoE output add (shared + routed + residual)", n, d, inputs=3)

    def _shared(self, k: _Kernels) -> None:
        shared = 0 if self.model.moe is None else self.model.moe.shared_experts
        if shared:
            # The shared experts read the tokens cast for dispatch: the GPU's sequence shard,
            # with their weights whole (as the routed experts: no tensor-parallel collective).
            k.ffn(self.local, shared * self.expert_ffn, input_cast=False)

    def _dense_ffn(self, k: _Kernels) -> None:
        if self.model.dense_ffn and self.model.ffn_dense_layers:
            k.rmsnorm("FFN input", self.local, self.hidden)
            k.ffn(self.tokens, self.model.dense_ffn / self.tensor, input_cast=True)
            k.add("residual add (FFN)", self.local, self.hidden)

    def _head(self, k: _Kernels) -> None:
        n, d, v = self.tokens, self.hidden, self.model.vocab / self.tensor
        k.rmsnorm("final", self.local, d)
        # The output head stays in BF16 (DeepSeek-V3 §3.3.1); vocabulary-parallel under TP.
        k.linear("output head", n, d, v, "bf16")
        k.memory("forward", "cross-entropy", 2.0 * n * v * BF16, "copy")
        k.memory("backward_input", "cross-entropy backward", 2.0 * n * v * BF16, "copy")

    def _embedding(self, k: _Kernels) -> None:
        # Vocabulary-parallel under TP: every GPU writes the full b·s × h (zeros for tokens
        # outside its vocabulary slice) before the reduce-scatter into sequence shards.
        n, d = self.tokens, self.hidden
        k.memory("forward", "embedding gather", 2.0 * n * d * BF16, "copy")
        # Gradient rows added into the FP32 embedding gradient: read dy, read and write FP32.
        k.memory("backward_input", "embedding gradient scatter", n * d * (BF16 + 2 * FP32), "copy")

    def _mtp(self, k: _Kernels) -> None:
        """One MTP module (DeepSeek-V3 §2.2): norms of the hidden state and the next token's
        embedding, a 2d → d projection, a transformer block whose MoE is priced at its
        activated width (shared + top-k experts as one FFN: its routing is not simulated), and
        the shared output head."""
        if self.model.moe is None:
            return
        n, d, local = self.tokens, self.hidden, self.local
        k.rmsnorm("MTP hidden", local, d)
        k.rmsnorm("MTP embedding", local, d)
        # Column-parallel under TP, like the FFN it feeds.
        k.linear("MTP projection", n, 2 * d, d / self.tensor, self.precision)
        self._attention(k)
        k.rmsnorm("MTP FFN input", local, d)
        width = (self.model.moe.shared_experts + self.top_k) * self.expert_ffn
        k.ffn(n, width / self.tensor, input_cast=True)
        self._head(k)

    def _build_ops(self) -> dict[str, _Kernels]:
        builders = {
            "attention": self._attention,
            "router": self._router,
            "shared_experts": self._shared,
            "dense_ffn": self._dense_ffn,
            "head": self._head,
            "embedding": self._embedding,
            "mtp": self._mtp,
        }
        ops = {}
        for name, build in builders.items():
            k = _Kernels(self, name)
            build(k)
            ops[name] = k
        return ops

    def op_costs(self) -> OpCosts:
        """Seconds per pass of each non-expert op."""
        return OpCosts(**{name: k.cost() for name, k in self._ops.items()})

    # ------------------------------------------------------------------ tensor parallelism

    def _tp_plan(self, op: str) -> TpPlan:
        """(phase, collective, what, neighbouring GEMM) of one op's tensor-parallel
        collectives: an all-gather before each column-parallel GEMM and a reduce-scatter after
        each row-parallel one, mirrored in the backward."""
        att = self.model.attention
        if att.kind == "mla":
            first = "MLA q down" if att.q_lora_rank else "MLA q"
            last = "MLA kv down"
        else:
            first = last = "QKV projection"
        attention: TpPlan = [
            ("forward", "all_gather", "attention input", first),
            ("forward", "reduce_scatter", "attention output", "attention output"),
            (
                "backward_input",
                "all_gather",
                "attention output gradient",
                "attention output input gradient",
            ),
            (
                "backward_input",
                "reduce_scatter",
                "attention input gradient",
                f"{last} input gradient",
            ),
        ]
        ffn: TpPlan = [
            ("forward", "all_gather", "FFN input", "FFN gate+up"),
            ("forward", "reduce_scatter", "FFN output", "FFN down"),
            ("backward_input", "all_gather", "FFN output gradient", "FFN down input gradient"),
            (
                "backward_input",
                "reduce_scatter",
                "FFN input gradient",
                "FFN gate+up input gradient",
            ),
        ]
        head: TpPlan = [
            ("forward", "all_gather", "output head input", "output head"),
            (
                "backward_input",
                "reduce_scatter",
                "output head input gradient",
                "output head input gradient",
            ),
        ]
        embedding: TpPlan = [
            ("forward", "reduce_scatter", "embedding output", ""),
            ("backward_input", "all_gather", "embedding output gradient", ""),
        ]
        plans = {
            "attention": attention,
            "dense_ffn": ffn,
            "head": head,
            "embedding": embedding,
            "mtp": attention + ffn + head,
        }
        return plans.get(op, [])

    def tp_collectives(self) -> list[TpCollective]:
        """Every tensor-parallel collective of one micro-batch's ops on one GPU (none when
        ``tensor = 1``), each over the full ``b·s × h`` BF16 activation."""
        t = self.tensor
        out = self._kv_ring()
        if t < 2:
            return out
        full = self.tokens * self.hidden * BF16
        comm = ring_seconds(full, t, self.tp_bandwidth, self.tp_latency)
        for op, kernels in self._ops.items():
            if not kernels.out or (op == "mtp" and self.model.mtp_depth == 0):
                continue  # an op the model does not run
            for phase, kind, what, gemm in self._tp_plan(op):
                gemm_s = kernels.gemm_s(phase, gemm) if gemm else 0.0
                out.append(
                    TpCollective(
                        op=op,
                        phase=phase,
                        kind=kind,
                        name=what,
                        tensor_bytes=full,
                        comm_s=comm,
                        gemm_s=gemm_s,
                        exposed_s=exposed_seconds(comm, gemm_s, t, self.tp_overlap),
                        sent_bytes=ring_bytes(full, t),
                    )
                )
        return out

    def _kv_ring(self) -> list[TpCollective]:
        """Ring attention's key/value exchange (``context = c > 1``): in ``c − 1`` steps each
        GPU passes its K and V chunk (its TP share of the KV heads) to the next GPU of the
        context-parallel group while flash attention works on the chunk it holds; the backward
        passes K, V and their gradients. The exchange always overlaps the attention (a ring of
        ``c`` chunks: the rule of :func:`exposed_seconds`)."""
        c = self.context
        if c < 2:
            return []
        att = self.model.attention
        t = self.tensor
        if att.kind == "mla":
            heads, k_dim = att.heads // t, att.head_dim + att.rope_head_dim
        else:
            heads = ((att.kv_heads or att.heads) if att.kind == "gqa" else att.heads) // t
            k_dim = att.head_dim
        v_dim = att.v_head_dim or att.head_dim
        chunk = self.tokens * heads * (k_dim + v_dim) * BF16
        step = chunk / self.tp_bandwidth + self.tp_latency
        attention = self._ops["attention"]
        out = []
        for phase, factor, kernel in (
            ("forward", 1, "flash attention"),
            ("backward_input", 2, "flash attention backward"),
        ):
            comm = factor * (c - 1) * step
            busy = float(
                sum(
                    k.seconds
                    for k in attention.out
                    if k.phase == phase and k.name == kernel and not k.recompute
                )
            )
            out.append(
                TpCollective(
                    op="attention",
                    phase=phase,
                    kind="kv_ring",
                    name="ring attention K/V" + (" and their gradients" if factor == 2 else ""),
                    tensor_bytes=factor * c * chunk,
                    comm_s=comm,
                    gemm_s=busy,
                    exposed_s=exposed_seconds(comm, busy, c, overlap=True),
                    sent_bytes=factor * (c - 1) * chunk,
                )
            )
        return out

    def tp_costs(self) -> tuple[dict[str, OpCost], dict[str, OpCost]]:
        """Per op: seconds the tensor-parallel collectives add to the compute stream, and the
        bytes each GPU sends over NVLink for them, per pass (no collective in the weight
        gradients)."""
        seconds: dict[str, OpCost] = {}
        sent: dict[str, OpCost] = {}
        for c in self.tp_collectives():
            forward = c.phase == "forward"
            s = OpCost(c.exposed_s if forward else 0.0, 0.0 if forward else c.exposed_s, 0.0)
            b = OpCost(c.sent_bytes if forward else 0.0, 0.0 if forward else c.sent_bytes, 0.0)
            seconds[c.op] = seconds.get(c.op, OpCost(0.0, 0.0, 0.0)) + s
            sent[c.op] = sent.get(c.op, OpCost(0.0, 0.0, 0.0)) + b
        return seconds, sent

    # ------------------------------------------------------------------ routed experts

    def _expert_kernels(
        self, rows: npt.ArrayLike
    ) -> list[tuple[str, str, str, Array, Array, Array, bool]]:
        """The routed experts' kernels on each GPU: ``rows[..., e]`` tokens for local expert
        ``e``. Returns (phase, name, kind, flops, bytes, seconds, recompute) with arrays over
        the leading axes."""
        r = np.asarray(rows, dtype=np.float64)
        d, f, prec, p = self.hidden, self.expert_ffn, self.precision, self.pricer
        fp8 = prec == "fp8"
        a = 1.0 if fp8 else float(BF16)
        n_exp = r.shape[-1]
        total = r.sum(axis=-1)
        padded = (np.ceil(r / GEMM_TILE_ROWS) * GEMM_TILE_ROWS).sum(axis=-1)
        active = (r > 0).sum(axis=-1).astype(np.float64)
        out: list[tuple[str, str, str, Array, Array, Array, bool]] = []
        zero = np.zeros_like(total)

        def mem(phase: str, name: str, nbytes: Array, kind: str, rec: bool = False) -> None:
            """``rec``: a kernel selective recomputation redoes."""
            out.append((phase, name, "memory", zero, nbytes, p.memory_seconds(nbytes, kind), False))
            if phase == "forward" and self.redoes(rec):
                out.append(
                    (
                        "backward_input",
                        name,
                        "memory",
                        zero,
                        nbytes,
                        p.memory_seconds(nbytes, kind),
                        True,
                    )
                )

        def grouped(phase: str, name: str, k: float, n: float, weight_grad: bool = False) -> None:
            flops = 2.0 * padded * k * n
            if weight_grad:
                # One grouped launch (DeepGEMM's k-grouped weight-gradient GEMM): each expert
                # with tokens contracts over its own rows into its FP32 gradient (read and
                # written: the per-expert cost that replicas and many small experts add).
                nbytes = total * (k + n) * a + active * k * n * 2 * FP32
                secs = p.gemm_seconds(flops, nbytes, prec)
            else:
                # Every local expert's weights are read, even a cold one's.
                nbytes = n_exp * k * n * a + total * k * a + total * n * BF16
                secs = p.gemm_seconds(flops, nbytes, prec)
                secs = np.where(flops > 0, secs, nbytes / self.hbm + self.launch)
            out.append((phase, name, "grouped_gemm", flops, nbytes, secs, False))
            if phase == "forward" and self.recompute == "full":
                out.append(("backward_input", name, "grouped_gemm", flops, nbytes, secs, True))

        # Forward: gather received tokens into expert order, gate+up, SwiGLU, cast, down,
        # gather back into arrival order for the combine.
        mem("forward", "permute tokens", 2.0 * total * d * a, "permute")
        grouped("forward", "experts gate+up", d, 2.0 * f)
        mem("forward", "SwiGLU", 3.0 * total * f * BF16, "swiglu", rec=True)
        if fp8:
            mem(
                "forward",
                "FP8 cast: experts down input",
                quantise_bytes(total * f),
                "quantise",
                rec=True,
            )
        grouped("forward", "experts down", f, d)
        mem("forward", "unpermute outputs", 2.0 * total * d * BF16, "permute")
        # Backward for inputs: gradients arrive (FP8 in DeepSeek-V3), mirror of the forward.
        mem("backward_input", "permute gradients", 2.0 * total * d * a, "permute")
        grouped("backward_input", "experts down input gradient", d, f)
        mem("backward_input", "SwiGLU backward", 5.0 * total * f * BF16, "swiglu")
        if fp8:
            mem(
                "backward_input",
                "FP8 cast: gate+up output gradient",
                quantise_bytes(total * 2.0 * f),
                "quantise",
            )
        grouped("backward_input", "experts gate+up input gradient", 2.0 * f, d)
        mem("backward_input", "unpermute input gradients", 2.0 * total * d * BF16, "permute")
        # Gradient of the gate values: ⟨dy, expert output⟩ for every routed row.
        mem("backward_input", "gate-value gradient", 2.0 * total * d * BF16, "copy")
        # Backward for weights: operands cast again along the token axis, then one GEMM per
        # expert for each matrix.
        if fp8:
            elements = total * (d + f + d + 2.0 * f)
            mem(
                "backward_weight",
                "FP8 cast: weight-gradient operands, transposed",
                quantise_bytes(elements),
                "quantise",
            )
        grouped("backward_weight", "experts down weight gradient", f, d, weight_grad=True)
        grouped("backward_weight", "experts gate+up weight gradient", d, 2.0 * f, weight_grad=True)
        return out

    def experts(self, rows: npt.ArrayLike) -> ExpertCost:
        """Routed experts on each GPU with ``rows[..., e]`` tokens for local expert ``e``
        (leading axes: one GPU each)."""
        kernels = self._expert_kernels(rows)
        shape = np.asarray(rows).shape[:-1]
        totals = {phase: np.zeros(shape) for phase in PHASES}
        for phase, _, _, _, _, secs, _ in kernels:
            totals[phase] = totals[phase] + secs
        return ExpertCost(*(totals[p] for p in PHASES))

    def balanced_rows(self, expert_parallel: int) -> Array:
        """Tokens per local expert when routing is perfectly balanced: each GPU receives its
        sequence shard's ``tokens × top_k`` assignments spread over its experts (none in a
        dense model)."""
        if self.model.moe is None:
            return np.zeros(0)
        per_gpu = self.model.moe.routed_experts // expert_parallel
        return np.full(per_gpu, self.local * self.top_k / per_gpu)

    # ------------------------------------------------------------------ tables

    def kernels(self, rows: npt.ArrayLike) -> list[Kernel]:
        """Every kernel of one micro-batch on one GPU: one MoE layer's ops, the routed experts
        at ``rows`` tokens per local expert, and the dense FFN, head, embedding and MTP where
        the model has them."""
        m = self.model
        absent = {
            "dense_ffn": m.ffn_dense_layers == 0,
            "mtp": m.mtp_depth == 0,
        }
        out: list[Kernel] = []
        for name, k in self._ops.items():
            if not absent.get(name, False):
                out.extend(k.out)
        if m.moe is None:
            return out
        for phase, name, kind, flops, nbytes, secs, rec in self._expert_kernels(
            np.asarray(rows, dtype=np.float64)[None, :]
        ):
            out.append(
                Kernel(
                    "routed_experts",
                    phase,
                    name,
                    kind,
                    float(flops[0]),
                    float(nbytes[0]),
                    float(secs[0]),
                    rec,
                )
            )
        return out

    def optimizer_step(self, params: float) -> float:
        """Adam over ``params`` parameters, memory-bound: the gradient read, FP32 master weight
        and moments read and written, the BF16 copy written."""
        nbytes = params * (self.grad_bytes + ADAM_STATE_BYTES)
        return float(self.pricer.memory_seconds(nbytes, "adam"))
