"""Our GPT with Llama's block options <-> the Hugging Face Llama format (`LlamaForCausalLM`).

The blocks map one to one: ln_1/ln_2 are input_layernorm/post_attention_layernorm, attn.c_proj is o_proj,
mlp gate/up/c_proj are gate/up/down_proj. Our fused c_attn is q_proj, k_proj and v_proj stacked (in that
order, rows). Our rotary layout is Llama's Hugging Face one ("rotate half"), so no weight is permuted.
"""
from __future__ import annotations

from lm.attention import RMS_EPS
from lm.config import ModelConfig, head_size, mlp_hidden_size

# what a model needs to be a Llama; anything else stays with GPT-2's format or is refused (lm/hf.py)
LLAMA_BLOCK = {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "qk_norm": False}

_BLOCK_NAMES = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
                "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}


def llama_config(cfg: ModelConfig, eos_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size, "hidden_size": cfg.n_embd,
        "intermediate_size": mlp_hidden_size(cfg), "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "head_dim": head_size(cfg), "hidden_act": "silu", "rms_norm_eps": RMS_EPS,
        # both spellings: transformers 5 reads rope_parameters, older readers (vLLM, transformers 4) rope_theta
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout,
        "initializer_range": 0.02, "use_cache": True, "tie_word_embeddings": True,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": "float32",
    }


def hf_name(key: str) -> str | list[str]:
    """The HF tensor name(s) of our parameter `key`; c_attn maps to the three projections it stacks."""
    if key == "transformer.wte.weight":
        return "model.embed_tokens.weight"
    if key.startswith("transformer.ln_f."):
        return "model.norm." + key.rsplit(".", 1)[1]
    _, _, layer, rest = key.split(".", 3)  # transformer.h.<i>.<module...>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    prefix = f"model.layers.{layer}"
    if module == "attn.c_attn":
        return [f"{prefix}.self_attn.{p}_proj.{kind}" for p in "qkv"]
    return f"{prefix}.{_BLOCK_NAMES[module]}.{kind}"


def read_llama_config(hf: dict, where: str) -> ModelConfig:
    """Our model shape from a HF Llama `config.json` (already parsed), refusing what we cannot represent."""
    from lm.checkpoint import CheckpointError

    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
    if hf.get("rope_scaling"):
        rope = {**rope, "rope_type": hf["rope_scaling"].get("rope_type", hf["rope_scaling"].get("type"))}
    checks = {"hidden_act": (hf.get("hidden_act", "silu"), "silu"),
              "rms_norm_eps": (hf.get("rms_norm_eps", RMS_EPS), RMS_EPS),
              "rope type": (rope.get("rope_type", "default"), "default"),
              "tie_word_embeddings": (hf.get("tie_word_embeddings", False), True),
              "mlp_bias": (hf.get("mlp_bias", False), hf.get("attention_bias", False))}
    for key, (value, wanted) in checks.items():
        if value != wanted:
            raise CheckpointError(f"{where}: {key} = {value!r} is not supported (expected {wanted!r})")
    return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                       n_layer=hf["num_hidden_layers"], n_head=heads, n_embd=hidden,
                       head_dim=0 if (hf.get("head_dim") or hidden // heads) * heads == hidden else hf["head_dim"],
                       n_kv_head=hf.get("num_key_value_heads") or heads, mlp_hidden=hf["intermediate_size"],
                       rope_theta=float(rope["rope_theta"]), bias=bool(hf.get("attention_bias", False)),
                       dropout=0.0, **LLAMA_BLOCK)
