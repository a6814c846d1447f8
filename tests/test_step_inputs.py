"""The runner's host side: step arrays built with numpy equal a plain per-request loop, and
the default XLA flags leave what the user set alone."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import jax
import numpy as np
import pytest

from jaxvllm.engine.runner import step_arrays
from jaxvllm.engine.scheduler import ScheduledRequest
from jaxvllm.xla_flags import step_compiler_options, with_defaults


@dataclass(eq=False)
class FakeRequest:
    all_token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int] = field(default_factory=list)
    request_id: str = "r"

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def rows(scheduled):
    """(request, num_new_tokens) pairs as the scheduler's rows."""
    return [ScheduledRequest(req, n, req.num_computed_tokens, req.block_ids,
                             req.num_computed_tokens + n == req.num_tokens)
            for req, n in scheduled]


def loop_reference(scheduled, T, R, MB, bs):
    """The arrays as the one-request-at-a-time loop builds them."""
    ids, pos, slots = np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, np.int32)
    total = sum(n for _, n in scheduled)
    qsl = np.full(R + 1, total, np.int32)
    seq_lens, logits_idx = np.zeros(R, np.int32), np.zeros(R, np.int32)
    tables = np.zeros((R, MB), np.int32)
    t = 0
    for i, (req, n) in enumerate(scheduled):
        start = req.num_computed_tokens
        blocks = req.block_ids[:MB]
        qsl[i] = t
        for j in range(n):
            p = start + j
            ids[t + j] = req.all_token_ids[p]
            pos[t + j] = p
            slots[t + j] = blocks[p // bs] * bs + p % bs
        seq_lens[i] = start + n
        tables[i, :len(blocks)] = blocks
        t += n
        logits_idx[i] = t - 1
    return ids, pos, slots, qsl, seq_lens, tables, logits_idx


def make_batch(rng, specs, bs, spare_blocks=0):
    """specs: (num_computed, num_new) per request; blocks are distinct random ids."""
    free = list(rng.permutation(np.arange(1, 10_000)))
    scheduled = []
    for computed, new in specs:
        length = computed + new
        blocks = [int(free.pop()) for _ in range(-(-length // bs) + spare_blocks)]
        tokens = rng.integers(0, 50_000, length + 3).tolist()
        scheduled.append((FakeRequest(tokens, computed, blocks), new))
    return scheduled


@pytest.mark.parametrize("specs, T, R, MB, spare", [
    ([(37, 1)], 16, 16, 8, 0),  # one decode, padded rows and tokens
    ([(100, 1)] * 5 + [(0, 40), (16, 16), (3, 1)], 128, 16, 16, 0),  # decodes, prefills, chunks
    ([(0, 1), (15, 1), (16, 1), (17, 1)], 16, 4, 2, 0),  # block boundaries
    ([(30, 2), (0, 64)], 128, 16, 4, 3),  # requests holding more blocks than the table is wide
])
def test_step_arrays_equal_a_loop_over_requests(specs, T, R, MB, spare):
    rng = np.random.default_rng(len(specs) + T)
    bs = 16
    scheduled = make_batch(rng, specs, bs, spare)
    ids, feed, *got = step_arrays(rows(scheduled), T, R, MB, bs)
    got = [ids, *got]
    want = loop_reference(scheduled, T, R, MB, bs)
    names = ("ids", "pos", "slots", "qsl", "seq_lens", "tables", "logits_idx")
    for name, g, w in zip(names, got, want):
        assert g.dtype == np.int32 and g.shape == w.shape, name
        np.testing.assert_array_equal(g, w, err_msg=name)
    assert (feed == -1).all()  # every token id is known on the host
    # padding tokens write into the null block 0
    total = sum(n for _, n in specs)
    assert not got[2][total:].any()


def test_tokens_the_step_in_flight_samples_are_fed_from_its_rows():
    """Asynchronous scheduling: a decode row whose token the previous step samples gets
    feed = that step's row of the request (its id slot is 0); the other tokens come from the
    host; a pending token no step in flight samples is an error."""
    bs = 4
    known = FakeRequest([5, 6, 7], 1, [3], "known")  # a prompt chunk: tokens 6, 7
    pending_a = FakeRequest([9, 8, 7, 6, 5], 5, [4, 5], "a")  # computes position 5: pending
    pending_b = FakeRequest([1, 2], 2, [6], "b")
    scheduled = [ScheduledRequest(known, 2, 1, known.block_ids, True),
                 ScheduledRequest(pending_a, 1, 5, pending_a.block_ids, True),
                 ScheduledRequest(pending_b, 1, 2, pending_b.block_ids, True)]
    ids, feed, pos, slots, *_ = step_arrays(scheduled, 16, 4, 2, bs,
                                            {pending_a: 7, pending_b: 0, known: 3})
    np.testing.assert_array_equal(ids[:4], [6, 7, 0, 0])
    np.testing.assert_array_equal(feed[:4], [-1, -1, 7, 0])
    assert (feed[4:] == -1).all()
    np.testing.assert_array_equal(pos[:4], [1, 2, 5, 2])
    np.testing.assert_array_equal(slots[:4], [3 * bs + 1, 3 * bs + 2, 5 * bs + 1, 6 * bs + 2])
    with pytest.raises(RuntimeError, match=r"\['b'\]"):
        step_arrays(scheduled, 16, 4, 2, bs, {pending_a: 7})


@pytest.mark.parametrize("given, expected", [
    ("", "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"),
    ("--xla_force_host_platform_device_count=4",
     "--xla_force_host_platform_device_count=4 "
     "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"),
    ("--xla_gpu_enable_command_buffer=", "--xla_gpu_enable_command_buffer="),  # user's choice
    (" --xla_gpu_enable_command_buffer=FUSION ", "--xla_gpu_enable_command_buffer=FUSION"),
])
def test_default_xla_flags_keep_the_users(given, expected):
    assert with_defaults(given) == expected


@pytest.mark.parametrize("given, expected", [
    ("", "rematerialization"),
    ("--xla_disable_hlo_passes=foo,bar --xla_cpu_x=1", "foo,bar,rematerialization"),
    ("--xla_disable_hlo_passes=rematerialization", "rematerialization"),
])
def test_step_programs_disable_rematerialization_keeping_the_users_passes(given, expected):
    assert step_compiler_options(given) == {"xla_disable_hlo_passes": expected}


def test_step_programs_compile_with_those_options(llama_folder, monkeypatch):
    """The runner hands step_compiler_options() to XLA: an option XLA does not know fails
    the compilation."""
    from jaxvllm import LLM, SamplingParams, xla_flags

    llm = LLM(str(llama_folder), attention_backend="reference", max_model_len=64,
              max_num_seqs=2, max_num_batched_tokens=16, precompile=False)
    monkeypatch.setattr(xla_flags, "step_compiler_options", lambda: {"xla_no_such_option": "1"})
    with pytest.raises(Exception, match="xla_no_such_option"):
        llm.generate([{"prompt_token_ids": [3, 14, 15]}], SamplingParams(max_tokens=2),
                     use_tqdm=False)


# ---------------------------------------------------------------------------------------------
# Background precompilation of the decode buckets
# ---------------------------------------------------------------------------------------------


def test_precompiled_programs_serve_the_steps(llama_folder):
    """precompile=True compiles the decode buckets in background threads; the steps that
    reach them use those programs (no second compilation) and generate what an engine
    compiling on demand generates."""
    from jaxvllm import LLM, SamplingParams

    kwargs = dict(attention_backend="reference", max_model_len=64, max_num_seqs=4,
                  max_num_batched_tokens=32)
    digits = [3, 14, 15, 92, 65, 35, 89, 79, 32]
    prompts = [{"prompt_token_ids": digits[: 7 + i // 2 + i // 3]} for i in range(4)]  # 31 tokens: one 32-token step
    # 4, 3, 2, then 1 request decoding: every decode bucket is reached
    # default sampling (seeded): the precompiled programs are the steps' own
    params = [SamplingParams(max_tokens=5 + i, seed=i, ignore_eos=True) for i in range(4)]

    eager = LLM(str(llama_folder), **kwargs, precompile=False)
    assert not eager.llm_engine.runner._compiling
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]

    llm = LLM(str(llama_folder), **kwargs, precompile=True)
    runner = llm.llm_engine.runner
    pending = set(runner._compiling)
    # the full budget, then the decode buckets (on the CPU every power of two up to 4 rows)
    decode = {16} if jax.default_backend() == "gpu" else {4, 2, 1}
    assert {key.num_tokens for key in pending} == {32, *decode}
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    # every step ran on a precompiled program (its own, or a larger one while its own was
    # still compiling)
    assert set(runner._programs) <= pending
    for future in runner._compiling.values():
        future.result()
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert again == want
    assert pending == set(runner._programs)  # each bucket compiled once, in the background
    assert not runner._compiling
    assert runner.background_compile_seconds > 0


def test_sampler_shortcuts_are_part_of_the_program_key(llama_folder):
    """The sampler's shortcuts are decided on the host: a step program holds no data-dependent
    branch (on a GPU its predicate would stall the host), and each combination a batch needs
    gets its own program (greedy alone: the argmax only; top-p: the sort)."""
    from jaxvllm import LLM, SamplingParams
    from jaxvllm.engine.sampler import PLAIN_RANDOM_PATHS, SamplerPaths

    llm = LLM(str(llama_folder), attention_backend="reference", max_model_len=64,
              max_num_seqs=2, max_num_batched_tokens=32)
    runner = llm.llm_engine.runner
    prompt = [{"prompt_token_ids": [3, 14, 15, 92]}]

    def run(**kw):
        return llm.generate(prompt, SamplingParams(max_tokens=3, ignore_eos=True, seed=0, **kw),
                            use_tqdm=False)[0].outputs[0].token_ids

    def paths():
        return {k.sampler_paths for k in runner._programs}

    run(temperature=1.0)
    assert paths() == {PLAIN_RANDOM_PATHS}
    for program in runner._programs.values():
        assert "conditional" not in program.as_text()
    run(temperature=0.0)
    assert paths() == {PLAIN_RANDOM_PATHS, SamplerPaths(False, False, False, False)}
    run(temperature=1.0, top_p=0.5)
    assert SamplerPaths(False, False, True, True) in paths()


def test_a_batch_runs_on_a_program_doing_more_while_its_own_compiles(llama_folder,
                                                                     monkeypatch):
    """With background compilation (precompile), a greedy batch whose own programs are not
    ready runs on the default-sampling ones (same tokens) instead of waiting; once its own
    are compiled, it runs on them."""
    from jaxvllm import LLM, SamplingParams
    from jaxvllm.engine.runner import ModelRunner
    from jaxvllm.engine.sampler import SamplerPaths

    kwargs = dict(attention_backend="reference", max_model_len=64, max_num_seqs=4,
                  max_num_batched_tokens=32)
    prompts = [{"prompt_token_ids": [3, 14, 15, 92][: 2 + i]} for i in range(3)]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    want = LLM(str(llama_folder), **kwargs).generate(prompts, params, use_tqdm=False)
    greedy = SamplerPaths(False, False, False, False)

    original, release = ModelRunner._compile, threading.Event()

    def held_greedy(self, key, args):
        if key.sampler_paths == greedy:
            release.wait(60)
        return original(self, key, args)

    monkeypatch.setattr(ModelRunner, "_compile", held_greedy)
    llm = LLM(str(llama_folder), **kwargs, precompile=True)
    runner = llm.llm_engine.runner
    for future in list(runner._compiling.values()):  # default sampling: 32, 4, 2 and 1 tokens
        future.result()
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        assert not release.is_set()
        assert greedy not in {k.sampler_paths for k in runner._programs}
        assert any(k.sampler_paths == greedy for k in runner._compiling)
    finally:
        release.set()
    for future in runner._compiling.values():
        future.result()
    again = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in want]
    assert greedy in {k.sampler_paths for k in runner._programs}


def test_precompile_needs_an_unplanned_backend(llama_folder):
    from jaxvllm import LLM

    with pytest.raises(ValueError, match="precompile=True needs"):
        LLM(str(llama_folder), attention_backend="xla", max_model_len=64, precompile=True)


def test_table_walking_kernels_use_one_table_width(llama_folder, monkeypatch):
    """The Pallas kernels read a request's table only as far as its blocks: one width for
    contexts up to TABLE_WALKING_MIN_CONTEXT_SLOTS, where XLA's reference gathers a width
    bucketed from MIN_CONTEXT_SLOTS."""
    from jaxvllm import LLM
    from jaxvllm.engine import runner as runner_module

    # the model holds 256 tokens: 64-token steps for XLA's gather, all of it for the kernels
    monkeypatch.setattr(runner_module, "MIN_CONTEXT_SLOTS", 64)
    monkeypatch.setattr(runner_module, "TABLE_WALKING_MIN_CONTEXT_SLOTS", 256)

    pallas = LLM(str(llama_folder), attention_backend="pallas", max_model_len=256,
                 max_num_seqs=2).llm_engine.runner
    assert pallas.min_table_width == pallas.max_table_width == 16
    reference = LLM(str(llama_folder), attention_backend="reference", max_model_len=256,
                    max_num_seqs=2).llm_engine.runner
    assert reference.min_table_width == 4 and reference.max_table_width == 16


def test_a_step_whose_program_is_still_compiling_runs_padded_on_a_ready_one(llama_folder,
                                                                           monkeypatch):
    """While the background compilation of a step's own bucket is not done, the step runs on
    a larger compiled program (padded) instead of waiting for it, with the same tokens."""
    from jaxvllm import LLM, SamplingParams
    from jaxvllm.engine.runner import ModelRunner

    kwargs = dict(attention_backend="reference", max_model_len=64, max_num_seqs=4,
                  max_num_batched_tokens=32)
    prompt = [{"prompt_token_ids": [3, 14, 15]}]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    eager = LLM(str(llama_folder), **kwargs)
    want = eager.generate(prompt, params, use_tqdm=False)

    original, release = ModelRunner._compile, threading.Event()
    held = []

    def slow_one_token_step(self, key, args):
        if (threading.current_thread().name.startswith("jaxvllm-compile")
                and key.num_tokens == self.token_bucket(1)):
            held.append(key)
            release.wait(60)
        return original(self, key, args)

    monkeypatch.setattr(ModelRunner, "_compile", slow_one_token_step)
    llm = LLM(str(llama_folder), **kwargs, precompile=True)
    runner = llm.llm_engine.runner
    try:
        got = llm.generate(prompt, params, use_tqdm=False)
        assert held and not release.is_set()  # the one-token program was never waited for
        assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
        one_token = [k for k in runner._programs if k.num_tokens == runner.token_bucket(1)]
        assert not one_token
        # the prompt's step, then five one-token decode steps, each padded to two tokens
        # or more
        assert runner.counters.padded_tokens >= runner.token_bucket(3) - 3 + 5
    finally:
        release.set()


def test_a_missing_program_is_compiled_once_its_step_recurs(llama_folder):
    """A step whose program is missing while a larger one (at most DEFER_MAX_PADDING times
    its size) is compiled runs padded on that one; its own is compiled only once such steps
    have come COMPILE_WHEN_MET times (a one-off step compiles nothing beside the steps after
    it). Tokens as without it."""
    from jaxvllm import LLM, SamplingParams
    from jaxvllm.engine.runner import COMPILE_WHEN_MET, DEFER_MAX_PADDING

    kwargs = dict(attention_backend="reference", max_model_len=64, max_num_seqs=4,
                  max_num_batched_tokens=32)
    prompt = [{"prompt_token_ids": [3, 14, 15, 92, 65]}]  # a prefill of 5 tokens
    params = SamplingParams(max_tokens=1, seed=7)
    want = LLM(str(llama_folder), **kwargs).generate(prompt, params, use_tqdm=False)
    llm = LLM(str(llama_folder), **kwargs, precompile=True, wait_for_precompile=True)
    runner = llm.llm_engine.runner
    T = runner.token_bucket(5)
    own = lambda: [k for k in [*runner._programs, *runner._compiling] if k.num_tokens == T]
    assert not own() and T < 32  # not among the precompiled buckets (32 is)
    for met in range(1, COMPILE_WHEN_MET + 1):
        got = llm.generate(prompt, params, use_tqdm=False)
        assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
        assert bool(own()) == (met == COMPILE_WHEN_MET), met
    llm.llm_engine.wait_for_compiles()
    got = llm.generate(prompt, params, use_tqdm=False)  # on its own program now
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert any(k.num_tokens == T for k in runner._programs)

    # a step that only a much larger program could run (over DEFER_MAX_PADDING times its
    # tokens) has its own compiled at once
    big = LLM(str(llama_folder), **{**kwargs, "max_num_batched_tokens": 256}, precompile=True,
              wait_for_precompile=True)
    runner = big.llm_engine.runner
    T = runner.token_bucket(5)
    assert runner.max_tokens_bucket > DEFER_MAX_PADDING * T and not own()
    got = big.generate(prompt, params, use_tqdm=False)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert own()


def test_without_background_compilation_a_step_runs_padded_until_that_costs_a_compile(
        llama_folder, tmp_path, monkeypatch):
    """Compiling on the step's path (the CPU's way), a step whose program is missing runs
    padded on a compiled larger one, with the same tokens, until the time spent padded
    (summed over processes in the program cache) reaches a compilation's cost; then its
    program is compiled. One the program cache holds is loaded at once."""
    from jaxvllm import LLM, SamplingParams
    from jaxvllm.engine.program_cache import ProgramCache
    from jaxvllm.engine.runner import ModelRunner

    kwargs = dict(attention_backend="reference", max_model_len=64, max_num_seqs=4,
                  max_num_batched_tokens=32)
    prompt = [{"prompt_token_ids": [3, 14, 15, 92, 65]}]  # a prefill of 5 tokens
    long_prompt = [{"prompt_token_ids": list(range(3, 23))}]  # 20 tokens
    params = SamplingParams(max_tokens=1, seed=7)
    tokens = lambda llm, p: llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids
    cache = ProgramCache(tmp_path)

    def engine():
        llm = LLM(str(llama_folder), **kwargs)
        runner = llm.llm_engine.runner
        runner.program_cache = cache
        tokens(llm, long_prompt)  # its program is the larger one
        return llm, runner

    want = tokens(LLM(str(llama_folder), **kwargs), prompt)  # nothing larger: compiled at once
    cost = [1e6]  # the compile time the runners take: none is worth it yet
    monkeypatch.setattr(ModelRunner, "_expected_compile_seconds", lambda self: cost[0])
    llm, runner = engine()
    T = runner.token_bucket(5)
    own = lambda: [k for k in runner._programs if k.num_tokens == T]
    for _ in range(2):
        assert tokens(llm, prompt) == want and not own()
    (key,) = [k for k in runner._padding_seconds if k.num_tokens == T]
    paid, entry = runner._padding_seconds[key], runner._cache_entries[key]
    assert paid > 0 and cache.rent(entry) == pytest.approx(paid)

    llm, runner = engine()  # another process: it goes on from the rent on disk
    assert tokens(llm, prompt) == want and not own()
    assert runner._padding_seconds[key] > paid
    cost[0] = runner._padding_seconds[key]  # the padding has now cost a compilation
    assert tokens(llm, prompt) == want and own()

    llm, runner = engine()
    monkeypatch.setattr(ProgramCache, "holds", lambda self, e: e == entry)
    assert tokens(llm, prompt) == want and own()  # loaded, or compiled where not stored


def test_a_failed_background_compilation_is_done_again_by_the_step(llama_folder, monkeypatch):
    from jaxvllm import LLM, SamplingParams
    from jaxvllm.engine.runner import ModelRunner

    original = ModelRunner._compile
    failed = []

    def flaky(self, key, args):
        in_background = threading.current_thread().name.startswith("jaxvllm-compile")
        if in_background and key.num_tokens == self.token_bucket(1):  # the decode program
            failed.append(key)
            raise RuntimeError("compiler crashed")
        return original(self, key, args)

    monkeypatch.setattr(ModelRunner, "_compile", flaky)
    llm = LLM(str(llama_folder), attention_backend="reference", max_model_len=64,
              max_num_seqs=4, max_num_batched_tokens=32, precompile=True)
    out = llm.generate([{"prompt_token_ids": [3, 14, 15]}],  # default sampling: precompiled
                       SamplingParams(max_tokens=3, seed=0, ignore_eos=True), use_tqdm=False)
    assert len(failed) == 1 and len(out[0].outputs[0].token_ids) == 3
    assert failed[0] in llm.llm_engine.runner._programs  # compiled again on the step's path


@pytest.mark.parametrize("backend", ["cpu", "pallas", "xla"])
def test_unrolled_layers_generate_what_the_scan_generates(llama_folder, backend):
    """Unrolled layers (the default on one device, the CPU's too) run per-layer fused weights
    in a Python loop: the engine's greedy tokens equal the scan's, with the native CPU
    kernel, the Pallas kernel (interpreted here) and the host-planned XLA attention."""
    from jaxvllm import LLM, SamplingParams

    kwargs = dict(attention_backend=backend, max_model_len=64, max_num_seqs=4,
                  max_num_batched_tokens=32)
    prompts = [{"prompt_token_ids": [3, 14, 15, 92, 65, 35, 89][: 2 + i]} for i in range(4)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    scan = LLM(str(llama_folder), **kwargs, unroll_layers=False)
    assert not scan.llm_engine.loaded.model.layers.unstacked
    want = [o.outputs[0].token_ids for o in scan.generate(prompts, params, use_tqdm=False)]
    unrolled = LLM(str(llama_folder), **kwargs)  # unroll_layers unset: the default
    assert unrolled.llm_engine.loaded.model.layers.unstacked
    got = [o.outputs[0].token_ids for o in unrolled.generate(prompts, params, use_tqdm=False)]
    assert got == want


def test_unrolled_layers_are_traced_and_lowered_once(llama_folder):
    """The unrolled step program holds one layer function, called once a layer (tracing and
    lowering each layer apart cost seconds a program on a GPU)."""
    import re

    from jaxvllm import LLM

    llm = LLM(str(llama_folder), attention_backend="pallas", max_model_len=64, max_num_seqs=4,
              max_num_batched_tokens=32, unroll_layers=True)
    runner = llm.llm_engine.runner
    key, args = runner.dummy_step(llm.llm_engine.vocab_size, 16, 4, runner.min_table_width)
    step, args, _ = runner.step_function(key, args)
    text = jax.jit(step).lower(*args).as_text()
    assert runner.cfg.num_layers >= 2
    assert len(re.findall(r"func\.func private @_layer\b", text)) == 1
    assert len(re.findall(r"call @_layer\b", text)) == runner.cfg.num_layers


def test_small_batch_matmuls_generate_what_xla_generates(llama_folder, zoo):
    """With `small_batch_matmuls` (the projections as Pallas kernels, interpreted here) the
    engine's greedy tokens, in single and multi-step decode calls, equal XLA's; the option
    needs unrolled layers and an RMSNorm model."""
    from jaxvllm import LLM, SamplingParams

    kwargs = dict(attention_backend="pallas", max_model_len=64, max_num_seqs=4,
                  max_num_batched_tokens=32, num_scheduler_steps=4)
    prompts = [{"prompt_token_ids": [3, 14, 15, 92, 65, 35, 89][: 2 + i]} for i in range(4)]
    params = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    plain = LLM(str(llama_folder), **kwargs)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    fused = LLM(str(llama_folder), **kwargs, small_batch_matmuls=True)
    runner = fused.llm_engine.runner
    key, args = runner.dummy_multi_step(fused.llm_engine.vocab_size, runner.multi_step_rows(2),
                                        runner.min_table_width)
    step, args, _ = runner.step_function(key, args)
    assert "small_batch_matmul" in str(jax.make_jaxpr(step)(*args))
    got = [o.outputs[0].token_ids for o in fused.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert fused.llm_engine.runner.counters.multi_steps > 0
    with pytest.raises(ValueError, match="small_batch_matmuls=True needs unrolled layers"):
        LLM(str(llama_folder), **kwargs, unroll_layers=False, small_batch_matmuls=True)
    with pytest.raises(ValueError, match="RMSNorm before its projections"):
        LLM(str(zoo.case("opt_prenorm").path), **kwargs, small_batch_matmuls=True)
    # the exact GELU's erf has no Pallas Triton lowering: such a model is not taken
    import dataclasses

    from jaxvllm.models.transformer import small_batch_supported

    cfg = fused.llm_engine.model_config
    assert small_batch_supported(cfg)
    assert not small_batch_supported(dataclasses.replace(cfg, activation="gelu"))
    assert small_batch_supported(dataclasses.replace(cfg, activation="gelu_pytorch_tanh"))
