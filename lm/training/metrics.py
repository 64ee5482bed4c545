"""Where training metrics go: `metrics.jsonl` in the run directory, and wandb when enabled."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lm.config.schema import Config


# Dense peak FLOP/s by device name and dtype (vendor datasheets, without sparsity). MFU is reported only
# for devices listed here; on CPUs there is no entry and no MFU.
PEAK_FLOPS = {
    ("H100", "bfloat16"): 989e12, ("H100", "float16"): 989e12, ("H100", "float32"): 67e12,
    ("H100 PCIe", "bfloat16"): 756e12, ("H100 PCIe", "float16"): 756e12, ("H100 PCIe", "float32"): 51e12,
    ("H200", "bfloat16"): 989e12, ("H200", "float16"): 989e12, ("H200", "float32"): 67e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float16"): 312e12, ("A100", "float32"): 19.5e12,
    ("L4", "bfloat16"): 121e12, ("L4", "float16"): 121e12, ("L4", "float32"): 30e12,
}


def peak_flops(device, dtype: str) -> float | None:
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    matches = [(key, v) for key, v in PEAK_FLOPS.items() if key[1] == dtype and key[0] in name]
    return max(matches, key=lambda kv: len(kv[0][0]))[1] if matches else None  # the most specific name


def _step(line: str) -> int | None:
    """A record's step; None for a line that is not a whole JSON record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


class MetricsLog:
    """Written by rank 0 only (`enabled`); the other ranks' calls do nothing."""

    def __init__(self, run_dir: Path, cfg: Config, resume_step: int | None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.start = time.perf_counter()
        self.wandb = None
        self.failed = False  # a write failed: metrics.jsonl is left as it was
        if not enabled:
            return
        if resume_step is not None:
            self._drop_after(resume_step)  # steps after the checkpoint are trained again
        elif self.path.exists():
            self.path.unlink()
        if cfg.log.wandb:
            import wandb  # optional: imported only when asked for

            self.wandb = wandb.init(project=cfg.log.wandb_project, name=cfg.log.run_name or Path(run_dir).name,
                                    config=cfg.to_dict(), dir=str(run_dir), resume="allow")

    def _drop_after(self, step: int):
        """Keep the records up to the checkpoint's step; drop the later ones (trained again) and a line
        torn by a kill mid-write. Rewritten atomically: a second kill loses nothing."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step(line) is not None and _step(line) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, record: dict):
        if not self.enabled:
            return
        record = {**record, "wall_s": round(time.perf_counter() - self.start, 3)}  # since this process began
        if not self.failed:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                # A disk that fills or turns read-only mid-run: training goes on (the console still shows
                # progress), and the next checkpoint save says in one line whether the run can continue.
                self.failed = True
                print(f"warning: {self.path}: cannot write ({e.strerror or e}); metrics from step "
                      f"{record.get('step')} on go to the console only", file=sys.stderr)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k not in ("step", "wall_s")}, step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
