"""Our Triton kernels beside PyTorch's on one GPU: attention TFLOP/s and LayerNorm GB/s.

    python bench/kernel_speed.py [--out bench/results/kernel_speed.json] [--quick]

Attention: causal, bf16, B*T = 16k tokens, H*D = 2048, against F.scaled_dot_product_attention with the
flash, cuDNN and memory-efficient backends (a backend that raises is skipped and the reason recorded).
FLOPs = 4*B*H*T^2*D, halved for causal; forward+backward counts 3.5x the forward (backward = 2.5x, the
FlashAttention-2 benchmark's convention, so the numbers compare with its published ones).
LayerNorm: bf16, M = 4096 rows, GB/s of activations read and written (x, y forward; x, dy, dx backward),
against F.layer_norm, torch.compile(F.layer_norm) and a device-to-device copy.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TOKENS, WIDTH = 16384, 2048
ATTN_T = (1024, 2048, 4096, 8192, 16384)
ATTN_D = (64, 128)
LN_M = 4096
LN_N = (768, 1024, 2048, 4096, 8192, 16384)


def bench_ms(fn, grads=()):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads))


def try_ms(fn, grads=()):
    """(milliseconds, None) or (None, why it failed)."""
    try:
        fn()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        return bench_ms(fn, grads), None
    except Exception as e:  # a backend that does not support this shape, dtype or GPU
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def attention_impls():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lm.kernels.flash_attention import flash_attention

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return run

    return {
        "triton": lambda q, k, v: flash_attention(q, k, v, causal=True),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
    }


def bench_attention(Ts, Ds):
    rows = []
    impls = attention_impls()
    for D in Ds:
        for T in Ts:
            B, H = TOKENS // T, WIDTH // D
            q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            do = torch.randn_like(q)
            flops = 4 * B * H * T * T * D * 0.5
            for name, fn in impls.items():
                fwd_ms, fwd_err = try_ms(lambda: fn(q, k, v))
                both_ms, both_err = try_ms(lambda: fn(q, k, v).backward(do), grads=(q, k, v))
                rows.append(dict(B=B, H=H, T=T, D=D, impl=name,
                                 fwd_ms=fwd_ms, fwd_tflops=fwd_ms and flops / fwd_ms / 1e9,
                                 fwd_bwd_ms=both_ms, fwd_bwd_tflops=both_ms and 3.5 * flops / both_ms / 1e9,
                                 error=fwd_err or both_err))
            del q, k, v, do
    return rows


def bench_layer_norm(Ns):
    from lm.kernels.layer_norm import layer_norm

    compiled = torch.compile(F.layer_norm)
    impls = {
        "triton": lambda x, w, b: layer_norm(x, w, b, 1e-5),
        "torch": lambda x, w, b: F.layer_norm(x, (x.size(-1),), w, b, 1e-5),
        "torch_compile": lambda x, w, b: compiled(x, (x.size(-1),), w, b, 1e-5),
    }
    rows = []
    for N in Ns:
        x = torch.randn(LN_M, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.ones(N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b = torch.zeros(N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        act = x.numel() * x.element_size()
        for name, fn in impls.items():
            fwd_ms, fwd_err = try_ms(lambda: fn(x, w, b))
            both_ms, both_err = try_ms(lambda: fn(x, w, b).backward(dy), grads=(x, w, b))
            rows.append(dict(M=LN_M, N=N, impl=name, fwd_ms=fwd_ms, fwd_gbs=fwd_ms and 2 * act / fwd_ms / 1e6,
                             fwd_bwd_ms=both_ms, fwd_bwd_gbs=both_ms and 5 * act / both_ms / 1e6,
                             error=fwd_err or both_err))
    return rows


def copy_gbs() -> float:
    x = torch.empty(LN_M * max(LN_N), device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / bench_ms(lambda: y.copy_(x)) / 1e6


def ratio(a, b):
    return f"{a / b:5.2f}" if a and b else "  -  "


def fmt(v, width=8):
    return f"{v:{width}.1f}" if v else f"{'-':>{width}}"


def print_attention(rows):
    print("\nattention, causal bf16: TFLOP/s (ratio = ours / sdpa_flash)")
    print(f"{'D':>4} {'T':>6} {'impl':<15} {'fwd':>8} {'fwd+bwd':>8} {'fwd x':>6} {'f+b x':>6}  note")
    base = {(r["D"], r["T"]): r for r in rows if r["impl"] == "sdpa_flash"}
    for r in rows:
        ref = base[(r["D"], r["T"])]
        print(f"{r['D']:>4} {r['T']:>6} {r['impl']:<15} {fmt(r['fwd_tflops'])} {fmt(r['fwd_bwd_tflops'])} "
              f"{ratio(r['fwd_tflops'], ref['fwd_tflops']):>6} "
              f"{ratio(r['fwd_bwd_tflops'], ref['fwd_bwd_tflops']):>6}  {r['error'] or ''}")


def print_layer_norm(rows, copy):
    print(f"\nLayerNorm bf16, M={LN_M}: GB/s (device copy {copy:.0f} GB/s; ratio = ours / F.layer_norm)")
    print(f"{'N':>6} {'impl':<15} {'fwd':>8} {'fwd+bwd':>8} {'fwd x':>6} {'f+b x':>6}  note")
    base = {r["N"]: r for r in rows if r["impl"] == "torch"}
    for r in rows:
        ref = base[r["N"]]
        print(f"{r['N']:>6} {r['impl']:<15} {fmt(r['fwd_gbs'])} {fmt(r['fwd_bwd_gbs'])} "
              f"{ratio(r['fwd_gbs'], ref['fwd_gbs']):>6} {ratio(r['fwd_bwd_gbs'], ref['fwd_bwd_gbs']):>6}"
              f"  {r['error'] or ''}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kernel_speed.json")
    p.add_argument("--quick", action="store_true", help="T = 1k, 4k and N = 1024, 8192 only")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernel_speed.py needs a CUDA GPU: the Triton kernels are measured compiled; nothing to do.")
        return 0
    sys.path.insert(0, str(ROOT))
    import triton

    Ts, Ns = ((1024, 4096), (1024, 8192)) if args.quick else (ATTN_T, LN_N)
    attention = bench_attention(Ts, ATTN_D)
    print_attention(attention)
    copy = copy_gbs()
    layernorm = bench_layer_norm(Ns)
    print_layer_norm(layernorm, copy)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  copy_gbs=copy, attention=attention, layernorm=layernorm)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
