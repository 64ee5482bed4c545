"""Trust for the commands that read or write model files (issue 22): lm.quantize, lm.prune, lm.export,
lm.eval (and --out), the lm-eval harness, lm.classify's CLI, HF directories (init.from = "hf:DIR", a
distillation teacher) and quantized directories. Every bad input is one `error:` line naming the file,
field, flag or value; nothing existing is overwritten unless asked; a full disk leaves no partial output.
The commands run in this process through their main(argv) (a process start per case would cost seconds)."""
import errno
import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_prep import DataError, prepare
from lm.training import checkpoint
from lm.config.load import load_config
from lm.config.schema import Config, ModelConfig
from lm.model.gpt import GPT
from lm.training.trainer import Trainer

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.batch_size=4",
        "train.eval_sequences=4", "log.progress=false", "train.device=cpu", "optim.warmup_steps=0",
        "train.max_steps=2", "train.eval_interval=2", "train.threads=1"]
USER_ERRORS = (DataError, checkpoint.CheckpointError)


def one_line(capsys, main, *argv, fragments=()):
    """Runs a command's main(argv) here; it must end as a user error: exit 2, one `error:` line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def leftovers(directory, name):
    """Anything under `directory` whose name mentions `name` (the output or a temporary sibling of it)."""
    return sorted(p.name for p in directory.iterdir() if name in p.name)


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("trust_outputs")
    prepare([str(tiny_corpus)], root / "data", tokenizer="char", show_progress=False)
    Trainer(load_config(None, [*TINY, f"data.dir={root / 'data'}", f"train.out_dir={root / 'run'}"])).run()
    return root


# ---- lm.quantize ------------------------------------------------------------------------------------------
def quantize_main(argv):
    from lm.quantize import main

    return main(argv)


@pytest.fixture(scope="module")
def quantized(run):
    from lm.quantize import main

    for bits in (8, 4):
        assert main([str(run / "run"), "--bits", str(bits), "--group-size", "16", str(run / f"int{bits}")]) == 0
    return run


def tampered(src, dest, change=None, metadata=None):
    """A copy of quantized directory `src` whose tensors went through `change` (and metadata updates)."""
    import shutil

    shutil.copytree(src, dest)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    if change:
        change(tensors)
    meta.update(metadata or {})
    save_file(tensors, str(dest / "model.safetensors"), metadata=meta)
    return dest


KEY = "transformer.h.0.attn.c_attn.weight"
TAMPERED = [  # (bits, change, metadata, fragments of the one line)
    (8, lambda t: t.pop(f"{KEY}.scale"), None, [f"'{KEY}.scale' is missing"]),
    (8, lambda t: t.update({f"{KEY}.scale": t[f"{KEY}.scale"][:-1].clone()}), None, [f"'{KEY}.scale' has shape"]),
    (8, lambda t: t.update({f"{KEY}.int8": t[f"{KEY}.int8"].float()}), None,
     [f"'{KEY}.int8' is float32, expected int8"]),
    (8, lambda t: t.update({f"{KEY}.scale": t[f"{KEY}.scale"] * float("nan")}), None, ["NaN or infinite"]),
    (8, lambda t: t.pop("transformer.ln_f.weight"), None, ["'transformer.ln_f.weight' is missing"]),
    (8, lambda t: t.update({"transformer.ln_f.weight": t["transformer.ln_f.weight"][:3].clone()}), None,
     ["'transformer.ln_f.weight' has shape"]),
    (8, None, {"lmforge_quantized": "int3"}, ["lmforge_quantized = 'int3'", "int8 or int4"]),
    (4, lambda t: t.pop(f"{KEY}.scale"), None, [f"'{KEY}.scale' is missing"]),
    (4, lambda t: t.update({f"{KEY}.scale": t[f"{KEY}.scale"][:, :1].clone()}), None,
     [f"'{KEY}.scale' has shape (96, 1), expected (96, 2)"]),
    (4, lambda t: t.update({f"{KEY}.int4": t[f"{KEY}.int4"][:, :-1].clone()}), None,
     [f"'{KEY}.int4' has shape (96, 15)"]),
    (4, None, {"group_size": "8"}, ["'transformer.wte.weight.scale' has shape (30, 2), expected (30, 4)"]),
    (4, None, {"group_size": "x"}, ["group_size = 'x'"]),
    (4, lambda t: t.update({f"{KEY}.int4": t[f"{KEY}.int4"].float()}), None, ["is float32, expected uint8"]),
    (4, lambda t: t.update({f"{KEY}.scale": t[f"{KEY}.scale"].float()}), None, ["is float32, expected float16"]),
    (4, lambda t: t.update({f"{KEY}.int8": t.pop(f"{KEY}.int4")}), None, [f"'{KEY}.int4' is missing"]),
]


@pytest.mark.parametrize("bits,change,metadata,fragments", TAMPERED)
def test_a_damaged_quantized_directory_is_one_line_naming_the_tensor(quantized, tmp_path, capsys, bits, change,
                                                                   metadata, fragments):
    import sample

    bad = tampered(quantized / f"int{bits}", tmp_path / "bad", change, metadata)
    one_line(capsys, sample.main, bad, "--max-new-tokens", 2, fragments=["model.safetensors", *fragments])


def test_a_pickle_or_truncated_file_in_a_quantized_directory_is_one_line(quantized, tmp_path, capsys):
    import shutil

    import sample

    bad = tmp_path / "bad"
    shutil.copytree(quantized / "int8", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:len(data) // 2])
    one_line(capsys, sample.main, bad, fragments=["model.safetensors", "truncated"])
    (bad / "model.safetensors").write_bytes(pickle.dumps({"x": 1}))
    one_line(capsys, sample.main, bad, fragments=["model.safetensors", "not a safetensors file"])


def test_int4_scales_of_zero_or_tiny_groups_stay_positive_and_finite():
    from lm.compress.quantize import dequantize_int4_groups, quantize_int4_groups

    w = torch.zeros(3, 8)
    w[1] = 1e-7  # below fp16's smallest normal / 7: rounded to a zero scale before
    w[2, :4] = torch.tensor([0.5, -0.25, 0.125, 1.0])
    packed, scale = quantize_int4_groups(w, 4)
    assert (scale.float() > 0).all() and torch.isfinite(scale.float()).all()
    back = dequantize_int4_groups(packed, scale, 8)
    assert torch.isfinite(back).all()
    assert (back - w).abs().max() <= scale.float().max() / 2 * 1.002


def test_int4_refuses_weights_beyond_fp16_scales_in_one_line(run, tmp_path, capsys, monkeypatch):
    from lm.compress.quantize import quantized_state

    model = GPT(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = 1e6  # scale 1e6 / 7 > fp16's 65504: infinite before
    with pytest.raises(DataError, match=r"transformer.h.0.mlp.c_fc.weight.*1e\+06.*--bits 8"):
        quantized_state(model, 4, group_size=8)
    stored = quantized_state(model, 8)  # int8's fp32 scales hold it
    assert torch.isfinite(stored["transformer.h.0.mlp.c_fc.weight.scale"]).all()


@pytest.mark.parametrize("flag,value,fragments", [
    ("--group-size", 1000000, ["--group-size 1000000", "32 input columns"]),
    ("--group-size", 64, ["--group-size 64", "32 input columns"]),
    ("--group-size", 0, ["--group-size 0"]),
    ("--group-size", -4, ["--group-size -4"]),
    ("--group-size", 3, ["--group-size 3"]),
])
def test_quantize_refuses_a_group_size_wider_than_the_matrices(run, tmp_path, capsys, flag, value, fragments):
    one_line(capsys, quantize_main, run / "run", "--bits", 4, flag, value, tmp_path / "q", fragments=fragments)
    assert not (tmp_path / "q").exists()


def full_disk(monkeypatch, where):
    """Writing runs out of space: safetensors' writer (`where` = "weights") or a plain copy ("copy")."""
    import shutil

    import safetensors.torch
    from safetensors import SafetensorError

    def no_space(*args, **kwargs):
        if where == "weights":
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]))

    if where == "weights":
        monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    else:
        monkeypatch.setattr(shutil, "copyfile", no_space)


def prune_main(argv):
    from lm.prune import main

    return main(argv)


def export_main(argv):
    from lm.export import main

    return main(argv)


COMMANDS = {
    "quantize": (quantize_main, lambda run, out: [run / "run", "--bits", 4, "--group-size", 16, out]),
    "prune": (prune_main, lambda run, out: [run / "run", out, "--method", "magnitude", "--sparsity", 0.5]),
    "prune-neurons": (prune_main, lambda run, out: [run / "run", out, "--method", "neurons", "--sparsity", 0.5,
                                                    "--batches", 1]),
    "export-hf": (export_main, lambda run, out: [run / "run", out, "--format", "hf"]),
    "export-safetensors": (export_main, lambda run, out: [run / "run", out, "--format", "safetensors"]),
}


@pytest.mark.parametrize("where", ["weights", "copy"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_full_disk_leaves_no_partial_output_and_one_line(run, tmp_path, capsys, monkeypatch, command, where):
    main, argv = COMMANDS[command]
    if command.startswith("export-hf") and where == "copy":
        where = "weights"  # hf export writes its tokenizer itself: the weights' failure covers it
    full_disk(monkeypatch, where)
    one_line(capsys, main, *argv(run, tmp_path / "out"), fragments=[str(tmp_path / "out"), "No space left" if
                                                                     where == "copy" else "StorageFull"])
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_existing_output_is_never_overwritten(run, tmp_path, capsys, command):
    main, argv = COMMANDS[command]
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    one_line(capsys, main, *argv(run, out), fragments=[str(out), "already exists"])
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    file = tmp_path / "file"
    file.write_text("keep")
    one_line(capsys, main, *argv(run, file), fragments=[str(file), "not a directory"])
    assert file.read_text() == "keep"


def test_outputs_are_complete_and_load(run, tmp_path, capsys):
    from lm.interop.export import load

    for command, (main, argv) in COMMANDS.items():
        out = tmp_path / command
        assert main([str(a) for a in argv(run, out)]) == 0, capsys.readouterr().err
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
        if command != "export-hf":
            load(out)


# ---- lm.prune's numeric flags --------------------------------------------------------------------------
@pytest.mark.parametrize("argv,fragments", [
    (["--batch-size", 0], ["--batch-size 0"]),
    (["--batch-size", -3], ["--batch-size -3"]),
    (["--batches", 0], ["--batches 0"]),
    (["--batches", -1], ["--batches -1"]),
    (["--sparsity", "nan"], ["--sparsity nan"]),
    (["--sparsity", -0.1], ["--sparsity -0.1"]),
])
def test_prune_refuses_every_bad_number_naming_the_flag(run, tmp_path, capsys, argv, fragments):
    args = {"--method": "neurons", "--sparsity": 0.5, **dict(zip(argv[::2], argv[1::2]))}
    flat = [str(x) for kv in args.items() for x in kv]
    one_line(capsys, prune_main, run / "run", tmp_path / "o", *flat, fragments=fragments)
    assert not (tmp_path / "o").exists()


# ---- lm.export -------------------------------------------------------------------------------------------
def test_export_hf_of_a_document_masked_run_is_refused(run, tmp_path, capsys):
    Trainer(load_config(None, [*TINY, f"data.dir={run / 'data'}", f"train.out_dir={tmp_path / 'docs'}",
                               "data.document_mask=true"])).run()
    one_line(capsys, export_main, tmp_path / "docs", tmp_path / "hf", "--format", "hf",
             fragments=["data.document_mask", "--format safetensors"])
    assert not (tmp_path / "hf").exists()
    assert export_main([str(tmp_path / "docs"), str(tmp_path / "st"), "--format", "safetensors"]) == 0


# ---- HF directories: init.from = "hf:DIR" and a distillation teacher ----------------------------------------
def hf_dir(tmp_path, cfg: ModelConfig, name="hf", seed=0):
    """A HF directory of a random model of ours with shape `cfg` (config.json and model.safetensors)."""
    from lm.interop.hf import hf_config, to_hf_state

    out = tmp_path / name
    out.mkdir()
    model = GPT(cfg, seed=seed)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, eos_id=0)))
    save_file(to_hf_state(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out, model


GPT2 = ModelConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=8)


def load_hf(directory, cfg: ModelConfig):
    """init.from = "hf:DIR"'s path, as the trainer takes it; and the teacher's config reader."""
    from lm.objectives.teacher import teacher_model_config
    from lm.training.initialize import load_initial_weights

    teacher_model_config(f"hf:{directory}")
    model = GPT(cfg)
    load_initial_weights(f"hf:{directory}", model, None, Config(model=cfg), 0)
    return model


def edit_config(directory, change):
    config = json.loads((directory / "config.json").read_text())
    config = change(config)
    (directory / "config.json").write_text(json.dumps(config))


BAD_CONFIGS = [  # (change, fragments)
    (lambda c: [c], ["config.json", "expected a JSON object, found a JSON list"]),
    (lambda c: {k: v for k, v in c.items() if k != "n_embd"}, ["config.json", "'n_embd' is missing"]),
    (lambda c: {**c, "n_embd": "8"}, ["config.json", "'n_embd'", "expected an integer"]),
    (lambda c: {**c, "n_head": 0}, ["config.json", "'n_head' = 0"]),
    (lambda c: {**c, "n_head": 3}, ["config.json", "n_embd = 8", "n_head = 3"]),
    (lambda c: {**c, "n_layer": 10 ** 9}, ["model.safetensors", "n_layer"]),
    (lambda c: {**c, "vocab_size": True}, ["config.json", "'vocab_size'"]),
    (lambda c: {**c, "layer_norm_epsilon": "x"}, ["config.json", "'layer_norm_epsilon'"]),
]


@pytest.mark.parametrize("change,fragments", BAD_CONFIGS)
def test_a_bad_hf_config_is_one_line_naming_the_file_and_field(tmp_path, change, fragments):
    directory, _ = hf_dir(tmp_path, GPT2)
    edit_config(directory, change)
    with pytest.raises(USER_ERRORS) as e:
        load_hf(directory, GPT2)
    assert all(f in str(e.value) for f in fragments), str(e.value)
    assert "\n" not in str(e.value)


def test_a_bad_hf_llama_config_is_one_line(tmp_path):
    cfg = ModelConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=8, norm="rmsnorm", position="rope",
                      mlp="swiglu", bias=False)
    directory, _ = hf_dir(tmp_path, cfg)
    for change, fragment in [(lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, "'hidden_size' is missing"),
                             (lambda c: {**c, "num_key_value_heads": 3}, "num_key_value_heads"),
                             (lambda c: {**c, "rms_norm_eps": -1}, "'rms_norm_eps' = -1"),
                             (lambda c: {**c, "rope_theta": "big", "rope_parameters": None}, "'rope_theta'")]:
        saved = (directory / "config.json").read_text()
        edit_config(directory, change)
        with pytest.raises(USER_ERRORS, match=fragment):
            load_hf(directory, cfg)
        (directory / "config.json").write_text(saved)


@pytest.mark.parametrize("damage,fragment", [
    (lambda p: p.write_bytes(pickle.dumps({"transformer.wte.weight": 1})), "not a safetensors file"),
    (lambda p: p.write_bytes(p.read_bytes()[:-40]), "truncated"),
    (lambda p: p.unlink(), "missing"),
    (lambda p: save_file({"wte.weight": torch.zeros(20, 8)}, str(p)), "wpe.weight"),
    (lambda p: save_file({**{k: v.clone() for k, v in _load(p).items()}, "wte.weight": torch.zeros(21, 8)}, str(p)),
     "shape"),
    (lambda p: save_file({**{k: v.clone() for k, v in _load(p).items()},
                          "wte.weight": torch.full((20, 8), float("nan"))}, str(p)), "NaN"),
])
def test_a_bad_hf_weights_file_is_one_line(tmp_path, damage, fragment):
    directory, _ = hf_dir(tmp_path, GPT2)
    damage(directory / "model.safetensors")
    with pytest.raises(USER_ERRORS, match=fragment) as e:
        load_hf(directory, GPT2)
    assert "model.safetensors" in str(e.value) and "\n" not in str(e.value)


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- Llama 3's layout: untied embeddings, any rms_norm_eps ---------------------------------------------------
LLAMA3 = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6, tie_word_embeddings=False,
              rope_theta=500000.0)


def test_a_llama3_layout_imports_from_transformers_with_equal_logits_and_exports_back(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lm.interop.hf import hf_config, read_hf_config, to_hf_state

    torch.manual_seed(0)
    theirs = LlamaForCausalLM(LlamaConfig(**LLAMA3)).eval()
    theirs.save_pretrained(tmp_path / "llama3")
    cfg = read_hf_config(tmp_path / "llama3")
    assert (cfg.tie_embeddings, cfg.norm_eps) == (False, 1e-6)
    ours = load_hf(tmp_path / "llama3", cfg).eval()
    assert ours.lm_head.weight is not ours.transformer.wte.weight
    x = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        assert torch.allclose(ours(x)[0], theirs(x).logits, atol=1e-5)
    # and back: a directory transformers reads with the same logits, and our import of it bit-exact
    out = tmp_path / "back"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(hf_config(ours.cfg, eos_id=0)))
    save_file(to_hf_state(ours), str(out / "model.safetensors"))
    again = LlamaForCausalLM.from_pretrained(out).eval()
    assert again.config.rms_norm_eps == 1e-6 and not again.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.allclose(again(x).logits, theirs(x).logits, atol=1e-5)
    reread = load_hf(out, read_hf_config(out))
    for key, value in ours.state_dict().items():
        assert torch.equal(reread.state_dict()[key], value), key


def test_a_sharded_llama3_directory_imports_and_a_bad_index_is_one_line(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lm.interop.hf import read_hf_config

    torch.manual_seed(0)
    theirs = LlamaForCausalLM(LlamaConfig(**LLAMA3)).eval()
    theirs.save_pretrained(tmp_path / "shards", max_shard_size="20KB")  # as Llama 3 8B ships: several files
    assert not (tmp_path / "shards" / "model.safetensors").exists()
    ours = load_hf(tmp_path / "shards", read_hf_config(tmp_path / "shards")).eval()
    x = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        assert torch.allclose(ours(x)[0], theirs(x).logits, atol=1e-5)
    index = tmp_path / "shards" / "model.safetensors.index.json"
    saved = index.read_text()
    index.write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}}))
    with pytest.raises(USER_ERRORS, match="not a file beside it"):
        read_hf_config(tmp_path / "shards")
    index.write_text(saved)
    first = sorted((tmp_path / "shards").glob("model-*.safetensors"))[0]
    first.write_bytes(first.read_bytes()[:100])
    with pytest.raises(USER_ERRORS, match=f"{first.name}: .*truncated"):
        read_hf_config(tmp_path / "shards")


def test_untied_embeddings_and_norm_eps_survive_our_own_checkpoints_and_exports(run, tmp_path, capsys):
    from lm.interop.export import load

    common = [*TINY, f"data.dir={run / 'data'}", "model.tie_embeddings=false", "model.norm_eps=1e-6"]
    Trainer(load_config(None, [*common, f"train.out_dir={tmp_path / 'untied'}"])).run()
    _, model = load(tmp_path / "untied")
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.transformer.ln_f.eps == 1e-6
    for command, (main, argv) in COMMANDS.items():
        src = run / "run"
        args = [tmp_path / "untied" if a == src else a for a in argv(run, tmp_path / command)]
        assert main([str(a) for a in args]) == 0, capsys.readouterr().err
        if command != "export-hf":
            _, back = load(tmp_path / command)
            assert back.lm_head.weight is not back.transformer.wte.weight and back.cfg.norm_eps == 1e-6
    x = torch.randint(0, model.cfg.vocab_size, (1, 8))
    _, exported = load(tmp_path / "export-safetensors")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export-hf").eval()  # GPT-2's block, its own head
    assert not hf.config.tie_word_embeddings and hf.config.layer_norm_epsilon == 1e-6
    with torch.no_grad():
        assert torch.equal(exported(x)[0], model(x)[0])
        assert torch.allclose(hf(x).logits, model(x)[0], atol=1e-5)


def test_a_tied_hf_checkpoint_does_not_fit_an_untied_config(tmp_path):
    directory, _ = hf_dir(tmp_path, GPT2)
    from dataclasses import replace

    with pytest.raises(USER_ERRORS, match="tie_embeddings"):
        load_hf(directory, replace(GPT2, tie_embeddings=False))


# ---- lm.eval ---------------------------------------------------------------------------------------------
def eval_main(argv):
    from lm.eval.__main__ import main

    return main(argv)


@pytest.fixture(scope="module")
def text(run):
    path = run / "score.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n")
    return path


def test_eval_out_refuses_an_existing_file_unless_forced_and_writes_atomically(run, text, tmp_path, capsys,
                                                                                monkeypatch):
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    one_line(capsys, eval_main, run / "run", "--tasks", f"ppl:{text}", "--out", out,
             fragments=[str(out), "already exists", "--force"])
    assert out.read_text() == "my notes"
    import os

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", no_space)
        one_line(capsys, eval_main, run / "run", "--tasks", f"ppl:{text}", "--out", out, "--force",
                 fragments=[str(out), "No space left"])
    assert out.read_text() == "my notes" and leftovers(tmp_path, "notes") == ["notes.txt"]
    assert eval_main([str(run / "run"), "--tasks", f"ppl:{text}", "--out", str(out), "--force"]) == 0
    assert "tasks" in json.loads(out.read_text())
    fresh = tmp_path / "sub" / "results.json"
    assert eval_main([str(run / "run"), "--tasks", f"ppl:{text}", "--out", str(fresh)]) == 0
    assert json.loads(fresh.read_text())["tasks"]


@pytest.mark.parametrize("flag,value", [("--limit", -1), ("--batch-size", 0), ("--stride", -2)])
def test_eval_refuses_bad_numbers_naming_the_flag(run, text, capsys, flag, value):
    one_line(capsys, eval_main, run / "run", "--tasks", f"ppl:{text}", flag, value, fragments=[f"{flag} {value}"])


@pytest.fixture(scope="module")
def classifier(run):
    rows = [{"text": "the quick brown fox" if i % 2 else "a lazy dog", "label": "ab"[i % 2]} for i in range(40)]
    (run / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Trainer(load_config(None, [*TINY, f"data.dir={run / 'data'}", f"init.from={run / 'run'}",
                               f"train.out_dir={run / 'cls'}", "train.task=classify",
                               f"classify.train_file={run / 'cls.jsonl'}", f"classify.val_file={run / 'cls.jsonl'}",
                               "train.checkpoint_interval=2"])).run()
    return run / "cls"


def test_eval_refuses_a_classification_run(classifier, text, capsys):
    one_line(capsys, eval_main, classifier, "--tasks", f"ppl:{text}", fragments=["train.task = 'classify'",
                                                                               "not a language model"])


@pytest.mark.parametrize("command", list(COMMANDS))
def test_quantize_prune_export_refuse_a_classification_run(classifier, tmp_path, capsys, command):
    """Each would drop the classification head and write a language model nobody trained."""
    main, argv = COMMANDS[command]
    run = classifier.parent
    args = [classifier if str(a) == str(run / "run") else a for a in argv(run, tmp_path / "o")]
    one_line(capsys, main, *args, fragments=["train.task = 'classify'"])
    assert not (tmp_path / "o").exists()


def test_harness_refuses_a_classification_run(classifier):
    pytest.importorskip("lm_eval")
    from lm.eval.harness import LMForge

    with pytest.raises(checkpoint.CheckpointError, match="train.task = 'classify'"):
        LMForge(run=str(classifier))


# ---- python -m lm.eval.harness ------------------------------------------------------------------------------
def test_harness_without_model_args_is_one_line(capsys):
    from lm.eval import harness

    one_line(capsys, harness.main, "--model", "lmforge", "--tasks", "x", fragments=["--model_args run=RUN"])


def test_registering_lmforge_keeps_lm_evals_own_models():
    """lm-eval imports its models only into an empty registry; "hf" must stay listed beside ours (loading
    HFLM itself needs `accelerate`)."""
    from lm_eval.api.registry import get_model, model_registry

    from lm.eval import harness

    assert get_model("lmforge") is harness.LMForge
    assert {"hf", "vllm", "dummy"} <= set(model_registry.keys())


# ---- python -m lm.classify ----------------------------------------------------------------------------------
def classify_main(argv):
    from lm.classify import main

    return main(argv)


def test_classify_refuses_an_empty_file_and_bad_numbers(classifier, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line(capsys, classify_main, classifier, "--file", empty, fragments=[str(empty), "no texts"])
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    one_line(capsys, classify_main, classifier, "--file", blank, fragments=[str(blank), "no texts"])
    one_line(capsys, classify_main, classifier, "--file", tmp_path / "none.txt", fragments=["none.txt", "missing"])
    one_line(capsys, classify_main, classifier, "--text", "x", "--batch-size", 0, fragments=["--batch-size 0"])
    assert classify_main([str(classifier), "--text", "a lazy dog"]) == 0


@pytest.mark.parametrize("args,fragment", [({"batch_size": 0}, "batch_size=0"), ({"stride": -1}, "stride=-1"),
                                           ({"stride": 10 ** 6}, "<= 32"), ({"max_gen_toks": "x"}, "'x'"),
                                           ({"dtype": "int8"}, "dtype='int8'")])
def test_harness_model_args_are_checked_in_one_line(run, args, fragment):
    from lm.eval.harness import LMForge

    with pytest.raises(DataError, match=fragment):
        LMForge(run=str(run / "run"), **args)


def test_a_damaged_teacher_tokenizer_is_one_line(tmp_path):
    from lm.objectives.teacher import check_same_tokenizer

    directory, _ = hf_dir(tmp_path, GPT2)
    (directory / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json: not a tokenizer"):
        check_same_tokenizer(f"hf:{directory}", directory / "tokenizer.json")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_force_replaces_an_output_but_never_the_input(run, tmp_path, capsys, command):
    main, argv = COMMANDS[command]
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main([str(a) for a in argv(run, out)] + ["--force"]) == 0, capsys.readouterr().err
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    args = [str(a) for a in argv(run, run)] + ["--force"]  # the output would replace the run it reads
    one_line(capsys, main, *args, fragments=["holds the input"])
    assert (run / "run").is_dir() and (run / "data").is_dir()


@pytest.mark.slow
def test_consolidate_usage_is_one_line(cli):
    from tests.conftest import assert_user_error

    assert_user_error(cli("-m", "lm.consolidate", "only-one-argument"), "usage: python -m lm.consolidate")


def test_harness_names_a_missing_extra_of_lm_evals_models_in_one_line(capsys, monkeypatch):
    import lm_eval.__main__

    from lm.eval import harness

    def needs_accelerate():
        raise ModuleNotFoundError("No module named 'accelerate'", name="accelerate")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", needs_accelerate)
    one_line(capsys, harness.main, "--model", "hf", "--model_args", "pretrained=x", "--tasks", "t",
             fragments=["accelerate", "pip install accelerate"])
