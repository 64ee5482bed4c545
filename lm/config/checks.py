"""Reject impossible configs: one line naming the key and where it was set (the file, or an override)."""
from __future__ import annotations

import math

from lm.config.schema import SECTION_TYPES, Config, ConfigError, closest, head_size
from lm.data.augment import parse_augment
from lm.eval.spec import parse_tasks


CHOICES = {
    ("model", "attention"): ("sdpa", "triton"),
    ("model", "layernorm"): ("torch", "triton"),
    ("model", "activation"): ("gelu", "gelu_tanh"),
    ("model", "norm"): ("layernorm", "rmsnorm"),
    ("model", "position"): ("learned", "rope"),
    ("model", "mlp"): ("gelu", "swiglu", "relu2"),
    ("data", "tokenizer"): ("bpe", "char"),
    ("optim", "schedule"): ("cosine", "linear", "wsd", "constant", "step", "plateau"),
    ("optim", "name"): ("adamw", "sgd", "rmsprop", "muon"),
    ("train", "dtype"): ("auto", "float32", "bfloat16", "float16"),
    ("parallel", "activation_checkpointing"): ("none", "full", "every"),
    ("parallel", "compile"): ("none", "blocks", "model"),
    ("continual", "ewc_labels"): ("model", "empirical"),
    ("train", "task"): ("lm", "classify"),
    ("classify", "pooling"): ("last", "mean"),
    ("classify", "metric"): ("macro_f1", "accuracy", "val_loss"),
}
ROLES = ("new", "replay")
MAX_PARAMS = 10 ** 12  # 100x the largest preset; beyond it a shape is a mistake, not a model


def parse_sources(entries: list[str]) -> list[tuple[str, float, str]]:
    """data.sources -> [(role, weight, dir)]; a ConfigError names the bad entry."""
    out = []
    for entry in entries:
        parts = entry.split(":", 2)
        if len(parts) != 3 or parts[0] not in ROLES or not parts[2]:
            raise ConfigError(f"data.sources entry '{entry}' must be ROLE:WEIGHT:DIR with ROLE one of "
                              f"{', '.join(ROLES)}, e.g. 'replay:0.25:data/A'")
        try:
            weight = float(parts[1])
        except ValueError:
            weight = -1.0
        if not (0 < weight < float("inf")):
            raise ConfigError(f"data.sources entry '{entry}': weight '{parts[1]}' must be a positive number")
        out.append((parts[0], weight, parts[2]))
    return out


def parse_val_sets(entries: list[str]) -> list[tuple[str, str]]:
    """data.val_sets -> [(name, dir)]."""
    out = []
    for entry in entries:
        name, _, directory = entry.partition(":")
        if not name.isidentifier() or not directory:
            raise ConfigError(f"data.val_sets entry '{entry}' must be NAME:DIR with NAME a word, e.g. 'replay:data/A'")
        out.append((name, directory))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.val_sets names must be unique, got {names}")
    return out


def parse_freeze(entries: list[str]) -> list[tuple[int, int]]:
    """continual.freeze -> [(start step, frozen blocks)] in increasing step order."""
    out = []
    for entry in entries:
        step, _, k = entry.partition(":")
        if not (step.isdigit() and k.isdigit()):
            raise ConfigError(f"continual.freeze entry '{entry}' must be STEP:K (from STEP on, freeze the "
                              "embeddings and the first K blocks), e.g. '0:4'")
        out.append((int(step), int(k)))
    if [s for s, _ in out] != sorted({s for s, _ in out}):
        raise ConfigError(f"continual.freeze steps must increase: {entries}")
    return out




def validate(cfg: Config, where: str, origins: dict[str, str] | None = None):
    """Reject impossible values, naming the key and where it was set (the file, or an override)."""
    def bad(key, why):
        raise ConfigError(f"{(origins or {}).get(key, where)}: {key} {why}")

    for section in SECTION_TYPES:  # TOML reads inf and nan: no setting takes them
        for key, value in vars(getattr(cfg, section)).items():
            if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
                bad(f"{section}.{key}", f"= {value}: must be a finite number (not inf or nan)")
    for (section, key), options in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in options:
            bad(f"{section}.{key}", f"is '{value}'; choose one of {', '.join(options)}{closest(value, options)}")
    m, o, t = cfg.model, cfg.optim, cfg.train
    for key in ("block_size", "n_layer", "n_head", "n_embd"):
        if getattr(m, key) < 1:
            bad(f"model.{key}", "must be >= 1")
    if m.document_eos < -1 or (m.vocab_size and m.document_eos >= m.vocab_size):
        bad("model.document_eos", f"= {m.document_eos} must be -1 (no document masks) or a token id")
    if m.vocab_size < 0:
        bad("model.vocab_size", "must be >= 0 (0 takes the tokenizer's size)")
    if m.loss_chunk < 0:
        bad("model.loss_chunk", "must be >= 0 (tokens per chunk of the loss; 0: whole logits)")
    if m.head_dim < 0:
        bad("model.head_dim", "must be >= 0 (0: n_embd / n_head)")
    if m.n_embd % m.n_head and not m.head_dim:
        bad("model.n_embd", f"= {m.n_embd} is not divisible by model.n_head = {m.n_head}")
    if m.n_kv_head < 0 or (m.n_kv_head and m.n_head % m.n_kv_head):
        bad("model.n_kv_head", f"= {m.n_kv_head} must divide model.n_head = {m.n_head} (0: as many as n_head)")
    if m.position == "rope" and head_size(m) % 2:
        bad("model.position", f"= 'rope' needs an even head size; the heads have {head_size(m)}")
    if m.rope_theta <= 1:
        bad("model.rope_theta", f"= {m.rope_theta} must be > 1")
    try:
        parse_augment(cfg.data.augment)
    except ValueError as e:
        bad("data.augment", str(e))
    d = cfg.distill
    if d.temperature <= 0:
        bad("distill.temperature", f"= {d.temperature} must be > 0")
    if not 0.0 <= d.alpha <= 1.0:
        bad("distill.alpha", f"= {d.alpha} must be in [0, 1]")
    if cfg.eval.limit < 0:
        bad("eval.limit", f"= {cfg.eval.limit} must be >= 0 (0: every document / example)")
    try:
        parse_tasks(cfg.eval.tasks)
    except ConfigError as e:
        raise ConfigError(f"{(origins or {}).get('eval.tasks', where)}: eval.tasks: {e}") from None
    if m.share_layers < 1 or m.n_layer % m.share_layers:
        bad("model.share_layers", f"= {m.share_layers} must be >= 1 and divide model.n_layer = {m.n_layer}")
    if m.mlp_hidden < 0:
        bad("model.mlp_hidden", "must be >= 0 (0: the width model.mlp implies)")
    # Refused before anything is allocated (a typo, or a damaged config.toml in a checkpoint): embeddings,
    # then 12 n_embd^2 per block (attention 4, MLP 8).
    params = (m.vocab_size + m.block_size) * m.n_embd + 12 * m.n_layer * m.n_embd ** 2
    if params > MAX_PARAMS:
        shape = {f"model.{k}": getattr(m, k) for k in ("n_layer", "n_embd", "vocab_size", "block_size")}
        origin = next((origins[k] for k in shape if k in (origins or {})), where)
        raise ConfigError(f"{origin}: {', '.join(f'{k} = {v}' for k, v in shape.items())} make ~{params:.1e} "
                          f"parameters, more than the {MAX_PARAMS:.0e} a model here can have")
    if not 0.0 <= m.dropout < 1.0:
        bad("model.dropout", f"= {m.dropout} must be in [0, 1)")
    if not 0.0 < m.norm_eps < 1.0:
        bad("model.norm_eps", f"= {m.norm_eps} must be in (0, 1)")
    if not 0.0 <= cfg.sft.val_fraction < 1.0:
        bad("sft.val_fraction", f"= {cfg.sft.val_fraction} must be in [0, 1)")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        bad("data.val_fraction", f"= {cfg.data.val_fraction} must be in [0, 1)")
    if cfg.data.vocab_size < 2:
        bad("data.vocab_size", "must be >= 2")
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        bad("optim.min_lr", f"= {o.min_lr} must be in [0, optim.lr = {o.lr}] and lr > 0")
    if o.warmup_steps < 0 or o.decay_steps < 0:
        bad("optim.warmup_steps", "and optim.decay_steps must be >= 0")
    if o.weight_decay < 0 or o.grad_clip < 0 or o.eps <= 0:
        bad("optim.weight_decay", "optim.grad_clip must be >= 0 and optim.eps > 0")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        bad("optim.beta1", "and optim.beta2 must be in [0, 1)")
    if not (o.momentum == -1 or 0 <= o.momentum < 1):
        bad("optim.momentum", f"= {o.momentum} must be in [0, 1), or -1 for the optimizer's usual value")
    if o.muon_lr < 0:
        bad("optim.muon_lr", f"= {o.muon_lr} must be >= 0 (0: optim.lr)")
    if o.ns_steps < 1:
        bad("optim.ns_steps", f"= {o.ns_steps} must be >= 1")
    for key in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_sequences", "keep_checkpoints"):
        if getattr(t, key) < 1:
            bad(f"train.{key}", f"= {getattr(t, key)} must be >= 1")
    if t.keep_every < 0 or t.checkpoint_interval < 0:
        bad("train.keep_every", "and train.checkpoint_interval must be >= 0")
    if cfg.parallel.ac_every < 1:
        bad("parallel.ac_every", "must be >= 1")
    if cfg.parallel.replicas < 1:
        bad("parallel.replicas", "must be >= 1")
    if not 0 < o.wsd_decay_fraction <= 1:
        bad("optim.wsd_decay_fraction", "must be in (0, 1]")
    if o.step_every < 1 or o.plateau_patience < 1 or not 0 < o.step_gamma <= 1 or not 0 < o.plateau_factor <= 1:
        bad("optim.step_every", "and plateau_patience must be >= 1; step_gamma, plateau_factor in (0, 1]")
    st = cfg.stability
    if st.rollback_after < 0 or st.spike_zscore < 0 or st.spike_window < 2 or st.loss_scale <= 0:
        bad("stability", "values must be >= 0 (spike_window >= 2, loss_scale > 0)")
    if not 0 < o.layer_decay <= 1:
        bad("optim.layer_decay", f"= {o.layer_decay} must be in (0, 1] (1: off)")
    if t.task == "classify":
        _validate_classify(cfg, bad)
    if t.threads < 0:
        bad("train.threads", "must be >= 0")
    if cfg.log.interval < 1:
        bad("log.interval", "must be >= 1")
    try:
        parse_sources(cfg.data.sources)
        parse_val_sets(cfg.data.val_sets)
        freeze = parse_freeze(cfg.continual.freeze)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if any(k > m.n_layer for _, k in freeze):
        bad("continual.freeze", f"freezes more blocks than model.n_layer = {m.n_layer}")
    c = cfg.continual
    if c.ewc_batches < 0 or c.ewc_lambda < 0 or c.ewc_gamma < 0:
        bad("continual.ewc_batches", "continual.ewc_lambda and continual.ewc_gamma must be >= 0")
    if c.ewc_batches and not c.ewc_data and not any(r == "replay" for r, _, _ in parse_sources(cfg.data.sources)):
        bad("continual.ewc_data", "is empty and data.sources has no replay source to estimate the Fisher on")


def _validate_classify(cfg: Config, bad):
    """train.task = "classify": its keys, and the pretraining features it does not combine with."""
    c, t = cfg.classify, cfg.train
    if not c.train_file:
        bad("classify.train_file", "is empty: train.task = 'classify' reads its examples from a JSONL file")
    if c.max_length and not 3 <= c.max_length <= cfg.model.block_size:
        bad("classify.max_length", f"= {c.max_length} must be 0 (model.block_size) or in [3, {cfg.model.block_size}]")
    if not 0.0 <= c.val_fraction < 1.0:
        bad("classify.val_fraction", f"= {c.val_fraction} must be in [0, 1)")
    if isinstance(c.class_weights, str) and c.class_weights not in ("", "balanced"):
        bad("classify.class_weights", f"is '{c.class_weights}'; choose '', 'balanced' or a list of weights")
    if isinstance(c.class_weights, list) and not all(w > 0 for w in c.class_weights):
        bad("classify.class_weights", f"= {c.class_weights}: every weight must be > 0")
    if isinstance(c.oversample, list) and not (all(s >= 0 for s in c.oversample) and sum(c.oversample) > 0):
        bad("classify.oversample", f"= {c.oversample}: shares must be >= 0 with a positive sum")
    if c.patience < 0:
        bad("classify.patience", f"= {c.patience} must be >= 0 (0: never stop early)")
    if t.checkpoint_interval and t.eval_interval % t.checkpoint_interval:
        bad("train.checkpoint_interval", "must divide train.eval_interval with train.task = 'classify': the best "
                                         "evaluation's checkpoint is kept")


