"""Hardware catalogue: GPU specifications a scenario can name instead of spelling out.

Every value is a vendor specification (or a vendor figure quoted by a third party), never a
measured training outcome. ``cluster.gpu: H800`` resolves to the entry below; any field can be
overridden in the scenario (``cluster.gpu: {preset: H800, hbm_tbytes_per_s: 3.0}``).

Sources:
- [DS] NVIDIA data sheets as quoted by glennklockwood.com processor pages.
- [DSV3] DeepSeek-V3 technical report, arXiv 2412.19437 (H800 NVLink 400 GB/s).
- "nvlink_gbytes_per_s" is the per-GPU aggregate of both directions, as vendors quote it.
- [MB] moesim's own micro-benchmark ``benchmarks/device/gpu_kernels.py`` run on one H200 SXM
  (PyTorch 2.11, CUDA 13; raw figures in ``benchmarks/device/results/h200_gpu_kernels.json``):
  GEMMs of expert shapes (K×N = 7168×2048, 2048×7168, 4096×14336, 2048×1408; 8–32768 rows) fitted
  to t = max((F + F_half)/(peak·eff_max), floor): BF16 eff_max 0.77, F_half 5.75 GFLOP; FP8
  eff_max 0.69, F_half 7.94 GFLOP. Causal SDPA at 4096 tokens, 128 heads × 128: forward 603
  TFLOP/s (0.61 of 989), backward ≈ 455 TFLOP/s (0.46). Device-to-device copy 4.24 TB/s (0.88 of
  4.8). Back-to-back tiny kernels: 11.5 µs each (eager launch overhead).
  H100 and H800 share the H200's SM, tensor cores and clocks, so the fractions carry over.
  A100 and B200 were not measured: they use the same fractions, an unverified assumption.
"""

from __future__ import annotations

from typing import Any

from moesim import units

# Efficiency fractions [MB]; see the module docstring for what was measured.
_MEASURED_EFFICIENCY: dict[str, Any] = {
    "bf16_gemm_efficiency": 0.77,
    "fp8_gemm_efficiency": 0.69,
    "bf16_gemm_half_gflop": 5.75,
    "fp8_gemm_half_gflop": 7.94,
    "attention_fwd_efficiency": 0.61,
    "attention_bwd_efficiency": 0.46,
    "memory_efficiency": 0.88,
    "kernel_launch_us": 11.5,
}

GPU_PRESETS: dict[str, dict[str, Any]] = {
    # A100 80GB SXM [DS]: 312 TFLOP/s BF16 dense, no FP8 tensor cores, 2.039 TB/s HBM2e,
    # NVLink3 600 GB/s, 108 SMs.
    "A100": {
        "name": "A100-80GB-SXM",
        "bf16_tflops": 312.0,
        "fp8_tflops": None,
        "hbm_gib": units.gigabytes_in_gib(80),
        "hbm_tbytes_per_s": 2.039,
        "nvlink_gbytes_per_s": 600.0,
        "sms": 108,
        **_MEASURED_EFFICIENCY,
    },
    # H100 SXM [DS]: 989.4 TFLOP/s BF16 dense, 1979 FP8 dense, 80 GB HBM3 at 3.35 TB/s,
    # NVLink4 900 GB/s, 132 SMs.
    "H100": {
        "name": "H100-SXM",
        "bf16_tflops": 989.4,
        "fp8_tflops": 1979.0,
        "hbm_gib": units.gigabytes_in_gib(80),
        "hbm_tbytes_per_s": 3.35,
        "nvlink_gbytes_per_s": 900.0,
        "sms": 132,
        **_MEASURED_EFFICIENCY,
    },
    # H800 SXM: H100 compute [DS]; NVLink cut to 400 GB/s [DSV3]; HBM as H100 (unverified).
    "H800": {
        "name": "H800-SXM",
        "bf16_tflops": 989.0,
        "fp8_tflops": 1979.0,
        "hbm_gib": units.gigabytes_in_gib(80),
        "hbm_tbytes_per_s": 3.35,
        "nvlink_gbytes_per_s": 400.0,
        "sms": 132,
        **_MEASURED_EFFICIENCY,
    },
    # H200 SXM [DS]: H100 compute, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s, 132 SMs.
    "H200": {
        "name": "H200-SXM",
        "bf16_tflops": 989.0,
        "fp8_tflops": 1979.0,
        "hbm_gib": units.gigabytes_in_gib(141),
        "hbm_tbytes_per_s": 4.8,
        "nvlink_gbytes_per_s": 900.0,
        "sms": 132,
        **_MEASURED_EFFICIENCY,
    },
    # B200 HGX [DS]: 2250 TFLOP/s BF16 dense, 4500 FP8 dense, 192 GB at 8 TB/s, NVLink5
    # 1800 GB/s, 148 SMs (SM count unverified).
    "B200": {
        "name": "B200-HGX",
        "bf16_tflops": 2250.0,
        "fp8_tflops": 4500.0,
        "hbm_gib": units.gigabytes_in_gib(192),
        "hbm_tbytes_per_s": 8.0,
        "nvlink_gbytes_per_s": 1800.0,
        "sms": 148,
        **_MEASURED_EFFICIENCY,
    },
}
