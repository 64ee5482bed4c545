"""`python -m lm.grow RUN OUT ...`: read a run, grow its model (lm/grow/__init__.py says how), write OUT
atomically; `--plan` prints parameters and per-GPU memory before and after (lm/training/plan.py), from a run or a
config file, writing nothing."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from data_prep import DataError, load_tokenizer
from lm.training import checkpoint, checkpoint_save
from lm.training.checkpoint import CheckpointError
from lm.config.load import load_config
from lm.config.schema import Config, ConfigError, ModelConfig
from lm.files import check_destination, output_dir
from lm.grow import DEPTH_METHODS, GrowSpec, block_sources, grow_model, grown_config, shape_summary
from lm.model.gpt import GPT
from lm.compress.prune import MASKS_FILE

RECORD = "grow.json"
SHAPE_KEYS = ("n_layer", "n_embd", "n_head", "n_kv_head", "mlp_hidden")  # shape_summary's order


# ---- reading the source and writing OUT -----------------------------------------------------------------
def _source(path: str) -> tuple[Path, Config]:
    ckpt = checkpoint.resolve(path)
    cfg = checkpoint.load_config(ckpt)
    if cfg.train.task != "lm":
        raise ConfigError(f"{ckpt}: a train.task = '{cfg.train.task}' run; grow the language model it was "
                          "fine-tuned from and fine-tune the grown one")
    return ckpt, cfg


def _load_model(ckpt: Path, cfg: Config) -> GPT:
    from lm.model.attention import inference_backends

    model = GPT(inference_backends(cfg.model, "cpu"))
    checkpoint.load_model(ckpt, model)
    return model.eval()


def grown_run_config(cfg: Config, new_model: ModelConfig, out: Path) -> Config:
    """The source run's config with the grown shape, starting from OUT, training into a new directory."""
    new = dataclasses.replace(cfg, model=new_model)
    new.init = dataclasses.replace(cfg.init, from_=str(out), optimizer=False)
    new.train = dataclasses.replace(cfg.train, out_dir=f"{out}-continued")
    return new


def write_grown(out: Path, ckpt: Path, cfg: Config, model: GPT, record: dict, force: bool = False):
    """OUT, built in a temporary sibling and renamed into place when complete (lm.files.output_dir: an
    existing OUT only with force; a full disk leaves nothing)."""
    from lm.config.load import to_toml

    tokenizer = ckpt / load_tokenizer(ckpt).file_name
    with output_dir(out, force) as tmp:
        optimizer = torch.optim.AdamW(model.parameters())  # no state: the continued run starts its own
        info = {"samples": 0, "world_size": 1, "skipped_steps": 0, "rollbacks": 0,
                "loss_scale": cfg.stability.loss_scale, "recent_losses": [], "schedule": {}, "val_loss": None,
                "params": model.num_params(), "grown_from": str(ckpt)}
        checkpoint_save.save(tmp, 0, model, optimizer, info, cfg, tokenizer, keep_last=1)
        (tmp / "config.toml").write_text(to_toml(cfg))
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def grow(source: str, out: Path, spec: GrowSpec, force: bool = False) -> dict:
    """Load `source`, grow it by `spec`, write OUT; returns the record written as OUT/grow.json."""
    ckpt, cfg = _source(source)
    new_model = grown_config(cfg.model, spec)  # every refusal before any weight is read
    old_blocks = cfg.model.n_layer // cfg.model.share_layers
    sources = block_sources(old_blocks, new_model.n_layer // new_model.share_layers, spec.depth, spec.where)
    check_destination(out, force, directory=True, keep=[ckpt])  # before any weight is read
    model = _load_model(ckpt, cfg)
    if (ckpt / MASKS_FILE).is_file():
        print(f"note: {ckpt / MASKS_FILE} (pruning masks) is not carried over: the grown model's shape differs, "
              "and every weight of it trains", file=sys.stderr)
    # built with the kernels that run here (as the source was loaded); the config keeps the run's choice
    here = dataclasses.replace(new_model, attention=model.cfg.attention, layernorm=model.cfg.layernorm)
    grown = grow_model(model, here, sources, spec.noise_snr_db, spec.seed)
    run_cfg = grown_run_config(cfg, new_model, out)
    record = {"source": str(ckpt), "depth": spec.depth, "blocks": sources,
              "function_preserving": spec.depth == "zero" or old_blocks == len(sources),
              "noise_snr_db": spec.noise_snr_db if math.isfinite(spec.noise_snr_db) else None, "seed": spec.seed,
              "params": {"before": model.num_params(), "after": grown.num_params()},
              "shape": {"before": dict(zip(SHAPE_KEYS, shape_summary(cfg.model))),
                        "after": dict(zip(SHAPE_KEYS, shape_summary(new_model)))}}
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
    from lm.training.plan import plan

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
             f"  before: {shape.format(*shape_summary(old))}", f"  after:  {shape.format(*shape_summary(new))}",
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
    import lm.grow

    p = argparse.ArgumentParser(prog="python -m lm.grow", description=lm.grow.__doc__.splitlines()[0])
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
                       help="--depth zero: the grown model's block indices that are new, e.g. 2,5 "
                            "(default: spread evenly)")
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
            from lm.training.plan import parse_memory

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
        try:
            record = grow(args.source, args.out, spec, args.force)
        except OSError as e:  # a full disk, a read-only directory
            raise CheckpointError(f"{args.out}: cannot write the grown run ({e.strerror or e}: {e.filename})") from None
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    before, after = record["params"]["before"], record["params"]["after"]
    exact = "function-preserving" if record["function_preserving"] else "NOT function-preserving (stacked copies)"
    print(f"wrote {args.out}: {before:,} -> {after:,} parameters ({after / before:.2f}x), {exact}")
    print(f"continue training: python train.py {args.out}/config.toml   (init.from = {args.out}, "
          f"train.out_dir = {args.out}-continued; the optimizer and the LR schedule start afresh)")
    return 0
