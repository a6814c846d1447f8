"""Every registered attention variant against the jnp reference, plus the KV writers, the
host-side validation, GPU lowering without a GPU, the engine on the Pallas backend and the
kernel benchmark's smoke run.

On CPU the kernels run in interpret mode (Mosaic GPU's interpreter for that lowering); on a
GPU the same tests run them compiled, and the tests marked `gpu` add larger cases
(scripts/gpu_check.sh runs this file there).

Cases are padded to a few fixed shapes (tokens, requests, table width, blocks), as the
engine's buckets are, so that many random batches share one compiled kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import native_cpu
from pallas_kernels.kv_write import KV_WRITERS
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.validation import validate_attention_inputs
from pallas_kernels.variants import Case, get_variant, register_variant, variants

ON_GPU = jax.default_backend() == "gpu"
from pallas_kernels.ragged_paged_attention_mosaic import (  # noqa: E402
    interpret_available as mosaic_interpret_available)

needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU (compiled, not interpreted)")
KERNELS = sorted(name for name, v in variants().items() if v.is_pallas)
# every variant the reference checks: the Pallas kernels and the other XLA ones
CHECKED = sorted(name for name in variants() if name != "reference")
TRITON = sorted(name for name in KERNELS if variants()[name].lowering == "triton")
LAYERS, LAYER = 2, 1
TOL = {"float32": 2e-5, "bfloat16": 3e-2}
pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

_reference = jax.jit(ragged_paged_attention_reference,
                     static_argnames=("scale", "sliding_window", "soft_cap"))


def reference(*args, **kwargs):
    # exact float32 matmuls on a GPU too (XLA's default there may be TF32)
    with jax.default_matmul_precision("highest"):
        return _reference(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def jitted(name: str, **knobs):
    fn = functools.partial(get_variant(name).fn, **knobs)
    return jax.jit(fn, static_argnames=("scale", "sliding_window", "soft_cap"))


@dataclasses.dataclass(frozen=True)
class Shapes:
    """A bucket: the static shapes a batch is padded to."""

    tokens: int = 48
    reqs: int = 8
    max_blocks: int = 8
    num_blocks: int = 72
    block_size: int = 8
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 16
    dtype: str = "float32"


def make_batch(requests, shapes: Shapes, seed: int):
    """Random paged cache (noise in every slot, blocks in random order), a batch of
    `requests` = [(seq_len, q_len)] padded with empty requests and padding tokens."""
    s = shapes
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(s.dtype)
    assert len(requests) <= s.reqs and sum(q for _, q in requests) <= s.tokens
    cache_shape = (LAYERS, s.num_blocks, s.block_size, s.kv_heads, s.head_dim)
    k_cache = rng.standard_normal(cache_shape).astype(np.float32)
    v_cache = rng.standard_normal(cache_shape).astype(np.float32)
    ids = rng.permutation(np.arange(1, s.num_blocks))
    # entries past a request's blocks are garbage no kernel may read
    tables = np.full((s.reqs, s.max_blocks), s.num_blocks + 7, np.int32)
    seq_lens = np.zeros(s.reqs, np.int32)
    qsl = np.zeros(s.reqs + 1, np.int32)
    cursor = 0
    for r, (seq_len, q_len) in enumerate(requests):
        n = -(-seq_len // s.block_size)
        tables[r, :n] = ids[cursor:cursor + n]
        cursor += n
        seq_lens[r] = seq_len
        qsl[r + 1] = qsl[r] + q_len
    qsl[len(requests) + 1:] = qsl[len(requests)]
    assert cursor < s.num_blocks, "not enough blocks for the batch"
    q = rng.standard_normal((s.tokens, s.heads, s.head_dim)).astype(np.float32)
    validate_attention_inputs(qsl, seq_lens, tables, num_tokens=s.tokens,
                              num_blocks=s.num_blocks, block_size=s.block_size)
    as_dtype = lambda a: jnp.asarray(a, dtype)
    return (as_dtype(q), as_dtype(k_cache), as_dtype(v_cache), jnp.int32(LAYER),
            jnp.asarray(qsl), jnp.asarray(seq_lens), jnp.asarray(tables))


def check_variant(name: str, requests, shapes: Shapes = Shapes(), *, seed: int = 0,
                  window=None, soft_cap=None, **knobs):
    variant = get_variant(name)
    reason = variant.unsupported_reason(Case(shapes.dtype, shapes.head_dim, shapes.heads,
                                             shapes.kv_heads, shapes.block_size, window,
                                             soft_cap))
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    if name == "mosaic_gpu" and not ON_GPU and not mosaic_interpret_available():
        pytest.skip("Mosaic GPU's interpreter needs jax >= 0.11")
    args = make_batch(requests, shapes, seed)
    scale = shapes.head_dim ** -0.5
    expected = np.asarray(reference(*args, scale=scale, sliding_window=window,
                                    soft_cap=soft_cap), np.float32)
    got = jitted(name, **knobs)(*args, scale=scale, sliding_window=window, soft_cap=soft_cap)
    assert got.shape == args[0].shape and got.dtype == args[0].dtype
    got = np.asarray(got, np.float32)
    assert np.isfinite(got).all()
    total = sum(q for _, q in requests)
    assert (got[total:] == 0).all(), "padding tokens must come out as zeros"
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL[shapes.dtype],
                               err_msg=f"{name} {knobs} on {requests}")
    return got


# decodes, full prefills, chunks on cached KV (crossing blocks), in mixed order
MIXED = [(20, 1), (23, 23), (17, 5), (1, 1), (12, 1), (30, 8)]


@pytest.mark.parametrize("name", CHECKED)
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (8, 2), (14, 2)])  # GQA 1, 2, 4, 7
def test_mixed_batch_gqa(name, heads, kv_heads):
    check_variant(name, MIXED, Shapes(heads=heads, kv_heads=kv_heads), seed=heads)


@pytest.mark.parametrize("name", CHECKED)
def test_random_batches(name):
    """Random mixes of decodes, prefills and chunks, in random order, in one bucket."""
    rng = np.random.default_rng(1)
    for seed in range(5):
        reqs = []
        for _ in range(rng.integers(1, 8)):
            q_len = int(rng.choice([1, 1, 2, 7, 16]))
            reqs.append((q_len + int(rng.integers(0, 40)), q_len))
        while sum(q for _, q in reqs) > 48:
            reqs.pop()
        check_variant(name, reqs, seed=seed)


@pytest.mark.parametrize("name", CHECKED)
def test_decode_only_and_prefill_only(name):
    check_variant(name, [(n, 1) for n in (1, 8, 9, 33, 64, 2, 17, 40)])
    check_variant(name, [(13, 13), (8, 8), (3, 3), (24, 24)], seed=1)


@pytest.mark.parametrize("name", CHECKED)
def test_padding_only_and_empty_requests(name):
    """Empty requests between real ones, padding tokens, and a step with no tokens at all."""
    check_variant(name, [(5, 1), (0, 0), (9, 9), (0, 0), (3, 2)])
    got = check_variant(name, [])
    assert (got == 0).all()


@pytest.mark.parametrize("name", CHECKED)
@pytest.mark.parametrize("window", [1, 7])
def test_sliding_window(name, window):
    check_variant(name, MIXED, window=window, seed=window)


@pytest.mark.parametrize("name", CHECKED)
def test_soft_cap(name):
    check_variant(name, MIXED, soft_cap=2.0, seed=3)


BF16 = Shapes(head_dim=64, block_size=16, max_blocks=8, num_blocks=24, heads=4, kv_heads=2,
              dtype="bfloat16")


@pytest.mark.parametrize("name", CHECKED)
def test_bfloat16_head_dim_64(name):
    check_variant(name, [(100, 3), (40, 40), (1, 1), (0, 0), (70, 1)], BF16)


@pytest.mark.parametrize("name", CHECKED)
def test_bfloat16_head_dim_128_block_size_32(name):
    if get_variant(name).lowering == "mosaic_gpu":
        pytest.skip("the Mosaic GPU interpreter takes ~10 s to build a case; head_dim 128 "
                    "differs only in its swizzle tiles, which test_lowers_for_an_h100 lowers")
    shapes = dataclasses.replace(BF16, head_dim=128, block_size=32, max_blocks=4)
    check_variant(name, [(100, 3), (40, 40), (1, 1), (70, 1)], shapes, seed=1)


@pytest.mark.parametrize("name", CHECKED)
def test_bfloat16_gqa7_window_soft_cap(name):
    shapes = dataclasses.replace(BF16, heads=14)
    check_variant(name, [(50, 1), (16, 16), (64, 20), (90, 7)], shapes, window=20, soft_cap=30.0)


@pytest.mark.parametrize("knobs,window", [(dict(block_q=1, block_k=16), None),
                                          (dict(block_q=4, block_k=32), None),
                                          (dict(block_q=16, block_k=16, kv_splits=3), 9)])
def test_triton_knobs(knobs, window):
    """Tiles of 1..16 tokens, key steps smaller and larger than a block, split keys."""
    check_variant("triton", MIXED, Shapes(block_size=16, max_blocks=4, num_blocks=40),
                  window=window, **knobs)


def test_kernel_reads_the_given_layer_only():
    """Each layer of the stacked cache gives its own answer (the kernel indexes the layer)."""
    args = list(make_batch(MIXED, Shapes(), 0))
    outs = []
    for layer in range(LAYERS):
        args[3] = jnp.int32(layer)
        outs.append(np.asarray(jitted("triton")(*args, scale=0.25)))
        np.testing.assert_allclose(outs[-1], reference(*args, scale=0.25), atol=2e-5)
    assert np.abs(outs[0] - outs[1]).max() > 0.1


# --- KV writers -----------------------------------------------------------------------------

@pytest.mark.parametrize("writer", sorted(KV_WRITERS))
def test_kv_writers(writer):
    """New k/v land exactly in their slots of the given layer; nothing else changes except
    the null block 0 that padding tokens write into."""
    rng = np.random.default_rng(0)
    shape = (3, 12, 4, 3, 16)  # 3 KV heads: not a power of two
    k_cache = rng.standard_normal(shape).astype(np.float32)
    v_cache = rng.standard_normal(shape).astype(np.float32)
    slots = np.concatenate([rng.permutation(np.arange(4, 48))[:21], [0, 0, 0]]).astype(np.int32)
    k = rng.standard_normal((24, 3, 16)).astype(np.float32)
    v = rng.standard_normal((24, 3, 16)).astype(np.float32)
    out_k, out_v = jax.jit(KV_WRITERS[writer])(jnp.asarray(k_cache), jnp.asarray(v_cache),
                                               jnp.int32(2), jnp.asarray(k), jnp.asarray(v),
                                               jnp.asarray(slots))
    want_k, want_v = k_cache.copy(), v_cache.copy()
    for t, slot in enumerate(slots[:21]):
        want_k[2, slot // 4, slot % 4] = k[t]
        want_v[2, slot // 4, slot % 4] = v[t]
    for got, want in ((out_k, want_k), (out_v, want_v)):
        got = np.asarray(got).copy()
        got[:, 0], want[:, 0] = 0, 0
        np.testing.assert_array_equal(got, want)


# --- fused decode attention (KV write and attention in one kernel) -------------------------

def _decode_case(seed, tokens=6, heads=14, kv_heads=2, head_dim=64, block_size=16, padding=1,
                 dtype=np.float32, cache_dtype=None, shared_prefix=False):
    """One decode token a row: random caches, block tables, the new token's slot at
    `seq_len - 1`; the last `padding` rows are padding (seq_len 0, null-block slot)."""
    rng = np.random.default_rng(seed)
    blocks, width = 40, 5
    cache_shape = (LAYERS, blocks, block_size, kv_heads, head_dim)
    cache_dtype = cache_dtype or dtype
    k_cache = jnp.asarray(rng.standard_normal(cache_shape), cache_dtype)
    v_cache = jnp.asarray(rng.standard_normal(cache_shape), cache_dtype)
    qkv = jnp.asarray(rng.standard_normal((tokens, heads + 2 * kv_heads, head_dim)), dtype)
    real = tokens - padding
    seq_lens = np.zeros(tokens, np.int32)
    seq_lens[:real] = rng.integers(1, width * block_size + 1, real)
    free = iter(rng.permutation(np.arange(1, blocks)))
    tables = np.zeros((tokens, width), np.int32)
    prefix = [next(free) for _ in range(2)] if shared_prefix else []
    for r in range(real):
        if prefix and seq_lens[r] > 2 * block_size:  # full blocks shared with other rows
            tables[r, :2] = prefix
        for b in range(len(prefix) if tables[r, 0] else 0, -(-seq_lens[r] // block_size)):
            tables[r, b] = next(free)
    pos = np.maximum(seq_lens - 1, 0)
    slots = np.where(seq_lens > 0, tables[np.arange(tokens), pos // block_size] * block_size
                     + pos % block_size, 0).astype(np.int32)
    return (qkv, k_cache, v_cache, jnp.int32(LAYER), jnp.asarray(seq_lens), jnp.asarray(tables),
            jnp.asarray(slots))


@pytest.mark.parametrize("case", [
    dict(seed=0),
    dict(seed=1, heads=4, kv_heads=4, padding=0),  # MHA, no padding row
    dict(seed=2, heads=8, kv_heads=1, shared_prefix=True, padding=2),
    dict(seed=3, sliding_window=20, block_k=16),  # whole rows over several tiles
    dict(seed=4, soft_cap=5.0),
    dict(seed=5, dtype=jnp.bfloat16),
    # a float32 model over a bfloat16 cache (the kernel computes in float32)
    dict(seed=6, cache_dtype=jnp.bfloat16, block_size=8),
    # keys shared by several programs a row, merged after the kernel (flash-decoding)
    dict(seed=7, num_splits=2),
    dict(seed=8, num_splits=3, sliding_window=20, padding=2),
    dict(seed=9, num_splits=16, shared_prefix=True, heads=8, kv_heads=1),  # splits w/o keys
    dict(seed=10, num_splits=4, soft_cap=5.0, dtype=jnp.bfloat16),
    # fixed key ranges a split (many rows): short rows' later splits find no key
    dict(seed=11, split_keys=32, block_k=16),
    dict(seed=12, split_keys=16, block_k=16, sliding_window=20, padding=2),
    dict(seed=13, split_keys=32, block_k=32, shared_prefix=True, dtype=jnp.bfloat16),
])
def test_decode_attention_matches_write_then_attend(case):
    """The fused decode kernel (interpret mode on CPU) against the scatter KV write followed
    by the reference attention: the same output, the same caches (the null block aside)."""
    from pallas_kernels.decode_attention_triton import (decode_attention_reference,
                                                        decode_attention_triton)

    case = dict(case)
    knobs = {k: case.pop(k) for k in ("sliding_window", "soft_cap") if k in case}
    split_keys = case.pop("split_keys", None)
    splits = {"num_splits": case.pop("num_splits", None if split_keys else 1),
              "block_k": case.pop("block_k", None), "split_keys": split_keys}
    args = _decode_case(**case)
    kwargs = dict(scale=0.125, num_kv_heads=args[1].shape[3], **knobs)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(functools.partial(decode_attention_reference, **kwargs))(*args)
        got = jax.jit(functools.partial(decode_attention_triton, **kwargs, **splits))(*args)
    exact = args[0].dtype == jnp.float32 and args[1].dtype == jnp.float32
    tol = TOL["float32" if exact else "bfloat16"]
    out, want_out = np.asarray(got[0], np.float32), np.asarray(want[0], np.float32)
    np.testing.assert_allclose(out, want_out, atol=tol, rtol=tol)
    padding = np.asarray(args[4]) == 0
    assert not out[padding].any() and np.abs(out[~padding]).max() > 0.1
    for cache, want_cache in zip(got[1:], want[1:]):
        cache, want_cache = np.asarray(cache, np.float32), np.asarray(want_cache, np.float32)
        np.testing.assert_array_equal(cache[:, 1:], want_cache[:, 1:])
    if splits["num_splits"] == 1:
        return
    # with counts passed in, as a step's kernels share them: the same output, the counts
    # (zeros in) zero again
    counters = jnp.zeros(args[0].shape[0] * args[1].shape[3] + 3, jnp.int32)
    again = jax.jit(functools.partial(decode_attention_triton, **kwargs, **splits,
                                      counters=counters))(*args)
    np.testing.assert_array_equal(np.asarray(again[0], np.float32), out)
    np.testing.assert_array_equal(np.asarray(again[3]), 0)


@pytest.mark.gpu
@needs_gpu
def test_split_decode_attention_is_the_same_in_every_run():
    """Whichever split of a row finishes last merges all of them in split order: run after
    run the output is bitwise the same. The splits race on a GPU (a batch-1 step, 16
    splits, a few hundred runs), and a partial softmax missed or read stale would show (the
    interpreter runs them in order: nothing to see there)."""
    from pallas_kernels.decode_attention_triton import decode_attention_triton

    runs = 300
    qkv, k_cache, v_cache, *rest = _decode_case(seed=3, tokens=1, padding=0,
                                                dtype=jnp.bfloat16)
    attend = functools.partial(decode_attention_triton, scale=0.125, num_kv_heads=2,
                               num_splits=16, block_k=16)  # up to 5 splits with keys
    first, k_cache, v_cache, counters = attend(qkv, k_cache, v_cache, *rest,
                                               counters=jnp.zeros(8, jnp.int32))

    @jax.jit
    def worst_difference(k_cache, v_cache, counters):
        def run(_, carry):
            k_cache, v_cache, counters, worst = carry
            out, k_cache, v_cache, counters = attend(qkv, k_cache, v_cache, *rest,
                                                     counters=counters)
            return k_cache, v_cache, counters, jnp.maximum(worst,
                                                           jnp.max(jnp.abs(out - first)))

        return jax.lax.fori_loop(0, runs, run, (k_cache, v_cache, counters,
                                                jnp.zeros((), first.dtype)))

    *_, counters, worst = worst_difference(k_cache, v_cache, counters)
    assert float(worst) == 0.0 and float(jnp.max(jnp.abs(first))) > 0.1
    np.testing.assert_array_equal(np.asarray(counters), 0)


def test_decode_attention_counts_too_few_for_its_rows_are_left_alone():
    """A counters array shorter than rows x KV heads is not used: the call counts in its
    own and gives the one it was handed back as it was."""
    from pallas_kernels.decode_attention_triton import decode_attention_triton

    args = _decode_case(seed=0)
    kwargs = dict(scale=0.125, num_kv_heads=args[1].shape[3], num_splits=2)
    want = decode_attention_triton(*args, **kwargs)
    short = jnp.full(2, 7, jnp.int32)
    got = decode_attention_triton(*args, **kwargs, counters=short)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    assert got[3] is short


def test_decode_tiling_defaults():
    """Few rows: even shares of each row's tiles; rows enough to fill the GPU: one program
    a row at any context; fixed key ranges only where asked (at most MAX_KEY_RANGES)."""
    from pallas_kernels.decode_attention_triton import MAX_KEY_RANGES, default_tiling

    assert default_tiling(16, 2, 1024) == (64, 8, None)
    assert default_tiling(256, 2, 1024) == (128, 1, None)
    assert default_tiling(256, 2, 64 * 1024) == (128, 1, None)
    wide = default_tiling(256, 2, 64 * 1024, split_keys=1024)
    assert wide[1] == MAX_KEY_RANGES and wide[1] * wide[2] >= 64 * 1024 and wide[2] % 128 == 0
    assert default_tiling(256, 2, 4096, block_k=2048)[1:] == (1, None)  # 2048 keys a tile
    assert default_tiling(256, 2, 2048, num_splits=1) == (128, 1, None)  # as asked
    assert default_tiling(256, 2, 2048, block_k=64, split_keys=512) == (64, 4, 512)
    assert default_tiling(256, 2, 512, split_keys=512) == (128, 1, None)
    with pytest.raises(ValueError, match="not both"):
        default_tiling(256, 2, 2048, num_splits=2, split_keys=512)
    with pytest.raises(ValueError, match="multiple of block_k"):
        default_tiling(256, 2, 2048, block_k=128, split_keys=100)


def test_decode_attention_rejects_bad_shapes():
    from pallas_kernels.decode_attention_triton import decode_attention_triton

    args = list(_decode_case(0))
    with pytest.raises(ValueError, match="does not fit the caches"):
        decode_attention_triton(*args, scale=0.1, num_kv_heads=3)
    args[4] = args[4][:-1]
    with pytest.raises(ValueError, match="one row per token"):
        decode_attention_triton(*args, scale=0.1, num_kv_heads=2)


@pytest.mark.parametrize("backend,decode_only,fused", [
    ("pallas_triton", True, True), ("pallas:triton_splitk", True, False),
    ("pallas_triton", False, False),  # a step that may hold prefills
    ("pallas_triton+kv_scatter", True, False), ("pallas_triton+kv_triton", True, False),
    ("reference", True, False)])
def test_attend_fuses_decode_steps_only_where_asked(backend, decode_only, fused):
    """`attend` (what a layer calls) takes the fused decode kernel for a decode-only step of
    a variant that has one, unless the backend names its KV writer."""
    from jaxvllm.models.attention import AttentionMetadata, KVCache, attend

    qkv, k_cache, v_cache, layer, seq_lens, tables, slots = _decode_case(0)
    q, k, v = qkv[:, :14], qkv[:, 14:16], qkv[:, 16:]
    # as the engine lays a decode-only step out: row r is request r, padding rows last
    query_start_loc = jnp.asarray([0, 1, 2, 3, 4, 5, 5], jnp.int32)
    meta = AttentionMetadata(query_start_loc, seq_lens, tables, slots, decode_only=decode_only)
    fn = functools.partial(attend, scale=0.125, sliding_window=None, backend=backend)
    jaxpr = str(jax.make_jaxpr(fn)(q, k, v, KVCache(k_cache, v_cache), layer, meta))
    assert ("decode_attention_bk" in jaxpr) == fused
    out, kv = fn(q, k, v, KVCache(k_cache, v_cache), layer, meta)
    want = jax.jit(functools.partial(decode_attention_reference_of_parts, num_kv_heads=2))(
        qkv, k_cache, v_cache, layer, seq_lens, tables, slots)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want[0]), atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(kv.k)[:, 1:], np.asarray(want[1])[:, 1:])


def decode_attention_reference_of_parts(*args, num_kv_heads):
    from pallas_kernels.decode_attention_triton import decode_attention_reference

    with jax.default_matmul_precision("highest"):
        return decode_attention_reference(*args, scale=0.125, num_kv_heads=num_kv_heads)


def test_only_the_triton_variant_fuses_decode_steps():
    """The Triton variant (the GPU default) carries the fused decode kernel; the others,
    split-K included (whose key splits the fused kernel's own splitting does not follow),
    write, then attend."""
    assert [name for name, v in variants().items() if v.decode is not None] == ["triton"]


# --- host-side validation -------------------------------------------------------------------

GOOD = dict(query_start_loc=[0, 1, 4, 4], seq_lens=[5, 3, 0], block_tables=[[3, 2], [1, 9], [0, 0]])


@pytest.mark.parametrize("change,message", [
    (dict(block_tables=[[3, 2], [12, 9], [0, 0]]), r"block_tables\[1, 0\] = 12"),
    (dict(block_tables=[[3, -1], [1, 9], [0, 0]]), r"block_tables\[0, 1\] = -1"),
    (dict(seq_lens=[5, 2, 0]), "request 1: seq_len 2 < q_len 3"),
    (dict(query_start_loc=[0, 3, 2, 4]), "decreases at request 1"),
    (dict(query_start_loc=[1, 1, 4, 4]), r"query_start_loc\[0\]"),
    (dict(query_start_loc=[0, 1, 4, 9]), "exceeds the 8 query tokens"),
    (dict(seq_lens=[9, 3, 0]), "needs more than the block table's 2 blocks"),
    (dict(seq_lens=[5, 3]), "shapes disagree"),
])
def test_validation_rejects(change, message):
    kwargs = {k: np.asarray(v, np.int32) for k, v in {**GOOD, **change}.items()}
    validate_attention_inputs(**{k: np.asarray(v, np.int32) for k, v in GOOD.items()},
                              num_tokens=8, num_blocks=10, block_size=4)
    with pytest.raises(ValueError, match=message):
        validate_attention_inputs(**kwargs, num_tokens=8, num_blocks=10, block_size=4)


def test_validation_checks_slot_mapping_and_eager_kernel_calls():
    good = {k: np.asarray(v, np.int32) for k, v in GOOD.items()}
    with pytest.raises(ValueError, match=r"slot_mapping\[2\] = 40"):
        validate_attention_inputs(**good, num_tokens=4, num_blocks=10, block_size=4,
                                  slot_mapping=np.array([1, 2, 40, 0], np.int32))
    # an eager (untraced) kernel call validates before it runs
    args = list(make_batch(MIXED, Shapes(), 0))
    args[6] = args[6].at[2, 0].set(500)
    with pytest.raises(ValueError, match=r"block_tables\[2, 0\] = 500"):
        get_variant("triton")(*args, scale=0.25)


# --- the registry ---------------------------------------------------------------------------

def test_registry_finds_every_variant_and_rejects_duplicates():
    names = variants()
    assert {"reference", "triton", "triton_splitk", "mosaic_gpu"} <= set(names)
    with pytest.raises(ValueError, match="already registered"):
        register_variant("triton", lambda *a, **k: None, lowering="triton", description="dup")
    with pytest.raises(ValueError, match="no attention variant named 'nope'"):
        get_variant("nope")


def test_attention_backend_names():
    from jaxvllm.config import EngineConfig
    from jaxvllm.models.attention import resolve_attention_backend

    assert resolve_attention_backend("reference") == ("reference", "scatter")
    assert resolve_attention_backend("pallas") == ("triton", "scatter")
    assert resolve_attention_backend("pallas_mosaic_gpu+kv_triton") == ("mosaic_gpu", "triton")
    assert resolve_attention_backend("pallas:triton_splitk") == ("triton_splitk", "scatter")
    native = native_cpu.unavailable_reason() is None
    assert EngineConfig().resolved_attention_backend() == (
        "pallas" if ON_GPU else "cpu" if native else "xla")
    assert resolve_attention_backend("xla") == ("block_pairs", "scatter")
    assert resolve_attention_backend("cpu") == ("native_cpu", "scatter")
    from jaxvllm.entrypoints.serve_cmd import ATTENTION_BACKEND_HELP
    from jaxvllm.models.attention import ATTENTION_BACKENDS

    assert set(ATTENTION_BACKENDS) <= {w.strip(",()") for w in ATTENTION_BACKEND_HELP.split()}
    for bad in ("cuda", "pallas:nope", "pallas+kv_nope"):
        with pytest.raises(ValueError, match="is not available"):
            EngineConfig(attention_backend=bad)


# --- GPU lowering without a GPU -------------------------------------------------------------

def _gpu_specs(heads=32, kv_heads=8, head_dim=128, block_size=16, tokens=64, reqs=16):
    sd = jax.ShapeDtypeStruct
    cache = sd((2, 64, block_size, kv_heads, head_dim), jnp.bfloat16)
    return (sd((tokens, heads, head_dim), jnp.bfloat16), cache, cache, sd((), jnp.int32),
            sd((reqs + 1,), jnp.int32), sd((reqs,), jnp.int32), sd((reqs, 8), jnp.int32))


@pytest.mark.parametrize("name", KERNELS)
def test_lowers_for_an_h100(name):
    """The real GPU lowering (Pallas -> Triton IR or Mosaic GPU dialect) accepts the kernel
    at the benchmark's head layouts, with the window and soft cap on."""
    from pallas_kernels.gpu_lowering import lower_for_gpu

    fn = functools.partial(get_variant(name).fn, scale=0.1, interpret=False,
                           sliding_window=64, soft_cap=30.0)
    text = lower_for_gpu(fn, *_gpu_specs())
    assert ("__gpu$xla.gpu.triton" in text) or ("mosaic_gpu" in text)
    lower_for_gpu(functools.partial(get_variant(name).fn, scale=0.1, interpret=False),
                  *_gpu_specs(heads=14, kv_heads=2, head_dim=64))


def _decode_specs(heads=14, kv_heads=2, head_dim=64, tokens=256, width=8):
    sd = jax.ShapeDtypeStruct
    cache = sd((2, 64, 16, kv_heads, head_dim), jnp.bfloat16)
    rows = sd((tokens,), jnp.int32)
    return (sd((tokens, heads + 2 * kv_heads, head_dim), jnp.bfloat16), cache, cache,
            sd((), jnp.int32), rows, sd((tokens, width), jnp.int32), rows)


def test_decode_attention_lowers_for_an_h100():
    from pallas_kernels.decode_attention_triton import decode_attention_triton
    from pallas_kernels.gpu_lowering import lower_for_gpu

    # 256 rows: one program a row and KV head (at 2,048 keys too); 16 rows: the keys split
    # (and merged); 256 rows of up to 2,048 keys in fixed key ranges (and merged). One
    # kernel each: the last split of a row to finish merges (its count, aliased, in place)
    for heads, kv_heads, head_dim, tokens, width, split_keys in (
            (14, 2, 64, 256, 8, None), (14, 2, 64, 16, 8, None), (32, 8, 128, 256, 8, None),
            (14, 2, 64, 256, 128, None), (14, 2, 64, 256, 128, 1024)):
        fn = functools.partial(decode_attention_triton, scale=0.1, interpret=False,
                               num_kv_heads=kv_heads, sliding_window=64, soft_cap=30.0,
                               split_keys=split_keys)
        text = lower_for_gpu(fn, *_decode_specs(heads, kv_heads, head_dim, tokens, width))
        merged = tokens == 16 or split_keys is not None
        assert text.count("__gpu$xla.gpu.triton") == 1
        assert text.count("output_operand_alias<") == (3 if merged else 2)


def test_mosaic_p_in_registers_lowers():
    """The Mosaic GPU knob the interpreter cannot run (wgmma with P from registers) lowers."""
    from pallas_kernels.gpu_lowering import lower_for_gpu

    fn = functools.partial(get_variant("mosaic_gpu").fn, scale=0.1, interpret=False,
                           p_in_registers=True, block_kv=128)
    assert "mosaic_gpu" in lower_for_gpu(fn, *_gpu_specs())


@pytest.mark.parametrize("name", TRITON)
def test_triton_compiles_to_cubin(name):
    """Triton IR -> PTX -> cubin for sm_90 with the triton package, within H100 limits."""
    pytest.importorskip("triton")
    from pallas_kernels.gpu_lowering import compile_triton

    fn = functools.partial(get_variant(name).fn, scale=0.1, interpret=False)
    for specs in (_gpu_specs(), _gpu_specs(tokens=256, reqs=8)):  # decode tiles, prefill tiles
        for build in compile_triton(fn, *specs):
            assert build.shared_bytes <= 227 * 1024 and build.spill_bytes == 0, build
    sd = jax.ShapeDtypeStruct
    cache = _gpu_specs()[1]
    kv = sd((64, 8, 128), jnp.bfloat16)
    builds = compile_triton(functools.partial(KV_WRITERS["triton"], interpret=False),
                            cache, cache, sd((), jnp.int32), kv, kv, sd((64,), jnp.int32))
    assert builds and builds[0].spill_bytes == 0
    from pallas_kernels.decode_attention_triton import decode_attention_triton

    for heads, kv_heads, head_dim, tokens in ((14, 2, 64, 256), (14, 2, 64, 16),
                                              (32, 8, 128, 256)):
        builds = compile_triton(functools.partial(decode_attention_triton, scale=0.1,
                                                  interpret=False, num_kv_heads=kv_heads),
                                *_decode_specs(heads, kv_heads, head_dim, tokens))
        assert builds and all(b.shared_bytes <= 227 * 1024 and b.spill_bytes == 0
                              for b in builds), builds


# --- the engine -----------------------------------------------------------------------------

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(30, 60)), [99]]


def _greedy(folder, backend, block_size, num_scheduler_steps=1):
    """Greedy tokens in float32 with exact matmuls (on a GPU too), so that only the
    attention backend differs between two runs."""
    from jaxvllm import LLM, SamplingParams

    with jax.default_matmul_precision("highest"):
        llm = LLM(str(folder), attention_backend=backend, block_size=block_size, dtype="float32",
                  max_num_seqs=3, max_num_batched_tokens=16, num_gpu_blocks_override=48,
                  max_model_len=96, num_scheduler_steps=num_scheduler_steps, precompile=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                            use_tqdm=False)
    assert (llm.llm_engine.runner.counters.multi_steps > 0) == (num_scheduler_steps > 1)
    return [o.outputs[0].token_ids for o in outs]


def test_engine_pallas_matches_reference(zoo):
    """Chunked prefills (16-token budget) and decodes of 3 requests at a time through the
    Pallas kernel in interpret mode: the same greedy tokens as the reference backend."""
    path = zoo.case("llama_gqa").path
    assert _greedy(path, "pallas", 16) == _greedy(path, "reference", 16)


def test_engine_kv_kernel_and_sliding_window(zoo):
    """The Pallas KV writer and a sliding-window model (window 12 < the 38-token request)."""
    path = zoo.case("mistral_sliding").path
    assert _greedy(path, "pallas+kv_triton", 8) == _greedy(path, "reference", 8)


@pytest.mark.parametrize("case,block_size", [("llama_gqa", 16), ("mistral_sliding", 8)])
def test_engine_multi_step_fused_decode(zoo, case, block_size):
    """Multi-step decode calls, whose layers run the fused decode kernel (KV write and
    attention in one): the same greedy tokens as single reference steps."""
    path = zoo.case(case).path
    assert _greedy(path, "pallas", block_size, num_scheduler_steps=4) \
        == _greedy(path, "reference", block_size)


needs_native_cpu = pytest.mark.skipif(
    ON_GPU or native_cpu.unavailable_reason() is not None,
    reason=f"the native CPU kernel: {native_cpu.unavailable_reason() or 'not on a GPU host'}")


@needs_native_cpu
def test_engine_native_cpu_matches_reference(zoo):
    """The CPU default: chunked prefills and decodes, GQA, and a sliding-window model."""
    path = zoo.case("llama_gqa").path
    assert _greedy(path, "cpu", 16) == _greedy(path, "reference", 16)
    path = zoo.case("mistral_sliding").path
    assert _greedy(path, "cpu", 8) == _greedy(path, "reference", 8)


@needs_native_cpu
def test_native_cpu_edge_cases():
    """Scores far below any usual value still make a softmax (the running maximum starts
    from the first block, not from a sentinel); a request whose seq_len is shorter than its
    query tokens attends with the tokens at positions >= 0 (as the reference); a window < 1
    and mismatched caches are errors; loading the kernel left float32 subnormals alone."""
    q, k, v, layer, qsl, seq_lens, tables = make_batch(MIXED, Shapes(), 0)
    big = q * 1e31  # scores ~ -1e32 .. 1e32: below the old -1e30 sentinel for many rows
    np.testing.assert_allclose(jitted("native_cpu")(big, k, v, layer, qsl, seq_lens, tables,
                                                    scale=1.0),
                               reference(big, k, v, layer, qsl, seq_lens, tables, scale=1.0),
                               atol=2e-5)
    short = seq_lens.at[1].set(5)  # 23 query tokens, 5 in the cache: 18 before position 0
    got = np.asarray(jitted("native_cpu")(q, k, v, layer, qsl, short, tables, scale=0.25))
    want = np.asarray(reference(q, k, v, layer, qsl, short, tables, scale=0.25))
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got[int(qsl[1]) + 18:int(qsl[2])]).max() > 0.1
    with pytest.raises(ValueError, match="sliding_window=0"):
        native_cpu.native_cpu_attention(q, k, v, layer, qsl, seq_lens, tables, scale=0.25,
                                         sliding_window=0)
    with pytest.raises(Exception, match="differ in dtype or shape"):
        jitted("native_cpu")(q, k, v[:, :-1], layer, qsl, seq_lens, tables, scale=0.25)
    assert np.float32(1e-39) / np.float32(2) > 0  # no flush-to-zero from loading the library


@needs_native_cpu
def test_native_cpu_kernel_reads_the_given_layer_and_bfloat16_cache():
    """A float32 query over a bfloat16 cache (kv_cache_dtype="bfloat16" on a float32 model),
    each layer of the stack giving its own answer."""
    q, k, v, _, qsl, seq_lens, tables = make_batch(MIXED, Shapes(), 0)
    k, v = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    outs = []
    for layer in range(LAYERS):
        args = (q, k, v, jnp.int32(layer), qsl, seq_lens, tables)
        outs.append(np.asarray(jitted("native_cpu")(*args, scale=0.25)))
        want = reference(q, k.astype(jnp.float32), v.astype(jnp.float32), *args[3:], scale=0.25)
        np.testing.assert_allclose(outs[-1], want, atol=2e-5)
    assert outs[0].dtype == np.float32 and np.abs(outs[0] - outs[1]).max() > 0.1


@pytest.mark.parametrize("how", ["turned_off", "no_compiler", "failing_compiler"])
def test_native_cpu_falls_back_to_xla(monkeypatch, tmp_path, how):
    """Where the kernel cannot be built, the CPU default is XLA's attention and asking for
    "cpu" is a ValueError that says why."""
    from jaxvllm.config import EngineConfig

    monkeypatch.setattr(native_cpu, "_loaded", {})  # as in a new process
    monkeypatch.setenv("JAXVLLM_CACHE_DIR", str(tmp_path))  # nothing built yet
    if how == "turned_off":
        monkeypatch.setenv("JAXVLLM_NATIVE_CPU", "0")
    elif how == "no_compiler":
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    else:
        monkeypatch.setenv("CXX", "false")  # runs and fails
    reason = native_cpu.unavailable_reason()
    assert reason is not None and {"turned_off": "JAXVLLM_NATIVE_CPU=0",
                                   "no_compiler": "could not be built",
                                   "failing_compiler": "failed"}[how] in reason
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))
    if how == "failing_compiler":  # remembered: a new process does not build again
        monkeypatch.setattr(native_cpu, "_loaded", {})
        monkeypatch.setattr(native_cpu, "build", lambda *a: pytest.fail("built again"))
        assert "an earlier try" in native_cpu.unavailable_reason()
    if not ON_GPU:
        assert EngineConfig().resolved_attention_backend() == "xla"
    with pytest.raises(ValueError, match="native CPU kernel is not available"):
        EngineConfig(attention_backend="cpu")
    with pytest.raises(ValueError, match="not available"):
        native_cpu.native_cpu_attention(*make_batch(MIXED, Shapes(), 0), scale=0.25)


# --- on a GPU (scripts/gpu_check.sh) --------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", CHECKED)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_compiled_matches_reference(name, dtype, head_dim):
    shapes = Shapes(tokens=2048, reqs=16, max_blocks=32, num_blocks=600, block_size=16,
                    heads=32, kv_heads=8, head_dim=head_dim, dtype=dtype)
    rng = np.random.default_rng(head_dim)
    for seed in range(3):
        reqs = [(int(rng.integers(q, 500)), int(q)) for q in rng.choice([1, 1, 1, 37, 128], 12)]
        check_variant(name, reqs, shapes, seed=seed)
        check_variant(name, reqs, shapes, seed=seed, window=100, soft_cap=30.0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["pallas", "pallas_triton+kv_triton"])
def test_gpu_engine_pallas_matches_reference(zoo, backend):
    path = zoo.case("llama_gqa").path
    assert _greedy(path, backend, 16) == _greedy(path, "reference", 16)


def test_benchmark_smoke(capsys):
    """benchmarks/kernels.py end to end at its smoke scale: timings, checks against the
    reference, baselines, KV writers, the final JSON line."""
    from benchmarks import kernels as bench

    result = bench.main(["--smoke", "--variants", "reference,triton", "--only", "mixed_smoke",
                         "--skip", "scan", "--iters", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["benchmark"] == "kernels"
    shape = result["shapes"]["mixed_smoke"]
    assert set(shape["results"]) >= {"reference", "triton"} and not shape["errors"]
    assert shape["best_kernel"] == "triton" and "triton" in shape["separate_parts_ms"]
    assert set(result["kv_write"]["tokens_16"]) == set(KV_WRITERS)
