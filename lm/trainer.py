"""The training loop, for one process or N under torchrun (FSDP2).

Every micro-batch is a slice of one global sample stream, addressed by the global sample index; a
checkpoint holds the weights, the optimizer, every rank's RNG state and that index. So a resumed run
repeats the uninterrupted one bit for bit, and a run resumed on another number of ranks continues the
same stream.
"""
from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data_prep import DataError, TokenReader
from lm import checkpoint
from lm.config import Config, ConfigError, parse_sources, parse_val_sets, to_toml
from lm.data import MixedStream, SampleStream, check_same_tokenizer, ensure_prepared
from lm.ewc import EWC, EWC_FILE, estimate_fisher
from lm.freeze import Freezing
from lm.hf import check_hf_shape, load_hf_weights, read_hf_config
from lm.metrics import MetricsLog, peak_flops
from lm.optim import LRSchedule, build_optimizer
from lm.parallel import build_model, close_world, init_world, mean_across_ranks, resolved_dtype


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. non-finite losses with nothing to roll back to); one line for the user."""


def pick_device(name: str, local_rank: int) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False):
        self.cfg = cfg
        self.world = init_world(cfg.train.device)
        self.device = pick_device(cfg.train.device, self.world.local_rank)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.dtype = resolved_dtype(cfg, self.device)
        self.run_dir = Path(cfg.train.out_dir)

        self.sources = parse_sources(cfg.data.sources)
        if self.world.main and not self.sources:
            ensure_prepared(cfg.data, show_progress=cfg.log.progress)
        _barrier()
        dirs = [Path(d) for _, _, d in self.sources] or [Path(cfg.data.dir)]
        check_same_tokenizer(dirs)
        data_dir = dirs[0]
        self.train_reader = TokenReader(data_dir, "train")
        self.tokenizer_file = data_dir / self.train_reader.meta["tokenizer"]["file"]
        self._resolve_vocab(data_dir)
        self.train_stream = self._train_stream(dirs)
        self.val_sets = self._val_sets(data_dir)

        torch.manual_seed(cfg.train.seed + self.world.rank)  # dropout differs across ranks
        self.model = build_model(cfg, self.world, self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.schedule = LRSchedule(cfg.optim, cfg.train.max_steps)
        self.step, self.samples = 0, 0  # completed optimizer steps, global samples consumed
        self.skipped, self.bad_in_a_row, self.rollbacks = 0, 0, 0
        self.loss_scale = cfg.stability.loss_scale if self.dtype == "float16" else 1.0
        self.good_since_scale = 0
        self.recent_losses: deque[float] = deque(maxlen=cfg.stability.spike_window)
        self.last_val_loss = None
        self.stop_requested = False
        self.val_start: dict[str, float] = {}  # each val set's loss at the start: forgetting, adaptation
        self.freezing = Freezing(cfg.continual.freeze)
        self._start(resume)
        self.ewc = self._setup_ewc(resume) if cfg.continual.ewc_batches else None

    # ---- set-up -------------------------------------------------------------------------------------
    def _resolve_vocab(self, data_dir: Path):
        vocab = self.train_reader.vocab_size
        if self.cfg.model.vocab_size == 0:
            self.cfg.model.vocab_size = vocab
        elif self.cfg.model.vocab_size < vocab:
            raise ConfigError(f"model.vocab_size = {self.cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary of {vocab} in {data_dir / 'meta.json'}")

    def _train_stream(self, dirs: list[Path]):
        """One source: its own stream. Several: the interleave, whose period must divide the global batch
        so that every step holds each source's exact share."""
        seed, block = self.cfg.train.seed, self.cfg.model.block_size
        if not self.sources:
            return SampleStream(self.train_reader, block, seed, f"{dirs[0]} train split")
        # each source its own hashed order (seeds far apart from the val stream's seed + 1)
        streams = [SampleStream(TokenReader(d, "train"), block, seed + 7919 * i, f"{d} train split")
                   for i, d in enumerate(dirs)]
        stream = MixedStream(streams, [w for _, w, _ in self.sources])
        t = self.cfg.train
        batch = self.world.size * t.batch_size * t.grad_accum
        if batch % stream.mixture.period:
            raise ConfigError(f"data.sources: a global batch of {batch} samples cannot hold the weights "
                              f"exactly; make it a multiple of {stream.mixture.period}")
        return stream

    def _val_sets(self, data_dir: Path) -> dict[str, tuple[SampleStream, float]]:
        """name -> (stream over that dir's val split, UTF-8 bytes per token). The single unnamed set of a
        plain run is called "" and logged as val_loss alone."""
        named = parse_val_sets(self.cfg.data.val_sets)
        if not named and self.sources:
            roles = [r for r, _, _ in self.sources]
            named = [(r if roles.count(r) == 1 else f"{r}{i}", d) for i, (r, _, d) in enumerate(self.sources)]
        sets = {}
        for name, directory in named or [("", str(data_dir))]:
            reader = TokenReader(directory, "train")
            if "val" not in reader.meta["splits"]:
                if named:
                    raise DataError(f"{directory}: has no val split for validation set '{name}'")
                continue
            split = reader.meta["splits"]["val"]
            stream = SampleStream(TokenReader(directory, "val"), self.cfg.model.block_size, self.cfg.train.seed + 1,
                                  f"{directory} val split")
            sets[name] = (stream, split["bytes"] / split["tokens"])
        return sets

    def _setup_ewc(self, resume: bool) -> EWC:
        """theta* and F from this run's ewc.pt on resume; else estimated now, at the starting weights."""
        c, path = self.cfg.continual, self.run_dir / EWC_FILE
        if resume and path.is_file():
            return EWC.load(path, self.model, c.ewc_lambda)
        directory = Path(c.ewc_data or next(d for r, _, d in self.sources if r == "replay"))
        stream = SampleStream(TokenReader(directory, "train"), self.cfg.model.block_size, self.cfg.train.seed + 2,
                              f"{directory} train split")
        fisher = estimate_fisher(self.model, stream, c.ewc_batches, self.cfg.train.batch_size, self.world.rank,
                                 self.world.size, c.ewc_labels, self.cfg.train.seed, self._autocast)
        ewc = EWC.start(self.model, fisher, c.ewc_lambda, c.ewc_prior, c.ewc_gamma)
        ewc.save(path, self.world.main)
        self._print(f"EWC: Fisher from {c.ewc_batches} batches of {directory} ({c.ewc_labels} labels), "
                    f"lambda {c.ewc_lambda:g}; saved to {path}")
        return ewc

    def _start(self, resume: bool):
        found = checkpoint.checkpoints(self.run_dir)
        if found and not resume:
            raise checkpoint.CheckpointError(
                f"{self.run_dir}: already holds checkpoints; pass --resume to continue it, "
                "or choose another train.out_dir")
        if resume and found:
            self._restore(found[-1], keep_data_cursor=False)
            self._print(f"resumed from {found[-1]} at step {self.step}")
        else:
            if resume:
                self._print(f"--resume: {self.run_dir} has no checkpoint yet, starting from step 0")
            if self.cfg.init.from_:
                self._init_weights(self.cfg.init.from_)
        if self.world.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(self.cfg))
        self.metrics = MetricsLog(self.run_dir, self.cfg, resume_step=self.step if resume else None,
                                  enabled=self.world.main)

    def _restore(self, ckpt: Path, keep_data_cursor: bool):
        checkpoint.check_shape(ckpt, checkpoint.load_config(ckpt), self.cfg)
        # parameters frozen since the start have no optimizer state in the checkpoint: none is made here
        step = checkpoint.load_info(ckpt)["step"]
        self.freezing.apply(self.model, self.freezing.frozen_throughout(step))
        info = checkpoint.load_training(ckpt, self.model, self.optimizer)
        self.step = info["step"]
        self.val_start = info.get("val_start", {})
        if not keep_data_cursor:
            self.samples = info["samples"]
        self.skipped, self.rollbacks = info["skipped_steps"], info["rollbacks"]
        self.loss_scale, self.last_val_loss = info["loss_scale"], info["val_loss"]
        self.schedule.load_state_dict(info["schedule"])
        self.recent_losses.clear()
        self.recent_losses.extend(info["recent_losses"])

    def _init_weights(self, source: str):
        """Start from pretrained weights (init.from): a checkpoint of ours or a HF GPT-2 directory."""
        if self.world.distributed:
            raise ConfigError("init.from under torchrun: consolidate first, then start a single-process run "
                              "or resume; loading into shards is not supported yet")
        if source.startswith("hf:"):
            directory = Path(source[3:])
            check_hf_shape(directory, read_hf_config(directory), self.cfg.model)
            load_hf_weights(directory, self.model)
        else:
            ckpt = checkpoint.resolve(source)
            checkpoint.check_shape(ckpt, checkpoint.load_config(ckpt), self.cfg)
            if self.cfg.init.optimizer:  # AdamW moments too; the step, data cursor and RNG start afresh
                checkpoint.load_training(ckpt, self.model, self.optimizer)
                torch.manual_seed(self.cfg.train.seed + self.world.rank)
            else:
                checkpoint.load_model(ckpt, self.model)
        self._print(f"initialized weights from {source}")

    def _print(self, text: str):
        if self.world.main:
            tqdm.write(text)

    # ---- one step -----------------------------------------------------------------------------------
    def _autocast(self):
        # Under FSDP the MixedPrecisionPolicy casts; in one process autocast does.
        if self.world.distributed or self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.dtype))

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches. A step whose loss or gradient is not finite
        (or, when enabled, whose loss spikes) never reaches the weights: it is skipped and counted."""
        t = self.cfg.train
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.freezing.apply(self.model, self.freezing.frozen_blocks(self.step))
        per_micro = self.world.size * t.batch_size  # global samples per micro-step
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum):
            first = self.samples + micro * per_micro + self.world.rank * t.batch_size
            x, y = self.train_stream.batch(first, t.batch_size, self.device)
            if self.world.distributed:  # reduce-scatter gradients only on the last micro-step
                self.model.set_requires_gradient_sync(micro == t.grad_accum - 1)
            with self._autocast():
                _, loss = self.model(x, y)
            (loss * self.loss_scale / t.grad_accum).backward()
            loss_sum += loss.detach()
        self.samples += per_micro * t.grad_accum
        # one collective carries the mean loss and whether any rank was asked to stop
        packed = mean_across_ranks(torch.stack([loss_sum / t.grad_accum,
                                                torch.tensor(float(self.stop_requested), device=self.device)]))
        loss, stop_votes = packed[0], packed[1]
        self.stop_requested = bool(stop_votes > 0)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.loss_scale != 1.0:
            torch._foreach_mul_([p.grad for p in params], 1.0 / self.loss_scale)
        penalty = self.ewc.add_gradient(self.model) if self.ewc else None
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP: the norm over every shard
            grad_norm = grad_norm.full_tensor()
        loss_f, norm_f = loss.item(), grad_norm.item()
        reason = None
        if not (math.isfinite(loss_f) and math.isfinite(norm_f)):
            reason = "nonfinite"
        elif self._is_spike(loss_f):
            reason = "spike"
        if reason is None:
            self.optimizer.step()
            self.recent_losses.append(loss_f)
            self.bad_in_a_row = 0
            self._grow_loss_scale()
        else:
            self.skipped += 1
            self.bad_in_a_row += reason == "nonfinite"
            if self.loss_scale != 1.0 and reason == "nonfinite":
                self.loss_scale, self.good_since_scale = max(1.0, self.loss_scale / 2), 0
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss_f, "grad_norm": norm_f, "lr": lr, "skipped": reason, "ewc_penalty": penalty}

    def _is_spike(self, loss: float) -> bool:
        z, window = self.cfg.stability.spike_zscore, self.recent_losses
        if z <= 0 or len(window) < window.maxlen:
            return False
        mean = sum(window) / len(window)
        std = math.sqrt(sum((v - mean) ** 2 for v in window) / (len(window) - 1))
        return std > 0 and (loss - mean) / std > z

    def _grow_loss_scale(self):
        if self.loss_scale != 1.0:
            self.good_since_scale += 1
            if self.good_since_scale >= 1000:  # fp16: probe a larger scale after a calm stretch
                self.loss_scale, self.good_since_scale = self.loss_scale * 2, 0

    def _rollback(self):
        """After rollback_after non-finite steps in a row: reload the newest checkpoint, keep reading
        new data (the batches that broke the run are not replayed), optionally at a lower lr."""
        found = checkpoint.checkpoints(self.run_dir)
        if not found:
            raise TrainingError(f"{self.bad_in_a_row} non-finite steps in a row at step {self.step} and no "
                                f"checkpoint in {self.run_dir} to roll back to; lower optim.lr")
        skipped, rollbacks = self.skipped, self.rollbacks
        self._restore(found[-1], keep_data_cursor=True)
        self.skipped, self.rollbacks, self.bad_in_a_row = skipped, rollbacks + 1, 0
        self.schedule.scale *= self.cfg.stability.rollback_lr_factor
        self._print(f"rolled back to {found[-1]} (rollback {self.rollbacks}); lr scale {self.schedule.scale:g}")

    # ---- evaluation and checkpoints -----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, stream: SampleStream | None = None) -> float:
        """Mean loss over the same eval_iters validation batches every time, whatever the world size:
        batch i goes to rank i % world; every rank runs the same number of forwards (FSDP needs that).
        `stream`: a validation set's stream (default: the first set)."""
        stream = stream or next(iter(self.val_sets.values()))[0]
        self.model.eval()
        b, n, w = self.cfg.train.batch_size, self.cfg.train.eval_iters, self.world.size
        total = torch.zeros(2, device=self.device)
        for i in range(self.world.rank, math.ceil(n / w) * w, w):
            x, y = stream.batch((i % n) * b, b, self.device)
            with self._autocast():
                loss = self.model(x, y)[1].float()
            if i < n:
                total += torch.stack([loss, torch.ones((), device=self.device)])
        self.model.train()
        if self.world.distributed:
            dist.all_reduce(total)
        return (total[0] / total[1]).item()

    def save(self, train_loss: float) -> Path:
        info = {"samples": self.samples, "world_size": self.world.size, "skipped_steps": self.skipped,
                "rollbacks": self.rollbacks, "loss_scale": self.loss_scale, "schedule": self.schedule.state_dict(),
                "recent_losses": list(self.recent_losses), "train_loss": train_loss,
                "val_loss": self.last_val_loss, "params": self.num_params, "val_start": self.val_start}
        return checkpoint.save(self.run_dir, self.step, self.model, self.optimizer, info, self.cfg,
                               self.tokenizer_file, keep_last=self.cfg.train.keep_checkpoints,
                               keep_every=self.cfg.train.keep_every)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())  # DTensors report their global size

    def log_eval(self, bar):
        """Every validation set; the first is val_loss. With named sets, each logs val/NAME_loss and its
        change since the start of the run: forgetting (rise of "replay") and adaptation (fall of "new")."""
        if not self.val_sets:
            return
        losses = {name: self.evaluate(stream) for name, (stream, _) in self.val_sets.items()}
        first = next(iter(self.val_sets))
        val = losses[first]
        self.last_val_loss = val
        self.schedule.observe_val_loss(val)
        bpb = val / math.log(2) / self.val_sets[first][1]
        record = {"step": self.step, "val_loss": val, "val_bpb": bpb}
        if first:
            for name, loss in losses.items():
                start = self.val_start.setdefault(name, loss)
                record[f"val/{name}_loss"] = loss
                record[f"val/{name}_change"] = loss - start
            if "replay" in losses:
                record["forgetting"] = record["val/replay_change"]
            if "new" in losses:
                record["adaptation"] = -record["val/new_change"]
        self.metrics.write(record)
        if self.world.main:
            shown = ", ".join(f"{n} {v:.4f}" for n, v in losses.items()) if first else f"{val:.4f} nats/token"
            bar.write(f"step {self.step}: val loss {shown}, {bpb:.4f} bits/byte")

    # ---- the loop -----------------------------------------------------------------------------------
    def _request_stop(self, signum, frame):
        self.stop_requested = True

    def run(self, stop_at_step: int | None = None) -> dict:
        """Train to train.max_steps; or stop early (after `stop_at_step`, or at the step boundary after
        SIGTERM/SIGINT) with a checkpoint written."""
        t, lg, m = self.cfg.train, self.cfg.log, self.cfg.model
        tokens_per_step = self.world.size * t.batch_size * t.grad_accum * m.block_size
        flops_per_token = 6 * self.num_params + 12 * m.n_layer * m.n_embd * m.block_size
        peak = peak_flops(self.device, self.dtype)
        ckpt_every = t.checkpoint_interval or t.eval_interval
        handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not (lg.progress and self.world.main),
                   unit="step", dynamic_ncols=True)
        self._print(f"model: {self.num_params:,} parameters; {self.world.size} x {self.device}; {self.dtype}; "
                    f"{tokens_per_step:,} tokens/step; run dir {self.run_dir}")
        if self.step == 0:
            self.log_eval(bar)
        window_start, window_steps, loss = time.perf_counter(), 0, float("nan")
        try:
            while self.step < t.max_steps:
                out = self.train_step()
                window_steps += 1
                bar.update(1)
                if out["skipped"] is None:
                    loss = out["loss"]
                elif self.world.main:
                    bar.write(f"step {self.step}: skipped ({out['skipped']} loss {out['loss']:.4g}, "
                              f"grad norm {out['grad_norm']:.4g}); {self.skipped} skipped so far")
                last = self.step == t.max_steps
                if self.step % lg.interval == 0 or last:
                    elapsed = time.perf_counter() - window_start
                    tok_s = window_steps * tokens_per_step / elapsed
                    record = {"step": self.step, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                              "tokens_per_s": tok_s, "samples": self.samples, "skipped_steps": self.skipped,
                              "peak_mem_gb": self._peak_memory_gb()}
                    if peak:
                        record["mfu"] = tok_s * flops_per_token / (peak * self.world.size)
                    if self.loss_scale != 1.0:
                        record["loss_scale"] = self.loss_scale
                    if out["ewc_penalty"] is not None:
                        record["ewc_penalty"] = out["ewc_penalty"]
                    self.metrics.write(record)
                    bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
                    window_start, window_steps = time.perf_counter(), 0
                if self.bad_in_a_row and self.bad_in_a_row >= self.cfg.stability.rollback_after > 0:
                    self._rollback()
                    bar.reset(total=t.max_steps)
                    bar.update(self.step)
                    continue
                stopping = self.step == stop_at_step or self.stop_requested
                evaluating = self.step % t.eval_interval == 0 or last
                if evaluating:
                    self.log_eval(bar)
                if self.step % ckpt_every == 0 or last or stopping:
                    self.save(loss)
                    window_start, window_steps = time.perf_counter(), 0
                if stopping:
                    if self.stop_requested:
                        self._print(f"stopped by signal at step {self.step}; checkpoint saved")
                    break
        finally:
            bar.close()
            self.metrics.close()
            for s, handler in handlers.items():
                signal.signal(s, handler)
        return {"step": self.step, "train_loss": loss, "val_loss": self.last_val_loss, "skipped": self.skipped,
                "val_bpb": (self.last_val_loss / math.log(2) / next(iter(self.val_sets.values()))[1]
                            if self.last_val_loss is not None else None)}

    def _peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB

    def close(self):
        close_world()


__all__ = ["Trainer", "TrainingError", "DataError"]
