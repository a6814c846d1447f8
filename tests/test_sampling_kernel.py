"""The sampler's Pallas kernels (pallas_kernels/sampling.py), interpreted on the CPU: the
tokens of the XLA sampler for greedy, temperature, min-p and cutoff rows, across splits and
ragged vocabularies; and `sample(kernel=True)` against `sample()`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvllm.engine.sampler import (SAMPLING_EPS, RowSpec, SamplerPaths,
                                    build_sampling_metadata, sample)
from pallas_kernels import sampling

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

GREEDY = functools.partial(sampling.sample_tokens, greedy_below=SAMPLING_EPS)
REFERENCE = functools.partial(sampling.reference, greedy_below=SAMPLING_EPS)


def _rows(rng, rows: int, vocab: int, dtype, scale: float = 3.0):
    logits = jnp.asarray(rng.normal(size=(rows, vocab)) * scale, dtype)
    temperature = np.where(np.arange(rows) % 3 == 0, 0.0, rng.uniform(0.3, 1.5, rows))
    min_p = np.where(np.arange(rows) % 4 == 1, 0.2, 0.0)
    threshold = np.where(np.arange(rows) % 5 == 2, 1.0, -np.inf)  # a cutoff on some rows
    uniforms = rng.uniform(0, 1, (rows, 2))
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return logits, f32(temperature), f32(min_p), f32(threshold), f32(uniforms)


@pytest.mark.parametrize("rows, vocab, dtype, num_splits", [
    (5, 1000, jnp.float32, None),  # fewer tokens than a chunk
    (16, 6000, jnp.float32, None),  # ragged last split
    (7, 6000, jnp.bfloat16, 2),
    (3, 4096, jnp.float32, 1),  # one program a row
    (3, 5000, jnp.float32, 64),  # more splits asked for than chunks: as many as chunks
])
def test_kernels_draw_the_samplers_tokens(rows, vocab, dtype, num_splits):
    rng = np.random.default_rng(rows * vocab)
    args = _rows(rng, rows, vocab, dtype)
    got = np.asarray(GREEDY(*args, num_splits=num_splits))
    want = np.asarray(REFERENCE(*args))
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32
    # the draws are not all the argmax: sampling happened
    assert (got != np.asarray(jnp.argmax(args[0].astype(jnp.float32), -1))).any()


def test_greedy_takes_the_first_of_equal_maxima_across_splits():
    logits = np.zeros((2, 5000), np.float32)
    logits[0, [4500, 100, 2600]] = 7.0  # three splits hold the maximum
    logits[1, :] = -np.inf  # nothing finite: token 0, as argmax
    zeros = jnp.zeros((2,), jnp.float32)
    got = GREEDY(jnp.asarray(logits), zeros, zeros, jnp.full((2,), -jnp.inf),
                 jnp.full((2, 2), 0.5), num_splits=3)
    assert list(np.asarray(got)) == [100, 0]


def test_infinite_logits_and_extreme_draws():
    """+inf logits (an infinite bias) are drawn alone; u = 0 and u -> 1 stay on kept tokens."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 3000)).astype(np.float32)
    logits[0, [17, 2900]] = np.inf
    logits[1:, :] = -np.inf
    logits[1:, [5, 700, 2999]] = [1.0, 2.0, 3.0]
    temperature = jnp.ones((4,), jnp.float32)
    uniforms = jnp.asarray([[0.3, 0.9], [0.0, 0.0], [np.nextafter(1, 0)] * 2, [0.5, 0.5]],
                           jnp.float32)
    args = (jnp.asarray(logits), temperature, jnp.zeros((4,), jnp.float32),
            jnp.full((4,), -jnp.inf), uniforms)
    got = np.asarray(GREEDY(*args))
    np.testing.assert_array_equal(got, np.asarray(REFERENCE(*args)))
    assert got[0] in (17, 2900) and set(got[1:]) <= {5, 700, 2999}


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=jnp.ones((3,))), "temperature"),
    (dict(uniforms=jnp.ones((4, 3))), "uniforms"),
    (dict(block=100), "block=100"),
    (dict(num_splits=-1), "num_splits"),
])
def test_bad_arguments_raise_value_error(kw, match):
    rows = 4
    args = dict(logits=jnp.zeros((rows, 512)), temperature=jnp.ones((rows,)),
                min_p=jnp.zeros((rows,)), threshold=jnp.zeros((rows,)),
                uniforms=jnp.zeros((rows, 2)))
    args |= {k: v for k, v in kw.items() if k in args}
    with pytest.raises(ValueError, match=match):
        GREEDY(**args, **{k: v for k, v in kw.items() if k not in args})


def test_triton_compiles_to_cubin():
    """Triton IR -> cubin for sm_90 at a Qwen2.5 vocabulary, 16 and 256 rows: no spills."""
    pytest.importorskip("triton")
    from pallas_kernels.gpu_lowering import compile_triton

    sd = jax.ShapeDtypeStruct
    for rows in (16, 256):
        fn = functools.partial(GREEDY, interpret=False)
        builds = compile_triton(lambda *a: fn(*a), sd((rows, 151936), jnp.bfloat16),
                                *[sd((rows,), jnp.float32)] * 3, sd((rows, 2), jnp.float32))
        assert [b.name for b in builds] == ["sample_maxima", "sample_block_sums",
                                            "sample_pick"]
        assert all(b.spill_bytes == 0 for b in builds), builds


VOCAB = 3000
BATCHES = {
    "plain": [RowSpec(temperature=0.8, seed=5), RowSpec(temperature=0.0),
              RowSpec(temperature=1.0, seed=9, min_p=0.05)],
    "top-k/top-p": [RowSpec(temperature=1.0, top_p=0.7, seed=1), RowSpec(temperature=0.0),
                    RowSpec(temperature=0.7, top_k=20, seed=3)],
    "penalties and bias": [RowSpec(temperature=0.9, seed=4, repetition_penalty=1.3,
                                   token_ids=[7, 8, 1200], num_prompt=1,
                                   logit_bias={11: 5.0}),
                           RowSpec(temperature=0.0, presence_penalty=0.5, token_ids=[1, 2],
                                   num_prompt=1)],
}


@pytest.mark.parametrize("name", sorted(BATCHES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sample_with_the_kernels_gives_the_xla_samplers_tokens(name, dtype):
    rows = BATCHES[name]
    meta, num_logprobs = build_sampling_metadata(rows, VOCAB, pad_rows_to=4)
    paths = SamplerPaths.of(jax.tree.map(np.asarray, meta))
    assert paths.random
    run = jax.jit(sample, static_argnames=("num_logprobs", "paths", "kernel"))
    for seed in range(3):
        logits = jnp.asarray(np.random.default_rng(seed).normal(size=(4, VOCAB)) * 2, dtype)
        want = run(logits, meta, num_logprobs=2, paths=paths)
        got = run(logits, meta, num_logprobs=2, paths=paths, kernel=True)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hlo = str(jax.make_jaxpr(functools.partial(sample, paths=paths, kernel=True))(logits, meta))
    assert hlo.count("pallas_call") == 3


def test_a_cutoff_a_few_ulps_off_keeps_its_token_and_an_empty_row_draws_greedy():
    """XLA's top-k/top-p cutoff comes from XLA's division; a GPU's differs in the last bits.
    A cutoff one ulp above the top token's scaled logit (top-k 1 as another division would
    round it) still keeps that token; a row that keeps nothing gets its greedy token, not 0."""
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(3, 3000)) * 3, jnp.float32)
    temperature = jnp.asarray([0.7, 0.7, 1.3], jnp.float32)
    top = np.asarray(jnp.max(logits, -1) / temperature)
    threshold = np.nextafter(top, np.inf).astype(np.float32)
    threshold[2] = 1e30  # above every logit
    argmax = np.asarray(jnp.argmax(logits, -1))
    got = GREEDY(logits, temperature, jnp.zeros((3,), jnp.float32), jnp.asarray(threshold),
                 jnp.full((3, 2), 0.3, jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), argmax)
    # a cutoff one ulp above the second token (top-k 2 as another division would round it)
    # keeps both: the draw at u -> 1 takes the first kept token, the second one's
    row = np.full((1, 3000), -30.0, np.float32)
    row[0, [10, 20]] = [4.99, 5.0]
    cutoff = np.nextafter(np.float32(4.99) / np.float32(0.7), np.float32(np.inf))
    one = lambda a: jnp.asarray([a], jnp.float32)
    got = GREEDY(jnp.asarray(row), one(0.7), one(0.0), one(cutoff),
                 jnp.asarray([[0.5, np.nextafter(np.float32(1), np.float32(0))]]))
    assert int(got[0]) == 10
