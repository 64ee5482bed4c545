"""Our kernels compiled for Hopper (sm_90) on this CPU, with the ptxas inside the Triton wheel: no shipped
config may spill registers or need more shared memory than an H100 block has (227 KB).

The compiles run in a subprocess (`bench/compile.py`): this test process may already have set
TRITON_INTERPRET=1 for tests/test_kernels*.py (all modules are imported before any test runs), and
kernels imported under the interpreter cannot compile for a GPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def compiler_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def toolchain_missing() -> str:
    """Why Triton cannot compile for NVIDIA here ('' when it can)."""
    out = subprocess.run([sys.executable, "-c", "from lm.kernels.compile_check import toolchain_missing as m; "
                          "print(m() or '')"], cwd=ROOT, env=compiler_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def compile_table(tmp_path, *args):
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile.py"), "--arch", "90", "--jobs", "2",
                           "--out", str(out), *args], cwd=ROOT, env=compiler_env(), capture_output=True,
                          text=True, timeout=600)
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def toolchain():
    why = toolchain_missing()
    if why:  # only a Triton without its CUDA backend or ptxas: the one reason this cannot run
        pytest.skip(why)


# Our launches, captured on CPU tensors (never run), bound by each kernel's binder for sm_90 beside the
# binding of kernels.compile_check.launch(spec): the signature, constexprs and divisibility hints, which
# with the options make Triton's cache key, so bench/gpu.py's compile stage warms what the stages launch.
LAUNCHES = r'''
import sys

import torch

from lm.kernels import compile_check as cc
from lm.kernels import flash_attention as fa
from lm.kernels import layer_norm as ln

captured = {}
ln.check_device = lambda *tensors: None  # CPU tensors: the launches are captured, never run


def capture(name, kernel):
    def run(*args, grid, warmup, **kwargs):
        captured[name] = (args, kwargs)
    kernel.run = run


for name, k in (("fwd", fa._attn_fwd), ("dkdv", fa._attn_bwd_dkdv), ("dq", fa._attn_bwd_dq),
                ("delta", fa._attn_bwd_delta), ("ln_fwd", ln._ln_fwd), ("ln_bwd", ln._ln_bwd)):
    capture(name, k)

B, H, T, D = 2, 16, 1000, 64
KV, DOCS = int(sys.argv[1]), sys.argv[2] == "docs"
g = torch.Generator().manual_seed(0)
q = torch.randn(B, H, T, D, generator=g).bfloat16().requires_grad_()
k, v = (torch.randn(B, KV, T, D, generator=g).bfloat16().requires_grad_() for _ in range(2))
segments = torch.zeros(B, T, dtype=torch.int32) if DOCS else None
fa._FlashAttention.apply(q, k, v, segments, True, 0.0, D ** -0.5, 0).backward(torch.randn(B, H, T, D).bfloat16())
x = torch.randn(16384, 768, generator=g).bfloat16().requires_grad_()
w = torch.ones(768, dtype=torch.bfloat16, requires_grad=True)
ln.layer_norm(x, w, torch.zeros_like(w, requires_grad=True)).backward(torch.randn(16384, 768).bfloat16())

config = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
flags = dict(group=H // KV, docs=DOCS, T=T, H=H)
specs = {"fwd": cc.Spec("fwd", "bf16", D, (64, 64, 4, 2), **flags),
         "dkdv": cc.Spec("dkdv", "bf16", D, (64, 64, 4, 2), **flags),
         "dq": cc.Spec("dq", "bf16", D, (64, 64, 4, 2), **flags),
         "delta": cc.Spec("delta", "bf16", D, T=T, H=H),
         "ln_fwd": cc.Spec("ln_fwd", "bf16", 768, T=16384), "ln_bwd": cc.Spec("ln_bwd", "bf16", 768, T=16384)}
bad = []
for name, spec in specs.items():
    fn, args, kwargs = cc.launch(spec)
    real_args, real_kwargs = captured[name]
    if name in ("fwd", "dkdv", "dq"):
        real_kwargs = {**real_kwargs, **config}  # what the autotuner adds
    if name == "ln_bwd":
        real_args = real_args[:10] + (args[10],)  # rows per program: the CPU run splits rows 4 ways
    ours, theirs = cc.bind(fn, args, kwargs)[1:], cc.bind(fn, real_args, real_kwargs)[1:]
    if ours != theirs:
        bad.append((name, ours, theirs))
print("\n".join(map(str, bad)) or "same")
sys.exit(1 if bad else 0)
'''


@pytest.mark.parametrize("kv_heads,docs", [(16, "plain"), (4, "docs")])
def test_compile_specs_bind_like_the_real_launches(toolchain, kv_heads, docs):
    out = subprocess.run([sys.executable, "-c", LAUNCHES, str(kv_heads), docs], cwd=ROOT, env=compiler_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "same", out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.slow
def test_hopper_configs_neither_spill_nor_overflow_shared_memory(toolchain, tmp_path):
    """Every shipped bf16 config of the forward, dK/dV and dQ kernels at head dims 64 and 128 (causal, the
    production path), and the norm kernels at the narrowest and widest rows."""
    proc, report = compile_table(tmp_path, "--dtypes", "bf16", "--dims", "64,128", "--features", "causal",
                                 "--kernels", "fwd,dkdv,dq,norm", "--norm-n", "768,16384")
    rows = report["rows"]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"fwd", "dkdv", "dq", "ln_fwd", "ln_bwd"}, kernels
    bad = [(r["kernel"], r["dim"], r["config"], r.get("error") or f"{r['spill']} B spilled, {r['shared']} B shared")
           for r in rows if not r.get("ok")]
    assert not bad, bad
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for r in rows:
        assert 0 < r["regs"] <= 255 and r["shared"] <= 227 * 1024
        if r["kernel"] in ("fwd", "dkdv", "dq"):
            assert r["mma"] == "wgmma", r  # Hopper tensor cores, not FMA loops
