"""GPT-2's block against each modern option and against all of them together (the Llama-style block), at
equal parameters and steps, on shakespeare_char and the quickstart corpus: val loss and tokens/s on CPU.

Each variant widens or narrows its MLP (model.mlp_hidden) so its parameter count is the GPT-2 block's to
within one MLP column; everything else (data order, steps, schedule, seed) is the same.

    python bench/blocks.py ../shared/data/tinyshakespeare.txt [--steps-char 1000 --steps-code 300]
    python bench/blocks.py TEXT --only gpt2,llama        (a subset of the variants)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep import prepare  # noqa: E402
from lm.config.load import load_config
from lm.config.schema import ModelConfig  # noqa: E402
from lm.training.plan import param_shapes  # noqa: E402

# the GPT-2 block is the reference; one option at a time; then all of them (Llama's block)
VARIANTS = {
    "gpt2": {},
    "rmsnorm": {"norm": "rmsnorm"},
    "rope": {"position": "rope"},
    "swiglu": {"mlp": "swiglu"},
    "gqa": {"n_kv_head": "half"},
    "qk_norm": {"qk_norm": True},
    "no bias": {"bias": False},
    "llama": {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "n_kv_head": "half", "bias": False},
}


def count(m: ModelConfig) -> int:
    return sum(math.prod(shape) for _, shape in param_shapes(m))


def equal_parameters(base: ModelConfig, option: dict) -> ModelConfig:
    """`base` with `option`, its MLP width chosen so the parameter count is closest to base's."""
    option = {k: (base.n_head // 2 if v == "half" else v) for k, v in option.items()}
    m = replace(base, **option)
    target = count(base)
    at_1, at_2 = count(replace(m, mlp_hidden=1)), count(replace(m, mlp_hidden=2))
    return replace(m, mlp_hidden=max(1, round((target - at_1) / (at_2 - at_1)) + 1))


def run(config: Path, overrides: list[str], model: ModelConfig, out: Path) -> dict:
    from lm.training.trainer import Trainer

    shape = [f"model.{k}={json.dumps(getattr(model, k))}" for k in
             ("norm", "position", "mlp", "mlp_hidden", "n_kv_head", "qk_norm", "bias")]
    cfg = load_config(config, [*overrides, *shape, f"train.out_dir={out}", "log.progress=false",
                               "train.checkpoint_interval=1000000", "train.device=cpu"])
    trainer = Trainer(cfg)
    start = time.perf_counter()
    result = trainer.run()
    wall = time.perf_counter() - start
    trainer.close()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    speeds = speeds[1:] or speeds  # the first window warms up
    return {"params": trainer.num_params, "val_loss": result["val_loss"], "val_bpb": result["val_bpb"],
            "tokens_per_s": sum(speeds) / len(speeds), "wall_s": wall}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("text", type=Path, help="tinyshakespeare.txt (the character corpus)")
    p.add_argument("--steps-char", type=int, default=1000)
    p.add_argument("--steps-code", type=int, default=300)
    p.add_argument("--only", default="", help="comma-separated variants (default: all)")
    p.add_argument("--code-data", type=Path, default=ROOT / "data" / "stdlib_code",
                   help="the quickstart corpus, prepared here on first use")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "blocks.json")
    p.add_argument("--smoke", action="store_true", help="a few steps of a tiny model (the test suite's check)")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: --only: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare([str(args.text)], tmp / "char", tokenizer="char", val_fraction=0.1, show_progress=False)
        smoke = ["model.n_layer=1", "model.n_embd=32", "model.n_head=4", "model.block_size=32",
                 "train.eval_sequences=8", "train.batch_size=4"] if args.smoke else []
        corpora = {
            "shakespeare_char": (ROOT / "configs" / "shakespeare_char.toml",
                                 [f"data.dir={tmp / 'char'}", f"train.max_steps={args.steps_char}",
                                  f"train.eval_interval={args.steps_char}", *smoke]),
            "quickstart": (ROOT / "configs" / "quickstart.toml",
                           [f"data.dir={args.code_data}", f"train.max_steps={args.steps_code}",
                            f"train.eval_interval={args.steps_code}", "optim.warmup_steps=20", *smoke]),
        }
        for corpus, (config, overrides) in corpora.items():
            if args.smoke:  # the character data stands in for the stdlib corpus, which takes a while to prepare
                overrides = [*overrides, f"data.dir={tmp / 'char'}", "data.inputs=[]"]
            # GPT-2's block has biases (the configs leave them out); every variant has the same embedding,
            # so only the rest is matched
            base = replace(load_config(config, overrides).model, bias=True, vocab_size=1)
            for name in names:
                model = equal_parameters(base, VARIANTS[name])
                r = run(config, overrides, model, tmp / f"{corpus}-{name.replace(' ', '_')}")
                r["mlp_hidden"] = model.mlp_hidden
                results.setdefault(corpus, {})[name] = r
                print(f"{corpus:17} {name:8} params {r['params']:>9,} mlp {model.mlp_hidden:>4}  val loss "
                      f"{r['val_loss']:.4f}  {r['tokens_per_s']:>8,.0f} tok/s", flush=True)
    print(f"\n{'corpus':17} {'block':8} {'params':>10} {'val loss':>9} {'vs gpt2':>8} {'tok/s':>9} {'vs gpt2':>8}")
    for corpus, rows in results.items():
        ref = rows.get("gpt2")
        for name, r in rows.items():
            dl = f"{r['val_loss'] - ref['val_loss']:+.4f}" if ref else ""
            ds = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else ""
            print(f"{corpus:17} {name:8} {r['params']:>10,} {r['val_loss']:9.4f} {dl:>8} "
                  f"{r['tokens_per_s']:9,.0f} {ds:>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": {"shakespeare_char": args.steps_char, "quickstart": args.steps_code},
                                    "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
