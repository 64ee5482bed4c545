"""The run configuration's schema: one dataclass per TOML section, their defaults, and GPT-2/Llama presets.

lm/config/load.py reads TOML and `section.key=value` overrides into these; lm/config/checks.py rejects
impossible values. Every mistake is a one-line `ConfigError` naming where the value came from.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field


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
    loss_chunk: int = 4096  # tokens per chunk of the head + cross-entropy (lm/model/loss.py); 0: whole fp32 logits
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
    # input augmentation, "KIND:P" each (lm/data/augment.py): "swap:P" (adjacent tokens), "noise:P" (random ids),
    # "drop:P" (EOS in place of a token); on inputs only, reproducible under resume. E.g. ["swap:0.02"]
    augment: list[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    # adamw | sgd (momentum, Nesterov) | rmsprop | muon (Muon for the blocks' weight matrices, AdamW for the
    # embeddings, norms and biases); lm/training/optim.py
    name: str = "adamw"
    lr: float = 6e-4  # peak learning rate
    min_lr: float = 6e-5  # floor of the cosine decay
    warmup_steps: int = 100
    decay_steps: int = 0  # steps of cosine decay after warmup; 0: until train.max_steps
    schedule: str = "cosine"  # after warmup: cosine, linear, wsd, constant, step, plateau (see lm/training/optim.py)
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
    task: str = "lm"  # "lm" (next-token prediction) or "classify" (sequence classification: [classify], lm/model/classifier.py)


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
    # prompt/completion tuning (lm/objectives/sft_data.py): JSONL examples, the loss on completion tokens only, packed
    # without attention across examples; data.dir gives the tokenizer (its shards are not read)
    train_file: str = ""
    val_file: str = ""  # empty: val_fraction of train_file's examples
    val_fraction: float = 0.1
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"  # a chat: [{role, content}, ...] ending with the assistant's turn


@dataclass
class ClassifyConfig:
    # sequence classification (train.task = "classify", lm/model/classifier.py): a head on the pooled hidden state;
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
        return {section: {field_key(k): v for k, v in values.items()}
                for section, values in dataclasses.asdict(self).items()}


SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
                  "log": LogConfig, "init": InitConfig, "parallel": ParallelConfig, "stability": StabilityConfig,
                 "continual": ContinualConfig, "distill": DistillConfig, "eval": EvalConfig,
                 "sft": SFTConfig, "classify": ClassifyConfig}

def closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def field_key(field_name: str) -> str:
    """The TOML key of a dataclass field: a trailing underscore only dodges a Python keyword."""
    return field_name.rstrip("_")


def build(values: dict[str, dict]) -> Config:
    return Config(**{name: SECTION_TYPES[name](**{f.name: kv[field_key(f.name)]
                                                    for f in dataclasses.fields(SECTION_TYPES[name])
                                                    if field_key(f.name) in kv})
                     for name, kv in values.items()})
