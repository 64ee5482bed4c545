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
    out = subprocess.run([sys.executable, "-c", "from kernels.compile_check import toolchain_missing as m; "
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
