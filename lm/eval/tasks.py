"""Evaluation tasks: read a task's files once, turn them into scoring requests, and turn the scores into
metrics.

- `ppl`: every document (a text file, a JSONL record, a val document of a prepared dataset) is scored from
  an EOS start, as training documents follow an EOS; its closing EOS is not scored. loss = nats per token,
  ppl = exp(loss), bpb = bits per UTF-8 byte of the text (comparable across tokenizers).
- `mc`: each ending is scored after its context (joined by one space, lm-evaluation-harness's default
  target delimiter). acc: the ending of highest summed log-likelihood is the labelled one; acc_norm: of
  highest log-likelihood per character of the ending (the harness's acc_norm); acc_bytes: per UTF-8 byte
  (the harness's acc_bytes; equal to acc_norm on ASCII text).
"""
from __future__ import annotations

import math
from pathlib import Path

from data_prep import DataError, TokenReader, file_sha256, is_prepared, iter_documents, jsonl_objects, read_meta
from lm.eval.scoring import Request, continuation, default_stride, encode_pair, rolling, score
from lm.eval.spec import TaskSpec



class PerplexityTask:
    headline = ("ppl", "bpb")

    def __init__(self, spec: TaskSpec, tokenizer, tokenizer_file: Path, block_size: int, limit: int = 0,
                 stride: int | None = None):
        self.spec, self.name = spec, spec.name
        self.stride = spec.stride or stride or default_stride(block_size)
        if self.stride > block_size:
            raise DataError(f"task '{spec.text}': stride {self.stride} is longer than the model's context "
                            f"(block_size {block_size})")
        docs = self._documents(tokenizer, tokenizer_file, limit)
        self.documents = len(docs)
        self.tokens = sum(len(ids) for ids, _ in docs)
        self.bytes = sum(n for _, n in docs)
        if not self.tokens:
            raise DataError(f"{spec.path}: no text to score (task '{spec.text}')")
        self.requests = [r for ids, _ in docs for r in rolling(tokenizer.eos_id, ids, block_size, self.stride)]

    def _documents(self, tokenizer, tokenizer_file: Path, limit: int) -> list[tuple[list[int], int]]:
        """(token ids, UTF-8 bytes) per document."""
        path = Path(self.spec.path)
        if path.is_dir() and is_prepared(path):
            meta = read_meta(path)
            if meta["tokenizer"]["sha256"] != file_sha256(tokenizer_file):
                raise DataError(f"{path}: prepared with another tokenizer than the model's ({tokenizer_file}); "
                                "score its text files instead, or prepare it with --tokenizer-from the run")
            if "val" not in meta["splits"]:
                raise DataError(f"{path}: a prepared dataset without a val split; nothing to score")
            reader = TokenReader(path, "val")
            n = reader.num_docs if not limit else min(limit, reader.num_docs)
            docs = [reader.document(i).tolist() for i in range(n)]
            return [(ids, len(tokenizer.decode(ids).encode("utf-8"))) for ids in docs]
        out = []
        for doc in iter_documents([self.spec.path], strict=True):
            if limit and len(out) == limit:
                break
            try:
                ids = tokenizer.encode(doc.text)
            except DataError as e:  # a character the char tokenizer never saw
                raise DataError(f"{doc.source}: {e}") from None
            out.append((ids, len(doc.text.encode("utf-8"))))
        return out

    def metrics(self, scores) -> dict:
        nats = -float(scores[:, 0].sum())
        loss = nats / self.tokens
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": nats / math.log(2) / self.bytes,
                "tokens": self.tokens, "bytes": self.bytes, "documents": self.documents}


class ChoiceTask:
    headline = ("acc", "acc_norm")

    def __init__(self, spec: TaskSpec, tokenizer, block_size: int, limit: int = 0):
        self.spec, self.name = spec, spec.name
        self.examples = read_choices(spec, limit)
        self.requests: list[Request] = []
        for line, context, endings, _ in self.examples:
            for ending in endings:
                try:
                    ctx, cont = encode_pair(tokenizer, context, spec.delimiter + ending)
                except DataError as e:
                    raise DataError(f"{spec.path}: line {line}: {e}") from None
                self.requests.append(continuation(tokenizer.eos_id, ctx, cont, block_size))

    def loglikelihoods(self, scores) -> list[list[float]]:
        """Each example's summed log-likelihood of each ending."""
        out, i = [], 0
        for _, _, endings, _ in self.examples:
            out.append([float(v) for v in scores[i:i + len(endings), 0]])
            i += len(endings)
        return out

    def metrics(self, scores) -> dict:
        hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
        for (_, _, endings, label), lls in zip(self.examples, self.loglikelihoods(scores)):
            hits["acc"] += argmax(lls) == label
            hits["acc_norm"] += argmax([ll / len(e) for ll, e in zip(lls, endings)]) == label
            hits["acc_bytes"] += argmax([ll / len(e.encode("utf-8")) for ll, e in zip(lls, endings)]) == label
        n = len(self.examples)
        return {**{k: v / n for k, v in hits.items()}, "examples": n}


def argmax(values: list[float]) -> int:
    """The first index of the largest value (numpy's argmax, as the harness uses)."""
    return max(range(len(values)), key=values.__getitem__)


def _field(record: dict, dotted: str):
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def read_choices(spec: TaskSpec, limit: int = 0) -> list[tuple[int, str, list[str], int]]:
    """(line number, context, endings, label index) per JSONL record. Endings: a list of strings, or ARC's
    {"text": [...], "label": [...]}; label: an index (int or digits, HellaSwag's "3") or, with ARC's
    choices, one of their labels ("B"). Field names may be dotted (question.stem)."""
    path = Path(spec.path)
    names = {k: spec.field(k) for k in ("context", "endings", "label")}
    out = []
    for number, record in jsonl_objects(path, f"task '{spec.text}'"):
        if limit and len(out) == limit:
            break
        where = f"{path}: line {number}"
        values = {k: _field(record, f) for k, f in names.items()}
        for key, value in values.items():
            if value is None:
                fields = ", ".join(record) or "none"
                raise DataError(f"{where}: no field '{names[key]}' (the {key}; it has: {fields}; rename with "
                                f":{key}=FIELD)")
        context, endings, label = values["context"], values["endings"], values["label"]
        labels = None
        if isinstance(endings, dict) and isinstance(endings.get("text"), list):  # ARC's choices
            labels, endings = endings.get("label"), endings["text"]
        if not isinstance(context, str):
            raise DataError(f"{where}: field '{names['context']}' must be a string, got {type(context).__name__}")
        if not (isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) and e for e in endings)):
            raise DataError(f"{where}: field '{names['endings']}' must be a list of at least 2 non-empty strings")
        out.append((number, context, endings, _label_index(where, names["label"], label, endings, labels)))
    if not out:
        raise DataError(f"{path}: no examples (task '{spec.text}')")
    return out


def _label_index(where: str, name: str, label, endings: list[str], labels) -> int:
    if isinstance(labels, list) and label in labels:
        return labels.index(label)
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool):
        raise DataError(f"{where}: field '{name}' must be the index of the right ending, got {label!r}")
    if not 0 <= label < len(endings):
        raise DataError(f"{where}: label {label} is out of range for {len(endings)} endings "
                        f"(field '{name}', 0 to {len(endings) - 1})")
    return label


def load_task(spec: TaskSpec, tokenizer, tokenizer_file: Path, block_size: int, limit: int = 0,
              stride: int | None = None):
    if spec.kind == "ppl":
        return PerplexityTask(spec, tokenizer, tokenizer_file, block_size, limit, stride)
    return ChoiceTask(spec, tokenizer, block_size, limit)


def run_task(task, model, batch_size: int, device, world=None, autocast=None) -> dict:
    kwargs = {"world": world} if world is not None else {}
    if autocast is not None:
        kwargs["autocast"] = autocast
    return task.metrics(score(model, task.requests, batch_size, device, **kwargs))


def training_tasks(cfg) -> list:
    """`[eval] tasks` of a training config, read once at the start with the training data's tokenizer."""
    if not cfg.eval.tasks:
        return []
    from data_prep import load_tokenizer
    from lm.config.checks import parse_sources
    from lm.eval.spec import parse_tasks

    directory = Path(([d for _, _, d in parse_sources(cfg.data.sources)] or [cfg.data.dir])[0])
    tokenizer = load_tokenizer(directory)
    tokenizer_file = directory / read_meta(directory)["tokenizer"]["file"]
    return [load_task(s, tokenizer, tokenizer_file, cfg.model.block_size, cfg.eval.limit)
            for s in parse_tasks(cfg.eval.tasks)]
