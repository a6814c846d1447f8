"""The one-kernel decoder layer (pallas_kernels/decode_layer.py): its result against the
unfused layer in interpret mode, its counts, its shape errors, its plan, and its Triton build
for an H100 on this machine (and, on a GPU, run after run under racing programs)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_layer as dl

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = SMALL = 64, 128, 4, 2, 32
QWEN = 896, 4864, 14, 2, 64  # Qwen2.5-0.5B's layer
BLOCK_SIZE, BLOCKS_A_ROW = 8, 4


@pytest.fixture(autouse=True)
def _exact_float32_references():
    with jax.default_matmul_precision("highest"):
        yield


def _layer_inputs(rows, *, dtype=jnp.float32, bias=True, padding=(), seed=0, dims=SMALL):
    """(x, weights, k_cache, v_cache, layer, positions, seq_lens, block_tables, slots,
    inv_freq): random weights and caches, each row a request whose new token lands at a
    random position of its own blocks, but the rows in `padding` (seq_len 0, slot 0)."""
    hidden, intermediate, heads, kv_heads, head_dim = dims
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    rand = lambda shape, s=0.2: (s * jax.random.normal(next(keys), shape)).astype(dtype)
    q, kv = heads * head_dim, kv_heads * head_dim
    p = {"attn_norm_scale": 1 + rand((hidden,)), "qkv_proj": rand((hidden, q + 2 * kv)),
         "o_proj": rand((q, hidden)), "mlp_norm_scale": 1 + rand((hidden,)),
         "gate_up_proj": rand((hidden, 2 * intermediate)),
         "down_proj": rand((intermediate, hidden))}
    if bias:
        p["qkv_bias"] = rand((q + 2 * kv,))
    cache_shape = (2, rows * BLOCKS_A_ROW + 1, BLOCK_SIZE, kv_heads, head_dim)
    k_cache, v_cache = rand(cache_shape, 1.0), rand(cache_shape, 1.0)
    rng = np.random.default_rng(seed)
    seq_lens = rng.integers(1, BLOCKS_A_ROW * BLOCK_SIZE + 1, rows).astype(np.int32)
    seq_lens[list(padding)] = 0
    tables = 1 + np.arange(rows * BLOCKS_A_ROW, dtype=np.int32).reshape(rows, BLOCKS_A_ROW)
    pos = np.maximum(seq_lens - 1, 0)
    slots = np.where(seq_lens > 0, tables[np.arange(rows), pos // BLOCK_SIZE] * BLOCK_SIZE
                     + pos % BLOCK_SIZE, 0).astype(np.int32)
    inv_freq = jnp.asarray(1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim), jnp.float32)
    return (rand((rows, hidden), 1.0), p, k_cache, v_cache, 1, jnp.asarray(pos),
            jnp.asarray(seq_lens), jnp.asarray(tables), jnp.asarray(slots), inv_freq)


OPTIONS = dict(num_heads=HEADS, num_kv_heads=KV_HEADS, norm_eps=1e-6, gated_act=jax.nn.silu,
               scale=HEAD_DIM ** -0.5)


def _both(inputs, **kw):
    """(the unfused layer's (x, k_cache, v_cache), the kernel's). The kernel's counts must
    come back zero (no wait gave up: in interpret mode, where programs run in ticket order,
    a count short of its target at once is a missing or misplaced publish), and serve a
    second call, which gives the same result."""
    *args, inv_freq = inputs
    options = OPTIONS | {k: kw.pop(k) for k in list(kw) if k == "sliding_window"}
    want = dl.reference(*args, inv_freq=inv_freq, **options)
    p = args[1]
    size = dl.counters_size(p["attn_norm_scale"].shape[0], p["down_proj"].shape[0],
                            OPTIONS["num_heads"], OPTIONS["num_kv_heads"], 2 * inv_freq.shape[0])
    layer = functools.partial(dl.decode_layer, *args, inv_freq=inv_freq, **options, **kw)
    *got, counters = layer(counters=jnp.zeros((size,), jnp.int32))
    np.testing.assert_array_equal(np.asarray(counters), 0)
    *again, counters = layer(counters=counters)
    np.testing.assert_array_equal(np.asarray(counters), 0)
    for a, b in zip(got, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return want, got


@pytest.mark.parametrize("rows, padding, kw", [
    (16, range(1, 16), dict(k_split=32)),  # a batch-1 multi-step decode: 16 rows, one real
    (3, (2,), dict(k_split=16)),  # rows padded to 16 inside, a padding row; all K split
    # the attention split and merged in-kernel; a padding row among requests runs as one
    (4, (1,), dict(attention_splits=4, bias=False, sliding_window=5)),
    (3, (0, 1, 2), {}),  # no request: the first row runs, as padding
])
def test_matches_the_unfused_layer_in_float32(rows, padding, kw):
    bias = kw.pop("bias", True)
    want, got = _both(_layer_inputs(rows, padding=padding, bias=bias), **kw)
    for w, g in zip(want, got):
        assert g.shape == w.shape and g.dtype == w.dtype
    # rows up to the last request (at least one) as the unfused layer has them; past it,
    # that row's values, and their k and v (to the null block, block 0, in the unfused
    # layer) not stored
    run = max([r + 1 for r in range(rows) if r not in padding] or [1])
    close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=2e-5)
    close(np.asarray(got[0][:run]), np.asarray(want[0][:run]))
    np.testing.assert_array_equal(np.asarray(got[0][run:]),
                                  np.broadcast_to(got[0][run - 1], got[0][run:].shape))
    assert np.all(np.isfinite(np.asarray(got[0])))
    first = 1 if run < rows else 0
    for w, g in zip(want[1:], got[1:3]):
        close(np.asarray(g[:, first:]), np.asarray(w[:, first:]))


def test_matches_the_unfused_layer_in_bfloat16():
    """Within two bfloat16 steps of the output's scale: the split sums are added in float32
    and rounded once, the unfused dot's own way differs in the last bits. One row (padded to
    16 inside), the attention split."""
    want, got = _both(_layer_inputs(1, dtype=jnp.bfloat16), k_split=32, attention_splits=2)
    for w, g in zip(want, got):
        w, g = np.asarray(w, np.float32), np.asarray(g, np.float32)
        assert np.max(np.abs(g - w)) <= 2 * 2.0 ** -7 * np.max(np.abs(w))


@pytest.mark.parametrize("change, match", [
    (lambda a: (a[0][:, :32], *a[1:]), "wrong shape"),  # hidden 32 against the weights
    (lambda a: (jnp.zeros((65, HIDDEN)), *a[1:]), "does not take"),  # more rows than MAX_ROWS
    (lambda a: (a[0], {k: v for k, v in a[1].items() if k != "o_proj"}, *a[2:]), "missing"),
    (lambda a: (a[0], a[1] | {"o_proj": jnp.zeros((HIDDEN, 2 * HIDDEN))}, *a[2:]),
     "wrong shape"),
    (lambda a: (*a[:5], a[5][:1], *a[6:]), "one row per token"),
])
def test_bad_shapes_raise_value_error(change, match):
    *args, inv_freq = _layer_inputs(3)
    with pytest.raises(ValueError, match=match):
        dl.decode_layer(*change(tuple(args)), inv_freq=inv_freq, **OPTIONS)


@pytest.mark.parametrize("counters", [jnp.zeros(3, jnp.int32), jnp.zeros(200, jnp.float32)])
def test_counters_of_the_wrong_kind_raise_value_error(counters):
    *args, inv_freq = _layer_inputs(1)
    with pytest.raises(ValueError, match="int32 zeros"):
        dl.decode_layer(*args, inv_freq=inv_freq, counters=counters, **OPTIONS)


def test_plan_of_a_qwen_layer_at_batch_1():
    """Qwen2.5-0.5B (896 wide, 4,864 intermediate, 14 heads / 2 KV heads of 64) at batch 1,
    1,024 keys: stages in ticket order, each projection's weights in chunks of at most
    128 x 64 columns (the O projection's K a head)."""
    plan = dl.plan(1, 896, 4864, 14, 2, 64, 1024)
    assert (plan.qkv.block_n, plan.qkv.k_split, plan.qkv.tiles, plan.qkv.splits) == (32, 128, 18, 7)
    assert (plan.o.block_n, plan.o.k_split, plan.o.splits) == (64, 64, 14)
    assert (plan.gate_up.block_n, plan.gate_up.tiles, plan.gate_up.splits) == (64, 76, 7)
    assert (plan.down.tiles, plan.down.splits) == (14, 38)
    assert plan.attention_splits == 16
    programs = [plan.programs(s) for s in dl.STAGES]
    assert programs == [126, 32, 196, 532, 532] and plan.total_programs == sum(programs)
    assert [plan.first_ticket(s) for s in dl.STAGES] == list(np.cumsum([0] + programs[:-1]))
    assert plan.counts <= dl.counters_size(896, 4864, 14, 2, 64)
    assert dl.supports(1, 896, 4864, 14, 2, 64)
    assert not dl.supports(1, 896, 4864, 14, 2, 48)  # a head dim not a power of two


def _qwen_specs(rows, dtype=jnp.bfloat16):  # Qwen2.5-0.5B's layer
    spec = jax.ShapeDtypeStruct
    q, kv = 14 * 64, 2 * 64
    p = {"attn_norm_scale": (896,), "qkv_proj": (896, q + 2 * kv), "qkv_bias": (q + 2 * kv,),
         "o_proj": (q, 896), "mlp_norm_scale": (896,), "gate_up_proj": (896, 2 * 4864),
         "down_proj": (4864, 896)}
    cache = spec((24, 512, 16, 2, 64), dtype)
    i32 = lambda *s: spec(s, jnp.int32)
    return (spec((rows, 896), dtype), {k: spec(s, dtype) for k, s in p.items()}, cache, cache,
            i32(), i32(rows), i32(rows), i32(rows, 64), i32(rows))


def test_lowers_with_its_waits_and_builds_for_sm_90():
    """At 16 rows (a batch-1 multi-step decode; its sums in straight-line code) the whole
    layer is one Triton kernel. Each stage but the first waits for the one before in a loop
    that polls its count: four loops of volatile loads in the IR. (A polling loop whose
    result went unused was once dropped as a mere read; the interpreter, running programs
    in order, cannot tell.) Built for sm_90 with the triton package (~40 s here, so once) it
    fits an H100's limits without spills."""
    from pallas_kernels.gpu_lowering import compile_triton, triton_modules

    size = dl.counters_size(896, 4864, 14, 2, 64)
    layer = functools.partial(dl.decode_layer, inv_freq=jnp.ones((32,), jnp.float32),
                              num_heads=14, num_kv_heads=2, norm_eps=1e-6,
                              gated_act=jax.nn.silu, scale=0.125, interpret=False)
    fn = lambda *a: layer(*a, counters=jnp.zeros((size,), jnp.int32))
    try:
        import triton  # noqa: F401
    except ImportError:
        (ir, _, _), = triton_modules(fn, *_qwen_specs(16))
        build = None
    else:
        (build,) = compile_triton(fn, *_qwen_specs(16))
        ir = build.ir
    loops = ir.split("scf.while")[1:]
    assert len(loops) == 4
    for loop in loops:
        body, after = loop.split("scf.yield", 1)
        assert re.search(r"tt\.load .*isVolatile = true.*tensor<1x!tt\.ptr<i32>>", body), body
        # then the acquire (an atomic) and the barrier that orders the other threads after it
        after = "\n".join(after.split("\n")[1:40])
        assert "tt.atomic_rmw add, acq_rel, gpu" in after and "gpu.barrier" in after, after
    if build is not None:
        assert build.name.startswith("decode_layer_t16"), build
        assert build.shared_bytes <= 227 * 1024 and build.spill_bytes == 0, build


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (the "
                    "interpreter runs the programs in order: no race to see)")
@pytest.mark.parametrize("dims, kw", [(SMALL, dict(attention_splits=4, k_split=16)),
                                      (QWEN, {})])
def test_the_layer_is_the_same_in_every_run(dims, kw):
    """Programs race on a GPU: a stage that read its input before the stage before had
    written it, or a split sum missed, would show as a difference from the first run (the
    KV write stores the same values each run). Also checks it ends: a program waiting on one
    that cannot run would give up (a small spin limit here) and count itself in the counts,
    which must come back zero. Qwen2.5-0.5B's layer here is 1,388 programs, more than an
    H100 holds at once. The first run matches the unfused layer within bfloat16's
    rounding."""
    runs = 200
    *args, inv_freq = _layer_inputs(1, dtype=jnp.bfloat16, dims=dims)
    counters = jnp.zeros((dl.counters_size(*dims),), jnp.int32)
    options = OPTIONS | dict(num_heads=dims[2], num_kv_heads=dims[3], scale=dims[4] ** -0.5)
    layer = functools.partial(dl.decode_layer, inv_freq=inv_freq, spin_limit=1 << 16,
                              **options, **kw)
    x, *rest = args
    first = layer(*args, counters=counters)[0]
    want = np.asarray(dl.reference(*args, inv_freq=inv_freq, **options)[0], np.float32)
    assert np.max(np.abs(np.asarray(first, np.float32) - want)) \
        <= 2 * 2.0 ** -7 * np.max(np.abs(want))

    @jax.jit
    def worst_difference(counters, caches):
        def run(_, carry):
            counters, caches, worst = carry
            y, k, v, counters = layer(x, rest[0], *caches, *rest[3:], counters=counters)
            return counters, (k, v), jnp.maximum(worst, jnp.max(jnp.abs(y - first)))

        return jax.lax.fori_loop(0, runs, run, (counters, caches, jnp.zeros((), x.dtype)))

    counters, _, worst = worst_difference(counters, (rest[1], rest[2]))
    assert float(worst) == 0.0
    np.testing.assert_array_equal(np.asarray(counters), 0)
