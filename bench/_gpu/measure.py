"""What every stage shares: the context it runs in, one timer, the FLOP and byte formulas (the only
place they are written down), and helpers for the stages that launch training processes."""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


class Skip(Exception):
    """The stage cannot run here (no CUDA GPU outside --smoke): reported as skipped, not as a crash."""


@dataclass
class Ctx:
    smoke: bool  # toy sizes on the CPU, Triton kernels through the interpreter
    work: Path  # scratch shared by all stages of one run: prepared data, run directories

    @property
    def device(self) -> torch.device:
        if self.smoke or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda")

    def require_gpu(self):
        if not self.smoke and self.device.type != "cuda":
            raise Skip("no CUDA GPU (run with --smoke for the CPU check of this script)")

    def pick(self, gpu, smoke):
        """The GPU-size or the smoke-size value of a setting."""
        return smoke if self.smoke else gpu


# ---------------------------------------------------------------- formulas

ATTN_PASS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
LN_PASS_TENSORS = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}


def attention_flops(B: int, H: int, T: int, D: int, causal: bool, mode: str) -> float:
    """4·B·H·T²·D for QKᵀ and PV, halved when causal; the backward counts 2.5x the forward and
    forward+backward 3.5x (FlashAttention-2's benchmark convention, so the figures compare with the
    published ones in /work/shared/GUIDE.md; bench/kernel_speed.py counts the same way)."""
    return 4 * B * H * T * T * D * (0.5 if causal else 1.0) * ATTN_PASS_FACTOR[mode]


def layer_norm_bytes(M: int, N: int, element_size: int, mode: str) -> float:
    """Activation bytes a LayerNorm over M rows of N must move: forward reads x and writes y; backward
    reads x and dy and writes dx (weights, bias, mean and rstd are negligible at these sizes)."""
    return LN_PASS_TENSORS[mode] * M * N * element_size


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbs(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def flops_per_token(n_params: int, n_layer: int, n_embd: int, block_size: int) -> float:
    """Model FLOPs per trained token, as lm/training/trainer.py and lm/training/plan.py count them: 6·N (N counts the tied
    head once) + 12·L·h·s for attention's QKᵀ and PV, forward and backward."""
    return 6 * n_params + 12 * n_layer * n_embd * block_size


def mfu(tokens_per_s: float, fpt: float, peak: float | None) -> float | None:
    """Model FLOPs utilization against lm.training.metrics.PEAK_FLOPS (None where the device has no entry)."""
    return tokens_per_s * fpt / peak if peak else None


def peak_bf16(device: torch.device) -> float | None:
    from lm.training.metrics import peak_flops

    return peak_flops(device, "bfloat16")


def ratio(a, b):
    return a / b if a and b else None


# ---------------------------------------------------------------- timing

def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: torch.device, warmup: int = 3, reps: int = 10, flush_l2: bool = True) -> float:
    """Median milliseconds of `fn()` over `reps` calls after `warmup` calls (compilation and autotuning
    happen there). On a GPU each call is timed with its own pair of CUDA events and, as
    triton.testing.do_bench does, L2 is flushed before it (a 256 MB write outside the timed span), so
    small tensors are not read from cache. On the CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    scratch = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if flush_l2 else None
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        if scratch is not None:
            scratch.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


# ---------------------------------------------------------------- processes

def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first found first. torchrun starts its workers
    in sessions of their own, so a process-group kill would miss them."""
    parent = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier]
        found += children
        frontier = children
    return found


def kill_tree(proc: subprocess.Popen):
    """SIGKILL a process we started and everything it started (by their ids)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def child_env(smoke: bool) -> dict:
    """Environment for processes the stages start: the repo importable, output unbuffered; on the
    smoke run the CPU only and Triton's interpreter."""
    # TRITON_CACHE_AUTOTUNING: a stage's autotune results go to Triton's cache, and later stages (and
    # their train.py processes) reuse them instead of benchmarking every config again
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_CACHE_AUTOTUNING="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if smoke:  # one thread each: on a small shared CPU, OpenMP threads waiting on each other cost 50x
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def python_cmd(*args) -> list[str]:
    return [sys.executable, *map(str, args)]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line still being written
            pass
    return records


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()] \
        if path.exists() else []
    return lines[-1][:200] if lines else ""
