"""Kernel micro-benchmarks for the kernel-level step model (run on a GPU machine, not in CI).

Each section times one kind of kernel a training framework launches in an MoE layer, with CUDA
events (``triton.testing.do_bench``, median, L2 flushed between repeats):

- FP8 GEMMs with DeepSeek-V3's fine-grained scaling (1×128 activation blocks, 128×128 weight
  blocks, FP32 scales; cuBLASLt through ``torch._scaled_mm``), per-tensor FP8 and BF16 at the
  same shapes, with all SMs and with 20 SMs left to communication kernels;
- grouped expert GEMMs (``torch._grouped_mm`` BF16, ``torch._scaled_grouped_mm`` FP8 row-wise)
  over 4 local experts;
- causal attention at MLA head dims (192 for QKᵀ, 128 for PV) and GQA 128, forward and backward;
- memory-bound kernels: copy, RMSNorm, SwiGLU, per-1×128-block FP8 quantisation (compiled),
  token permute (gather) and unpermute (scatter-add), fused Adam;
- the launch cost of a tiny kernel inside a CUDA graph and eagerly.

Writes ``$OUT/step_kernels.json`` (or stdout) and prints a summary table. Every figure is
copied, with this script named as its source, into ``moesim/cluster/kernels.py``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch
import triton.testing

dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = False
RESULTS: dict = {}
T0 = time.time()


def bench(fn, rep_ms: float = 40.0) -> float:
    """Median seconds of ``fn`` (triton's do_bench flushes L2 between repeats)."""
    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median") / 1e3


def section(name):
    def wrap(fn):
        def run():
            t = time.time()
            try:
                RESULTS[name] = fn()
            except Exception as exc:  # keep measuring the rest
                RESULTS[name] = {"error": repr(exc), "trace": traceback.format_exc()[-1500:]}
            print(f"[{time.time() - T0:6.1f}s] {name} ({time.time() - t:.1f}s)", flush=True)

        run.__name__ = fn.__name__
        return run

    return wrap


def set_carveout(sms: int) -> bool:
    """Leave ``sms`` SMs to other work in cuBLAS GEMMs (as DeepEP's kernels take 20)."""
    fn = getattr(torch._C, "_set_sm_carveout_experimental", None)
    if fn is None:
        return False
    fn(sms if sms else None)
    return True


def fp8_blockwise(m: int, k: int, n: int):
    """A (m, k) FP8 with 1×128 scales, B (k, n) FP8 with 128×128 scales, as cuBLASLt wants
    them: scale_a (m, k/128) outer-dim-major, scale_b (k/128, n/128) with B column-major."""
    a = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn).t()
    sa = torch.rand(k // 128, m, device=dev).t() + 0.5
    sb = torch.rand(n // 128, k // 128, device=dev).t() + 0.5
    return lambda: torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16)


def fp8_tensorwise(m: int, k: int, n: int):
    a = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn).t()
    one = torch.tensor(1.0, device=dev)
    return lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)


def bf16_gemm(m: int, k: int, n: int):
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=dev, dtype=torch.bfloat16).t()
    return lambda: a @ b


ALL_KINDS = (("fp8_block", fp8_blockwise), ("fp8_tensor", fp8_tensorwise), ("bf16", bf16_gemm))


def time_gemms(row: dict, m: int, k: int, n: int, kinds) -> dict:
    """``row`` with each kind's median seconds and TFLOP/s (or its error) for an m×k×n GEMM."""
    for kind, make in kinds:
        try:
            s = bench(make(m, k, n), 25.0)
            row[f"{kind}_s"] = s
            row[f"{kind}_tflops"] = 2 * m * k * n / s / 1e12
        except Exception as exc:  # report, keep measuring the rest
            row[f"{kind}_error"] = repr(exc)[:300]
    return row


# (name, K, N): DeepSeek-V3 shapes (hidden 7168, expert FFN 2048, MLA ranks 1536 / 512).
GEMM_SHAPES = [
    ("expert_up", 7168, 4096),  # gate + up fused
    ("expert_down", 2048, 7168),
    ("mla_q_b", 1536, 24576),  # 128 heads × 192
    ("mla_kv_b", 512, 32768),  # 128 heads × (128 + 128)
    ("attn_out", 16384, 7168),
    ("mla_q_a", 7168, 1536),
]
ROWS = [256, 1024, 4096, 8192, 16384, 32768]


@section("gemm")
def gemm():
    out = []
    for carve in (0, 20):
        if carve and not set_carveout(carve):
            break
        for name, k, n in GEMM_SHAPES:
            for m in ROWS if name.startswith("expert") else [4096, 16384]:
                row = {"shape": name, "m": m, "k": k, "n": n, "carveout_sms": carve}
                out.append(time_gemms(row, m, k, n, ALL_KINDS))
        set_carveout(0)
    return out


@section("gemm_backward")
def gemm_backward():
    """Input-gradient (dX = dY·W) and weight-gradient (dW = dYᵀ·X, contraction over tokens)
    GEMMs of the expert FFN, with 20 SMs left to communication."""
    out = []
    set_carveout(20)
    for rows in (1024, 4096, 8192, 16384):
        for name, m, k, n in (
            ("dgrad_up", rows, 4096, 7168),
            ("dgrad_down", rows, 7168, 2048),
            ("wgrad_up", 4096, rows, 7168),
            ("wgrad_down", 7168, rows, 2048),
        ):
            row = {"shape": name, "rows": rows, "m": m, "k": k, "n": n, "carveout_sms": 20}
            out.append(time_gemms(row, m, k, n, ALL_KINDS[::2]))
    set_carveout(0)
    return out


@section("comm_interference")
def comm_interference():
    """A copy kernel pinned to 20 persistent blocks (the SMs DeepEP's kernels hold) running
    beside a GEMM (cuBLAS with 20 SMs carved out) or a memory-bound kernel: how much each slows
    the other when they share HBM and L2."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy20(src, dst, n, BLOCK: tl.constexpr, NPROG: tl.constexpr):
        pid = tl.program_id(0)
        for start in range(pid * BLOCK, n, NPROG * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < n
            tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)

    res = {}
    n = 2**30  # 4 GiB of fp32 each way
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)

    def comm():
        copy20[(20,)](src, dst, n, BLOCK=4096, NPROG=20, num_warps=8)

    t_copy = bench(comm, 60.0)
    res["copy20_alone"] = {"bytes": 8 * n, "s": t_copy, "bytes_per_s": 8 * n / t_copy}
    set_carveout(20)
    gemm = fp8_blockwise(32768, 7168, 4096)
    x = torch.randn(16384, 7168, device=dev, dtype=torch.bfloat16)
    w = torch.ones(7168, device=dev, dtype=torch.bfloat16)
    norm = lambda: torch.nn.functional.rms_norm(x, (7168,), w)  # noqa: E731
    side = torch.cuda.Stream()
    for label, fn, nbytes in (("gemm_fp8_expert_up", gemm, 0), ("rmsnorm", norm, 4 * x.numel())):
        alone = bench(fn)
        reps = max(1, int(0.6 * t_copy / alone))
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            comm()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        beside = start.elapsed_time(end) / 1e3 / reps
        res[label] = {
            "alone_s": alone,
            "beside_copy20_s": beside,
            "slowdown": beside / alone,
            "reps": reps,
        }
        if nbytes:
            res[label]["alone_bytes_per_s"] = nbytes / alone
            res[label]["beside_bytes_per_s"] = nbytes / beside
    set_carveout(0)
    return res


COMM_SIM_SRC = r"""
extern "C" __global__ void comm_sim(const float4* __restrict__ src, float4* __restrict__ dst,
                                    long long n_vec, int iters, long long spin) {
    // One block per SM (the launch asks for most of the SM's shared memory, so no compute
    // block can share it): copy a 64 KiB chunk, then idle `spin` cycles, `iters` times.
    extern __shared__ char hold[];
    if (threadIdx.x == 0) hold[0] = 0;
    long long chunk = 4096;
    long long base = (long long)blockIdx.x * chunk;
    long long stride = (long long)gridDim.x * chunk;
    for (int it = 0; it < iters; ++it) {
        long long off = (base + (long long)it * stride) % (n_vec - chunk);
        for (long long i = threadIdx.x; i < chunk; i += blockDim.x) dst[off + i] = src[off + i];
        if (spin > 0) {
            long long t0 = clock64();
            while (clock64() - t0 < spin) { }
        }
    }
}
"""


@section("comm_resident")
def comm_resident():
    """Compute kernels beside a kernel that, like DeepEP's, holds 20 SMs alone and streams
    bytes through HBM at a chosen rate: how much the compute slows down at each rate."""
    import cupy as cp

    kern = cp.RawKernel(COMM_SIM_SRC, "comm_sim")
    smem = 200 * 1024
    kern.max_dynamic_shared_size_bytes = smem
    n_vec = 2**28  # 4 GiB of float4 each way
    src = cp.random.random(n_vec * 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    side = torch.cuda.Stream()
    cstream = cp.cuda.ExternalStream(side.cuda_stream)

    def launch(iters: int, spin: int) -> None:
        with cstream:
            kern(
                (20,),
                (1024,),
                (src, dst, cp.int64(n_vec), cp.int32(iters), cp.int64(spin)),
                shared_mem=smem,
            )

    def alone(iters: int, spin: int) -> float:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(side)
        launch(iters, spin)
        end.record(side)
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    set_carveout(20)
    x = torch.randn(16384, 7168, device=dev, dtype=torch.bfloat16)
    w = torch.ones(7168, device=dev, dtype=torch.bfloat16)
    q = torch.randn(1, 128, 4096, 192, device=dev, dtype=torch.bfloat16)
    k_ = torch.randn_like(q)
    v = torch.randn(1, 128, 4096, 128, device=dev, dtype=torch.bfloat16)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k_, v, is_causal=True)

    work = {
        "gemm_fp8_block_expert_up": fp8_blockwise(32768, 7168, 4096),
        "gemm_bf16_expert_up": bf16_gemm(32768, 7168, 4096),
        "rmsnorm_16384x7168": lambda: torch.nn.functional.rms_norm(x, (7168,), w),
        "attention_mla_fwd": attn,
    }
    res = {"rates": []}
    for spin in (0, 20000, 80000, 320000):
        it0 = 50
        t = alone(it0, spin)
        rate = 2 * 20 * it0 * 4096 * 16 / t  # bytes read + written
        row = {"spin_cycles": spin, "comm_bytes_per_s": rate, "kernels": {}}
        for name, fn in work.items():
            base = bench(fn, 30.0)
            reps = max(3, int(0.005 / base))
            iters = int(it0 * 3 * reps * base / t) + it0
            fn()
            torch.cuda.synchronize()
            launch(iters, spin)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            beside = start.elapsed_time(end) / 1e3 / reps
            row["kernels"][name] = {"alone_s": base, "beside_s": beside, "slowdown": beside / base}
        res["rates"].append(row)
    set_carveout(0)
    return res


@section("grouped_gemm")
def grouped():
    out = []
    g = 4
    for k, n in ((7168, 4096), (2048, 7168)):
        for rows in (2048, 8192, 16384):
            offs = torch.arange(1, g + 1, device=dev, dtype=torch.int32) * rows
            a = torch.randn(g * rows, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(g, n, k, device=dev, dtype=torch.bfloat16).transpose(-2, -1)
            row = {"k": k, "n": n, "rows_per_expert": rows, "experts": g}
            flops = 2 * g * rows * k * n
            try:
                s = bench(lambda a=a, w=w, offs=offs: torch._grouped_mm(a, w, offs=offs))
                row["bf16_s"], row["bf16_tflops"] = s, flops / s / 1e12
            except Exception as exc:
                row["bf16_error"] = repr(exc)[:300]
            try:
                a8 = a.to(torch.float8_e4m3fn)
                w8 = w.transpose(-2, -1).contiguous().to(torch.float8_e4m3fn).transpose(-2, -1)
                sa = torch.ones(g * rows, device=dev)
                sw = torch.ones(g, n, device=dev)

                def fn(a8=a8, w8=w8, sa=sa, sw=sw, offs=offs):
                    return torch._scaled_grouped_mm(
                        a8, w8, sa, sw, offs=offs, out_dtype=torch.bfloat16
                    )

                s = bench(fn)
                row["fp8_rowwise_s"], row["fp8_rowwise_tflops"] = s, flops / s / 1e12
            except Exception as exc:
                row["fp8_rowwise_error"] = repr(exc)[:300]
            out.append(row)
    return out


@section("attention")
def attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = []
    cases = [
        ("mla", 4096, 128, 192, 128),
        ("mla_pad_v", 4096, 128, 192, 192),
        ("gqa128", 4096, 64, 128, 128),
        ("gqa128_8k", 8192, 32, 128, 128),
    ]
    for name, seq, heads, qk, v_dim in cases:
        q = torch.randn(1, heads, seq, qk, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, heads, seq, qk, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, heads, seq, v_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
        # Causal: half of QKᵀ (qk dims) and PV (v dims).
        flops_f = 2 * seq * seq * heads * (qk + v_dim) / 2
        for backend in (
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
        ):
            row = {
                "case": name,
                "seq": seq,
                "heads": heads,
                "qk_dim": qk,
                "v_dim": v_dim,
                "backend": backend.name,
            }
            try:
                with sdpa_kernel([backend]):
                    f = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                        q, k, v, is_causal=True
                    )
                    o = f()
                    g = torch.randn_like(o)
                    tf = bench(f)

                    def fb():
                        o = torch.nn.functional.scaled_dot_product_attention(
                            q, k, v, is_causal=True
                        )
                        o.backward(g)

                    tfb = bench(fb)
                row.update(
                    fwd_s=tf,
                    bwd_s=tfb - tf,
                    fwd_tflops=flops_f / tf / 1e12,
                    bwd_tflops=2.5 * flops_f / (tfb - tf) / 1e12,
                )
            except Exception as exc:
                row["error"] = repr(exc)[:300]
            out.append(row)
            q.grad = k.grad = v.grad = None
    return out


@section("memory_bound")
def memory_bound():
    res = {}
    n_tok, d = 16384, 7168
    x = torch.randn(n_tok, d, device=dev, dtype=torch.bfloat16)
    big = torch.empty(2**31, dtype=torch.uint8, device=dev)
    big2 = torch.empty_like(big)
    s = bench(lambda: big2.copy_(big))
    res["copy"] = {"bytes": 2 * big.numel(), "s": s, "bytes_per_s": 2 * big.numel() / s}
    big = big2 = None  # free 4 GiB before the rest
    w = torch.ones(d, device=dev, dtype=torch.bfloat16)
    s = bench(lambda: torch.nn.functional.rms_norm(x, (d,), w))
    res["rmsnorm"] = {"bytes": 2 * x.numel() * 2, "s": s, "bytes_per_s": 4 * x.numel() / s}
    ffn = 2048 * 4
    h = torch.randn(n_tok, 2 * ffn, device=dev, dtype=torch.bfloat16)

    def swiglu(h=h):
        a, b = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(a) * b

    for label, fn in (("swiglu_eager", swiglu), ("swiglu_compiled", torch.compile(swiglu))):
        try:
            s = bench(fn)
            nbytes = h.numel() * 2 + h.numel()  # read 2f, write f (bf16)
            res[label] = {"bytes": nbytes, "s": s, "bytes_per_s": nbytes / s}
        except Exception as exc:
            res[label] = {"error": repr(exc)[:300]}

    def quant(x=x):
        blocks = x.view(n_tok, d // 128, 128).float()
        amax = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4)
        scale = 448.0 / amax
        return (blocks * scale).to(torch.float8_e4m3fn).view(n_tok, d), (1.0 / scale).squeeze(-1)

    for label, fn in (("quant_1x128_eager", quant), ("quant_1x128_compiled", torch.compile(quant))):
        try:
            s = bench(fn)
            nbytes = x.numel() * 2 + x.numel() + n_tok * d // 128 * 4
            res[label] = {"bytes": nbytes, "s": s, "bytes_per_s": nbytes / s}
        except Exception as exc:
            res[label] = {"error": repr(exc)[:300]}
    # Permute: gather 8 copies of each of 4096 tokens' rows into expert order; unpermute:
    # weighted scatter-add back.
    tokens, top_k = 4096, 8
    src = torch.randn(tokens, d, device=dev, dtype=torch.bfloat16)
    idx = torch.randperm(tokens * top_k, device=dev) % tokens
    s = bench(lambda: src.index_select(0, idx))
    nbytes = 2 * idx.numel() * d * 2
    res["permute_gather"] = {"bytes": nbytes, "s": s, "bytes_per_s": nbytes / s}
    rows = torch.randn(tokens * top_k, d, device=dev, dtype=torch.bfloat16)
    dst = torch.zeros(tokens, d, device=dev, dtype=torch.bfloat16)
    s = bench(lambda: dst.index_add_(0, idx, rows))
    nbytes = rows.numel() * 2 + 2 * idx.numel() * d * 2
    res["unpermute_scatter_add"] = {"bytes": nbytes, "s": s, "bytes_per_s": nbytes / s}
    # Fused Adam over FP32 master weights and moments with FP32 grads.
    n_par = 2**27
    p = [torch.randn(n_par, device=dev, requires_grad=True)]
    p[0].grad = torch.randn(n_par, device=dev)
    opt = torch.optim.Adam(p, lr=1e-4, fused=True)
    s = bench(opt.step)
    nbytes = n_par * 4 * (4 + 3)  # read p, g, m, v; write p, m, v
    res["adam_fused_fp32"] = {"params": n_par, "bytes": nbytes, "s": s, "bytes_per_s": nbytes / s}
    return res


@section("launch")
def launch():
    s_buf = torch.zeros(1, device=dev)
    eager = bench(lambda: s_buf.add_(1.0), 20.0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(100):
            s_buf.add_(1.0)
    graph = bench(g.replay, 20.0) / 100
    return {"tiny_kernel_eager_s": eager, "tiny_kernel_in_graph_s": graph}


def main():
    RESULTS["device"] = torch.cuda.get_device_name(0)
    RESULTS["torch"] = torch.__version__
    RESULTS["cuda"] = torch.version.cuda
    RESULTS["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    chosen = sys.argv[1].split(",") if len(sys.argv) > 1 else None
    runs = (
        gemm,
        gemm_backward,
        comm_interference,
        comm_resident,
        grouped,
        attention,
        memory_bound,
        launch,
    )
    for run in runs:
        if chosen is None or run.__name__ in chosen:
            run()
    text = json.dumps(RESULTS, indent=1)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "step_kernels.json"), "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    for row in [*RESULTS.get("gemm", []), *RESULTS.get("gemm_backward", [])]:
        if isinstance(row, dict) and "shape" in row:
            print(
                row["shape"],
                row["m"],
                row["carveout_sms"],
                *(f"{k}={row[k]:.0f}" for k in row if k.endswith("tflops")),
                *(f"{k}" for k in row if k.endswith("error")),
            )
    for sec in ("grouped_gemm", "attention"):
        for row in RESULTS.get(sec, []):
            print(
                sec,
                {
                    k: (round(v, 1) if isinstance(v, float) and v > 1 else v)
                    for k, v in row.items()
                    if not k.endswith("_s")
                },
            )
    for k, v in (RESULTS.get("memory_bound") or {}).items():
        print(k, v)
    print(RESULTS.get("launch"))
    print(RESULTS.get("comm_interference"))
    cr = RESULTS.get("comm_resident") or {}
    for row in cr.get("rates", []):
        print(
            f"comm {row['comm_bytes_per_s'] / 1e12:.2f} TB/s:",
            {k: round(v["slowdown"], 3) for k, v in row["kernels"].items()},
        )
    if "error" in cr:
        print(cr)


if __name__ == "__main__":
    main()
