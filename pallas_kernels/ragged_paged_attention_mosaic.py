"""Ragged paged attention, Mosaic GPU lowering (Hopper: TMA copies and wgmma).

Same contract and signature as `ragged_paged_attention_reference`, and the same query tiles
as the Triton kernel (`ragged_tiles.py`), with one warpgroup per program and the shapes
wgmma wants: a tile is always 64 rows (`block_q = 64 // group_pad` tokens times the padded
query-head group), keys go `block_kv` (a multiple of 64) at a time.

Per program (query tile, KV head):

    q tile [64, D]  --TMA-->  SMEM (once; the rows were gathered by a jnp prologue)
    for each KV step (two SMEM slots; step j+1's pages are in flight while j computes):
        pages of the step  --TMA, one copy and one barrier per page-->  k, v SMEM slot
        s = q @ k^T                   wgmma, f32 accumulator [64, block_kv]
        mask (causal, window, padding rows), soft cap, online softmax in base 2
        p -> SMEM, acc = acc * alpha + p @ v    wgmma [64, D]
    acc / l  -> SMEM --TMA--> the tile's output rows

A page is `k_cache[layer, page, :, head, :]`, a strided `[B, D]` box that TMA copies
directly, so the layer of the stacked cache is indexed in the kernel (no slice copy). Pages
past the tile's last position are redirected to the null block 0 and masked.

Limits: bfloat16 / float16 (wgmma on f32 would be tf32), `head_dim` a multiple of 64 (128-byte
swizzle), `block_size` a multiple of 8 (TMA row tiles), query groups up to 64 heads. P goes
through SMEM (not registers) because the CPU interpreter only takes SMEM operands for wgmma;
keeping it in registers (`p_in_registers=True`) saves that round trip on a GPU.

Status: traced, lowered for an H100 (`jax.jit(...).trace(...).lower(lowering_platforms=
("cuda",))` under an abstract device) and run in Mosaic GPU's interpreter on CPU by the tests;
never compiled or run on a GPU yet (see benchmarks/README.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.ragged_tiles import (
    MASK_VALUE,
    TILE_LEN,
    TILE_POS,
    TILE_REQ,
    TILE_TOKEN,
    base2_scores,
    next_power_of_2,
    plan_query_tiles,
    tile_key_steps,
    tiles_to_tokens,
)
from pallas_kernels.validation import maybe_validate
from pallas_kernels.variants import register_variant

ROWS = 64  # one warpgroup's wgmma M


def gather_query_tiles(q, tiles, group: int, group_pad: int) -> jax.Array:
    """[T, H, D] -> [num_tiles, KVH, block_q * group_pad, D], zero rows where no query is."""
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = num_heads // group
    block_q = tiles.block_q
    tok = jnp.arange(block_q, dtype=jnp.int32)
    valid = tok[None, :] < tiles.table[TILE_LEN][:, None]  # [NT, block_q]
    idx = jnp.clip(tiles.table[TILE_TOKEN][:, None] + tok[None, :], 0, num_tokens - 1)
    qt = jnp.where(valid[..., None, None], q[idx], jnp.zeros((), q.dtype))  # [NT, bq, H, D]
    qt = qt.reshape(-1, block_q, kv_heads, group, head_dim)
    qt = jnp.pad(qt, ((0, 0), (0, 0), (0, 0), (0, group_pad - group), (0, 0)))
    return qt.transpose(0, 2, 1, 3, 4).reshape(-1, kv_heads, block_q * group_pad, head_dim)


def _kernel(
    tiles_ref,  # [4, num_tiles] int32 (GMEM): request, first token, length, first position
    layer_ref,  # [1] int32 (GMEM)
    block_tables_ref,  # [R, MB] int32 (GMEM)
    q_ref,  # [num_tiles, KVH, 64, D] (GMEM) query rows per tile and KV head
    k_ref,  # [L, N, B, KVH, D] (GMEM)
    v_ref,  # [L, N, B, KVH, D] (GMEM)
    o_ref,  # [num_tiles, KVH, 64, D] (GMEM)
    q_smem,  # [64, D]
    k_smem,  # [2, block_kv, D] two slots
    v_smem,  # [2, block_kv, D]
    p_smem,  # [64, block_kv] probabilities, then reused for nothing else
    o_smem,  # [64, D]
    q_barrier,  # 1 barrier
    k_barriers,  # 2 * pages_per_step barriers, one per (slot, page)
    v_barriers,  # 2 * pages_per_step
    *,
    scale: float,
    group_pad: int,
    group: int,
    block_kv: int,
    sliding_window: int | None,
    soft_cap: float | None,
    p_in_registers: bool,
):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    tile, head = lax.axis_index("tile"), lax.axis_index("head")
    head_dim = q_smem.shape[1]
    block_size = k_ref.shape[2]
    max_blocks = block_tables_ref.shape[1]
    pages = block_kv // block_size
    dtype = q_smem.dtype

    req = tiles_ref[TILE_REQ, tile]
    length = tiles_ref[TILE_LEN, tile]
    first_pos = tiles_ref[TILE_POS, tile]
    layer = layer_ref[0]

    plgpu.copy_gmem_to_smem(q_ref.at[tile, head], q_smem, q_barrier.at[0])

    kv_hi, start, stop = tile_key_steps(first_pos, length, sliding_window, block_kv)

    def fetch(step, slot):
        for i in range(pages):  # one TMA copy (and barrier) per page of the step
            idx = step * pages + i
            page = block_tables_ref[req, jnp.minimum(idx, max_blocks - 1)]
            page = jnp.where(idx * block_size < kv_hi, page, 0)  # past the tile: null block
            rows = pl.ds(i * block_size, block_size)
            plgpu.copy_gmem_to_smem(k_ref.at[layer, page, :, head, :],
                                    k_smem.at[slot, rows], k_barriers.at[slot * pages + i])
            plgpu.copy_gmem_to_smem(v_ref.at[layer, page, :, head, :],
                                    v_smem.at[slot, rows], v_barriers.at[slot * pages + i])

    @pl.when(start < stop)
    def _():
        fetch(start, 0)

    row = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 0, layout=plgpu.Layout.WGMMA)
    col = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 1, layout=plgpu.Layout.WGMMA)
    tok = row // group_pad
    row_ok = (tok < length) & (row % group_pad < group)
    q_pos = first_pos + tok
    qk_scale = scale if soft_cap is None else scale / soft_cap
    plgpu.barrier_wait(q_barrier.at[0])

    def step_fn(step, carry):
        acc, m_prev, l_prev = carry
        slot = lax.rem(step - start, 2)

        @pl.when(step + 1 < stop)
        def _():
            fetch(step + 1, 1 - slot)  # that slot was last read by the previous step

        for i in range(pages):
            plgpu.barrier_wait(k_barriers.at[slot * pages + i])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
            return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((ROWS, block_kv), jnp.float32)) * qk_scale
        s = base2_scores(s, soft_cap)
        k_pos = step * block_kv + col
        mask = row_ok & (k_pos <= q_pos)
        if sliding_window is not None:
            mask = mask & (k_pos > q_pos - sliding_window)
        s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.where(mask, jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0])), 0.0)
        l_next = l_prev * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        for i in range(pages):
            plgpu.barrier_wait(v_barriers.at[slot * pages + i])
        if p_in_registers:
            lhs = p.astype(dtype)
        else:
            p_smem[...] = p.astype(dtype)
            plgpu.commit_smem()
            lhs = p_smem

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, lhs, v_smem.at[slot])
            return acc_ref[...]

        acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, head_dim), jnp.float32))
        return acc, m_next, l_next

    acc = plgpu.layout_cast(jnp.full((ROWS, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)
    m = plgpu.layout_cast(jnp.full((ROWS,), MASK_VALUE, jnp.float32),
                          plgpu.Layout.WGMMA.reduce(1))
    l = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc, m, l = lax.fori_loop(start, stop, step_fn, (acc, m, l))

    # rows that saw no key have l == 0: they come out as zeros, never NaN
    l = jnp.where(l > 0, l, 1.0)
    o_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[tile, head])
    plgpu.wait_smem_to_gmem(0)


def ragged_paged_attention_mosaic(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array | int,
    query_start_loc: jax.Array,
    seq_lens: jax.Array,
    block_tables: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_kv: int = 64,
    p_in_registers: bool = False,
    interpret: bool | None = None,
) -> jax.Array:
    """Mosaic GPU ragged paged attention; returns [T, H, D] in q's dtype.

    Arguments as `ragged_paged_attention_reference`. Static knobs: `block_kv` keys per step
    (a multiple of 64 and of the block size), `p_in_registers` (see the module docstring).
    `interpret=None` runs Mosaic GPU's interpreter on CPU and compiles on GPU.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = k_cache.shape
    reason = _supports_shapes(q.dtype, head_dim, num_heads, num_kv_heads, block_size)
    if reason is None and (block_kv % 64 or block_kv % block_size):
        reason = f"block_kv {block_kv} must be a multiple of 64 and of block_size {block_size}"
    if reason is not None:
        raise ValueError(f"mosaic_gpu ragged paged attention: {reason}")
    if v_cache.shape != k_cache.shape or k_cache.shape[-1] != head_dim:
        raise ValueError(f"q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape} disagree")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    maybe_validate(q, k_cache, query_start_loc, seq_lens, block_tables)
    block_kv = max(block_kv, block_size)

    group = num_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    tiles = plan_query_tiles(query_start_loc, seq_lens, num_tokens, ROWS // group_pad)
    q_tiles = gather_query_tiles(q, tiles, group, group_pad)
    num_tiles = q_tiles.shape[0]
    pages = block_kv // block_size

    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = [
        plgpu.SMEM((ROWS, head_dim), q.dtype, transforms=swizzled),  # q
        plgpu.SMEM((2, block_kv, head_dim), q.dtype, transforms=swizzled),  # k slots
        plgpu.SMEM((2, block_kv, head_dim), q.dtype, transforms=swizzled),  # v slots
        plgpu.SMEM((ROWS, block_kv), q.dtype, transforms=swizzled),  # p
        plgpu.SMEM((ROWS, head_dim), q.dtype, transforms=swizzled),  # o
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_barriers=2 * pages),
        plgpu.Barrier(num_barriers=2 * pages),
    ]
    kernel = functools.partial(
        _kernel, scale=scale, group_pad=group_pad, group=group, block_kv=block_kv,
        sliding_window=sliding_window, soft_cap=soft_cap, p_in_registers=p_in_registers)
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q_tiles.shape, q.dtype),
        scratch_types=scratch,
        grid=(num_tiles, num_kv_heads),
        grid_names=("tile", "head"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interpret_params() if interpret else False,
    )(tiles.table, jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)),
      block_tables.astype(jnp.int32), q_tiles, k_cache, v_cache)
    return tiles_to_tokens(out, tiles, query_start_loc, seq_lens, num_tokens, group)


def interpret_available() -> bool:
    """Mosaic GPU's interpreter (for runs without a GPU) arrived in jax 0.11."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return hasattr(plgpu, "InterpretGPUParams")


def _interpret_params():
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if not interpret_available():
        raise ValueError("the Mosaic GPU kernel cannot be interpreted on this jax version "
                         f"({jax.__version__}; needs >= 0.11); use attention_backend="
                         "'pallas_triton' or 'reference' without a GPU")
    return plgpu.InterpretGPUParams()


def _supports_shapes(dtype, head_dim, num_heads, num_kv_heads, block_size) -> str | None:
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name}: wgmma here takes bfloat16 or float16"
    if head_dim % 64:
        return f"head_dim {head_dim} is not a multiple of 64 (128-byte swizzle)"
    if block_size % 8:
        return f"block_size {block_size} is not a multiple of 8 (TMA row tiles)"
    if next_power_of_2(num_heads // num_kv_heads) > ROWS:
        return f"{num_heads // num_kv_heads} query heads per KV head exceed one 64-row tile"
    return None


def _supports(case) -> str | None:
    return _supports_shapes(case.dtype, case.head_dim, case.num_heads, case.num_kv_heads,
                            case.block_size)


register_variant(
    "mosaic_gpu", ragged_paged_attention_mosaic, lowering="mosaic_gpu", supports=_supports,
    description="Pallas Mosaic GPU: 64-row query tiles, TMA page copies (2 slots), wgmma")
