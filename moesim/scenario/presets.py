"""Hardware catalogue: GPU specifications a scenario can name instead of spelling out.

Every value is a vendor specification (or a vendor figure quoted by a third party), never a
measured training outcome. ``cluster.gpu: H800`` resolves to the entry below; any field can be
overridden in the scenario (``cluster.gpu: {preset: H800, hbm_tbytes_per_s: 3.0}``).

Sources:
- [DS] NVIDIA data sheets as quoted by glennklockwood.com processor pages.
- [DSV3] DeepSeek-V3 technical report, arXiv 2412.19437 (H800 NVLink 400 GB/s).
- "nvlink_gbytes_per_s" is the per-GPU aggregate of both directions, as vendors quote it.
- [MB] moesim's own kernel micro-benchmark ``benchmarks/device/step_kernels.py`` run on one
  H200 SXM (PyTorch 2.11, CUDA 13, cuBLASLt and cuDNN; raw figures in
  ``benchmarks/device/results/h200_step_kernels.json``):
  - GEMMs at DeepSeek-V3 expert, MLA and output shapes (256–32768 rows; forward, input- and
    weight-gradient shapes), with all 132 SMs and with 20 SMs carved out for communication,
    fitted to t = (F + F_half) / R: FP8 with 1×128 / 128×128 block scales R = 1041 TFLOP/s on
    112 SMs (0.62 of the pro-rated peak) and 1159 on 132 (0.586 of peak: the ceiling),
    F_half 11 GFLOP; BF16 R = 746 on 112 SMs (0.89 pro-rated) and 702 on 132 (0.71: BF16 is
    power-limited, it does not slow down when SMs are taken), F_half 5.5 GFLOP. Median fit
    error 5%, worst 40% (256-row GEMMs).
  - Causal flash attention (cuDNN SDPA), 4096 tokens, head dim 128: forward 585 TFLOP/s (0.592
    of 989), backward 444 (0.449, counting 2.5× the forward FLOP).
  - Device-to-device copy 4.24 TB/s (0.884 of 4.8); a tiny kernel replayed in a CUDA graph
    costs 0.95 µs.
  H100 and H800 share the H200's SM, tensor cores, clocks and 700 W limit, so the fractions
  carry over (memory-bound kernels scale with each GPU's own HBM bandwidth). A100 and B200
  were not measured: they use the same fractions, an unverified assumption.
"""

from __future__ import annotations

from typing import Any

from moesim import units

# Efficiency fractions [MB]; see the module docstring for what was measured.
_MEASURED_EFFICIENCY: dict[str, Any] = {
    "bf16_gemm_efficiency": 0.89,
    "fp8_gemm_efficiency": 0.62,
    "bf16_gemm_ceiling": 0.71,
    "fp8_gemm_ceiling": 0.586,
    "bf16_gemm_half_gflop": 5.5,
    "fp8_gemm_half_gflop": 11.0,
    "attention_fwd_efficiency": 0.592,
    "attention_bwd_efficiency": 0.449,
    "memory_efficiency": 0.884,
    "kernel_launch_us": 0.95,
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
