"""Export a checkpoint: `python -m lm.export RUN_OR_CKPT --format hf|safetensors OUT_DIR`.

`hf` writes a directory that transformers' AutoModelForCausalLM and AutoTokenizer load with no network
(config.json, model.safetensors, tokenizer files, generation_config.json). `safetensors` writes our own
single-file weights beside the resolved config and the tokenizer: a directory sample.py and init.from read.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from data_prep import load_tokenizer
from lm.training import checkpoint
from lm.model.attention import inference_backends
from lm.config.load import to_toml
from lm.files import save_safetensors
from lm.interop.hf import hf_config, to_hf_state, unrolled
from lm.model.gpt import GPT
from lm.compress.quantize import stored_state


EOS = "<|endoftext|>"


def load(path, device="cpu") -> tuple[Path, GPT]:
    """The checkpoint `path` resolves to, and its language model for inference (eval mode, built on the CPU)
    with kernels that can run on `device`: one loader for sampling, export, quantizing, pruning, evaluation
    and benchmarks. A classifier is refused: each of those would drop its head and treat it as a language model."""
    ckpt = checkpoint.resolve(path)
    cfg = checkpoint.load_config(ckpt)
    if cfg.train.task != "lm":
        raise checkpoint.CheckpointError(f"{ckpt}: a train.task = '{cfg.train.task}' run, not a language model "
                                         "(classify texts with python -m lm.classify)")
    model = GPT(inference_backends(cfg.model, device))
    checkpoint.load_model(ckpt, model)
    return ckpt, model.eval()


def export_safetensors(ckpt: Path, model: GPT, out: Path):
    cfg = checkpoint.load_config(ckpt)
    state = {k: v.contiguous() for k, v in stored_state(model).items()}
    save_safetensors(state, out / "model.safetensors", metadata={"format": "pt", "lmforge_config": to_toml(cfg)})
    (out / "config.toml").write_text(to_toml(cfg))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    tokenizer = load_tokenizer(ckpt)
    shutil.copyfile(ckpt / tokenizer.file_name, out / tokenizer.file_name)


def hf_tokenizer_json(ckpt: Path) -> str:
    """The tokenizer as HF `tokenizer.json`: BPE files are that already; a character vocabulary becomes a
    WordLevel model over single characters."""
    tokenizer = load_tokenizer(ckpt)
    if tokenizer.kind == "bpe":
        return (ckpt / tokenizer.file_name).read_text()
    if tokenizer.kind != "char":
        raise checkpoint.CheckpointError(f"{ckpt / tokenizer.file_name}: a {tokenizer.kind} tokenizer has no HF "
                                         "tokenizer.json form here; export --format safetensors instead")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(tokenizer.chars)}
    vocab[EOS] = tokenizer.eos_id
    hf = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    hf.add_special_tokens([EOS])
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    return hf.to_str()


def export_hf(ckpt: Path, model: GPT, out: Path):
    tokenizer = load_tokenizer(ckpt)
    cfg = checkpoint.load_config(ckpt)
    if cfg.data.document_mask or cfg.sft.train_file:  # (SFT packs its examples with the same masks)
        key = "data.document_mask = true" if cfg.data.document_mask else "sft.train_file (packed, masked examples)"
        raise checkpoint.CheckpointError(f"{ckpt}: trained with {key}: attention and positions restart at each EOS, "
                                         "which a HF model cannot express; export --format safetensors instead")
    if model.cfg.share_layers > 1:
        print(f"note: model.share_layers = {model.cfg.share_layers}: the export holds the unrolled weights "
              f"({model.cfg.n_layer} blocks), a standard directory {model.cfg.share_layers}x the size of the "
              "shared ones", file=sys.stderr)
        model = unrolled(model)
    cfg = model.cfg
    (out / "config.json").write_text(json.dumps(hf_config(cfg, tokenizer.eos_id), indent=2))
    save_safetensors(to_hf_state(model), out / "model.safetensors", metadata={"format": "pt"})
    (out / "tokenizer.json").write_text(hf_tokenizer_json(ckpt))
    special = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS}
    # split_special_tokens: a "<|endoftext|>" typed inside a text is encoded as text, as our tokenizer does
    # (the data pipeline appends EOS by id between documents; text never fakes a boundary or a control
    # token). The token itself keeps its id: EOS still ends generation and decodes to "<|endoftext|>".
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
         "clean_up_tokenization_spaces": False, "split_special_tokens": True, **special}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    # No max_length: transformers warns on every generate(max_new_tokens=...) when both are set (even at
    # n_positions); the context limit is config.json's n_positions.
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id,
         "do_sample": True, "temperature": 0.8, "top_k": 200}, indent=2))
