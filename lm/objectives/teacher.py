"""Knowledge distillation ([distill]): a student learns from a teacher's softened distribution.

loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy, where x_T = softmax(logits / T)
(Hinton et al. 2015; T^2 keeps the soft term's gradient scale independent of T). The teacher runs online,
without gradients, in eval mode, in bf16 on GPUs and sharded with FSDP when the student is. Its logits are
not precomputed to disk: they are vocab_size floats per token (8192 x 2 bytes = 16 KB a token in bf16, 32
GB per 2M tokens), while a teacher forward costs a third of a student training step of the same size.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from data_prep import DataError, load_tokenizer
from lm.training import checkpoint
from lm.config.schema import Config, ModelConfig

def teacher_model_config(source: str) -> ModelConfig:
    if source.startswith("hf:"):
        from lm.interop.hf import read_hf_config

        return read_hf_config(Path(source[3:]))
    return checkpoint.load_config(checkpoint.resolve(source)).model


def _teacher_tokenizer(source: str):
    """(file, vocab size, the text of each id) of the teacher's tokenizer."""
    if source.startswith("hf:"):
        from tokenizers import Tokenizer

        path = Path(source[3:]) / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"distill.teacher {source}: has no tokenizer.json to compare with the student's")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own exception type on a damaged file
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{path}: not a tokenizer ({why})") from None
        vocab = tok.get_vocab_size(with_added_tokens=True)
        return path, vocab, [tok.id_to_token(i) for i in range(vocab)]
    ckpt = checkpoint.resolve(source)
    texts = _token_texts(ckpt)
    return ckpt / load_tokenizer(ckpt).file_name, len(texts), texts


def _token_texts(directory: Path) -> list[str]:
    tok = load_tokenizer(directory)
    if tok.kind == "bpe":
        from tokenizers import Tokenizer

        hf = Tokenizer.from_file(str(directory / tok.file_name))
        return [hf.id_to_token(i) for i in range(tok.vocab_size)]
    return [tok.decode([i]) for i in range(tok.vocab_size)]


def check_same_tokenizer(source: str, student_file: Path):
    """Teacher and student must read the same ids: the same tokenizer file, or (an HF directory's
    tokenizer.json) the same token for every id; one line naming both otherwise."""
    teacher_file, vocab, tokens = _teacher_tokenizer(source)
    if hashlib.sha256(teacher_file.read_bytes()).digest() == hashlib.sha256(student_file.read_bytes()).digest():
        return
    student = _token_texts(student_file.parent)
    if tokens != student:
        raise DataError(f"distill.teacher's tokenizer {teacher_file} (vocab {vocab}) and the student's "
                        f"{student_file} (vocab {len(student)}) differ; a teacher must share the student's "
                        "tokenizer (prepare the data with --tokenizer-from the teacher)")


def load_teacher(cfg: Config, student_tokenizer: Path, world, device: torch.device) -> torch.nn.Module:
    """The teacher for cfg.distill.teacher, built like the student (whole, or FSDP shards under torchrun),
    frozen, in eval mode; bf16 weights on a GPU."""
    from lm.training.initialize import load_initial_weights
    from lm.training.parallel import build_model

    source = cfg.distill.teacher
    check_same_tokenizer(source, student_tokenizer)
    shape = teacher_model_config(source)
    if shape.vocab_size != cfg.model.vocab_size:
        raise DataError(f"distill.teacher {source} has vocab_size {shape.vocab_size}, the student "
                        f"{cfg.model.vocab_size}: their logits must cover the same ids")
    # the teacher's own kernels where they run; no activation checkpointing or compile (no backward)
    teacher_cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(shape, attention=cfg.model.attention, layernorm=cfg.model.layernorm,
                                       dropout=0.0),
        parallel=dataclasses.replace(cfg.parallel, activation_checkpointing="none", compile="none"),
        init=dataclasses.replace(cfg.init, from_=source, optimizer=False))
    teacher = build_model(teacher_cfg, world, device)
    load_initial_weights(source, teacher, None, teacher_cfg, world.rank)
    teacher.requires_grad_(False)
    if device.type == "cuda":
        teacher.to(torch.bfloat16)
    return teacher.eval()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher || student) at temperature T, averaged over tokens, + (1 - alpha) * CE.
    Targets of -100 are left out of both terms."""
    V = student_logits.size(-1)
    s, t, y = student_logits.float().reshape(-1, V), teacher_logits.float().reshape(-1, V), targets.reshape(-1)
    ce = F.cross_entropy(s, y)
    if alpha == 0:
        return ce
    keep = y != -100
    log_p_student = F.log_softmax(s[keep] / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t[keep] / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean()
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce
