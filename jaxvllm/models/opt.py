"""OPT configs and weight names (the vLLM quick-start model): learned positions offset by 2,
LayerNorm with bias, ReLU MLP, biases everywhere, optional project_in/out (OPT-350m) and
post-norm layers when `do_layer_norm_before` is false."""

from __future__ import annotations

from typing import Any

from jaxvllm.models.config import ModelConfig
from jaxvllm.models.llama import eos_ids

ARCHITECTURES = ("OPTForCausalLM",)

TOP_WEIGHTS = {
    "decoder.embed_tokens.weight": "embed",
    "decoder.embed_positions.weight": "pos_embed",
    "decoder.project_in.weight": "project_in",
    "decoder.project_out.weight": "project_out",
    "decoder.final_layer_norm.weight": "final_norm_scale",
    "decoder.final_layer_norm.bias": "final_norm_bias",
    "lm_head.weight": "lm_head",
}
LAYER_PREFIX = "decoder.layers"
LAYER_WEIGHTS = {
    "self_attn_layer_norm.weight": "attn_norm_scale",
    "self_attn_layer_norm.bias": "attn_norm_bias",
    "final_layer_norm.weight": "mlp_norm_scale",
    "final_layer_norm.bias": "mlp_norm_bias",
    "self_attn.q_proj.weight": "q_proj",
    "self_attn.k_proj.weight": "k_proj",
    "self_attn.v_proj.weight": "v_proj",
    "self_attn.out_proj.weight": "o_proj",
    "self_attn.q_proj.bias": "q_bias",
    "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias",
    "self_attn.out_proj.bias": "o_bias",
    "fc1.weight": "up_proj",
    "fc1.bias": "up_bias",
    "fc2.weight": "down_proj",
    "fc2.bias": "down_bias",
}


def config_from_hf(hf: dict[str, Any], arch: str) -> ModelConfig:
    hidden = hf["hidden_size"]
    heads = hf["num_attention_heads"]
    pre_norm = bool(hf.get("do_layer_norm_before", True))
    bias = bool(hf.get("enable_bias", True))
    if not hf.get("layer_norm_elementwise_affine", True):
        raise ValueError("OPT with layer_norm_elementwise_affine=false is not supported")
    return ModelConfig(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf["ffn_dim"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm="layer",
        norm_eps=1e-5,
        pre_norm=pre_norm,
        final_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
        mlp="plain",
        activation=hf.get("activation_function", "relu"),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        position="learned",
        position_offset=2,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        embed_dim=hf.get("word_embed_proj_dim") or hidden,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
    )
