"""Generation speed: tokens/s with and without the KV cache at 256 and 1024 new tokens, batch 1 and 8;
and int8 weight-only quantization against fp32 for speed and for quality (val perplexity).

    python bench/generate.py [--checkpoint runs/quickstart] [--out bench/results/generate.json]

The speed model is random-init (speed does not depend on the weights) with a context long enough for 1024
new tokens; the int8 quality check needs a trained checkpoint and its prepared val split.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from lm.config import ModelConfig
from lm.generate import generate
from lm.model import GPT
from lm.quantize import quantize_int8

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def generate_without_cache(model: GPT, prompts: list[list[int]], n: int) -> list[list[int]]:
    """The naive loop: the whole sequence goes through the model for every new token (greedy)."""
    tokens = torch.tensor(prompts)
    for _ in range(n):
        logits, _ = model(tokens[:, -model.cfg.block_size:])
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[:, len(prompts[0]):].tolist()


def tokens_per_s(fn, batch: int, n: int) -> float:
    start = time.perf_counter()
    out = fn([[1, 2, 3, 4]] * batch, n)
    assert all(len(row) == n for row in out)
    return batch * n / (time.perf_counter() - start)


def speed_rows(model: GPT, label: str, with_naive: bool) -> list[dict]:
    cached = lambda prompts, n: generate(model, prompts, n, temperature=0)
    rows = []
    for n in (256, 1024):
        for batch in (1, 8):
            row = {"model": label, "new_tokens": n, "batch": batch,
                   "kv_cache_tok_s": tokens_per_s(cached, batch, n)}
            if with_naive:
                row["no_cache_tok_s"] = tokens_per_s(lambda p, k: generate_without_cache(model, p, k), batch, n)
                row["cache_speedup"] = row["kv_cache_tok_s"] / row["no_cache_tok_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def val_perplexity(model: GPT, ckpt_dir: Path, windows: int = 64) -> float:
    from data_prep import TokenReader
    from lm import checkpoint
    from lm.data import SampleStream

    cfg = checkpoint.load_config(ckpt_dir)
    stream = SampleStream(TokenReader(cfg.data.dir, "val"), cfg.model.block_size, seed=0, name="val")
    losses = [model(*stream.batch(i * 8, 8, torch.device("cpu")))[1].item() for i in range(windows // 8)]
    return math.exp(sum(losses) / len(losses))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a trained run for the int8 quality check")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "generate.json")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, block_size=1100, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd)
    model = GPT(cfg).eval()
    result = {"device": "cpu", "threads": torch.get_num_threads(), "model": vars(cfg),
              "params": model.num_params(), "speed": speed_rows(model, "fp32", with_naive=True)}
    result["speed"] += speed_rows(quantize_int8(copy.deepcopy(model)), "int8", with_naive=False)
    if args.checkpoint:
        from lm import checkpoint
        from lm.export import load

        ckpt, trained = load(args.checkpoint)
        fp32_ppl = val_perplexity(trained, ckpt)
        q = quantize_int8(copy.deepcopy(trained))
        result["quality"] = {"checkpoint": str(ckpt), "fp32_val_ppl": fp32_ppl, "int8_val_ppl": val_perplexity(q, ckpt)}
        speed = lambda m: tokens_per_s(lambda pr, n: generate(m, pr, n, temperature=0), 1, 200)
        result["quality"].update({"fp32_tok_s_b1_200": speed(trained), "int8_tok_s_b1_200": speed(q)})

    print(f"\n{'model':6} {'new':>5} {'batch':>5} {'cache tok/s':>12} {'no-cache tok/s':>15} {'speedup':>8}")
    for r in result["speed"]:
        print(f"{r['model']:6} {r['new_tokens']:5d} {r['batch']:5d} {r['kv_cache_tok_s']:12.1f} "
              f"{r.get('no_cache_tok_s', float('nan')):15.1f} {r.get('cache_speedup', float('nan')):8.1f}x")
    if "quality" in result:
        q = result["quality"]
        print(f"\nint8 vs fp32 on {q['checkpoint']}: val perplexity {q['int8_val_ppl']:.3f} vs {q['fp32_val_ppl']:.3f}; "
              f"batch-1 tokens/s {q['int8_tok_s_b1_200']:.1f} vs {q['fp32_tok_s_b1_200']:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
