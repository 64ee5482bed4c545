"""The training loop: one process on a CPU or one GPU.

Every step's data is a function of the global sample index, and a checkpoint holds the weights, the
optimizer, every RNG state and that index, so a resumed run repeats the uninterrupted one bit for bit.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data_prep import DataError, TokenReader
from lm import checkpoint
from lm.config import Config, ConfigError, to_toml
from lm.data import SampleStream, ensure_prepared
from lm.hf import check_hf_shape, load_hf_weights, read_hf_config
from lm.metrics import MetricsLog
from lm.model import GPT
from lm.optim import build_optimizer, lr_at


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); one line for the user."""


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast where the device supports it ("auto"), else full fp32 (weights stay fp32 either way)."""
    if dtype == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        use_bf16 = dtype == "bfloat16"
    if use_bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False):
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world > 1:
            raise ConfigError(f"WORLD_SIZE = {world}: this version trains in one process "
                              "(torchrun --nproc_per_node=1); multi-process FSDP comes with lm/parallel.py")
        self.cfg = cfg
        self.device = pick_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.autocast = autocast_for(self.device, cfg.train.dtype)
        self.run_dir = Path(cfg.train.out_dir)

        data_dir = ensure_prepared(cfg.data, show_progress=cfg.log.progress)
        self.train_reader = TokenReader(data_dir, "train")
        self.tokenizer_file = data_dir / self.train_reader.meta["tokenizer"]["file"]
        self._resolve_vocab(data_dir)
        has_val = "val" in self.train_reader.meta["splits"]
        self.val_reader = TokenReader(data_dir, "val") if has_val else None
        self.train_stream = SampleStream(self.train_reader, cfg.model.block_size, cfg.train.seed,
                                         f"{data_dir} train split")
        self.val_stream = SampleStream(self.val_reader, cfg.model.block_size, cfg.train.seed + 1,
                                       f"{data_dir} val split") if has_val else None
        if has_val:  # UTF-8 bytes per token of the val split, to report loss in bits per byte
            split = self.train_reader.meta["splits"]["val"]
            self.val_bytes_per_token = split["bytes"] / split["tokens"]

        torch.manual_seed(cfg.train.seed)
        self.model = GPT(cfg.model).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.step, self.samples = 0, 0  # completed optimizer steps, samples consumed
        self.last_val_loss = None
        self._start(resume)

    def _resolve_vocab(self, data_dir: Path):
        vocab = self.train_reader.vocab_size
        if self.cfg.model.vocab_size == 0:
            self.cfg.model.vocab_size = vocab
        elif self.cfg.model.vocab_size < vocab:
            raise ConfigError(f"model.vocab_size = {self.cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary of {vocab} in {data_dir / 'meta.json'}")

    def _start(self, resume: bool):
        found = checkpoint.checkpoints(self.run_dir)
        if found and not resume:
            raise checkpoint.CheckpointError(
                f"{self.run_dir}: already holds checkpoints; pass --resume to continue it, "
                "or choose another train.out_dir")
        if resume and found:
            ckpt = found[-1]
            checkpoint.check_shape(ckpt, checkpoint.load_config(ckpt), self.cfg)
            checkpoint.load_model(ckpt, self.model)
            state = checkpoint.load_train_state(ckpt)
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.samples = state["step"], state["samples"]
            self.last_val_loss = state.get("val_loss")
            torch.set_rng_state(state["rng_cpu"])
            if self.device.type == "cuda" and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], self.device)
            print(f"resumed from {ckpt} at step {self.step}", flush=True)
        else:
            if resume:
                print(f"--resume: {self.run_dir} has no checkpoint yet, starting from step 0", flush=True)
            if self.cfg.init.from_:
                self._init_weights(self.cfg.init.from_)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(to_toml(self.cfg))
        self.metrics = MetricsLog(self.run_dir, self.cfg, resume_step=self.step if resume else None)

    def _init_weights(self, source: str):
        """Start from pretrained weights (init.from): a checkpoint of ours or a HF GPT-2 directory."""
        if source.startswith("hf:"):
            directory = Path(source[3:])
            check_hf_shape(directory, read_hf_config(directory), self.cfg.model)
            load_hf_weights(directory, self.model)
        else:
            ckpt = checkpoint.resolve(source)
            checkpoint.check_shape(ckpt, checkpoint.load_config(ckpt), self.cfg)
            checkpoint.load_model(ckpt, self.model)
        print(f"initialized weights from {source}", flush=True)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the same eval_iters validation batches every time, so evaluations compare."""
        self.model.eval()
        b = self.cfg.train.batch_size
        losses = []
        for i in range(self.cfg.train.eval_iters):
            x, y = self.val_stream.batch(i * b, b, self.device)
            with self.autocast():
                losses.append(self.model(x, y)[1].float())
        self.model.train()
        return torch.stack(losses).mean().item()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss, grad norm, lr)."""
        t, o = self.cfg.train, self.cfg.optim
        lr = lr_at(self.step, o, t.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(t.grad_accum):
            x, y = self.train_stream.batch(self.samples, t.batch_size, self.device)
            self.samples += t.batch_size
            with self.autocast():
                _, loss = self.model(x, y)
            (loss / t.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum / t.grad_accum, grad_norm, lr

    def save(self, loss: float):
        if not math.isfinite(loss):
            raise TrainingError(f"non-finite loss {loss} at step {self.step}: not saved; the newest good "
                                f"checkpoint is kept in {self.run_dir / checkpoint.CKPT_DIR}")
        state = {"optimizer": self.optimizer.state_dict(), "step": self.step, "samples": self.samples,
                 "val_loss": self.last_val_loss, "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        meta = {"samples": self.samples, "train_loss": loss, "val_loss": self.last_val_loss,
                "params": self.model.num_params()}
        return checkpoint.save(self.run_dir, self.step, self.model, state, self.cfg, meta, self.tokenizer_file,
                               keep=self.cfg.train.keep_checkpoints)

    def log_eval(self, bar):
        if self.val_stream is None:
            return
        val = self.evaluate()
        self.last_val_loss = val
        bpb = val / math.log(2) / self.val_bytes_per_token
        self.metrics.write({"step": self.step, "val_loss": val, "val_bpb": bpb})
        bar.write(f"step {self.step}: val loss {val:.4f} nats/token, {bpb:.4f} bits/byte")

    def run(self, stop_at_step: int | None = None) -> dict:
        """Train to train.max_steps, or stop early after `stop_at_step` with a checkpoint written."""
        t, lg = self.cfg.train, self.cfg.log
        tokens_per_step = t.batch_size * t.grad_accum * self.cfg.model.block_size
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not lg.progress, unit="step", dynamic_ncols=True)
        bar.write(f"model: {self.model.num_params():,} parameters; {self.device}; "
                  f"{tokens_per_step:,} tokens/step; run dir {self.run_dir}")
        if self.step == 0:
            self.log_eval(bar)
        window_start, window_steps, loss = time.perf_counter(), 0, float("nan")
        try:
            while self.step < t.max_steps:
                loss_t, grad_norm, lr = self.train_step()
                window_steps += 1
                bar.update(1)
                last = self.step == t.max_steps
                if self.step % lg.interval == 0 or last:
                    loss = loss_t.item()
                    if not math.isfinite(loss):
                        raise TrainingError(f"non-finite loss {loss} at step {self.step}; lower optim.lr or "
                                            f"resume from {self.run_dir / checkpoint.CKPT_DIR}")
                    elapsed = time.perf_counter() - window_start
                    tok_s = window_steps * tokens_per_step / elapsed
                    self.metrics.write({"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                                        "tokens_per_s": tok_s, "samples": self.samples})
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                    window_start, window_steps = time.perf_counter(), 0
                stopping = self.step == stop_at_step
                if self.step % t.eval_interval == 0 or last:
                    self.log_eval(bar)
                    self.save(loss_t.item())
                    window_start, window_steps = time.perf_counter(), 0
                elif stopping:
                    self.save(loss_t.item())
                if stopping:
                    break
        finally:
            bar.close()
            self.metrics.close()
        return {"step": self.step, "train_loss": loss, "val_loss": self.last_val_loss,
                "val_bpb": (self.last_val_loss / math.log(2) / self.val_bytes_per_token
                            if self.last_val_loss is not None else None)}


__all__ = ["Trainer", "TrainingError", "DataError"]
