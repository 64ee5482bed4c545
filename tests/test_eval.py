"""Evaluation (lm/eval): perplexity and bits/byte against the model's own log-probabilities, multiple choice
against a brute-force scoring, the CLI's table, JSON and one-line errors, the lm-evaluation-harness adapter
(offline, on a task over local JSONL), and `[eval] tasks` logged at every evaluation of a training run."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_prep import load_tokenizer, prepare
from lm.config.load import load_config
from lm.config.schema import ConfigError
from lm.eval import scoring
from lm.eval.__main__ import main as eval_main
from lm.eval.spec import parse_task
from lm.eval.tasks import ChoiceTask, PerplexityTask, argmax, run_task
from lm.interop.export import load
from lm.model.generate import generate
from lm.training.trainer import Trainer
from tests.conftest import ROOT, assert_user_error

BLOCK = 32
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", f"model.block_size={BLOCK}", "train.batch_size=4",
        "log.progress=false", "train.device=cpu", "train.max_steps=20", "train.eval_interval=10",
        "train.eval_sequences=8", "optim.warmup_steps=5", "optim.lr=3e-3"]
# endings of different lengths, so the summed and the per-character log-likelihoods pick differently
EXAMPLES = [
    {"context": "the quick brown", "endings": ["fox jumps", "pizza", "a lazy dog while seven"], "label": 0},
    {"context": "seven wizards", "endings": ["quietly hex every", "box", "over"], "label": 0},
    {"context": "jolly vexing", "endings": ["box of frozen pizza.", "dog", "the the the the"], "label": 0},
    {"context": "a lazy", "endings": ["dog", "fox jumps over", "zzz"], "label": 1},
    # a context longer than the model's 32 tokens: left-truncated
    {"context": " ".join(["the quick brown fox jumps over a lazy dog."] * 6), "endings": ["while", "über"],
     "label": 0},
]
LONG_TEXT = " ".join("the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jolly "
                     "vexing box of frozen pizza".split()[(i * 5) % 21] for i in range(60)) + ".\n"


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory):
    """A tiny BPE model trained 20 steps with `[eval] tasks = ["mc:...", "ppl:..."]` (evaluations at 0, 10
    and 20)."""
    root = tmp_path_factory.mktemp("eval")
    prepare([str(tiny_corpus)], root / "data", tokenizer="bpe", vocab_size=300, show_progress=False)
    mc = write_jsonl(root / "mc.jsonl", EXAMPLES)
    (root / "short.txt").write_text("the quick brown fox. über.\n")
    (root / "long.txt").write_text(LONG_TEXT)
    cfg = load_config(None, [*TINY, f"data.dir={root / 'data'}", f"train.out_dir={root / 'run'}",
                             f'eval.tasks=["mc:{mc}", "ppl:{root / "long.txt"}"]'])
    Trainer(cfg).run()
    ckpt, model = load(root / "run")
    return SimpleNamespace(root=root, dir=root / "run", ckpt=ckpt, model=model, tok=load_tokenizer(ckpt), mc=mc)


def token_logprobs(model, seq: list[int]) -> torch.Tensor:
    """log p(seq[i+1] | seq[:i+1]) for every i, from one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]]))[0][0]
    return logits.log_softmax(-1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0].double()


def ppl_task(run, name: str, stride=None) -> PerplexityTask:
    return PerplexityTask(parse_task(f"ppl:{run.root / name}"), run.tok, run.ckpt / run.tok.file_name, BLOCK,
                          stride=stride)


# ---------------------------------------------------------------- perplexity and bits/byte
def test_perplexity_of_a_text_shorter_than_the_context_is_exp_of_the_mean_token_loss(run):
    text = (run.root / "short.txt").read_text()
    ids = run.tok.encode(text)
    assert len(ids) < BLOCK
    nll = -token_logprobs(run.model, [run.tok.eos_id] + ids)  # predicted from the document start (EOS)
    task = ppl_task(run, "short.txt")
    m = run_task(task, run.model, 4, "cpu")
    assert m["tokens"] == len(ids) and m["documents"] == 1
    assert m["loss"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert m["ppl"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    # bits per UTF-8 byte of the text ("ü" is 2 bytes): total nats / ln 2 / bytes
    assert m["bytes"] == len(text.encode("utf-8")) == len(text) + 1
    assert m["bpb"] == pytest.approx(nll.sum().item() / math.log(2) / m["bytes"], rel=1e-5)


def reference_nll(model, seq: list[int], block: int, stride: int) -> torch.Tensor:
    """Each target k (seq[k+1]) with the context the sliding window gives it: windows end at block,
    block + stride, ... (capped at n) and start block tokens before their end. Targets sharing a context
    start are read off one forward pass over that start's longest context (causal: the same log-probs)."""
    n = len(seq) - 1
    starts = [max(0, min(n, block if k < block else block + stride * math.ceil((k + 1 - block) / stride)) - block)
              for k in range(n)]
    out = torch.zeros(n, dtype=torch.float64)
    for start in sorted(set(starts)):
        ks = [k for k in range(n) if starts[k] == start]
        logp = token_logprobs(model, seq[start:max(ks) + 2])
        assert max(ks) + 1 - start <= block
        out[ks] = -logp[[k - start for k in ks]]
    return out


@pytest.mark.parametrize("stride", [8, None, BLOCK])  # None: the default, half the context
def test_perplexity_of_a_longer_text_uses_a_sliding_window_with_the_stride(run, stride):
    ids = run.tok.encode(LONG_TEXT)
    assert len(ids) > 3 * BLOCK
    task = ppl_task(run, "long.txt", stride)
    assert task.stride == (stride or BLOCK // 2)
    ref = reference_nll(run.model, [run.tok.eos_id] + ids, BLOCK, task.stride)
    m = run_task(task, run.model, 3, "cpu")
    assert m["tokens"] == len(ids)
    assert m["loss"] == pytest.approx(ref.mean().item(), rel=1e-5)
    assert m["ppl"] == pytest.approx(math.exp(ref.mean().item()), rel=1e-5)
    assert m["bpb"] == pytest.approx(ref.sum().item() / math.log(2) / len(LONG_TEXT.encode()), rel=1e-5)


def test_rolling_windows_score_each_token_once_with_full_windows():
    for n in (0, 1, 5, 32, 33, 100):
        for stride in (1, 7, 16, 32):
            reqs = scoring.rolling(99, list(range(n)), 32, stride)
            assert sum(r.n_score for r in reqs) == n
            assert all(len(r.tokens) == min(n, 32) + 1 for r in reqs)  # every window as long as it can be
            scored = [t for r in reqs for t in r.tokens[-r.n_score:]]
            assert scored == list(range(n))


def test_a_prepared_directory_is_scored_on_its_val_documents(run):
    task = PerplexityTask(parse_task(f"ppl:{run.root / 'data'}:name=val"), run.tok, run.ckpt / run.tok.file_name,
                          BLOCK)
    from data_prep import TokenReader

    reader = TokenReader(run.root / "data", "val")
    assert task.name == "val" and task.documents == reader.num_docs
    assert task.tokens == sum(len(reader.document(i)) for i in range(reader.num_docs))


# ---------------------------------------------------------------- multiple choice
def brute_force_loglikelihoods(run) -> list[list[float]]:
    """Each ending after its context: lm-evaluation-harness's split (context tokens, then what the whole
    text adds), after EOS, the last block_size + 1 tokens, one unbatched forward per ending."""
    out = []
    for ex in EXAMPLES:
        ctx = run.tok.encode(ex["context"])
        lls = []
        for ending in ex["endings"]:
            cont = run.tok.encode(ex["context"] + " " + ending)[len(ctx):]
            seq = ([run.tok.eos_id] + ctx + cont)[-(BLOCK + 1):]
            lls.append(token_logprobs(run.model, seq)[-len(cont):].sum().item())
        out.append(lls)
    return out


def test_multiple_choice_acc_and_acc_norm_match_a_brute_force_computation(run):
    task = ChoiceTask(parse_task(f"mc:{run.mc}"), run.tok, BLOCK)
    assert len(run.tok.encode(EXAMPLES[-1]["context"])) > BLOCK  # the truncated one
    scores = scoring.score(run.model, task.requests, 5, "cpu")
    ours, ref = task.loglikelihoods(scores), brute_force_loglikelihoods(run)
    for a, b in zip(ours, ref):
        assert a == pytest.approx(b, abs=1e-4)
    labels = [ex["label"] for ex in EXAMPLES]
    pred = [argmax(lls) for lls in ref]
    pred_norm = [argmax([ll / len(e) for ll, e in zip(lls, ex["endings"])]) for lls, ex in zip(ref, EXAMPLES)]
    pred_bytes = [argmax([ll / len(e.encode()) for ll, e in zip(lls, ex["endings"])]) for lls, ex in zip(ref, EXAMPLES)]
    assert pred != pred_norm, "the examples should include one where length normalization changes the choice"
    m = task.metrics(scores)
    n = len(EXAMPLES)
    assert m["examples"] == n
    assert m["acc"] == sum(p == y for p, y in zip(pred, labels)) / n
    assert m["acc_norm"] == sum(p == y for p, y in zip(pred_norm, labels)) / n
    assert m["acc_bytes"] == sum(p == y for p, y in zip(pred_bytes, labels)) / n


def test_scores_do_not_depend_on_the_batch_size(run):
    task = ChoiceTask(parse_task(f"mc:{run.mc}"), run.tok, BLOCK)
    one, many = (scoring.score(run.model, task.requests, b, "cpu") for b in (1, 7))
    assert torch.allclose(one, many, atol=1e-5)


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


def test_ranks_share_the_requests_and_run_the_same_number_of_forwards(run, monkeypatch):
    """Under torchrun each rank scores every world-th request (FSDP needs equal forwards on every rank,
    an idle one runs a dummy); the sum over ranks is the one-process result."""
    task = ChoiceTask(parse_task(f"mc:{run.mc}"), run.tok, BLOCK)
    assert len(task.requests) == 14  # 5, 5 and 4 over 3 ranks: 3, 3 and 2 batches of 2 (+ 1 dummy)
    monkeypatch.setattr(scoring.dist, "all_reduce", lambda t: None)
    whole = scoring.score(run.model, task.requests, 2, "cpu")
    parts, calls = [], []
    for rank in range(3):
        model = CountingModel(run.model)
        world = SimpleNamespace(rank=rank, size=3, distributed=True)
        parts.append(scoring.score(model, task.requests, 2, "cpu", world=world))
        calls.append(model.calls)
    assert calls == [3, 3, 3]
    assert torch.allclose(sum(parts), whole, atol=1e-5)


# ---------------------------------------------------------------- the command line
@pytest.mark.slow
def test_cli_prints_a_table_and_writes_json(cli, run):
    out = run.root / "results.json"
    r = cli("-m", "lm.eval", run.dir, "--tasks", f"ppl:{run.root / 'short.txt'},mc:{run.mc}", "--out", out,
            "--batch-size", "3")
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["step"] == 20 and report["block_size"] == BLOCK
    short, mc = report["tasks"]["short"], report["tasks"]["mc"]
    assert mc["spec"] == f"mc:{run.mc}" and mc["examples"] == len(EXAMPLES)
    expect_mc = run_task(ChoiceTask(parse_task(f"mc:{run.mc}"), run.tok, BLOCK), run.model, 4, "cpu")
    expect_short = run_task(ppl_task(run, "short.txt"), run.model, 4, "cpu")
    for key in ("acc", "acc_norm", "acc_bytes"):
        assert mc[key] == expect_mc[key]
    for key in ("loss", "ppl", "bpb"):
        assert short[key] == pytest.approx(expect_short[key], rel=1e-5)
    lines = r.stdout.splitlines()
    assert lines[0].startswith(str(run.ckpt)) and "(step 20)" in lines[0]
    assert lines[1].split() == ["task", "metric", "value"]
    assert ["mc", "acc", f"{mc['acc']:.4f}"] in [line.split() for line in lines]
    assert ["short", "bpb", f"{short['bpb']:.4f}"] in [line.split() for line in lines]


def run_main(capsys, *argv):
    """lm.eval's main in this process (a CLI start per case would cost seconds), as a CompletedProcess."""
    code = eval_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


BAD_JSONL = [
    ("bad_json", [EXAMPLES[0], EXAMPLES[1], '{"context": "x", "endings": ["a", "b"], "label": 0'],
     ["bad_json.jsonl: line 3", "not valid JSON"]),
    ("bad_label", [EXAMPLES[0], {"context": "x", "endings": ["a", "b"], "label": 5}],
     ["bad_label.jsonl: line 2", "label 5 is out of range for 2 endings"]),
    ("no_field", [{"context": "x", "choices": ["a", "b"], "label": 0}],
     ["no_field.jsonl: line 1", "no field 'endings'", ":endings=FIELD"]),
    ("one_ending", [{"context": "x", "endings": ["a"], "label": 0}],
     ["one_ending.jsonl: line 1", "at least 2"]),
    ("empty", [], ["empty.jsonl: no examples"]),
]


@pytest.mark.parametrize("name,records,fragments", BAD_JSONL, ids=[b[0] for b in BAD_JSONL])
def test_cli_bad_jsonl_is_a_one_line_error_naming_file_and_line(capsys, run, tmp_path, name, records, fragments):
    path = write_jsonl(tmp_path / f"{name}.jsonl", records)
    assert_user_error(run_main(capsys, run.dir, "--tasks", f"mc:{path}"), *fragments)


@pytest.mark.parametrize("tasks,fragments", [
    ("ppl:{root}/nope.txt", ["nope.txt", "no such file"]),
    ("mc:{root}/nope.jsonl", ["nope.jsonl", "no such file"]),
    ("mc:{root}/mc.jsonl:contxt=q", ["unknown option 'contxt'", "did you mean 'context'"]),
    ("qa:{root}/mc.jsonl", ["task 'qa:", "expected ppl:PATH or mc:FILE.jsonl"]),
    ("ppl:{root}/short.txt:stride=64", ["stride 64", "block_size 32"]),
    ("ppl:{root}/short.txt,mc:{root}/short.jsonl", ["both named 'short'", ":name=NAME"]),
])
def test_cli_bad_task_is_a_one_line_error(capsys, run, tasks, fragments):
    assert_user_error(run_main(capsys, run.dir, "--tasks", tasks.format(root=run.root)), *fragments)


def test_cli_missing_run_is_a_one_line_error(capsys, run, tmp_path):
    assert_user_error(run_main(capsys, tmp_path / "norun", "--tasks", f"mc:{run.mc}"), "norun")


def test_mc_reads_hellaswag_and_arc_layouts(run, tmp_path):
    hellaswag = write_jsonl(tmp_path / "hs.jsonl", [{"ctx": "the quick", "endings": ["fox", "box"], "label": "1"}])
    arc = write_jsonl(tmp_path / "arc.jsonl", [{"question": "a lazy", "answerKey": "B",
                                                "choices": {"text": ["dog", "fox", "box"], "label": ["A", "B", "C"]}}])
    task = ChoiceTask(parse_task(f"mc:{hellaswag}:context=ctx"), run.tok, BLOCK)
    assert [(c, e, y) for _, c, e, y in task.examples] == [("the quick", ["fox", "box"], 1)]
    task = ChoiceTask(parse_task(f"mc:{arc}:context=question:endings=choices:label=answerKey"), run.tok, BLOCK)
    assert [(c, e, y) for _, c, e, y in task.examples] == [("a lazy", ["dog", "fox", "box"], 1)]


def test_eval_config_refuses_a_bad_task_in_one_line():
    with pytest.raises(ConfigError, match=r"eval\.tasks: task 'mc:x.jsonl:labl=y': unknown option 'labl'"):
        load_config(None, ['eval.tasks=["mc:x.jsonl:labl=y"]'])
    with pytest.raises(ConfigError, match=r"eval\.limit"):
        load_config(None, ["eval.limit=-1"])


# ---------------------------------------------------------------- training integration
def test_training_logs_the_tasks_beside_the_val_loss_at_every_evaluation(run):
    records = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    for r in evals:
        assert {"eval/mc/acc", "eval/mc/acc_norm", "eval/mc/acc_bytes", "eval/long/ppl", "eval/long/bpb"} <= r.keys()
        assert r["eval/mc/examples"] == len(EXAMPLES)
    assert not any(k.startswith("eval/") for r in records if "val_loss" not in r for k in r)
    assert evals[-1]["eval/long/loss"] < evals[0]["eval/long/loss"]  # it learned something
    # the last evaluation scored the weights the final checkpoint holds
    final = run_task(ChoiceTask(parse_task(f"mc:{run.mc}"), run.tok, BLOCK), run.model, 4, "cpu")
    assert {k: evals[-1][f"eval/mc/{k}"] for k in final} == final
    final = run_task(ppl_task(run, "long.txt"), run.model, 4, "cpu")
    assert evals[-1]["eval/long/loss"] == pytest.approx(final["loss"], rel=1e-5)


@pytest.mark.slow
def test_two_fsdp_processes_log_the_same_task_results(run, tmp_path):
    """Under torchrun every rank scores a share of the windows (with equal forward counts, as FSDP needs);
    the step-0 results (the same initial weights on any number of ranks) equal the one-process run's."""
    (tmp_path / "tiny.toml").write_text("")  # everything is in the overrides
    shape = [a for a in TINY if not a.startswith(("train.max_steps", "train.batch"))]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", tmp_path / "tiny.toml", *shape, "train.max_steps=1", "train.batch_size=2",
                        f"data.dir={run.root / 'data'}", f"train.out_dir={tmp_path / 'fsdp'}",
                        f'eval.tasks=["mc:{run.mc}", "ppl:{run.root / "long.txt"}"]'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]

    def step0(run_dir):
        return next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                    if '"val_loss"' in line)

    ours, theirs = step0(tmp_path / "fsdp"), step0(run.dir)
    keys = [k for k in theirs if k.startswith("eval/")]
    assert keys and all(k in ours for k in keys)
    assert {k: ours[k] for k in keys if "/mc/" in k} == {k: theirs[k] for k in keys if "/mc/" in k}
    for k in keys:
        assert ours[k] == pytest.approx(theirs[k], rel=1e-5), k


# ---------------------------------------------------------------- lm-evaluation-harness
HARNESS = """
import json, sys
import lm.eval.harness  # registers "lmforge"
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
out = simple_evaluate(model="lmforge", model_args="run=" + sys.argv[1], batch_size=3, device="cpu",
                      tasks=["lmforge_test_mc", "lmforge_test_ppl"],
                      task_manager=TaskManager(include_path=sys.argv[2], include_defaults=False))
samples = sorted(out["samples"]["lmforge_test_mc"], key=lambda s: s["doc_id"])
print(json.dumps({"mc": out["results"]["lmforge_test_mc"], "ppl": out["results"]["lmforge_test_ppl"],
                  "lls": [[r[0] for r in s["filtered_resps"]] for s in samples]}))
"""
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
"""


@pytest.mark.slow
def test_harness_runs_local_tasks_offline_with_our_results(run, tmp_path):
    """lm_eval.simple_evaluate with model "lmforge" on a multiple-choice and a perplexity task defined over
    local JSONL (no download): its acc, acc_norm and bits/byte are what `mc:` and `ppl:` give."""
    pytest.importorskip("lm_eval")
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": LONG_TEXT}, {"text": "the quick brown fox. über.\n"}])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(TASK_YAML.format(name="lmforge_test_mc", path=run.mc) + """\
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{endings}}"
doc_to_target: "{{label}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""")
    (tmp_path / "tasks" / "ppl.yaml").write_text(TASK_YAML.format(name="lmforge_test_ppl", path=texts) + """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-c", HARNESS, str(run.dir), str(tmp_path / "tasks")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    harness = json.loads(r.stdout.strip().splitlines()[-1])
    task = ChoiceTask(parse_task(f"mc:{run.mc}"), run.tok, BLOCK)
    scores = scoring.score(run.model, task.requests, 4, "cpu")
    ours = task.metrics(scores)
    assert harness["mc"]["acc,none"] == ours["acc"]
    assert harness["mc"]["acc_norm,none"] == ours["acc_norm"]
    for a, b in zip(harness["lls"], task.loglikelihoods(scores)):
        assert a == pytest.approx(b, abs=1e-4)
    ppl = PerplexityTask(parse_task(f"ppl:{texts}"), run.tok, run.ckpt / run.tok.file_name, BLOCK)
    assert harness["ppl"]["bits_per_byte,none"] == pytest.approx(run_task(ppl, run.model, 4, "cpu")["bpb"], rel=1e-5)


@pytest.fixture(scope="module")
def adapter(run):
    pytest.importorskip("lm_eval")
    from lm.eval.harness import LMForge

    return LMForge(run=str(run.dir), device="cpu", batch_size=3)


def test_harness_rolling_loglikelihood_is_our_perplexity_sum(run, adapter):
    out = adapter.loglikelihood_rolling([SimpleNamespace(args=(LONG_TEXT,)), SimpleNamespace(args=("über",))])
    m = run_task(ppl_task(run, "long.txt"), run.model, 4, "cpu")
    assert out[0] == pytest.approx(-m["loss"] * m["tokens"], rel=1e-5)
    seq = [run.tok.eos_id] + run.tok.encode("über")
    assert out[1] == pytest.approx(token_logprobs(run.model, seq).sum().item(), abs=1e-4)


def test_harness_loglikelihood_matches_brute_force_and_reports_greedy(run, adapter):
    ex = EXAMPLES[0]
    out = adapter.loglikelihood([SimpleNamespace(args=(ex["context"], " " + e)) for e in ex["endings"]])
    assert [ll for ll, _ in out] == pytest.approx(brute_force_loglikelihoods(run)[0], abs=1e-4)
    ctx = run.tok.encode(ex["context"])
    seq = [run.tok.eos_id] + ctx
    greedy = generate(run.model, [seq], 3, temperature=0)[0]
    text = run.tok.decode(greedy)
    assert run.tok.encode(ex["context"] + text)[len(ctx):] == greedy  # the text tokenizes as generated
    (_, is_greedy), = adapter.loglikelihood([SimpleNamespace(args=(ex["context"], text))])
    assert is_greedy


def test_harness_generate_until_is_greedy_generation_cut_at_the_stop(run, adapter):
    seq = [run.tok.eos_id] + run.tok.encode("the quick")
    tokens = generate(run.model, [seq], 12, temperature=0, eos_id=run.tok.eos_id)[0]
    full = run.tok.decode([t for t in tokens if t != run.tok.eos_id])
    stop = full[len(full) // 2]  # a character the greedy text holds
    out = adapter.generate_until([SimpleNamespace(args=("the quick", {"until": ["\n\n"], "max_gen_toks": 12})),
                                  SimpleNamespace(args=("the quick", {"until": [stop], "max_gen_toks": 12}))])
    assert out == [full.split("\n\n")[0], full.split(stop)[0]]


def test_harness_command_is_lm_evals_with_lmforge_registered(adapter, monkeypatch):
    """`python -m lm.eval.harness ARGS` is `lm_eval ARGS` once "lmforge" is registered (running the real
    command costs ~25 s, most of it lm_eval indexing its own thousands of tasks)."""
    import lm_eval.__main__
    from lm_eval.api.registry import get_model

    from lm.eval import harness

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert harness.main(["--model", "lmforge", "--model_args", "run=R", "--tasks", "t"]) == 0
    assert seen == [["lm_eval", "--model", "lmforge", "--model_args", "run=R", "--tasks", "t"]]
    assert get_model("lmforge") is harness.LMForge


def test_mc_delimiter_option_joins_context_and_ending():
    from lm.eval.spec import parse_task

    assert parse_task("mc:x.jsonl").delimiter == " "  # the harness's default
    assert parse_task("mc:x.jsonl:delimiter=").delimiter == ""  # code: the context ends in a newline
