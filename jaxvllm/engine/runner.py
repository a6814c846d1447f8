"""ModelRunner: turns a SchedulerOutput into one padded ragged step on the device.

It owns the model's split state, the stacked KV cache (donated to every call) and one
compiled program per bucket (`ProgramKey`): tokens `T`, requests `R` and block-table width
`MB` are padded up to powers of two, so a server compiles a handful of programs, each ahead of
time: in background threads (`precompile`, and after it once a bucket's steps have come
`COMPILE_WHEN_MET` times), or without them on the step's path, once the steps of its bucket,
run padded on a larger program meanwhile, have cost a compilation's time
(`DEFER_MAX_PADDING`); counted in `num_compiled`, `compile_seconds` for the time steps waited
and `background_compile_seconds`. Step inputs are built with numpy (`step_arrays`) and handed to
the compiled program packed into one byte buffer (`StepProgram`, engine/packed_inputs.py;
under tensor parallelism, as arrays replicated over the mesh).
Each program also takes the last step's sampled tokens, still on the device, so that a step
dispatched before the previous one is collected (asynchronous scheduling) reads the token
ids the host does not know yet from there (`step_arrays`' feed).

A multi-step decode (the scheduler's `num_steps` > 1) is one program too (`_multi_step_fn`):
a loop on the device over up to `num_steps` decode steps, each step's sampled tokens the
next one's input, so that the host's per-step work (scheduling, inputs, launching, outputs)
is spent once for them all (`multi_step_arrays` builds its inputs).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import operator
import threading
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvllm import parallel, xla_flags
from jaxvllm.engine.packed_inputs import PackedLayout, pack, unpack
from jaxvllm.engine.program_cache import ProgramCache, abstract
from jaxvllm.engine.sampler import (ALL_PATHS, PLAIN_RANDOM_PATHS, SamplerPaths,
                                    build_sampling_metadata, gather_logprobs, pow2_at_least,
                                    sample)
from jaxvllm.engine.scheduler import MIN_TOKEN_BUCKET
from jaxvllm.models.attention import (AttentionMetadata, allocate_kv_cache,
                                      resolve_attention_backend)
from pallas_kernels.variants import get_variant


MIN_CONTEXT_SLOTS = 256
# Lowerings whose kernels read a request's block-table entries only as far as its context:
# a wider table costs them only its copy to the device, so they share one width up to
# this many tokens (a 256 x 256 table is 256 KiB a step).
TABLE_WALKING_LOWERINGS = ("cpu", "triton", "mosaic_gpu")
TABLE_WALKING_MIN_CONTEXT_SLOTS = 4096
# A step whose own program is missing, while a compiled one at most DEFER_MAX_PADDING
# times its size can run it, runs on that one; its own is compiled (in the background)
# once its kind of step has come COMPILE_WHEN_MET times. A one-off step (a prefill's last
# chunk, say) then compiles nothing beside the steps that follow it: on a GPU a compilation
# takes seconds of the host's Python (tracing) and of the device (XLA's autotuner times
# kernels there). A step that only a much larger program can run compiles at once.
COMPILE_WHEN_MET = 3
DEFER_MAX_PADDING = 4
# Without background compilation (the CPU's default), a compilation stalls the steps for
# seconds (SmolLM2's unrolled programs: ~4 s each on 2 cores), and a step's time grows with
# its tokens. There a step whose program is missing, and not in the program cache, runs
# padded on a compiled larger one (at most DEFER_MAX_PADDING times its size) until the time
# that padding has cost its kind of step (`_padding_seconds`, kept in the program cache
# across processes: `ProgramCache.rent`) reaches what compiling a program costs
# (`_expected_compile_seconds`): then its own is compiled. Rent or buy: at most twice the
# time of the better choice made in hindsight, and kinds of step that come only a few times
# (the last few requests of a batch) compile nothing, until they have come often enough
# over several runs.


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), but at least n even past `maximum`."""
    b = max(minimum, 1 << (max(n, 1) - 1).bit_length())
    return b if maximum is None else max(n, min(b, maximum))


@dataclasses.dataclass
class StepResult:
    # request id -> token, for requests that sampled this step (a multi-step decode: the
    # list of the row's tokens, one per step)
    sampled: dict[str, int | list[int]]
    logprobs: dict[str, tuple[list[int], list[float], int]]  # id -> (token ids, logprobs, rank)
    # id -> (first prompt position covered, [(token ids, logprobs, rank) per position])
    prompt_logprobs: dict[str, tuple[int, list[tuple[list[int], list[float], int]]]]


@dataclasses.dataclass
class StepCounters:
    """Padding and time per step: host (input building, compiling on a new bucket) and
    device (the jitted call until its sampled tokens are on the host)."""

    steps: int = 0
    multi_steps: int = 0  # of them, multi-step decodes
    real_tokens: int = 0
    padded_tokens: int = 0
    host_seconds: float = 0.0
    device_seconds: float = 0.0

    def record(self, real: int, bucket_size: int, host: float, device: float,
               multi_step: bool = False) -> None:
        self.steps += 1
        self.multi_steps += multi_step
        self.real_tokens += real
        self.padded_tokens += bucket_size - real
        self.host_seconds += host
        self.device_seconds += device

    def summary(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        return {"steps": self.steps, "multi_steps": self.multi_steps,
                "padding_waste": self.padded_tokens / max(self.real_tokens, 1),
                "host_ms_per_step": 1000 * self.host_seconds / steps,
                "device_ms_per_step": 1000 * self.device_seconds / steps}


def _step_fn(graphdef, state_def, sampler_paths, num_logprobs, num_prompt_logprobs, layout,
             weights, kv, prev_tokens, *inputs):
    if layout is not None:  # one packed buffer (see StepProgram)
        inputs = unpack(inputs[0], layout)
    (input_ids, feed, positions, meta, logits_indices, sampling, prompt_indices,
     prompt_targets) = inputs
    # tokens the previous step sampled and the host does not know yet (asynchronous
    # scheduling): taken from its output rows on the device
    input_ids = jnp.where(feed >= 0, prev_tokens[jnp.maximum(feed, 0)], input_ids)
    model = nnx.merge(graphdef, jax.tree.unflatten(state_def, weights))
    hidden, kv = model(input_ids, positions, meta, kv)
    # tensor parallel: the vocabulary-sharded logits gathered once; sampling runs replicated
    logits = parallel.gather_logits(model.compute_logits(hidden[logits_indices]))
    sampled = sample(logits, sampling, num_logprobs=num_logprobs, paths=sampler_paths,
                     kernel=logits.shape[0] <= model.sampling_kernel_rows)
    prompt = None
    if num_prompt_logprobs is not None:
        prompt_logits = parallel.gather_logits(model.compute_logits(hidden[prompt_indices]))
        prompt = gather_logprobs(jax.nn.log_softmax(prompt_logits, axis=-1), prompt_targets,
                                 num_prompt_logprobs)
    next_tokens = jnp.zeros_like(prev_tokens).at[:sampled.token_ids.shape[0]].set(
        sampled.token_ids.astype(prev_tokens.dtype))
    return sampled, prompt, kv, next_tokens


def _multi_step_fn(graphdef, state_def, sampler_paths, num_steps, layout, weights, kv,
                   prev_tokens, *inputs):
    """Up to `num_steps` decode steps of R rows (one token each, T = R) in one call: step j
    runs on the tokens step j - 1 sampled, at the next position, and samples at the next
    output index (so a seeded row draws what single steps would). A row of `steps` s < j + 1
    repeats its last step writing to the null block instead: its later tokens are dropped.
    Returns the tokens [num_steps, R], the cache and each row's last token (as `_step_fn`:
    the first input of a call dispatched before this one is collected, read through `feed`)."""
    if layout is not None:
        inputs = unpack(inputs[0], layout)
    input_ids, feed, positions, steps, meta, slots, sampling = inputs
    input_ids = jnp.where(feed >= 0, prev_tokens[jnp.maximum(feed, 0)], input_ids)
    model = nnx.merge(graphdef, jax.tree.unflatten(state_def, weights))
    R = sampling.num_rows

    def one_step(j, carry):
        ids, kv, tokens = carry
        ahead = jnp.minimum(j, jnp.maximum(steps, 1) - 1)  # padded rows: 0 tokens, 0 steps
        step_meta = dataclasses.replace(meta, seq_lens=meta.seq_lens + ahead * (steps > 0),
                                        slot_mapping=slots[j], decode_only=True)
        hidden, kv = model(ids, positions + ahead, step_meta, kv)
        logits = parallel.gather_logits(model.compute_logits(hidden))
        step_sampling = dataclasses.replace(sampling,
                                            step_positions=sampling.step_positions + j)
        new = sample(logits, step_sampling, paths=sampler_paths,
                     kernel=R <= model.sampling_kernel_rows).token_ids.astype(ids.dtype)
        return new, kv, tokens.at[j].set(new)

    tokens = jnp.zeros((num_steps, R), jnp.int32)
    # a fixed trip count (a loop bounded by the rows' steps would skip the idle iterations
    # of a call near max_tokens, but is a while loop XLA cannot count: not measured on a GPU)
    _, kv, tokens = jax.lax.fori_loop(0, num_steps, one_step, (input_ids, kv, tokens))
    last = tokens[jnp.maximum(steps, 1) - 1, jnp.arange(R)]
    next_tokens = jnp.zeros_like(prev_tokens).at[:R].set(last)
    return tokens, kv, next_tokens


def _compiled(future: concurrent.futures.Future) -> bool:
    """Whether a background compilation is done and did not fail."""
    return future.done() and not future.cancelled() and future.exception() is None


def _shape_of(x: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


class ProgramKey(NamedTuple):
    """What selects a compiled step program: every static shape and option of its inputs."""

    sampling_shape: tuple[int, ...]  # SamplingMetadata.shape_key
    sampler_paths: SamplerPaths  # the sampler's shortcuts this batch takes
    num_tokens: int  # T
    num_rows: int  # R
    table_width: Optional[int]  # MB; None for a planned variant (no device block table)
    plan_sizes: Optional[tuple[int, ...]]  # the planner's sizes, None without a planner
    num_prompt_rows: int  # prompt-logprob rows (padded; 1 when none)
    num_logprobs: Optional[int]  # static arguments of _step_fn, in its order
    num_prompt_logprobs: Optional[int]
    num_steps: int = 1  # > 1: a multi-step decode program (_multi_step_fn)

    def same_but_plan(self, other: "ProgramKey") -> bool:
        return self._replace(plan_sizes=None) == other._replace(plan_sizes=None)


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """A compiled step and how its host inputs reach it: packed into one buffer of `layout`
    (one host-to-device copy a step), or, tensor parallel (layout None), as the arrays
    `_shard_inputs` replicated over the mesh."""

    compiled: object
    layout: Optional[PackedLayout]

    def __call__(self, weights, kv, prev_tokens, *host_inputs):
        if self.layout is None:
            return self.compiled(weights, kv, prev_tokens, *host_inputs)
        buffer, layout = pack(host_inputs)
        if layout != self.layout:
            raise RuntimeError("step inputs do not match the program's packed layout")
        return self.compiled(weights, kv, prev_tokens, buffer)

    def as_text(self) -> str:
        return self.compiled.as_text()


def _block_tables(reqs, R: int, MB: int) -> np.ndarray:
    """The rows' block ids, [R, MB], zero (the null block) padded."""
    tables = np.zeros((R, MB), np.int32)
    block_lists = [req.block_ids[:MB] for req in reqs]
    num_blocks = np.fromiter(map(len, block_lists), np.int64, len(reqs))
    row_of_block = np.repeat(np.arange(len(reqs)), num_blocks)
    tables[row_of_block, np.arange(len(row_of_block)) - np.repeat(
        np.cumsum(num_blocks) - num_blocks, num_blocks)] = np.fromiter(
        itertools.chain.from_iterable(block_lists), np.int32, len(row_of_block))
    return tables


def multi_step_arrays(scheduled, T: int, K: int, MB: int, block_size: int,
                      prev_rows: Optional[dict] = None):
    """The inputs of a multi-step decode of `scheduled` (rows whose `num_new_tokens` is
    their number of steps, at most K) padded to T rows: each row's first input token, feed
    (as `step_arrays`': the output row of the call in flight that samples that token, where
    the host does not know it yet; else -1) and position, its steps, the attention metadata
    of the first step and the KV slot of every step [K, T] (the null block's for a row's
    steps past its own)."""
    n = len(scheduled)
    reqs = [s.request for s in scheduled]
    starts = np.fromiter((s.num_computed_tokens for s in scheduled), np.int64, n)
    steps = np.zeros(T, np.int32)
    steps[:n] = [s.num_new_tokens for s in scheduled]
    tables = _block_tables(reqs, T, MB)
    ids = np.zeros(T, np.int32)
    feed = np.full(T, -1, np.int32)
    prev_rows = prev_rows or {}
    for i, (req, start) in enumerate(zip(reqs, starts.tolist())):
        if start < req.num_tokens:
            ids[i] = req.all_token_ids[start]
        elif (row := prev_rows.get(req)) is not None:
            feed[i] = row
        else:
            raise RuntimeError(f"no step in flight samples the next token of {req.request_id!r}")
    pos = np.zeros(T, np.int32)
    pos[:n] = starts
    seq_lens = np.zeros(T, np.int32)
    seq_lens[:n] = starts + 1
    qsl = np.minimum(np.arange(T + 1), n).astype(np.int32)
    j = np.arange(K)[:, None]
    p = starts[None, :] + np.minimum(j, steps[None, :n] - 1)
    slots = np.zeros((K, T), np.int32)
    slots[:, :n] = np.where(j < steps[None, :n], tables[np.arange(n)[None, :], p // block_size]
                            * block_size + p % block_size, 0)
    return ids, feed, pos, steps, AttentionMetadata(qsl, seq_lens, tables, slots[0]), slots


def step_arrays(scheduled, T: int, R: int, MB: int, block_size: int,
                prev_rows: Optional[dict] = None):
    """The step's token and attention arrays for `scheduled` (rows with `request`,
    `num_computed_tokens` (the first new position), `num_new_tokens`, in batch order), padded
    to T tokens, R rows and MB table columns: token ids, feed, positions, KV slots, query
    start offsets, sequence lengths, block tables and the logits row of each request.

    A new token past the request's known ids (one the step in flight samples) is read on the
    device from that step's output row `prev_rows[request]`: `feed` holds that row, -1
    elsewhere. Padding tokens write into the null block 0. Built with one pass of Python over
    the requests and numpy over the tokens (a decode batch of 256 is the common case)."""
    num_reqs = len(scheduled)
    reqs = [s.request for s in scheduled]
    starts = [s.num_computed_tokens for s in scheduled]
    counts = [s.num_new_tokens for s in scheduled]
    total = sum(counts)
    tables = _block_tables(reqs, R, MB)

    counts_np = np.asarray(counts, np.int64)
    qsl = np.full(R + 1, total, np.int32)
    qsl[0] = 0
    qsl[1:num_reqs + 1] = np.cumsum(counts_np)
    row_of_token = np.repeat(np.arange(num_reqs), counts_np)
    ids = np.zeros(T, np.int32)
    feed = np.full(T, -1, np.int32)
    pos = np.zeros(T, np.int32)
    slots = np.zeros(T, np.int32)
    known = [min(n, max(req.num_tokens - s, 0)) for req, s, n in zip(reqs, starts, counts)]
    num_known = sum(known)
    known_ids = np.fromiter(itertools.chain.from_iterable(
        req.all_token_ids[s:s + k] for req, s, k in zip(reqs, starts, known)), np.int32,
        num_known)
    offset = np.arange(total) - qsl[row_of_token]
    if num_known == total:
        ids[:total] = known_ids
    else:
        is_known = offset < np.asarray(known, np.int64)[row_of_token]
        ids[:total][is_known] = known_ids
        prev_rows = prev_rows or {}
        missing = [req.request_id for req, k, n in zip(reqs, known, counts)
                   if k < n and req not in prev_rows]
        if missing:
            raise RuntimeError(f"no step in flight samples the next token of {missing}")
        row_of_req = np.asarray([prev_rows.get(req, -1) for req in reqs], np.int32)
        feed[:total][~is_known] = row_of_req[row_of_token[~is_known]]
    p = offset + np.asarray(starts, np.int64)[row_of_token]
    pos[:total] = p
    slots[:total] = tables[row_of_token, p // block_size] * block_size + p % block_size
    seq_lens = np.zeros(R, np.int32)
    seq_lens[:num_reqs] = np.asarray(starts, np.int64) + counts_np
    logits_idx = np.zeros(R, np.int32)
    logits_idx[:num_reqs] = qsl[1:num_reqs + 1] - 1
    return ids, feed, pos, slots, qsl, seq_lens, tables, logits_idx


@dataclasses.dataclass
class PendingStep:
    """A dispatched step: `result()` waits for its tokens and returns the StepResult."""

    finish: Callable[[], StepResult]

    def result(self) -> StepResult:
        return self.finish()


class ModelRunner:
    def __init__(self, model, *, num_blocks: int, block_size: int, max_model_len: int,
                 max_num_batched_tokens: int, max_num_seqs: int, mesh=None, kv_dtype=None,
                 fine_decode_buckets: bool = False):
        self.cfg = model.cfg
        self.mesh = mesh  # tensor parallel: the model's shards live on this mesh
        self.graphdef, self.state = nnx.split(model)
        # The step programs take the weights as a flat list: jax flattens an nnx.State in
        # Python on every call (~0.25 ms a step for a 24-layer model), a list in C++.
        self.weights, self._state_def = jax.tree.flatten(self.state)
        self.block_size = block_size
        self.max_blocks_per_req = -(-max_model_len // block_size)
        self.max_tokens_bucket = bucket(max_num_batched_tokens, MIN_TOKEN_BUCKET)
        self.max_reqs_bucket = bucket(max_num_seqs, 4)
        # Decode-sized steps (up to max_reqs_bucket tokens) pad to any power of two, and from
        # 24 up also to 3 * 2^k (at most 1/3 padding instead of 1/2): for a device whose step
        # time grows with its tokens (the CPU's matmuls: 16 rows cost ~5x one), at the price
        # of more programs.
        self.fine_decode_buckets = fine_decode_buckets
        # the most decode steps of one multi-step program (1: none); the engine sets it once
        # the runner is built (it depends on the attention variant's planner)
        self.num_scheduler_steps = 1
        variant = get_variant(resolve_attention_backend(model.attention_backend)[0])
        # the StepPlanner of an attention variant that works from a host-built plan
        self.planner = variant.plan
        # Block-table widths below this many tokens share one program: short contexts cost
        # little to over-read (nothing, for a kernel that walks the table) and each width
        # is a separate compilation.
        min_slots = (TABLE_WALKING_MIN_CONTEXT_SLOTS if variant.lowering in TABLE_WALKING_LOWERINGS
                     else MIN_CONTEXT_SLOTS)
        self.max_table_width = bucket(self.max_blocks_per_req, 1)
        self.min_table_width = min(self.max_table_width, max(1, min_slots // block_size))
        self.max_num_seqs = max_num_seqs
        self.kv_dtype = kv_dtype if kv_dtype is not None else model.dtype
        self.kv = self._allocate_kv(num_blocks, self.kv_dtype)
        # Queue each step's outputs' copy to the host at dispatch, on one device that is not
        # the CPU. A CPU's outputs are host memory already, and a queued copy's completion
        # runs on XLA's thread after the step, taking the interpreter: if the last step's
        # completes while the program exits, the process aborts ("terminate called without
        # an active exception").
        self._queue_host_copies = mesh is None and all(
            d.platform != "cpu" for d in jax.tree.leaves(self.kv)[0].devices())
        # the sampled tokens of the last step dispatched, on the device, by its rows (padded to
        # max_reqs_bucket), and the row of each request that sampled in it: the next step
        # reads the tokens the host does not know yet from there (`step_arrays` feed)
        self._last_tokens = self._zeros_on_device(self.max_reqs_bucket)
        self._last_rows: dict = {}
        self._last_multi_step_sampling = None  # (T, requests, metadata) of the last such call
        self._programs: dict[ProgramKey, StepProgram] = {}
        self._compiling: dict[ProgramKey, concurrent.futures.Future] = {}
        self._missing_met: collections.Counter = collections.Counter()  # see COMPILE_WHEN_MET
        # step seconds spent on padding, by the key of the program the steps lacked (with
        # what earlier processes spent: the program cache's rent); the program cache's entry
        # name of each such key; the seconds each program took to compile (here, or when
        # the program cache stored it). See DEFER_MAX_PADDING.
        self._padding_seconds: collections.Counter = collections.Counter()
        self._cache_entries: dict[ProgramKey, Optional[str]] = {}
        self._compile_costs: list[float] = []
        self._compile_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._compile_lock = threading.Lock()
        # compiled programs on disk by what they are made from (one device only: a mesh's
        # programs compile as before, through JAX's own cache)
        self.program_cache = ProgramCache.default() if mesh is None else None
        self._model_text = (repr((self.graphdef, self._state_def, self.cfg))
                            if self.program_cache is not None else None)
        self.counters = StepCounters()
        # compiling on the step's path: inline, or waiting for a background compilation
        self.compile_seconds = 0.0
        self.background_compile_seconds = 0.0  # spent in precompile's threads

    def token_bucket(self, total: int) -> int:
        """The token count T a step of `total` tokens is padded to."""
        if not (self.fine_decode_buckets and total <= self.max_reqs_bucket):
            return bucket(total, MIN_TOKEN_BUCKET, self.max_tokens_bucket)
        T = bucket(total, 1)
        return 3 * T // 4 if T >= 2 * MIN_TOKEN_BUCKET and total <= 3 * T // 4 else T

    @property
    def num_compiled(self) -> int:
        return len(self._programs)

    def _ready(self, key: ProgramKey) -> bool:
        """Whether `key`'s program is to be had without waiting: compiled, or its background
        compilation done (one that failed is compiled again on the step's path, where its
        error surfaces)."""
        future = self._compiling.get(key)
        return key in self._programs or (future is not None and future.done())

    def _ready_keys(self) -> list[ProgramKey]:
        """The keys of the programs compiled, here or in the background, that a step may
        run on instead of its own."""
        return [*self._programs, *(k for k, f in self._compiling.items() if _compiled(f))]

    def _ready_covering(self, key: ProgramKey) -> Optional[ProgramKey]:
        """The key of a compiled program that differs from `key` only by sampler paths that
        cover its own (e.g. the default-sampling program for a greedy batch), the one doing
        the least extra work; None if there is none."""
        same = [other for other in self._ready_keys()
                if other._replace(sampler_paths=key.sampler_paths) == key
                and other.sampler_paths.covers(key.sampler_paths)]
        return min(same, key=lambda k: sum(k.sampler_paths), default=None)

    def _program(self, key, args):
        program = self._programs.get(key)
        if program is None:
            start = time.perf_counter()
            future = self._compiling.pop(key, None)
            program = None
            if future is not None:
                try:
                    program = future.result()
                except Exception:  # noqa: BLE001 - compiled again here, where errors surface
                    program = None
            if program is None:
                program = self._compile(key, args)
            self.compile_seconds += time.perf_counter() - start
            self._programs[key] = program
        return program

    def step_function(self, key: ProgramKey, args):
        """(the pure step function of `key`, its arguments, their packed layout): what
        `_compile` jits, for tools that compile it elsewhere (benchmarks/kernel_count.py)."""
        layout = None
        if self.mesh is None:
            buffer, layout = pack(args[3:])
            args = (*args[:3], buffer)
        if key.num_steps > 1:
            step = functools.partial(_multi_step_fn, self.graphdef, self._state_def,
                                     key.sampler_paths, key.num_steps, layout)
        else:
            step = functools.partial(_step_fn, self.graphdef, self._state_def,
                                     key.sampler_paths, key.num_logprobs,
                                     key.num_prompt_logprobs, layout)
        return step, args, layout

    def _compile(self, key, args) -> StepProgram:
        step, args, layout = self.step_function(key, args)
        if self.mesh is None:
            fn = jax.jit(step, donate_argnums=(1,))
        else:  # outputs replicated, the cache stays sharded by KV head
            rep = parallel.replicated(self.mesh)
            fn = jax.jit(step, donate_argnums=(1,), out_shardings=(
                rep, rep, parallel.kv_cache_sharding(self.mesh), rep))
        options = xla_flags.step_compiler_options()

        def compile():
            with parallel.tracing_under(self.mesh):
                return fn.lower(*args).compile(compiler_options=options)

        cache = self.program_cache
        if cache is None:
            start = time.perf_counter()
            compiled = compile()
            self._compile_costs.append(time.perf_counter() - start)
            return StepProgram(compiled, layout)
        entry = self._cache_entry(key, args, layout)
        compiled = cache.get_or_compile(entry, args, compile)
        self._compile_costs.append(cache.compile_seconds[entry])
        return StepProgram(compiled, layout)

    def _cache_entry(self, key, args, layout) -> str:
        """The program cache's entry name for `key`'s program (`args` as `step_function`
        gives them)."""
        return self.program_cache.key(self._model_text, key, layout, abstract(args),
                                      xla_flags.step_compiler_options())

    def _runs_padded(self, key: ProgramKey, args) -> bool:
        """Whether a step whose program `key` is missing, and which a compiled larger one
        can run, runs padded on that one rather than have its own compiled now (see
        DEFER_MAX_PADDING): not if the program cache holds it (a load takes a fraction of a
        second), nor once its kind of step has spent a compilation's time padded."""
        if key not in self._cache_entries:
            entry = None
            if self.program_cache is not None:
                _, packed, layout = self.step_function(key, args)
                entry = self._cache_entry(key, packed, layout)
                self._padding_seconds[key] += self.program_cache.rent(entry)
            self._cache_entries[key] = entry
        entry = self._cache_entries[key]
        if entry is not None and self.program_cache.holds(entry):
            return False
        return self._padding_seconds[key] < self._expected_compile_seconds()

    def _paid_padding(self, key: ProgramKey, seconds: float) -> None:
        """Count `seconds` of a step's time as spent padded for want of `key`'s program."""
        self._padding_seconds[key] += seconds
        if self._cache_entries.get(key) is not None:
            self.program_cache.add_rent(self._cache_entries[key], seconds)

    def precompile(self, vocab_size: int, workers: int = 4) -> None:
        """Compile in background threads the plain programs (R = min(rows, T) rows, the
        narrowest table width, default sampling, no logprobs) of the full-budget step, which
        prompts fill first, and of every decode batch, largest first, so that they are ready,
        or nearly, when the batch first reaches them. A step that needs one still being
        compiled runs on a compiled program that does more (see `execute_async`) meanwhile,
        else waits for it; from now on a step whose program is missing has it compiled in
        these threads too (at once, or once the step recurs where a compiled one runs it at
        little extra cost: `COMPILE_WHEN_MET`). With multi-step decoding the decode
        batches' programs compiled are the multi-step ones; a single decode step (prompts
        waiting, params that need the host's token history, too few free blocks for the
        steps ahead) has its program compiled when first met. Not for planned variants
        (their plan sizes are in the key) or tensor parallel runners."""
        if self.planner is not None or self.mesh is not None:
            raise ValueError("precompile needs an unplanned attention variant on one device")
        if self._compile_pool is None:
            self._compile_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="jaxvllm-compile")
        multi = self.num_scheduler_steps > 1
        rows = self.multi_step_rows if multi else self.token_bucket
        largest_decode = min(self.max_reqs_bucket, self.max_tokens_bucket)
        decode = sorted({rows(n) for n in range(1, largest_decode + 1)}, reverse=True)
        key, args = self.dummy_step(vocab_size, self.max_tokens_bucket,
                                     min(self.max_reqs_bucket, self.max_tokens_bucket),
                                     self.min_table_width)
        self._compile_in_background(key, args)
        for T in decode:
            if multi:
                key, args = self.dummy_multi_step(vocab_size, T, self.min_table_width)
            else:
                key, args = self.dummy_step(vocab_size, T, min(self.max_reqs_bucket, T),
                                             self.min_table_width)
            self._compile_in_background(key, args)

    def wait_for_compiles(self) -> None:
        """Wait until every background compilation started so far is done."""
        concurrent.futures.wait(list(self._compiling.values()))

    def _compile_when_due(self, key: ProgramKey, args,
                          fallback: Optional[ProgramKey]) -> None:
        """`key`'s program missing, its step running on `fallback` meanwhile (None: on
        nothing, it waits): compiled in the background now if there is no fallback or it
        pads the step more than DEFER_MAX_PADDING times, else once such steps have come
        COMPILE_WHEN_MET times."""
        self._missing_met[key] += 1
        if (fallback is None or fallback.num_tokens > DEFER_MAX_PADDING * key.num_tokens
                or self._missing_met[key] >= COMPILE_WHEN_MET):
            self._compile_in_background(key, args)

    def _compile_in_background(self, key: ProgramKey, args) -> None:
        if key in self._programs or key in self._compiling:
            return
        # the weights, the cache and the fed tokens by shape only: the steps donate the
        # cache and replace the tokens meanwhile
        args = (*jax.tree.map(_shape_of, args[:3]), *args[3:])
        self._compiling[key] = self._compile_pool.submit(self._timed_compile, key, args)

    def _timed_compile(self, key, args):
        start = time.perf_counter()
        program = self._compile(key, args)
        with self._compile_lock:
            self.background_compile_seconds += time.perf_counter() - start
        return program

    def dummy_step(self, vocab_size: int, T: int, R: int, MB: int,
                    paths: SamplerPaths = PLAIN_RANDOM_PATHS):
        """(key, args) of a step of T tokens and R rows whose inputs touch only the null
        block 0; the key is the one `execute_async` gives such a batch of requests whose
        sampling takes `paths` (default: default `SamplingParams`)."""
        zeros = lambda *shape: np.zeros(shape, np.int32)
        qsl = np.minimum(np.arange(R + 1), T).astype(np.int32)
        meta = AttentionMetadata(qsl, np.ones(R, np.int32), zeros(R, MB), zeros(T))
        sampling, _ = build_sampling_metadata([], vocab_size, pad_rows_to=R, device_put=False)
        key = ProgramKey(sampling.shape_key, paths, T, R, MB, None, 1, None, None)
        feed = np.full(T, -1, np.int32)
        return key, (self.weights, self.kv, self._last_tokens, zeros(T), feed, zeros(T), meta,
                     zeros(R), sampling, zeros(1), zeros(1))

    def dummy_multi_step(self, vocab_size: int, T: int, MB: int,
                          paths: SamplerPaths = PLAIN_RANDOM_PATHS):
        """(key, args) of a multi-step decode of T rows of `num_scheduler_steps` steps that
        touches only the null block, as `dummy_step`."""
        K = self.num_scheduler_steps
        zeros = lambda *shape: np.zeros(shape, np.int32)
        meta = AttentionMetadata(np.arange(T + 1, dtype=np.int32), np.ones(T, np.int32),
                                 zeros(T, MB), zeros(T))
        sampling, _ = build_sampling_metadata([], vocab_size, pad_rows_to=T, device_put=False)
        key = ProgramKey(sampling.shape_key, paths, T, T, MB, None, 1, None, None, K)
        return key, (self.weights, self.kv, self._last_tokens, zeros(T), np.full(T, -1, np.int32),
                     zeros(T), np.ones(T, np.int32), meta, zeros(K, T), sampling)

    def multi_step_rows(self, num_rows: int) -> int:
        """The rows T (one token each) a multi-step decode of `num_rows` requests is padded
        to: a decode step's token bucket, but never more rows than the engine runs."""
        return min(self.token_bucket(num_rows), self.max_reqs_bucket)

    def multi_step_token_bucket(self, num_rows: int) -> Optional[int]:
        """The rows T a multi-step decode of `num_rows` requests runs padded to, if it can
        run now: no larger than a step's token budget (the profile run's peak), and (with a
        background compile pool) its program, or one of more rows, compiled for the default
        sampling; None otherwise (then the batch takes single steps). A batch whose table
        width or sampler paths that program does not cover compiles its own on the step's
        path."""
        if self.num_scheduler_steps <= 1 or num_rows > self.max_reqs_bucket:
            return None
        T = self.multi_step_rows(num_rows)
        if T > self.max_tokens_bucket:
            return None
        if self._compile_pool is None:
            return T
        ready = [k.num_tokens for k in self._ready_keys()
                 if k.num_steps == self.num_scheduler_steps and k.num_tokens >= T]
        return min(ready, default=None)

    def resize_kv_cache(self, num_blocks: int) -> None:
        for future in self._compiling.values():
            future.cancel()
        self._compiling.clear()
        self.kv = None  # let the old cache go before the new one is allocated
        self._programs.clear()  # they were compiled for the old cache shape
        self.kv = self._allocate_kv(num_blocks, self.kv_dtype)

    def _allocate_kv(self, num_blocks: int, dtype):
        if self.mesh is None:
            return allocate_kv_cache(self.cfg, num_blocks, self.block_size, dtype)
        return parallel.allocate_kv_cache(self.cfg, num_blocks, self.block_size, dtype, self.mesh)

    def _zeros_on_device(self, n: int):
        zeros = np.zeros(n, np.int32)
        return jax.device_put(zeros) if self.mesh is None else parallel.replicate(zeros, self.mesh)

    def _shard_inputs(self, args, key=None):
        """Tensor parallel: the step's host inputs replicated over the mesh. With several
        processes, process 0 (the one that schedules) first sends them, with the program
        key, to the others, which run the same step (jaxvllm/distributed.py)."""
        if key is not None and jax.process_count() > 1:
            from jaxvllm import distributed

            distributed.send_step(key, args[3:])
        return (*args[:3], *parallel.replicate(args[3:], self.mesh))

    def run_step(self, key, host_inputs) -> None:
        """Run the step process 0 broadcast (the other processes' side of `execute`)."""
        args = self._shard_inputs((self.weights, self.kv, self._last_tokens, *host_inputs))
        _, _, self.kv, self._last_tokens = self._program(key, args)(*args)

    def profile_run(self, vocab_size: int) -> None:
        """Run the largest step (every token and row, the widest block table, all of the
        sampler's work) on dummy inputs that touch only the null block, so that peak device
        memory can be read."""
        key, args = self.dummy_step(vocab_size, self.max_tokens_bucket, self.max_reqs_bucket,
                                     self.max_table_width, ALL_PATHS)
        if self.mesh is not None:
            args = self._shard_inputs(args)
        _, _, self.kv, _ = self._program(key, args)(*args)
        jax.block_until_ready(self.kv)

    def execute(self, scheduled, vocab_size: int) -> StepResult:
        """Run one step for `scheduled`: the scheduler's rows (`ScheduledRequest`) in batch
        order."""
        return self.execute_async(scheduled, vocab_size).result()

    def execute_async(self, scheduled, vocab_size: int, num_steps: int = 1) -> "PendingStep":
        """Dispatch one step and return at once; its `result()` waits for the device. In
        between, the engine may finish, add or schedule requests (and fold in an earlier
        step): `result()` reads only the rows' request ids and `do_sample`. A row may compute
        a token the previous step dispatched samples (asynchronous scheduling): it is read on
        the device. `num_steps` > 1: a multi-step decode (each row's `num_new_tokens` steps,
        at most `num_steps`); its result holds each row's list of tokens."""
        if num_steps > 1:
            return self._execute_multi_step(scheduled, vocab_size, num_steps)
        started = time.perf_counter()
        total = sum(s.num_new_tokens for s in scheduled)
        T = self.token_bucket(total)
        MB = self._table_width(scheduled)

        key, args, prompt_spans, num_logprobs = self._step_inputs(scheduled, vocab_size, T, MB)
        padding_for = None  # (key, T) of the program this step lacks, where it runs padded
        if self._compile_pool is None and self.planner is None and not self._ready(key):
            larger = self._ready_larger(key)
            if (larger is not None and larger.num_tokens <= DEFER_MAX_PADDING * T
                    and self._runs_padded(key, args)):
                padding_for = (key, T)
                T, key, args, prompt_spans, num_logprobs = self._padded_onto(
                    larger, scheduled, vocab_size, MB)
        elif self._compile_pool is not None and not self._ready(key):
            # Compiled in the background, not on the step's path: meanwhile the step runs on
            # a compiled program that does more, if there is one: the same sizes with more of
            # the sampler's work, else a larger step, padded (on a GPU a decode step of 256
            # rows costs about what one of 16 does). Tokens are the same up to float
            # rounding: a matmul's result bits may depend on its row count, so whether this
            # happens (compile timing) can change a sample.
            own_key, own_args = key, args
            if (covering := self._ready_covering(key)) is not None:
                key = covering
            elif (larger := self._ready_larger(key)) is not None:
                T, key, args, prompt_spans, num_logprobs = self._padded_onto(
                    larger, scheduled, vocab_size, MB)
            self._compile_when_due(own_key, own_args, fallback=None if key == own_key else key)
        if self.mesh is not None:
            args = self._shard_inputs(args, key)
        program = self._program(key, args)
        launched = time.perf_counter()
        out, prompt_out, self.kv, self._last_tokens = program(*args)
        self._last_rows = {s.request: i for i, s in enumerate(scheduled) if s.do_sample}
        if self._queue_host_copies:
            # the copy of the sampled tokens to the host is queued now, ahead of any step
            # dispatched before this one is collected
            for a in jax.tree.leaves((out, prompt_out)):
                a.copy_to_host_async()
        return PendingStep(functools.partial(self._finish, scheduled, out, prompt_out,
                                             prompt_spans, num_logprobs, total, T,
                                             launched - started, launched, padding_for))

    def _execute_multi_step(self, scheduled, vocab_size: int, num_steps: int) -> "PendingStep":
        if num_steps != self.num_scheduler_steps:
            raise ValueError(f"a multi-step decode of {num_steps} steps; this runner's programs "
                             f"run {self.num_scheduler_steps}")
        started = time.perf_counter()
        T = self.multi_step_token_bucket(len(scheduled))
        if T is None:  # its program compiles in the background meanwhile: wait for it
            T = self.multi_step_rows(len(scheduled))
        MB = self._table_width(scheduled)
        ids, feed, pos, steps, meta, slots = multi_step_arrays(scheduled, T, num_steps, MB,
                                                               self.block_size, self._last_rows)
        sampling = self._multi_step_sampling([s.request for s in scheduled], vocab_size, T)
        # a row samples its first token after those in flight: its pending outputs less its own
        first_output = sampling.step_positions.copy()
        first_output[:len(scheduled)] = [
            s.request.num_output_tokens + s.request.num_pending_outputs - s.num_new_tokens
            for s in scheduled]
        sampling = dataclasses.replace(sampling, step_positions=first_output)
        key = ProgramKey(sampling.shape_key, SamplerPaths.of(sampling), T, T, MB, None, 1,
                         None, None, num_steps)
        args = (self.weights, self.kv, self._last_tokens, ids, feed, pos, steps, meta, slots,
                sampling)
        if self._compile_pool is not None and not self._ready(key):
            own_key = key
            if (covering := self._ready_covering(key)) is not None:
                key = covering
            self._compile_when_due(own_key, args, fallback=None if key == own_key else key)
        program = self._program(key, args)
        launched = time.perf_counter()
        tokens, self.kv, self._last_tokens = program(*args)
        self._last_rows = {s.request: i for i, s in enumerate(scheduled)}
        if self._queue_host_copies:
            tokens.copy_to_host_async()
        total = int(steps.sum())

        def finish() -> StepResult:
            columns = np.asarray(tokens).T.tolist()  # waits for the device
            self.counters.record(total, T * num_steps, launched - started,
                                 time.perf_counter() - launched, multi_step=True)
            return StepResult({s.request.request_id: column[:s.num_new_tokens]
                               for s, column in zip(scheduled, columns)}, {}, {})
        return PendingStep(finish)

    def _multi_step_sampling(self, reqs: list, vocab_size: int, T: int):
        """The sampling metadata of a multi-step decode of `reqs` padded to T rows: the last
        call's when it had the same requests in the same order (a decode batch's usual case:
        a request's params do not change; the caller sets the positions)."""
        cached = self._last_multi_step_sampling
        if (cached is not None and cached[0] == T and len(cached[1]) == len(reqs)
                and all(map(operator.is_, cached[1], reqs))):
            return cached[2]
        sampling, _ = build_sampling_metadata(reqs, vocab_size, pad_rows_to=T, device_put=False)
        self._last_multi_step_sampling = (T, reqs, sampling)
        return sampling

    def _table_width(self, scheduled) -> int:
        """The block-table width MB of a step: enough blocks for every row's new tokens,
        bucketed (a planned variant gets its blocks from the plan, not a table on the
        device: the widest row's count)."""
        widest = max(-(-(s.num_computed_tokens + s.num_new_tokens) // self.block_size)
                     for s in scheduled)
        if self.planner:
            return widest
        return bucket(widest, self.min_table_width, self.max_table_width)

    def _step_inputs(self, scheduled, vocab_size: int, T: int, MB: int):
        """(key, args, prompt_spans, num_logprobs) of a step of `scheduled` padded to T tokens
        and a block table MB wide."""
        bs = self.block_size
        # Every request has a token, so R <= T: one row count per token bucket keeps the
        # number of programs down, and a padded row costs only its logits.
        R = min(self.max_reqs_bucket, T)
        ids, feed, pos, slots, qsl, seq_lens, tables, logits_idx = step_arrays(
            scheduled, T, R, MB, bs, self._last_rows)
        rows = [s.request for s in scheduled]
        sampling, num_logprobs = build_sampling_metadata(rows, vocab_size, pad_rows_to=R,
                                                         device_put=False)
        prompt_idx, prompt_targets, prompt_spans, num_prompt_logprobs = self._prompt_logprob_inputs(
            scheduled, qsl)
        key = ProgramKey(sampling.shape_key, SamplerPaths.of(sampling), T, R,
                         None if self.planner else MB, None, len(prompt_idx), num_logprobs,
                         num_prompt_logprobs)
        if self.planner:
            sizes = self._compiled_plan_sizes(key, self.planner.sizes(qsl, seq_lens, bs))
            key = key._replace(plan_sizes=sizes)
            plan = self.planner.build(qsl, seq_lens, tables, T, bs, sizes)
            meta = AttentionMetadata(qsl, seq_lens, None, slots, plan)
        else:
            meta = AttentionMetadata(qsl, seq_lens, tables, slots)
        args = (self.weights, self.kv, self._last_tokens, ids, feed, pos, meta, logits_idx,
                sampling, prompt_idx, prompt_targets)
        return key, args, prompt_spans, num_logprobs

    def _padded_onto(self, larger: ProgramKey, scheduled, vocab_size: int, MB: int):
        """(T, key, args, prompt_spans, num_logprobs) of the step of `scheduled` run on the
        compiled program `larger` (`_ready_larger`): its inputs padded to that program's
        tokens, its key that program's (whose sampler paths may cover more)."""
        T = larger.num_tokens
        _, args, prompt_spans, num_logprobs = self._step_inputs(scheduled, vocab_size, T, MB)
        return T, larger, args, prompt_spans, num_logprobs

    def _expected_compile_seconds(self) -> float:
        """What compiling a missing program is taken to cost: the mean compile time of the
        programs this runner has (0 before the first: nothing to run padded on then)."""
        return sum(self._compile_costs) / max(len(self._compile_costs), 1)

    def _ready_larger(self, key: ProgramKey) -> Optional[ProgramKey]:
        """The key of the smallest compiled program for more tokens (and rows) that runs
        `key`'s step padded: the same but for the sizes, sampler paths covering `key`'s."""
        def runs_padded(other: ProgramKey) -> bool:
            sizes = dict(sampling_shape=key.sampling_shape, sampler_paths=key.sampler_paths,
                         num_tokens=key.num_tokens, num_rows=key.num_rows)
            return (other.num_tokens > key.num_tokens
                    and other.sampling_shape[1:] == key.sampling_shape[1:]
                    and other.sampler_paths.covers(key.sampler_paths)
                    and other._replace(**sizes) == key)
        return min(filter(runs_padded, self._ready_keys()), key=lambda k: k.num_tokens,
                   default=None)

    def _finish(self, scheduled, out, prompt_out, prompt_spans, num_logprobs, total, T,
                host_seconds, launched, padding_for=None) -> StepResult:
        if self.mesh is not None:
            out, prompt_out = parallel.fetch((out, prompt_out))
        result = self._collect(scheduled, out, num_logprobs)  # waits for the device
        device_seconds = time.perf_counter() - launched
        self.counters.record(total, T, host_seconds, device_seconds)
        if padding_for is not None:
            # the padded share of the step's time: more than the padding cost where a step
            # has a fixed part (reading the weights), so its program comes sooner, not later
            own_key, own_T = padding_for
            self._paid_padding(own_key, device_seconds * (1 - own_T / T))
        if prompt_out is not None:
            values, ids, ranks = (np.asarray(a) for a in prompt_out)
            for rid, first, start, count in prompt_spans:
                rows_ = range(start, start + count)
                result.prompt_logprobs[rid] = (first, [(ids[j].tolist(), values[j].tolist(),
                                                        int(ranks[j])) for j in rows_])
        return result

    def _compiled_plan_sizes(self, key, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """Those of a compiled program that differs only in plan sizes and that the planner
        would rather pad `sizes` to (the smallest such), else the sizes to compile."""
        best = None
        for other in self._programs:
            have = other.plan_sizes
            if (other.same_but_plan(key) and have is not None
                    and self.planner.fits(sizes, have)
                    and (best is None or sum(have) < sum(best))):
                best = have
        return self.planner.compile_sizes(sizes) if best is None else best

    @staticmethod
    def _prompt_logprob_inputs(scheduled, qsl):
        """Rows of the batch whose logits score the next prompt token, for requests that asked
        for prompt logprobs: (token indices, target ids, spans, k or None)."""
        idx, targets, spans, ks = [], [], [], []
        for i, row in enumerate(scheduled):
            req, n = row.request, row.num_new_tokens
            k = getattr(req.sampling_params, "prompt_logprobs", None)
            start = row.num_computed_tokens
            last = min(start + n, req.num_prompt_tokens - 1)  # positions that predict a prompt token
            if k is None or last <= start:
                continue
            ks.append(k)
            spans.append((req.request_id, start, len(idx), last - start))
            for p in range(start, last):
                idx.append(qsl[i] + p - start)
                targets.append(req.prompt_token_ids[p + 1])
        if not ks:
            return np.zeros(1, np.int32), np.zeros(1, np.int32), [], None
        size = pow2_at_least(len(idx))
        pad = size - len(idx)
        return (np.asarray(idx + [0] * pad, np.int32), np.asarray(targets + [0] * pad, np.int32),
                spans, pow2_at_least(max(ks)) if max(ks) > 0 else 0)

    def _collect(self, scheduled, out, num_logprobs) -> StepResult:
        tokens = np.asarray(out.token_ids)
        sampled, logprobs = {}, {}
        want = num_logprobs is not None
        lp = np.asarray(out.logprobs) if want else None
        lp_ids = np.asarray(out.logprob_token_ids) if want else None
        ranks = np.asarray(out.sampled_ranks) if want else None
        for i, row in enumerate(scheduled):
            if not row.do_sample:
                continue  # a prompt chunk that does not reach the end samples nothing
            req = row.request
            sampled[req.request_id] = int(tokens[i])
            if want:
                logprobs[req.request_id] = (lp_ids[i].tolist(), lp[i].tolist(), int(ranks[i]))
        return StepResult(sampled, logprobs, {})
