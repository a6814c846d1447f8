"""The start-up measurement that turns the small-batch kernels on where they are faster
(jaxvllm/engine/autotune.py): its choice, its cache, its failures, and the engine with it."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvllm.engine import autotune
from jaxvllm.models import layers as L
from jaxvllm.models.loader import load_model


def _timing(xla_us, kernels_us, rel_err=0.0):
    return {"xla_us": xla_us, "kernels_us": kernels_us, "rel_err": rel_err}


@pytest.mark.parametrize("timings, rows", [
    ({16: _timing(10, 5), 32: _timing(10, 6), 64: _timing(10, 9)}, 64),
    ({16: _timing(10, 5), 32: _timing(10, 11), 64: _timing(10, 5)}, 16),  # no gap above a loss
    ({16: _timing(10, 9.8), 32: _timing(10, 5)}, 0),  # within the margin: XLA's way
    ({16: _timing(10, 5, rel_err=0.2), 32: _timing(10, 5)}, 0),  # a wrong result
    ({16: {"error": "ValueError: no"}, 32: _timing(10, 5)}, 0),
    ({16: _timing(10, 5), 32: {"error": "RuntimeError: out of resources"}}, 16),
    ({}, 0),
])
def test_choose_rows(timings, rows):
    assert autotune.choose_rows(timings) == rows


def test_the_two_ways_take_turns_after_a_warm_up(monkeypatch):
    """Warm-up calls, then timed ones, alternate between the ways (so both meet the same
    clocks); each way's fastest call counts."""
    monkeypatch.setattr(autotune, "WARMUP_SECONDS", 0.05)
    calls = []

    def way(name, seconds):
        def call(x):
            calls.append(name)
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
            return x
        return call

    start = time.perf_counter()
    xla_s, kernels_s = autotune.fastest_each([way("xla", 0.004), way("kernels", 0.001)],
                                              (jnp.ones(2),), repetitions=3)
    assert time.perf_counter() - start >= 0.05 + 3 * 0.005  # the warm-up, then the timed calls
    assert calls[-6:] == ["xla", "kernels"] * 3  # the timed calls
    warm_up = calls[:-6]
    assert len(warm_up) >= 2 and warm_up == ["xla", "kernels"] * (len(warm_up) // 2)
    assert 0.004 <= xla_s < 0.04 and 0.001 <= kernels_s < xla_s


@pytest.fixture(scope="module")
def qwen2_model(zoo):
    """Qwen2 with biases, unrolled, float32."""
    lm = load_model(str(zoo.case("qwen2_bias_tied").path), dtype="float32")
    lm.model.unroll_layers()
    return lm.model


def _projection_kernels(model, rows: int, small_batch: int) -> int:
    p = model.layers.per_layer[0].arrays()
    x = jnp.ones((rows, model.cfg.hidden_size), jnp.float32)
    positions = jnp.arange(rows, dtype=jnp.int32)
    inv_freq = jnp.asarray(L.rope_inv_freq(model.cfg), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, x: model.layer_projections(p, x, positions, inv_freq,
                                                                small_batch=small_batch))(p, x)
    return str(jaxpr).count("pallas_call")


def test_a_row_limit_keeps_larger_steps_on_xla(qwen2_model):
    """small_batch = 16: a 16-row step runs the four kernels, a 32-row one none."""
    assert _projection_kernels(qwen2_model, 16, 16) == 4
    assert _projection_kernels(qwen2_model, 32, 16) == 0
    assert _projection_kernels(qwen2_model, 32, 64) == 4
    assert _projection_kernels(qwen2_model, 16, 0) == 0


def test_measure_times_both_ways_and_checks_the_kernels(qwen2_model, monkeypatch):
    # as if the kernels won at every count (interpreted here, they lose), so 32 is measured
    monkeypatch.setattr(autotune, "choose_rows", max)
    choice = autotune.measure(qwen2_model, (16, 32), iterations=1, repetitions=1)
    assert sorted(choice.timings) == [16, 32] and choice.rows == 32
    for t in choice.timings.values():
        assert t["xla_us"] > 0 and t["kernels_us"] > 0
        assert t["rel_err"] < 1e-5  # float32: the kernels gave XLA's result
    assert choice.layers == qwen2_model.cfg.num_layers  # tiny layers: all of them probed


def test_a_losing_row_count_ends_the_measurement():
    measured = []

    def measure_rows(rows):
        measured.append(rows)
        return _timing(10, 5) if rows == 16 else _timing(10, 12)

    choice = autotune._measure_each("small_batch_matmuls", (64, 16, 32), measure_rows)
    assert measured == [16, 32] and choice.rows == 16  # 64 never compiled
    assert sorted(choice.timings) == [16, 32]


def test_a_kernel_that_fails_is_not_chosen(qwen2_model, monkeypatch):
    from pallas_kernels import small_batch_matmul

    def broken(*args, **kwargs):
        raise RuntimeError("Triton: out of resources")

    monkeypatch.setattr(small_batch_matmul, "fused_matmul", broken)
    choice = autotune.measure(qwen2_model, (16,), iterations=1, repetitions=1)
    assert choice.rows == 0
    assert "out of resources" in choice.timings[16]["error"]
    assert "out of resources" in autotune.describe(choice)


def test_a_wrong_kernel_is_not_chosen(qwen2_model, monkeypatch):
    from pallas_kernels import small_batch_matmul

    kernel = small_batch_matmul.fused_matmul

    def wrong(*args, **kwargs):
        y, counters = kernel(*args, **kwargs)
        return y * 1.5, counters

    monkeypatch.setattr(small_batch_matmul, "fused_matmul", wrong)
    choice = autotune.measure(qwen2_model, (16,), iterations=1, repetitions=1)
    assert choice.timings[16]["rel_err"] > autotune.TOLERANCE
    assert choice.rows == 0


def test_kernels_whose_result_changes_from_run_to_run_are_not_chosen(qwen2_model,
                                                                      monkeypatch):
    """As racing programs would give: close to XLA's result, but not the same twice."""
    from pallas_kernels import small_batch_matmul

    kernel = small_batch_matmul.fused_matmul
    calls = iter(range(1, 1 << 20))

    def racing(*args, **kwargs):
        y, counters = kernel(*args, **kwargs)
        jitter = jax.pure_callback(lambda: np.float32(1e-4 * next(calls)),
                                   jax.ShapeDtypeStruct((), jnp.float32))
        return y + jitter.astype(y.dtype), counters

    monkeypatch.setattr(small_batch_matmul, "fused_matmul", racing)
    choice = autotune.measure(qwen2_model, (16,), iterations=1, repetitions=1)
    assert choice.timings[16]["rel_err"] < autotune.TOLERANCE
    assert "different results" in choice.timings[16]["error"]
    assert choice.rows == 0


def test_the_choice_is_cached_per_device_model_and_rows(qwen2_model, monkeypatch, tmp_path):
    monkeypatch.setattr(autotune, "cache_path", lambda: tmp_path / "autotune.json")
    measured = []

    def fake_measure(model, candidates, **kw):
        measured.append(tuple(candidates))
        return autotune.KernelChoice("small_batch_matmuls", 16,
                                     {16: _timing(10, 5), 32: _timing(10, 12)}, 2)

    monkeypatch.setattr(autotune, "measure", fake_measure)
    first = autotune.small_batch_rows(qwen2_model, candidates=(16, 32))
    again = autotune.small_batch_rows(qwen2_model, candidates=(16, 32))
    assert measured == [(16, 32)]
    assert (first.rows, first.cached) == (16, False)
    assert (again.rows, again.cached, again.timings, again.layers) == (16, True, first.timings,
                                                                       2)
    assert (tmp_path / "autotune.json").exists()
    autotune.small_batch_rows(qwen2_model, candidates=(16,))  # other rows: another entry
    autotune.small_batch_rows(qwen2_model, candidates=(16, 32), use_cache=False)
    assert measured == [(16, 32), (16,), (16, 32)]
    # an unreadable file, or entry, is measured over, not an error
    (tmp_path / "autotune.json").write_text("{not json")
    assert autotune.small_batch_rows(qwen2_model, candidates=(16, 32)).cached is False
    entries = json.loads((tmp_path / "autotune.json").read_text())
    (tmp_path / "autotune.json").write_text(json.dumps({k: {"rows": 16} for k in entries}))
    assert autotune.small_batch_rows(qwen2_model, candidates=(16, 32)).cached is False
    assert autotune.small_batch_rows(qwen2_model, candidates=(16, 32)).cached is True
    # a measurement that met an error is not kept: it may pass next time
    monkeypatch.setattr(autotune, "measure", lambda model, candidates, **kw: (
        measured.append("failed") or autotune.KernelChoice(
            "small_batch_matmuls", 0, {64: {"error": "RESOURCE_EXHAUSTED: out of memory"}})))
    for _ in range(2):
        assert autotune.small_batch_rows(qwen2_model, candidates=(64,)).rows == 0
    assert measured[-2:] == ["failed", "failed"]


def test_the_engine_runs_the_kernels_where_measured_faster(llama_folder, monkeypatch, tmp_path):
    """Unset on a GPU (here: made to measure), the engine measures both kernels at start-up
    and runs them up to the chosen rows; its tokens, greedy and seeded, are XLA's, and
    stats() report the choices."""
    from jaxvllm import LLM, SamplingParams

    monkeypatch.setattr(autotune, "cache_path", lambda: tmp_path / "autotune.json")
    kwargs = dict(attention_backend="pallas", max_model_len=64, max_num_seqs=4,
                  max_num_batched_tokens=32, num_scheduler_steps=4)
    prompts = [{"prompt_token_ids": [3, 14, 15, 92, 65, 35, 89][: 2 + i]} for i in range(4)]
    # greedy and seeded rows in one batch
    params = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0.9, seed=7, ignore_eos=True)] * 2

    def tokens(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    plain = LLM(str(llama_folder), **kwargs)  # on the CPU: not measured, off
    stats = plain.llm_engine.stats()
    assert (stats["small_batch_matmul_rows"], stats["sampling_kernel_rows"]) == (0, 0)
    assert not [k for k in stats if k.endswith("_probe")]
    want = tokens(plain)

    measure, measure_sampler = autotune.measure, autotune.measure_sampler
    monkeypatch.setattr(autotune, "should_measure", lambda: True)
    monkeypatch.setattr(autotune, "measure", lambda model, candidates, **kw: measure(
        model, (16,), iterations=1, repetitions=1))
    monkeypatch.setattr(autotune, "measure_sampler", lambda vocab, dtype, candidates, **kw:
                        measure_sampler(vocab, dtype, (16,), iterations=1, repetitions=1))
    monkeypatch.setattr(autotune, "choose_rows", lambda timings: max(timings))
    tuned = LLM(str(llama_folder), **kwargs)
    stats = tuned.llm_engine.stats()
    assert (stats["small_batch_matmul_rows"], stats["sampling_kernel_rows"]) == (16, 16)
    assert stats["small_batch_matmuls_probe"]["timings"]["16"]["rel_err"] < 1e-5
    assert stats["sampling_kernels_probe"]["timings"]["16"]["rel_err"] == 0  # same tokens
    assert tokens(tuned) == want
    from jaxvllm.engine.sampler import PLAIN_RANDOM_PATHS

    runner = tuned.llm_engine.runner
    key, args = runner.dummy_multi_step(tuned.llm_engine.vocab_size, runner.multi_step_rows(2),
                                        runner.min_table_width, PLAIN_RANDOM_PATHS)
    step, args, _ = runner.step_function(key, args)
    program = str(jax.make_jaxpr(step)(*args))
    assert "sample_maxima" in program and "small_batch_matmul" in program
    # asked for explicitly, nothing is measured
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(autotune, "measure_sampler", lambda *a, **k: pytest.fail("measured"))
    stats = LLM(str(llama_folder), **kwargs, small_batch_matmuls=False,
                sampling_kernels=True).llm_engine.stats()
    assert (stats["small_batch_matmul_rows"], stats["sampling_kernel_rows"]) == (0, 4)


def test_the_sampler_measurement_checks_the_tokens(monkeypatch):
    choice = autotune.measure_sampler(300, jnp.bfloat16, (4,), iterations=2, repetitions=1)
    assert choice.feature == "sampling_kernels"
    t = choice.timings[4]
    assert t["xla_us"] > 0 and t["kernels_us"] > 0 and t["rel_err"] == 0
    from pallas_kernels import sampling

    monkeypatch.setattr(sampling, "sample_tokens", lambda logits, *a, **k: jnp.zeros(
        logits.shape[0], jnp.int32) + 3)
    wrong = autotune.measure_sampler(300, jnp.bfloat16, (4,), iterations=1, repetitions=1)
    assert wrong.timings[4]["rel_err"] > autotune.TOLERANCE and wrong.rows == 0


def test_should_measure_only_on_a_gpu_unless_turned_off(monkeypatch):
    assert autotune.should_measure() is (jax.default_backend() == "gpu")
    monkeypatch.setattr(autotune.jax, "default_backend", lambda: "gpu")
    assert autotune.should_measure() is True
    monkeypatch.setenv("JAXVLLM_AUTOTUNE", "0")
    assert autotune.should_measure() is False


def test_the_kernels_choice_reads_back_as_numbers():
    choice = autotune.KernelChoice("sampling_kernels", 32,
                                   {16: _timing(10, 5), 32: _timing(10, 8)})
    d = choice.as_dict()
    assert d["rows"] == 32 and d["timings"]["32"]["kernels_us"] == 8
    assert "up to 32 rows" in autotune.describe(choice)
    assert np.isclose(d["timings"]["16"]["xla_us"], 10)


def test_the_cache_file_lies_beside_the_compilation_cache(monkeypatch, tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
        assert autotune.cache_path() == tmp_path / "xla" / "jaxvllm-autotune.json"
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        assert autotune.cache_path() == tmp_path / "jaxvllm" / "autotune.json"
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
