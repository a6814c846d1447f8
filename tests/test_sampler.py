"""On-device sampler: every step against a numpy implementation of vLLM's formulas, seeded
reproducibility across batch compositions, filters never leaking, logprobs from raw logits.

Metadata is re-padded to fixed widths here so that the whole file compiles only a handful
of programs (the builder's own power-of-two widths are tested separately).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvllm.engine.sampler import (VOCAB_BLOCK, RowSpec, SamplerPaths, SamplingMetadata,
                                    apply_penalties_and_bias, argmax_tokens,
                                    banned_bad_word_tokens, build_sampling_metadata,
                                    inverse_cdf_tokens, sample)
from jaxvllm.sampling_params import SamplingParams

V = 64
WIDTHS = {"token_ids": 32, "bias_ids": 8, "bias_values": 8, "allowed_ids": 16, "stop_ids": 4,
          "bad_word_ids": 4}

_sample = jax.jit(sample, static_argnames="num_logprobs")
_process = jax.jit(apply_penalties_and_bias)


def make(rows, num_rows=None) -> SamplingMetadata:
    meta, _ = build_sampling_metadata(rows, V, pad_rows_to=num_rows, device_put=False)
    fields = {}
    for f in dataclasses.fields(meta):
        a = getattr(meta, f.name)
        if f.name in WIDTHS:
            width = WIDTHS[f.name]
            assert a.shape[1] <= width
            fill = 0.0 if f.name == "bias_values" else -1
            a = np.concatenate([a, np.full((a.shape[0], width - a.shape[1]), fill, a.dtype)], 1)
        fields[f.name] = jnp.asarray(a)
    return SamplingMetadata(**fields)


def rand_logits(rng, rows, scale=2.0):
    return (scale * rng.standard_normal((rows, V))).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# numpy references (vLLM's formulas)
# ---------------------------------------------------------------------------------------------


def np_process(logits: np.ndarray, s: RowSpec) -> np.ndarray:
    x = logits.astype(np.float32).copy()
    if s.allowed_token_ids:
        banned = np.ones(V, bool)
        banned[list(s.allowed_token_ids)] = False
        x[banned] = -np.inf
    x[list(s.bad_word_ids)] = -np.inf
    if s.suppress_stop:
        x[list(s.stop_ids)] = -np.inf
    for tok, b in (s.logit_bias or {}).items():
        x[tok] += np.float32(b)
    ids = np.asarray(s.token_ids, np.int64)
    counts = np.bincount(ids[s.num_prompt:], minlength=V)
    seen = counts > 0
    seen[ids[:s.num_prompt]] = True
    rep = np.where(seen, np.float32(s.repetition_penalty), np.float32(1.0))
    x = np.where(x > 0, x / rep, x * rep)
    x = x - np.float32(s.frequency_penalty) * counts.astype(np.float32)
    x = x - np.float32(s.presence_penalty) * (counts > 0).astype(np.float32)
    return x.astype(np.float32)


def np_softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


def np_kept(processed: np.ndarray, s: RowSpec) -> np.ndarray:
    """The tokens vLLM's temperature -> min_p -> top_k/top_p pipeline leaves, as a mask."""
    x = processed.astype(np.float64) / s.temperature
    probs = np_softmax(x)
    x = np.where(probs < s.min_p * probs.max(), -np.inf, x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    if 0 < s.top_k < V:
        xs = np.where(xs < xs[V - s.top_k], -np.inf, xs)
    cum = np.cumsum(np_softmax(xs))
    drop = cum <= 1 - s.top_p
    drop[-1] = False
    xs = np.where(drop, -np.inf, xs)
    keep = np.zeros(V, bool)
    keep[order] = np.isfinite(xs)
    return keep


def np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# processing
# ---------------------------------------------------------------------------------------------


def test_penalties_bias_and_masks_match_numpy():
    rng = np.random.default_rng(0)
    rows = [
        RowSpec(repetition_penalty=1.3, token_ids=[3, 4, 4, 9, 3, 3, 10], num_prompt=4),
        RowSpec(frequency_penalty=0.7, presence_penalty=-0.4,
                token_ids=[1, 2, 5, 5, 5, 6, 1], num_prompt=2),
        RowSpec(repetition_penalty=0.8, frequency_penalty=-1.5, presence_penalty=1.9,
                token_ids=[7] * 3 + [8, 7, 7, 63, 0], num_prompt=3,
                logit_bias={7: 3.0, 0: -2.5, 40: 10.0}),
        RowSpec(logit_bias={5: 1.25, 6: -100.0}, allowed_token_ids=[5, 6, 7, 8, 30],
                bad_word_ids=[7], stop_ids=[8], suppress_stop=True),
        RowSpec(stop_ids=[2, 8], suppress_stop=False, bad_word_ids=[0, 63],
                repetition_penalty=2.0, token_ids=[2, 8], num_prompt=2),
        RowSpec(),
    ]
    logits = rand_logits(rng, 8)
    out = np.asarray(_process(jnp.asarray(logits), make(rows, 8)))
    for i, s in enumerate(rows):
        ref = np_process(logits[i], s)
        np.testing.assert_array_equal(np.isinf(out[i]), np.isinf(ref), err_msg=f"row {i}")
        np.testing.assert_allclose(out[i], ref, rtol=1e-6, atol=1e-6, err_msg=f"row {i}")
    np.testing.assert_array_equal(out[5:], logits[5:])  # neutral and padded rows untouched


def test_bias_is_added_before_the_repetition_penalty():
    # vLLM's order: logit_bias, then penalties; 2 + 2 = 4, divided by 2 -> 2 (not 1 + 2 = 3)
    s = RowSpec(repetition_penalty=2.0, token_ids=[1], num_prompt=1, logit_bias={1: 2.0})
    logits = np.zeros((8, V), np.float32)
    logits[0, 1] = 2.0
    out = np.asarray(_process(jnp.asarray(logits), make([s], 8)))
    assert out[0, 1] == pytest.approx(2.0)


def test_bad_words_helper():
    bad = [[5], [1, 2, 3], [2, 9], [4, 4]]
    assert banned_bad_word_tokens(bad, []) == [5]
    assert banned_bad_word_tokens(bad, [7, 1, 2]) == [5, 3, 9]
    assert banned_bad_word_tokens(bad, [2]) == [5, 9]
    assert banned_bad_word_tokens(bad, [4]) == [5, 4]
    assert banned_bad_word_tokens(None, [1]) == []


# ---------------------------------------------------------------------------------------------
# greedy
# ---------------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax_of_processed_logits():
    rng = np.random.default_rng(1)
    rows = [RowSpec(temperature=0.0, seed=i, step_position=i) for i in range(4)]
    rows += [RowSpec(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5,
                     token_ids=list(rng.integers(0, V, 12)), num_prompt=6,
                     logit_bias={int(rng.integers(V)): 1.0}) for _ in range(4)]
    logits = rand_logits(rng, 8)
    tokens = np.asarray(_sample(jnp.asarray(logits), make(rows, 8)).token_ids)
    expected = [int(np.argmax(np_process(logits[i], s))) for i, s in enumerate(rows)]
    assert tokens.tolist() == expected
    assert tokens[:4].tolist() == np.argmax(logits[:4], -1).tolist()


def test_top_k_1_equals_greedy():
    rng = np.random.default_rng(2)
    logits = rand_logits(rng, 16)
    rows = [RowSpec(temperature=1.7, top_k=1, seed=100 + i, step_position=3 * i)
            for i in range(16)]
    tokens = np.asarray(_sample(jnp.asarray(logits), make(rows, 16)).token_ids)
    assert tokens.tolist() == np.argmax(logits, -1).tolist()


# ---------------------------------------------------------------------------------------------
# blocked argmax and inverse CDF over a vocabulary of several blocks, not a multiple of one
# ---------------------------------------------------------------------------------------------

WIDE_V = 3 * VOCAB_BLOCK + 37


def test_blocked_argmax_is_numpy_argmax_first_of_ties():
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((6, WIDE_V)).astype(np.float32)
    logits[1, [5, VOCAB_BLOCK + 3, WIDE_V - 1]] = 9.0  # ties across blocks: the first wins
    logits[2, :] = -np.inf  # nothing allowed: token 0, as np.argmax
    logits[3, WIDE_V - 1] = 50.0  # in the padded last block
    logits[4, :] = 1.5  # all equal
    got = np.asarray(jax.jit(argmax_tokens)(jnp.asarray(logits)))
    assert got.tolist() == np.argmax(logits, -1).tolist()
    assert got[1] == 5 and got[3] == WIDE_V - 1


def _np_inverse_cdf(weights, u):
    """numpy, float64: the first index whose running share of the total reaches 1 - u, and
    how close the draw lies to a boundary of the running shares."""
    cdf = np.cumsum(weights) / weights.sum()
    return int(np.searchsorted(cdf, 1.0 - u, side="left")), float(np.min(np.abs(cdf - (1 - u))))


def test_inverse_cdf_picks_the_block_then_the_token_whose_mass_covers_each_draw():
    rng = np.random.default_rng(12)
    rows = 64
    logits = (2.0 * rng.standard_normal((rows, WIDE_V))).astype(np.float32)
    logits[:, rng.choice(WIDE_V, 300, replace=False)] = -np.inf
    uniforms = rng.random((rows, 2)).astype(np.float32)
    got = np.asarray(jax.jit(inverse_cdf_tokens)(jnp.asarray(logits), jnp.asarray(uniforms)))

    x = logits.astype(np.float64)
    weights = np.exp(x - x.max(-1, keepdims=True))
    weights = np.pad(weights, ((0, 0), (0, -WIDE_V % VOCAB_BLOCK)))
    weights = weights.reshape(rows, -1, VOCAB_BLOCK)
    expected, near = [], []
    for w, (u1, u2) in zip(weights, uniforms.astype(np.float64)):
        block, gap1 = _np_inverse_cdf(w.sum(-1), u1)
        within, gap2 = _np_inverse_cdf(w[block], u2)
        expected.append(block * VOCAB_BLOCK + within)
        # float32 sums can only disagree with float64 where a draw lies on a boundary
        near.append(min(gap1, gap2) < 1e-5)
    assert sum(near) < 4
    assert [g for g, n in zip(got, near) if not n] == [e for e, n in zip(expected, near) if not n]
    assert np.all(np.isfinite(logits[np.arange(rows), got]))


def test_inverse_cdf_never_draws_a_masked_token_at_the_extremes():
    """u -> 0 takes the row's last allowed token, u -> 1 its first, even where the float32
    block sums and the in-block running sum round differently."""
    rng = np.random.default_rng(14)
    rows = 256
    logits = np.full((rows, WIDE_V), -np.inf, np.float32)
    for r in range(rows):
        lo = int(rng.integers(0, 4)) * VOCAB_BLOCK
        block = np.arange(lo, min(WIDE_V, lo + VOCAB_BLOCK))
        some = rng.choice(block, min(40, len(block)), replace=False)
        logits[r, some] = 3 * rng.standard_normal(len(some))
        logits[r, rng.choice(max(lo, 1), 5)] = rng.standard_normal(5)  # earlier blocks too
    logits[0, :] = -np.inf
    logits[0, [VOCAB_BLOCK, VOCAB_BLOCK + 1]] = [3.0, -200.0]  # a weight that underflows to 0
    allowed = np.isfinite(logits) & (logits > -50)
    first = np.argmax(allowed, -1)
    last = WIDE_V - 1 - np.argmax(allowed[:, ::-1], -1)
    draw = jax.jit(inverse_cdf_tokens)
    for u, expected in ((0.0, last), (np.nextafter(np.float32(1), np.float32(0)), first)):
        got = np.asarray(draw(jnp.asarray(logits), jnp.full((rows, 2), u, jnp.float32)))
        assert got.tolist() == expected.tolist(), u
    got = np.asarray(draw(jnp.asarray(logits), jnp.asarray(rng.random((rows, 2)), jnp.float32)))
    assert allowed[np.arange(rows), got].all()


def test_infinite_logits_are_drawn_alone():
    """An infinite logit (a logit_bias of inf) leaves only the infinite tokens, whatever the
    temperature and filters; greedy takes the first of them."""
    rng = np.random.default_rng(15)
    logits = rng.standard_normal((8, WIDE_V)).astype(np.float32)
    logits[:, [9, VOCAB_BLOCK + 4]] = np.inf
    rows = [RowSpec(temperature=t, min_p=m, top_p=p, seed=s, step_position=s)
            for s, (t, m, p) in enumerate([(1.0, 0.0, 1.0), (0.5, 0.0, 1.0), (2.0, 0.1, 1.0),
                                           (1.0, 0.0, 0.9), (0.7, 0.05, 0.5), (1.0, 0.0, 1.0),
                                           (1.3, 0.0, 1.0), (0.0, 0.0, 1.0)])]
    meta, _ = build_sampling_metadata(rows, WIDE_V)
    tokens = np.asarray(jax.jit(sample)(jnp.asarray(logits), meta).token_ids)
    assert set(tokens[:7].tolist()) <= {9, VOCAB_BLOCK + 4} and tokens[7] == 9


def test_sampling_over_several_blocks_follows_the_softmax():
    from scipy.stats import chisquare

    rng = np.random.default_rng(13)
    base = np.full(WIDE_V, -np.inf, np.float32)
    support = np.array([3, 200, VOCAB_BLOCK + 9, 2 * VOCAB_BLOCK + 100, WIDE_V - 2])
    base[support] = rng.standard_normal(len(support)).astype(np.float32)
    rows = [RowSpec(temperature=0.8, seed=5, step_position=p) for p in range(512)]
    meta, _ = build_sampling_metadata(rows, WIDE_V)
    tokens = np.asarray(jax.jit(sample)(jnp.asarray(np.tile(base, (512, 1))), meta).token_ids)
    counts = np.bincount(tokens, minlength=WIDE_V)
    assert counts.sum() == counts[support].sum()
    p = np.exp(base[support] / 0.8 - np.max(base[support] / 0.8))
    assert chisquare(counts[support], p / p.sum() * 512).pvalue > 1e-4


# ---------------------------------------------------------------------------------------------
# seeds
# ---------------------------------------------------------------------------------------------


def test_seeded_row_is_independent_of_the_batch():
    rng = np.random.default_rng(3)
    target_logits = rand_logits(rng, 1, scale=1.0)[0]
    target = RowSpec(temperature=0.9, top_p=0.95, seed=1234)

    # batch A: the target at positions 0..7 in rows 0..7, greedy neighbours
    rows_a = [dataclasses.replace(target, step_position=p) for p in range(8)]
    rows_a += [RowSpec(temperature=0.0)] * 8
    logits_a = np.concatenate([np.tile(target_logits, (8, 1)), rand_logits(rng, 8)])
    tok_a = np.asarray(_sample(jnp.asarray(logits_a), make(rows_a, 16)).token_ids)[:8]

    # batch B: positions reversed, on odd rows, among seeded top-k / min-p / penalised rows
    rows_b, logits_b = [], []
    for j, p in enumerate(reversed(range(8))):
        rows_b.append(RowSpec(temperature=1.2, top_k=5, min_p=0.1, seed=j,
                              repetition_penalty=1.2, token_ids=[1, 2, 3], num_prompt=1))
        logits_b.append(rand_logits(rng, 1)[0])
        rows_b.append(dataclasses.replace(target, step_position=p))
        logits_b.append(target_logits)
    tok_b = np.asarray(_sample(jnp.asarray(np.stack(logits_b)), make(rows_b, 16)).token_ids)
    tok_b = tok_b[1::2][::-1]

    # batch C: a different batch size, other rows all random
    rows_c = [dataclasses.replace(target, step_position=p) for p in (5, 6, 7)]
    rows_c += [RowSpec(temperature=1.0, seed=77, step_position=5)] * 5
    logits_c = np.concatenate([np.tile(target_logits, (3, 1)), rand_logits(rng, 5)])
    tok_c = np.asarray(_sample(jnp.asarray(logits_c), make(rows_c, 8)).token_ids)[:3]

    assert tok_a.tolist() == tok_b.tolist()
    assert tok_a[5:].tolist() == tok_c.tolist()
    assert len(set(tok_a.tolist())) > 1  # positions give different draws


def test_different_seeds_differ():
    flat = np.zeros((16, V), np.float32)  # uniform: two streams agree with prob 1/64
    rows = [RowSpec(temperature=1.0, seed=1, step_position=p) for p in range(16)]
    tok1 = np.asarray(_sample(jnp.asarray(flat), make(rows, 16)).token_ids)
    rows = [dataclasses.replace(r, seed=2) for r in rows]
    tok2 = np.asarray(_sample(jnp.asarray(flat), make(rows, 16)).token_ids)
    assert np.sum(tok1 == tok2) <= 3
    assert len(set(tok1.tolist())) >= 8


# ---------------------------------------------------------------------------------------------
# filters: support and distribution
# ---------------------------------------------------------------------------------------------

FILTERS = [
    dict(temperature=1.0, top_k=5),
    dict(temperature=0.7, top_p=0.8),
    dict(temperature=1.3, min_p=0.15),
    dict(temperature=0.8, top_k=10, top_p=0.7, min_p=0.05),
    dict(temperature=2.0, top_p=0.5, repetition_penalty=1.4, presence_penalty=0.5),
]


@pytest.mark.parametrize("kw", FILTERS, ids=[",".join(f"{k}={v}" for k, v in f.items()) for f in FILTERS])
def test_filters_keep_the_numpy_set_and_sample_its_distribution(kw):
    from scipy.stats import chisquare

    rng = np.random.default_rng(4)
    base = np.sort(rng.standard_normal(V).astype(np.float32) * 1.5)[::-1].copy()
    rng.shuffle(base)
    spec = RowSpec(**kw, token_ids=[3, 4, 5, 3], num_prompt=2)
    processed = np_process(base, spec)
    keep = np_kept(processed, spec)
    assert 2 <= keep.sum() < V

    counts = np.zeros(V, np.int64)
    logits = jnp.asarray(np.tile(base, (256, 1)))
    for seed in range(8):
        rows = [dataclasses.replace(spec, seed=seed, step_position=p) for p in range(256)]
        tokens = np.asarray(_sample(logits, make(rows, 256)).token_ids)
        counts += np.bincount(tokens, minlength=V)
    assert counts[~keep].sum() == 0, f"filtered tokens sampled: {np.nonzero(counts * ~keep)}"

    x = processed.astype(np.float64) / spec.temperature
    probs = np.where(keep, np.exp(x - x[keep].max()), 0.0)
    probs /= probs.sum()
    expected = probs[keep] * counts.sum()
    assert chisquare(counts[keep], expected).pvalue > 1e-4


def test_allowed_token_ids_restrict_sampling():
    rng = np.random.default_rng(5)
    allowed = [3, 17, 40, 41, 63]
    logits = jnp.asarray(rand_logits(rng, 256))
    rows = [RowSpec(temperature=1.5, seed=9, step_position=p, allowed_token_ids=allowed)
            for p in range(256)]
    tokens = np.asarray(_sample(logits, make(rows, 256)).token_ids)
    assert set(tokens.tolist()) == set(allowed)


def test_min_tokens_suppresses_stop_ids():
    logits = np.zeros((8, V), np.float32)
    logits[:, 2] = 50.0  # eos would always win
    logits[:, 9] = 40.0  # a stop token id
    logits[:, 20] = 5.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9])
    rows = [RowSpec.from_params(params, [1, 1], [20] * n, eos_token_ids=[2]) for n in range(4)]
    assert [r.suppress_stop for r in rows] == [True, True, True, False]
    assert rows[0].stop_ids == [2, 9]
    sampled = SamplingParams(temperature=1.0, seed=0, min_tokens=1, stop_token_ids=[9])
    rows += [RowSpec.from_params(sampled, [1], [], eos_token_ids=[2])] * 2
    rows += [RowSpec.from_params(sampled, [1], [20], eos_token_ids=[2])] * 2
    tokens = np.asarray(_sample(jnp.asarray(logits), make(rows, 8)).token_ids)
    assert tokens.tolist() == [20, 20, 20, 2, 20, 20, 2, 2]


def test_bad_words_from_params_are_banned_when_completable():
    params = SamplingParams(temperature=0.0)
    params._bad_words_token_ids = [[7, 8], [5]]
    logits = np.zeros((8, V), np.float32)
    logits[:, 5] = 30.0
    logits[:, 8] = 20.0
    logits[:, 6] = 10.0
    rows = [RowSpec.from_params(params, [1], out) for out in ([], [7], [7, 1])]
    tokens = np.asarray(_sample(jnp.asarray(logits), make(rows, 8)).token_ids)[:3]
    assert tokens.tolist() == [8, 6, 8]


# ---------------------------------------------------------------------------------------------
# logprobs
# ---------------------------------------------------------------------------------------------


def test_logprobs_are_raw_and_ordered():
    rng = np.random.default_rng(6)
    logits = rand_logits(rng, 8)
    rows = [RowSpec(temperature=0.0), RowSpec(temperature=0.0, num_logprobs=2),
            RowSpec(temperature=0.5, repetition_penalty=1.8, token_ids=[1, 2], num_prompt=1,
                    seed=3, num_logprobs=4),
            RowSpec(temperature=1.0, top_p=0.3, logit_bias={0: 5.0}, seed=4),
            RowSpec(temperature=3.0, seed=5)]
    meta, num_logprobs = build_sampling_metadata(rows, V, pad_rows_to=8)  # builder widths
    assert num_logprobs == 4
    out = _sample(jnp.asarray(logits), meta, num_logprobs=num_logprobs)
    tokens = np.asarray(out.token_ids)
    lp, ids, ranks = (np.asarray(a) for a in (out.logprobs, out.logprob_token_ids, out.sampled_ranks))
    assert lp.shape == (8, 5) and ids.shape == (8, 5) and ranks.shape == (8,)
    ref = np_log_softmax(logits)
    for i in range(8):
        assert ids[i, 0] == tokens[i]
        np.testing.assert_allclose(lp[i, 0], ref[i, tokens[i]], rtol=1e-5, atol=1e-5)
        top = np.argsort(-ref[i])[:4]
        assert ids[i, 1:].tolist() == top.tolist()
        np.testing.assert_allclose(lp[i, 1:], ref[i, top], rtol=1e-5, atol=1e-5)
        assert ranks[i] == int(np.sum(ref[i] >= ref[i, tokens[i]]))
    for i in (0, 1, 5, 6, 7):  # greedy rows, no processing: the sampled token is the top one
        assert ranks[i] == 1 and lp[i, 0] == lp[i].max() and ids[i, 1] == tokens[i]


def test_no_logprobs_and_zero_logprobs():
    logits = jnp.asarray(rand_logits(np.random.default_rng(7), 8))
    meta = make([RowSpec(temperature=0.0)], 8)
    out = _sample(logits, meta)
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_ranks is None
    out0 = _sample(logits, meta, num_logprobs=0)
    assert out0.logprobs.shape == (8, 1) and out0.logprob_token_ids.shape == (8, 1)
    np.testing.assert_array_equal(np.asarray(out0.logprob_token_ids[:, 0]), np.asarray(out.token_ids))


# ---------------------------------------------------------------------------------------------
# the builder
# ---------------------------------------------------------------------------------------------


def test_builder_pads_to_powers_of_two_and_neutral_rows():
    rows = [RowSpec(temperature=0.8, top_k=V + 5, seed=2**32 + 7, step_position=3,
                    logit_bias={1: 1.0, 2: 2.0, 3: 3.0}, allowed_token_ids=list(range(9)),
                    stop_ids=[2], bad_word_ids=[4, 5], num_logprobs=3),
            RowSpec(repetition_penalty=1.1, token_ids=list(range(20)), num_prompt=15),
            RowSpec(presence_penalty=0.0)]
    meta, num_logprobs = build_sampling_metadata(rows, V, pad_rows_to=8, device_put=False)
    assert num_logprobs == 4
    assert meta.temperature.shape == (8,) and meta.temperature[3:].tolist() == [0.0] * 5
    assert meta.top_k.tolist()[0] == 0  # top_k >= vocab is off
    assert meta.seeds.dtype == np.uint32 and meta.seeds[0] == 7
    assert meta.step_positions[0] == 3
    assert meta.bias_ids.shape == (8, 4) and meta.bias_ids[0].tolist() == [1, 2, 3, -1]
    assert meta.bias_values[0].tolist() == [1.0, 2.0, 3.0, 0.0]
    assert meta.allowed_ids.shape == (8, 16) and (meta.allowed_ids[1:] == -1).all()
    assert meta.stop_ids.shape == (8, 1) and meta.bad_word_ids.shape == (8, 2)
    # token ids only for rows that use penalties
    assert meta.token_ids.shape == (8, 32) and (meta.token_ids[0] == -1).all()
    assert meta.token_ids[1, :20].tolist() == list(range(20)) and meta.num_prompt[1] == 15
    assert (meta.token_ids[2] == -1).all()
    assert meta.repetition_penalty[3:].tolist() == [1.0] * 5 and meta.top_p[3:].tolist() == [1.0] * 5

    # no row with any ids: zero-width columns, whose scatters the step does not compile
    none, n = build_sampling_metadata([RowSpec()], V, device_put=False)
    assert n is None and none.token_ids.shape == (1, 0) and none.bias_ids.shape == (1, 0)
    assert none.stop_ids.shape == none.bad_word_ids.shape == none.allowed_ids.shape == (1, 0)


def test_builder_errors():
    with pytest.raises(ValueError, match="pad_rows_to"):
        build_sampling_metadata([RowSpec()] * 3, V, pad_rows_to=2)
    with pytest.raises(ValueError, match="logit_bias.*64"):
        build_sampling_metadata([RowSpec(logit_bias={64: 1.0})], V)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        build_sampling_metadata([RowSpec(allowed_token_ids=[100])], V)


def test_builder_reads_engine_requests():
    @dataclasses.dataclass
    class Req:
        sampling_params: SamplingParams
        prompt_token_ids: list
        output_token_ids: list
        eos_token_id: int = 2

        @property
        def all_token_ids(self):
            return self.prompt_token_ids + self.output_token_ids

    p = SamplingParams(temperature=0.5, seed=11, frequency_penalty=0.3, min_tokens=4,
                       logprobs=2, logit_bias={6: -1.0})
    meta, n = build_sampling_metadata([Req(p, [5, 6, 7], [8, 8])], V, pad_rows_to=4,
                                      device_put=False)
    assert n == 2
    assert meta.seeds[0] == 11 and meta.step_positions[0] == 2
    assert meta.token_ids[0, :5].tolist() == [5, 6, 7, 8, 8] and meta.num_prompt[0] == 3
    assert meta.stop_ids[0, 0] == 2 and meta.suppress_stop[0]
    assert meta.frequency_penalty[0] == pytest.approx(0.3)


def test_new_values_do_not_recompile():
    fn = jax.jit(sample, static_argnames="num_logprobs")
    logits = jnp.asarray(rand_logits(np.random.default_rng(8), 8))
    a = make([RowSpec(temperature=0.3, top_p=0.5, seed=1, logit_bias={1: 1.0})], 8)
    b = make([RowSpec(temperature=1.1, top_k=3, min_p=0.2, seed=9, repetition_penalty=1.5,
                      token_ids=[1, 2], num_prompt=1, allowed_token_ids=[1, 2, 3])] * 3, 8)
    fn(logits, a).token_ids.block_until_ready()
    compiled = fn._cache_size()  # (jax shares this cache among jits of the same function)
    fn(logits, b).token_ids.block_until_ready()
    assert fn._cache_size() == compiled


def test_plain_requests_take_the_column_path_with_the_same_metadata(monkeypatch):
    """Requests whose params use no id lists (the usual batch) are packed column by column
    without a RowSpec per row; the arrays equal those of the RowSpec path, padding included,
    and one non-plain row sends the whole batch down the RowSpec path."""
    from jaxvllm import SamplingParams
    from jaxvllm.engine import sampler as sampler_module
    from jaxvllm.engine.request import Request

    rng = np.random.default_rng(5)
    shared = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=8)
    params = [shared, shared, SamplingParams(temperature=0.0, max_tokens=8),
              SamplingParams(top_k=5, min_p=0.1, seed=123, max_tokens=8),
              SamplingParams(top_k=10_000, seed=2**33 + 7, max_tokens=8)]
    requests = []
    for i, p in enumerate(params):
        r = Request(str(i), rng.integers(0, 60, 5 + i).tolist(), p, eos_token_id=2)
        for t in rng.integers(0, 60, i).tolist():
            r.append_output_token(int(t))
        requests.append(r)

    def build(rows, **kw):
        monkeypatch.setattr(sampler_module, "_host_rng", np.random.default_rng(0))
        return build_sampling_metadata(rows, 64, pad_rows_to=8, device_put=False, **kw)

    fast, k = build(requests)
    assert k is None
    monkeypatch.setattr(sampler_module, "_host_rng", np.random.default_rng(0))
    fresh = sampler_module._host_rng.integers(0, 2**32, size=len(requests)).tolist()
    specs = [RowSpec.from_request(r, seed) for r, seed in zip(requests, fresh)]
    slow, _ = build(specs)
    for name in SamplingMetadata.__dataclass_fields__:
        a, b = getattr(fast, name), getattr(slow, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert fast.seeds[3] == 123 and fast.seeds[4] == 7  # a seed of the params wins, 32 bits
    assert list(fast.step_positions[:5]) == [0, 1, 2, 3, 4]

    assert sampler_module._plain_requests_metadata(requests, 64, 8, fresh) is not None
    requests[1].sampling_params = SamplingParams(repetition_penalty=1.2, max_tokens=8)
    assert sampler_module._plain_requests_metadata(requests, 64, 8, fresh) is None
    with_penalty, _ = build(requests)
    assert with_penalty.repetition_penalty[1] == np.float32(1.2)


# ---------------------------------------------------------------------------------------------
# shortcuts decided on the host
# ---------------------------------------------------------------------------------------------

_sample_on_paths = jax.jit(sample, static_argnames=("num_logprobs", "paths"))

PATH_BATCHES = {
    "greedy": [RowSpec(temperature=0.0)] * 3,
    "plain random": [RowSpec(temperature=0.8, seed=5), RowSpec(temperature=0.0)],
    "top-p": [RowSpec(temperature=1.0, top_p=0.7, seed=1), RowSpec(temperature=0.0)],
    "top-k on a greedy row only": [RowSpec(temperature=0.0, top_k=3),
                                   RowSpec(temperature=0.9, seed=2)],
    "penalties": [RowSpec(temperature=0.0, presence_penalty=0.5, token_ids=[1, 2, 3],
                          num_prompt=1)],
    "allowed": [RowSpec(temperature=0.6, seed=3, allowed_token_ids=[4, 5, 6])],
    "all": [RowSpec(temperature=1.1, top_k=7, top_p=0.9, seed=4, repetition_penalty=1.3,
                    token_ids=[7, 8], num_prompt=1, allowed_token_ids=list(range(12))),
            RowSpec(temperature=0.0)],
}
EXPECTED_PATHS = {  # (allowed, penalties, random, sort)
    "greedy": (False, False, False, False), "plain random": (False, False, True, False),
    "top-p": (False, False, True, True), "top-k on a greedy row only": (False, False, True, False),
    "penalties": (False, True, False, False), "allowed": (True, False, True, False),
    "all": (True, True, True, True),
}


@pytest.mark.parametrize("name", sorted(PATH_BATCHES))
def test_paths_decided_on_the_host_give_the_tokens_of_the_conds(name):
    """`SamplerPaths.of` the host metadata names exactly the work some row needs, and
    sampling with those static paths (no `lax.cond`) gives the tokens, logprobs and ranks of
    the `lax.cond` version, as does doing every path's work (ALL: neutral rows unchanged)."""
    rows = PATH_BATCHES[name]
    host, _ = build_sampling_metadata(rows, V, pad_rows_to=4, device_put=False)
    paths = SamplerPaths.of(host)
    assert tuple(paths) == EXPECTED_PATHS[name]
    meta = make(rows, 4)
    logits = jnp.asarray(rand_logits(np.random.default_rng(21), 4))
    want = _sample(logits, meta, num_logprobs=2)
    for p in (paths, SamplerPaths(True, True, True, True)):
        got = _sample_on_paths(logits, meta, num_logprobs=2, paths=p)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_static_paths_leave_no_conditional_in_the_program():
    """A data-dependent branch makes a GPU host wait for its predicate: with paths the
    sampler compiles without any."""
    meta = make(PATH_BATCHES["all"], 4)
    logits = jnp.zeros((4, V), jnp.float32)
    for paths in (None, SamplerPaths(False, False, True, False),
                  SamplerPaths(True, True, True, True)):
        hlo = _sample_on_paths.lower(logits, meta, paths=paths).as_text(dialect="hlo")
        assert ("conditional(" in hlo) == (paths is None), paths
