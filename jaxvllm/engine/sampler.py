"""On-device sampling: penalties, logit bias, token masks, temperature, min-p / top-k / top-p,
per-request seeded sampling and logprobs, as pure functions traced into the engine's jitted
step.

Every per-request setting travels as an array row of `SamplingMetadata`, so new values never
recompile; only the padded shapes (rows `R` and the ragged widths `M`, `K`, `A`, `S`, `B`,
each a power of two) and the static `num_logprobs` select a program. Batch-wide shortcuts
skip work no row needs (the allowed-token mask, the penalty counts, the random path when
every row is greedy, the vocabulary sort when no row filters by top-k/top-p). The engine
decides them on the host (`SamplerPaths.of`) and compiles one program per combination it
meets: on a GPU a data-dependent `lax.cond` makes the host wait for the device to read its
predicate (one around a sort is not recorded into a CUDA graph), which left an H100 idle
for ~6 ms of a ~10 ms decode step. Without `paths` (metadata only known on the device) they
are `lax.cond`s. A neutral row gives bit-identical results whether or not a shortcut is
taken, so a row's token never depends on its batch.

Order of operations (vLLM V1's `Sampler.forward`):

1. raw logprobs: `log_softmax` of the model's logits, before any processing (vLLM's default
   `logprobs_mode="raw_logprobs"`); only when `num_logprobs` is not None;
2. `allowed_token_ids`: every other token -> -inf;
3. bad words: the banned last tokens -> -inf;
4. `min_tokens`: while a request has fewer outputs than `min_tokens`, its EOS and
   `stop_token_ids` -> -inf;
5. `logit_bias` added;
6. penalties: repetition (tokens seen in the prompt or the output: positive logits divided
   by the penalty, the others multiplied), then frequency (`-= f * count_in_output`), then
   presence (`-= p * (count_in_output > 0)`);
7. greedy rows (temperature < 1e-5) take the argmax of these processed logits;
8. the other rows: divide by the temperature, min-p (drop tokens whose probability is below
   `min_p` times the largest probability), top-k (keep tokens whose logit is at least the
   k-th largest, ties kept), top-p (on the distribution left by top-k, keep the most likely
   tokens until the mass of those before reaches `top_p`), then sample by inverting the
   row's cumulative distribution (over blocks, then within one) at two uniform numbers
   drawn from the row's own key
   `fold_in(fold_in(PRNGKey(0), seed), step_position)`: a seeded request draws the same
   tokens whatever the rest of the batch is, and wherever its row sits.

`sample(kernel=True)` (the engine's `sampling_kernels`, on a GPU) does steps 7 and 8 with the
Pallas kernels of pallas_kernels/sampling.py: the same arithmetic in three kernels instead
of ~15 XLA fusions.

The vocabulary is cut into blocks of `VOCAB_BLOCK` for the argmax and the inverse CDF: a
reduction over block sums (or maxima) picks a block, then one pass over that block picks the
token. XLA on the CPU runs a plain argmax over [64, 49152] in ~9 ms and a Gumbel draw per
token in ~75 ms; blocked, each takes under 4 ms (see benchmarks/README.md).

Top-p is applied as a threshold on the logit value (the smallest logit kept), so tokens
tied with the last kept one are all kept, where vLLM's positional mask may drop some of the
tie: this differs only on exact float ties.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SAMPLING_EPS = 1e-5
"""Rows with temperature below this are greedy."""

_PAD = -1  # padding of every ragged id array


# ---------------------------------------------------------------------------------------------
# Device-side containers
# ---------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingMetadata:
    """Per-row sampling inputs for `R` rows (padded rows are greedy and neutral)."""

    temperature: jax.Array  # [R] f32; < 1e-5 = greedy
    top_p: jax.Array  # [R] f32; 1 = off
    top_k: jax.Array  # [R] i32; 0 = off
    min_p: jax.Array  # [R] f32; 0 = off
    presence_penalty: jax.Array  # [R] f32
    frequency_penalty: jax.Array  # [R] f32
    repetition_penalty: jax.Array  # [R] f32; 1 = off
    seeds: jax.Array  # [R] u32
    step_positions: jax.Array  # [R] i32: index of the output token being sampled
    token_ids: jax.Array  # [R, M] i32: prompt then output ids, -1 padded (penalty rows only)
    num_prompt: jax.Array  # [R] i32: how many of token_ids are the prompt
    bias_ids: jax.Array  # [R, K] i32, -1 padded
    bias_values: jax.Array  # [R, K] f32
    allowed_ids: jax.Array  # [R, A] i32, -1 padded; a row of all -1 allows everything
    stop_ids: jax.Array  # [R, S] i32, -1 padded: EOS + stop_token_ids
    suppress_stop: jax.Array  # [R] bool: ban stop_ids this step (output < min_tokens)
    bad_word_ids: jax.Array  # [R, B] i32, -1 padded: tokens banned this step

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @property
    def shape_key(self) -> tuple[int, ...]:
        """(R, M, K, A, S, B): the shapes that, with `num_logprobs`, select a compiled
        program; a runner caching compiled programs must include it in its key."""
        return (self.temperature.shape[0], self.token_ids.shape[1], self.bias_ids.shape[1],
                self.allowed_ids.shape[1], self.stop_ids.shape[1], self.bad_word_ids.shape[1])


class SamplerPaths(NamedTuple):
    """The batch-wide shortcuts of `sample`, decided on the host: True where some row needs
    the work (a static choice in the compiled step, part of its program key)."""

    allowed: bool  # some row restricts itself to allowed_token_ids
    penalties: bool  # some row has a repetition, frequency or presence penalty
    random: bool  # some row is not greedy
    sort: bool  # some random row filters by top-k or top-p

    @classmethod
    def of(cls, meta: SamplingMetadata) -> "SamplerPaths":
        """The paths that host (numpy) metadata from `build_sampling_metadata` need."""
        return cls(*map(bool, _needed_paths(jax.tree.map(np.asarray, meta), np)))

    def covers(self, other: "SamplerPaths") -> bool:
        """Whether a step on these paths samples `other`'s batches too (doing all their work)."""
        return all(mine or not theirs for mine, theirs in zip(self, other))


PLAIN_RANDOM_PATHS = SamplerPaths(allowed=False, penalties=False, random=True, sort=False)
"""Default `SamplingParams` (temperature 1, no filters): the programs compiled ahead."""
ALL_PATHS = SamplerPaths(allowed=True, penalties=True, random=True, sort=True)
"""Every shortcut's work done: the step with the largest memory use."""


def _needed_paths(meta: SamplingMetadata, xp, vocab: Optional[int] = None) -> SamplerPaths:
    """Whether some row of `meta` needs each path, as `xp` (numpy on the host, jax.numpy on
    the device) booleans. A top_k of `vocab` or more filters nothing (the host's metadata
    already stores it as 0)."""
    random = meta.temperature >= SAMPLING_EPS
    cuts_vocab = meta.top_k > 0
    if vocab is not None:
        cuts_vocab = cuts_vocab & (meta.top_k < vocab)
    return SamplerPaths(
        allowed=xp.any(meta.allowed_ids >= 0),
        penalties=xp.any((meta.repetition_penalty != 1.0) | (meta.frequency_penalty != 0.0)
                         | (meta.presence_penalty != 0.0)),
        random=xp.any(random),
        sort=xp.any(random & (cuts_vocab | (meta.top_p < 1.0))))


def _branch(paths: Optional[SamplerPaths], needed: Callable[[], SamplerPaths], path: str,
            work: Callable, skip: Callable, operand):
    """`work(operand)` where some row needs `path`, else `skip(operand)`: as `paths` decided
    on the host, or (`paths` None) by a `lax.cond` on the device's `needed()`."""
    if paths is None:
        return jax.lax.cond(getattr(needed(), path), work, skip, operand)
    return work(operand) if getattr(paths, path) else skip(operand)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array  # [R] i32
    # The rest are None when `sample` ran with num_logprobs=None.
    logprobs: jax.Array | None  # [R, N+1] f32: the sampled token's, then the top N
    logprob_token_ids: jax.Array | None  # [R, N+1] i32: the sampled token, then the top N
    sampled_ranks: jax.Array | None  # [R] i32: 1-based rank of the sampled token


# ---------------------------------------------------------------------------------------------
# Processing on device
# ---------------------------------------------------------------------------------------------


def _ids_or_drop(ids: jax.Array, vocab: int, keep: jax.Array | None = None) -> jax.Array:
    """Ids with padding (and entries where `keep` is False) moved out of range so that a
    `mode="drop"` scatter skips them (a -1 index would wrap to the last token)."""
    ok = ids >= 0
    if keep is not None:
        ok = ok & keep
    return jnp.where(ok, ids, vocab)


def _set_where_ids(logits: jax.Array, ids: jax.Array, value) -> jax.Array:
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, ids].set(value, mode="drop")


def apply_penalties_and_bias(logits: jax.Array, meta: SamplingMetadata,
                             paths: Optional[SamplerPaths] = None) -> jax.Array:
    """Steps 2-6 of the module docstring: masks, logit bias and penalties on [R, V] logits.

    Returns float32 logits of the same shape (banned tokens are -inf).
    """
    logits = logits.astype(jnp.float32)
    num_rows, vocab = logits.shape
    rows = jnp.arange(num_rows)[:, None]
    neg_inf = jnp.float32(-jnp.inf)

    # allowed_token_ids (skipped, with the penalties below, when no row uses them)
    def restrict(x):
        allowed = jnp.zeros((num_rows, vocab), jnp.bool_).at[
            rows, _ids_or_drop(meta.allowed_ids, vocab)].set(True, mode="drop")
        restricted = jnp.any(meta.allowed_ids >= 0, axis=1, keepdims=True)
        return jnp.where(restricted & ~allowed, neg_inf, x)

    needed = lambda: _needed_paths(meta, jnp, vocab)
    logits = _branch(paths, needed, "allowed", restrict, lambda x: x, logits)

    # bad words (their currently completable last tokens)
    logits = _set_where_ids(logits, _ids_or_drop(meta.bad_word_ids, vocab), neg_inf)

    # min_tokens: no EOS / stop token yet
    logits = _set_where_ids(
        logits, _ids_or_drop(meta.stop_ids, vocab, meta.suppress_stop[:, None]), neg_inf)

    # logit_bias
    logits = logits.at[rows, _ids_or_drop(meta.bias_ids, vocab)].add(
        meta.bias_values.astype(jnp.float32), mode="drop")

    # penalties, from counts built here rather than dense masks sent from the host
    def penalise(x):
        ids = meta.token_ids
        in_output = jnp.arange(ids.shape[1])[None, :] >= meta.num_prompt[:, None]
        output_counts = jnp.zeros((num_rows, vocab), jnp.int32).at[
            rows, _ids_or_drop(ids, vocab, in_output)].add(1, mode="drop")
        in_prompt = jnp.zeros((num_rows, vocab), jnp.bool_).at[
            rows, _ids_or_drop(ids, vocab, ~in_output)].set(True, mode="drop")
        in_output_mask = output_counts > 0
        rep = jnp.where(in_prompt | in_output_mask, meta.repetition_penalty[:, None], 1.0)
        x = jnp.where(x > 0, x / rep, x * rep)
        x = x - meta.frequency_penalty[:, None] * output_counts.astype(jnp.float32)
        return x - meta.presence_penalty[:, None] * in_output_mask.astype(jnp.float32)

    logits = _branch(paths, needed, "penalties", penalise, lambda x: x, logits)
    return logits


def top_k_top_p_cutoff(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """[R, 1] smallest logit top-k then top-p keep, from one descending sort of the vocabulary.

    top-k keeps the tokens whose logit is >= the k-th largest (k <= 0 or >= V: off);
    top-p then keeps, in descending order, each token whose preceding probability mass (of
    the distribution left by top-k) is below `top_p` (1: off).
    """
    vocab = logits.shape[-1]
    desc = jnp.sort(logits, axis=-1, descending=True)
    k = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    in_top_k = desc >= kth
    desc_k = jnp.where(in_top_k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc_k, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    in_top_p = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    num_kept = jnp.sum(in_top_k & in_top_p, axis=-1)
    return jnp.take_along_axis(desc, jnp.maximum(num_kept - 1, 0)[:, None], axis=-1)


VOCAB_BLOCK = 256


def _vocab_blocks(x: jax.Array, fill) -> jax.Array:
    """[R, V] -> [R, ceil(V / VOCAB_BLOCK), VOCAB_BLOCK], padded with `fill`."""
    rows, vocab = x.shape
    pad = -vocab % VOCAB_BLOCK
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill)
    return x.reshape(rows, -1, VOCAB_BLOCK)


def _pick_in_block(blocks: jax.Array, block: jax.Array) -> jax.Array:
    """blocks [R, NB, B], block [R] -> each row's block [R, B]."""
    return jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]


def argmax_tokens(logits: jax.Array) -> jax.Array:
    """argmax over the last axis of [R, V] (the first of equal maxima), via block maxima."""
    blocks = _vocab_blocks(logits, -jnp.inf)
    block = jnp.argmax(blocks.max(-1), axis=-1)
    within = jnp.argmax(_pick_in_block(blocks, block), axis=-1)
    return (block * VOCAB_BLOCK + within).astype(jnp.int32)


def inverse_cdf_tokens(logits: jax.Array, uniforms: jax.Array,
                       row_max: jax.Array | None = None) -> jax.Array:
    """One token per row of [R, V] logits, drawn from softmax(logits) with two uniform
    numbers per row, `uniforms` [R, 2] in [0, 1): the first inverts the distribution over
    blocks of the vocabulary, the second the distribution within the chosen block. (One
    float32 number for the whole vocabulary would resolve probabilities only to ~1e-7.)
    Tokens at -inf are never drawn. `row_max` [R, 1]: the rows' largest (finite) logits,
    where the caller knows them already."""
    top = jnp.max(logits, axis=-1, keepdims=True) if row_max is None else row_max
    top = jnp.where(jnp.isfinite(top), top, 0.0)[:, :, None]
    blocks = _vocab_blocks(logits, -jnp.inf)
    # the weights exp(x - top) are summed per block, then recomputed for the chosen block
    # only: never written out whole
    block = _invert_cdf(jnp.exp(blocks - top).sum(-1), uniforms[:, 0])
    in_block = _invert_cdf(jnp.exp(_pick_in_block(blocks, block) - top[:, 0]), uniforms[:, 1])
    return (block * VOCAB_BLOCK + in_block).astype(jnp.int32)


def _invert_cdf(weights: jax.Array, uniforms: jax.Array) -> jax.Array:
    """For [R, N] weights (>= 0, some > 0) and [R] uniforms in [0, 1): the first index whose
    running sum reaches (1 - u) * total and whose weight is not zero (a parallel prefix sum
    need not grow monotonically to the last bit across zero weights, and float rounding at
    the end can leave the target above every running sum: then the last nonzero weight)."""
    running = jnp.cumsum(weights, axis=-1)
    target = (1.0 - uniforms) * running[:, -1]  # in (0, total]
    index = jnp.arange(weights.shape[-1])
    last = jnp.max(jnp.where(weights > 0, index, 0), axis=-1)
    reached = (running >= target[:, None]) & (weights > 0)
    return jnp.min(jnp.where(reached, index, last[:, None]), axis=-1)


def row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """One PRNG key per row: fold_in(fold_in(PRNGKey(0), seed), position)."""
    base = jax.random.PRNGKey(0)
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.fold_in(base, s), p))(
        seeds.astype(jnp.uint32), positions.astype(jnp.uint32))


def gather_logprobs(logprobs: jax.Array, token_ids: jax.Array, num_logprobs: int):
    """For [N, V] logprobs and chosen [N] ids: (values [N, k+1], ids [N, k+1], ranks [N]),
    the chosen token first then the top `num_logprobs`; rank is 1-based (the number of
    tokens at least as likely as the chosen one). Usable for prompt logprobs too."""
    token_ids = token_ids.astype(jnp.int32)
    chosen = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)
    ranks = jnp.sum(logprobs >= chosen, axis=-1).astype(jnp.int32)
    if num_logprobs > 0:
        top_vals, top_ids = jax.lax.top_k(logprobs, num_logprobs)
        values = jnp.concatenate([chosen, top_vals], axis=-1)
        ids = jnp.concatenate([token_ids[:, None], top_ids.astype(jnp.int32)], axis=-1)
    else:
        values, ids = chosen, token_ids[:, None]
    return values, ids, ranks


def sample(logits: jax.Array, meta: SamplingMetadata, *, num_logprobs: int | None = None,
           paths: Optional[SamplerPaths] = None, kernel: bool = False) -> SamplerOutput:
    """Sample one token per row of [R, V] logits (call inside jit; `num_logprobs` static).

    `num_logprobs=None` returns no logprobs; an int N >= 0 returns the sampled token's raw
    logprob and the top N (`SamplerOutput.logprobs` [R, N+1]). `kernel`: where `paths` has
    random rows, draw every row's token (the greedy ones' argmax too) with the Pallas
    kernels of pallas_kernels/sampling.py instead of XLA's ~15 fusions.
    """
    raw = logits
    logits = logits.astype(jnp.float32)
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1) if num_logprobs is not None else None

    processed = apply_penalties_and_bias(logits, meta, paths)
    is_greedy = meta.temperature < SAMPLING_EPS
    needed = lambda: _needed_paths(meta, jnp, logits.shape[-1])

    if kernel and paths is not None and paths.random:
        from pallas_kernels.sampling import sample_tokens

        keep_sorted = _random_cutoffs(processed, meta, paths, needed)[3]
        # unprocessed logits go in as they are: XLA need not write out a processed copy
        source = raw if _unprocessed(meta, paths) else processed
        tokens = sample_tokens(source, meta.temperature, meta.min_p, keep_sorted[:, 0],
                               _row_uniforms(meta), greedy_below=SAMPLING_EPS)
    else:
        greedy_tokens = argmax_tokens(processed)

        def random_tokens(processed):
            temperature, row_max, keep_min_p, keep_sorted = _random_cutoffs(
                processed, meta, paths, needed)
            x = scaled_logits(processed, temperature)
            x = jnp.where(x >= jnp.maximum(keep_min_p, keep_sorted), x, -jnp.inf)
            return inverse_cdf_tokens(x, _row_uniforms(meta), row_max)

        sampled = _branch(paths, needed, "random", random_tokens, lambda x: greedy_tokens,
                          processed)
        tokens = jnp.where(is_greedy, greedy_tokens, sampled)

    if num_logprobs is None:
        return SamplerOutput(tokens, None, None, None)
    values, ids, ranks = gather_logprobs(raw_logprobs, tokens, num_logprobs)
    return SamplerOutput(tokens, values, ids, ranks)


def scaled_logits(processed: jax.Array, temperature: jax.Array) -> jax.Array:
    """Logits divided by the rows' temperature; +inf logits (an infinite logit_bias) become
    the largest float: the row then draws among them alone instead of turning inf - inf
    into NaN."""
    return jnp.minimum(processed / temperature[:, None], jnp.finfo(jnp.float32).max)


def _random_cutoffs(processed: jax.Array, meta: SamplingMetadata,
                    paths: Optional[SamplerPaths], needed: Callable[[], SamplerPaths]):
    """(temperature [R] (1 on greedy rows), the scaled rows' maxima [R, 1], the min-p cutoff
    [R, 1] and the top-k/top-p one [R, 1]: the smallest scaled logit each keeps, -inf where
    it does not filter).

    The filters become per-row logit thresholds: only [R]-sized values leave the `cond`
    around the sort, so the [R, V] logits are divided, masked and exponentiated in one pass
    instead of being written out for the `cond` (~4 ms at [64, 49152])."""
    temperature = jnp.where(meta.temperature < SAMPLING_EPS, 1.0,
                            meta.temperature).astype(jnp.float32)
    # max(p / t) = max(p) / t exactly (division rounds monotonically); every filter keeps
    # the largest logit, so this is also the row maximum after filtering
    row_max = scaled_logits(jnp.max(processed, axis=-1, keepdims=True), temperature)
    keep_min_p = row_max + jnp.log(meta.min_p)[:, None]  # p >= min_p * p_max (0: -inf)

    def sorted_cutoff(p):
        x = scaled_logits(p, temperature)
        x = jnp.where(x >= keep_min_p, x, -jnp.inf)
        return top_k_top_p_cutoff(x, meta.top_k, meta.top_p)

    keep_sorted = _branch(paths, needed, "sort", sorted_cutoff,
                          lambda p: jnp.full_like(keep_min_p, -jnp.inf), processed)
    return temperature, row_max, keep_min_p, keep_sorted


def _row_uniforms(meta: SamplingMetadata) -> jax.Array:
    """[R, 2] uniform numbers in [0, 1), from each row's own key (see `row_keys`)."""
    keys = row_keys(meta.seeds, meta.step_positions)
    return jax.vmap(lambda key: jax.random.uniform(key, (2,), jnp.float32))(keys)


def _unprocessed(meta: SamplingMetadata, paths: SamplerPaths) -> bool:
    """Whether `apply_penalties_and_bias` leaves every row's logits as they are, known from
    the static shapes and paths: no allowed-token lists or penalties, and no row with bad
    words, stop tokens to ban or a logit bias (their id lists are 0 wide)."""
    return (not paths.allowed and not paths.penalties and meta.bad_word_ids.shape[1] == 0
            and meta.stop_ids.shape[1] == 0 and meta.bias_ids.shape[1] == 0)


# ---------------------------------------------------------------------------------------------
# Host side: rows -> padded metadata
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RowSpec:
    """One row's sampling inputs on the host (what `build_sampling_metadata` packs)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    step_position: int = 0  # index of the output token being sampled (= outputs so far)
    token_ids: Sequence[int] = ()  # prompt then output ids (read only for penalty rows)
    num_prompt: int = 0  # how many of token_ids are the prompt
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: Sequence[int] | None = None
    stop_ids: Sequence[int] = ()  # EOS + stop_token_ids (banned while suppress_stop)
    suppress_stop: bool = False
    bad_word_ids: Sequence[int] = ()  # tokens banned at this step
    num_logprobs: int | None = None  # SamplingParams.logprobs

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)

    @classmethod
    def from_params(cls, params: Any, prompt_token_ids: Sequence[int],
                    output_token_ids: Sequence[int], *, seed: int | None = None,
                    eos_token_ids: Iterable[int | None] = (),
                    token_ids: Sequence[int] | None = None,
                    step_position: int | None = None) -> RowSpec:
        """The row of a request with `SamplingParams` `params` whose prompt and outputs so
        far are given. `seed` is used when `params.seed` is None (a fresh random one when
        both are). `token_ids` may pass prompt+output already concatenated. `step_position`
        (the index of the output this step samples) defaults to the number of outputs."""
        if params.seed is not None:
            seed = params.seed
        elif seed is None:
            seed = int(_host_rng.integers(0, 2**32))
        num_out = len(output_token_ids)
        suppress_stop = num_out < params.min_tokens
        stop = set()
        if suppress_stop:  # the stop ids only matter while they are banned
            stop.update(params.stop_token_ids or ())
            stop.update(getattr(params, "all_stop_token_ids", ()) or ())
            stop.update(t for t in eos_token_ids if t is not None)
        bad_seqs = getattr(params, "bad_words_token_ids", None)
        if token_ids is None:
            token_ids = list(prompt_token_ids) + list(output_token_ids)
        return cls(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            min_p=params.min_p, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty, seed=seed,
            step_position=num_out if step_position is None else step_position,
            token_ids=token_ids, num_prompt=len(prompt_token_ids),
            logit_bias=params.logit_bias, allowed_token_ids=params.allowed_token_ids,
            stop_ids=sorted(stop), suppress_stop=suppress_stop,
            bad_word_ids=banned_bad_word_tokens(bad_seqs, output_token_ids) if bad_seqs else (),
            num_logprobs=params.logprobs)

    @classmethod
    def from_request(cls, request: Any, seed: int | None = None) -> RowSpec:
        """The row of an engine `Request` (`sampling_params`, `prompt_token_ids`,
        `output_token_ids`, optional `eos_token_id` / `all_token_ids`)."""
        eos = getattr(request, "eos_token_id", None)
        return cls.from_params(request.sampling_params, request.prompt_token_ids,
                               request.output_token_ids, seed=seed, eos_token_ids=(eos,),
                               token_ids=getattr(request, "all_token_ids", None),
                               step_position=_outputs_before_step(request))


_host_rng = np.random.default_rng()


def banned_bad_word_tokens(bad_words_token_ids: Iterable[Sequence[int]] | None,
                           output_token_ids: Sequence[int]) -> list[int]:
    """The tokens to ban at the next step: the last token of every bad word whose other
    tokens are the end of the output so far (single-token words are always banned)."""
    banned = []
    n = len(output_token_ids)
    for seq in bad_words_token_ids or ():
        prefix = list(seq[:-1])
        if len(prefix) > n:
            continue
        if not prefix or list(output_token_ids[n - len(prefix):]) == prefix:
            banned.append(int(seq[-1]))
    return banned


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= max(n, 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def bucket_num_logprobs(n: int | None) -> int | None:
    """The static `num_logprobs` for a batch whose largest request is `n`: None stays None,
    0 stays 0, others round up to a power of two (fewer compiled programs; callers keep the
    first `logprobs` entries)."""
    return None if n is None else (0 if n <= 0 else pow2_at_least(n))


def _ragged(lists: Sequence[Sequence[int]], num_rows: int, dtype=np.int32, fill=_PAD) -> np.ndarray:
    """[num_rows, width] of `fill` with row i starting with lists[i]; width a power of two,
    or 0 when every list is empty: the step then compiles no work for that column (each
    scatter of ids is a kernel launch in every step, on a GPU)."""
    longest = max((len(x) for x in lists), default=0)
    width = pow2_at_least(longest) if longest else 0
    out = np.full((num_rows, width), fill, dtype)
    for i, x in enumerate(lists):
        if len(x):
            out[i, :len(x)] = x
    return out


def _check_ids(name: str, ids: np.ndarray, vocab_size: int) -> None:
    real = ids[ids != _PAD]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
        bad = sorted(set(real[(real < 0) | (real >= vocab_size)].tolist()))
        raise ValueError(f"{name} holds token ids {bad[:8]} outside [0, {vocab_size})")


def _column(values, num_rows: int, dtype, fill) -> np.ndarray:
    """[num_rows] of `fill`, the first len(values) rows set to `values`."""
    out = np.full(num_rows, fill, dtype)
    out[:len(values)] = values
    return out


def _seed32(seed: int) -> int:
    return int(seed) & 0xFFFFFFFF


def _top_k_or_off(top_k: int, vocab_size: int) -> int:
    return 0 if (top_k <= 0 or top_k >= vocab_size) else top_k


def plain_params(params: Any) -> bool:
    """Params whose rows need no per-row id lists: no penalties, logit bias, allowed or bad
    words, min_tokens or logprobs (sampling knobs alone: temperature, top-p/k, min-p, seed)."""
    return (params.repetition_penalty == 1.0 and params.frequency_penalty == 0.0
            and params.presence_penalty == 0.0 and not params.logit_bias
            and params.allowed_token_ids is None and not params.min_tokens
            and params.logprobs is None
            and not getattr(params, "bad_words_token_ids", None))


def all_plain(requests: Iterable[Any]) -> bool:
    """Whether every request's `sampling_params` are plain (each params object checked
    once: a batch often shares one)."""
    plain: dict[int, bool] = {}
    for r in requests:
        p = r.sampling_params
        ok = plain.get(id(p))
        if ok is None:
            ok = plain[id(p)] = plain_params(p)
        if not ok:
            return False
    return True


def _outputs_before_step(request: Any) -> int:
    """Outputs a request has before the one this step samples, counting those that steps in
    flight sample (`num_pending_outputs` includes this step's own)."""
    return len(request.output_token_ids) + max(getattr(request, "num_pending_outputs", 1) - 1, 0)


def _plain_requests_metadata(rows: Sequence[Any], vocab_size: int, num_rows: int,
                             fresh_seeds: list[int]) -> SamplingMetadata | None:
    """`build_sampling_metadata` of engine requests whose params are all plain (the usual
    batch), column by column without a RowSpec per row; None if a row is not plain."""
    if not rows or isinstance(rows[0], RowSpec) or not all_plain(rows):
        return None
    params = [r.sampling_params for r in rows]

    def col(values, dtype, fill):
        return _column(values, num_rows, dtype, fill)

    def no_ids(dtype=np.int32, fill=_PAD):
        return np.full((num_rows, 0), fill, dtype)

    # a plain row's penalties, lists and flags are the padding rows' neutral values
    return SamplingMetadata(
        temperature=col([p.temperature for p in params], np.float32, 0.0),
        top_p=col([p.top_p for p in params], np.float32, 1.0),
        top_k=col([_top_k_or_off(p.top_k, vocab_size) for p in params], np.int32, 0),
        min_p=col([p.min_p for p in params], np.float32, 0.0),
        presence_penalty=col([], np.float32, 0.0),
        frequency_penalty=col([], np.float32, 0.0),
        repetition_penalty=col([], np.float32, 1.0),
        seeds=col([_seed32(f if p.seed is None else p.seed) for p, f in zip(params, fresh_seeds)],
                  np.uint32, 0),
        step_positions=col([_outputs_before_step(r) for r in rows], np.int32, 0),
        token_ids=no_ids(), num_prompt=col([], np.int32, 0), bias_ids=no_ids(),
        bias_values=no_ids(np.float32, 0.0), allowed_ids=no_ids(), stop_ids=no_ids(),
        suppress_stop=col([], np.bool_, False), bad_word_ids=no_ids())


def build_sampling_metadata(rows: Sequence[Any], vocab_size: int,
                            pad_rows_to: int | None = None, *,
                            device_put: bool = True) -> tuple[SamplingMetadata, int | None]:
    """Pack rows into a `SamplingMetadata` for [R, vocab_size] logits.

    `rows`: `RowSpec`s, or engine requests (anything with `sampling_params`, turned into a
    row by `RowSpec.from_request`). `pad_rows_to`: R (>= len(rows)); padded rows are greedy
    and neutral. Each ragged width (M, K, A, S, B) is padded to a power of two, or is 0
    where no row has any.
    Returns (metadata, num_logprobs): the static `num_logprobs` to pass to `sample`, None
    when no row asked for logprobs (see `bucket_num_logprobs`). `device_put=False` keeps
    numpy arrays.
    """
    n = len(rows)
    num_rows = n if pad_rows_to is None else pad_rows_to
    if num_rows < n:
        raise ValueError(f"pad_rows_to={pad_rows_to} is smaller than the {n} rows")
    # one draw for the rows whose params carry no seed (a draw per row costs more than the row)
    fresh = _host_rng.integers(0, 2**32, size=n).tolist()
    meta = _plain_requests_metadata(rows, vocab_size, num_rows, fresh)
    if meta is not None:
        return (jax.device_put(meta) if device_put else meta), None
    specs = [r if isinstance(r, RowSpec) else RowSpec.from_request(r, seed)
             for r, seed in zip(rows, fresh)]

    def col(name, dtype, fill):
        return _column([getattr(s, name) for s in specs], num_rows, dtype, fill)

    temperature = col("temperature", np.float32, 0.0)
    top_k = _column([_top_k_or_off(s.top_k, vocab_size) for s in specs], num_rows, np.int32, 0)
    seeds = _column([_seed32(s.seed) for s in specs], num_rows, np.uint32, 0)

    penalty_rows = [s.uses_penalties for s in specs]
    token_lists = [np.asarray(s.token_ids, np.int32) if p else () for s, p in zip(specs, penalty_rows)]
    num_prompt = _column([s.num_prompt if p else 0 for s, p in zip(specs, penalty_rows)],
                         num_rows, np.int32, 0)

    bias_lists = [list((s.logit_bias or {}).items()) for s in specs]
    bias_ids = _ragged([[t for t, _ in b] for b in bias_lists], num_rows)
    bias_values = _ragged([[v for _, v in b] for b in bias_lists], num_rows, np.float32, 0.0)
    allowed_ids = _ragged([s.allowed_token_ids or () for s in specs], num_rows)
    stop_ids = _ragged([s.stop_ids for s in specs], num_rows)
    bad_word_ids = _ragged([s.bad_word_ids for s in specs], num_rows)
    token_ids = _ragged(token_lists, num_rows)
    for name, ids in (("logit_bias", bias_ids), ("allowed_token_ids", allowed_ids),
                      ("stop_ids", stop_ids), ("bad_word_ids", bad_word_ids),
                      ("token_ids", token_ids)):
        _check_ids(name, ids, vocab_size)

    meta = SamplingMetadata(
        temperature=temperature,
        top_p=col("top_p", np.float32, 1.0),
        top_k=top_k,
        min_p=col("min_p", np.float32, 0.0),
        presence_penalty=col("presence_penalty", np.float32, 0.0),
        frequency_penalty=col("frequency_penalty", np.float32, 0.0),
        repetition_penalty=col("repetition_penalty", np.float32, 1.0),
        seeds=seeds,
        step_positions=col("step_position", np.int32, 0),
        token_ids=token_ids,
        num_prompt=num_prompt,
        bias_ids=bias_ids,
        bias_values=bias_values,
        allowed_ids=allowed_ids,
        stop_ids=stop_ids,
        suppress_stop=col("suppress_stop", np.bool_, False),
        bad_word_ids=bad_word_ids,
    )
    wanted = [s.num_logprobs for s in specs if s.num_logprobs is not None]
    num_logprobs = bucket_num_logprobs(max(wanted)) if wanted else None
    if num_logprobs is not None:
        num_logprobs = min(num_logprobs, vocab_size)
    if device_put:
        meta = jax.device_put(meta)
    return meta, num_logprobs
