"""The training loop, for one process or N under torchrun (FSDP2).

Every micro-batch is a slice of one global sample stream, addressed by the global sample index; a
checkpoint holds the weights, the optimizer, every rank's RNG state and that index. So a resumed run
repeats the uninterrupted one bit for bit, and a run resumed on another number of ranks continues the
same stream. Stability (skips, loss scaling, rollback), evaluation and initialization live in their own
modules; this one wires them and runs the steps.
"""
from __future__ import annotations

import contextlib
import math
import resource
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data_prep import DataError, TokenReader
from data_prep.fileio import atomic_write_bytes
from lm.training import checkpoint, checkpoint_save, plan
from lm.data.augment import Augmenter, parse_augment
from lm.config.load import to_toml
from lm.config.schema import Config, ConfigError
from lm.data.batches import SampleStream
from lm.training.ewc import EWC, EWC_FILE, estimate_fisher
from lm.training.freeze import Freezing
from lm.training.initialize import adopt_shape
from lm.training.metrics import MetricsLog, peak_flops
from lm.objectives import build_objective, objective_class
from lm.training.optim import LRSchedule, build_optimizer
from lm.training.parallel import build_model, close_world, init_world, mean_across_ranks, resolved_dtype
from lm.compress.prune import MASKS_FILE, Masks
from lm.training.stability import Stability


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. non-finite losses with nothing to roll back to); one line for the user."""


def pick_device(name: str, local_rank: int) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, last_good: bool = False):
        """`resume`: continue from the newest checkpoint in train.out_dir; `last_good`: if the newest is
        damaged, from the newest intact one."""
        objective_class(cfg).check_combinations(cfg)
        adopt_shape(cfg)  # init.from's shape, unless the config asks for another (refused)
        self._join(cfg)
        # the objective: the data, batches, loss and validation (lm/objectives/); it records in cfg.model what
        # the model computes with (the vocabulary, document masks)
        self.objective = build_objective(self)
        self.tokenizer_file = self.objective.tokenizer_file
        self.evaluator = self.objective.evaluator

        torch.manual_seed(cfg.train.seed + self.world.rank)  # dropout differs across ranks
        self.model = build_model(cfg, self.world, self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.schedule = LRSchedule(cfg.optim, cfg.train.max_steps)
        self.stability = Stability(cfg.stability, fp16=self.dtype == "float16")
        self.freezing = Freezing(cfg.continual.freeze)
        self.step, self.samples = 0, 0  # completed optimizer steps, global samples consumed
        self.stop_signal = False  # set by SIGTERM/SIGINT on this rank; acted on only through the step's vote
        self.prefetcher = self.objective.batches(cfg.train.batch_size, self.device)
        self.augment = Augmenter(parse_augment(cfg.data.augment), self.objective.vocab_size, self.objective.eos,
                                 cfg.train.seed, keep_documents=cfg.model.document_eos >= 0) \
            if cfg.data.augment else None
        self.trainable: list[torch.nn.Parameter] | None = None  # parameters that train now (see freezing)
        resumed = self._start(resume, last_good)
        self.ewc = self._setup_ewc(resumed) if cfg.continual.ewc_batches else None
        self.masks = self._pruning_masks(resumed)
        self.objective.started()

    # ---- set-up -------------------------------------------------------------------------------------
    def _join(self, cfg: Config):
        """This process's part of the run: the process group, device, threads, compute dtype, run dir."""
        self.cfg = cfg
        self.world = init_world(cfg.train.device)
        self.device = pick_device(cfg.train.device, self.world.local_rank)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.dtype = resolved_dtype(cfg, self.device)
        self.run_dir = Path(cfg.train.out_dir)

    def _setup_ewc(self, resumed: bool) -> EWC:
        """theta* and F from this run's ewc.pt on resume; else estimated now, at the starting weights."""
        c, path = self.cfg.continual, self.run_dir / EWC_FILE
        if resumed and path.is_file():
            return EWC.load(path, self.model, c.ewc_lambda)
        directory = Path(c.ewc_data or next(d for r, _, d in self.objective.sources if r == "replay"))
        stream = SampleStream(TokenReader(directory, "train"), self.cfg.model.block_size, self.cfg.train.seed + 2,
                              f"{directory} train split")
        fisher = estimate_fisher(self.model, stream, c.ewc_batches, self.cfg.train.batch_size, self.world.rank,
                                 self.world.size, c.ewc_labels, self.cfg.train.seed, self._autocast)
        ewc = EWC.start(self.model, fisher, c.ewc_lambda, c.ewc_prior, c.ewc_gamma)
        ewc.save(path, self.world.main)
        self._print(f"EWC: Fisher from {c.ewc_batches} batches of {directory} ({c.ewc_labels} labels), "
                    f"lambda {c.ewc_lambda:g}; saved to {path}")
        return ewc

    def _pruning_masks(self, resumed: bool) -> Masks | None:
        """Magnitude-pruning masks (lm.prune) stay fixed: from this run's copy on resume, else from the
        init.from directory, copied into the run directory."""
        own = self.run_dir / MASKS_FILE
        source = None
        if resumed:
            source = own if own.is_file() else None
        elif self.cfg.init.from_ and not self.cfg.init.from_.startswith("hf:"):
            found = checkpoint.resolve(self.cfg.init.from_) / MASKS_FILE
            source = found if found.is_file() else None
        if source is None:
            return None
        masks = Masks.load(source)
        if source != own and self.world.main:
            masks.save(own)
        masks.apply(self.model)
        self._print(f"pruning masks from {source}: {sum(int((~m).sum()) for m in masks.masks.values()):,} weights "
                    "held at zero")
        return masks

    def _start(self, resume: bool, last_good: bool) -> bool:
        """Restore the newest checkpoint, or start a new run (from init.from when set). Returns whether
        a checkpoint was restored."""
        if not resume and checkpoint.step_dirs(self.run_dir):  # damaged ones count: never overwrite them
            raise checkpoint.CheckpointError(
                f"{self.run_dir}: already holds checkpoints; pass --resume to continue it, "
                "or choose another train.out_dir")
        ckpt = checkpoint.find_resumable(self.run_dir, last_good) if resume else None
        if ckpt is not None:
            newer = [p.name for p in checkpoint.step_dirs(self.run_dir) if p.name > ckpt.name]
            if newer:  # --resume-from-last-good passed over damaged checkpoints
                self._print(f"skipping damaged checkpoint(s) {', '.join(newer)}; continuing from {ckpt}")
            self._keep_global_batch(ckpt)
            self._restore(ckpt, keep_data_cursor=False)
            self._print(f"resumed from {ckpt} at step {self.step}")
        else:
            if resume:
                self._print(f"--resume: {self.run_dir} has no checkpoint yet, starting from step 0")
            if self.cfg.init.from_:
                self._initial_weights()
                self._print(f"initialized weights from {self.cfg.init.from_}")
        error = None
        try:  # rank 0 writes the run directory; every rank learns whether it could
            if self.world.main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(self.run_dir / "config.toml", to_toml(self.cfg).encode())
            self.metrics = MetricsLog(self.run_dir, self.cfg, resume_step=self.step if ckpt else None,
                                      enabled=self.world.main)
        except OSError as e:
            error = (f"train.out_dir = {self.run_dir}: cannot write there ({e.strerror or e}); a run writes its "
                     "config, metrics and checkpoints to it: choose a writable directory")
        checkpoint_save.raise_if_any(error)
        return ckpt is not None

    def _keep_global_batch(self, ckpt: Path):
        """A run resumed on another number of ranks keeps its global batch (batch_size is per rank): when
        the config leaves batch_size and grad_accum as they were, grad_accum absorbs the change, or the
        resume is refused when it cannot do so exactly. Old and new global batch are printed either way."""
        saved, ranks = checkpoint.load_config(ckpt).train, checkpoint.load_info(ckpt)["world_size"]
        t, world = self.cfg.train, self.world.size
        old = ranks * saved.batch_size * saved.grad_accum
        if ranks == world and (t.batch_size, t.grad_accum) == (saved.batch_size, saved.grad_accum):
            return
        if ranks != world and (t.batch_size, t.grad_accum) == (saved.batch_size, saved.grad_accum):
            if old % (world * t.batch_size):
                raise ConfigError(
                    f"--resume on {world} ranks: the checkpoint's global batch of {old} sequences ({ranks} ranks x "
                    f"batch_size {saved.batch_size} x grad_accum {saved.grad_accum}) is not a multiple of "
                    f"{world} ranks x batch_size {t.batch_size}; set train.batch_size and train.grad_accum so "
                    f"that ranks x batch_size x grad_accum = {old} (or another global batch, on purpose)")
            t.grad_accum = old // (world * t.batch_size)
        new = world * t.batch_size * t.grad_accum
        self._print(f"global batch: {old} sequences in {ckpt.name} ({ranks} x {saved.batch_size} x "
                    f"{saved.grad_accum}), {new} now ({world} ranks x batch_size {t.batch_size} x grad_accum "
                    f"{t.grad_accum})")

    def _restore(self, ckpt: Path, keep_data_cursor: bool):
        saved = checkpoint.load_config(ckpt)
        self.objective.check_checkpoint(ckpt, saved)
        checkpoint.check_shape(ckpt, saved, self.cfg)
        checkpoint.check_optimizer(ckpt, saved, self.cfg)
        # Only parameters that trained at some step before the checkpoint have optimizer state in it: freeze
        # the others, and drop state made since (a rollback across a phase that unfroze layers).
        step = checkpoint.load_info(ckpt)["step"]
        self.freezing.apply(self.model, self.freezing.frozen_throughout(step))
        self.trainable = None
        self.optimizer.state.clear()
        info = checkpoint.load_training(ckpt, self.model, self.optimizer)
        self.step = info["step"]
        if not keep_data_cursor:
            self.samples = info["samples"]
        self.stability.load_state_dict(info)
        self.evaluator.start = info.get("val_start", {})
        self.evaluator.last_loss, self.evaluator.last_step = info["val_loss"], info.get("val_step")
        self.schedule.load_state_dict(info["schedule"])
        self.objective.load_state_dict(info)

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
        (or, when enabled, whose loss spikes) never reaches the weights: it is skipped and counted.
        Returns the step's numbers and `stop`, the ranks' common decision to stop after it."""
        t = self.cfg.train
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # optim.layer_decay's per-layer factor
        if self.freezing.apply(self.model, self.freezing.frozen_blocks(self.step)) or self.trainable is None:
            self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        scale = self.stability.loss_scale
        per_micro = self.world.size * t.batch_size  # global samples per micro-step
        self.objective.begin_step(self.samples, per_micro * t.grad_accum)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum):
            first = self.samples + micro * per_micro + self.world.rank * t.batch_size
            x, y = self.prefetcher.batch(first, next_first=first + per_micro)  # the next micro-step's, or step's
            x, y = self.objective.inputs(x, y)
            if self.augment:
                x = self.augment(x, first)
            if self.world.distributed:  # reduce-scatter gradients only on the last micro-step
                self.model.set_requires_gradient_sync(micro == t.grad_accum - 1)
            with self._autocast():
                loss = self.objective.loss(self.model, x, y)
            (loss * scale / t.grad_accum).backward()
            loss_sum += loss.detach()
        self.samples += per_micro * t.grad_accum
        # One collective carries the mean loss and the stop votes. Every rank decides on the reduced vote
        # only: a signal that lands after it is carried to the next step's vote, never acted on alone.
        packed = mean_across_ranks(torch.stack([loss_sum / t.grad_accum,
                                                torch.tensor(float(self.stop_signal), device=self.device)]))
        if scale != 1.0:
            torch._foreach_mul_([p.grad for p in self.trainable], 1.0 / scale)
        penalty = self.ewc.add_gradient(self.model) if self.ewc else None
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.optim.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP: the norm over every shard
            grad_norm = grad_norm.full_tensor()
        loss_f, votes, norm_f = torch.cat([packed, grad_norm.reshape(1).to(packed.dtype)]).tolist()  # one sync
        stop = votes > 0
        reason = self.stability.verdict(loss_f, norm_f)
        if reason is None:
            self.optimizer.step()
            if self.masks:
                self.masks.apply(self.model)
        self.stability.record(reason, loss_f)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss_f, "grad_norm": norm_f, "lr": lr, "skipped": reason, "ewc_penalty": penalty,
                "stop": stop}

    def _rollback(self):
        """After rollback_after non-finite steps in a row: reload the newest checkpoint, keep reading
        new data (the batches that broke the run are not replayed), and lower the lr by
        rollback_lr_factor once more for every rollback."""
        found = checkpoint.checkpoints(self.run_dir)
        if not found:
            raise TrainingError(f"{self.stability.bad_in_a_row} non-finite steps in a row at step {self.step} "
                                f"and no checkpoint in {self.run_dir} to roll back to; "
                                f"{self.stability.why_unrecoverable()}")
        st = self.stability
        skipped, rollbacks, scale, loss_scale = st.skipped, st.rollbacks, self.schedule.scale, st.loss_scale
        self._restore(found[-1], keep_data_cursor=True)
        # the loss scale the run has learned stays: the checkpoint's older, larger one would overflow again
        st.skipped, st.rollbacks, st.loss_scale = skipped, rollbacks + 1, loss_scale
        self.schedule.scale = scale * self.cfg.stability.rollback_lr_factor
        self._print(f"rolled back to {found[-1]} (rollback {self.stability.rollbacks}); "
                    f"lr scale {self.schedule.scale:g}")

    def _initial_weights(self):
        self.objective.initial_weights(self.model, self.optimizer)

    # ---- evaluation and checkpoints -----------------------------------------------------------------
    def save(self, train_loss: float) -> Path:
        info = {"samples": self.samples, "world_size": self.world.size, **self.stability.state_dict(),
                "schedule": self.schedule.state_dict(), "train_loss": train_loss,
                "val_loss": self.evaluator.last_loss, "val_step": self.evaluator.last_step, "params": self.num_params,
                "val_start": self.evaluator.start, **self.objective.state_dict()}
        path = checkpoint_save.save(self.run_dir, self.step, self.model, self.optimizer, info, self.cfg,
                               self.tokenizer_file, keep_last=self.cfg.train.keep_checkpoints,
                               keep_every=self.cfg.train.keep_every)
        self.objective.after_save(path)
        return path

    @property
    def num_params(self) -> int:
        return self.model.num_params()  # DTensors report their global size

    def log_eval(self, bar) -> bool:
        """Evaluate and log; returns whether the objective stops the run early."""
        if not self.evaluator.active:
            return False
        record = self.evaluator.evaluate(self.model, self.step)
        self.schedule.observe_val_loss(record["val_loss"])
        note, stop = self.objective.after_eval(record, self.step)
        self.metrics.write(record)
        if self.world.main:
            bar.write(f"step {self.step}: {self.evaluator.summary(record)}{note}")
        if stop:
            self._print(stop)
        return stop is not None

    # ---- the loop -----------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self.stop_signal = True

    def run(self, stop_at_step: int | None = None) -> dict:
        """Train to train.max_steps; or stop early (after `stop_at_step`, or at the step boundary after
        SIGTERM/SIGINT on any rank) with a checkpoint written."""
        t, lg, m = self.cfg.train, self.cfg.log, self.cfg.model
        tokens_per_step = self.world.size * t.batch_size * t.grad_accum * m.block_size
        flops_per_token = plan.flops_per_token(m)
        peak = peak_flops(self.device, self.dtype)
        ckpt_every = t.checkpoint_interval or t.eval_interval
        if (done := self.objective.finished()) is not None:  # a resumed run that had already stopped early
            self._print(done)
            self.metrics.close()
            return self._result(float("nan"))
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
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
                              f"grad norm {out['grad_norm']:.4g}); {self.stability.skipped} skipped so far")
                last = self.step == t.max_steps
                if self.step % lg.interval == 0 or last:
                    tok_s = window_steps * tokens_per_step / (time.perf_counter() - window_start)
                    self._log_step(out, tok_s, peak and tok_s * flops_per_token / (peak * self.world.size))
                    bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
                    window_start, window_steps = time.perf_counter(), 0
                if self.stability.must_roll_back:
                    self._rollback()
                    bar.reset(total=t.max_steps)
                    bar.update(self.step)
                    continue
                stopping = self.step == stop_at_step or out["stop"]
                busy = False  # evaluation and saving are not training: kept out of tokens/s
                if self.step % t.eval_interval == 0 or last:
                    stopping = bool(self.log_eval(bar)) or stopping  # True: stop early (lm.classify)
                    busy = True
                if self.step % ckpt_every == 0 or last or stopping:
                    self.save(loss)
                    busy = True
                if busy:
                    window_start, window_steps = time.perf_counter(), 0
                if stopping:
                    if out["stop"]:
                        self._print(f"stopped by signal at step {self.step}; checkpoint saved")
                    break
        finally:
            bar.close()
            self.metrics.close()
            for s, handler in handlers.items():
                signal.signal(s, handler)
        return self._result(loss)

    def _result(self, train_loss: float) -> dict:
        val = self.evaluator.last_loss
        return {"step": self.step, "train_loss": train_loss, "val_loss": val, "val_step": self.evaluator.last_step,
                "skipped": self.stability.skipped,
                "val_bpb": None if val is None else self.evaluator.bits_per_byte(val), **self.objective.result()}

    def _log_step(self, out: dict, tok_s: float, mfu: float | None):
        record = {"step": self.step, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                  "tokens_per_s": tok_s, "samples": self.samples, "skipped_steps": self.stability.skipped,
                  "peak_mem_gb": self._peak_memory_gb()}
        if mfu:
            record["mfu"] = mfu
        if self.stability.fp16:
            record["loss_scale"] = self.stability.loss_scale
        if out["ewc_penalty"] is not None:
            record["ewc_penalty"] = out["ewc_penalty"]
        self.metrics.write(record)

    def _peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB

    def close(self):
        self.prefetcher.close()
        close_world()


__all__ = ["Trainer", "TrainingError", "DataError"]
