"""Grow a trained model: `python -m lm.grow RUN OUT --n-layer N --n-embd D [...]`, deeper and wider
without losing what it learned.

Width (HyperCloning, Samragh et al. 2024): every hidden vector x becomes n copies [x, x, ...] (n = D / d).
LayerNorm and RMSNorm see the same mean and variance, so their outputs are copies too. A Linear whose
input is cloned k times gets W / k in each copy's columns, so the copies' contributions add up to W x;
its output is cloned as its rows are. Heads are copied whole (head_dim kept, so RoPE and the attention
scale are untouched): new query head j is old head j // r, new key/value head m old m // s, which keeps
every query with a copy of its key/value head under any grouping. The final norm's gain (and bias) is
divided by n: the tied head then reads n copies of y / n, the same logits. Copies that stayed equal
would get equal gradients and never diverge, so each Linear gets noise that sums to zero over the
copies of each input (HyperCloning's noisy symmetric expansion, signal-to-noise --noise-snr-db): the
function is unchanged and the copies' gradients differ from the first step.

Depth: `zero` inserts new blocks whose two residual output projections (attention's and the MLP's
c_proj, weights and biases) are zero, so each is the identity; the rest of the block is initialized as
a new model's. `stack` copies the trained blocks on top of each other (Du et al. 2024, G_stack): not
function-preserving, the loss jumps (bench/grow.py measures it).

OUT is a run directory with one checkpoint (step 0, no optimizer state) and the grown config: sample.py,
lm.eval, lm.export read it, and `init.from = "OUT"` trains on from it (FSDP, replay, EWC, freezing as
for any run; the optimizer and the LR schedule start afresh). `--plan` prints parameter counts and
per-GPU memory before and after (lm/training/plan.py), from a run or from a config file.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass

import torch

from lm.config.schema import ConfigError, ModelConfig, head_size, mlp_hidden_size
from lm.model.gpt import GPT

DEPTH_METHODS = ("zero", "stack")


@dataclass
class GrowSpec:
    """The grown shape and how to get there; 0 / None keep (or scale) the model's own value."""
    n_layer: int = 0
    n_embd: int = 0
    n_head: int = 0  # 0: n_embd / head_dim (head_dim kept)
    n_kv_head: int = 0  # 0: as many more as the query heads
    mlp_hidden: int = 0  # 0: the MLP width times the width factor
    depth: str = "zero"
    where: list[int] | None = None  # zero: the grown model's block indices that are new; None: spread evenly
    noise_snr_db: float = 10.0  # symmetry-breaking noise of the widened Linears; inf: none
    seed: int = 0


# ---- the grown shape --------------------------------------------------------------------------------
def grown_config(old: ModelConfig, spec: GrowSpec) -> ModelConfig:
    """The grown ModelConfig, or a one-line ConfigError for a shape growth cannot reach while keeping
    the function (shrinking, counts that do not divide, a head size that would change)."""
    if spec.depth not in DEPTH_METHODS:
        raise ConfigError(f"--depth {spec.depth!r}: expected one of {', '.join(DEPTH_METHODS)}")
    n_layer = spec.n_layer or old.n_layer
    n_embd = spec.n_embd or old.n_embd
    _at_least("--n-layer", n_layer, old.n_layer, "n_layer")
    _multiple("--n-embd", n_embd, old.n_embd, "n_embd",
              "HyperCloning copies each hidden vector a whole number of times")
    if n_layer % old.share_layers:
        raise ConfigError(f"--n-layer {n_layer} is not a multiple of model.share_layers = {old.share_layers}: "
                          "each set of shared weights runs that many consecutive layers")
    width = n_embd // old.n_embd
    head_dim = head_size(old)
    old_kv = old.n_kv_head or old.n_head
    n_head = spec.n_head or old.n_head * width
    _multiple("--n-head", n_head, old.n_head, "n_head", "each head is copied a whole number of times")
    if not old.head_dim and n_head * head_dim != n_embd:
        raise ConfigError(f"--n-head {n_head} with --n-embd {n_embd} gives heads of {n_embd / n_head:g}, the model's "
                          f"are {head_dim}: growth keeps each head's size (RoPE's frequencies, qk_norm and the "
                          f"attention scale depend on it); use --n-head {n_embd // head_dim}")
    n_kv_head = spec.n_kv_head or old_kv * (n_head // old.n_head)
    _multiple("--n-kv-head", n_kv_head, old_kv, "n_kv_head", "each key/value head is copied a whole number of times")
    if n_head % n_kv_head:
        raise ConfigError(f"--n-kv-head {n_kv_head} does not divide n_head {n_head}: each key/value head serves "
                          "a whole group of query heads")
    old_hidden = mlp_hidden_size(old)
    hidden = spec.mlp_hidden or old_hidden * width
    _multiple("--mlp-hidden", hidden, old_hidden, "the MLP width", "each hidden unit is copied a whole number of times")
    new = dataclasses.replace(old, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                              n_kv_head=0 if n_kv_head == n_head and not old.n_kv_head else n_kv_head,
                              mlp_hidden=hidden, preset="")
    if not old.mlp_hidden and mlp_hidden_size(dataclasses.replace(new, mlp_hidden=0)) == hidden:
        new.mlp_hidden = 0  # the default rule gives it: keep the config as plain as it was
    if shape_summary(new) == shape_summary(old):
        raise ConfigError("nothing to grow: the shape asked for is the model's own (give --n-layer, --n-embd, "
                          "--n-head, --n-kv-head or --mlp-hidden)")
    if spec.depth == "stack" and spec.where is not None:
        raise ConfigError("--where places new zero blocks; --depth stack copies the trained blocks on top")
    return new


def _at_least(flag, new, old, key):
    if new < old:
        raise ConfigError(f"{flag} {new} would shrink the model (its {key} is {old}): growth only adds")


def _multiple(flag, new, old, key, why):
    _at_least(flag, new, old, key)
    if new % old:
        raise ConfigError(f"{flag} {new} is not a multiple of {key} {old}: {why}")


def shape_summary(m: ModelConfig) -> tuple:
    """(n_layer, n_embd, n_head, n_kv_head, MLP width), defaults resolved."""
    return (m.n_layer, m.n_embd, m.n_head, m.n_kv_head or m.n_head, mlp_hidden_size(m))


def block_sources(old_blocks: int, new_blocks: int, depth: str, where: list[int] | None) -> list[int | None]:
    """For each block of the grown model (blocks of weights: layers / share_layers), the trained block it
    starts from, or None for a new zero block. Zero blocks go where asked, else spread evenly: after
    trained block g come floor((g+1) k / L) - floor(g k / L) of the k new ones."""
    added = new_blocks - old_blocks
    if depth == "stack":
        return [i % old_blocks for i in range(new_blocks)]
    if where is None:
        order: list[int | None] = []
        for g in range(old_blocks):
            order.append(g)
            order += [None] * ((g + 1) * added // old_blocks - g * added // old_blocks)
        return order
    if len(where) != added or len(set(where)) != added or not all(0 <= i < new_blocks for i in where):
        raise ConfigError(f"--where {','.join(map(str, where))}: expected {added} distinct block indices of the "
                          f"grown model in 0..{new_blocks - 1}, one per new block")
    trained = iter(range(old_blocks))
    return [None if i in where else next(trained) for i in range(new_blocks)]


# ---- index maps: which old coordinate each new one copies --------------------------------------------
def _clones(old: int, new: int) -> torch.Tensor:
    """[0..old-1] repeated new / old times: the hidden vector and MLP units as whole copies."""
    return torch.arange(new) % old


def _head_copies(old_heads: int, new_heads: int, head_dim: int) -> torch.Tensor:
    """Each head's rows repeated in place: new head j is old head j // (new / old)."""
    heads = torch.arange(new_heads) // (new_heads // old_heads)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


# ---- widening one tensor ------------------------------------------------------------------------------
def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def widen_linear(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, noise_snr_db: float,
                 generator: torch.Generator) -> torch.Tensor:
    """W' with W'[i, j] = W[rows[i], cols[j]] / (copies of cols[j]), plus noise that sums to zero over
    each input's copies (per row), so that on cloned inputs W' computes W x in every output copy."""
    copies = torch.bincount(cols, minlength=weight.shape[1]).to(weight.dtype)
    grown = weight[rows][:, cols] / copies[cols]
    if math.isfinite(noise_snr_db) and bool((copies > 1).any()):
        std = float(grown.std()) / math.sqrt(10 ** (noise_snr_db / 10))
        noise = torch.randn(grown.shape, generator=generator, dtype=weight.dtype) * std
        mean = torch.zeros(grown.shape[0], weight.shape[1], dtype=weight.dtype).index_add_(1, cols, noise) / copies
        grown += noise - mean[:, cols]
    return grown


# ---- the grown model ----------------------------------------------------------------------------------
@torch.no_grad()
def grow_model(model: GPT, new_cfg: ModelConfig, sources: list[int | None], noise_snr_db: float = 10.0,
               seed: int = 0) -> GPT:
    """A GPT of `new_cfg` computing what `model` computes (for zero depth and any width); blocks with
    source None are new zero blocks, the others copies of that trained block, widened."""
    old = model.cfg
    grown = GPT(new_cfg, seed=seed)  # new blocks' other weights: a new model's initialization
    width = new_cfg.n_embd // old.n_embd
    head_dim = head_size(old)
    hidden = _clones(old.n_embd, new_cfg.n_embd)
    q = _head_copies(old.n_head, new_cfg.n_head, head_dim)
    old_kv, new_kv = old.n_kv_head or old.n_head, new_cfg.n_kv_head or new_cfg.n_head
    kv = _head_copies(old_kv, new_kv, head_dim)
    q_size, kv_size = old.n_head * head_dim, old_kv * head_dim
    units = _clones(mlp_hidden_size(old), mlp_hidden_size(new_cfg))
    # rows and columns of every Linear of a block, by its name inside the block
    linears = {"attn.c_attn": (torch.cat([q, q_size + kv, q_size + kv_size + kv]), hidden),
               "attn.c_proj": (hidden, q), "mlp.c_fc": (units, hidden), "mlp.gate_proj": (units, hidden),
               "mlp.up_proj": (units, hidden), "mlp.c_proj": (hidden, units)}
    old_params = dict(model.named_parameters())

    def fill(name: str, value: torch.Tensor):
        grown.get_parameter(name).copy_(value)

    for table in ("wte", "wpe"):
        if table in model.transformer:
            fill(f"transformer.{table}.weight", model.transformer[table].weight[:, hidden])
    for key in ("weight", "bias"):  # the tied head reads `width` copies: each carries 1 / width of y
        if f"transformer.ln_f.{key}" in old_params:
            fill(f"transformer.ln_f.{key}", old_params[f"transformer.ln_f.{key}"][hidden] / width)
    for i, source in enumerate(sources):
        prefix = f"transformer.h.{i}"
        if source is None:  # the identity: both residual branches add zero until training moves them
            for proj in ("attn.c_proj", "mlp.c_proj"):
                for p in grown.get_submodule(f"{prefix}.{proj}").parameters():
                    p.zero_()
            continue
        for name, p in model.transformer.h[source].named_parameters():
            module, key = name.rsplit(".", 1)
            target = f"{prefix}.{name}"
            if module in linears:
                rows, cols = linears[module]
                value = p[rows] if key == "bias" else widen_linear(
                    p, rows, cols, noise_snr_db, _generator(seed, f"{target}:{source}"))
            elif module in ("ln_1", "ln_2"):
                value = p[hidden]
            else:  # q_norm / k_norm: over one head, whose size growth keeps
                value = p
            fill(target, value)
    return grown


