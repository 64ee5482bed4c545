"""Our GPT <-> Hugging Face directories, which transformers, lm-eval-harness and vLLM read: GPT-2's block as
`GPT2LMHeadModel`, Llama's (RMSNorm, RoPE, SwiGLU, any n_kv_head; lm/hf_llama.py) as `LlamaForCausalLM`.
For GPT-2 the parameter names already match; HF's `Conv1D` stores matmul weights as (in, out), so those
are transposed, and HF GPT-2 always has biases, so a bias-free model exports zeros.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lm import hf_llama
from lm.checkpoint import CheckpointError
from lm.config import ModelConfig, head_size, mlp_hidden_size

ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}  # ours -> HF's activation_function


def family(cfg: ModelConfig) -> str:
    """"gpt2" or "llama": the HF format that represents this block exactly; else a one-line refusal."""
    gpt2 = dict(norm="layernorm", position="learned", mlp="gelu", qk_norm=False)
    if all(getattr(cfg, k) == v for k, v in gpt2.items()) and (cfg.n_kv_head or cfg.n_head) == cfg.n_head \
            and mlp_hidden_size(cfg) == 4 * cfg.n_embd and head_size(cfg) * cfg.n_head == cfg.n_embd:
        return "gpt2"
    if all(getattr(cfg, k) == v for k, v in hf_llama.LLAMA_BLOCK.items()):
        return "llama"
    options = ", ".join(f"model.{k} = {getattr(cfg, k)!r}" for k in ("norm", "position", "mlp", "qk_norm"))
    raise CheckpointError(f"{options}: no Hugging Face format holds this block; GPT-2's takes layernorm, learned, "
                          "gelu; Llama's rmsnorm, rope, swiglu; neither qk_norm (export --format safetensors instead)")


def hf_config(cfg: ModelConfig, eos_id: int) -> dict:
    if family(cfg) == "llama":
        return hf_llama.llama_config(cfg, eos_id)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": ACTIVATIONS[cfg.activation], "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "tie_word_embeddings": True, "torch_dtype": "float32",
    }


def unrolled(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with model.share_layers = 1: layer i holds the weights of shared block i // K, so a standard
    directory (n_layer blocks) holds it. The tensors are the model's own (no copy)."""
    import dataclasses

    from lm.model import GPT

    K = model.cfg.share_layers
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("transformer.h."):
            _, _, block, rest = key.split(".", 3)
            for layer in range(int(block) * K, (int(block) + 1) * K):
                state[f"transformer.h.{layer}.{rest}"] = value
        else:
            state[key] = value
    with torch.device("meta"):
        flat = GPT(dataclasses.replace(model.cfg, share_layers=1))
    flat.load_state_dict(state, assign=True)  # wte and lm_head get the one tensor: still tied
    return flat.eval()


def _is_conv1d(model: torch.nn.Module, key: str) -> bool:
    """HF stores every Linear but the head as a transposed Conv1D."""
    module = model.get_submodule(key.rsplit(".", 1)[0])
    return isinstance(module, torch.nn.Linear) and key.endswith(".weight") and key != "lm_head.weight"


def to_hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF tensors (contiguous, head omitted: it is tied) from our model."""
    if family(model.cfg) == "llama":
        return _to_llama_state(model)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            state[f"{name}.weight"] = module.weight
        elif isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and name != "lm_head":
            w = module.weight
            state[f"{name}.weight"] = w.t() if isinstance(module, torch.nn.Linear) else w
            state[f"{name}.bias"] = module.bias if module.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def _to_llama_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    cfg, state = model.cfg, {}
    head = head_size(cfg)
    kv = (cfg.n_kv_head or cfg.n_head) * head
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        names = hf_llama.hf_name(key)
        if isinstance(names, list):  # c_attn: q, k, v stacked by rows
            for name, part in zip(names, value.split([cfg.n_head * head, kv, kv], dim=0)):
                state[name] = part
        else:
            state[names] = value
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def read_hf_config(directory: Path) -> ModelConfig:
    """Our model shape from a HF GPT-2 or Llama `config.json`, refusing what our architecture cannot represent."""
    path = directory / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; hf:{directory} is not a Hugging Face model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not JSON ({e})") from None
    if hf.get("model_type") == "llama":
        try:
            return hf_llama.read_llama_config(hf, str(path))
        except KeyError as e:
            raise CheckpointError(f"{path}: missing {e}") from None
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"{path}: model_type is {hf.get('model_type')!r}; only 'gpt2' and 'llama' map onto "
                              "our GPT")
    act = {v: k for k, v in ACTIVATIONS.items()}.get(hf.get("activation_function", "gelu_new"))
    if act is None:
        raise CheckpointError(f"{path}: activation_function {hf['activation_function']!r} is not gelu or gelu_new")
    n_embd = hf["n_embd"]
    checks = {"n_inner": (hf.get("n_inner"), (None, 4 * n_embd)),
              "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
              "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
              "tie_word_embeddings": (hf.get("tie_word_embeddings", True), (True,))}
    for key, (value, allowed) in checks.items():
        if value not in allowed:
            raise CheckpointError(f"{path}: {key} = {value!r} is not supported (expected {allowed[-1]!r})")
    return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=n_embd, dropout=0.0, bias=True, activation=act)


SHAPE = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "norm", "position", "mlp", "qk_norm",
         "share_layers")


def check_hf_shape(directory: Path, hf: ModelConfig, ours: ModelConfig):
    resolved = {"n_kv_head": lambda m: m.n_kv_head or m.n_head, "mlp_hidden": mlp_hidden_size, "head_dim": head_size}
    keys = SHAPE + (("activation",) if hf.mlp == "gelu" else ("rope_theta", "bias"))
    for key in keys + tuple(resolved):
        a, b = (resolved[key](m) if key in resolved else getattr(m, key) for m in (hf, ours))
        if a != b:
            raise CheckpointError(f"hf:{directory}/config.json gives model.{key} = {a!r}, the config asks for {b!r}")
    if hf.mlp == "gelu" and not ours.bias:
        raise CheckpointError(f"hf:{directory}: GPT-2 weights have biases; set model.bias = true")


def load_hf_weights(directory: Path, model: torch.nn.Module):
    """Copy a HF GPT-2 or Llama `model.safetensors` into our model (shapes checked tensor by tensor)."""
    from safetensors.torch import load_file

    from lm.parallel import shard_like

    path = directory / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (only safetensors weights are read, never pickles)")
    llama = family(model.cfg) == "llama"
    hf = load_file(str(path))
    if not llama:
        hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    for key, target in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        names = hf_llama.hf_name(key) if llama else key.removeprefix("transformer.")
        missing = [n for n in ([names] if isinstance(names, str) else names) if n not in hf]
        if missing:
            raise CheckpointError(f"{path}: has no tensor '{missing[0]}' (for our '{key}')")
        if isinstance(names, list):  # Llama's q, k, v: stacked into our c_attn
            src = torch.cat([hf[n] for n in names], dim=0)
        else:
            src = hf[names].t() if not llama and _is_conv1d(model, key) else hf[names]
        if src.shape != target.shape:
            raise CheckpointError(f"{path}: '{key}' has shape {tuple(src.shape)}, the model expects "
                                  f"{tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(shard_like(src.to(target.dtype), target))  # under FSDP: this rank's shard
