"""Writing a step's new K and V into their cache slots: XLA scatter or a Pallas kernel.

Same contract as `write_kv_reference`: `k, v [T, KVH, D]` go to slot `slot_mapping[t]`
(`block * B + offset`) of layer `layer` of the stacked `[L, N, B, KVH, D]` caches; padding
tokens point into the null block 0. Two writers, selected by name (`KV_WRITERS`):

- "scatter": the reference, `cache.at[layer, block, offset].set(k)`; XLA updates the cache
  in place when it is donated (it is, in the engine's step).
- "triton": a Pallas Triton kernel whose outputs alias the caches
  (`input_output_aliases`), grid `(token blocks, KV heads)`: each program stores
  `block_t` tokens' `[D]` rows of one head. The tail of the last token block re-stores the
  last token (same value, same slot), so no store is masked.

Which is faster on a GPU is for `benchmarks/kernels.py --only kv_write` to say (it times both
in one run); until it has, the engine uses the scatter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.ragged_paged_attention import write_kv_reference


def _write_kernel(
    slots_ref,  # [T] int32
    layer_ref,  # [1] int32
    k_ref,  # [T, KVH, D]
    v_ref,  # [T, KVH, D]
    k_cache_in,  # [L, N, B, KVH, D], aliased to k_cache_ref
    v_cache_in,  # [L, N, B, KVH, D], aliased to v_cache_ref
    k_cache_ref,  # [L, N, B, KVH, D]
    v_cache_ref,  # [L, N, B, KVH, D]
    *,
    block_t: int,
):
    del k_cache_in, v_cache_in  # the outputs are the same buffers
    i, head = pl.program_id(0), pl.program_id(1)
    num_tokens = k_ref.shape[0]
    block_size = k_cache_ref.shape[2]
    tok = jnp.minimum(i * block_t + jax.lax.broadcasted_iota(jnp.int32, (block_t,), 0),
                      num_tokens - 1)
    slot = slots_ref[tok]  # [block_t]
    layer = layer_ref[0]
    block, offset = slot // block_size, slot % block_size
    k_cache_ref[layer, block, offset, head, :] = k_ref[tok, head, :].astype(k_cache_ref.dtype)
    v_cache_ref[layer, block, offset, head, :] = v_ref[tok, head, :].astype(v_cache_ref.dtype)


def write_kv_triton(k_cache, v_cache, layer, k, v, slot_mapping, *, block_t: int = 16,
                    num_warps: int = 2, interpret: bool | None = None):
    """Pallas Triton KV write; returns the updated (k_cache, v_cache)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if k.shape != v.shape or k_cache.shape != v_cache.shape \
            or k_cache.shape[3:] != (num_kv_heads, head_dim) or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"k {k.shape}, v {v.shape}, slot_mapping {slot_mapping.shape} do not "
                         f"fit the caches {k_cache.shape}, {v_cache.shape}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    block_t = min(block_t, 1 << max(num_tokens - 1, 0).bit_length())
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    from jax.experimental.pallas import triton as plgpu

    return pl.pallas_call(
        functools.partial(_write_kernel, block_t=block_t),
        grid=(pl.cdiv(num_tokens, block_t), num_kv_heads),
        in_specs=[whole((num_tokens,)), whole((1,)), whole(k.shape), whole(v.shape),
                  whole(k_cache.shape), whole(v_cache.shape)],
        out_specs=[whole(k_cache.shape), whole(v_cache.shape)],
        out_shape=[jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={4: 0, 5: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"write_kv_bt{block_t}",
    )(slot_mapping.astype(jnp.int32), jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)),
      k, v, k_cache, v_cache)


KV_WRITERS = {"scatter": write_kv_reference, "triton": write_kv_triton}
DEFAULT_KV_WRITER = "scatter"
