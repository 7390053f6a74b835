"""Calibration micro-benchmark for the compute cost model (run on a GPU machine, not in CI).

Measures, with CUDA events, the throughput of the kernels moesim's roofline model prices:
- BF16 and FP8 GEMMs of expert shapes as the number of rows (tokens per expert) grows, which
  gives the efficiency curve eff(rows) = eff_max * rows / (rows + rows_half);
- causal flash attention (torch SDPA) at training shapes;
- a device-to-device copy, which gives the achievable fraction of HBM bandwidth;
- an empty-ish kernel, which gives the launch overhead.
Prints JSON; the figures are copied, with this script named as their source, into
``moesim/scenario/presets.py``.
"""

import json
import sys

import torch

torch.backends.cuda.matmul.allow_tf32 = False
dev = torch.device("cuda")


def timed(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def gemm_curve(dtype_name, k, n, rows_list):
    out = []
    for m in rows_list:
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        if dtype_name == "bf16":
            bt = b.t()
            fn = lambda: torch.matmul(a, bt)  # noqa: E731
        else:
            a8 = a.to(torch.float8_e4m3fn)
            b8 = b.to(torch.float8_e4m3fn).t()
            one = torch.tensor(1.0, device=dev)
            fn = lambda: torch._scaled_mm(
                a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16
            )  # noqa: E731
        reps = 50 if m < 1024 else 20
        t = timed(fn, warmup=5, reps=reps)
        out.append({"rows": m, "k": k, "n": n, "seconds": t, "tflops": 2 * m * k * n / t / 1e12})
    return out


def main():
    res = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
    }
    rows = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    shapes = [(7168, 2048), (2048, 7168), (4096, 14336), (2048, 1408)]
    for dt in ("bf16", "fp8"):
        for k, n in shapes:
            try:
                res[f"gemm_{dt}_{k}x{n}"] = gemm_curve(dt, k, n, rows)
            except Exception as exc:  # report, keep measuring the rest
                res[f"gemm_{dt}_{k}x{n}"] = str(exc)
            print(dt, k, n, file=sys.stderr, flush=True)
    # Attention: causal SDPA, bf16, forward only and forward+backward.
    att = []
    for seq, heads, hd in ((4096, 128, 128), (4096, 32, 128), (2048, 16, 128)):
        q = torch.randn(1, heads, seq, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k_ = torch.randn_like(q, requires_grad=True)
        v = torch.randn_like(q, requires_grad=True)
        f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k_, v, is_causal=True)  # noqa: E731
        tf = timed(f)

        def fb():
            o = torch.nn.functional.scaled_dot_product_attention(q, k_, v, is_causal=True)
            o.backward(torch.ones_like(o))

        tfb = timed(fb)
        flops_f = 4 * seq * seq * hd * heads / 2  # causal: half of QK^T and PV
        att.append(
            {
                "seq": seq,
                "heads": heads,
                "head_dim": hd,
                "fwd_s": tf,
                "fwd_bwd_s": tfb,
                "fwd_tflops": flops_f / tf / 1e12,
                "fwd_bwd_tflops": 3.5 * flops_f / tfb / 1e12,
            }
        )
    res["attention"] = att
    # HBM: device-to-device copy of 4 GiB (read + write counted).
    x = torch.empty(2**31, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x))
    res["copy_bytes_per_s"] = 2 * x.numel() / t
    # Element-wise (read 1, write 1) bf16 kernel, a norm-like memory-bound op.
    z = torch.randn(2**28, device=dev, dtype=torch.bfloat16)
    t = timed(lambda: torch.mul(z, 1.5))
    res["elementwise_bytes_per_s"] = 2 * z.numel() * 2 / t
    # Launch overhead: a tiny kernel, timed back to back.
    s = torch.zeros(1, device=dev)
    res["tiny_kernel_s"] = timed(lambda: s.add_(1.0), warmup=100, reps=2000)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
