"""Llama-family configs and weight names: Llama 2/3/3.x, SmolLM/SmolLM2, TinyLlama, Mistral,
Qwen2 (q/k/v bias) and Qwen3 (q/k norm). All run on the shared `CausalLM`."""

from __future__ import annotations

from typing import Any

from jaxvllm.models.config import ModelConfig

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# HF tensor name (after the `model.` prefix) -> CausalLM parameter.
TOP_WEIGHTS = {
    "embed_tokens.weight": "embed",
    "norm.weight": "final_norm_scale",
    "lm_head.weight": "lm_head",
}
LAYER_PREFIX = "layers"
LAYER_WEIGHTS = {
    "input_layernorm.weight": "attn_norm_scale",
    "post_attention_layernorm.weight": "mlp_norm_scale",
    "self_attn.q_proj.weight": "q_proj",
    "self_attn.k_proj.weight": "k_proj",
    "self_attn.v_proj.weight": "v_proj",
    "self_attn.o_proj.weight": "o_proj",
    "self_attn.q_proj.bias": "q_bias",
    "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias",
    "self_attn.o_proj.bias": "o_bias",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
    "mlp.gate_proj.weight": "gate_proj",
    "mlp.up_proj.weight": "up_proj",
    "mlp.down_proj.weight": "down_proj",
    "mlp.gate_proj.bias": "gate_bias",
    "mlp.up_proj.bias": "up_bias",
    "mlp.down_proj.bias": "down_bias",
}


def rope_settings(hf: dict[str, Any]) -> tuple[float, tuple]:
    """rope_theta and scaling from either the 4.x keys or transformers 5's `rope_parameters`."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(hf.get("rope_theta") or params.pop("rope_theta", None) or 10000.0)
    params.pop("rope_theta", None)
    scaling = dict(hf.get("rope_scaling") or params)
    if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = {}
    return theta, tuple(sorted((k, _hashable(v)) for k, v in scaling.items()))


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def sliding_window(hf: dict[str, Any], arch: str, num_layers: int) -> int | None:
    window = hf.get("sliding_window")
    if window is None:
        return None
    if arch == "MistralForCausalLM":
        return int(window)
    if not hf.get("use_sliding_window", False):
        return None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first_sliding = hf.get("max_window_layers", num_layers)
        layer_types = ["sliding_attention" if i >= first_sliding else "full_attention"
                       for i in range(num_layers)]
    if all(t == "full_attention" for t in layer_types):
        return None
    if all(t == "sliding_attention" for t in layer_types):
        return int(window)
    raise ValueError(f"{arch}: a mix of sliding-window and full-attention layers is not supported")


def eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
    heads = hf["num_attention_heads"]
    layers = hf["num_hidden_layers"]
    attention_bias = bool(hf.get("attention_bias", False))
    theta, scaling = rope_settings(hf)
    act = hf.get("hidden_act", "silu")
    return ModelConfig(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm="rms",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp="gated",
        activation=act,
        qkv_bias=attention_bias or arch == "Qwen2ForCausalLM",
        o_bias=attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=sliding_window(hf, arch, layers),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
    )
