"""Plan a run before renting GPUs: parameter count, FLOPs per token, per-GPU memory, the largest
micro-batch that fits, and step time / tokens per day at an assumed MFU. Pure arithmetic on the config:
no model, no data, no GPU (`python train.py CONFIG --plan --world-size 64`).

Notation: V vocab, s block_size (sequence length), h n_embd, a n_head, L n_layer, b micro-batch
(sequences per GPU per forward), W world size (GPUs), P parameters.

Parameters (exact, the shapes lm.model.gpt.GPT builds; the output head is tied to the token embedding):
    embedding      V·h + s·h                      (token and position tables)
    per block      12·h² (+ 13·h with biases)      (qkv 3h², attn proj h², MLP 8h²; 2 LayerNorms)
    final norm     h (+ h with biases)
FLOPs per token:   6·P + 12·L·h·s                 (P counts the tied head's matmul, as the trainer's MFU
                                                   does; 12·L·h·s is attention's QKᵀ and AV, fwd + bwd)

Memory per GPU (FSDP2, `lm.training.parallel.shard`: fp32 master weights, bf16 compute, fp32 gradient reduce):
    parameters     4 B × this rank's shard         FSDP2 shards dim 0 of every tensor with torch.chunk:
    gradients      4 B × shard                     ceil(d0 / W) rows per rank, the last ranks fewer or
    optimizer      8 B × shard (AdamW m and v)     none. Rank 0 always holds the largest shard.
    activations    per layer and micro-batch, Korthikanti et al. 2022 ("Reducing Activation
                   Recomputation"): 34·s·b·h + 5·a·s²·b bytes for 2-byte activations. We attend with
                   SDPA (flash), which never stores the s×s scores, so the 5·a·s²·b term is gone:
                   34·s·b·h (× 2 for fp32 activations). Full checkpointing keeps only each block's input,
                   2·s·b·h per layer, plus one block's full 34·s·b·h while it is recomputed; "every" keeps
                   the checkpointed blocks' inputs and the others' full activations. The final LayerNorm
                   adds 4·s·b·h (its input and output).
    logits         model.loss_chunk = 0: b·s·V × (4 + 4 + 4): the fp32 log-probs the loss saves, their
                   gradient and the logits' gradient; + 2 for the bf16 logits themselves when computing in
                   bf16. model.loss_chunk = k > 0 (lm/model/loss.py, the head and the loss chunk by chunk, the
                   gradients computed in the forward): one chunk's logits min(k, b·s)·V × (4 + 2 in bf16:
                   the fp32 softmax and the bf16 copy of its gradient), the fp32 grad_weight accumulator
                   4·V·h (+ 2·V·h for a chunk's bf16 product before it is added), and grad_hidden b·s·h ×
                   (activation bytes under FSDP, 4 in one process, whose autocast keeps the final norm's
                   output fp32), held from the loss to the start of backward.
    temporaries    FSDP2 (W > 1): the all-gathered bf16 weights of the largest block and of the next one
                   (prefetched) 2 × 2·P_block; that block's unsharded bf16 gradient and its fp32 copy for
                   the reduce-scatter 6·P_block; the root module (embeddings, final norm) stays gathered
                   from forward to backward (FSDP2 never reshards the root after forward) 2·P_root. With
                   reshard_after_forward = false every block stays gathered instead: 2·P. One process in
                   bf16: autocast's bf16 weight copies 2·P. Always: the backward gradients of the MLP's 4h
                   hidden before and after GELU, 2 × 4·s·b·h × activation bytes.
    grad-accum     W > 1 and grad_accum > 1: 4 B × P. The trainer skips the reduce-scatter on all but the
                   last micro-step (set_requires_gradient_sync), so FSDP2 keeps every parameter's gradient
                   unsharded, upcast to fp32, between micro-steps. One process accumulates in place: 0.
    peak (total)   params + optimizer + temporaries + max(activations + logits, gradients): gradients are
                   freed every step (zero_grad(set_to_none=True)) and appear in backward while the
                   activations are being freed, so the two never peak together. With grad_accum > 1 the
                   gradients (and the fp32 accumulation buffer) live through the later micro-steps' forward:
                   params + optimizer + temporaries + gradients + grad-accum + activations + logits.
    A micro-batch fits when the peak is at most USABLE_FRACTION of the GPU's memory; the rest goes to
    the CUDA context, NCCL buffers and allocator fragmentation.

Speed at MFU m on W GPUs of peak F FLOP/s (lm.training.metrics.PEAK_FLOPS): tokens/s = m·W·F / (FLOPs per token);
the step (W·b·grad_accum·s tokens) takes tokens / (tokens/s). MFU counts model FLOPs only, so the
recomputation of activation checkpointing is a cost the chosen MFU must absorb.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

from lm.config.schema import Config, ConfigError, ModelConfig, head_size, mlp_hidden_size
from lm.training.metrics import PEAK_FLOPS

USABLE_FRACTION = 0.9
SECONDS_PER_DAY = 86400
_UNITS = {"": 1e9, "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40, "m": 1e6, "mb": 1e6,
          "mib": 2**20}


def parse_memory(text: str) -> float:
    """"80GB" -> 80e9 bytes ("80" means GB; GiB, MB, TB also read)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"--gpu-memory '{text}': expected a size such as 80GB or 96GiB")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def param_shapes(m: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter, in GPT.named_parameters() order (the tied head appears once)."""
    h, head = m.n_embd, head_size(m)
    kv, hidden = (m.n_kv_head or m.n_head) * head, mlp_hidden_size(m)
    shapes = [("transformer.wte.weight", (m.vocab_size, h))]
    if m.position == "learned":
        shapes.append(("transformer.wpe.weight", (m.block_size, h)))

    def linear(name, n_in, n_out):
        shapes.append((f"{name}.weight", (n_out, n_in)))
        if m.bias:
            shapes.append((f"{name}.bias", (n_out,)))

    def norm(name, size=h, kind=m.norm):
        shapes.append((f"{name}.weight", (size,)))
        if m.bias and kind == "layernorm":
            shapes.append((f"{name}.bias", (size,)))

    for i in range(m.n_layer // m.share_layers):  # weights shared by K layers are listed once
        p = f"transformer.h.{i}"
        norm(f"{p}.ln_1")
        linear(f"{p}.attn.c_attn", h, m.n_head * head + 2 * kv)
        linear(f"{p}.attn.c_proj", m.n_head * head, h)
        if m.qk_norm:
            norm(f"{p}.attn.q_norm", head, "rmsnorm")
            norm(f"{p}.attn.k_norm", head, "rmsnorm")
        norm(f"{p}.ln_2")
        if m.mlp == "swiglu":
            linear(f"{p}.mlp.gate_proj", h, hidden)
            linear(f"{p}.mlp.up_proj", h, hidden)
        else:
            linear(f"{p}.mlp.c_fc", h, hidden)
        linear(f"{p}.mlp.c_proj", hidden, h)
    norm("transformer.ln_f")
    if not m.tie_embeddings:
        shapes.append(("lm_head.weight", (m.vocab_size, h)))
    return shapes


def flops_per_token(m: ModelConfig) -> int:
    """Training FLOPs per token: 6 per weight a token passes through (a block shared by K layers counts K
    times) plus attention's 12 L h s (scores and values, forward and backward)."""
    shapes = param_shapes(m)
    block = sum(math.prod(s) for name, s in shapes if name.startswith("transformer.h.0."))
    passed = sum(math.prod(s) for _, s in shapes) + (m.n_layer - m.n_layer // m.share_layers) * block
    return 6 * passed + 12 * m.n_layer * m.n_embd * m.block_size


def shard_numel(shape: tuple[int, ...], world_size: int, rank: int) -> int:
    """Elements of `shape` that FSDP2 gives `rank`: dim 0 split like torch.chunk (equal chunks of
    ceil(d0 / W) rows; the last ranks get a partial chunk or nothing)."""
    rows = shape[0]
    chunk = math.ceil(rows / world_size)
    local_rows = max(0, min(chunk, rows - rank * chunk))
    return local_rows * math.prod(shape[1:])


def _resolved_vocab(cfg: Config) -> ModelConfig:
    m = cfg.model
    if m.vocab_size >= 1:
        return m
    # vocab_size 0 takes the tokenizer's size at training time; the BPE tokenizer will have data.vocab_size
    return replace(m, vocab_size=cfg.data.vocab_size)


@dataclass
class RunPlan:
    world_size: int
    rank: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    dtype: str
    gpu: str
    gpu_memory: float  # bytes
    mfu: float
    activation_checkpointing: str
    params: int
    embedding_params: int
    non_embedding_params: int
    flops_per_token: float
    attention_flops_per_token: float
    mem_params: int  # bytes on this rank
    mem_grads: int
    mem_optimizer: int
    mem_activations: float  # with the config's checkpointing
    mem_activations_none: float  # without checkpointing
    mem_activations_full: float  # with full checkpointing
    mem_activations_no_flash: float  # without checkpointing and without flash attention (reference)
    mem_logits: float  # with the config's model.loss_chunk
    mem_logits_whole: float  # the whole fp32 logits (model.loss_chunk = 0), for comparison
    loss_chunk: int
    mem_temporaries: float
    mem_grad_accum: int  # unsharded fp32 gradients between micro-steps (FSDP2 no-sync)
    mem_total: float
    usable_memory: float
    fits: bool
    max_micro_batch: int  # the largest that fits with the config's checkpointing (0: none)
    max_micro_batch_no_ac: int
    max_micro_batch_full_ac: int
    tokens_per_step: int
    step_time_s: float
    tokens_per_s: float
    tokens_per_day: float

    def to_dict(self) -> dict:
        return asdict(self)


def _plan_dtype(cfg: Config) -> str:
    return "bfloat16" if cfg.train.dtype == "auto" else cfg.train.dtype  # "auto" is bf16 on every H100


def _activation_bytes(m: ModelConfig, b: int, act_bytes: int, mode: str, every: int,
                      flash: bool = True) -> float:
    s, h = m.block_size, m.n_embd
    full_layer = (34 * s * b * h + (0 if flash else 5 * m.n_head * s * s * b)) * act_bytes / 2
    block_input = 2 * s * b * h * act_bytes / 2
    checkpointed = {"none": 0, "full": m.n_layer,
                    "every": len(range(0, m.n_layer, every))}[mode]
    kept = checkpointed * block_input + (m.n_layer - checkpointed) * full_layer
    recompute = full_layer if checkpointed else 0  # one block's activations live again in backward
    final_norm = 4 * s * b * h * act_bytes / 2
    return kept + recompute + final_norm


def _logits_bytes(m: ModelConfig, b: int, dtype: str, sharded: bool) -> float:
    """The loss's logits and what replaces them with model.loss_chunk (see "logits" in the docstring)."""
    tokens, V, h = b * m.block_size, m.vocab_size, m.n_embd
    low = dtype in ("bfloat16", "float16")
    if m.loss_chunk == 0:
        return tokens * V * (12 + (2 if low else 0))
    chunk = min(m.loss_chunk, tokens) * V * (4 + (2 if low else 0))
    grad_weight = V * h * (4 + (2 if low else 0))
    grad_hidden = tokens * h * (2 if sharded and dtype == "bfloat16" else 4)  # fp16: kept in fp32 (lm/model/loss.py)
    return chunk + grad_weight + grad_hidden


def _memory(cfg: Config, m: ModelConfig, world_size: int, rank: int, b: int, dtype: str, mode: str,
            device_activations: bool = True) -> dict:
    """Per-rank bytes of each part for micro-batch b (see the module docstring)."""
    act_bytes = 2 if dtype in ("bfloat16", "float16") else 4
    shapes = param_shapes(m)
    local = sum(shard_numel(shape, world_size, rank) for _, shape in shapes) if world_size > 1 \
        else sum(math.prod(shape) for _, shape in shapes)
    n_params = sum(math.prod(shape) for _, shape in shapes)
    block = sum(math.prod(shape) for name, shape in shapes if name.startswith("transformer.h.0."))
    root = n_params - m.n_layer * block
    s, h, V = m.block_size, m.n_embd, m.vocab_size
    if world_size > 1:
        # blocks gathered at once: the running one and the prefetched next, or all when kept after forward
        gathered = 2 * block if cfg.parallel.reshard_after_forward else m.n_layer * block
        temporaries = act_bytes * (gathered + root) + (act_bytes + 4) * block  # + one block's grads
    else:
        temporaries = 2 * n_params if act_bytes == 2 else 0
    temporaries += 2 * 4 * s * b * h * act_bytes
    return dict(
        mem_params=4 * local, mem_grads=4 * local, mem_optimizer=8 * local,
        mem_activations=_activation_bytes(m, b, act_bytes, mode, cfg.parallel.ac_every),
        mem_logits=_logits_bytes(m, b, dtype, world_size > 1),
        mem_temporaries=temporaries,
        mem_grad_accum=4 * n_params if world_size > 1 and cfg.train.grad_accum > 1 else 0,
    )


def _total(parts: dict, grad_accum: int) -> float:
    """The peak: see "peak (total)" in the module docstring."""
    base = parts["mem_params"] + parts["mem_optimizer"] + parts["mem_temporaries"]
    forward = parts["mem_activations"] + parts["mem_logits"]
    if grad_accum > 1:
        return base + parts["mem_grads"] + parts["mem_grad_accum"] + forward
    return base + max(forward, parts["mem_grads"])


def _max_micro_batch(cfg, m, world_size, rank, dtype, mode, usable, limit=4096) -> int:
    # memory grows linearly in b: find the largest b with total <= usable
    b = 0
    while b < limit and _total(_memory(cfg, m, world_size, rank, b + 1, dtype, mode),
                               cfg.train.grad_accum) <= usable:
        b += 1
    return b


def plan(cfg: Config, world_size: int = 1, micro_batch: int | None = None, gpu: str = "H100",
         gpu_memory: float = 80e9, mfu: float = 0.4, rank: int = 0, dtype: str | None = None) -> RunPlan:
    """The plan for `cfg` on `world_size` GPUs, for `rank` (0 holds the largest shard)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"--world-size {world_size} must be >= 1 (rank {rank} within it)")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu} must be in (0, 1]")
    m = _resolved_vocab(cfg)
    b = micro_batch or cfg.train.batch_size
    if b < 1:
        raise ConfigError(f"--micro-batch {b} must be >= 1")
    dtype = dtype or _plan_dtype(cfg)
    peak = PEAK_FLOPS.get((gpu, dtype))
    if peak is None:
        known = sorted({name for name, _ in PEAK_FLOPS})
        raise ConfigError(f"no peak FLOP/s for GPU '{gpu}' in {dtype}; known: {', '.join(known)}")
    mode = cfg.parallel.activation_checkpointing

    shapes = param_shapes(m)
    n_params = sum(math.prod(shape) for _, shape in shapes)
    embedding = (m.vocab_size + (m.block_size if m.position == "learned" else 0)) * m.n_embd
    attention_flops = 12 * m.n_layer * m.n_embd * m.block_size
    flops = flops_per_token(m)

    parts = _memory(cfg, m, world_size, rank, b, dtype, mode)
    total = _total(parts, cfg.train.grad_accum)
    usable = USABLE_FRACTION * gpu_memory
    act_bytes = 2 if dtype in ("bfloat16", "float16") else 4
    tokens_per_step = world_size * b * cfg.train.grad_accum * m.block_size
    tokens_per_s = mfu * world_size * peak / flops
    return RunPlan(
        world_size=world_size, rank=rank, micro_batch=b, grad_accum=cfg.train.grad_accum,
        seq_len=m.block_size, dtype=dtype, gpu=gpu, gpu_memory=gpu_memory, mfu=mfu,
        activation_checkpointing=mode, params=n_params, embedding_params=embedding,
        non_embedding_params=n_params - embedding, flops_per_token=flops,
        attention_flops_per_token=attention_flops, **parts,
        mem_activations_none=_activation_bytes(m, b, act_bytes, "none", 1),
        mem_activations_full=_activation_bytes(m, b, act_bytes, "full", 1),
        mem_activations_no_flash=_activation_bytes(m, b, act_bytes, "none", 1, flash=False),
        mem_logits_whole=_logits_bytes(replace(m, loss_chunk=0), b, dtype, world_size > 1),
        loss_chunk=m.loss_chunk,
        mem_total=total, usable_memory=usable, fits=total <= usable,
        max_micro_batch=_max_micro_batch(cfg, m, world_size, rank, dtype, mode, usable),
        max_micro_batch_no_ac=_max_micro_batch(cfg, m, world_size, rank, dtype, "none", usable),
        max_micro_batch_full_ac=_max_micro_batch(cfg, m, world_size, rank, dtype, "full", usable),
        tokens_per_step=tokens_per_step, step_time_s=tokens_per_step / tokens_per_s,
        tokens_per_s=tokens_per_s, tokens_per_day=tokens_per_s * SECONDS_PER_DAY,
    )


def _gb(x: float) -> str:
    return f"{x / 1e9:9.2f} GB"


def format_plan(p: RunPlan, title: str = "") -> str:
    """The human-readable table `train.py --plan` prints."""
    ac = p.activation_checkpointing
    fit = "fits" if p.fits else "DOES NOT FIT"
    rows = [
        f"plan{': ' + title if title else ''} on {p.world_size} x {p.gpu} ({p.gpu_memory / 1e9:.0f} GB), {p.dtype}, "
        f"micro-batch {p.micro_batch} x {p.seq_len} tokens, grad_accum {p.grad_accum}, "
        f"activation checkpointing {ac}",
        f"{'parameters':<40}{p.params:>16,}",
        f"{'  embedding (token + position)':<40}{p.embedding_params:>16,}",
        f"{'  non-embedding':<40}{p.non_embedding_params:>16,}",
        f"{'FLOPs per token (6N + 12·L·h·s)':<40}{p.flops_per_token:>16.4g}"
        f"   (attention {p.attention_flops_per_token:.3g})",
        f"memory per GPU (rank {p.rank} of {p.world_size}, largest shard)",
        f"{'  parameters (fp32, sharded)':<40}{_gb(p.mem_params)}",
        f"{'  gradients (fp32, sharded)':<40}{_gb(p.mem_grads)}",
        f"{'  optimizer state (AdamW fp32, sharded)':<40}{_gb(p.mem_optimizer)}",
        f"{'  activations (checkpointing ' + ac + ')':<40}{_gb(p.mem_activations)}"
        f"   (none {p.mem_activations_none / 1e9:.2f}, full {p.mem_activations_full / 1e9:.2f}, "
        f"no flash {p.mem_activations_no_flash / 1e9:.2f})",
        f"{'  logits (fp32 for the loss)':<40}{_gb(p.mem_logits)}"
        + (f"   (chunked: {p.loss_chunk} tokens at a time; whole {p.mem_logits_whole / 1e9:.2f})"
           if p.loss_chunk else "   (whole; model.loss_chunk = 0)"),
        f"{'  temporaries (FSDP gathers, grads)':<40}{_gb(p.mem_temporaries)}",
        f"{'  grad_accum buffer (unsharded fp32)':<40}{_gb(p.mem_grad_accum)}",
        f"{'  peak total (lm/training/plan.py docstring)':<40}{_gb(p.mem_total)}   of {p.usable_memory / 1e9:.1f} GB usable: {fit}",
        f"{'largest micro-batch that fits':<40}{p.max_micro_batch:>9}"
        f"   (no checkpointing {p.max_micro_batch_no_ac}, full {p.max_micro_batch_full_ac})",
        f"{'tokens per step (W·b·accum·s)':<40}{p.tokens_per_step:>16,}",
        f"{f'step time at {p.mfu:.0%} MFU':<40}{p.step_time_s:>11.2f} s",
        f"{'tokens/s (all GPUs)':<40}{p.tokens_per_s:>16,.0f}",
        f"{'tokens/day (all GPUs)':<40}{p.tokens_per_day:>16.4g}   ({p.tokens_per_day / 1e9:.1f}B)",
    ]
    return "\n".join(rows)
