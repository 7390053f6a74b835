"""Kernel pricing: seconds of one GPU kernel from its shape, precision and the SMs it gets.

A layer's pass is the sequence of kernels a training framework launches; each is priced here on
its own model (see ``docs/model/compute.md``):

- **GEMM** ``(m, k, n)`` at a precision: ``max((F + F_half) / R(s), bytes / B) + launch`` with
  ``F = 2mkn``. ``R(s)``, the throughput with ``s`` of the GPU's ``S`` SMs, is
  ``min(eff · peak · s / S, ceiling · peak)``: GEMMs scale with the SMs they get until the
  chip's power and clock limit (the ceiling) binds. ``F_half`` is the fixed cost (ramp, tail
  wave) in FLOP. A grouped GEMM (routed experts) pads each expert's rows to the tile height and
  pays ``F_half`` once.
- **Attention core** (flash attention): FLOP over the measured flash-attention throughput for
  the head dims, pro-rated to the SMs left by communication.
- **Memory-bound kernels** (norms, SwiGLU, RoPE, casts and FP8 quantisation, permutes, the
  optimizer): bytes read plus written over the achievable HBM bandwidth, times the kernel's
  measured fraction of a plain copy's bandwidth.

Constants come from ``benchmarks/device/step_kernels.py`` run on one H200 SXM (raw figures in
``benchmarks/device/results/h200_step_kernels.json``); the GPU-level ones live in
:mod:`moesim.scenario.presets`, the kernel-relative ones below.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moesim import units
from moesim.scenario.schema import Gpu

Array = npt.NDArray[np.float64]

# Row tile of Hopper grouped GEMMs: each expert's rows are padded to a multiple of it (DeepGEMM's
# contiguous layout aligns every expert segment to the 128-row M block;
# github.com/deepseek-ai/DeepGEMM, m_grouped_fp8_gemm_nt_contiguous).
GEMM_TILE_ROWS = 128
# FP8 fine-grained scaling: one FP32 scale per 1×128 activation block (DeepSeek-V3 §3.3.2,
# arXiv 2412.19437).
FP8_BLOCK = 128
FP32 = 4

# Achieved bandwidth of each memory-bound kernel kind relative to a device-to-device copy
# (4.24 TB/s on the H200), measured by benchmarks/device/step_kernels.py (memory_bound):
MEMORY_KIND_FRACTION = {
    "copy": 1.0,
    # torch.nn.functional.rms_norm over 16384 × 7168 BF16: 2.76 TB/s.
    "rmsnorm": 2.76 / 4.24,
    # silu(a)·b compiled into one kernel: 4.26 TB/s (at the copy rate).
    "swiglu": 1.0,
    # 1×128-block FP8 quantisation compiled into one kernel: 4.03 TB/s.
    "quantise": 4.03 / 4.24,
    # Row gather (token permute into expert order; unpermute is the same gather back): the
    # source fits in L2, so it ran above the copy rate; capped at the copy rate.
    "permute": 1.0,
    # torch.optim.Adam(fused=True) over FP32 parameters, gradients and moments: 3.43 TB/s.
    "adam": 3.43 / 4.24,
}
# Flash attention throughput at MLA head dims (QKᵀ 192 = 128 + 64 RoPE, PV 128) relative to
# head dim 128, causal, 4096 tokens (cuDNN SDPA on H200: forward 600 vs 585 TFLOP/s, backward
# 408 vs 444).
MLA_ATTENTION_FACTOR = (600.0 / 585.0, 408.0 / 444.0)
# FlashAttention-2 (arXiv 2307.08691): the backward does 2.5× the forward's matmul FLOP
# (it recomputes the score matrix).
ATTENTION_BACKWARD_FLOPS = 2.5


@dataclass(frozen=True)
class Kernel:
    """One kernel of a pass over one micro-batch on one GPU."""

    op: str
    """The engine op it belongs to (``attention``, ``shared_experts``, ``routed_experts``…)."""
    phase: str
    """``forward``, ``backward_input`` or ``backward_weight``."""
    name: str
    kind: str
    """``gemm``, ``grouped_gemm``, ``attention`` or ``memory``."""
    flops: float
    bytes: float
    seconds: float
    recompute: bool = False
    """Forward work redone in the backward (activation recomputation)."""


class KernelPricer:
    """Prices kernels on one GPU model with ``comm_sms`` SMs held by communication kernels."""

    def __init__(self, gpu: Gpu, comm_sms: int) -> None:
        share = (gpu.sms - comm_sms) / gpu.sms
        self.sm_share = share
        self.rate = {
            "bf16": min(gpu.bf16_gemm_efficiency * share, gpu.bf16_gemm_ceiling)
            * gpu.peak_flops("bf16"),
        }
        self.half = {"bf16": units.GIGA * gpu.bf16_gemm_half_gflop}
        if gpu.fp8_tflops is not None:
            self.rate["fp8"] = min(
                gpu.fp8_gemm_efficiency * share, gpu.fp8_gemm_ceiling
            ) * gpu.peak_flops("fp8")
            self.half["fp8"] = units.GIGA * gpu.fp8_gemm_half_gflop
        self.hbm = gpu.hbm_bytes_per_s * gpu.memory_efficiency
        self.launch = units.microseconds(gpu.kernel_launch_us)
        self.attention_rate = (
            gpu.attention_fwd_efficiency * share * gpu.peak_flops("bf16"),
            gpu.attention_bwd_efficiency * share * gpu.peak_flops("bf16"),
        )

    def gemm_seconds(
        self, flops: Array | float, nbytes: Array | float, precision: str, gemms: Array | float = 1
    ) -> Array:
        """Seconds of ``gemms`` GEMM launches doing ``flops`` in all and moving ``nbytes``
        (zero FLOP: nothing launched)."""
        flops = np.asarray(flops, dtype=np.float64)
        compute = (flops + np.asarray(gemms) * self.half[precision]) / self.rate[precision]
        time = np.maximum(compute, np.asarray(nbytes) / self.hbm)
        return np.where(flops > 0, time + self.launch * np.asarray(gemms), 0.0)

    def memory_seconds(self, nbytes: Array | float, kind: str) -> Array:
        """Seconds of a memory-bound kernel moving ``nbytes`` (read + written)."""
        nbytes = np.asarray(nbytes, dtype=np.float64)
        time = nbytes / (self.hbm * MEMORY_KIND_FRACTION[kind])
        return np.where(nbytes > 0, time + self.launch, 0.0)

    def attention_seconds(self, flops: float, backward: bool, mla: bool) -> float:
        rate = self.attention_rate[1 if backward else 0]
        if mla:
            rate *= MLA_ATTENTION_FACTOR[1 if backward else 0]
        return flops / rate + self.launch


def quantise_bytes(elements: Array | float) -> Array:
    """Bytes a BF16 → FP8 (1×128 block scales) cast moves: read BF16, write FP8 and scales."""
    e = np.asarray(elements, dtype=np.float64)
    return e * (2 + 1) + e / FP8_BLOCK * FP32
