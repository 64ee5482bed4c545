"""Typed run configuration: dataclasses loaded from TOML, overridden as `section.key=value`.

Every mistake becomes a one-line `ConfigError` that names where the value came from (the file or the
override), the key, and the closest valid key; `train.py` prints it and exits with code 2.
"""
from __future__ import annotations

import math
import contextlib
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from lm.augment import parse_augment  # noqa: E402  (it imports nothing of ours)


class ConfigError(ValueError):
    """A config mistake; the message is one line meant for the user."""


# GPT-2 shapes (Radford et al. 2019). Keys a config sets explicitly win over the preset's.
PRESETS: dict[str, dict] = {
    "gpt2-124m": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": dict(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": dict(vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1.5b": dict(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),
    # The shape of Llama 3.2 1B (Meta, 2024): 16 layers, 2048 wide, 32 query and 8 key/value heads, SwiGLU
    # 8192, RMSNorm, RoPE theta 500000, tied embeddings, its 128,256-token vocabulary.
    "llama-style-1b": dict(vocab_size=128256, block_size=2048, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
                           mlp_hidden=8192, norm="rmsnorm", position="rope", rope_theta=500000.0, mlp="swiglu",
                           bias=False),
}


def head_size(cfg: "ModelConfig") -> int:
    """Each attention head's size: model.head_dim, else n_embd / n_head."""
    return cfg.head_dim or cfg.n_embd // cfg.n_head


def mlp_hidden_size(cfg: "ModelConfig") -> int:
    """The MLP's width: model.mlp_hidden, else GPT-2's 4 n_embd, or for SwiGLU Llama's rule (two thirds of
    4 n_embd, so the three matrices cost what GPT-2's two do, rounded up to a multiple of 256)."""
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    if cfg.mlp == "swiglu":
        return -(-int(8 * cfg.n_embd / 3) // 256) * 256
    return 4 * cfg.n_embd


@dataclass
class ModelConfig:
    preset: str = ""  # a name from PRESETS; explicit keys override it
    vocab_size: int = 0  # 0: take the tokenizer's vocabulary size
    block_size: int = 256  # context length in tokens
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers
    activation: str = "gelu"  # MLP nonlinearity: "gelu" (exact) or "gelu_tanh" (GPT-2's approximation)
    attention: str = "sdpa"  # "sdpa" (torch) or "triton" (our fused flash attention, kernels/)
    layernorm: str = "torch"  # "torch" or "triton" (our fused LayerNorm, kernels/)
    loss_chunk: int = 4096  # tokens per chunk of the head + cross-entropy (lm/loss.py); 0: whole fp32 logits
    # Block options beyond GPT-2's (its choices are the defaults; "llama-style-1b" sets Llama's):
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama); model.layernorm picks the kernel for either
    position: str = "learned"  # "learned" (a table of block_size positions, GPT-2) or "rope" (rotary, Llama)
    rope_theta: float = 10000.0  # rotary base (Llama 3: 500000)
    mlp: str = "gelu"  # "gelu" (GPT-2), "swiglu" (gated, Llama) or "relu2" (ReLU squared, modded-nanogpt)
    mlp_hidden: int = 0  # MLP width; 0: 4 n_embd for gelu, Llama's 8/3 n_embd rounded up to 256 for swiglu
    n_kv_head: int = 0  # key/value heads; 0: n_head; fewer: grouped-query attention (1: multi-query)
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before attention (OLMo 2, Qwen 3)
    head_dim: int = 0  # size of each attention head; 0: n_embd / n_head (structured head pruning makes it differ)
    share_layers: int = 1  # K > 1: each group of K consecutive blocks runs one set of weights (ALBERT)
    # set by training, not by hand: the EOS id that ends each packed document when the model was trained
    # with document masks (data.document_mask, [sft]); every consumer of the checkpoint masks the same way
    document_eos: int = -1
    tie_embeddings: bool = True  # the output head is the token embedding; false: its own matrix (Llama 3 8B)
    norm_eps: float = 1e-5  # epsilon of every LayerNorm / RMSNorm (HF Llama's rms_norm_eps; its default 1e-6)
    # the residual-stream output projections (attention and MLP c_proj) and an untied head start at zero
    # (modded-nanogpt): each block begins as the identity and the first logits are uniform; initial values only
    zero_init: bool = False


@dataclass
class DataConfig:
    dir: str = "data/default"  # prepared shards (python -m data_prep); prepared from `inputs` if missing
    inputs: list[str] = field(default_factory=list)  # files, directories or globs; ${stdlib} expands
    exclude: list[str] = field(default_factory=list)  # globs left out of `inputs`
    url: str = ""  # when `inputs` is empty: downloaded once to DIR.download/NAME and prepared from
    sha256: str = ""  # checksum the download must match
    tokenizer: str = "bpe"  # "bpe" (byte-level, HF tokenizers) or "char"
    vocab_size: int = 8192  # tokenizer vocabulary to train (bpe)
    val_fraction: float = 0.1
    text_field: str = "text"  # JSONL field holding the text
    # several prepared sources mixed by weight, each "ROLE:WEIGHT:DIR" with ROLE new or replay, e.g.
    # ["new:0.75:data/B", "replay:0.25:data/A"]; empty: `dir` alone. Every global batch holds exactly
    # WEIGHT of its samples from each source (the global batch times each weight must be a whole number).
    sources: list[str] = field(default_factory=list)
    # named validation sets "NAME:DIR" (the val split of DIR), logged as val/NAME_loss; empty: the val split
    # of `dir`, or of each source named by its role. A set named "new" reports adaptation, "replay" forgetting.
    val_sets: list[str] = field(default_factory=list)
    # Packed sequences stay packed, but no token attends across an EOS (the end of its document) and positions
    # restart at each document's first token.
    document_mask: bool = False
    # input augmentation, "KIND:P" each (lm/augment.py): "swap:P" (adjacent tokens), "noise:P" (random ids),
    # "drop:P" (EOS in place of a token); on inputs only, reproducible under resume. E.g. ["swap:0.02"]
    augment: list[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    # adamw | sgd (momentum, Nesterov) | rmsprop | muon (Muon for the blocks' weight matrices, AdamW for the
    # embeddings, norms and biases); lm/optim.py
    name: str = "adamw"
    lr: float = 6e-4  # peak learning rate
    min_lr: float = 6e-5  # floor of the cosine decay
    warmup_steps: int = 100
    decay_steps: int = 0  # steps of cosine decay after warmup; 0: until train.max_steps
    schedule: str = "cosine"  # after warmup: cosine, linear, wsd, constant, step, plateau (see lm/optim.py)
    wsd_decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr
    step_every: int = 1000  # step: multiply the lr by step_gamma every this many steps
    step_gamma: float = 0.5
    plateau_patience: int = 3  # plateau: evaluations without a new best val loss before lowering the lr
    plateau_factor: float = 0.5
    rewarm_at: int = 0  # restart the schedule (warmup, then decay) at this step, e.g. when a run continues
    weight_decay: float = 0.1  # applied to weight matrices and embeddings only, never biases or norms
    beta1: float = 0.9
    beta2: float = 0.95  # AdamW's second-moment decay; RMSprop's smoothing constant (torch's alpha)
    eps: float = 1e-8
    momentum: float = -1.0  # sgd, rmsprop, muon: -1 takes each one's usual value (sgd 0.9, rmsprop 0, muon 0.95)
    nesterov: bool = True  # sgd and muon: Nesterov momentum (Muon's reference uses it); moot at momentum 0
    # muon: peak lr of the hidden matrices, scaled by the schedule like optim.lr; 0: optim.lr (their update
    # is scaled to AdamW's RMS, so AdamW's lr and weight decay carry over)
    muon_lr: float = 0.0
    ns_steps: int = 5  # muon: Newton-Schulz iterations
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # layer-wise lr decay (fine-tuning): block i of n gets lr x decay^(n - i), the embeddings decay^(n + 1), the
    # final norm and the heads 1; 1.0: off
    layer_decay: float = 1.0


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    max_steps: int = 1000
    batch_size: int = 12  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_interval: int = 250  # steps between validation runs (and checkpoints)
    eval_sequences: int = 240  # validation windows per set and evaluation: the same for any world size
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    checkpoint_interval: int = 0  # steps between checkpoints; 0: at every evaluation
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "auto"  # "auto" (bf16 on GPUs that support it, else fp32), "float32", "bfloat16", "float16"
    seed: int = 1337
    threads: int = 0  # CPU threads for torch; 0 leaves torch's default
    task: str = "lm"  # "lm" (next-token prediction) or "classify" (sequence classification: [classify], lm/classify.py)


@dataclass
class LogConfig:
    interval: int = 10  # steps between metric lines
    progress: bool = True  # console progress bar
    wandb: bool = False
    wandb_project: str = "lmforge"
    run_name: str = ""  # defaults to the out_dir's name


@dataclass
class ParallelConfig:
    activation_checkpointing: str = "none"  # "none", "full" (every block) or "every" (every ac_every-th)
    ac_every: int = 2
    reshard_after_forward: bool = True  # FSDP2: free gathered weights after forward (ZeRO-3) or keep them
    compile: str = "none"  # torch.compile: "none", "blocks" (each block) or "model" (the whole model)
    replicas: int = 1  # HSDP: groups that each shard the model over world / replicas ranks (e.g. per node)


@dataclass
class StabilityConfig:
    rollback_after: int = 5  # this many skipped (non-finite) steps in a row: reload the last checkpoint
    rollback_lr_factor: float = 1.0  # and scale the learning rate by this
    spike_zscore: float = 0.0  # skip a step whose loss is this many std above the recent mean (0: off)
    spike_window: int = 100  # steps in that running mean
    loss_scale: float = 65536.0  # float16: initial dynamic loss scale


@dataclass
class InitConfig:
    # where the starting weights come from: "" (random init), a run or checkpoint directory of ours,
    # or "hf:DIR" (a local Hugging Face GPT-2-architecture directory); written `from` in TOML
    from_: str = ""
    optimizer: bool = False  # also load the optimizer state (moments, momentum) of that checkpoint; same optim.name


@dataclass
class SFTConfig:
    # prompt/completion tuning (lm/sft.py): JSONL examples, the loss on completion tokens only, packed
    # without attention across examples; data.dir gives the tokenizer (its shards are not read)
    train_file: str = ""
    val_file: str = ""  # empty: val_fraction of train_file's examples
    val_fraction: float = 0.1
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"  # a chat: [{role, content}, ...] ending with the assistant's turn


@dataclass
class ClassifyConfig:
    # sequence classification (train.task = "classify", lm/classify.py): a head on the pooled hidden state;
    # JSONL examples with a text and a label field; tokenizer from init.from, else data.dir
    train_file: str = ""
    val_file: str = ""  # empty: val_fraction of train_file's examples, held out per class
    val_fraction: float = 0.1
    text_field: str = "text"
    label_field: str = "label"  # strings (integers read as their text)
    labels: list[str] = field(default_factory=list)  # the class order; empty: the training labels, sorted
    max_length: int = 0  # tokens per example with its two EOS (the end of a longer text is cut); 0: model.block_size
    pooling: str = "last"  # "last" (the closing EOS's hidden state) or "mean" (of the real tokens)
    class_weights: str | list[float] = ""  # loss weights: "" none, "balanced" (N / (C n_c)), or one per label
    oversample: bool | list[float] = False  # true: equal class shares per epoch; a list: each label's share
    metric: str = "macro_f1"  # picks the best checkpoint (RUN/best): macro_f1, accuracy or val_loss
    patience: int = 0  # stop after this many evaluations without a new best; 0: never stop early


@dataclass
class DistillConfig:
    # knowledge distillation: the loss is alpha * T^2 * KL(teacher || student) at temperature T plus
    # (1 - alpha) * the usual cross-entropy; the teacher (a run or checkpoint of ours, or "hf:DIR") runs
    # without gradients in eval mode and must share the student's tokenizer
    teacher: str = ""
    temperature: float = 2.0
    alpha: float = 0.5


@dataclass
class EvalConfig:
    # tasks run at every evaluation, logged beside the val loss as eval/NAME/METRIC: "ppl:PATH" (perplexity
    # and bits/byte of text files or a prepared dataset's val split), "mc:FILE.jsonl" (multiple choice);
    # see `python -m lm.eval` and lm/eval/spec.py
    tasks: list[str] = field(default_factory=list)
    limit: int = 0  # the first N documents / examples of each task; 0: all


@dataclass
class ContinualConfig:
    # freezing phases "STEP:K": from STEP on, the embeddings (and the tied head) and the first K blocks
    # are frozen; K = 0 trains everything. E.g. ["0:4", "200:0"]
    freeze: list[str] = field(default_factory=list)
    ewc_batches: int = 0  # EWC on when > 0: old-domain batches estimating the diagonal Fisher at the start
    ewc_lambda: float = 1.0  # penalty (lambda/2) sum F (theta - theta*)^2, with F normalized to mean 1
    ewc_labels: str = "model"  # Fisher labels: "model" (sampled from the model) or "empirical" (the data's)
    ewc_data: str = ""  # prepared old-domain dir for the Fisher; "": the replay source
    ewc_prior: str = ""  # an earlier run's ewc.pt: online EWC, F = ewc_gamma * F_prior + F_new
    ewc_gamma: float = 1.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    init: InitConfig = field(default_factory=InitConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        """Sections and keys as written in TOML (`from_` is `from`)."""
        return {section: {_key(k): v for k, v in values.items()}
                for section, values in dataclasses.asdict(self).items()}


_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
                  "log": LogConfig, "init": InitConfig, "parallel": ParallelConfig, "stability": StabilityConfig,
                 "continual": ContinualConfig, "distill": DistillConfig, "eval": EvalConfig,
                 "sft": SFTConfig, "classify": ClassifyConfig}


def _key(field_name: str) -> str:
    """The TOML key of a dataclass field: a trailing underscore only dodges a Python keyword."""
    return field_name.rstrip("_")


def _build(values: dict[str, dict]) -> Config:
    return Config(**{name: _SECTION_TYPES[name](**{f.name: kv[_key(f.name)]
                                                    for f in dataclasses.fields(_SECTION_TYPES[name])
                                                    if _key(f.name) in kv})
                     for name, kv in values.items()})
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



def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


# Keys of earlier releases: what replaced them.
RENAMED = {("train", "eval_iters"): "train.eval_sequences (validation windows, the same for any world size; "
                                    "eval_iters x batch_size gives the old number)"}


def _unknown_key(where: str, section: str, key: str) -> ConfigError:
    if (section, key) in RENAMED:
        return ConfigError(f"{where}: '{section}.{key}' was replaced by {RENAMED[section, key]}")
    match = difflib.get_close_matches(key, list(_field_types(section)), n=1, cutoff=0.0)
    hint = f" (did you mean '{section}.{match[0]}'?)" if match else ""
    return ConfigError(f"{where}: unknown key '{section}.{key}'{hint}")


def _field_types(section: str) -> dict[str, type]:
    hints = typing.get_type_hints(_SECTION_TYPES[section])
    return {_key(f.name): hints[f.name] for f in dataclasses.fields(_SECTION_TYPES[section])}


def _check_type(where: str, key: str, value, expected):
    """Return `value` converted to `expected` or raise a ConfigError naming `where` and `key`."""
    ok = False
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is str:
        ok = isinstance(value, str)
    elif typing.get_origin(expected) in (typing.Union, types.UnionType):  # the first type that fits
        for option in typing.get_args(expected):
            with contextlib.suppress(ConfigError):
                return _check_type(where, key, value, option)
    elif typing.get_origin(expected) is list and typing.get_args(expected) == (float,):
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        value = [float(v) for v in value] if ok else value
    elif typing.get_origin(expected) is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        name = getattr(expected, "__name__", str(expected))
        raise ConfigError(f"{where}: '{key}' must be {name}, got {type(value).__name__} {value!r}")
    return value


def _merge(raw: dict, where: str, into: dict[str, dict]):
    for section, values in raw.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(f"{where}: unknown section '{section}'{_closest(section, _SECTION_TYPES)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: '{section}' must be a table of keys")
        types = _field_types(section)
        for key, value in values.items():
            if key not in types:
                raise _unknown_key(where, section, key)
            into[section][key] = _check_type(where, f"{section}.{key}", value, types[key])


def parse_override(text: str) -> tuple[str, str, object]:
    """`section.key=value` -> (section, key, value); the value is read as TOML where the field is not a str."""
    where = f"override '{text}'"
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"{where}: expected section.key=value (e.g. train.max_steps=100)")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    if section not in _SECTION_TYPES:
        raise ConfigError(f"{where}: unknown section '{section}'{_closest(section, _SECTION_TYPES)}")
    types = _field_types(section)
    if key not in types:
        raise _unknown_key(where, section, key)
    raw = raw.strip()
    if types[key] is str:
        value = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" else raw
    else:
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
    return section, key, value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (or only defaults when `path` is None), apply overrides, validate."""
    values: dict[str, dict] = {name: {} for name in _SECTION_TYPES}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        _merge(raw, str(path), values)
    origins = {}  # "section.key" -> the override that set it, so a bad value names the override
    for text in overrides:
        section, key, value = parse_override(text)
        _merge({section: {key: value}}, f"override '{text}'", values)
        origins[f"{section}.{key}"] = f"override '{text}'"

    preset = values["model"].get("preset", "")
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"{path or 'config'}: unknown model.preset '{preset}'{_closest(preset, PRESETS)}")
        values["model"] = {**PRESETS[preset], **values["model"]}
    cfg = _build(values)
    validate(cfg, str(path) if path is not None else "config", origins)
    # the keys the file, its preset or an override set (not defaults): init.from fills in the others
    cfg.given = frozenset(f"{section}.{key}" for section, keys in values.items() for key in keys)
    return cfg


def validate(cfg: Config, where: str, origins: dict[str, str] | None = None):
    """Reject impossible values, naming the key and where it was set (the file, or an override)."""
    def bad(key, why):
        raise ConfigError(f"{(origins or {}).get(key, where)}: {key} {why}")

    for section in _SECTION_TYPES:  # TOML reads inf and nan: no setting takes them
        for key, value in vars(getattr(cfg, section)).items():
            if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
                bad(f"{section}.{key}", f"= {value}: must be a finite number (not inf or nan)")
    for (section, key), options in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in options:
            bad(f"{section}.{key}", f"is '{value}'; choose one of {', '.join(options)}{_closest(value, options)}")
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
        from lm.eval.spec import parse_tasks  # (lm.eval imports this module)

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


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that `load_config` reads back to an equal Config."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def config_from_toml_text(text: str, where: str) -> Config:
    """Rebuild a Config saved by `to_toml` (e.g. inside a checkpoint)."""
    values: dict[str, dict] = {name: {} for name in _SECTION_TYPES}
    _merge(_upgrade(tomllib.loads(text)), where, values)
    cfg = _build(values)
    validate(cfg, where)
    return cfg


def _upgrade(raw: dict) -> dict:
    """A config saved by an earlier release, in today's keys (so its checkpoints still load)."""
    parallel = raw.get("parallel")
    if isinstance(parallel, dict) and isinstance(parallel.get("compile"), bool):
        parallel["compile"] = "blocks" if parallel["compile"] else "none"
    train = raw.get("train")
    if isinstance(train, dict) and "eval_iters" in train:
        iters = train.pop("eval_iters")
        train.setdefault("eval_sequences", iters * train.get("batch_size", TrainConfig.batch_size))
    return raw
