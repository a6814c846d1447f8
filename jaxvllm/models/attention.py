"""The attention contract between the engine and the model: step metadata, the KV cache, and
the two functions the decoder calls per layer (`write_kv`, `paged_attention`), dispatched on
the engine's `attention_backend`:

    "cpu"                native CPU code through XLA's FFI, pallas_kernels/native_cpu.py
                         (the CPU default where the system's C++ compiler builds it)
    "xla"                XLA (query rows, KV block) work items with a host-built plan,
                         pallas_kernels/block_pairs.py (the CPU default otherwise)
    "reference"          jnp reference attention, XLA scatter KV write (the tests' oracle)
    "pallas"             the Pallas kernel of this platform's default lowering (the GPU
                         default; on CPU it runs in interpret mode)
    "pallas_triton"      Pallas Triton lowering
    "pallas_mosaic_gpu"  Pallas Mosaic GPU lowering (Hopper)
    "pallas:<variant>"   any variant registered in pallas_kernels/variants.py

and any of these with "+kv_<writer>" to pick the KV writer of pallas_kernels/kv_write.py
("+kv_triton": the Pallas kernel; default "scatter"), e.g. "pallas+kv_triton".

`attend` is what a layer calls: the write, then the attention, or, for a step whose metadata
says every row is one decode token (`decode_only`, the multi-step decode loop) and whose
variant has a fused decode kernel (`Variant.decode`), both in one kernel. Naming a KV writer
("+kv_scatter", "+kv_triton") keeps them apart there too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxvllm import parallel
from pallas_kernels.kv_write import DEFAULT_KV_WRITER, KV_WRITERS
from pallas_kernels.variants import get_variant, variants

ATTENTION_BACKENDS = ("cpu", "xla", "reference", "pallas", "pallas_triton", "pallas_mosaic_gpu")
_NAMED_VARIANTS = {"cpu": "native_cpu", "xla": "block_pairs", "reference": "reference",
                   "pallas_triton": "triton", "pallas_mosaic_gpu": "mosaic_gpu"}
# The variant "pallas" means, per platform. Mosaic GPU becomes the Hopper default only once
# benchmarks/kernels.py has shown it faster there (see benchmarks/README.md).
DEFAULT_PALLAS_VARIANT = {"cpu": "triton", "gpu": "triton", "hopper": "triton"}


def default_pallas_variant() -> str:
    platform = jax.default_backend()
    if platform != "gpu":
        return DEFAULT_PALLAS_VARIANT["cpu"]
    kind = jax.devices()[0].device_kind
    hopper = any(name in kind for name in ("H100", "H200", "GH200", "H800", "H20"))
    return DEFAULT_PALLAS_VARIANT["hopper" if hopper else "gpu"]


@functools.lru_cache(maxsize=None)
def resolve_attention_backend(backend: str) -> tuple[str, str]:
    """`attention_backend` -> (attention variant name, KV writer name); ValueError if unknown."""
    name, _, writer = backend.partition("+kv_")
    writer = writer or DEFAULT_KV_WRITER
    if name == "pallas":
        variant = default_pallas_variant()
    elif name.startswith("pallas:"):
        variant = name[len("pallas:"):]
    else:
        variant = _NAMED_VARIANTS.get(name)
    if variant not in variants() or writer not in KV_WRITERS:
        raise ValueError(
            f"attention_backend {backend!r} is not available; choose one of "
            f"{list(ATTENTION_BACKENDS)} or 'pallas:<variant>' with a variant in "
            f"{sorted(variants())}, optionally followed by '+kv_<writer>' with a writer in "
            f"{sorted(KV_WRITERS)}")
    return variant, writer


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["query_start_loc", "seq_lens", "block_tables", "slot_mapping",
                                "plan"],
                   meta_fields=["decode_only"])
@dataclasses.dataclass
class AttentionMetadata:
    """One step's ragged batch layout (see pallas_kernels/ragged_paged_attention.py)."""

    query_start_loc: jax.Array  # [R + 1] int32
    seq_lens: jax.Array  # [R] int32, cached + this step's tokens
    block_tables: jax.Array  # [R, max_blocks] int32
    slot_mapping: jax.Array  # [T] int32, where each token's k/v is written
    plan: Any = None  # the host-built work plan of variants that take one (`Variant.plan`)
    # static: row r is request r's one new token (T == R; padding rows, of seq_len 0 and no
    # query token, at the end), as in a multi-step decode
    decode_only: bool = False


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
    """Store this step's k, v [T, KVH, D] at `meta.slot_mapping` of `layer`."""
    _, writer = resolve_attention_backend(backend)
    mesh = parallel.active_mesh()
    if mesh is not None:  # tensor parallel: each device writes its own KV heads
        return _write_kv_sharded(mesh, writer, kv, layer, k, v, meta)
    k_cache, v_cache = KV_WRITERS[writer](kv.k, kv.v, layer, k, v, meta.slot_mapping)
    return KVCache(k_cache, v_cache)


_HEADS = parallel.P(None, parallel.AXIS, None)  # [T, heads, D] split by head


def _write_kv_sharded(mesh, writer, kv, layer, k, v, meta):
    if writer == "scatter":  # XLA partitions the scatter along the KV-head axis
        k, v = parallel.constrain(k, _HEADS), parallel.constrain(v, _HEADS)
        k_cache, v_cache = KV_WRITERS[writer](kv.k, kv.v, layer, k, v, meta.slot_mapping)
        return KVCache(parallel.constrain(k_cache, parallel.kv_cache_spec()),
                       parallel.constrain(v_cache, parallel.kv_cache_spec()))
    cache, rep = parallel.kv_cache_spec(), parallel.P()
    fn = parallel.shard_map(KV_WRITERS[writer], mesh,
                            in_specs=(cache, cache, rep, _HEADS, _HEADS, rep),
                            out_specs=(cache, cache))
    return KVCache(*fn(kv.k, kv.v, jnp.asarray(layer, jnp.int32), k, v, meta.slot_mapping))


def paged_attention(q, kv: KVCache, layer, meta: AttentionMetadata, *, scale: float,
                    sliding_window: int | None, backend: str,
                    soft_cap: float | None = None) -> jax.Array:
    """Ragged paged attention of q [T, H, D] over `layer` of the stacked cache -> [T, H, D]."""
    variant, _ = resolve_attention_backend(backend)
    spec = get_variant(variant)
    fn = functools.partial(spec.fn, scale=scale, sliding_window=sliding_window,
                           soft_cap=soft_cap)
    if spec.plan is not None:
        fn = functools.partial(fn, plan=meta.plan)
    mesh = parallel.active_mesh()
    if mesh is not None and spec.lowering == "xla":  # XLA partitions it by head
        out = fn(parallel.constrain(q, _HEADS), kv.k, kv.v, layer, meta.query_start_loc,
                 meta.seq_lens, meta.block_tables)
        return parallel.constrain(out, _HEADS)
    if mesh is not None:  # a kernel runs per shard on its own heads and KV heads
        cache, rep = parallel.kv_cache_spec(), parallel.P()
        fn = parallel.shard_map(fn, mesh, in_specs=(_HEADS, cache, cache, rep, rep, rep, rep),
                                out_specs=_HEADS)
        layer = jnp.asarray(layer, jnp.int32)
    return fn(q, kv.k, kv.v, layer, meta.query_start_loc, meta.seq_lens, meta.block_tables)


def fused_decode_kernel(backend: str) -> Callable | None:
    """The fused decode kernel (`Variant.decode`) that `attend` runs for `backend`'s
    decode-only steps, or None: its variant has none, or the backend names a KV writer."""
    if "+kv_" in backend:
        return None
    return get_variant(resolve_attention_backend(backend)[0]).decode


def attend(q, k, v, kv: KVCache, layer, meta: AttentionMetadata, *, scale: float,
           sliding_window: int | None, backend: str, soft_cap: float | None = None,
           qkv: jax.Array | None = None, counters: jax.Array | None = None):
    """Store this step's k, v [T, KVH, D] and attend with q [T, H, D]: (out [T, H, D], cache).
    One fused kernel for a `decode_only` step where the backend has one
    (`fused_decode_kernel`) and the step is not sharded; `qkv`, where the caller has q, k and
    v as one [T, H + 2 KVH, D] array already, is that kernel's input as it is (XLA would
    otherwise copy the three into a new one). `counters`, the step's kernels' shared
    arrival counts (pallas_kernels/small_batch_matmul.py), go to that kernel too and come
    back third: (out, cache, counters)."""
    decode = fused_decode_kernel(backend)
    if meta.decode_only and decode is not None and parallel.active_mesh() is None:
        if qkv is None:
            qkv = jnp.concatenate([q, k.astype(q.dtype), v.astype(q.dtype)], axis=1)
        out, k_cache, v_cache, *counted = decode(
            qkv, kv.k, kv.v, layer, meta.seq_lens, meta.block_tables, meta.slot_mapping,
            scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
            num_kv_heads=k.shape[1], **({} if counters is None else {"counters": counters}))
        kv = KVCache(k_cache, v_cache)
        return (out, kv) if counters is None else (out, kv, *counted)
    kv = write_kv(kv, layer, k, v, meta, backend)
    out = paged_attention(q, kv, layer, meta, scale=scale, sliding_window=sliding_window,
                          backend=backend, soft_cap=soft_cap)
    return (out, kv) if counters is None else (out, kv, counters)
