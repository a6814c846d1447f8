"""The attention contract between the engine and the model: step metadata, the KV cache, and
the one function the decoder calls for attention (reference now, Pallas kernels by flag).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ragged_paged_attention import (
    ragged_paged_attention_reference,
    write_kv_reference,
)

ATTENTION_BACKENDS = ("reference",)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["query_start_loc", "seq_lens", "block_tables", "slot_mapping"],
                   meta_fields=[])
@dataclasses.dataclass
class AttentionMetadata:
    """One step's ragged batch layout (see pallas_kernels/ragged_paged_attention.py)."""

    query_start_loc: jax.Array  # [R + 1] int32
    seq_lens: jax.Array  # [R] int32, cached + this step's tokens
    block_tables: jax.Array  # [R, max_blocks] int32
    slot_mapping: jax.Array  # [T] int32, where each token's k/v is written


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=[])
@dataclasses.dataclass
class KVCache:
    """Stacked paged cache: k and v are [layers, num_blocks, block_size, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


def allocate_kv_cache(cfg, num_blocks: int, block_size: int, dtype) -> KVCache:
    shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def kv_cache_bytes_per_block(cfg, block_size: int, dtype) -> int:
    return 2 * cfg.num_layers * block_size * cfg.kv_size * np.dtype(dtype).itemsize


def write_kv(kv: KVCache, layer, k, v, meta: AttentionMetadata, backend: str) -> KVCache:
    k_cache, v_cache = write_kv_reference(kv.k, kv.v, layer, k, v, meta.slot_mapping)
    return KVCache(k_cache, v_cache)


def paged_attention(q, kv: KVCache, layer, meta: AttentionMetadata, *, scale: float,
                    sliding_window: int | None, backend: str) -> jax.Array:
    if backend != "reference":
        raise ValueError(f"attention_backend {backend!r} is not available; choose one of "
                         f"{list(ATTENTION_BACKENDS)}")
    return ragged_paged_attention_reference(
        q, kv.k, kv.v, layer, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        scale=scale, sliding_window=sliding_window)
