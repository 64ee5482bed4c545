"""Sequence classification (train.task = "classify") as an objective: batches of right-padded texts and
their labels (lm/objectives/classification_data.py), the loss F.cross_entropy(weight=class_weights) over each global batch, and
an evaluation of the validation examples (val loss, accuracy, macro-F1, per-class precision/recall/F1 and
the confusion matrix) that tracks the best value of classify.metric: the best evaluation's checkpoint is
kept as RUN/best/, and after classify.patience evaluations without a new best the run stops. The head is
lm/model/classifier.py; inference, lm/classify.py.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_prep import load_tokenizer
from data_prep.fileio import atomic_write_json
from lm.training import checkpoint
from lm.model.classifier import BEST_DIR, LABELS_FILE, class_logits, detached_head
from lm.objectives.classification_data import Batcher, ClassificationData, ExampleSampler, Examples, load_data, pad
from lm.config.schema import Config, ConfigError
from lm.training.evaluation import rank_batches
from lm.files import fsync_dir
from lm.training.initialize import load_initial_weights
from lm.objectives.base import Objective


# ---- metrics ----------------------------------------------------------------------------------------
PER_CLASS_LIMIT = 64  # up to this many classes every evaluation logs per-class metrics and the confusion matrix


def _metrics(tp, actual, predicted, labels: list[str], per_class: bool) -> dict:
    tp, actual, predicted = (np.asarray(v, dtype=np.float64) for v in (tp, actual, predicted))
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = (actual + predicted) > 0
    out = {"val/accuracy": float(tp.sum() / max(1, actual.sum())),
           "val/macro_f1": float(f1[present].mean()) if present.any() else 0.0}
    if per_class:
        for i, label in enumerate(labels):
            out[f"val/precision/{label}"] = float(precision[i])
            out[f"val/recall/{label}"] = float(recall[i])
            out[f"val/f1/{label}"] = float(f1[i])
    return out


def classification_metrics(confusion: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-F1 (over the classes that occur as truth or prediction, as scikit-learn), and per
    class precision, recall and F1 (0 where undefined) from a confusion matrix (rows true, columns
    predicted)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    out = _metrics(np.diag(confusion), confusion.sum(1), confusion.sum(0), labels, per_class=True)
    out["val/confusion"] = confusion.tolist()
    return out


def prediction_metrics(truth: np.ndarray, predicted: np.ndarray, labels: list[str]) -> dict:
    """classification_metrics of (true, predicted) class pairs; above PER_CLASS_LIMIT classes only accuracy
    and macro-F1 (counts of length C: no C x C matrix, no thousands of keys per record)."""
    C = len(labels)
    if C <= PER_CLASS_LIMIT:
        return classification_metrics(np.bincount(truth * C + predicted, minlength=C * C).reshape(C, C), labels)
    counts = [np.bincount(v, minlength=C) for v in (truth[truth == predicted], truth, predicted)]
    return _metrics(*counts, labels, per_class=False)


def metric_key(metric: str) -> str:
    return "val_loss" if metric == "val_loss" else f"val/{metric}"


class ClassifyEvaluator:
    """Scores the validation examples at every evaluation. Rank r scores a contiguous share; every rank runs
    the same number of forwards (FSDP gathers weights collectively), an idle one on a dummy row with no weight;
    the confusion counts and the loss are summed over ranks."""


    def __init__(self, val: Examples | None, labels: list[str], cfg: Config, world, device, autocast, pad_id: int):
        self.val, self.labels, self.world, self.device, self.autocast = val, labels, world, device, autocast
        self.batch_size, self.pad_id = cfg.train.batch_size, pad_id
        self.start: dict[str, float] = {}
        self.last_loss: float | None = None
        self.last_step: int | None = None

    @property
    def active(self) -> bool:
        return self.val is not None

    def bits_per_byte(self, loss: float) -> None:
        return None  # labels, not text: no bits per byte

    @torch.no_grad()
    def evaluate(self, model, step: int) -> dict:
        n = len(self.val)
        # each rank fills its rows' predictions (zeros elsewhere), so one sum over ranks gathers them all
        totals = torch.zeros(n + 1, dtype=torch.float64, device=self.device)  # predictions, loss sum
        was_training = model.training
        model.eval()
        for start, count in rank_batches(n, self.batch_size, self.world):
            rows = list(range(start, start + count)) or [0]
            ids, lengths = pad([self.val.rows[i] for i in rows], self.pad_id, self.device)
            with self.autocast():
                logits = class_logits(model, ids, lengths).float()
            if count:
                y = torch.from_numpy(self.val.labels[rows]).to(self.device)
                totals[-1] += F.cross_entropy(logits, y, reduction="sum").double()
                totals[start:start + count] = logits.argmax(-1).double()
        model.train(was_training)
        if self.world.distributed:
            dist.all_reduce(totals)
        predicted = totals[:-1].round().long().cpu().numpy()
        self.last_loss, self.last_step = totals[-1].item() / n, step
        return {"step": step, "val_loss": self.last_loss,
                **prediction_metrics(np.asarray(self.val.labels, dtype=np.int64), predicted, self.labels)}

    def summary(self, record: dict) -> str:
        line = (f"val loss {record['val_loss']:.4f}, accuracy {record['val/accuracy']:.4f}, "
                f"macro-F1 {record['val/macro_f1']:.4f}")
        if len(self.labels) > PER_CLASS_LIMIT:
            return line
        recall = " ".join(f"{label} {record[f'val/recall/{label}']:.3f}" for label in self.labels[:8])
        return f"{line}; recall {recall}{' ...' if len(self.labels) > 8 else ''}"


class BestTracker:
    """The best value of classify.metric so far (higher is better, val_loss lower), its step, and the
    evaluations since; its state travels in checkpoint.json."""

    def __init__(self, metric: str, patience: int):
        self.metric, self.patience = metric, patience
        self.value: float | None = None
        self.step: int | None = None
        self.stale = 0

    def observe(self, record: dict, step: int) -> bool:
        """Whether `record` is a new best (strictly better)."""
        value = record[metric_key(self.metric)]
        better = self.value is None or (value < self.value if self.metric == "val_loss" else value > self.value)
        if better:
            self.value, self.step, self.stale = value, step, 0
        else:
            self.stale += 1
        return better

    @property
    def exhausted(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best": self.value, "best_step": self.step, "stale": self.stale}

    def load_state_dict(self, state: dict):
        if isinstance(state, dict) and state.get("metric") == self.metric:  # another metric starts afresh
            self.value, self.step, self.stale = state.get("best"), state.get("best_step"), int(state.get("stale", 0))


def publish_best(ckpt: Path, run_dir: Path) -> Path:
    """RUN/best/: the checkpoint `ckpt` as hard links (copies where the file system has none), so pruning
    the step never deletes it; built in best.tmp and swapped in with the old one moved aside first."""
    best, tmp, old = run_dir / BEST_DIR, run_dir / f"{BEST_DIR}.tmp", run_dir / f"{BEST_DIR}.old"
    if old.exists() and not best.exists():  # a kill between the two renames: the old one goes back first
        os.replace(old, best)
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    for f in ckpt.iterdir():
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    fsync_dir(run_dir)
    if old.exists():
        shutil.rmtree(old)
    return best


def classifier_tokenizer(cfg: Config):
    """(tokenizer, its file): init.from's (the checkpoint's copy, or hf:DIR's tokenizer.json), else data.dir's."""
    source = cfg.init.from_
    if source.startswith("hf:"):
        directory = Path(source[3:])
    elif source:
        directory = checkpoint.resolve(source)
    elif (Path(cfg.data.dir) / "meta.json").is_file():
        directory = Path(cfg.data.dir)
    else:
        raise ConfigError("train.task = 'classify' takes its tokenizer from init.from (a run of ours or hf:DIR) or "
                          f"from data.dir (a prepared dataset); neither is set ({cfg.data.dir} holds no meta.json)")
    tokenizer = load_tokenizer(directory)
    return tokenizer, directory / tokenizer.file_name


class Classification(Objective):
    name = "classification (train.task = 'classify')"
    excludes = {key: "it applies to language modelling" for key in (
        "data.sources", "data.val_sets", "data.document_mask", "data.augment", "distill.teacher",
        "continual.ewc_batches", "eval.tasks", "sft.train_file")}

    def __init__(self, trainer):
        super().__init__(trainer)
        cfg = self.cfg
        tokenizer, self.tokenizer_file = classifier_tokenizer(cfg)
        self.eos = tokenizer.eos_id
        self.resolve_vocab(tokenizer.vocab_size, self.tokenizer_file)
        self.data: ClassificationData = load_data(cfg, tokenizer)  # resolves cfg.classify.labels
        if cfg.classify.patience and self.data.val is None:
            raise ConfigError("classify.patience needs validation examples: set classify.val_file or "
                              "classify.val_fraction > 0")
        self.labels = self.data.labels
        self.class_weights = (None if self.data.weights is None else
                              torch.tensor(self.data.weights, dtype=torch.float32, device=trainer.device))
        self.train_stream = ExampleSampler(self.data.train.labels, len(self.labels), self.data.shares, cfg.train.seed)
        self.evaluator = ClassifyEvaluator(self.data.val, self.labels, cfg, trainer.world, trainer.device,
                                           trainer._autocast, self.eos)
        self.best = BestTracker(cfg.classify.metric, cfg.classify.patience)
        self._loss_scale = 1.0

    def batches(self, batch_size, device):
        return Batcher(self.data.train, self.train_stream, batch_size, self.eos, device)

    def begin_step(self, samples: int, count: int):
        """The step's loss is F.cross_entropy(weight=class_weights) over its whole global batch (every rank
        and micro-batch): each micro-batch sums its weighted losses and divides by the global batch's weight
        (or count), times the ranks x micro-batches the trainer and FSDP average over. So N ranks or
        grad_accum give the step of one process with the whole batch."""
        labels = self.data.train.labels[self.train_stream.indices(samples, count)]
        total = float(len(labels) if self.data.weights is None else self.data.weights[labels].sum())
        self._loss_scale = self.trainer.world.size * self.cfg.train.grad_accum / total

    def loss(self, model, x, y) -> torch.Tensor:
        ids, lengths = x
        logits = class_logits(model, ids, lengths).float()
        return F.cross_entropy(logits, y, weight=self.class_weights, reduction="sum") * self._loss_scale

    def initial_weights(self, model, optimizer):
        """A classifier of ours with the same labels gives the head too; any other source (a pretraining run,
        hf:DIR, a classifier of other labels) only the body, and the head starts fresh."""
        source, cfg, rank = self.cfg.init.from_, self.cfg, self.trainer.world.rank
        if not source.startswith("hf:"):
            saved = checkpoint.load_config(checkpoint.resolve(source))
            if saved.train.task == "classify" and saved.classify.labels == cfg.classify.labels:
                load_initial_weights(source, model, optimizer, cfg, rank)
                return
        if cfg.init.optimizer:
            raise ConfigError(f"init.optimizer = true: {source} has no classification head for labels "
                              f"{cfg.classify.labels}, so its optimizer state does not fit; set init.optimizer = false")
        with detached_head(model):
            load_initial_weights(source, model, None, cfg, rank)
        self.trainer._print("the classification head starts fresh (init.from has none for these labels)")

    def check_checkpoint(self, ckpt: Path, saved: Config):
        if saved.train.task != "classify" or saved.classify.labels != self.cfg.classify.labels:
            raise checkpoint.CheckpointError(
                f"{ckpt}: checkpoint has train.task = '{saved.train.task}', classify.labels = {saved.classify.labels}; "
                f"this run has '{self.cfg.train.task}', {self.cfg.classify.labels}")

    def state_dict(self) -> dict:
        return {"classify": self.best.state_dict()}

    def load_state_dict(self, info: dict):
        self.best.load_state_dict(info.get("classify"))

    def started(self):
        trainer = self.trainer
        if trainer.world.main:
            atomic_write_json(trainer.run_dir / LABELS_FILE, self.labels)
        d, c = self.data, self.cfg.classify
        counts = ", ".join(f"{label} {n}" for label, n in zip(self.labels, d.train.counts(len(self.labels))))
        line = (f"classify: {len(d.train)} training examples ({counts}), "
                f"{len(d.val) if d.val else 0} validation; {c.pooling} pooling")
        if d.weights is not None:
            line += "; class weights " + ", ".join(f"{w:.3g}" for w in d.weights)
        if d.shares is not None:
            total = sum(d.shares)
            line += "; oversampled to shares " + ", ".join(f"{s / total:.3g}" for s in d.shares)
        trainer._print(line)

    def after_eval(self, record: dict, step: int) -> tuple[str, str | None]:
        """Track the best. The evaluation before step 1 is logged but not tracked: its head is untrained and
        it has no checkpoint."""
        new_best = step > 0 and self.best.observe(record, step)
        if self.best.value is not None:
            record[f"best/{self.best.metric}"], record["best/step"] = self.best.value, self.best.step
        stop = None
        if step > 0 and self.best.exhausted:
            stop = (f"early stop at step {step}: {self.best.metric} has not improved for {self.best.stale} "
                    f"evaluations; best {self.best.value:.4f} at step {self.best.step} "
                    f"({self.trainer.run_dir / BEST_DIR})")
        return " (best)" if new_best else "", stop

    def after_save(self, ckpt: Path):
        if self.trainer.world.main and self.best.step == self.trainer.step:
            publish_best(ckpt, self.trainer.run_dir)

    def finished(self) -> str | None:
        if self.trainer.step > 0 and self.best.exhausted:
            return (f"{self.trainer.run_dir}: stopped early at step {self.trainer.step} (classify.patience = "
                    f"{self.best.patience}); nothing to train")
        return None

    def result(self) -> dict:
        return {"best": self.best.value, "best_step": self.best.step, "stopped_early": self.best.exhausted}
