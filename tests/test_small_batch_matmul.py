"""The small-batch projection kernels (pallas_kernels/small_batch_matmul.py): their results
against the jnp contract in interpret mode, their shape errors, and their GPU lowering and
Triton build for an H100 on this machine."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import small_batch_matmul as sbm


@pytest.fixture(autouse=True)
def _exact_float32_references():
    """The kernels multiply float32 operands exactly (Precision.HIGHEST); XLA's dots on a GPU
    default to TF32, ~1e-3 off at these sizes: the references here multiply exactly too."""
    with jax.default_matmul_precision("highest"):
        yield


def _operands(rows, k, n, *, norm=False, bias=False, residual=False, gated=False,
              dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) * 0.1, dtype)
    kw = {}
    if norm:
        kw |= {"norm_scale": jnp.asarray(1 + 0.1 * rng.standard_normal(k), dtype),
               "norm_eps": 1e-5}
    if bias:
        kw["bias"] = jnp.asarray(rng.standard_normal(n), dtype)
    if gated:
        kw["gated_act"] = jax.nn.silu
    if residual:
        kw["residual"] = jnp.asarray(rng.standard_normal((rows, n // 2 if gated else n)), dtype)
    return x, w, kw


CASES = [  # rows, k, n, options
    (16, 64, 96, dict(norm=True, bias=True)),  # the QKV projection
    (3, 128, 64, dict(residual=True)),  # O or down: rows padded to 16 inside
    (16, 96, 64, dict(norm=True, gated=True, bias=True)),  # gate/up; K not a power of two
    (20, 32, 48, dict(residual=True, bias=True)),  # 20 rows padded to 32
    (64, 48, 32, dict(norm=True)),  # the most rows it takes
]


@pytest.mark.parametrize("rows, k, n, options", CASES)
def test_matches_the_reference_in_float32(rows, k, n, options):
    x, w, kw = _operands(rows, k, n, **options)
    got = sbm.fused_matmul(x, w, **kw)
    ref = sbm.reference(x, w, **kw)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, k, n, options", CASES[:3])
def test_matches_the_reference_in_bfloat16(rows, k, n, options):
    x, w, kw = _operands(rows, k, n, dtype=jnp.bfloat16, **options)
    got = np.asarray(sbm.fused_matmul(x, w, **kw), np.float32)
    ref = np.asarray(sbm.reference(x, w, **kw), np.float32)
    # a bfloat16 ulp of the largest value, for sums taken in another order
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2 ** -7 * np.abs(ref).max())


@pytest.mark.parametrize("block_k, block_n", [(16, 16), (32, 32), (128, 16), (64, 64)])
def test_tilings_agree(block_k, block_n):
    """Any power-of-two K step (ragged last steps included) and column tile: one result."""
    x, w, kw = _operands(16, 96, 128, norm=True, bias=True, residual=True)
    got = sbm.fused_matmul(x, w, block_k=block_k, block_n=block_n, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(sbm.reference(x, w, **kw)),
                               rtol=1e-5, atol=1e-5)


def test_the_norm_bias_and_gating_are_applied():
    """Leaving out the norm, the bias or the activation gives another result: the kernel
    applies each."""
    x, w, kw = _operands(16, 64, 64, norm=True, bias=True, gated=True)
    got = np.asarray(sbm.fused_matmul(x, w, **kw))
    np.testing.assert_allclose(got, np.asarray(sbm.reference(x, w, **kw)), rtol=1e-5,
                               atol=1e-5)
    for change in ({"norm_scale": None}, {"bias": None}, {"gated_act": lambda g: g}):
        other = np.asarray(sbm.reference(x, w, **(kw | change)))
        assert other.shape == got.shape and not np.allclose(got, other, atol=1e-3), change


@pytest.mark.parametrize("x_shape, w_shape, kw, match", [
    ((65, 64), (64, 32), {}, "at most 64 rows"),
    ((16, 40), (40, 32), {}, "K a multiple of 16"),
    ((16, 64), (64, 24), {}, "16-column"),
    ((16, 64), (64, 32), {"splits": 0}, "splits >= 1"),
    ((16, 64), (64, 32), {"block_k": 48}, "power-of-two block_k"),
    ((16, 64), (32, 32), {}, "do not multiply"),
    ((16, 64), (64, 33), {"gated_act": jax.nn.silu}, "gate and up halves"),
    ((16, 64), (64, 32), {"bias": jnp.zeros(16)}, r"bias \(16,\)"),
    ((16, 64), (64, 32), {"norm_scale": jnp.ones(32)}, r"norm_scale \(32,\)"),
    ((16, 64), (64, 32), {"residual": jnp.zeros((8, 32))}, r"residual \(8, 32\)"),
])
def test_bad_shapes_raise_value_error(x_shape, w_shape, kw, match):
    with pytest.raises(ValueError, match=match):
        sbm.fused_matmul(jnp.zeros(x_shape), jnp.zeros(w_shape), **kw)


def _layer_specs(rows=16, hidden=896, qkv=1152, inter=4864, dtype=jnp.bfloat16):
    """A Qwen2.5-0.5B decoder layer's projections."""
    sd = jax.ShapeDtypeStruct
    bf = dtype
    return (sd((rows, hidden), bf), sd((hidden, qkv), bf), sd((qkv,), bf), sd((hidden,), bf),
            sd((hidden, hidden), bf), sd((hidden, 2 * inter), bf), sd((inter, hidden), bf),
            sd((rows,), jnp.int32), sd((32,), jnp.float32))


def _layer(x, w_qkv, b_qkv, scale, w_o, w_gate_up, w_down, positions, inv_freq):
    """The layer's projections as the model runs them: one counters array passed along."""
    fused = functools.partial(sbm.fused_matmul, interpret=False)
    counters = sbm.split_counters(w_gate_up.shape[1])
    qkv, counters = fused(x, w_qkv, bias=b_qkv, norm_scale=scale, rope_positions=positions,
                          rope_inv_freq=inv_freq, rope_columns=w_qkv.shape[1] - 128,
                          counters=counters)
    x, counters = fused(qkv[:, :x.shape[1]], w_o, residual=x, counters=counters)
    up, counters = fused(x, w_gate_up, norm_scale=scale, gated_act=jax.nn.silu,
                         counters=counters)
    return fused(up, w_down, residual=x, counters=counters)


def test_lowers_for_an_h100():
    """Qwen2.5-0.5B's QKV, O and down projections have too few column tiles to fill an H100
    (18, 14 and 14 of them): each runs split over K in one kernel, whose last program of a
    tile to finish (an atomic count) adds the splits up; the gate/up projection has 152
    tiles of 32 columns: one kernel, no count."""
    from pallas_kernels.gpu_lowering import lower_for_gpu

    text = lower_for_gpu(functools.partial(_layer), *_layer_specs())
    assert text.count("__gpu$xla.gpu.triton") == 4
    for name in ("n32_k128_s7", "n64_k128_s7", "n32_k256", "n64_k256_s19"):
        assert f"small_batch_matmul_{name}" in text, name
    assert "sum_n" not in text
    # the split kernels' counts, updated in place (aliased)
    assert text.count("output_operand_aliases") == 3


@pytest.mark.parametrize("k, n_out, rope_head_dim, want", [
    (896, 1152, 64, (32, 7)),  # QKV: 18 column tiles (two a program, for RoPE)
    (896, 896, 0, (64, 7)),  # O: 14 column tiles, splits of 128
    (4864, 896, 0, (64, 19)),  # down: 14 column tiles, 264 programs
    (896, 4864, 0, (32, 1)),  # gate/up (4,864 outputs): 152 column tiles of 32, no split
    (896, 16384, 0, (64, 1)),  # 256 column tiles of 64: no split
    (896, 2048, 0, (64, 7)),  # 16-column tiles would be enough, but too narrow to go unsplit
])
def test_default_tiling(k, n_out, rope_head_dim, want):
    assert sbm.default_tiling(k, n_out, rope_head_dim) == want


def test_resolve_tiling():
    """What a call runs: (block_n, block_k, K a split, splits, programs), as the kernel
    names in test_lowers_for_an_h100 show it."""
    assert sbm.resolve_tiling(16, 4864, 896) == (64, 256, 256, 19, 266)  # down
    assert sbm.resolve_tiling(16, 896, 4864, weight_tiles=2) == (32, 256, 1024, 1, 152)
    assert sbm.resolve_tiling(16, 4864, 896, block_n=32, block_k=64, splits=3) == (
        32, 64, 1664, 3, 84)
    assert sbm.default_block_n(24) == 0 and sbm.default_block_n(128, 32) == 16
    assert sbm.default_tiling(64, 24) == (0, 1)


@pytest.mark.parametrize("k, splits, block_k, want", [
    (4864, 19, 512, (256, 256, 19)),
    (896, 4, 128, (128, 256, 4)),  # two steps a split
    (80, 2, 512, (64, 64, 2)),  # the last split reaches past K
    (64, 5, 512, (16, 16, 4)),  # no empty split: fewer than asked
    (64, 1, 512, (64, 64, 1)),
])
def test_split_tiling(k, splits, block_k, want):
    assert sbm.split_tiling(k, splits, block_k) == want


@pytest.mark.parametrize("rows, k, n, options, splits", [
    (16, 80, 64, dict(norm=True, bias=True), 2),  # K 80 in splits of 64: the last is ragged
    (3, 96, 64, dict(residual=True, bias=True), 3),
    (16, 64, 96, dict(norm=True, gated=True, bias=True), 4),
    (20, 128, 32, dict(norm=True, residual=True), 8),
])
def test_split_k_matches_the_reference(rows, k, n, options, splits):
    """K split over programs, their sums added up with the epilogue by the last to finish;
    the counts it was given come back zero, ready for the next kernel."""
    x, w, kw = _operands(rows, k, n, **options)
    want = np.asarray(sbm.reference(x, w, **kw))
    got = sbm.fused_matmul(x, w, splits=splits, **kw)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    counters = sbm.split_counters(n)
    for _ in range(2):
        again, counters = sbm.fused_matmul(x, w, splits=splits, counters=counters, **kw)
        np.testing.assert_array_equal(np.asarray(again), np.asarray(got))
        np.testing.assert_array_equal(np.asarray(counters), 0)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (the "
                    "interpreter runs the programs in order: no race to see)")
def test_split_sums_are_the_same_in_every_run():
    """Whichever split of a tile finishes last adds all of them up in split order: run after
    run the sums are bitwise the same. The programs race on a GPU (here the down projection
    of Qwen2.5-0.5B at batch 1, 19 splits, a few hundred runs), and a partial sum missed or
    read stale would show as a difference."""
    runs, (rows, k, n) = 400, (1, 4864, 896)
    x, w, kw = _operands(rows, k, n, residual=True, dtype=jnp.bfloat16)
    project = functools.partial(sbm.fused_matmul, w=w, **kw)
    first, counters = project(x, counters=sbm.split_counters(n))

    @jax.jit
    def worst_difference(counters):
        def run(_, carry):
            counters, worst = carry
            y, counters = project(x, counters=counters)  # a new count each run: not hoisted
            return counters, jnp.maximum(worst, jnp.max(jnp.abs(y - first)))

        return jax.lax.fori_loop(0, runs, run, (counters, jnp.zeros((), first.dtype)))

    counters, worst = worst_difference(counters)
    assert float(worst) == 0.0
    np.testing.assert_array_equal(np.asarray(counters), 0)


def test_tilings_from_the_environment_replace_the_defaults(monkeypatch):
    """JAXVLLM_SMALL_BATCH_TILINGS, by shape, for tuning runs: the tiling runs, the result
    is the same; a shape not named keeps its default; a malformed value is a ValueError,
    and so is (as fused_matmul checks) a tile that does not divide the output."""
    monkeypatch.setenv(sbm.TILINGS_ENV, '{"4864x896": [32, 4], "96x64": [16, 3]}')
    assert sbm.resolve_tiling(16, 4864, 896) == (32, 512, 1536, 4, 112)
    assert sbm.resolve_tiling(16, 896, 4864, weight_tiles=2) == (32, 256, 1024, 1, 152)
    x, w, kw = _operands(3, 96, 64, residual=True)
    assert sbm.resolve_tiling(3, 96, 64, itemsize=4)[3] == 3
    np.testing.assert_allclose(np.asarray(sbm.fused_matmul(x, w, **kw)),
                               np.asarray(sbm.reference(x, w, **kw)), rtol=1e-5, atol=1e-5)
    for bad in ('{"4864x896": 64}', '{"4864-896": [64, 2]}', "64,2"):
        monkeypatch.setenv(sbm.TILINGS_ENV, bad)
        with pytest.raises(ValueError, match="K x N"):
            sbm.resolve_tiling(16, 4864, 896)
    monkeypatch.setenv(sbm.TILINGS_ENV, '{"96x64": [48, 1]}')
    with pytest.raises(ValueError, match="48-column"):
        sbm.fused_matmul(x, w, **kw)


def test_a_row_count_limits_the_split_sums_to_the_rows_that_matter():
    """16 rows, 3 of them real (a decode step's requests, known at run time): those equal
    the reference, the rest come out as if their products were zero (residual alone); a
    row count that is no integer scalar is a ValueError."""
    x, w, kw = _operands(16, 128, 64, residual=True)
    got = jax.jit(functools.partial(sbm.fused_matmul, block_n=16, splits=2, **kw))(
        x, w, row_count=jnp.int32(3))
    np.testing.assert_allclose(np.asarray(got[:3]), np.asarray(sbm.reference(x, w, **kw))[:3],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[3:]), np.asarray(kw["residual"][3:]), rtol=1e-6)
    for bad in (jnp.ones(2, jnp.int32), jnp.float32(3)):
        with pytest.raises(ValueError, match="row_count"):
            sbm.fused_matmul(x, w, splits=2, row_count=bad, **kw)


@pytest.mark.parametrize("counters", [jnp.zeros(3, jnp.int32), jnp.zeros(8, jnp.float32),
                                      jnp.zeros((2, 4), jnp.int32)])
def test_counters_of_the_wrong_kind_raise_value_error(counters):
    x, w, kw = _operands(16, 128, 64)
    with pytest.raises(ValueError, match="split_counters"):
        sbm.fused_matmul(x, w, block_n=16, splits=2, counters=counters, **kw)


def test_triton_compiles_to_cubin():
    """Triton IR -> PTX -> cubin for sm_90 with the triton package, within H100 limits."""
    pytest.importorskip("triton")
    from pallas_kernels.gpu_lowering import compile_triton

    # 40 rows run padded to 64 (Triton's shapes are powers of two); float32 tiles take twice
    # the shared memory and more registers
    for rows, dtype in ((16, jnp.bfloat16), (40, jnp.float32)):
        # a new callable: jax would reuse an earlier lowering of the same one
        builds = compile_triton(functools.partial(_layer), *_layer_specs(rows, dtype=dtype))
        assert len(builds) == 4  # four projections, three of them split over K
        assert all(b.shared_bytes <= 227 * 1024 and b.spill_bytes == 0 for b in builds), builds


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows, k, heads, kv_heads, head_dim, block_n", [
    (16, 64, 4, 2, 32, 16), (5, 96, 2, 1, 64, 16), (16, 64, 2, 1, 64, 32)])
def test_rotary_embeddings_match_the_reference(dtype, rows, k, heads, kv_heads, head_dim,
                                                block_n):
    """RoPE in the QKV kernel: the q and k heads rotated by position, v left alone."""
    n = (heads + 2 * kv_heads) * head_dim
    x, w, kw = _operands(rows, k, n, norm=True, bias=True, dtype=dtype)
    rng = np.random.default_rng(1)
    kw |= {"rope_positions": jnp.asarray(rng.integers(0, 500, rows), jnp.int32),
           "rope_inv_freq": jnp.asarray(1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim),
                                        jnp.float32),
           "rope_columns": (heads + kv_heads) * head_dim}
    got = np.asarray(sbm.fused_matmul(x, w, block_n=block_n, **kw), np.float32)
    ref = np.asarray(sbm.reference(x, w, **kw), np.float32)
    split = np.asarray(sbm.fused_matmul(x, w, block_n=block_n, splits=2, **kw), np.float32)
    np.testing.assert_allclose(split, got, rtol=1e-5, atol=1e-5 if dtype == jnp.float32 else
                               2 ** -7 * np.abs(ref).max())
    tol = 1e-5 if dtype == jnp.float32 else 2 ** -7 * np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=1e-5 if dtype == jnp.float32 else 2e-2, atol=tol)
    unrotated = np.asarray(sbm.reference(x, w, bias=kw["bias"], norm_scale=kw["norm_scale"],
                                         norm_eps=kw["norm_eps"]), np.float32)
    v = slice(kw["rope_columns"], n)
    np.testing.assert_array_equal(got[:, v], unrotated[:, v])
    assert not np.allclose(got[:, :kw["rope_columns"]], unrotated[:, :kw["rope_columns"]],
                           atol=1e-2)


@pytest.mark.parametrize("kw, match", [
    ({"rope_columns": 64, "gated_act": jax.nn.silu}, "RoPE takes no gate"),
    ({"rope_columns": 48}, "whole heads"),  # not a multiple of the head dim (32)
    ({"rope_columns": 64, "block_n": 32}, "each half of a head"),  # half a head is 16
    ({"rope_columns": 64, "rope_positions": jnp.zeros(3, jnp.int32)}, "a position a row"),
])
def test_bad_rotary_arguments_raise_value_error(kw, match):
    kw = {"rope_positions": jnp.zeros(16, jnp.int32), "rope_inv_freq": jnp.ones(16)} | kw
    with pytest.raises(ValueError, match=match):
        sbm.fused_matmul(jnp.zeros((16, 64)), jnp.zeros((64, 128)), **kw)
