"""The program cache: step executables on disk, loaded by a later engine without tracing,
generating what a compiled one generates; stale, damaged and mismatched entries are misses,
and programs JAX's own cache supplied are not stored."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvllm.engine import program_cache
from jaxvllm.engine.program_cache import ProgramCache


def unique_program(n: int = 8):
    """A function XLA has never compiled (a random constant in it, so JAX's cache cannot
    supply it) and its argument. The constant is at least 3, so that no value sin(x) * 2 +
    nonce lies near zero, where float32 rounding exceeds the tests' relative tolerance."""
    nonce = 3 + random.random()
    return (lambda x: jnp.sin(x) * 2 + nonce), jnp.arange(n, dtype=jnp.float32), nonce


def compiler(fn, x):
    calls = []

    def compile():
        calls.append(1)
        return jax.jit(fn).lower(x).compile()

    return compile, calls


def test_a_stored_program_is_loaded_and_computes_the_same(tmp_path):
    fn, x, nonce = unique_program()
    cache = ProgramCache(tmp_path)
    key = cache.key("test", nonce)
    compile, calls = compiler(fn, x)
    first = cache.get_or_compile(key, (x,), compile)
    assert calls == [1] and len(list(tmp_path.glob("*.program"))) == 1
    again = ProgramCache(tmp_path).get_or_compile(key, (x,), compile)
    assert calls == [1]  # loaded, not compiled
    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(first(x)))
    np.testing.assert_allclose(np.asarray(again(x)), np.sin(np.arange(8)) * 2 + nonce,
                               rtol=1e-6)


def test_compile_time_and_rent_are_kept_beside_the_entries(tmp_path):
    """An entry keeps its compile time, which a later process reads when it loads it; the
    rent (step seconds run padded for want of a program) adds up across processes until
    the program is stored."""
    fn, x, nonce = unique_program()
    cache = ProgramCache(tmp_path)
    key = cache.key("test", nonce)
    assert cache.rent(key) == 0.0
    cache.add_rent(key, 0.25)
    ProgramCache(tmp_path).add_rent(key, 0.5)
    assert cache.rent(key) == 0.75 and not cache.holds(key)
    cache.get_or_compile(key, (x,), compiler(fn, x)[0])
    assert cache.holds(key) and cache.rent(key) == 0.0  # paid off
    later = ProgramCache(tmp_path)
    later.get_or_compile(key, (x,), compiler(fn, x)[0])
    assert later.hits == 1 and later.compile_seconds[key] == cache.compile_seconds[key] > 0


def test_an_entry_for_other_arguments_is_a_miss_and_removed(tmp_path):
    fn, x, nonce = unique_program()
    cache = ProgramCache(tmp_path)
    key = cache.key("test", nonce)
    cache.get_or_compile(key, (x,), compiler(fn, x)[0])
    other = jnp.arange(16, dtype=jnp.float32)
    assert cache.load(key, (other,)) is None
    assert not list(tmp_path.glob("*.program")) and (cache.hits, cache.misses) == (0, 2)


def test_a_damaged_entry_is_a_miss_and_compiled_again(tmp_path):
    fn, x, nonce = unique_program()
    cache = ProgramCache(tmp_path)
    key = cache.key("test", nonce)
    compile, calls = compiler(fn, x)
    cache.get_or_compile(key, (x,), compile)
    (entry,) = tmp_path.glob("*.program")
    entry.write_bytes(entry.read_bytes()[:100])
    out = ProgramCache(tmp_path).get_or_compile(key, (x,), compile)
    assert calls == [1, 1]
    np.testing.assert_allclose(np.asarray(out(x)), np.sin(np.arange(8)) * 2 + nonce, rtol=1e-6)
    assert ProgramCache(tmp_path).load(key, (x,)) is not None  # stored again, whole


def test_a_program_from_jax_cache_is_not_stored(tmp_path):
    """Once XLA compiled it, JAX's persistent cache (on in the tests) holds it: a second
    compile comes from there, and its executable does not serialize whole on the CPU."""
    if not jax.config.jax_compilation_cache_dir:
        pytest.skip("JAX's persistent compilation cache is off")
    fn, x, nonce = unique_program()
    first, second = ProgramCache(tmp_path / "a"), ProgramCache(tmp_path / "b")
    for cache in (first, second):
        cache.directory.mkdir()
        jax.clear_caches()  # the in-memory cache would answer before the persistent one
        cache.get_or_compile(cache.key("test", nonce), (x,), compiler(fn, x)[0])
    assert len(list(first.directory.glob("*.program"))) == 1
    assert not list(second.directory.glob("*.program"))


def test_the_key_follows_source_environment_and_parts(monkeypatch):
    key = ProgramCache.key("model", (1, 2))
    assert key == ProgramCache.key("model", (1, 2))
    assert key != ProgramCache.key("model", (1, 3))
    monkeypatch.setattr(program_cache, "source_fingerprint", lambda: "edited")
    assert key != ProgramCache.key("model", (1, 2))
    monkeypatch.undo()
    with jax.default_matmul_precision("highest"):  # a jax setting in this thread
        assert key != ProgramCache.key("model", (1, 2))
    monkeypatch.setattr(program_cache, "environment_fingerprint", lambda: "other jax")
    assert key != ProgramCache.key("model", (1, 2))


def test_entries_past_the_size_limit_are_evicted_oldest_first(tmp_path):
    cache = ProgramCache(tmp_path)
    keys = []
    for age in range(3):
        fn, x, nonce = unique_program()
        keys.append(cache.key("test", nonce))
        cache.get_or_compile(keys[-1], (x,), compiler(fn, x)[0])
        os.utime(cache._path(keys[-1]), (1000 + age, 1000 + age))
    sizes = [cache._path(k).stat().st_size for k in keys]
    cache.max_bytes = sizes[1] + sizes[2]
    cache._evict()
    assert [cache._path(k).exists() for k in keys] == [False, True, True]


def test_the_cache_lives_beside_jax_cache_and_has_its_own_switch(monkeypatch):
    if not jax.config.jax_compilation_cache_dir:
        pytest.skip("JAX's persistent compilation cache is off")
    monkeypatch.delenv("JAXVLLM_PROGRAM_CACHE", raising=False)
    cache = ProgramCache.default()
    assert cache.directory.parent == Path(jax.config.jax_compilation_cache_dir)
    monkeypatch.setenv("JAXVLLM_PROGRAM_CACHE", "0")
    assert ProgramCache.default() is None


ENGINE_RUN = """
import json, logging, sys
from jaxvllm import LLM, SamplingParams
log = logging.getLogger("jaxvllm.engine.program_cache")  # why an entry is missed or not stored
log.setLevel(logging.DEBUG)
log.addHandler(logging.StreamHandler())
llm = LLM(sys.argv[1], attention_backend="reference", max_model_len=64, max_num_seqs=4,
          max_num_batched_tokens=32)
out = llm.generate([{"prompt_token_ids": [3, 14, 15, 92]}, {"prompt_token_ids": [6, 5]}],
                   [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                    SamplingParams(max_tokens=6, seed=7, ignore_eos=True)], use_tqdm=False)
stats = llm.llm_engine.stats()
print(json.dumps({"tokens": [o.outputs[0].token_ids for o in out],
                  "hits": stats["program_cache_hits"], "compiled": stats["num_compiled_programs"]}))
"""


def run_engine(model, cache_dir, **env) -> dict:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **env}
    proc = subprocess.run([sys.executable, "-c", ENGINE_RUN, str(model)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["log"] = [line for line in proc.stderr.splitlines() if line.startswith("program")]
    return result


def test_a_new_process_loads_the_step_programs_and_generates_the_same(llama_folder, tmp_path):
    """Cold, then warm in a fresh process: every step program comes from the program cache
    (nothing traced), and the greedy and seeded tokens equal the cold run's and those of a
    run on JAX's cache alone."""
    cold = run_engine(llama_folder, tmp_path)
    assert cold["hits"] == 0 and cold["compiled"] >= 2
    stored = list((tmp_path / "jaxvllm-programs").glob("*.program"))
    assert len(stored) == cold["compiled"], cold["log"]
    warm = run_engine(llama_folder, tmp_path)
    assert warm["hits"] == warm["compiled"] == cold["compiled"], warm["log"]
    assert warm["tokens"] == cold["tokens"]
    alone = run_engine(llama_folder, tmp_path, JAXVLLM_PROGRAM_CACHE="0")
    assert alone["tokens"] == cold["tokens"] and alone["hits"] == 0


def test_the_small_batch_tiling_overrides_are_part_of_the_key(monkeypatch):
    from pallas_kernels.small_batch_matmul import TILINGS_ENV

    monkeypatch.delenv(TILINGS_ENV, raising=False)
    plain = program_cache.environment_fingerprint()
    monkeypatch.setenv(TILINGS_ENV, '{"4864x896": [64, 18]}')
    assert program_cache.environment_fingerprint() != plain
