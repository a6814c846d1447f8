"""A decoder layer's matmuls for small batches (Pallas Triton), each with the elementwise work
around it in the same kernel.

At batch 1 a decode step is a few hundred small kernels, ~11 a layer: the attention's two,
the four matmuls (XLA's Triton GEMMs, split over K, whose partial sums another kernel adds),
and beside them the RMSNorm before the QKV and gate/up projections, the rotary embeddings,
the SiLU(gate) * up product and the residual adds, each its own kernel. `fused_matmul` does
one projection and what surrounds it:

    y = epilogue(prologue(x) @ w)
    prologue: nothing, or RMSNorm (`norm_scale`, float32 math as `layers.rms_norm`)
    epilogue: + bias; then rotary embeddings on the leading (q and k) heads, or, for a
              fused gate/up matrix, `act(gate) * up`; + residual

so a layer is four such projections beside its attention: RMSNorm + QKV (+ bias) + RoPE,
O (+ residual), RMSNorm + gate/up + act * up, down (+ residual). With RoPE a program's two
column tiles are a head's rotation partners (columns i and i + head_dim / 2).

One program computes `block_n` output columns for all rows (at most `MAX_ROWS`, padded to a
power of two from 16, Triton's smallest dot), `block_k` of K a step (the last step masked
where K is not a multiple). The weights are [K, N], so a program reads `block_n` of each K
row. With 16 (32 bytes), and 56 programs for the O and down projections, the kernels ran
2-3x slower than XLA's GEMMs on an H100 (benchmarks/README.md, thirteenth round); tiles are
now up to 64 columns wide (`BLOCK_N_CHOICES`). Wide tiles leave few programs, though:
Qwen2.5-0.5B's O and down projections have 14 tiles of 64 columns for 132 SMs. Where the
tiles alone make fewer than half of `TARGET_PROGRAMS` (`default_tiling`), K is split too:
program (i, s) writes tile i's float32 sums over split s, then counts itself in with an
atomic add on tile i's count. The program that finds the other splits all there adds the
sums up, does the epilogue and sets the count back to zero: still one kernel a projection,
where a kernel of its own to add the splits up cost one more a projection. The counts are
an int32 array of zeros (`split_counters`) that a step's kernels pass from one to the next
(aliased in place), one array a step. Otherwise one kernel does all of it. Each program's
RMSNorm takes the whole row's mean square, a second read of the rows, which sit in L2. For
Qwen2.5-0.5B: QKV 18 x 7 programs, O 14 x 7, gate/up 152 (one kernel), down 14 x 19. Not
yet timed on a GPU:
`benchmarks/small_batch_matmul.py` sweeps the tiling (`--per-projection`: each projection's
on its own), JAXVLLM_SMALL_BATCH_TILINGS (`TILINGS_ENV`) replaces the defaults by shape for
a tuning run, and the engine measures the kernels against XLA before it uses them
(jaxvllm/engine/autotune.py). `reference` is the contract in plain jnp.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.ragged_tiles import next_power_of_2

MIN_ROWS = 16  # Triton's smallest dot dimension
MAX_ROWS = 64  # more rows than this: XLA's own GEMMs (one program's rows stay in registers)
# Column tiles a program, widest first where they divide the output: the weights are [K, N],
# so a program reads block_n weights (2 * block_n bytes in bfloat16) of each K row
BLOCK_N_CHOICES = (64, 32, 16)
MAX_BLOCK_K = 512
# Programs to aim for, two a streaming multiprocessor on an H100 (132): where the column
# tiles are fewer, K is split (at least MIN_SPLIT_K a split) and the last split of a tile
# to finish adds the splits' sums up
TARGET_PROGRAMS = 264
MIN_SPLIT_K = 128
MIN_UNSPLIT_BLOCK_N = 32  # narrower tiles read too little of each K row to go unsplit
# Shared memory the pipelined tiles of a default tiling may take (an H100 block can have
# 227 KB; float32 at block_k 512 with two weight tiles would need 228), and the bytes of a
# step's rows (held in registers, normed) for 16-bit and 32-bit types: past these the
# Triton builds for sm_90 spilled registers
SHARED_BUDGET = 160 * 1024
ROWS_TILE_BUDGET = {2: 32 * 1024, 4: 16 * 1024}
# Tilings to use in place of the defaults, for tuning runs: JSON {"KxN": [block_n, splits]}
# by projection shape (K rows, N output columns: for a gated projection one half's), e.g.
# {"4864x896": [64, 18]}. A part of the program cache's and the start-up measurement's keys.
TILINGS_ENV = "JAXVLLM_SMALL_BATCH_TILINGS"


def reference(x, w, *, bias=None, residual=None, norm_scale=None, norm_eps: float = 1e-6,
              gated_act: Optional[Callable] = None, rope_positions=None, rope_inv_freq=None,
              rope_columns: int = 0):
    """The contract in plain jnp, as the decoder layer computes it unfused."""
    from jaxvllm.models.layers import apply_rope, rms_norm

    if norm_scale is not None:
        x = rms_norm(x, norm_scale, norm_eps)
    y = x @ w
    if bias is not None:
        y = y + bias
    if gated_act is not None:
        gate, up = jnp.split(y, 2, axis=-1)
        y = gated_act(gate) * up
    if rope_columns:
        d = 2 * rope_inv_freq.shape[0]
        heads = apply_rope(y[:, :rope_columns].reshape(y.shape[0], -1, d), rope_positions,
                           rope_inv_freq)
        y = jnp.concatenate([heads.reshape(y.shape[0], rope_columns), y[:, rope_columns:]], -1)
    if residual is not None:
        y = residual + y
    return y


def padded_rows(rows: int) -> int:
    """The rows a kernel runs: a power of two (Triton's shapes), at least MIN_ROWS."""
    return max(MIN_ROWS, next_power_of_2(rows))


def default_block_n(n_out: int, rope_head_dim: int = 0) -> int:
    """The widest column tile of BLOCK_N_CHOICES that divides the output (and, with RoPE,
    half a head); 0 if none does."""
    return next((b for b in BLOCK_N_CHOICES if _fits(b, n_out, rope_head_dim)), 0)


def _fits(block_n: int, n_out: int, rope_head_dim: int) -> bool:
    return n_out % block_n == 0 and (not rope_head_dim or rope_head_dim % (2 * block_n) == 0)


def default_block_k(k: int, rows: int, *, itemsize: int = 2, weight_tiles: int = 1,
                    block_n: int = 16, num_stages: int = 3) -> int:
    """K a step: all of it up to MAX_BLOCK_K (rounded up to a power of two), less where the
    pipelined tiles of a step (the rows' and each weight tile's, `num_stages` deep) would
    take more than SHARED_BUDGET of shared memory, or the rows' tile more than
    ROWS_TILE_BUDGET."""
    block = min(MAX_BLOCK_K, max(16, next_power_of_2(k)))
    padded = padded_rows(rows)
    per_k = num_stages * (padded + weight_tiles * block_n) * itemsize
    while block > 16 and (block * per_k > SHARED_BUDGET
                          or padded * block * itemsize > ROWS_TILE_BUDGET.get(itemsize, 16384)):
        block //= 2
    return block


def default_tiling(k: int, n_out: int, rope_head_dim: int = 0) -> tuple[int, int]:
    """(block_n, splits): the widest column tile at which the tiles alone make half of
    TARGET_PROGRAMS (no split, one kernel), if one of at least MIN_UNSPLIT_BLOCK_N does, else
    the widest tile with K split (`default_splits`). (0, 1) if no tile fits."""
    widths = [b for b in BLOCK_N_CHOICES if _fits(b, n_out, rope_head_dim)]
    if not widths:
        return 0, 1
    programs = lambda b: n_out // b // (2 if rope_head_dim else 1)
    for block_n in widths:
        if block_n >= MIN_UNSPLIT_BLOCK_N and 2 * programs(block_n) >= TARGET_PROGRAMS:
            return block_n, 1
    return widths[0], default_splits(k, programs(widths[0]))


def default_splits(k: int, column_programs: int) -> int:
    """Splits of K: enough (column tile, split) programs for TARGET_PROGRAMS where the column
    tiles alone are fewer than half of it, each split at least MIN_SPLIT_K of K."""
    if 2 * column_programs >= TARGET_PROGRAMS:
        return 1
    return max(1, min(-(-TARGET_PROGRAMS // column_programs), k // MIN_SPLIT_K))


def split_tiling(k: int, splits: int, block_k: int) -> tuple[int, int, int]:
    """(block_k, k_split, splits) for at most `splits` splits of K: each split a whole number
    of K steps (`block_k` at most, a power of two), none of them empty."""
    per_split = -(-k // max(1, splits))
    block_k = min(block_k, max(16, next_power_of_2(per_split)))
    k_split = -(-per_split // block_k) * block_k
    return block_k, k_split, -(-k // k_split)


def default_num_warps(rows: int, itemsize: int) -> int:
    """4, or 8 for float32 rows past 16 (4 warps spilled registers there)."""
    return 8 if itemsize > 2 and padded_rows(rows) > MIN_ROWS else 4


def supports(rows: int, k: int, n_out: int, *, block_n: Optional[int] = None,
             rope_head_dim: int = 0) -> bool:
    """Whether `fused_matmul` takes these shapes: few rows, K in 16s, whole output tiles
    (with RoPE, whole tiles in each half of a head)."""
    block_n = block_n or default_block_n(n_out, rope_head_dim)
    if not block_n or not _fits(block_n, n_out, rope_head_dim) \
            or rope_head_dim and n_out % rope_head_dim:
        return False
    return rows <= MAX_ROWS and k % 16 == 0


# -- the kernels' parts --------------------------------------------------------------------------


def _tile_columns(n_out: int, block_n: int, rope_half: int, gated: bool, tile=None):
    """(col, cols, freq_at) of column tile `tile` (None: program (i, ...)'s, i): its output
    tile's first column, the first weight column of each tile it multiplies (RoPE: a
    head's rotation partners i and i + half; gated: the gate's and the up's), and with RoPE
    the tile's first frequency."""
    tile = pl.program_id(0) if tile is None else tile
    if rope_half:
        per_half = rope_half // block_n
        freq_at = (tile % per_half) * block_n
        col = (tile // per_half) * 2 * rope_half + freq_at
        return col, (col, col + rope_half), freq_at
    col = tile * block_n
    return col, ((col, n_out + col) if gated else (col,)), None


def _loader(k: int, block_k: int, block_n: int, ragged: bool):
    """load(ref, start[, first_col]): K elements start.. of a [K] ref, of an [M, K] one's rows,
    or of the [K, N] weights' tile from column `first_col`, with zeros past K (`ragged`: a
    step may reach past it)."""
    def load(ref, start, first_col=None):
        at = pl.ds(start, block_k)
        if first_col is not None:  # a weight tile [block_k, block_n]
            idx, shape, axis = (at, pl.ds(first_col, block_n)), (block_k, block_n), 0
        elif len(ref.shape) == 1:
            idx, shape, axis = (at,), (block_k,), 0
        else:
            idx, shape, axis = (slice(None), at), (ref.shape[0], block_k), 1
        if not ragged:
            return ref[idx]
        from jax.experimental.pallas import triton as plgpu

        inside = start + lax.broadcasted_iota(jnp.int32, shape, axis) < k
        return plgpu.load(ref.at[idx], mask=inside, other=0)

    return load


def _products(x_ref, w_ref, scale_ref, cols, load, *, k_start, steps: int, block_k: int,
              block_n: int, norm_eps: float, dot_precision):
    """float32 [M, block_n] sums of (RMSNorm(x) or x) @ w over K steps k_start.., one for each
    weight tile in `cols`. The norm takes the whole row's mean square, whatever the range."""
    rows, k = x_ref.shape
    inv_rms = None
    if scale_ref is not None:
        def squares(step, total):
            chunk = load(x_ref, step * block_k).astype(jnp.float32)
            return total + jnp.sum(chunk * chunk, axis=1)

        total = lax.fori_loop(0, -(-k // block_k), squares, jnp.zeros((rows,), jnp.float32))
        inv_rms = lax.rsqrt(total / k + norm_eps)

    def body(step, accs):
        start = k_start + step * block_k
        xs = load(x_ref, start)
        if inv_rms is not None:
            xs = (xs.astype(jnp.float32) * inv_rms[:, None]
                  * load(scale_ref, start).astype(jnp.float32)[None, :]).astype(x_ref.dtype)
        return tuple(acc + lax.dot_general(xs, load(w_ref, start, c), (((1,), (0,)), ((), ())),
                                           precision=dot_precision,
                                           preferred_element_type=jnp.float32)
                     for acc, c in zip(accs, cols))

    return lax.fori_loop(0, steps, body,
                         tuple(jnp.zeros((rows, block_n), jnp.float32) for _ in cols))


def _write_output(accs, col, cols, freq_at, o_ref, bias_ref, residual_ref, positions_ref,
                  inv_freq_ref, *, gated_act: Optional[Callable], block_n: int,
                  rope_columns: int, rows_at=slice(None), store=None):
    """The epilogue on a program's sums and its output tile's store: + bias; RoPE on the q
    and k heads, or act(gate) * up; + residual. `rows_at` indexes the rows of the residual
    and positions (and of o_ref); `store(first_col, y)` replaces the store to o_ref."""
    if store is None:
        def store(c, y):
            o_ref[rows_at, pl.ds(c, block_n)] = y

    def biased(acc, c):
        # the projection's result in the model's dtype, as XLA's dot + bias gives it
        y = acc.astype(o_ref.dtype)
        if bias_ref is not None:
            y = (y + bias_ref[pl.ds(c, block_n)][None, :]).astype(o_ref.dtype)
        return y

    y = biased(accs[0], col)
    if rope_columns:
        # rotate-half (layers.apply_rope) on the q and k heads; the v heads pass through
        a, b = y.astype(jnp.float32), biased(accs[1], cols[1]).astype(jnp.float32)
        angle = (positions_ref[rows_at].astype(jnp.float32)[:, None]
                 * inv_freq_ref[pl.ds(freq_at, block_n)][None, :])
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        rotate = col < rope_columns
        store(col, jnp.where(rotate, a * cos - b * sin, a).astype(o_ref.dtype))
        store(cols[1], jnp.where(rotate, b * cos + a * sin, b).astype(o_ref.dtype))
        return
    if gated_act is not None:
        y = (gated_act(y.astype(jnp.float32)).astype(o_ref.dtype).astype(jnp.float32)
             * biased(accs[1], cols[1]).astype(jnp.float32)).astype(o_ref.dtype)
    if residual_ref is not None:
        y = (residual_ref[rows_at, pl.ds(col, block_n)].astype(jnp.float32)
             + y.astype(jnp.float32)).astype(o_ref.dtype)
    store(col, y)


SUM_GROUP = 8  # terms `ordered_sum` adds in straight-line code, a loop iteration


def ordered_sum(n: int, term: Callable, zeros, *, rows: int):
    """term(0) + ... + term(n - 1), in that order (the same bits whichever program adds).
    Up to MIN_ROWS rows, SUM_GROUP terms an iteration in straight-line code: loads that do
    not depend on each other, which the compiler issues together, where a plain loop's wait
    on L2 one after another (19-38 of them for Qwen2.5-0.5B's down projection's splits).
    More rows, or all of a long sum unrolled (112 splits at Llama-3-8B's shapes), hold too
    many registers that way (64 rows spilled): one term an iteration."""
    if rows > MIN_ROWS:
        return lax.fori_loop(0, n, lambda i, total: total + term(i), zeros)

    def group(g, total):
        for i in range(SUM_GROUP):
            total = total + term(g * SUM_GROUP + i)
        return total

    whole = n // SUM_GROUP
    total = group(0, zeros) if whole == 1 else lax.fori_loop(0, whole, group, zeros)
    for i in range(whole * SUM_GROUP, n):
        total = total + term(i)
    return total


def _epilogue_refs(refs: list, has_bias: bool, has_residual: bool, rope: bool):
    """(bias, residual, positions, inv_freq) refs from the front of `refs`, None where
    absent."""
    bias_ref = refs.pop(0) if has_bias else None
    residual_ref = refs.pop(0) if has_residual else None
    positions_ref, inv_freq_ref = (refs.pop(0), refs.pop(0)) if rope else (None, None)
    return bias_ref, residual_ref, positions_ref, inv_freq_ref


# -- the kernels ---------------------------------------------------------------------------------


def _kernel(*refs, has_norm: bool, has_bias: bool, has_residual: bool,
            gated_act: Optional[Callable], norm_eps: float, block_n: int, block_k: int,
            n_out: int, rope_columns: int, rope_half: int, dot_precision):
    """One program: an output tile over the whole of K, and its epilogue."""
    refs = list(refs)
    x_ref, w_ref = refs.pop(0), refs.pop(0)
    scale_ref = refs.pop(0) if has_norm else None
    epilogue = _epilogue_refs(refs, has_bias, has_residual, bool(rope_columns))
    (o_ref,) = refs
    k = x_ref.shape[1]
    col, cols, freq_at = _tile_columns(n_out, block_n, rope_half, gated_act is not None)
    load = _loader(k, block_k, block_n, ragged=k % block_k != 0)
    accs = _products(x_ref, w_ref, scale_ref, cols, load, k_start=0, steps=-(-k // block_k),
                     block_k=block_k, block_n=block_n, norm_eps=norm_eps,
                     dot_precision=dot_precision)
    _write_output(accs, col, cols, freq_at, o_ref, *epilogue, gated_act=gated_act,
                  block_n=block_n, rope_columns=rope_columns)


def _split_kernel(*refs, has_norm: bool, has_bias: bool, has_residual: bool,
                  gated_act: Optional[Callable], norm_eps: float, block_n: int, block_k: int,
                  k_split: int, n_out: int, rope_columns: int, rope_half: int, dot_precision,
                  on_gpu: bool, real_rows: int, has_row_count: bool):
    """Program (i, s): tile i's float32 sums over K split s, into partial [S, M, N]; then the
    arrival count of tile i goes up by one, and the program that finds the others all there
    adds the S sums up, does the epilogue and sets the count back to zero. Only the first
    `real_rows` of the padded rows go through the partial buffer, or fewer where a row count
    comes in (`has_row_count`: a decode step's requests, known at run time)."""
    from jax.experimental.pallas import triton as plgpu

    refs = list(refs)
    x_ref, w_ref = refs.pop(0), refs.pop(0)
    scale_ref = refs.pop(0) if has_norm else None
    epilogue = _epilogue_refs(refs, has_bias, has_residual, bool(rope_columns))
    if has_row_count:
        real_rows = jnp.minimum(refs.pop(0)[0], real_rows)
    _, o_ref, partial_ref, counts_ref = refs  # the counts come in aliased to counts_ref
    splits, rows = partial_ref.shape[:2]
    k = x_ref.shape[1]
    col, cols, freq_at = _tile_columns(n_out, block_n, rope_half, gated_act is not None)
    tile, split = pl.program_id(0), pl.program_id(1)
    load = _loader(k, block_k, block_n, ragged=k % k_split != 0)
    accs = _products(x_ref, w_ref, scale_ref, cols, load, k_start=split * k_split,
                     steps=k_split // block_k, block_k=block_k, block_n=block_n,
                     norm_eps=norm_eps, dot_precision=dot_precision)
    one = lambda i: pl.ds(i, 1)  # (slices: an interpreted masked access takes no integers)
    real = lax.broadcasted_iota(jnp.int32, (1, rows, block_n), 1) < real_rows
    for acc, c in zip(accs, cols):
        plgpu.store(partial_ref.at[one(split), :, pl.ds(c, block_n)], acc[None], mask=real)
    if on_gpu:
        # every thread's stores issued before the one atomic that publishes them (its
        # acquire-release at GPU scope orders them for the program that sums)
        plgpu.debug_barrier()
    arrived = plgpu.atomic_add(counts_ref, (tile,), jnp.int32(1))

    @pl.when(arrived == splits - 1)
    def _():
        def partial_sums(s, c):
            # volatile: past this SM's L1, which may hold stale lines of the partial buffer
            return plgpu.load(partial_ref.at[one(s), :, pl.ds(c, block_n)], mask=real,
                              other=0.0, volatile=True)[0]

        sums = tuple(ordered_sum(splits, functools.partial(partial_sums, c=c),
                                 jnp.zeros((rows, block_n), jnp.float32), rows=rows)
                     for c in cols)
        _write_output(sums, col, cols, freq_at, o_ref, *epilogue, gated_act=gated_act,
                      block_n=block_n, rope_columns=rope_columns)
        counts_ref[tile] = jnp.int32(0)


def split_counters(n_out: int) -> jax.Array:
    """Arrival counts (zeros) enough for any tiling of outputs up to `n_out` columns wide,
    for `fused_matmul(..., counters=)`: the split kernels leave them zero again, so kernels
    that run one after the other can pass one array along."""
    return jnp.zeros((max(1, n_out // BLOCK_N_CHOICES[-1]),), jnp.int32)


def tiling_overrides() -> dict[tuple[int, int], tuple[int, int]]:
    """{(K, N): (block_n, splits)} from TILINGS_ENV (empty where unset)."""
    text = os.environ.get(TILINGS_ENV, "")
    try:
        table = json.loads(text) if text else {}
        return {tuple(int(d) for d in shape.split("x")): (int(block_n), int(splits))
                for shape, (block_n, splits) in table.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{TILINGS_ENV}={text!r}: want JSON like "
                         f'{{"4864x896": [64, 18]}} (K x N: [block_n, splits])') from e


def _given_or_default(rows: int, k: int, n_out: int, *, itemsize: int, weight_tiles: int,
                      rope_head_dim: int, block_n: Optional[int], block_k: Optional[int],
                      splits: Optional[int], num_stages: int) -> tuple[int, int, int]:
    """(block_n, block_k, splits) as given, or else as TILINGS_ENV has them for this shape,
    or else their defaults for these shapes (before `split_tiling` rounds K's splits to
    whole steps)."""
    override = tiling_overrides().get((k, n_out)) if block_n is None else None
    if override is not None:
        block_n, chosen = override
        splits = splits or chosen
    if block_n is None:
        block_n, default = default_tiling(k, n_out, rope_head_dim)
        block_n, splits = block_n or 16, splits or default  # 16: fused_matmul's shape error
    block_k = block_k or default_block_k(k, rows, itemsize=itemsize, block_n=block_n,
                                         num_stages=num_stages, weight_tiles=weight_tiles)
    column_programs = max(1, n_out // block_n // (2 if rope_head_dim else 1))
    return block_n, block_k, splits or default_splits(k, column_programs)


def resolve_tiling(rows: int, k: int, n_out: int, *, itemsize: int = 2,
                   weight_tiles: int = 1, rope_head_dim: int = 0,
                   block_n: Optional[int] = None, block_k: Optional[int] = None,
                   splits: Optional[int] = None, num_stages: int = 3) -> tuple[int, ...]:
    """(block_n, block_k, k_split, splits, programs): the tiling `fused_matmul` runs for
    these shapes and options (`weight_tiles` 2 for a gated or rotated projection), and its
    number of programs."""
    block_n, block_k, splits = _given_or_default(
        rows, k, n_out, itemsize=itemsize, weight_tiles=weight_tiles,
        rope_head_dim=rope_head_dim, block_n=block_n, block_k=block_k, splits=splits,
        num_stages=num_stages)
    block_k, k_split, splits = split_tiling(k, splits, block_k)
    column_programs = max(1, n_out // block_n // (2 if rope_head_dim else 1))
    return block_n, block_k, k_split, splits, column_programs * splits


def fused_matmul(x, w, *, bias=None, residual=None, norm_scale=None, norm_eps: float = 1e-6,
                 gated_act: Optional[Callable] = None, rope_positions=None,
                 rope_inv_freq=None, rope_columns: int = 0, block_n: Optional[int] = None,
                 block_k: Optional[int] = None, splits: Optional[int] = None,
                 num_warps: Optional[int] = None, num_stages: int = 3,
                 counters: Optional[jax.Array] = None, row_count: Optional[jax.Array] = None,
                 interpret: Optional[bool] = None):
    """`reference`'s result from Pallas Triton kernels. x [M, K] (M <= MAX_ROWS; padded
    inside to `padded_rows(M)`), w [K, N] (gate/up concatenated, [K, 2 I], when `gated_act`),
    bias [N], norm_scale [K], residual [M, N_out]. RoPE: the first `rope_columns` output
    columns are heads of 2 * len(rope_inv_freq) that rotate by `rope_positions` [M]; the
    rest are heads of that size too, left as they are (v). Tiling (None: the defaults for
    these shapes): `block_n` output columns a program, `block_k` of K a step, K in at most
    `splits` splits (more than one: the last program of a column tile to finish adds them
    up and does the epilogue). `counters`: `split_counters` zeros for the split kernel,
    given back beside the result, `(y, counters)`, zero again; None: the call makes its
    own (one more small kernel) and returns y alone. `row_count`: how many of the first rows
    matter (an int32 scalar known at run time, e.g. a decode step's rows up to its last
    request); the split kernel's partial sums carry only those, and the rows past them come
    out as if their products were zero (bias, residual and rotation still applied). The
    unsplit kernel computes every row."""
    rows, k = x.shape
    if w.ndim != 2 or w.shape[0] != k:
        raise ValueError(f"x {x.shape} and w {w.shape} do not multiply")
    n = w.shape[1]
    if gated_act is not None and n % 2:
        raise ValueError(f"a gated projection needs gate and up halves: w {w.shape}")
    n_out = n // 2 if gated_act is not None else n
    rope_head_dim = 2 * rope_inv_freq.shape[0] if rope_columns else 0
    if splits is not None and splits < 1:
        raise ValueError(f"splits {splits}: K takes splits >= 1")
    dtype = jnp.promote_types(x.dtype, w.dtype)
    itemsize = jnp.dtype(dtype).itemsize
    block_n, block_k, splits = _given_or_default(
        rows, k, n_out, itemsize=itemsize, weight_tiles=2 if gated_act is not None or
        rope_columns else 1, rope_head_dim=rope_head_dim, block_n=block_n, block_k=block_k,
        splits=splits, num_stages=num_stages)
    num_warps = num_warps or default_num_warps(rows, itemsize)
    if not supports(rows, k, n_out, block_n=block_n) or block_k < 16 \
            or block_k & (block_k - 1):
        raise ValueError(f"fused_matmul takes at most {MAX_ROWS} rows, K a multiple of 16, "
                         f"whole {block_n}-column output tiles and a power-of-two block_k >= "
                         f"16: x {x.shape}, w {w.shape}, block_k {block_k}")
    if row_count is not None and (jnp.shape(row_count) != ()
                                  or not jnp.issubdtype(jnp.result_type(row_count),
                                                        jnp.integer)):
        raise ValueError(f"row_count must be an integer scalar, not "
                         f"{jnp.result_type(row_count)}{list(jnp.shape(row_count))}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias {bias.shape} must be ({n},)")
    if norm_scale is not None and norm_scale.shape != (k,):
        raise ValueError(f"norm_scale {norm_scale.shape} must be ({k},)")
    if residual is not None and residual.shape != (rows, n_out):
        raise ValueError(f"residual {residual.shape} must be ({rows}, {n_out})")
    if rope_columns:
        if gated_act is not None or residual is not None or rope_positions.shape != (rows,) \
                or rope_columns % rope_head_dim or rope_columns > n_out \
                or not supports(rows, k, n_out, block_n=block_n, rope_head_dim=rope_head_dim):
            raise ValueError(f"RoPE takes no gate or residual, a position a row, whole heads "
                             f"and {block_n}-column tiles in each half of a head: rows {rows},"
                             f" {rope_columns} of {n_out} columns rotated, head dim "
                             f"{rope_head_dim}, positions {rope_positions.shape}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    from jax.experimental.pallas import triton as plgpu

    rope_half = rope_head_dim // 2
    column_programs = max(1, n_out // block_n // (2 if rope_columns else 1))
    block_k, k_split, splits = split_tiling(k, splits, block_k)
    padded = padded_rows(rows)
    pad = lambda a: jnp.pad(a, ((0, padded - rows), (0, 0))) if padded != rows else a
    products = [pad(x.astype(dtype)), w.astype(dtype)]
    if norm_scale is not None:
        products.append(norm_scale)
    epilogue = [bias] if bias is not None else []
    if residual is not None:
        epilogue.append(pad(residual.astype(dtype)))
    if rope_columns:
        epilogue += [jnp.pad(rope_positions.astype(jnp.int32), (0, padded - rows)),
                     rope_inv_freq.astype(jnp.float32)]
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    call = lambda kernel, grid, operands, out_shapes, name, **options: pl.pallas_call(
        kernel, grid=grid, in_specs=[whole(a.shape) for a in operands],
        out_specs=[whole(o.shape) for o in out_shapes], out_shape=out_shapes,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name=name, **options)(*operands)
    dot_precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    common = dict(has_norm=norm_scale is not None, has_bias=bias is not None,
                  has_residual=residual is not None, gated_act=gated_act,
                  norm_eps=float(norm_eps), block_n=block_n, block_k=block_k, n_out=n_out,
                  rope_columns=rope_columns, rope_half=rope_half, dot_precision=dot_precision)
    out_shape = jax.ShapeDtypeStruct((padded, n_out), dtype)
    counts = counters
    if splits == 1:
        (out,) = call(functools.partial(_kernel, **common), (column_programs,),
                      products + epilogue, [out_shape],
                      f"small_batch_matmul_n{block_n}_k{block_k}")
    else:
        counts = split_counters(n_out) if counters is None else counters
        if counts.dtype != jnp.int32 or counts.ndim != 1 or counts.shape[0] < column_programs:
            raise ValueError(f"counters {counts.dtype}{list(counts.shape)}: int32 zeros, at "
                             f"least {column_programs} (split_counters)")
        counted = [] if row_count is None else [jnp.reshape(row_count, (1,)).astype(jnp.int32)]
        operands = products + epilogue + counted + [counts]
        out, _, counts = call(
            functools.partial(_split_kernel, k_split=k_split, on_gpu=not interpret,
                              real_rows=rows, has_row_count=bool(counted), **common),
            (column_programs, splits), operands,
            [out_shape, jax.ShapeDtypeStruct((splits, padded, n), jnp.float32),
             jax.ShapeDtypeStruct(counts.shape, jnp.int32)],
            f"small_batch_matmul_n{block_n}_k{block_k}_s{splits}",
            input_output_aliases={len(operands) - 1: 2})
    out = out[:rows] if padded != rows else out
    return out if counters is None else (out, counts)
