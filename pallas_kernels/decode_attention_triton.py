"""Decode attention with the KV write in the same kernel (Pallas Triton), for steps where
every request has exactly one new token: the engine's multi-step decode loop.

Contract (`decode_attention_reference` below): row `t` of the step is request `t`'s new
token at position `seq_lens[t] - 1`; its k and v are stored at `slot_mapping[t]` of `layer`
and its query attends to the request's keys up to and including its own. A row with
`seq_len == 0` is padding: its k and v still go to its slot (the null block), its output is
zero. Returns the output `[T, H, D]` and both updated caches.

Why a kernel of its own: the general step runs a scatter for k, one for v, the attention
kernel and a gather from the kernel's per-tile rows back to tokens, four kernels a layer.
Here one program per (token, KV head) stores its token's k and v row, walks the keys
already in the cache `block_k` at a time (the ragged kernel's online softmax,
`ragged_tiles.online_softmax_step`), adds its own key from registers (so no program waits on
another's store), and writes its group's query heads straight to `[T, H, D]`: one kernel.
At batch 1 a decode step is a few hundred small kernels, so each one saved per layer counts.

Few rows leave most of the GPU idle: a batch-1 step is two programs (one a KV head), each
walking the whole context one tile after another. There `num_splits` programs share a row's
tiles (flash-decoding), each keeping its own running softmax: a walk `num_splits` times
shorter. Each writes its softmax out and counts itself in (an atomic add on the row and KV
head's count); the one that finds the others all there rescales and adds them (`_merge`)
and sets the count back to zero, so the merge costs no kernel of its own.
`default_num_splits` picks how many from the shapes.

Many rows fill the GPU with one program a row and KV head. Asked for (`split_keys`), program
s of a row takes its keys [s * split_keys, (s + 1) * split_keys) instead (vLLM's paged
attention v2 partitions likewise): a short row's other programs find no key and end at
once, a long row's walk is cut to `split_keys`. Meant for rows of uneven contexts in one
wave of programs, it lost on an H100 (256 rows of 5-100% of 2,048 keys: 74 us a layer
against 70 with one program a row; benchmarks/README.md, thirteenth round), so the
defaults never choose it.

The query, the new key and the new value come in one `[T, H + 2 * KVH, D]` array (q, then
k, then v, rotary embeddings applied): XLA writes it with one fusion. The caches are
aliased to the outputs. Keys past a row's own position read block 0 and are masked.
Padded query rows (the group rounded up to a power of two, at least 16 rows for Triton's
dot) repeat the group's last head and store the same value to the same place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.ragged_paged_attention import (
    ragged_paged_attention_reference,
    write_kv_reference,
)
from pallas_kernels.ragged_tiles import (
    base2_scores,
    next_power_of_2,
    online_softmax_start,
    online_softmax_step,
)

MIN_DOT = 16  # Triton's smallest dot dimension
# Tiling defaults, from benchmarks/decode_kernel.py on an H100 (benchmarks/README.md): with
# 512 programs (256 rows, 2 KV heads) splitting was slower at every context; at batch 1 a
# layer's attention inside the engine's CUDA graph took 8.9 us split 16 ways at context
# 1024, against 15.3 us unsplit at context 512 (8 ways, what a batch-1 step padded to 16
# rows now gets, timed as 16 within the sweep's noise). Keys a tile: 128 for whole rows (as
# fast or faster at every shape), 64 for split rows (faster at context 512).
TARGET_PROGRAMS = 256
MAX_SPLITS = 16
WHOLE_BLOCK_K, SPLIT_BLOCK_K = 128, 64
# At most this many key ranges a row where `split_keys` is given (wider ranges past it): the
# partial results of every (row, KV head, range) are written out for the merge
MAX_KEY_RANGES = 4


def decode_attention_reference(qkv, k_cache, v_cache, layer, seq_lens, block_tables,
                               slot_mapping, *, scale: float, sliding_window: int | None = None,
                               soft_cap: float | None = None, num_kv_heads: int):
    """The contract in plain jnp: the KV write, then ragged attention of one token a row."""
    q, k, v = split_qkv(qkv, num_kv_heads)
    k_cache, v_cache = write_kv_reference(k_cache, v_cache, layer, k, v, slot_mapping)
    # one query token a row; a row of seq_len 0 sees no key (position -1): zeros
    query_start_loc = jnp.arange(qkv.shape[0] + 1, dtype=jnp.int32)
    out = ragged_paged_attention_reference(q, k_cache, v_cache, layer, query_start_loc,
                                           seq_lens, block_tables, scale=scale,
                                           sliding_window=sliding_window, soft_cap=soft_cap)
    return out, k_cache, v_cache


def split_qkv(qkv: jax.Array, num_kv_heads: int):
    """[T, H + 2 KVH, D] -> q [T, H, D], k, v [T, KVH, D]."""
    num_heads = qkv.shape[1] - 2 * num_kv_heads
    return (qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads],
            qkv[:, num_heads + num_kv_heads:])


def _kernel(
    seq_lens_ref,  # [T] int32
    slots_ref,  # [T] int32
    layer_ref,  # [1] int32
    block_tables_ref,  # [T, MB] int32
    qkv_ref,  # [T, H + 2 KVH, D]
    k_cache_in,  # [L, N, B, KVH, D], aliased to k_cache_ref
    v_cache_in,
    *refs,  # o_ref [T, H, D]; (split S > 1:) acc_ref [T, KVH, S, rows, D], m_ref, l_ref
            # [T, KVH, S, rows]; the caches; (S > 1:) the counts [>= T * KVH], aliased
    scale: float,
    group: int,
    rows: int,
    block_k: int,
    num_splits: int,
    split_keys: int | None,
    sliding_window: int | None,
    soft_cap: float | None,
    on_gpu: bool,
):
    tok, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    if num_splits == 1:
        o_ref, k_cache_ref, v_cache_ref = refs
        split_refs = None
    else:
        _, o_ref, acc_ref, m_ref, l_ref, k_cache_ref, v_cache_ref, counts_ref = refs
        split_refs = (acc_ref, m_ref, l_ref, counts_ref)
    attend_program(tok, head, split, seq_lens_ref=seq_lens_ref, slots_ref=slots_ref,
                   layer=layer_ref[0], block_tables_ref=block_tables_ref, qkv_ref=qkv_ref,
                   k_cache_in=k_cache_in, v_cache_in=v_cache_in, k_cache_ref=k_cache_ref,
                   v_cache_ref=v_cache_ref, o_ref=o_ref, split_refs=split_refs,
                   count=tok * k_cache_ref.shape[3] + head, scale=scale, group=group,
                   rows=rows, block_k=block_k, num_splits=num_splits, split_keys=split_keys,
                   sliding_window=sliding_window, soft_cap=soft_cap, on_gpu=on_gpu)


def attend_program(tok, head, split, *, seq_lens_ref, slots_ref, layer, block_tables_ref,
                   qkv_ref, k_cache_in, v_cache_in, k_cache_ref, v_cache_ref, o_ref,
                   split_refs, count, scale: float, group: int, rows: int, block_k: int,
                   num_splits: int, split_keys: int | None, sliding_window: int | None,
                   soft_cap: float | None, on_gpu: bool, written=None):
    """Program (token, KV head, split): the KV write and its share of the attention; with
    splits (`split_refs`: acc, m, l and the counts, `count` this row and head's), the last
    to finish merges. `written()`, where given, runs once the output is stored."""
    num_kv_heads = k_cache_ref.shape[3]
    num_heads, head_dim = qkv_ref.shape[1] - 2 * num_kv_heads, qkv_ref.shape[2]
    block_size = k_cache_ref.shape[2]
    max_blocks = block_tables_ref.shape[1]
    seq_len = seq_lens_ref[tok]
    pos = seq_len - 1  # this token's position; -1 for padding

    # this token's k and v for this KV head, stored as the cache holds them (by every split
    # of the row: the same value to the same place)
    k_new = qkv_ref[tok, num_heads + head, :].astype(k_cache_ref.dtype)
    v_new = qkv_ref[tok, num_heads + num_kv_heads + head, :].astype(v_cache_ref.dtype)
    slot = slots_ref[tok]
    block, offset = slot // block_size, slot % block_size
    k_cache_ref[layer, block, offset, head, :] = k_new
    v_cache_ref[layer, block, offset, head, :] = v_new

    q_head = _group_heads(head, group, rows)
    # Triton's dot takes one element type: a float32 model over a bfloat16 cache computes
    # in float32
    dot_dtype = jnp.promote_types(qkv_ref.dtype, k_cache_ref.dtype)
    q = qkv_ref[jnp.full((rows,), tok, jnp.int32), q_head, :].astype(dot_dtype)  # [rows, D]

    qk_scale = scale if soft_cap is None else scale / soft_cap
    dot_precision = lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None

    # the keys already in the cache: [kv_lo, pos), this split's share of their tiles
    kv_lo = 0 if sliding_window is None else jnp.maximum(pos - sliding_window + 1, 0)
    step_lo = kv_lo // block_k
    step_hi = jnp.maximum((pos + block_k - 1) // block_k, step_lo)
    if split_keys is not None:  # this split's fixed key range
        step_lo = jnp.clip(split * (split_keys // block_k), step_lo, step_hi)
        step_hi = jnp.clip((split + 1) * (split_keys // block_k), step_lo, step_hi)
    elif num_splits > 1:  # an even share of the row's tiles
        share = (step_hi - step_lo + num_splits - 1) // num_splits
        step_lo = jnp.minimum(step_lo + split * share, step_hi)
        step_hi = jnp.minimum(step_lo + share, step_hi)

    def body(step, carry):
        k_pos = step * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        valid = (k_pos >= kv_lo) & (k_pos < pos)
        page = block_tables_ref[tok, jnp.minimum(k_pos // block_size, max_blocks - 1)]
        page = jnp.where(valid, page, 0)
        at = (layer, page, k_pos % block_size, head, slice(None))
        k, v = k_cache_in[at].astype(dot_dtype), v_cache_in[at].astype(dot_dtype)  # [block_k, D]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=dot_precision,
                            preferred_element_type=jnp.float32) * qk_scale
        return online_softmax_step(carry, base2_scores(s, soft_cap), valid[None, :], v,
                                   dot_precision)

    acc, m, l = lax.fori_loop(step_lo, step_hi, body, online_softmax_start(rows, head_dim))

    # and its own key, from registers (in the first split)
    s_new = jnp.sum(q.astype(jnp.float32) * k_new.astype(jnp.float32)[None, :], axis=1)
    s_new = base2_scores(s_new * qk_scale, soft_cap)
    own = split == 0
    m_next = jnp.where(own, jnp.maximum(m, s_new), m)
    alpha = jnp.exp2(m - m_next)
    p_new = jnp.where(own, jnp.exp2(s_new - m_next), 0.0)
    l = l * alpha + p_new
    acc = acc * alpha[:, None] + p_new[:, None] * v_new.astype(jnp.float32)[None, :]

    if num_splits == 1:
        out = jnp.where(seq_len > 0, acc / l[:, None], 0.0)
        o_ref[jnp.full((rows,), tok, jnp.int32), q_head, :] = out.astype(o_ref.dtype)
        if written is not None:
            written()
    else:  # the split's running softmax, then the merge by the last split to finish
        from jax.experimental.pallas import triton as plgpu

        acc_ref, m_ref, l_ref, counts_ref = split_refs
        m_ref[tok, head, split, :] = m_next
        l_ref[tok, head, split, :] = l

        @pl.when(own | (step_hi > step_lo))  # a split without keys writes only l = 0
        def _():
            acc_ref[tok, head, split, :, :] = acc

        if on_gpu:
            # every thread's stores issued before the one atomic that publishes them (its
            # acquire-release at GPU scope orders them for the program that merges)
            plgpu.debug_barrier()
        arrived = plgpu.atomic_add(counts_ref, (count,), jnp.int32(1))

        @pl.when(arrived == num_splits - 1)
        def _():
            out = _merge(acc_ref, m_ref, l_ref, tok, head, num_splits)
            out = jnp.where(seq_len > 0, out, 0.0)  # padding rows come out zero
            o_ref[jnp.full((rows,), tok, jnp.int32), q_head, :] = out.astype(o_ref.dtype)
            counts_ref[count] = jnp.int32(0)
            if written is not None:
                written()


def _merge(acc_ref, m_ref, l_ref, tok, head, num_splits: int):
    """The splits' running softmaxes of (token, KV head) rescaled to their largest maximum
    and added: [rows, D]. A split without keys has l = 0 and adds nothing (its acc, never
    written, is not read). Loads are volatile: past this SM's L1, which may hold stale lines
    of what other programs wrote."""
    from jax.experimental.pallas import triton as plgpu

    one = lambda i: pl.ds(i, 1)  # (slices: an interpreted masked load takes no integers)
    rows, head_dim = acc_ref.shape[-2:]
    load = lambda ref, s: plgpu.load(ref.at[one(tok), one(head), one(s), :],
                                     volatile=True).reshape(rows)
    ms = [load(m_ref, s) for s in range(num_splits)]
    m = functools.reduce(jnp.maximum, ms)
    total = jnp.zeros((rows,), jnp.float32)
    out = jnp.zeros((rows, head_dim), jnp.float32)
    for s in range(num_splits):
        weight = jnp.exp2(ms[s] - m)
        l_s = load(l_ref, s)
        total = total + weight * l_s
        written = jnp.broadcast_to((l_s > 0)[None, None, None, :, None], (1, 1, 1, rows,
                                                                          head_dim))
        acc = plgpu.load(acc_ref.at[one(tok), one(head), one(s), :, :], mask=written,
                         other=0.0, volatile=True)
        out = out + weight[:, None] * acc.reshape(out.shape)
    # total >= the own key's weight: the first split always has it
    return out / total[:, None]


def _group_heads(head, group: int, rows: int):
    """The query heads of KV head `head`'s group, `rows` of them: padded rows repeat the
    group's last head (they then store the same value to the same place)."""
    return head * group + jnp.minimum(lax.broadcasted_iota(jnp.int32, (rows,), 0), group - 1)


def default_num_splits(num_tokens: int, num_kv_heads: int, max_context: int,
                       block_k: int) -> int:
    """How many programs share a row's keys: enough for ~TARGET_PROGRAMS programs in all
    (a batch-1 step is otherwise two programs walking the whole context), a power of two,
    at most MAX_SPLITS and never more than the widest context has tiles."""
    wanted = -(-TARGET_PROGRAMS // max(num_tokens * num_kv_heads, 1))
    tiles = max(-(-max_context // block_k), 1)
    return min(next_power_of_2(wanted), MAX_SPLITS, 1 << (tiles.bit_length() - 1))


def default_tiling(num_tokens: int, num_kv_heads: int, max_context: int,
                   block_k: int | None = None, num_splits: int | None = None,
                   split_keys: int | None = None):
    """(block_k, num_splits, split_keys), each the one given or its default for these
    shapes: splits sharing each row's tiles evenly where rows are few
    (`default_num_splits`), one program a row where they fill the GPU; fixed key ranges
    only where `split_keys` is given (at most MAX_KEY_RANGES of them; None: even shares)."""
    if split_keys is not None and num_splits is not None:
        raise ValueError("give num_splits (even shares) or split_keys (key ranges), not both")
    if split_keys is None and num_splits is None:
        num_splits = default_num_splits(num_tokens, num_kv_heads, max_context,
                                        block_k or SPLIT_BLOCK_K)
    if split_keys is not None:
        block_k = block_k or WHOLE_BLOCK_K
        if split_keys % block_k:
            raise ValueError(f"split_keys={split_keys} must be a multiple of block_k={block_k}")
        if -(-max_context // split_keys) > MAX_KEY_RANGES:  # wider ranges, whole tiles
            split_keys = -(-max_context // (MAX_KEY_RANGES * block_k)) * block_k
        num_splits = -(-max_context // split_keys)
        return block_k, num_splits, split_keys if num_splits > 1 else None
    if block_k is None:
        block_k = SPLIT_BLOCK_K if num_splits > 1 else WHOLE_BLOCK_K
    return block_k, num_splits, None


def decode_attention_triton(qkv, k_cache, v_cache, layer, seq_lens, block_tables,
                            slot_mapping, *, scale: float, sliding_window: int | None = None,
                            soft_cap: float | None = None, num_kv_heads: int,
                            block_k: int | None = None, num_splits: int | None = None,
                            split_keys: int | None = None, num_warps: int = 4,
                            num_stages: int = 2, counters: jax.Array | None = None,
                            interpret: bool | None = None):
    """One decode token a row: KV write and attention in one Pallas Triton kernel. Returns
    (out [T, H, D], k_cache, v_cache); arguments as `decode_attention_reference`.

    `num_splits` programs share each row's keys (flash-decoding), `block_k` at a time: even
    shares of its tiles, or, given `split_keys` instead, program s the keys
    [s * split_keys, (s + 1) * split_keys) (as many as the table's width needs; wider
    ranges past MAX_KEY_RANGES). Their partial softmaxes are merged by the last of them to
    finish, found with a count for each row and KV head. None: `default_tiling`'s.

    `counters`: int32 zeros that other kernels of the step pass along too (at least T * KVH
    of them are used; a shorter array is not, and the call makes its own): then
    `(out, k_cache, v_cache, counters)`, the counters zero again."""
    num_tokens, qkv_heads, head_dim = qkv.shape
    num_heads = qkv_heads - 2 * num_kv_heads
    if num_heads < num_kv_heads or num_heads % num_kv_heads \
            or k_cache.shape[3:] != (num_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"qkv {qkv.shape} with {num_kv_heads} KV heads does not fit the "
                         f"caches {k_cache.shape}, {v_cache.shape}")
    if seq_lens.shape != (num_tokens,) or slot_mapping.shape != (num_tokens,) \
            or block_tables.shape[0] != num_tokens:
        raise ValueError(f"one row per token: seq_lens {seq_lens.shape}, slot_mapping "
                         f"{slot_mapping.shape} and block_tables {block_tables.shape} must "
                         f"have {num_tokens} rows")
    if block_k is not None and (block_k < 1 or block_k & (block_k - 1)):
        raise ValueError(f"block_k={block_k} must be a power of two")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits={num_splits} must be at least 1")
    if split_keys is not None and split_keys < 1:
        raise ValueError(f"split_keys={split_keys} must be at least 1")
    block_k, num_splits, split_keys = default_tiling(
        num_tokens, num_kv_heads, block_tables.shape[1] * k_cache.shape[2], block_k,
        num_splits, split_keys)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    group = num_heads // num_kv_heads
    rows = max(next_power_of_2(group), MIN_DOT)
    kernel = functools.partial(_kernel, scale=scale, group=group, rows=rows, block_k=block_k,
                               num_splits=num_splits, split_keys=split_keys,
                               sliding_window=sliding_window, soft_cap=soft_cap)
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    from jax.experimental.pallas import triton as plgpu

    outs = [jax.ShapeDtypeStruct((num_tokens, num_heads, head_dim), qkv.dtype)]
    operands = [seq_lens.astype(jnp.int32), slot_mapping.astype(jnp.int32),
                jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)),
                block_tables.astype(jnp.int32), qkv, k_cache, v_cache]
    if num_splits > 1:
        split_rows = (num_tokens, num_kv_heads, num_splits, rows)
        outs += [jax.ShapeDtypeStruct((*split_rows, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct(split_rows, jnp.float32),
                 jax.ShapeDtypeStruct(split_rows, jnp.float32)]
    outs += [jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
             jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)]
    aliases = {5: len(outs) - 2, 6: len(outs) - 1}
    counts_used = num_splits > 1 and counters is not None \
        and counters.shape[0] >= num_tokens * num_kv_heads
    if num_splits > 1:
        counts = counters if counts_used else jnp.zeros((num_tokens * num_kv_heads,), jnp.int32)
        aliases[len(operands)] = len(outs)
        operands.append(counts)
        outs.append(jax.ShapeDtypeStruct(counts.shape, jnp.int32))
    results = pl.pallas_call(
        functools.partial(kernel, on_gpu=not interpret),
        grid=(num_tokens, num_kv_heads, num_splits),
        in_specs=[whole(a.shape) for a in operands],
        out_specs=[whole(o.shape) for o in outs],
        out_shape=outs,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"decode_attention_bk{block_k}_s{num_splits}"
             + (f"_keys{split_keys}" if split_keys else ""),
    )(*operands)
    out, (k_cache, v_cache) = results[0], results[-3:-1] if num_splits > 1 else results[-2:]
    if counters is None:
        return out, k_cache, v_cache
    return out, k_cache, v_cache, results[-1] if counts_used else counters
