"""Shared Triton plumbing: interpreter detection, device checks, autotune config lists."""
from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its Python interpreter (TRITON_INTERPRET=1).

    `triton.jit` reads this when a kernel is decorated, i.e. when our kernel modules are imported.
    """
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    return os.environ.get("TRITON_INTERPRET") == "1" or bool(getattr(runtime, "interpret", False))


INTERPRET = interpreting()


def check_device(*tensors: torch.Tensor) -> None:
    """CUDA tensors run compiled; CPU tensors only through the interpreter."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and INTERPRET:
            continue
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got a {t.device.type} tensor); CPU tensors run only "
            "under the Triton interpreter: set TRITON_INTERPRET=1 before importing triton")


def configs(gpu: list[dict], interpreter: dict) -> list[triton.Config]:
    """Autotune candidates: the GPU list, or the single config the interpreter can handle (autotuning
    more than one config needs a driver)."""
    if INTERPRET:
        return [triton.Config(interpreter, num_warps=4, num_stages=1)]
    return [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                          num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in gpu]
