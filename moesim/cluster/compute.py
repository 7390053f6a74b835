"""Compute cost model: seconds of each op on one GPU, by roofline with measured efficiencies.

An op of ``F`` FLOP that moves ``B`` bytes of HBM takes

    max((F + n_gemm · F_half) / (peak · eff_max),  B / (HBM bandwidth · memory efficiency))
    + one kernel launch,

where ``eff_max`` and ``F_half`` are the GPU's GEMM efficiency curve (a GEMM of ``F`` FLOP runs
at ``eff_max · F / (F + F_half)`` of peak; see :mod:`moesim.scenario.presets` for the
micro-benchmark). A cold expert (no tokens) still reads its weights; a hot expert is
compute-bound. Attention's QKᵀ/PV core runs at the measured flash-attention efficiency, norms
and element-wise work are memory-bound. Backward GEMMs cost twice the forward (input and weight
gradients); the attention core backward costs 2.5× its forward.

Op times are per micro-batch on one GPU, in seconds.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from moesim import units
from moesim.cluster.model_costs import model_costs
from moesim.scenario.schema import Scenario

# Passes of a hidden-sized BF16 activation through HBM per layer forward that are not GEMMs:
# two RMSNorms (read + write each), two residual adds (read 2, write 1 each), RoPE and the
# SwiGLU activation. An engineering estimate, not a measurement.
ELEMENTWISE_PASSES = 10
ATTENTION_CORE_BACKWARD_FACTOR = 2.5  # FlashAttention-2: backward does 2.5× the forward FLOPs
BF16 = units.BYTES_PER_ELEMENT["bf16"]
# Row tile of Hopper grouped-GEMM kernels (CUTLASS / DeepGEMM use 64–128-row tiles): each
# expert's rows are padded to a multiple of it. An assumption, not a measurement.
GEMM_TILE_ROWS = 128
ADAM_BYTES_PER_PARAM = 28


class ComputeModel:
    """Seconds per op for one micro-batch on one GPU of the scenario's cluster.

    Parameters
    ----------
    scenario : Scenario
        Supplies the GPU (peaks, efficiencies), the architecture and the micro-batch size.
    """

    def __init__(self, scenario: Scenario) -> None:
        gpu, model, par = scenario.cluster.gpu, scenario.model, scenario.parallelism
        self.precision = model.gemm_precision
        # SMs reserved for communication kernels are lost to compute, in proportion.
        sm_share = (gpu.sms - par.comm_sms) / gpu.sms
        self.peak = gpu.peak_flops(self.precision) * sm_share
        self.peak_bf16 = gpu.peak_flops("bf16") * sm_share
        self.recompute = par.recompute
        self.eff_max = (
            gpu.fp8_gemm_efficiency if self.precision == "fp8" else gpu.bf16_gemm_efficiency
        )
        self.f_half = units.GIGA * (
            gpu.fp8_gemm_half_gflop if self.precision == "fp8" else gpu.bf16_gemm_half_gflop
        )
        self.eff_max_bf16 = gpu.bf16_gemm_efficiency
        self.f_half_bf16 = units.GIGA * gpu.bf16_gemm_half_gflop
        self.hbm = gpu.hbm_bytes_per_s * gpu.memory_efficiency
        self.launch = units.microseconds(gpu.kernel_launch_us)
        self.weight_bytes = units.BYTES_PER_ELEMENT[self.precision]
        self.att_fwd_eff = gpu.attention_fwd_efficiency
        self.att_bwd_eff = gpu.attention_bwd_efficiency

        self.hidden = model.hidden
        self.tokens = scenario.parallelism.micro_batch_size * model.seq_len
        self.costs = model_costs(model)
        self.expert_ffn = model.moe.expert_ffn
        self.shared = model.moe.shared_experts
        self.vocab = model.vocab
        self.routed_experts = model.moe.routed_experts
        self.top_k = model.moe.top_k
        self.dense_ffn = model.dense_ffn or 0

    # ------------------------------------------------------------------ primitives

    def ffn_seconds(self, rows: npt.ArrayLike, ffn: int, backward: bool) -> npt.NDArray[np.float64]:
        """Seconds of one grouped SwiGLU FFN call over several FFNs with ``rows[..., i]`` tokens
        each (leading axes: independent calls, e.g. one per GPU).

        Rows are padded per FFN to the GEMM tile height (grouped GEMMs tile each expert
        separately); the fixed GEMM overhead ``F_half`` is paid once per grouped GEMM (gate, up,
        down; doubled in the backward for input and weight gradients). An FFN with no rows
        still reads its weights (forward) or reads and writes them (backward).
        """
        rows = np.asarray(rows, dtype=np.float64)
        d = self.hidden
        factor = 2.0 if backward else 1.0
        padded = np.ceil(rows / GEMM_TILE_ROWS) * GEMM_TILE_ROWS
        total = rows.sum(axis=-1)
        flops = factor * 2.0 * padded.sum(axis=-1) * 3.0 * d * ffn
        n_gemm = np.where(total > 0, 3.0 * factor, 0.0)
        weights = factor * 3.0 * d * ffn * self.weight_bytes * rows.shape[-1]
        activations = factor * total * (2.0 * d + 3.0 * ffn) * BF16
        compute = (flops + n_gemm * self.f_half) / (self.peak * self.eff_max)
        return np.maximum(compute, (weights + activations) / self.hbm)

    # ------------------------------------------------------------------ ops per micro-batch

    def _recomputed(self, backward: bool, forward: float, elementwise: float) -> float:
        """Extra backward time of activation recomputation: the whole forward (``full``) or its
        element-wise part only (``selective``)."""
        if not backward or self.recompute == "none":
            return 0.0
        return forward if self.recompute == "full" else elementwise

    def attention(self, backward: bool) -> float:
        """Attention block of one layer: norms, projections, causal core, output projection
        (plus its recomputation in the backward, if any)."""
        time = self._attention(backward)
        if backward:
            time += self._recomputed(True, self._attention(False), self._elementwise(False))
        return time

    def _elementwise(self, backward: bool) -> float:
        factor = 2.0 if backward else 1.0
        return factor * ELEMENTWISE_PASSES * self.tokens * self.hidden * BF16 / self.hbm

    def _attention(self, backward: bool) -> float:
        n, a = self.tokens, self.costs.attention
        proj = self._attention_projections(backward)
        core_eff = self.att_bwd_eff if backward else self.att_fwd_eff
        core_factor = ATTENTION_CORE_BACKWARD_FACTOR if backward else 1.0
        core = core_factor * n * a.core_flops / (self.peak_bf16 * core_eff)
        return proj + core + self._elementwise(backward) + self.launch

    def _attention_projections(self, backward: bool) -> float:
        n, a = self.tokens, self.costs.attention
        factor = 2.0 if backward else 1.0
        proj_flops = factor * n * a.projection_flops
        proj_bytes = factor * a.params * self.weight_bytes + 4 * n * self.hidden * BF16
        return max(
            (proj_flops + 4 * factor * self.f_half) / (self.peak * self.eff_max),
            proj_bytes / self.hbm,
        )

    def router(self, backward: bool) -> float:
        """Router logits GEMM (BF16/FP32 in practice; priced at BF16) and top-k."""
        n = self.tokens
        factor = 2.0 if backward else 1.0
        flops = factor * 2.0 * n * self.hidden * self.routed_experts
        compute = (flops + factor * self.f_half_bf16) / (self.peak_bf16 * self.eff_max_bf16)
        memory = (
            factor * self.hidden * self.routed_experts * 4 + 3 * n * self.routed_experts * 4
        ) / self.hbm
        return max(compute, memory) + self.launch

    def shared_experts(self, backward: bool) -> float:
        """Shared experts, as one FFN of width ``shared × expert_ffn`` over every token."""
        if self.shared == 0:
            return 0.0
        rows = np.array([float(self.tokens)])
        width = self.shared * self.expert_ffn
        time = float(self.ffn_seconds(rows, width, backward)[()]) + self.launch
        return time + self._recomputed(
            backward, float(self.ffn_seconds(rows, width, False)[()]), 0.0
        )

    def dense_ffn_seconds(self, backward: bool) -> float:
        rows = np.array([float(self.tokens)])
        time = float(self.ffn_seconds(rows, self.dense_ffn, backward)[()]) + self.launch
        forward = float(self.ffn_seconds(rows, self.dense_ffn, False)[()])
        return time + self._recomputed(backward, forward, 0.0)

    def experts(self, rows: npt.ArrayLike, backward: bool) -> npt.NDArray[np.float64]:
        """One grouped GEMM over a GPU's local experts with ``rows[..., e]`` tokens each
        (leading axes: one GPU each)."""
        time = self.ffn_seconds(rows, self.expert_ffn, backward) + self.launch
        return time + self._recomputed(
            backward, self.ffn_seconds(rows, self.expert_ffn, False), 0.0
        )

    def experts_weight_gradient(self, rows: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """The weight-gradient part of :meth:`experts` backward: its GEMMs cost what the
        forward's do (a split backward's ``W``)."""
        return self.ffn_seconds(rows, self.expert_ffn, False)

    def weight_gradient(self, op: str) -> float:
        """The weight-gradient part of an op's backward (``attention``, ``router``,
        ``shared_experts``, ``dense_ffn``, ``head``, ``mtp_module``; ``embedding``: 0): each
        weight GEMM's gradient costs its forward. The rest of the backward (input gradients,
        the attention core, element-wise work, recomputation) is the input-gradient part."""
        if op == "attention":
            return self._attention_projections(False)
        if op == "router":
            return self.router(False) - self.launch
        if op == "shared_experts":
            if self.shared == 0:
                return 0.0
            rows = np.array([float(self.tokens)])
            return float(self.ffn_seconds(rows, self.shared * self.expert_ffn, False)[()])
        if op == "dense_ffn":
            rows = np.array([float(self.tokens)])
            return float(self.ffn_seconds(rows, self.dense_ffn, False)[()])
        if op == "head":
            return self.head(False) - self.launch
        if op == "mtp_module":
            core = (
                self.tokens * self.costs.attention.core_flops / (self.peak_bf16 * self.att_fwd_eff)
            )
            return self.mtp_module(False) - core - self._elementwise(False) - 3 * self.launch
        if op == "embedding":
            return 0.0
        raise ValueError(f"unknown op {op!r}")

    def head(self, backward: bool) -> float:
        """Output head GEMM and the cross-entropy over the vocabulary (BF16)."""
        n = self.tokens
        factor = 2.0 if backward else 1.0
        flops = factor * 2.0 * n * self.hidden * self.vocab
        compute = (flops + factor * self.f_half_bf16) / (self.peak_bf16 * self.eff_max_bf16)
        memory = (factor * self.hidden * self.vocab * BF16 + 2 * n * self.vocab * 4) / self.hbm
        return max(compute, memory) + self.launch

    def embedding(self, backward: bool) -> float:
        """Embedding lookup (forward) or gradient scatter (backward): memory-bound."""
        n = self.tokens
        return 2 * n * self.hidden * BF16 / self.hbm + self.launch

    def mtp_module(self, backward: bool) -> float:
        """One multi-token-prediction module (DeepSeek-V3 §2.2): a projection of the 2·hidden
        concatenation back to hidden, a transformer block, and the shared output head. Its MoE
        block is priced at its activated width (shared + top-k experts as one FFN over every
        token): the module's routing is not simulated."""
        n = self.tokens
        factor = 2.0 if backward else 1.0
        proj_flops = factor * 2.0 * n * 2 * self.hidden * self.hidden
        proj = (proj_flops + factor * self.f_half) / (self.peak * self.eff_max)
        width = (self.shared + self.top_k) * self.expert_ffn
        ffn = float(self.ffn_seconds(np.array([float(n)]), width, backward)[()])
        return proj + self._attention(backward) + ffn + self.head(backward) + self.launch

    def optimizer_step(self, params: float) -> float:
        """Adam update of ``params`` parameters, memory-bound: per parameter it reads the BF16
        gradient and the FP32 master weight and two moments (14 bytes) and writes the three
        FP32 tensors and the BF16 weight (14 bytes)."""
        return ADAM_BYTES_PER_PARAM * params / self.hbm + self.launch
