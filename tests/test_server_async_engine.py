"""AsyncLLMEngine without a model: a scripted engine (one token per request per step) drives
the thread/stream machinery through its edge cases: all-or-nothing adds, aborts on close, a
slow reader, a step that raises, shutdown with requests in flight, and the stats handed to
the stat loggers."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from jaxvllm import SamplingParams
from jaxvllm.engine.async_engine import (AsyncLLMEngine, EngineDeadError, IterationStats,
                                         LoggingStatLogger, SchedulerStats)
from jaxvllm.outputs import CompletionOutput, RequestOutput


class ScriptedEngine:
    """Each step gives every request one more token; a request finishes at max_tokens."""

    def __init__(self, fail_at_step: int | None = None, step_seconds: float = 0.002):
        self.requests: dict[str, list] = {}
        self.aborted: list[str] = []
        self.fail_at_step = fail_at_step
        self.step_seconds = step_seconds
        self.steps = 0
        self.kv_manager = SimpleNamespace(prefix_cache_queries=0, prefix_cache_hits=0, usage=0.0)
        self.scheduler = SimpleNamespace(num_running=0, num_waiting=0, num_preemptions=0)
        # what the server reads
        self.loaded = SimpleNamespace(source=SimpleNamespace(name="scripted", path="/scripted"))
        self.tokenizer = None
        self.max_model_len = 64
        self.vocab_size = 100

    def add_request(self, request_id, prompt, params, arrival_time=None, priority=0):
        if prompt == "bad":
            raise ValueError("prompt: not this one")
        self.requests[request_id] = [params.max_tokens, []]
        self._update()

    def abort_request(self, request_id):
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)
        self._update()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.steps == self.fail_at_step:
            raise RuntimeError("the step broke")
        time.sleep(self.step_seconds)
        outputs = []
        for rid, (max_tokens, tokens) in list(self.requests.items()):
            tokens.append(len(tokens))
            done = len(tokens) >= max_tokens
            completion = CompletionOutput(0, "x" * len(tokens), list(tokens), None, None,
                                          "length" if done else None)
            outputs.append(RequestOutput(rid, None, [1, 2, 3], None, [completion], done))
            if done:
                del self.requests[rid]
        self._update()
        return outputs

    def _update(self):
        self.scheduler.num_running = len(self.requests)
        self.kv_manager.usage = 0.1 * len(self.requests)


class Recorder:
    def __init__(self):
        self.records = []

    def record(self, scheduler, iteration):
        self.records.append((scheduler, iteration))

    def log(self):
        pass


def make(**kw) -> tuple[AsyncLLMEngine, ScriptedEngine, Recorder]:
    scripted = ScriptedEngine(**kw)
    recorder = Recorder()
    return AsyncLLMEngine(scripted, stat_loggers=[recorder], log_stats=False), scripted, recorder


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens)


def test_generate_streams_cumulative_outputs_to_the_end():
    engine, scripted, recorder = make()

    async def run():
        return [o async for o in engine.generate("hi", params(5), "r1")]

    try:
        outs = asyncio.run(run())
    finally:
        engine.shutdown()
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == [0, 1, 2, 3, 4]
    assert all(not o.finished for o in outs[:-1])
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(set(lengths))  # growing, never repeated
    iterations = [it for _, it in recorder.records]
    assert sum(it.num_generation_tokens for it in iterations) == 5
    assert sum(it.num_prompt_tokens for it in iterations) == 3
    assert sum(len(it.time_to_first_tokens) for it in iterations) == 1
    # one latency per token after the first (a slow reader may see two steps as one output)
    assert sum(len(it.inter_token_latencies) for it in iterations) == 5 - 1
    (finished,) = [f for it in iterations for f in it.finished]
    assert (finished.request_id, finished.finish_reason, finished.num_generation_tokens) == (
        "r1", "length", 5)
    assert recorder.records[-1][0].num_running == 0


def test_add_requests_is_all_or_nothing():
    engine, scripted, _ = make()

    async def run():
        with pytest.raises(ValueError, match="not this one"):
            await engine.add_requests([("a", "ok", params(100)), ("b", "bad", params(100))])
        return await engine.call(lambda e: sorted(e.requests))

    try:
        assert asyncio.run(run()) == []
    finally:
        engine.shutdown()
    assert scripted.aborted == ["a"]


def test_close_aborts_what_runs_and_a_slow_reader_skips_to_the_latest():
    engine, scripted, recorder = make()

    async def run():
        stream = await engine.add_requests([("long", "p", params(10**6)),
                                            ("short", "p", params(30))])
        await asyncio.sleep(0.3)  # a slow reader: outputs pile up engine-side
        seen = []
        async for index, out in stream:
            seen.append((index, len(out.outputs[0].token_ids), out.finished))
            if out.finished:
                break
        stream.close()
        for _ in range(100):
            if not await engine.call(lambda e: e.has_unfinished_requests()):
                break
            await asyncio.sleep(0.01)
        return seen

    try:
        seen = asyncio.run(run())
    finally:
        engine.shutdown()
    assert (1, 30, True) in seen
    assert len(seen) < 30  # intermediate states were skipped, not queued
    assert scripted.aborted == ["long"]
    reasons = [f.finish_reason for _, it in recorder.records for f in it.finished]
    assert sorted(reasons) == ["abort", "length"]


def test_a_failing_step_ends_every_stream_and_the_engine():
    engine, scripted, _ = make(fail_at_step=3)

    async def run():
        stream = await engine.add_requests([("r", "p", params(100))])
        with pytest.raises(EngineDeadError, match="the step broke"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.add_requests([("r2", "p", params(1))])

    try:
        asyncio.run(run())
        assert not engine.is_running
        assert isinstance(engine.dead_error, RuntimeError)
    finally:
        engine.shutdown()


def test_shutdown_ends_streams_in_flight():
    engine, scripted, _ = make(step_seconds=0.01)

    async def run():
        stream = await engine.add_requests([("r", "p", params(10**6))])
        await stream.__anext__()
        loop = asyncio.get_running_loop()
        stopping = loop.run_in_executor(None, engine.shutdown)
        with pytest.raises(EngineDeadError, match="shutting down"):
            async for _ in stream:
                pass
        await stopping
        with pytest.raises(EngineDeadError):
            await engine.add_requests([("r2", "p", params(1))])

    start = time.monotonic()
    asyncio.run(run())
    assert time.monotonic() - start < 10
    assert scripted.aborted == ["r"] and not engine.is_running


def test_duplicate_request_ids():
    engine, scripted, _ = make()

    async def run():
        stream = await engine.add_requests([("same", "p", params(50))])
        with pytest.raises(ValueError, match="already in use"):
            await engine.add_requests([("same", "p", params(5))])
        stream.close()

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


def test_server_over_a_dead_engine_says_so():
    """/health turns 503 when the engine thread has died; requests get a 503 error body; a
    model without a tokenizer takes token ids and refuses text."""
    import httpx

    from jaxvllm.entrypoints.openai.server import ServerThread, build_app

    engine, scripted, _ = make(fail_at_step=4)
    try:
        with ServerThread(build_app(engine)) as server:
            assert httpx.get(server.url + "/health").status_code == 200
            r = httpx.post(server.url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "xx"
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "text"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
            r = httpx.post(server.url + "/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
            r = httpx.post(server.url + "/v1/completions", json={"prompt": [1], "max_tokens": 9})
            assert r.status_code == 503 and "the step broke" in r.json()["error"]["message"]
            health = httpx.get(server.url + "/health")
            assert health.status_code == 503 and health.json()["error"]["code"] == 503
            r = httpx.post(server.url + "/v1/completions", json={"prompt": [1], "max_tokens": 1})
            assert r.status_code == 503
    finally:
        engine.shutdown()


def test_periodic_stats_line(caplog):
    stats = LoggingStatLogger(interval=0.0)
    with caplog.at_level("INFO", logger="jaxvllm.engine.async_engine"):
        stats.record(SchedulerStats(num_running=2, num_waiting=1, kv_cache_usage=0.25,
                                    prefix_cache_queries=10, prefix_cache_hits=5),
                     IterationStats(num_prompt_tokens=100, num_generation_tokens=20))
        stats.log()
        stats.record(SchedulerStats(), IterationStats())
        stats.log()  # going idle: one more line
        stats.record(SchedulerStats(), IterationStats())
        stats.log()  # idle: silence
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "Running: 2 reqs, Waiting: 1 reqs, KV cache usage: 25.0%" in lines[0]
    assert "Prefix cache hit rate: 50.0%" in lines[0] and "Avg prompt throughput" in lines[0]
    assert "Running: 0 reqs" in lines[1]


EXIT_WITH_THE_ENGINE_BUSY = """
import asyncio, sys
from jaxvllm import SamplingParams
from jaxvllm.engine.async_engine import AsyncLLMEngine

engine = AsyncLLMEngine.from_engine_args(model=sys.argv[1], max_model_len=256, max_num_seqs=4,
                                         seed=0)

async def main():
    stream = await engine.add_requests([("a", {"prompt_token_ids": list(range(3, 40))},
                                         SamplingParams(max_tokens=200, ignore_eos=True))])
    n = 0
    async for _, out in stream:
        n += 1
        if n == 3:
            print("left with the engine busy", flush=True)
            return

asyncio.run(main())
"""


def test_a_program_that_exits_with_the_engine_busy_ends_cleanly(llama_folder, tmp_path):
    """No shutdown() and a step running as the program ends: the engine thread is stopped
    before the interpreter goes (the step finishing into a finalizing interpreter aborted
    the process: 'terminate called ...', exit status 134)."""
    import subprocess
    import sys

    script = tmp_path / "busy.py"
    script.write_text(EXIT_WITH_THE_ENGINE_BUSY)
    done = subprocess.run([sys.executable, str(script), str(llama_folder)], capture_output=True,
                          text=True, timeout=300)
    assert "left with the engine busy" in done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
