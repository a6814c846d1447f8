"""A whole decoder layer of a decode step as one kernel (Pallas Triton), for steps of few rows.

At batch 1 the small-batch kernels (pallas_kernels/small_batch_matmul.py) leave five kernels
a layer: QKV, attention, O, gate/up and down, each starting only once the one before has
ended. Each start and end costs a few microseconds in which the GPU reads no weights, and a
layer's weights take ~10 us to read (Qwen2.5-0.5B, 30 MB on an H100). Here the five are
stages of one grid:

    stage       programs                          does
    QKV         column tiles x K splits           RMSNorm, x @ W_qkv, bias, RoPE
    attention   rows x KV heads x key splits      KV write, attention (decode_attention_triton)
    O           column tiles x heads (K by head)  o @ W_o + x
    gate/up     column tiles x K splits           RMSNorm, act(x1 @ W_gate) * (x1 @ W_up)
    down        column tiles x K splits           up @ W_down + x1

A program first loads its share of the weights ([K_SPLIT, block_n] a weight tile: at most
32 KB, staged in shared memory), then waits until the stage before has written all of its output,
then multiplies. So programs of the next stage read their weights while the stage before is
still finishing, and no stage boundary leaves the memory idle. A program whose split of K is
the last of its column tile to finish adds the tile's partial sums up and does the epilogue
(the split kernels' way), then counts the tile as done for the next stage.

Waiting inside a grid is safe only if a waiting program can never keep the programs it waits
for from running. Each program takes a ticket as it starts (an atomic add) and works as the
ticket says, not as its program id does: tickets go in start order and stages in ticket
order, so a program waits only for programs with lower tickets, which have started (are
running or done) whatever order the GPU starts programs in and however many it holds at once.
The last program to finish sets the kernel's counts back to zero: the counts come in as
int32 zeros (`counters_size` of them) and leave as zeros, like the split kernels'. A wait
that gives up (SPIN_LIMIT polls, or at once in interpret mode, where programs run in ticket
order and a count short of its target can only be a bug) adds one to TIMED_OUT, which stays:
the tests require all counts back at zero.

Rows: the step's T rows (at most MAX_ROWS). A multi-step decode puts its padding rows
(seq_len 0) last: a batch-1 step is 16 rows, one real. The kernel runs the rows up to the
last real one (at least one row) as the unfused layer runs them, a padding row among them
included (zero attention output, its k and v stored to its slot), padded to a power of two
of at least 16 for Triton's dot by reading the last of them again. Every row past them
computes that row's values and stores them there and to the padding rows (finite values,
not garbage); only the rows run go through the split buffers, and the padding rows past
them skip the attention (their k and v, which the unfused layer stores to their slots, the
null block, are not stored).

Stores of one program are published by a barrier of its threads and an atomic add
(acquire-release at GPU scope). A waiting program polls the count with volatile loads (so
hundreds of waiting programs do not queue on one address's atomics) and, once it is there,
reads it once more with an atomic add of zero, the acquire that orders its loads after the
writes (one thread's, then a barrier of the program's threads), as the split kernels' last
program does. `reference` is the contract in plain jnp.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import decode_attention_triton as attention
from pallas_kernels import small_batch_matmul as sbm
from pallas_kernels.ragged_tiles import next_power_of_2

MAX_ROWS = sbm.MAX_ROWS
# K rows of a program's weight chunk: 128 x 64 columns of bfloat16 is 16 KB (gate/up's two
# tiles 32 KB), loaded into shared memory before the program waits
K_SPLIT = 128
# Polls of a count before a waiting program goes on regardless (~1 us a poll, a few seconds
# in all, where a stage takes microseconds): a count that never comes (a bug) then gives
# wrong output and a nonzero TIMED_OUT instead of a hung GPU
SPIN_LIMIT = 1 << 22
# The counts' places, each of the first ones on a 128-byte line of its own (hundreds of
# programs poll a stage's done count; the ticket and the finished programs take an atomic
# from every program): the ticket, the finished programs, each stage's finished output
# tiles, the waits that gave up; then each split projection's arrivals a column tile and
# the attention's a row and KV head
LINE = 32
STAGES = ("qkv", "attention", "o", "gate_up", "down")
TICKET, FINISHED = 0, LINE
DONE = {stage: (2 + i) * LINE for i, stage in enumerate(STAGES[:-1])}
TIMED_OUT = (2 + len(DONE)) * LINE
ARRIVALS = TIMED_OUT + LINE
WEIGHTS = ("attn_norm_scale", "qkv_proj", "o_proj", "mlp_norm_scale", "gate_up_proj",
           "down_proj")  # and "qkv_bias" where the model has one


@dataclasses.dataclass(frozen=True)
class Projection:
    """A projection's tiling: `block_n` output columns a tile (RoPE: two, a head's rotation
    partners; gated: gate's and up's), K in splits of `k_split`."""

    k: int
    n_out: int
    block_n: int
    k_split: int
    gated: bool = False
    rope_half: int = 0

    @property
    def tiles(self) -> int:
        return self.n_out // self.block_n // (2 if self.rope_half else 1)

    @property
    def splits(self) -> int:
        return self.k // self.k_split

    @property
    def programs(self) -> int:
        return self.tiles * self.splits


def _projection(k: int, n_out: int, *, gated: bool = False, rope_head_dim: int = 0,
                k_split: Optional[int] = None) -> Projection:
    block_n = sbm.default_block_n(n_out, rope_head_dim)
    if k_split is None:
        k_split = next(s for s in (K_SPLIT, 64, 32, 16) if k % s == 0)
    return Projection(k, n_out, block_n, k_split, gated, rope_head_dim // 2)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Everything static about one layer kernel: shapes, tilings, stages' tickets, counts."""

    rows: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
    attention_block_k: int
    attention_splits: int

    @property
    def padded_rows(self) -> int:
        return sbm.padded_rows(self.rows)

    @property
    def query_rows(self) -> int:  # a KV head's query heads, padded for Triton's dot
        return max(next_power_of_2(self.num_heads // self.num_kv_heads), attention.MIN_DOT)

    def programs(self, stage: str) -> int:
        if stage == "attention":
            return self.rows * self.num_kv_heads * self.attention_splits
        return getattr(self, stage).programs

    def first_ticket(self, stage: str) -> int:
        return sum(self.programs(s) for s in STAGES[:STAGES.index(stage)])

    @property
    def total_programs(self) -> int:
        return self.first_ticket("down") + self.programs("down")

    def arrivals(self, stage: str) -> int:
        """The first of `stage`'s arrival counts (one a column tile, or a row and KV head)."""
        at = ARRIVALS
        for s in STAGES[:STAGES.index(stage)]:
            at += self._arrival_counts(s)
        return at

    def _arrival_counts(self, stage: str) -> int:
        if stage == "attention":
            return self.rows * self.num_kv_heads
        return getattr(self, stage).tiles

    @property
    def counts(self) -> int:
        return self.arrivals("down") + self._arrival_counts("down")

    def done_target(self, stage: str) -> int:
        """What `stage`'s done count reaches once all of its output is written."""
        return self.rows * self.num_kv_heads if stage == "attention" \
            else getattr(self, stage).tiles


def plan(rows: int, hidden: int, intermediate: int, num_heads: int, num_kv_heads: int,
         head_dim: int, max_context: int, *, attention_splits: Optional[int] = None,
         k_split: Optional[int] = None) -> LayerPlan:
    """The layer kernel's plan for these shapes (`k_split`: the projections' K a program, as
    far as it divides K; None: the largest power of two up to K_SPLIT that does)."""
    if k_split is not None and (k_split < 16 or k_split & (k_split - 1)):
        raise ValueError(f"k_split={k_split} must be a power of two of at least 16")
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    pick = lambda k, **kw: _projection(k, kw.pop("n_out"), k_split=k_split if k_split and
                                       k % k_split == 0 else None, **kw)
    block_k, splits, _ = attention.default_tiling(rows, num_kv_heads, max_context,
                                                  num_splits=attention_splits)
    return LayerPlan(
        rows, num_heads, num_kv_heads, head_dim,
        qkv=pick(hidden, n_out=q_size + 2 * kv_size, rope_head_dim=head_dim),
        o=_projection(q_size, hidden, k_split=head_dim),  # K by head: o is [T, H, D]
        gate_up=pick(hidden, n_out=intermediate, gated=True),
        down=pick(intermediate, n_out=hidden),
        attention_block_k=block_k, attention_splits=splits)


def supports(rows: int, hidden: int, intermediate: int, num_heads: int, num_kv_heads: int,
             head_dim: int) -> bool:
    """Whether `decode_layer` takes these shapes: at most MAX_ROWS rows, a power-of-two head
    dim of at least 32 (rotation partners in whole tiles of 16 columns) and whole tiles
    everywhere (see small_batch_matmul.supports)."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    return (0 < rows <= MAX_ROWS and head_dim >= 32 and head_dim & (head_dim - 1) == 0
            and num_heads % num_kv_heads == 0 and hidden % 16 == 0 and intermediate % 16 == 0
            and sbm.supports(rows, hidden, q_size + 2 * kv_size, rope_head_dim=head_dim)
            and sbm.supports(rows, q_size, hidden) and sbm.supports(rows, intermediate, hidden)
            and sbm.supports(rows, hidden, intermediate))


def counters_size(hidden: int, intermediate: int, num_heads: int, num_kv_heads: int,
                  head_dim: int) -> int:
    """Counts enough for a layer kernel of these shapes and up to MAX_ROWS rows (int32
    zeros: see the module docstring)."""
    return plan(MAX_ROWS, hidden, intermediate, num_heads, num_kv_heads, head_dim, 1).counts


def reference(x, p: dict, k_cache, v_cache, layer, positions, seq_lens, block_tables,
              slot_mapping, *, inv_freq, num_heads: int, num_kv_heads: int, norm_eps: float,
              gated_act: Callable, scale: float, sliding_window: Optional[int] = None):
    """The contract in plain jnp, as the decoder layer computes it unfused: (x, k_cache,
    v_cache)."""
    t, head_dim = x.shape[0], 2 * inv_freq.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = sbm.reference(x, p["qkv_proj"], bias=p.get("qkv_bias"), norm_scale=p["attn_norm_scale"],
                        norm_eps=norm_eps, rope_positions=positions, rope_inv_freq=inv_freq,
                        rope_columns=q_size + kv_size)
    o, k_cache, v_cache = attention.decode_attention_reference(
        qkv.reshape(t, num_heads + 2 * num_kv_heads, head_dim), k_cache, v_cache, layer,
        seq_lens, block_tables, slot_mapping, scale=scale, sliding_window=sliding_window,
        num_kv_heads=num_kv_heads)
    x1 = sbm.reference(o.reshape(t, q_size).astype(x.dtype), p["o_proj"], residual=x)
    up = sbm.reference(x1, p["gate_up_proj"], norm_scale=p["mlp_norm_scale"],
                       norm_eps=norm_eps, gated_act=gated_act)
    return sbm.reference(up, p["down_proj"], residual=x1), k_cache, v_cache


# -- the kernel ----------------------------------------------------------------------------------


def _kernel(*refs, plan: LayerPlan, has_bias: bool, gated_act: Callable, norm_eps: float,
            scale: float, sliding_window: Optional[int], on_gpu: bool, spin_limit: int):
    from jax.experimental.pallas import triton as plgpu

    refs = list(refs)
    take = lambda n: [refs.pop(0) for _ in range(n)]
    seq_lens_ref, slots_ref, layer_ref, block_tables_ref, positions_ref, inv_freq_ref = take(6)
    x_ref, attn_norm_ref, w_qkv_ref = take(3)
    b_qkv_ref = refs.pop(0) if has_bias else None
    w_o_ref, mlp_norm_ref, w_gu_ref, w_down_ref, k_cache_in, v_cache_in, _ = take(7)
    out_ref, qkv_ref, o_ref, x1_ref, up_ref = take(5)
    partial = {name: refs.pop(0) for name in ("qkv", "o", "gate_up", "down")
               if getattr(plan, name).splits > 1}
    attention_refs = take(3) if plan.attention_splits > 1 else None
    k_cache_ref, v_cache_ref, counts_ref = refs

    t, padded, head_dim = plan.rows, plan.padded_rows, plan.head_dim
    one = lambda i: pl.ds(i, 1)

    def count(index, by):
        return plgpu.atomic_add(counts_ref, (jnp.asarray(index, jnp.int32),),
                                jnp.asarray(by, jnp.int32))

    # the rows run (up to the last real one, at least one: the module docstring), the rows
    # each program stores and those it reads
    iota = lax.broadcasted_iota(jnp.int32, (padded,), 0)
    rows_at = jnp.minimum(iota, t - 1)
    real_rows = jnp.maximum(
        jnp.max(jnp.where((seq_lens_ref[rows_at] > 0) & (iota < t), iota + 1, 0)), 1)
    read_at = jnp.minimum(iota, real_rows - 1)
    real = lax.broadcasted_iota(jnp.int32, (1, padded, 1), 1) < real_rows

    def publish(stage):
        """This program's output stores, then `stage`'s done count up by one."""
        if on_gpu:
            plgpu.debug_barrier()  # every thread's stores issued before the release
        count(DONE[stage], 1)

    def polled(index):
        return jnp.max(plgpu.load(counts_ref.at[pl.ds(index, 1)], volatile=True))

    def wait(stage):
        """Until `stage` has written all of its output: polls, then an acquire."""
        index, zero = jnp.int32(DONE[stage]), jnp.int32(0)
        target = real_rows * plan.num_kv_heads if stage == "attention" \
            else plan.done_target(stage)
        # (the count's index in the carry: in interpret mode a loop may close over no array)
        seen, *_ = lax.while_loop(lambda c: (c[0] < target) & (c[1] < spin_limit),
                                  lambda c: (polled(c[2]), c[1] + 1, c[2]),
                                  (polled(index), zero, index))
        # adds zero, but from the loop's result: a loop whose result goes unused only reads,
        # and JAX's tracing drops it (Triton then folds the zero; the volatile loads keep
        # the loop)
        count(index, seen - seen)

        @pl.when(seen < target)
        def _():
            count(TIMED_OUT, 1)

        if on_gpu:
            # one thread does that atomic (its result unused, none is shared): the others'
            # loads wait here for its acquire (CUTLASS's semaphore does the same)
            plgpu.debug_barrier()

    summed = functools.partial(sbm.ordered_sum, rows=padded)

    def inv_rms(ref, k, chunk):
        def squares(j):
            xs = ref[read_at, pl.ds(j * chunk, chunk)].astype(jnp.float32)
            return jnp.sum(xs * xs, axis=1)

        total = summed(k // chunk, squares, jnp.zeros((padded,), jnp.float32))
        return lax.rsqrt(total / k + norm_eps)

    def project(i, name, *, before, load_x, w_ref, norm=None, bias_ref=None, residual_ref=None,
                out_ref=None, store=None, gated=None, rope_columns=0):
        proj: Projection = getattr(plan, name)
        tile, split = i // proj.splits, i % proj.splits
        col, cols, freq_at = sbm._tile_columns(proj.n_out, proj.block_n, proj.rope_half,
                                               proj.gated, tile)
        k0 = split * proj.k_split
        # the weights first: they need nothing from the stage before
        weights = [w_ref[pl.ds(k0, proj.k_split), pl.ds(c, proj.block_n)] for c in cols]
        if before is not None:
            wait(before)
        xs = load_x(split, k0)
        if norm is not None:
            input_ref, scale_ref = norm
            xs = (xs.astype(jnp.float32) * inv_rms(input_ref, proj.k, proj.k_split)[:, None]
                  * scale_ref[pl.ds(k0, proj.k_split)].astype(jnp.float32)[None, :]
                  ).astype(xs.dtype)
        precision = lax.Precision.HIGHEST if xs.dtype == jnp.float32 else None
        accs = [lax.dot_general(xs, w.astype(xs.dtype), (((1,), (0,)), ((), ())),
                                precision=precision, preferred_element_type=jnp.float32)
                for w in weights]

        def finish(sums):
            sbm._write_output(sums, col, cols, freq_at, out_ref, bias_ref, residual_ref,
                              positions_ref, inv_freq_ref, gated_act=gated,
                              block_n=proj.block_n, rope_columns=rope_columns,
                              rows_at=read_at, store=store or functools.partial(
                                  store_rows, out_ref, proj.block_n))
            if name != "down":
                publish(name)

        if proj.splits == 1:
            finish(accs)
            return
        partial_ref = partial[name]
        for acc, c in zip(accs, cols):
            plgpu.store(partial_ref.at[one(split), :, pl.ds(c, proj.block_n)], acc[None],
                        mask=real)
        if on_gpu:
            plgpu.debug_barrier()
        arrived = count(plan.arrivals(name) + tile, 1)

        @pl.when(arrived == proj.splits - 1)
        def _():
            # in split order, whoever adds: the same sums every run
            finish([summed(proj.splits,
                           lambda i, c=c: partial_ref[i, read_at, pl.ds(c, proj.block_n)],
                           jnp.zeros((padded, proj.block_n), jnp.float32)) for c in cols])
            counts_ref[plan.arrivals(name) + tile] = jnp.int32(0)

    def store_rows(ref, block_n, c, y):  # every row: the padding ones get the last real's
        ref[rows_at, pl.ds(c, block_n)] = y

    def store_qkv(c, y):  # into [T, H + 2 KVH, D], the attention's layout
        qkv_ref[rows_at, jnp.full((padded,), c // head_dim, jnp.int32),
                pl.ds(c % head_dim, plan.qkv.block_n)] = y

    def attend(i):
        per_row = plan.num_kv_heads * plan.attention_splits
        tok, head = i // per_row, i % per_row // plan.attention_splits

        @pl.when(tok < real_rows)  # a padding row past them: no one waits for it
        def _():
            wait("qkv")
            attention.attend_program(
                tok, head, i % plan.attention_splits, seq_lens_ref=seq_lens_ref,
                slots_ref=slots_ref, layer=layer_ref[0], block_tables_ref=block_tables_ref,
                qkv_ref=qkv_ref, k_cache_in=k_cache_in, v_cache_in=v_cache_in,
                k_cache_ref=k_cache_ref, v_cache_ref=v_cache_ref, o_ref=o_ref,
                split_refs=None if attention_refs is None else (*attention_refs, counts_ref),
                count=plan.arrivals("attention") + tok * plan.num_kv_heads + head, scale=scale,
                group=plan.num_heads // plan.num_kv_heads, rows=plan.query_rows,
                block_k=plan.attention_block_k, num_splits=plan.attention_splits, split_keys=None,
                sliding_window=sliding_window, soft_cap=None, on_gpu=on_gpu,
                written=lambda: publish("attention"))

    def chunk(ref, name):  # the rows' K range of a program of projection `name`
        k_split = getattr(plan, name).k_split
        return lambda split, k0: ref[read_at, pl.ds(k0, k_split)]

    stages = {
        "qkv": lambda i: project(
            i, "qkv", before=None, load_x=chunk(x_ref, "qkv"), w_ref=w_qkv_ref,
            norm=(x_ref, attn_norm_ref), bias_ref=b_qkv_ref, out_ref=qkv_ref, store=store_qkv,
            rope_columns=(plan.num_heads + plan.num_kv_heads) * head_dim),
        "attention": attend,
        "o": lambda i: project(
            i, "o", before="attention",
            load_x=lambda split, k0: o_ref[read_at, jnp.full((padded,), split, jnp.int32), :],
            w_ref=w_o_ref, residual_ref=x_ref, out_ref=x1_ref),
        "gate_up": lambda i: project(
            i, "gate_up", before="o", load_x=chunk(x1_ref, "gate_up"), w_ref=w_gu_ref,
            norm=(x1_ref, mlp_norm_ref), out_ref=up_ref, gated=gated_act),
        "down": lambda i: project(
            i, "down", before="gate_up", load_x=chunk(up_ref, "down"), w_ref=w_down_ref,
            residual_ref=x1_ref, out_ref=out_ref),
    }
    ticket = count(TICKET, 1)
    for stage in STAGES:
        first = plan.first_ticket(stage)
        pl.when((ticket >= first) & (ticket < first + plan.programs(stage)))(
            functools.partial(lambda run, at: run(ticket - at), stages[stage], first))

    finished = count(FINISHED, 1)

    @pl.when(finished == plan.total_programs - 1)
    def _():  # every other program is done with the counts
        for index in (TICKET, FINISHED, *DONE.values()):
            counts_ref[index] = jnp.int32(0)


def decode_layer(x, p: dict, k_cache, v_cache, layer, positions, seq_lens, block_tables,
                 slot_mapping, *, inv_freq, num_heads: int, num_kv_heads: int,
                 norm_eps: float, gated_act: Callable, scale: float,
                 sliding_window: Optional[int] = None, counters: Optional[jax.Array] = None,
                 attention_splits: Optional[int] = None, k_split: Optional[int] = None,
                 num_warps: int = 4, num_stages: int = 2, interpret: Optional[bool] = None,
                 spin_limit: int = SPIN_LIMIT):
    """`reference`'s result from one Pallas Triton kernel: (x, k_cache, v_cache), and the
    counters (zeros again) where given. x [T, hidden] (T <= MAX_ROWS), one decode token a
    row (`decode_attention_triton`'s contract: positions = seq_lens - 1, padding rows of
    seq_len 0); `p` the layer's weights by name (WEIGHTS, `qkv_bias` optional; gate and up
    concatenated, [hidden, 2 I]). `counters`: int32 zeros, at least `counters_size`; None:
    the call makes its own."""
    t, hidden = x.shape
    head_dim = 2 * inv_freq.shape[0]
    intermediate = p["down_proj"].shape[0]
    missing = [name for name in WEIGHTS if name not in p]
    if missing:
        raise ValueError(f"decode_layer needs the weights {list(WEIGHTS)}; missing {missing}")
    if not supports(t, hidden, intermediate, num_heads, num_kv_heads, head_dim):
        raise ValueError(f"decode_layer does not take {t} rows of {hidden} (intermediate "
                         f"{intermediate}, {num_heads} heads / {num_kv_heads} KV heads of "
                         f"{head_dim}): see decode_layer.supports")
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    expected = {"qkv_proj": (hidden, q_size + 2 * kv_size), "o_proj": (q_size, hidden),
                "gate_up_proj": (hidden, 2 * intermediate), "down_proj": (intermediate, hidden),
                "attn_norm_scale": (hidden,), "mlp_norm_scale": (hidden,),
                "qkv_bias": (q_size + 2 * kv_size,)}
    wrong = {name: a.shape for name, a in p.items() if name in expected
             and a.shape != expected[name]}
    if wrong:
        raise ValueError(f"decode_layer weights of the wrong shape: {wrong}, want "
                         f"{ {name: expected[name] for name in wrong} }")
    if k_cache.shape[3:] != (num_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {k_cache.shape}, {v_cache.shape} do not hold {num_kv_heads} "
                         f"KV heads of {head_dim}")
    if positions.shape != (t,) or seq_lens.shape != (t,) or slot_mapping.shape != (t,) \
            or block_tables.shape[0] != t:
        raise ValueError(f"one row per token: positions {positions.shape}, seq_lens "
                         f"{seq_lens.shape}, slot_mapping {slot_mapping.shape}, block_tables "
                         f"{block_tables.shape} must have {t} rows")
    layer_plan = plan(t, hidden, intermediate, num_heads, num_kv_heads, head_dim,
                      block_tables.shape[1] * k_cache.shape[2],
                      attention_splits=attention_splits, k_split=k_split)
    counts = jnp.zeros((layer_plan.counts,), jnp.int32) if counters is None else counters
    if counts.dtype != jnp.int32 or counts.ndim != 1 or counts.shape[0] < layer_plan.counts:
        raise ValueError(f"counters {counts.dtype}{list(counts.shape)}: int32 zeros, at least "
                         f"{layer_plan.counts}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    from jax.experimental.pallas import triton as plgpu

    dtype = x.dtype
    has_bias = "qkv_bias" in p
    operands = [seq_lens.astype(jnp.int32), slot_mapping.astype(jnp.int32),
                jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), block_tables.astype(jnp.int32),
                positions.astype(jnp.int32), inv_freq.astype(jnp.float32), x,
                p["attn_norm_scale"], p["qkv_proj"]]
    operands += [p["qkv_bias"]] if has_bias else []
    operands += [p["o_proj"], p["mlp_norm_scale"], p["gate_up_proj"], p["down_proj"],
                 k_cache, v_cache, counts]
    padded = layer_plan.padded_rows
    shape = jax.ShapeDtypeStruct
    outs = [shape((t, hidden), dtype), shape((t, num_heads + 2 * num_kv_heads, head_dim), dtype),
            shape((t, num_heads, head_dim), dtype), shape((t, hidden), dtype),
            shape((t, intermediate), dtype)]
    for name in ("qkv", "o", "gate_up", "down"):
        proj = getattr(layer_plan, name)
        if proj.splits > 1:
            outs.append(shape((proj.splits, padded, proj.n_out * (2 if proj.gated else 1)),
                              jnp.float32))
    if layer_plan.attention_splits > 1:
        split_rows = (t, num_kv_heads, layer_plan.attention_splits, layer_plan.query_rows)
        outs += [shape((*split_rows, head_dim), jnp.float32), shape(split_rows, jnp.float32),
                 shape(split_rows, jnp.float32)]
    outs += [shape(k_cache.shape, k_cache.dtype), shape(v_cache.shape, v_cache.dtype),
             shape(counts.shape, jnp.int32)]
    n_in = len(operands)
    aliases = {n_in - 3: len(outs) - 3, n_in - 2: len(outs) - 2, n_in - 1: len(outs) - 1}
    whole = lambda s: pl.BlockSpec(s, lambda *_: (0,) * len(s))
    kernel = functools.partial(
        _kernel, plan=layer_plan, has_bias=has_bias, gated_act=gated_act,
        norm_eps=float(norm_eps), scale=float(scale), sliding_window=sliding_window,
        on_gpu=not interpret, spin_limit=1 if interpret else spin_limit)
    results = pl.pallas_call(
        kernel, grid=(layer_plan.total_programs,),
        in_specs=[whole(a.shape) for a in operands],
        out_specs=[whole(o.shape) for o in outs], out_shape=outs,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name=f"decode_layer_t{t}_s{layer_plan.attention_splits}",
    )(*operands)
    out, (k_cache, v_cache, counts) = results[0], results[-3:]
    return (out, k_cache, v_cache) if counters is None else (out, k_cache, v_cache, counts)
