"""KV cache sizing: the override, the CPU budget, and the GPU path (profile run, then what
gpu_memory_utilization leaves), the last with allocator statistics faked on CPU."""

import math

import pytest

from jaxvllm import LLM, SamplingParams
from jaxvllm.engine import engine as engine_module
from jaxvllm.models.attention import kv_cache_bytes_per_block


@pytest.fixture(scope="module")
def folder(zoo):
    return str(zoo.case("llama_gqa").path)


def test_override_wins(folder):
    llm = LLM(folder, num_gpu_blocks_override=40, block_size=4, max_model_len=64)
    assert llm.llm_engine.num_blocks == 40
    assert llm.llm_engine.runner.kv.k.shape[1] == 40


def test_cpu_budget_holds_max_num_seqs_full_requests(folder):
    llm = LLM(folder, max_num_seqs=3, block_size=8, max_model_len=64)
    assert llm.llm_engine.num_blocks == 1 + 3 * math.ceil(64 / 8)


def test_cpu_budget_is_capped(folder):
    engine = LLM(folder, max_num_seqs=8, block_size=8, max_model_len=64,
                 cpu_kv_cache_bytes=1).llm_engine
    assert engine.num_blocks == 1 + 64 // 8  # never below one full-length request


def test_gpu_sizing_after_profile_run(folder, monkeypatch):
    calls = []

    def fake_stats():
        calls.append(1)
        return {"bytes_limit": 2_000_000, "peak_bytes_in_use": 500_000}

    monkeypatch.setattr(engine_module, "device_memory_stats", fake_stats)
    llm = LLM(folder, block_size=4, max_model_len=64, gpu_memory_utilization=0.5)
    engine = llm.llm_engine
    per_block = kv_cache_bytes_per_block(engine.model_config, 4, engine.loaded.dtype)
    free_blocks = int((2_000_000 * 0.5 - 500_000) // per_block)
    assert engine.num_blocks == 1 + engine_module.stable_block_count(free_blocks)
    assert engine.runner.kv.k.shape[1] == engine.num_blocks
    assert len(calls) >= 2  # asked once to choose the path, once after the profile run
    out = llm.generate([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_gpu_sizing_too_little_memory(folder, monkeypatch):
    monkeypatch.setattr(engine_module, "device_memory_stats",
                        lambda: {"bytes_limit": 1000, "peak_bytes_in_use": 900})
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(folder, block_size=4, max_model_len=64)


def test_block_count_is_stable_across_starts():
    """A few blocks more or less of free memory (the profile run's peak varies a little
    between starts) give the same cache shape, hence the same compiled programs."""
    from jaxvllm.engine.engine import stable_block_count

    assert stable_block_count(281_528) == stable_block_count(281_530) == 280_576
    for blocks in (1, 7, 255, 256, 1000, 5_000, 281_530, 10**7):
        got = stable_block_count(blocks)
        assert got <= blocks and got >= blocks * (1 - 1 / 256)
        assert stable_block_count(got) == got
    assert stable_block_count(255) == 255  # small caches keep every block
