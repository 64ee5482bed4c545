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
per-GPU memory before and after (lm/plan.py), from a run or from a config file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from data_prep import DataError, load_tokenizer
from lm import checkpoint
from lm.checkpoint import CheckpointError
from lm.config import Config, ConfigError, ModelConfig, head_size, load_config, mlp_hidden_size
from lm.model import GPT
from lm.prune import MASKS_FILE

DEPTH_METHODS = ("zero", "stack")
RECORD = "grow.json"


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
    _multiple("--n-embd", n_embd, old.n_embd, "n_embd", "HyperCloning copies each hidden vector a whole number of times")
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
    if _shape(new) == _shape(old):
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


def _shape(m: ModelConfig) -> tuple:
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


# ---- reading the source and writing OUT -----------------------------------------------------------------
def _source(path: str) -> tuple[Path, Config]:
    ckpt = checkpoint.resolve(path)
    cfg = checkpoint.load_config(ckpt)
    if cfg.train.task != "lm":
        raise ConfigError(f"{ckpt}: a train.task = '{cfg.train.task}' run; grow the language model it was "
                          "fine-tuned from and fine-tune the grown one")
    return ckpt, cfg


def _load_model(ckpt: Path, cfg: Config) -> GPT:
    from lm.attention import inference_backends

    model = GPT(inference_backends(cfg.model, "cpu"))
    checkpoint.load_model(ckpt, model)
    return model.eval()


def grown_run_config(cfg: Config, new_model: ModelConfig, out: Path) -> Config:
    """The source run's config with the grown shape, starting from OUT, training into a new directory."""
    new = dataclasses.replace(cfg, model=new_model)
    new.init = dataclasses.replace(cfg.init, from_=str(out), optimizer=False)
    new.train = dataclasses.replace(cfg.train, out_dir=f"{out}-continued")
    return new


def _fsync(path: Path):
    """A file or a directory (its entries) made durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path):
    """Every file and directory under `directory`, deepest first, then `directory` itself."""
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(path)
    _fsync(directory)


def write_grown(out: Path, ckpt: Path, cfg: Config, model: GPT, record: dict, force: bool = False):
    """OUT, built in a temporary sibling, fsynced, then renamed into place (an existing OUT only with
    force, moved aside first and deleted once the new one is there)."""
    if out.exists() and not force:
        raise CheckpointError(f"{out}: exists; choose another output directory or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.grow-{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = ckpt / load_tokenizer(ckpt).file_name
    try:
        optimizer = torch.optim.AdamW(model.parameters())  # no state: the continued run starts its own
        info = {"samples": 0, "world_size": 1, "skipped_steps": 0, "rollbacks": 0,
                "loss_scale": cfg.stability.loss_scale, "recent_losses": [], "schedule": {}, "val_loss": None,
                "params": model.num_params(), "grown_from": str(ckpt)}
        checkpoint.save(tmp, 0, model, optimizer, info, cfg, tokenizer, keep_last=1)
        from lm.config import to_toml

        (tmp / "config.toml").write_text(to_toml(cfg))
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _fsync_tree(tmp)
        if out.exists():
            aside = out.with_name(f".{out.name}.grow-{os.getpid()}.old")
            os.replace(out, aside)
            os.replace(tmp, out)
            shutil.rmtree(aside)
        else:
            os.replace(tmp, out)
        _fsync(out.parent)  # the rename itself
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def grow(source: str, out: Path, spec: GrowSpec, force: bool = False) -> dict:
    """Load `source`, grow it by `spec`, write OUT; returns the record written as OUT/grow.json."""
    ckpt, cfg = _source(source)
    new_model = grown_config(cfg.model, spec)  # every refusal before any weight is read
    old_blocks = cfg.model.n_layer // cfg.model.share_layers
    sources = block_sources(old_blocks, new_model.n_layer // new_model.share_layers, spec.depth, spec.where)
    if out.exists() and not force:
        raise CheckpointError(f"{out}: exists; choose another output directory or pass --force to replace it")
    if out.resolve() in (ckpt.resolve(), *ckpt.resolve().parents):
        raise CheckpointError(f"{out}: holds the checkpoint being grown ({ckpt}); write the grown run elsewhere")
    model = _load_model(ckpt, cfg)
    if (ckpt / MASKS_FILE).is_file():
        print(f"note: {ckpt / MASKS_FILE} (pruning masks) is not carried over: the grown model's shape differs, "
              "and every weight of it trains", file=sys.stderr)
    # built with the kernels that run here (as the source was loaded); the config keeps the run's choice
    grown = grow_model(model, dataclasses.replace(new_model, attention=model.cfg.attention,
                                                  layernorm=model.cfg.layernorm), sources, spec.noise_snr_db, spec.seed)
    run_cfg = grown_run_config(cfg, new_model, out)
    record = {"source": str(ckpt), "depth": spec.depth, "blocks": sources,
              "function_preserving": spec.depth == "zero" or old_blocks == len(sources),
              "noise_snr_db": spec.noise_snr_db, "seed": spec.seed,
              "params": {"before": model.num_params(), "after": grown.num_params()},
              "shape": {"before": dict(zip(("n_layer", "n_embd", "n_head", "n_kv_head", "mlp_hidden"),
                                           _shape(cfg.model))),
                        "after": dict(zip(("n_layer", "n_embd", "n_head", "n_kv_head", "mlp_hidden"),
                                          _shape(new_model)))}}
    write_grown(out, ckpt, run_cfg, grown, record, force)
    return record


# ---- --plan -------------------------------------------------------------------------------------------
def _source_config(path: str) -> Config:
    """A config file (for planning a growth of a model not trained yet) or a run's config."""
    if path.endswith(".toml") and Path(path).is_file():
        return load_config(path)
    return checkpoint.load_config(checkpoint.resolve(path))


PLAN_ROWS = (("parameters", "params", "{:,}"), ("  non-embedding", "non_embedding_params", "{:,}"),
             ("FLOPs per token", "flops_per_token", "{:.4g}"),
             ("parameters per GPU (GB)", "mem_params", "gb"), ("gradients per GPU (GB)", "mem_grads", "gb"),
             ("optimizer per GPU (GB)", "mem_optimizer", "gb"), ("activations per GPU (GB)", "mem_activations", "gb"),
             ("temporaries per GPU (GB)", "mem_temporaries", "gb"), ("peak per GPU (GB)", "mem_total", "gb"),
             ("fits", "fits", "{}"), ("largest micro-batch", "max_micro_batch", "{}"),
             ("step time (s)", "step_time_s", "{:.2f}"), ("tokens/day", "tokens_per_day", "{:.4g}"))


def plan_growth(cfg: Config, new_model: ModelConfig, **plan_args) -> tuple:
    from lm.plan import plan

    before = plan(cfg, **plan_args)
    after = plan(dataclasses.replace(cfg, model=new_model), **plan_args)
    return before, after


def format_growth_plan(before, after, old: ModelConfig, new: ModelConfig, title: str) -> str:
    def cell(value, fmt):
        return f"{value / 1e9:.2f}" if fmt == "gb" else fmt.format(value)

    shape = "{} layers x {} wide, {} heads ({} kv), MLP {}"
    lines = [f"growth plan: {title} on {before.world_size} x {before.gpu} ({before.gpu_memory / 1e9:.0f} GB), "
             f"{before.dtype}, micro-batch {before.micro_batch} x {before.seq_len}, activation checkpointing "
             f"{before.activation_checkpointing}",
             f"  before: {shape.format(*_shape(old))}", f"  after:  {shape.format(*_shape(new))}",
             f"{'':<28}{'before':>18}{'after':>18}{'ratio':>8}"]
    for label, key, fmt in PLAN_ROWS:
        a, b = getattr(before, key), getattr(after, key)
        ratio = f"{b / a:.2f}x" if isinstance(a, (int, float)) and not isinstance(a, bool) and a else ""
        lines.append(f"{label:<28}{cell(a, fmt):>18}{cell(b, fmt):>18}{ratio:>8}")
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------------
def _where(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected block indices such as 1,3,5") from None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lm.grow", description=__doc__.splitlines()[0])
    p.add_argument("source", help="a run or checkpoint directory (with --plan also a config .toml)")
    p.add_argument("out", nargs="?", type=Path, help="the grown run directory to write")
    shape = p.add_argument_group("the grown shape (unset: kept, or scaled with the width)")
    shape.add_argument("--n-layer", type=int, default=0)
    shape.add_argument("--n-embd", type=int, default=0)
    shape.add_argument("--n-head", type=int, default=0, help="default: n_embd / head_dim (head size kept)")
    shape.add_argument("--n-kv-head", type=int, default=0, help="default: grown like the query heads")
    shape.add_argument("--mlp-hidden", type=int, default=0, help="default: the MLP width x the width factor")
    shape.add_argument("--depth", choices=DEPTH_METHODS, default="zero",
                       help="zero: new identity blocks (function-preserving); stack: copies of the trained blocks")
    shape.add_argument("--where", type=_where, default=None,
                       help="--depth zero: the grown model's block indices that are new, e.g. 2,5 (default: spread evenly)")
    shape.add_argument("--noise-snr-db", type=float, default=10.0,
                       help="signal-to-noise of the zero-sum noise that lets cloned units diverge (inf: none)")
    shape.add_argument("--seed", type=int, default=0, help="new blocks' initialization and the noise")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    plan = p.add_argument_group("--plan: parameters and per-GPU memory before and after, nothing written")
    plan.add_argument("--plan", action="store_true")
    plan.add_argument("--world-size", type=int, default=1)
    plan.add_argument("--gpu", default="H100")
    plan.add_argument("--gpu-memory", default="80GB")
    plan.add_argument("--mfu", type=float, default=0.4)
    plan.add_argument("--micro-batch", type=int, default=None)
    plan.add_argument("--json", action="store_true", help="print the two plans as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = GrowSpec(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_kv_head=args.n_kv_head,
                    mlp_hidden=args.mlp_hidden, depth=args.depth, where=args.where,
                    noise_snr_db=args.noise_snr_db, seed=args.seed)
    try:
        if args.plan:
            from lm.plan import parse_memory

            cfg = _source_config(args.source)
            new_model = grown_config(cfg.model, spec)
            before, after = plan_growth(cfg, new_model, world_size=args.world_size, micro_batch=args.micro_batch,
                                        gpu=args.gpu, gpu_memory=parse_memory(args.gpu_memory), mfu=args.mfu)
            if args.json:
                print(json.dumps({"before": before.to_dict(), "after": after.to_dict()}, indent=2))
            else:
                print(format_growth_plan(before, after, cfg.model, new_model, args.source))
            return 0
        if args.out is None:
            raise ConfigError("give OUT, the directory to write the grown run to (or --plan to only plan)")
        if args.source.endswith(".toml") and Path(args.source).is_file():
            raise ConfigError(f"{args.source}: a config holds no trained weights; grow a run or checkpoint "
                              "(--plan accepts a config)")
        record = grow(args.source, args.out, spec, args.force)
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {args.out}: cannot write the grown run ({e.strerror or e}: {e.filename})", file=sys.stderr)
        return 2
    before, after = record["params"]["before"], record["params"]["after"]
    exact = "function-preserving" if record["function_preserving"] else "NOT function-preserving (stacked copies)"
    print(f"wrote {args.out}: {before:,} -> {after:,} parameters ({after / before:.2f}x), {exact}")
    print(f"continue training: python train.py {args.out}/config.toml   (init.from = {args.out}, "
          f"train.out_dir = {args.out}-continued; the optimizer and the LR schedule start afresh)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
