"""ModelConfig: everything the forward pass needs to know about an architecture.

Built once from a Hugging Face `config.json` (or GGUF metadata translated into one) by the
family module (`llama.py`, `opt.py`); frozen and hashable so that it can be a static argument
under `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    pre_norm: bool = True  # False: OPT-350m style post-norm
    final_norm: bool = True
    mlp: str = "gated"  # "gated": down(act(gate) * up); "plain": fc2(act(fc1))
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    position: str = "rope"  # "rope" | "learned"
    position_offset: int = 0  # OPT stores two extra rows before position 0
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted items of HF rope_scaling
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    embed_dim: int | None = None  # OPT word_embed_proj_dim when it differs from hidden_size
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def word_embed_dim(self) -> int:
        return self.embed_dim or self.hidden_size

    @property
    def has_projections(self) -> bool:
        return self.word_embed_dim != self.hidden_size

    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)


def resolve_dtype(dtype: str | Any = "auto") -> Any:
    """'auto' is float32 on CPU (bf16 matmuls there are ~20x slower) and bfloat16 elsewhere."""
    if dtype is None or dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if isinstance(dtype, str):
        name = {"half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32",
                "fp32": "float32"}.get(dtype, dtype)
        if name not in DTYPES:
            raise ValueError(
                f"dtype {dtype!r} is not supported; choose one of 'auto', {', '.join(map(repr, DTYPES))}")
        return DTYPES[name]
    for value in DTYPES.values():
        if jnp.dtype(dtype) == jnp.dtype(value):
            return value
    raise ValueError(f"dtype {dtype!r} is not supported; choose one of 'auto', {', '.join(DTYPES)}")


def dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name
