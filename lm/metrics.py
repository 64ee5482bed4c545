"""Where training metrics go: `metrics.jsonl` in the run directory, and wandb when enabled."""
from __future__ import annotations

import json
import time
from pathlib import Path

from lm.config import Config


class MetricsLog:
    def __init__(self, run_dir: Path, cfg: Config, resume_step: int | None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.start = time.perf_counter()
        if resume_step is not None:
            self._drop_after(resume_step)  # steps after the checkpoint are trained again
        elif self.path.exists():
            self.path.unlink()
        self.wandb = None
        if cfg.log.wandb:
            import wandb  # optional: imported only when asked for

            self.wandb = wandb.init(project=cfg.log.wandb_project, name=cfg.log.run_name or Path(run_dir).name,
                                    config=cfg.to_dict(), dir=str(run_dir), resume="allow")

    def _drop_after(self, step: int):
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict):
        record = {**record, "wall_s": round(time.perf_counter() - self.start, 3)}  # since this process began
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k not in ("step", "wall_s")}, step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
