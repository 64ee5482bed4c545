"""Our GPT with Llama's block options <-> the Hugging Face Llama format (`LlamaForCausalLM`).

The blocks map one to one: ln_1/ln_2 are input_layernorm/post_attention_layernorm, attn.c_proj is o_proj,
mlp gate/up/c_proj are gate/up/down_proj. Our fused c_attn is q_proj, k_proj and v_proj stacked (in that
order, rows). Our rotary layout is Llama's Hugging Face one ("rotate half"), so no weight is permuted.
"""
from __future__ import annotations

from data_prep import DataError
from lm.config.schema import ModelConfig, head_size, mlp_hidden_size
from lm.files import field

# what a model needs to be a Llama; anything else stays with GPT-2's format or is refused (lm/interop/hf.py)
LLAMA_BLOCK = {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "qk_norm": False}

_BLOCK_NAMES = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
                "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}


def llama_config(cfg: ModelConfig, eos_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size, "hidden_size": cfg.n_embd,
        "intermediate_size": mlp_hidden_size(cfg), "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "head_dim": head_size(cfg), "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        # both spellings: transformers 5 reads rope_parameters, older readers (vLLM, transformers 4) rope_theta
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout,
        "initializer_range": 0.02, "use_cache": True, "tie_word_embeddings": cfg.tie_embeddings,
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


def read_llama_config(hf: dict, path) -> ModelConfig:
    """Our model shape from a HF Llama `config.json` (already parsed), refusing what we cannot represent in
    one line naming the file and field."""
    positive = (lambda v: v >= 1, "must be >= 1")
    heads = field(hf, "num_attention_heads", path, check=positive)
    hidden = field(hf, "hidden_size", path, check=positive)
    kv = field(hf, "num_key_value_heads", path, (int, type(None)), default=None) or heads
    if kv < 1 or heads % kv:
        raise DataError(f"{path}: num_key_value_heads = {kv} does not divide num_attention_heads = {heads}")
    head_dim = field(hf, "head_dim", path, (int, type(None)), default=None) or hidden // heads
    if head_dim < 1:
        raise DataError(f"{path}: head_dim = {head_dim} must be >= 1 (hidden_size / num_attention_heads)")
    rope = field(hf, "rope_parameters", path, (dict, type(None)), default=None) or {
        "rope_type": "default", "rope_theta": field(hf, "rope_theta", path, (float,), default=10000.0)}
    scaling = field(hf, "rope_scaling", path, (dict, type(None)), default=None)
    if scaling:
        rope = {**rope, "rope_type": scaling.get("rope_type", scaling.get("type"))}
    theta = field(rope, "rope_theta", f"{path}: rope_parameters", (float,), (lambda v: v > 0, "must be > 0"))
    checks = {"hidden_act": (hf.get("hidden_act", "silu"), "silu"),
              "rope type": (rope.get("rope_type", "default"), "default"),
              "mlp_bias": (hf.get("mlp_bias", False), hf.get("attention_bias", False))}
    for key, (value, wanted) in checks.items():
        if value != wanted:
            raise DataError(f"{path}: {key} = {value!r} is not supported (expected {wanted!r})")
    return ModelConfig(vocab_size=field(hf, "vocab_size", path, check=positive),
                       block_size=field(hf, "max_position_embeddings", path, check=positive),
                       n_layer=field(hf, "num_hidden_layers", path, check=positive), n_head=heads, n_embd=hidden,
                       head_dim=0 if head_dim * heads == hidden else head_dim, n_kv_head=kv,
                       mlp_hidden=field(hf, "intermediate_size", path, check=positive), rope_theta=float(theta),
                       bias=field(hf, "attention_bias", path, (bool,), default=False), dropout=0.0,
                       tie_embeddings=field(hf, "tie_word_embeddings", path, (bool,), default=False),
                       norm_eps=field(hf, "rms_norm_eps", path, (float,), (lambda v: 0 < v < 1, "must be in (0, 1)"),
                                      default=1e-6),
                       **LLAMA_BLOCK)
