"""Sequence classification on the GPT (train.task = "classify"), and `python -m lm.classify RUN --text ...`.

The model is the GPT with one more module, `cls_head`: a Linear(n_embd, classes) on a pooled hidden state of
the final norm (transformer.ln_f). "last" pooling reads the last real token (each text's closing EOS, which
has attended to the whole text), "mean" averages the real tokens. The head is a submodule of the model, so it
is built, initialized (by name and seed), sharded, checkpointed and restored like every other parameter;
the LM head stays (tied to the embedding) and unused. The data side (JSONL, labels, padding, class weights,
oversampling) is lm/classify_data.py.

Training is the pretraining loop (lm/trainer.py) with another batch source and loss: cross-entropy of the
head's logits, weighted per class with classify.class_weights. Every evaluation scores the validation
examples (val loss, accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix, rows the
true and columns the predicted label, all in metrics.jsonl) and tracks the best value of classify.metric:
the checkpoint of the best evaluation is kept as RUN/best/ (hard links to the step's files, replaced
atomically), and after classify.patience evaluations without a new best the run stops. Starting weights
come from init.from (a pretraining run or checkpoint of ours, or hf:DIR); the head then starts fresh.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data_prep import DataError, load_tokenizer
from data_prep.fileio import atomic_write_json
from lm import checkpoint
from lm.classify_data import Batcher, ClassificationData, ExampleSampler, Examples, encode, load_data, pad
from lm.config import Config, ConfigError
from lm.freeze import Freezing
from lm.initialize import load_initial_weights
from lm.optim import LRSchedule, build_optimizer
from lm.parallel import build_model
from lm.stability import Stability
from lm.trainer import Trainer

LABELS_FILE = "labels.json"
BEST_DIR = "best"


# ---- the head ---------------------------------------------------------------------------------------
class ClassificationHead(nn.Linear):
    """Linear(n_embd, classes) on each sequence's pooled hidden state. `lengths` counts each row's real
    tokens; the rows are right-padded after them (lm/classify_data.py), so the padded positions are never
    read: "last" takes position lengths - 1, "mean" averages positions < lengths."""

    def __init__(self, n_embd: int, classes: int, pooling: str):
        super().__init__(n_embd, classes, bias=True)
        self.pooling = pooling

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T, _ = hidden.shape
        if self.pooling == "last":
            pooled = hidden[torch.arange(B, device=hidden.device), lengths - 1]
        else:
            mask = (torch.arange(T, device=hidden.device) < lengths[:, None]).to(hidden.dtype)
            pooled = (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)
        return super().forward(pooled)


def attach_head(model: nn.Module, cfg: Config, seed: int | None = None):
    """Give `model` its classification head (cfg.classify.labels resolved). Its initial values come from
    the model's generator per parameter name (N(0, 0.02) weights, zero bias), as every parameter's do; on
    the meta device they are drawn later by init_weights."""
    head = ClassificationHead(cfg.model.n_embd, len(cfg.classify.labels), cfg.classify.pooling)
    model.cls_head = head
    if head.weight.is_meta:
        return
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(model.initial_value(f"cls_head.{name}", cfg.train.seed if seed is None else seed))


@contextlib.contextmanager
def detached_head(model: nn.Module):
    """The model without its head for a while: loading a source that has none (a pretraining run, hf:DIR)."""
    head = model._modules.pop("cls_head")
    try:
        yield
    finally:
        model._modules["cls_head"] = head


def class_logits(model, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return model(ids, lengths=lengths)[0]


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

    sets: list = []  # no token-level validation sets: the trainer reports no bits/byte
    tasks: list = []

    def __init__(self, val: Examples | None, labels: list[str], cfg: Config, world, device, autocast, pad_id: int):
        self.val, self.labels, self.world, self.device, self.autocast = val, labels, world, device, autocast
        self.batch_size, self.pad_id = cfg.train.batch_size, pad_id
        self.start: dict[str, float] = {}
        self.last_loss: float | None = None
        self.last_step: int | None = None

    @torch.no_grad()
    def evaluate(self, model, step: int) -> dict:
        n, b, w, r = len(self.val), self.batch_size, self.world.size, self.world.rank
        share = math.ceil(n / w)
        first, end = r * share, min(n, (r + 1) * share)
        # each rank fills its rows' predictions (zeros elsewhere), so one sum over ranks gathers them all
        totals = torch.zeros(n + 1, dtype=torch.float64, device=self.device)  # predictions, loss sum
        was_training = model.training
        model.eval()
        for start in range(first, first + share, b):
            count = max(0, min(b, end - start))
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
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old.exists():
        shutil.rmtree(old)
    return best


# ---- training ---------------------------------------------------------------------------------------
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


class ClassifyTrainer(Trainer):
    """The trainer of train.task = "classify": Trainer's loop, checkpoints, schedule, stability, freezing and
    FSDP with classification batches, loss and evaluation. `Trainer(cfg)` builds one for such a config."""

    def __init__(self, cfg: Config, resume: bool = False, last_good: bool = False):
        self._join(cfg)
        self.sources = []

        tokenizer, self.tokenizer_file = classifier_tokenizer(cfg)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = tokenizer.vocab_size
        elif cfg.model.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary of {tokenizer.vocab_size} ({self.tokenizer_file})")
        self.data: ClassificationData = load_data(cfg, tokenizer)  # resolves cfg.classify.labels
        if cfg.classify.patience and self.data.val is None:
            raise ConfigError("classify.patience needs validation examples: set classify.val_file or "
                              "classify.val_fraction > 0")
        self.labels, pad_id = self.data.labels, tokenizer.eos_id
        self.class_weights = (None if self.data.weights is None else
                              torch.tensor(self.data.weights, dtype=torch.float32, device=self.device))
        self.train_stream = ExampleSampler(self.data.train.labels, len(self.labels), self.data.shares, cfg.train.seed)
        self.evaluator = ClassifyEvaluator(self.data.val, self.labels, cfg, self.world, self.device, self._autocast,
                                           pad_id)

        torch.manual_seed(cfg.train.seed + self.world.rank)  # dropout differs across ranks
        self.model = build_model(cfg, self.world, self.device)  # with cls_head (lm.parallel)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.schedule = LRSchedule(cfg.optim, cfg.train.max_steps)
        self.stability = Stability(cfg.stability, fp16=self.dtype == "float16")
        self.freezing = Freezing(cfg.continual.freeze)
        self.step, self.samples = 0, 0
        self.stop_signal = False
        self.prefetcher = Batcher(self.data.train, self.train_stream, cfg.train.batch_size, pad_id, self.device)
        self.sft, self.augment, self.ewc, self.distiller = False, None, None, None  # refused with classify
        self.trainable = None
        self.best = BestTracker(cfg.classify.metric, cfg.classify.patience)
        resumed = self._start(resume, last_good)
        if self.world.main:
            atomic_write_json(self.run_dir / LABELS_FILE, self.labels)
        self.masks = self._pruning_masks(resumed)
        self._print(self._describe())

    def _describe(self) -> str:
        d, c = self.data, self.cfg.classify
        counts = ", ".join(f"{label} {n}" for label, n in zip(self.labels, d.train.counts(len(self.labels))))
        line = (f"classify: {len(d.train)} training examples ({counts}), "
                f"{len(d.val) if d.val else 0} validation; {c.pooling} pooling")
        if d.weights is not None:
            line += "; class weights " + ", ".join(f"{w:.3g}" for w in d.weights)
        if d.shares is not None:
            total = sum(d.shares)
            line += "; oversampled to shares " + ", ".join(f"{s / total:.3g}" for s in d.shares)
        return line

    # ---- hooks of Trainer ---------------------------------------------------------------------------
    def train_step(self) -> dict:
        """The step's loss is F.cross_entropy(weight=class_weights) over its whole global batch (every rank
        and micro-batch): each micro-batch sums its weighted losses and divides by the global batch's weight
        (or count), times the ranks x micro-batches the trainer and FSDP average over. So N ranks or
        grad_accum give the step of one process with the whole batch."""
        t = self.cfg.train
        labels = self.data.train.labels[self.train_stream.indices(self.samples, self.world.size * t.batch_size *
                                                                   t.grad_accum)]
        total = float(len(labels) if self.data.weights is None else self.data.weights[labels].sum())
        self._loss_scale = self.world.size * t.grad_accum / total
        return super().train_step()

    def _loss(self, x, y) -> torch.Tensor:
        ids, lengths = x
        logits = class_logits(self.model, ids, lengths).float()
        return F.cross_entropy(logits, y, weight=self.class_weights, reduction="sum") * self._loss_scale

    def _initial_weights(self):
        """A classifier of ours with the same labels gives the head too; any other source (a pretraining run,
        hf:DIR, a classifier of other labels) only the body, and the head starts fresh."""
        source, cfg = self.cfg.init.from_, self.cfg
        if not source.startswith("hf:"):
            saved = checkpoint.load_config(checkpoint.resolve(source))
            if saved.train.task == "classify" and saved.classify.labels == cfg.classify.labels:
                load_initial_weights(source, self.model, self.optimizer, cfg, self.world.rank)
                return
        if cfg.init.optimizer:
            raise ConfigError(f"init.optimizer = true: {source} has no classification head for labels "
                              f"{cfg.classify.labels}, so its optimizer state does not fit; set init.optimizer = false")
        with detached_head(self.model):
            load_initial_weights(source, self.model, None, cfg, self.world.rank)
        self._print("the classification head starts fresh (init.from has none for these labels)")

    def _restore(self, ckpt: Path, keep_data_cursor: bool):
        saved = checkpoint.load_config(ckpt)
        if saved.train.task != "classify" or saved.classify.labels != self.cfg.classify.labels:
            raise checkpoint.CheckpointError(
                f"{ckpt}: checkpoint has train.task = '{saved.train.task}', classify.labels = {saved.classify.labels}; "
                f"this run has '{self.cfg.train.task}', {self.cfg.classify.labels}")
        super()._restore(ckpt, keep_data_cursor)
        self.best.load_state_dict(checkpoint.load_info(ckpt).get("classify"))

    def _extra_info(self) -> dict:
        return {"classify": self.best.state_dict()}

    def save(self, train_loss: float) -> Path:
        path = super().save(train_loss)
        if self.world.main and self.best.step == self.step:
            publish_best(path, self.run_dir)
        return path

    def log_eval(self, bar) -> bool:
        """Evaluate, log, track the best; returns whether to stop early. The evaluation before step 1 is
        logged but not tracked: its head is untrained and it has no checkpoint."""
        if self.evaluator.val is None:
            return False
        record = self.evaluator.evaluate(self.model, self.step)
        self.schedule.observe_val_loss(record["val_loss"])
        new_best = self.step > 0 and self.best.observe(record, self.step)
        if self.best.value is not None:
            record[f"best/{self.best.metric}"], record["best/step"] = self.best.value, self.best.step
        self.metrics.write(record)
        if self.world.main:
            bar.write(f"step {self.step}: {self.evaluator.summary(record)}" + (" (best)" if new_best else ""))
        if self.step > 0 and self.best.exhausted:
            self._print(f"early stop at step {self.step}: {self.best.metric} has not improved for "
                        f"{self.best.stale} evaluations; best {self.best.value:.4f} at step {self.best.step} "
                        f"({self.run_dir / BEST_DIR})")
            return True
        return False

    def run(self, stop_at_step: int | None = None) -> dict:
        if self.step > 0 and self.best.exhausted:  # a resumed run that had already stopped early
            self._print(f"{self.run_dir}: stopped early at step {self.step} (classify.patience = "
                        f"{self.best.patience}); nothing to train")
            self.metrics.close()
            result = {"step": self.step, "train_loss": float("nan"), "val_loss": self.evaluator.last_loss,
                      "val_step": self.evaluator.last_step, "skipped": self.stability.skipped, "val_bpb": None}
        else:
            result = super().run(stop_at_step)
        return {**result, "best": self.best.value, "best_step": self.best.step, "stopped_early": self.best.exhausted}


# ---- inference --------------------------------------------------------------------------------------
def load_classifier(path, device="cpu", last: bool = False):
    """(checkpoint, config, model in eval mode, tokenizer) of a classification run: RUN/best/ when there is
    one (unless `last`), else the run's newest checkpoint, or the checkpoint directory given."""
    from lm.attention import inference_backends
    from lm.model import GPT

    path = Path(path)
    if not last and (path / BEST_DIR / checkpoint.RECORD).is_file():
        path = path / BEST_DIR
    ckpt = checkpoint.resolve(path)
    cfg = checkpoint.load_config(ckpt)
    if cfg.train.task != "classify":
        raise checkpoint.CheckpointError(f"{ckpt}: is not a classifier (train.task = '{cfg.train.task}'); train one "
                                         "with train.task = 'classify'")
    model = GPT(inference_backends(cfg.model, device))
    attach_head(model, cfg)
    checkpoint.load_model(ckpt, model)
    return ckpt, cfg, model.to(device).eval(), load_tokenizer(ckpt)


@torch.no_grad()
def predict(model, tokenizer, cfg: Config, texts: list[str], batch_size: int = 32, device="cpu") -> np.ndarray:
    """Class probabilities (N, classes) of `texts`, encoded as in training."""
    rows = encode(tokenizer, texts, cfg.classify.max_length or cfg.model.block_size)
    out = []
    for start in range(0, len(rows), batch_size):
        ids, lengths = pad(rows[start:start + batch_size], tokenizer.eos_id, device)
        out.append(torch.softmax(class_logits(model, ids, lengths).float(), -1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(cfg.classify.labels)))


def _read_texts(path: Path, field: str) -> list[str]:
    """A JSONL file's `field` per line, or a text file's non-empty lines; at least one."""
    from lm.files import read_text

    lines = read_text(path, "file of texts").splitlines()
    if path.suffix != ".jsonl":
        texts = [line for line in lines if line.strip()]
    else:
        texts = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise DataError(f"{path}:{number}: has no string field '{field}'")
                texts.append(record[field])
    if not texts:
        raise DataError(f"{path}: no texts to classify (the file is empty or blank)")
    return texts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lm.classify",
                                     description="Labels and class probabilities of texts from a classification run.")
    parser.add_argument("run", help="a classification run (its best/ checkpoint, else the newest) or a checkpoint")
    parser.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    parser.add_argument("--file", type=Path, help="texts: a .jsonl file (the run's text field) or one text a line")
    parser.add_argument("--text-field", default=None, help="the JSONL field (default: the run's classify.text_field)")
    parser.add_argument("--last", action="store_true", help="the newest checkpoint instead of RUN/best/")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="one JSON object a text instead of the table")
    args = parser.parse_args(argv)
    try:
        if not args.text and args.file is None:
            raise ValueError("give --text TEXT (repeatable) or --file FILE")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
        ckpt, cfg, model, tokenizer = load_classifier(args.run, args.device, args.last)
        texts = list(args.text)
        if args.file is not None:
            texts += _read_texts(args.file, args.text_field or cfg.classify.text_field)
        probs = predict(model, tokenizer, cfg, texts, args.batch_size, args.device)
    except (checkpoint.CheckpointError, DataError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    labels = cfg.classify.labels
    print(f"{ckpt} (step {checkpoint.load_info(ckpt)['step']})", file=sys.stderr)
    for text, p in zip(texts, probs):
        best = int(p.argmax())
        if args.json:
            print(json.dumps({"text": text, "label": labels[best],
                              "probabilities": {label: round(float(q), 6) for label, q in zip(labels, p)}},
                             ensure_ascii=False))
        else:
            others = "  ".join(f"{label} {q:.3f}" for label, q in zip(labels, p))
            snippet = " ".join(text.split())
            snippet = snippet[:60] + ("..." if len(snippet) > 60 else "")
            print(f"{labels[best]}\t{p[best]:.3f}\t[{others}]\t{snippet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
