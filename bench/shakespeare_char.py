"""nanoGPT's CPU baby GPT (configs/shakespeare_char.toml) on a given text file, measured side by side with a
bare training loop in the same invocation: the same model, schedule and evaluations, batches drawn and AdamW
built the nanoGPT way (its per-tensor AdamW on a CPU; lmforge uses the fused one), with nothing else (no
checkpoints, metrics, stability checks or progress bar). Both
run as fresh processes on the same prepared data, timed whole (imports included); the ratio
lmforge / bare is what the framework costs.

    python bench/shakespeare_char.py ../shared/data/tinyshakespeare.txt [--out bench/results/shakespeare_char.json]
    python bench/shakespeare_char.py TEXT train.max_steps=200     (overrides apply to both runs)
    python bench/shakespeare_char.py TEXT --rounds 3              (alternating; the fastest of each compared)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shakespeare_char.toml"


def bare_loop(data_dir: str, out: str, overrides: list[str]):
    """The loop without the framework, as nanoGPT's train.py runs it; writes its val losses to `out`."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from data_prep import TokenReader
    from lm.config.load import load_config
    from lm.data.batches import SampleStream
    from lm.training.evaluation import VAL_SEED
    from lm.model.gpt import GPT
    from lm.training.optim import LRSchedule

    cfg = load_config(CONFIG, [f"data.dir={data_dir}", *overrides])
    reader = TokenReader(data_dir, "train")
    cfg.model.vocab_size = reader.vocab_size
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model, seed=cfg.train.seed)
    # nanoGPT's configure_optimizers: decay on 2-D weights, the fused kernel only on CUDA
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    o = cfg.optim
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    schedule = LRSchedule(cfg.optim, cfg.train.max_steps)
    train = np.memmap(reader.data_dir / reader.shards[0]["file"], dtype=reader.dtype, mode="r")
    val = SampleStream(TokenReader(data_dir, "val"), cfg.model.block_size, VAL_SEED, "val")
    t, block = cfg.train, cfg.model.block_size

    def get_batch():
        ix = torch.randint(len(train) - block - 1, (t.batch_size,))
        x = torch.stack([torch.from_numpy(train[i:i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(train[i + 1:i + 1 + block].astype(np.int64)) for i in ix])
        return x, y

    @torch.no_grad()
    def evaluate():
        model.eval()
        losses = [model(*val.batch(i, t.batch_size, torch.device("cpu")))[1].item()
                  for i in range(0, t.eval_sequences, t.batch_size)]
        model.train()
        return sum(losses) / len(losses)

    vals = {0: evaluate()}
    for step in range(t.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        x, y = get_batch()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % t.eval_interval == 0 or step + 1 == t.max_steps:
            vals[step + 1] = evaluate()
    Path(out).write_text(json.dumps({"val_loss": vals[max(vals)], "steps": t.max_steps}))


def prepare(text: Path, out: Path):
    """TEXT as characters, the last 10% for validation (nanoGPT's split), into `out`."""
    subprocess.run([sys.executable, "-m", "data_prep", "prepare", str(Path(text).resolve()), "--out", str(out),
                    "--tokenizer", "char", "--val-fraction", "0.1"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - start


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--bare"]:  # the child process of the bare-loop run: DATA_DIR OUT_JSON [overrides]
        return bare_loop(argv[1], argv[2], argv[3:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("text", type=Path, help="tinyshakespeare.txt")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shakespeare_char.json")
    p.add_argument("--rounds", type=int, default=1, help="alternating runs of each; the fastest of each is compared")
    p.add_argument("--keep-run", type=Path, help="train lmforge's run here and keep it (e.g. to sample from it)")
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides, applied to both runs")
    args = p.parse_intermixed_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        prepare(args.text, data)
        run = args.keep_run.resolve() if args.keep_run else tmp / "run"
        ours_all, bare_all = [], []
        if run.exists() and any(run.iterdir()):
            raise SystemExit(f"error: --keep-run {run} is not empty")
        for i in range(args.rounds):  # alternating, so a change in the machine's load touches both alike
            if i:
                shutil.rmtree(run)  # the previous round's run, ours
            ours_all.append(timed([sys.executable, "train.py", str(CONFIG), f"data.dir={data}",
                                   f"train.out_dir={run}", "log.progress=false", *args.overrides]))
            bare_all.append(timed([sys.executable, __file__, "--bare", str(data), str(tmp / "bare.json"),
                                   *args.overrides]))
        ours_s, bare_s = min(ours_all), min(bare_all)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        bare = json.loads((tmp / "bare.json").read_text())
    evals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "loss" in r][-1]["step"]
    result = {"config": "configs/shakespeare_char.toml", "text": str(args.text), "steps": steps,
              "overrides": args.overrides, "load_average": os.getloadavg(),
              "lmforge": {"val_loss": evals[-1]["val_loss"], "wall_s": ours_s, "ms_per_step": 1000 * ours_s / steps},
              "bare": {"val_loss": bare["val_loss"], "wall_s": bare_s, "ms_per_step": 1000 * bare_s / steps},
              "ratio_lmforge_over_bare": ours_s / bare_s, "rounds": args.rounds,
              "wall_s_each": {"lmforge": ours_all, "bare": bare_all}}
    print(f"{'':10} {'val loss':>9} {'wall s':>8} {'ms/step':>8}   (whole commands, imports included; "
          f"best of {args.rounds} alternating rounds)")
    for name in ("lmforge", "bare"):
        r = result[name]
        print(f"{name:10} {r['val_loss']:9.4f} {r['wall_s']:8.1f} {r['ms_per_step']:8.1f}")
    print(f"lmforge / bare loop wall time: {result['ratio_lmforge_over_bare']:.3f}x "
          f"(load average {result['load_average'][0]:.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
