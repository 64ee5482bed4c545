"""Generation speed: tokens/s with and without the KV cache at 256 and 1024 new tokens, batch 1 and 8, fp32
and int8 (lm/compress/quantize.py) side by side with their ratio; with a trained checkpoint, int8 against fp32 on it:
val perplexity and batch-1 tokens/s.

    python bench/generate.py [--checkpoint runs/quickstart] [--rounds 3] [--out bench/results/generate.json]

The speed model is random-init (speed does not depend on the weights) with a context long enough for 1024
new tokens; the int8 quality check needs a trained checkpoint and its prepared val split. fp32 and int8 run
alternately, `--rounds` times each, and the best round of each is kept: on a shared CPU the other load
then disturbs both alike.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's data_prep package, not bench/data_prep.py beside this file

from lm.config.schema import ModelConfig  # noqa: E402
from lm.model.generate import generate  # noqa: E402
from lm.model.gpt import GPT  # noqa: E402
from lm.compress.quantize import dynamic_engine, quantize_int8  # noqa: E402


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


def rates(fn, batch: int, n: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process): on a shared CPU the second
    leaves out the time other processes held the cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn([[1, 2, 3, 4]] * batch, n)
    assert all(len(row) == n for row in out)
    return batch * n / (time.perf_counter() - wall), batch * n / (time.process_time() - cpu)


def best_of(models: dict, batch: int, n: int, rounds: int) -> dict:
    """{name: (best wall tok/s, best CPU tok/s)} of KV-cache greedy generation, the models run alternately
    `rounds` times so that a change in the machine's other load touches each alike."""
    best = {name: (0.0, 0.0) for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            wall, cpu = rates(lambda p, k: generate(model, p, k, temperature=0), batch, n)
            best[name] = (max(best[name][0], wall), max(best[name][1], cpu))
    return best


def compare(fp32: GPT, int8: GPT, batch: int, n: int, rounds: int) -> dict:
    best = best_of({"fp32": fp32, "int8": int8}, batch, n, rounds)
    (f_wall, f_cpu), (q_wall, q_cpu) = best["fp32"], best["int8"]
    return {"fp32_tok_s": f_wall, "int8_tok_s": q_wall, "int8_over_fp32": q_wall / f_wall,
            "fp32_tok_cpu_s": f_cpu, "int8_tok_cpu_s": q_cpu, "int8_over_fp32_cpu": q_cpu / f_cpu}


def speed_rows(fp32: GPT, int8: GPT, rounds: int, with_naive: bool) -> list[dict]:
    rows = []
    for n in (256, 1024):
        for batch in (1, 8):
            row = {"new_tokens": n, "batch": batch, **compare(fp32, int8, batch, n, rounds)}
            if with_naive:
                row["no_cache_fp32_tok_s"] = tokens_per_s(lambda p, k: generate_without_cache(fp32, p, k), batch, n)
                row["cache_speedup"] = row["fp32_tok_s"] / row["no_cache_fp32_tok_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def val_perplexity(model: GPT, ckpt_dir: Path, windows: int = 64) -> float:
    from data_prep import TokenReader
    from lm.training import checkpoint
    from lm.data.batches import SampleStream

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
    p.add_argument("--rounds", type=int, default=3, help="alternating fp32/int8 rounds; the best of each is kept")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-naive", action="store_true", help="skip the (slow) no-cache reference")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, block_size=1100, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd)
    model = GPT(cfg).eval()
    result = {"device": "cpu", "threads": torch.get_num_threads(), "model": vars(cfg),
              "params": model.num_params(), "int8_engine": dynamic_engine() or "weight-only fallback"}
    result["speed"] = speed_rows(model, quantize_int8(copy.deepcopy(model)), args.rounds, not args.no_naive)
    if args.checkpoint:
        from lm.interop.export import load

        ckpt, trained = load(args.checkpoint)
        q = quantize_int8(copy.deepcopy(trained))
        result["quality"] = {"checkpoint": str(ckpt), "fp32_val_ppl": val_perplexity(trained, ckpt),
                             "int8_val_ppl": val_perplexity(q, ckpt)}
        result["quality"]["batch1_200_tokens"] = compare(trained, q, 1, 200, args.rounds)

    print(f"\nKV-cache greedy tokens/s on the CPU ({result['threads']} threads), int8 = {result['int8_engine']}, "
          f"best of {args.rounds} alternating rounds; wall clock, and per CPU second of this process")
    print(f"{'new':>5} {'batch':>5} {'fp32 tok/s':>11} {'int8 tok/s':>11} {'int8/fp32':>10} {'(CPU time)':>11} "
          f"{'no-cache fp32':>14} {'cache speedup':>14}")
    for r in result["speed"]:
        print(f"{r['new_tokens']:5d} {r['batch']:5d} {r['fp32_tok_s']:11.1f} {r['int8_tok_s']:11.1f} "
              f"{r['int8_over_fp32']:9.2f}x {r['int8_over_fp32_cpu']:10.2f}x "
              f"{r.get('no_cache_fp32_tok_s', float('nan')):14.1f} {r.get('cache_speedup', float('nan')):13.1f}x")
    if "quality" in result:
        q = result["quality"]
        b1 = q["batch1_200_tokens"]
        print(f"\nint8 vs fp32 on {q['checkpoint']}: val perplexity {q['int8_val_ppl']:.3f} vs {q['fp32_val_ppl']:.3f} "
              f"({q['int8_val_ppl'] / q['fp32_val_ppl'] - 1:+.3%}); batch-1 tokens/s {b1['int8_tok_s']:.1f} vs "
              f"{b1['fp32_tok_s']:.1f} ({b1['int8_over_fp32']:.2f}x; per CPU second {b1['int8_over_fp32_cpu']:.2f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
