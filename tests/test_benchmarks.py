"""The benchmarks run end to end on a tiny random model with tiny workloads and print their
JSON; the datasets give the requested lengths; the serving client times a stub server that
streams in the OpenAI shape with known delays."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# `benchmarks` sits beside `jaxvllm` in the checkout; a plain `pytest` does not put the
# repository root on sys.path (`python -m pytest` does)
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import common, datasets  # noqa: E402


def _last_json(capsys) -> dict:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    return json.loads(lines[-1])


# -- datasets ------------------------------------------------------------------------------------


def test_random_dataset_lengths():
    reqs = datasets.random_requests(400, 128, 64, 0.75, vocab_size=300, seed=1)
    ins = np.array([r.prompt_len for r in reqs])
    outs = np.array([r.expected_output_len for r in reqs])
    assert ins.min() >= 32 and ins.max() <= 224 and outs.min() >= 16 and outs.max() <= 112
    # uniform: both ends are reached and the mean sits in the middle
    assert ins.min() < 40 and ins.max() > 215 and abs(ins.mean() - 128) < 8
    assert all(0 <= t < 300 for r in reqs for t in r.prompt_token_ids)
    fixed = datasets.random_requests(5, 10, 3, 0.0, vocab_size=50, prefix_len=4)
    assert {r.prompt_len for r in fixed} == {14} and {r.expected_output_len for r in fixed} == {3}
    assert len({tuple(r.prompt_token_ids[:4]) for r in fixed}) == 1  # the shared prefix
    assert datasets.random_requests(3, 8, 2, 0.5, 50, seed=7)[0].prompt_token_ids == \
        datasets.random_requests(3, 8, 2, 0.5, 50, seed=7)[0].prompt_token_ids
    with pytest.raises(ValueError):
        datasets.random_requests(1, 8, 2, 1.0, 50)


def test_nano_vllm_dataset():
    reqs = datasets.nano_vllm_requests(vocab_size=49152, seed=0)
    assert len(reqs) == 256
    lens = [r.prompt_len for r in reqs] + [r.expected_output_len for r in reqs]
    assert min(lens) >= 100 and max(lens) <= 1024 and max(lens) > 950 and min(lens) < 150
    assert max(t for r in reqs for t in r.prompt_token_ids) < 10000
    small = datasets.nano_vllm_requests(vocab_size=256, num_prompts=64, min_len=32, max_len=256)
    assert len(small) == 64
    assert all(32 <= r.prompt_len <= 256 and 32 <= r.expected_output_len <= 256 for r in small)
    assert max(t for r in small for t in r.prompt_token_ids) < 256


class _WordTokenizer:
    def encode(self, text):
        return [len(w) for w in text.split()]


def test_sharegpt_dataset(tmp_path):
    convs = [{"conversations": [{"from": "human", "value": " ".join(["w"] * n)},
                                {"from": "gpt", "value": " ".join(["x"] * m)}]}
             for n, m in [(10, 20), (2, 50), (30, 3), (1500, 10), (8, 8)]]
    convs.append({"conversations": [{"from": "human", "value": "only one turn"}]})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    reqs = datasets.sharegpt_requests(path, 2, _WordTokenizer(), seed=0)
    # too short (2 prompt / 3 output tokens), too long (1500) and one-turn conversations skipped
    assert sorted((r.prompt_len, r.expected_output_len) for r in reqs) == [(8, 8), (10, 20)]
    assert all(r.prompt and r.prompt.startswith("w") for r in reqs)
    fixed = datasets.sharegpt_requests(path, 2, _WordTokenizer(), output_len=5)
    assert {r.expected_output_len for r in fixed} == {5}
    with pytest.raises(ValueError, match="only 2 usable"):
        datasets.sharegpt_requests(path, 3, _WordTokenizer())
    with pytest.raises(ValueError, match="tokenizer"):
        datasets.sharegpt_requests(path, 1, None)


def test_summaries_and_table(capsys):
    s = common.summarize([1.0, 2.0, 3.0, 4.0], (50, 99), "x_", "_ms")
    assert s["x_mean_ms"] == 2.5 and s["x_median_ms"] == 2.5 and s["x_p50_ms"] == 2.5
    assert s["x_p99_ms"] == pytest.approx(3.97)
    common.print_table("T", [("a", 1.23456), ("-- sub --", None), ("b", None)])
    out = capsys.readouterr().out
    assert "a" in out and "1.235" in out and "n/a" in out and "sub" in out


# -- throughput and latency on the tiny model ------------------------------------------------------

ENGINE = ["--max-model-len", "64", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
          "--block-size", "4", "--disable-tqdm"]


def test_throughput_random_with_hf(zoo, capsys, tmp_path):
    from benchmarks import throughput

    model = str(zoo.case("llama_gqa").path)
    plot = tmp_path / "throughput.png"
    res = throughput.main(["--model", model, "--dataset", "random", "--num-prompts", "6",
                           "--input-len", "8", "--output-len", "4", "--range-ratio", "0.5",
                           "--temperature", "0", "--compare-hf", "--plot", str(plot), *ENGINE])
    printed = _last_json(capsys)
    assert printed["output_tokens_per_second"] == res["output_tokens_per_second"]
    for key in ("model", "device", "dtype", "workload", "elapsed_time", "requests_per_second",
                "tokens_per_second", "output_tokens_per_second", "first_token_s", "load_s",
                "engine", "steps", "hf", "ratio_output_tokens_per_second_vs_hf"):
        assert printed[key] is not None, key
    assert printed["benchmark"] == "throughput" and printed["dtype"] == "float32"
    w = printed["workload"]
    assert w["num_prompts"] == 6 and 4 <= w["input_len_min"] <= w["input_len_max"] <= 12
    # ignore_eos: exactly the requested output lengths, and HF counted the same useful tokens
    assert printed["total_output_tokens"] == printed["hf"]["useful_output_tokens"]
    assert printed["hf"]["batch_size"] == 6 and printed["hf"]["generated_tokens"] >= \
        printed["total_output_tokens"]
    eng = printed["engine"]
    for key in ("num_compiled_programs", "compile_seconds", "kv_cache_usage", "num_blocks",
                "num_preemptions"):
        assert key in eng
    assert eng["background_compile_seconds_in_run"] == 0  # no background compiling on CPU
    steps = printed["steps"]
    assert steps["num_steps"] >= 4 and 0 < steps["kv_utilization"] <= 1
    assert "padding_waste" in steps
    buckets = steps["by_token_bucket"]
    assert buckets and all(int(T.split()[0]) >= b["real_tokens"] / b["steps"]
                           and b["seconds"] >= 0 and b["host_ms_per_step"] >= 0
                           and b["mean_context"] >= 0 for T, b in buckets.items())
    assert any(b["mean_context"] > 0 for b in buckets.values())
    assert sum(b["steps"] for b in buckets.values()) <= steps["num_steps"]
    assert 0 < printed["first_token_s"] and plot.stat().st_size > 0


def test_throughput_nano_vllm_scaled(zoo, capsys):
    from benchmarks import throughput

    res = throughput.main(["--model", str(zoo.case("llama_gqa").path), "--dataset", "nano-vllm",
                           "--num-prompts", "3", "--min-len", "4", "--max-len", "10", *ENGINE])
    w = res["workload"]
    assert w["dataset"] == "nano-vllm" and w["num_prompts"] == 3
    assert 4 <= w["input_len_min"] and w["output_len_max"] <= 10
    assert res["total_output_tokens"] == sum(
        datasets.nano_vllm_requests(256, 3, 4, 10, seed=0)[i].expected_output_len
        for i in range(3))
    assert _last_json(capsys)["benchmark"] == "throughput"


def test_throughput_rejects_too_long(zoo):
    from benchmarks import throughput

    with pytest.raises(SystemExit, match="max_model_len"):
        throughput.main(["--model", str(zoo.case("llama_gqa").path), "--num-prompts", "1",
                         "--input-len", "60", "--output-len", "10", *ENGINE])


def test_latency_counts_a_multi_step_call_as_its_steps():
    """A call that gave each row K tokens is K decode steps of a K-th of its time (HF's
    decode step, the ratio's other side, is one token a row)."""
    from benchmarks import common, latency

    def record(start, seconds, new_tokens, compile_s=0.0):
        return common.StepRecord(start, start + seconds, 2, new_tokens, 0, 0, 0.0, compile_s)

    probe = common.StepProbe.__new__(common.StepProbe)
    probe.steps = [record(0.0, 0.05, 2),  # the prefill: the first tokens, not a decode step
                   record(1.0, 0.008, 16),  # 8 steps of 2 rows
                   record(2.0, 0.002, 2),  # one step
                   record(3.0, 0.5, 2, compile_s=0.4),  # compiled: left out
                   record(4.0, 0.003, 1)]  # one row left
    got = latency._decode_steps_ms(probe, rows=2)
    assert got == pytest.approx([1.0] * 8 + [2.0, 3.0])


def test_latency(zoo, capsys):
    from benchmarks import latency

    res = latency.main(["--model", str(zoo.case("llama_gqa").path), "--batch-size", "2",
                        "--input-len", "6", "--output-len", "5", "--num-iters-warmup", "1",
                        "--num-iters", "3", "--compare-hf", "--hf-num-iters", "1", *ENGINE[:-1]])
    printed = _last_json(capsys)
    assert printed["avg_latency"] == res["avg_latency"] > 0
    assert len(printed["latencies"]) == 3
    assert set(printed["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
    assert printed["percentiles"]["10"] <= printed["percentiles"]["99"]
    assert printed["decode_step_median_ms"] > 0 and printed["ttft_mean_ms"] > 0
    assert printed["first_token_s"] > 0 and printed["hf"]["avg_latency"] > 0
    assert printed["ratio_latency_hf_over_jaxvllm"] > 0
    assert printed["workload"] == {"batch_size": 2, "input_len": 6, "output_len": 5, "n": 1,
                                   "num_iters_warmup": 1, "num_iters": 3, "temperature": 1.0}


def test_latency_cold_start_loads_the_programs_warm(zoo, capsys):
    """--cold-start: fresh processes on an empty cache; the warm one loads its step program
    from the program cache, the one on JAX's cache alone does not."""
    from benchmarks import latency

    latency.main(["--model", str(zoo.case("llama_gqa").path), "--batch-size", "1",
                  "--input-len", "4", "--output-len", "2", "--num-iters-warmup", "0",
                  "--num-iters", "1", "--cold-start", *ENGINE[:-1]])
    starts = _last_json(capsys)["cold_start"]
    assert list(starts) == ["cold", "warm", "warm_xla_cache_only"]
    assert starts["cold"]["compilation_cache_entries_before"] == 0
    assert [starts[k]["program_cache_hits"] for k in starts] == [0, 1, 0]
    assert all(starts[k]["first_token_s"] > 0 for k in starts)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias_tied", "qwen3_qknorm"])
def test_plain_xla_baseline_decodes_what_the_engine_decodes(zoo, name):
    """The plain-XLA baseline (contiguous cache, no paging) on the engine's weights gives the
    engine's greedy tokens: the two compare the same computation."""
    from benchmarks.xla_baseline import PlainXLADecoder
    from jaxvllm import LLM, SamplingParams
    from jaxvllm.models.loader import load_model

    path = str(zoo.case(name).path)
    prompts = [[5, 17, 33, 2, 9, 100, 3], [100, 3, 7, 8, 200, 45, 67]]
    llm = LLM(path, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32)
    want = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(max_tokens=9, temperature=0, ignore_eos=True), use_tqdm=False)]
    decoder = PlainXLADecoder(load_model(path, dtype="float32").model, max_len=16)
    got = decoder.generate(prompts, 9)
    assert got["tokens"].tolist() == want
    assert 0 < got["prefill_s"] < got["seconds"]
    with pytest.raises(ValueError, match="output_len"):
        decoder.generate(prompts, 10)  # 7 + 10 > max_len


def test_plain_xla_baseline_names_what_it_does_not_cover(zoo):
    from benchmarks.xla_baseline import PlainXLADecoder
    from jaxvllm.models.loader import load_model

    model = load_model(str(zoo.case("opt_prenorm").path), dtype="float32").model
    with pytest.raises(ValueError, match="OPT.*learned positions.*layer norm"):
        PlainXLADecoder(model, max_len=16)


def test_latency_compares_with_the_plain_xla_baseline(zoo, capsys):
    from benchmarks import latency

    latency.main(["--model", str(zoo.case("llama_gqa").path), "--batch-size", "2",
                  "--input-len", "6", "--output-len", "5", "--num-iters-warmup", "1",
                  "--num-iters", "2", "--temperature", "0", "--compare-xla", *ENGINE[:-1]])
    printed = _last_json(capsys)
    assert printed["xla"]["num_iters"] == 2 and printed["xla"]["decode_step_ms"] > 0
    assert printed["ratio_latency_xla_over_jaxvllm"] == pytest.approx(
        printed["xla"]["avg_latency"] / printed["avg_latency"], abs=0.006)  # 2 decimals
    assert printed["ratio_decode_step_xla_over_jaxvllm"] > 0


def test_bench_command_forwards(zoo, capsys):
    import argparse

    from jaxvllm.entrypoints import bench_cmd

    parser = argparse.ArgumentParser(prog="jaxvllm")
    bench_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "latency", "--model", str(zoo.case("llama_gqa").path),
                              "--batch-size", "1", "--input-len", "4", "--output-len", "2",
                              "--num-iters-warmup", "0", "--num-iters", "1", *ENGINE[:-1]])
    assert args.func(args) == 0
    assert _last_json(capsys)["benchmark"] == "latency"
    args = parser.parse_args(["bench", "sampler", "--rows", "2", "--vocab-size", "40",
                              "--iters", "1"])
    assert args.func(args) == 0
    assert _last_json(capsys)["rows"]["2"]["greedy"]["engine_ms"] > 0


# -- serve against a stub OpenAI server ----------------------------------------------------------

TTFT_DELAY, ITL_DELAY = 0.20, 0.05


class _StubHandler(BaseHTTPRequestHandler):
    """/v1/models, and /v1/completions streaming one chunk per token, as vLLM's server:
    `data: {...}` events, the last choice with a finish reason, a usage-only chunk, [DONE]."""

    protocol_version = "HTTP/1.1"
    requests_seen: list = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "stub-model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _StubHandler.requests_seen.append(body)
        if self.path != "/v1/completions" or body.get("model") != "stub-model":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        n = body["max_tokens"]
        time.sleep(TTFT_DELAY)
        for i in range(n):
            if i:
                time.sleep(ITL_DELAY)
            chunk = {"id": "cmpl-1", "object": "text_completion", "model": "stub-model",
                     "choices": [{"index": 0, "text": f" t{i}",
                                  "finish_reason": "length" if i == n - 1 else None}]}
            self._send(f"data: {json.dumps(chunk)}\n\n".encode())
        prompt = body["prompt"]
        usage = {"prompt_tokens": len(prompt), "completion_tokens": n,
                 "total_tokens": len(prompt) + n}
        self._send(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self._send(b"data: [DONE]\n\n")
        self._send(b"")


@pytest.fixture()
def stub_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _StubHandler.requests_seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_serve_against_stub(stub_server, capsys, tmp_path):
    from benchmarks import serve

    detail = tmp_path / "detail.json"
    res = serve.main(["--base-url", stub_server, "--dataset", "random", "--num-prompts", "6",
                      "--input-len", "10", "--output-len", "5", "--vocab-size", "100",
                      "--request-rate", "50", "--max-concurrency", "3", "--disable-tqdm",
                      "--goodput", "ttft:10000", "tpot:1", "--metric-percentiles", "50,99",
                      "--save-result", str(detail), "--plot", str(tmp_path / "serve.png")])
    printed = _last_json(capsys)
    assert printed == {k: v for k, v in res.items()}
    assert res["model"] == "stub-model" and res["completed"] == 6 and res["failed"] == 0
    assert res["total_output_tokens"] == 30 and res["total_input_tokens"] == 60
    assert res["max_concurrent_requests"] <= 3
    # the known delays, measured from the client (generous upper bounds: a busy machine)
    assert TTFT_DELAY <= res["mean_ttft_ms"] / 1e3 < TTFT_DELAY + 0.25
    assert ITL_DELAY <= res["median_itl_ms"] / 1e3 < ITL_DELAY + 0.05
    assert ITL_DELAY <= res["mean_tpot_ms"] / 1e3 < ITL_DELAY + 0.05
    e2e = TTFT_DELAY + 4 * ITL_DELAY
    assert e2e <= res["mean_e2el_ms"] / 1e3 < e2e + 0.3
    assert {"p50_ttft_ms", "p99_ttft_ms", "p99_itl_ms", "p99_tpot_ms", "p99_e2el_ms"} <= set(res)
    # the TPOT SLO of 1 ms is missed by every request: goodput 0
    assert res["request_goodput"] == 0 and res["request_throughput"] > 0
    # what the client sent: token-id prompts, streaming with usage, vLLM's ignore_eos
    sent = _StubHandler.requests_seen[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["ignore_eos"] is True and all(isinstance(t, int) for t in sent["prompt"])
    saved = json.loads(detail.read_text())
    assert len(saved["itls"]) == 6 and all(len(x) == 4 for x in saved["itls"])


def test_serve_poisson_arrivals_and_failures(stub_server, capsys):
    from benchmarks import serve

    start = time.perf_counter()
    res = serve.main(["--base-url", stub_server, "--num-prompts", "4", "--input-len", "4",
                      "--output-len", "1", "--vocab-size", "50", "--request-rate", "20",
                      "--disable-tqdm", "--skip-test-request"])
    assert res["completed"] == 4 and time.perf_counter() - start >= TTFT_DELAY
    assert res["mean_tpot_ms"] == 0.0  # one token each: no TPOT
    with pytest.raises(SystemExit, match="test request"):
        serve.main(["--base-url", stub_server, "--model", "other", "--num-prompts", "1",
                    "--input-len", "4", "--output-len", "1", "--vocab-size", "50",
                    "--disable-tqdm"])
    res = serve.main(["--base-url", stub_server, "--model", "other", "--num-prompts", "2",
                      "--input-len", "4", "--output-len", "1", "--vocab-size", "50",
                      "--disable-tqdm", "--skip-test-request"])
    assert res["failed"] == 2 and res["completed"] == 0 and "404" in res["first_error"]
    capsys.readouterr()


def test_gamma_arrivals_mean_interval():
    from benchmarks.serve import arrival_intervals

    poisson = arrival_intervals(2001, 10.0, 1.0, np.random.default_rng(0))
    bursty = arrival_intervals(2001, 10.0, 0.25, np.random.default_rng(0))
    assert len(poisson) == 2000
    assert abs(poisson.mean() - 0.1) < 0.01 and abs(bursty.mean() - 0.1) < 0.02
    assert abs(poisson.std() - 0.1) < 0.015  # exponential: std = mean
    assert bursty.std() > 1.5 * poisson.std()  # gamma shape < 1: burstier
    assert not arrival_intervals(5, float("inf"), 1.0, np.random.default_rng(0)).any()


def test_serve_against_jaxvllm_server(zoo, capsys, tmp_path):
    """The same client against jaxvllm's own server. The tiny model gets SmolLM2's tokenizer:
    a server streams text, and a model without a tokenizer has none, so its stream would hold
    one chunk (no ITL to measure)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import shutil

    from jaxvllm.engine.async_engine import AsyncLLMEngine
    from jaxvllm.entrypoints.openai.server import ServerThread, build_app
    from jaxvllm.tokenizer import load_tokenizer

    from benchmarks import serve

    folder = tmp_path / "tiny-with-tokenizer"
    shutil.copytree(zoo.case("llama_gqa").path, folder)
    load_tokenizer(None).save_pretrained(folder)
    engine = AsyncLLMEngine.from_engine_args(model=str(folder),
                                             max_model_len=64, max_num_seqs=4, block_size=4,
                                             max_num_batched_tokens=32)
    try:
        with ServerThread(build_app(engine, served_model_names=["tiny"])) as server:
            res = serve.main(["--base-url", server.url, "--num-prompts", "5", "--input-len", "8",
                              "--output-len", "4", "--vocab-size", "256", "--request-rate",
                              "inf", "--max-concurrency", "4", "--disable-tqdm"])
    finally:
        engine.shutdown()
    assert res["model"] == "tiny" and res["completed"] == 5 and res["failed"] == 0
    assert res["total_output_tokens"] == 20 and res["total_input_tokens"] == 40
    assert res["mean_ttft_ms"] > 0 and res["mean_tpot_ms"] > 0
    assert res["mean_e2el_ms"] > res["mean_ttft_ms"]
    assert _last_json(capsys)["benchmark"] == "serve"


def test_step_profile(zoo, capsys):
    from benchmarks import step_profile

    res = step_profile.main(["--model", str(zoo.case("llama_gqa").path), "--batch-sizes", "1,2",
                             "--context", "8", "--steps", "2", "--warmup-steps", "1", "--top", "5",
                             *ENGINE[:-1]])
    printed = _last_json(capsys)
    assert printed["benchmark"] == "step_profile" and set(printed["per_batch"]) == {"1", "2"}
    for b in ("1", "2"):
        r = printed["per_batch"][b]
        assert "error" not in r and "profile_error" not in r, r
        assert r["wall_ms_per_step"] > 0 and r["runner_device_ms_per_step"] > 0
        assert r["runner_host_ms_per_step"] >= 0
        # the CPU backend's trace: XLA thunk events with an hlo_op stat on the host plane
        assert r["device_busy_ms_per_step"] > 0 and 1 <= len(r["top"]) <= 5
        assert all(t["ms_per_step"] >= 0 and t["calls_per_step"] > 0 for t in r["top"])
        assert sum(t["share"] for t in r["top"]) <= 1.0001
    assert res["per_batch"]["2"]["wall_ms_per_step"] == \
        printed["per_batch"]["2"]["wall_ms_per_step"]


def test_sampler_benchmark(capsys, tmp_path):
    from benchmarks import sampler

    out = tmp_path / "sampler.json"
    sampler.main(["--rows", "1,3", "--vocab-size", "300", "--iters", "1", "--kernels",
                  "--output-json", str(out)])
    printed = _last_json(capsys)
    assert printed == json.loads(out.read_text())
    assert printed["benchmark"] == "sampler" and set(printed["rows"]) == {"1", "3"}
    for r in printed["rows"].values():
        for path in ("random", "greedy", "kernels"):
            m = r[path]
            assert m["engine_ms"] > 0 and m["jax_ms"] > 0
            assert m["speedup"] == pytest.approx(m["jax_ms"] / m["engine_ms"], rel=0.02, abs=0.01)
        assert r["kernels"]["tokens_differing"] == 0  # the kernels drew the XLA sampler's
    with pytest.raises(SystemExit, match="sampler: error: --rows"):
        sampler.main(["--rows", "0"])


def test_cpu_attention_benchmark(capsys, tmp_path):
    from benchmarks import cpu_attention
    from pallas_kernels import native_cpu

    if native_cpu.unavailable_reason() is not None:
        pytest.skip(f"the native CPU kernel: {native_cpu.unavailable_reason()}")
    out = tmp_path / "attention.json"
    cpu_attention.main(["--smoke", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                        "--head-dim", "16", "--block-size", "8", "--iters", "1",
                        "--output-json", str(out)])
    printed = _last_json(capsys)
    assert printed == json.loads(out.read_text()) and printed["benchmark"] == "cpu_attention"
    assert set(printed["cases"]) == set(cpu_attention.SMOKE_CASES)
    for case in printed["cases"].values():
        assert case["native_cpu_max_abs_err"] < 1e-4 and case["block_pairs_max_abs_err"] < 1e-4
        assert case["speedup_vs_block_pairs"] == pytest.approx(
            case["block_pairs_ms"] / case["native_cpu_ms"], rel=0.02, abs=0.01)
    with pytest.raises(SystemExit, match="cpu_attention: error: --layers"):
        cpu_attention.main(["--heads", "4", "--kv-heads", "3"])


def test_decode_kernel_benchmark(capsys, tmp_path):
    """Every configuration (and the separate write and attention) checked against the
    reference and timed; splits past the program limit left out."""
    from benchmarks import decode_kernel

    out = tmp_path / "decode.json"
    decode_kernel.main(["--smoke", "--spread", "0.5", "--output-json", str(out)])
    printed = _last_json(capsys)
    assert printed == json.loads(out.read_text()) and printed["benchmark"] == "decode_kernel"
    assert [(s["rows"], s["padded_rows"]) for s in printed["shapes"]] == [(1, 16), (3, 16)]
    for shape in printed["shapes"]:
        assert set(shape["results"]) == {"separate", "default", "bk16 s1 w4 st2",
                                         "bk16 s4 w4 st2", "bk16 keys16 w4 st2"}
        for r in shape["results"].values():
            assert "error" not in r and r["max_abs_err"] < 1e-4 and r["ms"] > 0
        assert shape["best"] in shape["results"] and shape["best"] != "separate"
        assert shape["default_splits"] == {"16": 4}  # 32 programs want 8; 4 tiles of 16
        assert shape["default_tiling"] == [128, 1, None]  # 64 keys: one tile, not split
    # rows of 20 to 40 keys, the longest 40
    assert printed["shapes"][1]["spread"] == 0.5
    assert 20 <= printed["shapes"][1]["mean_context"] < 40
    labels = [label for label, _ in decode_kernel.configurations(
        decode_kernel.build_parser().parse_args([]), 256 * 2)]
    assert "bk64 s4 w4 st2" in labels and "bk64 s8 w4 st2" not in labels


def test_step_profile_summarize_nested_and_overlapping():
    from benchmarks import step_profile

    def ev(name, start, end, hlo_op=None):  # times in ms
        return {"name": name, "hlo_op": hlo_op, "module": "m", "start": start * 1e6,
                "end": end * 1e6}

    # one line: a while loop (0-10) around two body ops; a second line overlaps 8-14
    lines = [[ev("while", 0, 10), ev("a", 1, 4), ev("b", 5, 9)], [ev("c", 8, 14, "dot.1")]]
    out = step_profile.summarize_events([lines], steps=2, top=10)
    by = {t["name"]: t for t in out["top"]}
    assert by["while"]["ms_per_step"] == 1.5  # 10 - 3 - 4 of its own, over 2 steps
    assert by["a"]["ms_per_step"] == 1.5 and by["c"]["ms_per_step"] == 3
    assert out["device_busy_ms_per_step"] == 7  # the union, 0-14, over 2 steps
    assert out["op_ms_per_step"] == 8
    assert out["span_ms_per_step"] == 7 and out["largest_gaps_ms"] == []
    assert by["c"]["hlo_op"] == "dot.1" and out["top_by_hlo_op"][0]["name"] in {"while", "dot.1"}
    assert abs(sum(t["share"] for t in out["top"]) - 1) < 1e-3

    # idle stretches: busy is the union (2 + 1 ms), span first start to last end, one gap
    out = step_profile.summarize_events([[[ev("x", 0, 2), ev("y", 5, 6)]]], steps=1, top=5)
    assert out["device_busy_ms_per_step"] == 3 and out["span_ms_per_step"] == 6
    assert out["largest_gaps_ms"] == [3] and out["gaps_over_50us_ms_per_step"] == 3


def test_step_profile_gpu_planes():
    """A GPU trace's layout: kernels on the "Stream #" lines of "/device:GPU:N" planes, the
    derived and CUPTI-overhead lines and the host plane's events left out."""
    from types import SimpleNamespace as NS

    from benchmarks import step_profile

    def ev(name, start, dur, **stats):
        return NS(name=name, start_ns=start, duration_ns=dur, stats=list(stats.items()))

    gpu = NS(name="/device:GPU:0", lines=[
        NS(name="Stream #13(Kernel,MemcpyH2D)",
           events=[ev("gemm_kernel", 0, 4e6, hlo_op="dot.3", hlo_module="jit__step_fn"),
                   ev("MemcpyH2D", 5e6, 1e6)]),
        NS(name="XLA Ops", events=[ev("dot.3", 0, 4e6)]),
        NS(name="CUPTI overhead", events=[ev("overhead", 0, 9e6)])])
    host = NS(name="/host:CPU", lines=[NS(name="t", events=[ev("x", 0, 9e6, hlo_op="x")])])
    devices, where = step_profile.select_events(NS(planes=[host, gpu]), "gpu")
    assert "/device:GPU:0" in where and [len(evs) for evs in devices[0]] == [2]
    out = step_profile.summarize_events(devices, steps=1, top=5)
    assert out["device_busy_ms_per_step"] == 5 and out["top"][0]["hlo_op"] == "dot.3"
    # the kernel ends at 4 ms, the copy starts at 5: one idle millisecond in a 6 ms span
    assert out["span_ms_per_step"] == 6 and out["largest_gaps_ms"] == [1.0]
    assert out["gaps_over_50us_ms_per_step"] == 1.0
    with pytest.raises(RuntimeError, match="no /device"):
        step_profile.select_events(NS(planes=[host]), "gpu")


def test_random_model_loads_in_jaxvllm_and_transformers(tmp_path):
    """A cut-down random copy of a published shape: config fields as published, weights
    that jaxvllm and transformers read alike (same greedy tokens)."""
    import json

    from benchmarks import random_model
    from jaxvllm import LLM, SamplingParams

    path = random_model.build("qwen2.5-0.5b", tmp_path / "m", dtype="float32", num_layers=1)
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == 896
    assert config["vocab_size"] == 151936 and config["num_key_value_heads"] == 2
    with pytest.raises(ValueError, match="unknown shape"):
        random_model.build("gpt-9", tmp_path / "x")

    prompt = [5, 77, 1024, 3, 150000, 42]
    llm = LLM(str(path), max_model_len=64, max_num_seqs=2, max_num_batched_tokens=32)
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    ours = list(out[0].outputs[0].token_ids)

    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        gen = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                          min_new_tokens=6, pad_token_id=0)
    assert ours == gen[0, len(prompt):].tolist()


def test_step_probe_counts_the_tokens_generate_does_not_stream(llama_folder):
    """LLM.generate asks the engine for final outputs only; the probe still sees every step's
    new tokens (from the engine's count), so the first token is the first step's, and the
    per-step counts add up to the outputs."""
    from jaxvllm import LLM, SamplingParams

    llm = LLM(str(llama_folder), attention_backend="reference", max_model_len=64,
              max_num_seqs=4, max_num_batched_tokens=32)
    prompts = [{"prompt_token_ids": [3, 14, 15, 92][: 2 + i]} for i in range(3)]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    origin = time.perf_counter()
    with common.StepProbe(llm.llm_engine, origin) as probe:
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert sum(s.new_tokens for s in probe.steps) == sum(len(o.outputs[0].token_ids)
                                                         for o in outs) == 15
    # (a step's tokens may come back with the next step call: collected while it runs)
    assert [s.new_tokens for s in probe.steps if s.new_tokens] == [3, 3, 3, 3, 3]
    assert probe.first_token_at == next(s.end for s in probe.steps if s.new_tokens)


def test_a_finished_step_probe_lets_the_engine_go(llama_folder):
    """latency --compare-xla drops the engine before the baseline runs: the probes it keeps
    for the report must not hold the engine (and its KV cache) alive."""
    import gc
    import weakref

    from jaxvllm import LLM, SamplingParams

    llm = LLM(str(llama_folder), attention_backend="reference", max_model_len=64,
              max_num_seqs=4, max_num_batched_tokens=32)
    with common.StepProbe(llm.llm_engine) as probe:
        llm.generate([{"prompt_token_ids": [3, 14, 15]}], SamplingParams(max_tokens=3),
                     use_tqdm=False)
    engine = weakref.ref(llm.llm_engine)
    del llm
    gc.collect()
    assert engine() is None and len(probe.steps) >= 3


def test_host_overhead_benchmark(capsys, tmp_path):
    """Both modes generate every token, only the pipelined one schedules calls ahead, and
    the printed ratio is theirs."""
    from benchmarks import host_overhead

    out = tmp_path / "host.json"
    host_overhead.main(["--num-prompts", "3", "--input-len", "5", "--output-len", "11",
                        "--num-scheduler-steps", "4", "--max-num-seqs", "4",
                        "--max-model-len", "64", "--output-json", str(out)])
    printed = _last_json(capsys)
    assert printed == json.loads(out.read_text())
    pipelined, in_order = printed["pipelined"], printed["in_order"]
    for r in (pipelined, in_order):
        assert r["output_tokens"] == 3 * 11
        assert r["multi_step_calls"] >= 2 and r["compile_seconds_in_run"] == 0
        assert set(r["host_ms_per_step"]) == set(host_overhead.PARTS)
    assert pipelined["steps_scheduled_ahead"] >= 1 and in_order["steps_scheduled_ahead"] == 0
    assert printed["ratio_pipelined_vs_in_order"] == pytest.approx(
        pipelined["output_tokens_per_second"] / in_order["output_tokens_per_second"], abs=0.01)
    with pytest.raises(SystemExit, match="host_overhead: error: --output-len"):
        host_overhead.main(["--output-len", "0"])
    with pytest.raises(SystemExit, match="host_overhead: error: --async-scheduling"):
        host_overhead.main(["--no-async-scheduling"])


# An optimized GPU program as XLA prints it, cut down: outside the loop two kernels and a
# copy; the loop body a GEMM fusion, a Triton custom call, an async fusion (counted once) and
# a called computation holding one more fusion; views and constants launch nothing.
GPU_HLO = """HloModule jit_step, is_scheduled=true

%fused_rms (p0: bf16[16,896]) -> bf16[16,896] {
  %p0 = bf16[16,896]{1,0} parameter(0)
  ROOT %m = bf16[16,896]{1,0} multiply(%p0, %p0)
}

%inner (q: f32[16]) -> f32[16] {
  %q = f32[16]{0} parameter(0)
  ROOT %loop_add_fusion.2 = f32[16]{0} fusion(%q), kind=kLoop, calls=%fused_rms
}

%region_0.91.clone (arg: (s32[], bf16[16,896])) -> (s32[], bf16[16,896]) {
  %arg = (s32[], bf16[16,896]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = bf16[16,896]{1,0} get-tuple-element(%arg), index=1
  %gemm_fusion_dot.1 = f32[4,16,1152]{2,1,0} fusion(%x), kind=kCustom, calls=%gemm_fusion_dot.1_computation
  %pallas_call.30 = (bf16[16,14,64]{2,1,0}) custom-call(%x), custom_call_target="__gpu$xla.gpu.triton"
  %fusion-start = ((s32[8,16]{1,0}), s32[1,16]{1,0}) fusion-start(%i), kind=kLoop, calls=%fused_dynamic_slice
  %fusion-done = s32[1,16]{1,0} fusion-done(%fusion-start)
  %call.3 = f32[16]{0} call(%i), to_apply=%inner
  %b = bf16[16,896]{1,0} bitcast(%x)
  ROOT %t = (s32[], bf16[16,896]{1,0}) tuple(%i, %b)
}

ENTRY %main.5 (w: bf16[16,896]) -> bf16[16,896] {
  %w = bf16[16,896]{1,0} parameter(0)
  %c = s32[] constant(0)
  %wrapped_slice = bf16[16,896]{1,0} fusion(%w), kind=kLoop, calls=%wrapped_slice_computation.3
  %copy.1 = bf16[16,896]{1,0} copy(%wrapped_slice)
  %tuple = (s32[], bf16[16,896]{1,0}) tuple(%c, %copy.1)
  %while = (s32[], bf16[16,896]{1,0}) while(%tuple), condition=%cond, body=%region_0.91.clone
  %out = bf16[16,896]{1,0} get-tuple-element(%while), index=1
  ROOT %fused_pad = bf16[16,896]{1,0} fusion(%out), kind=kLoop, calls=%fused_pad.7
}
"""


def test_kernel_count_reads_optimized_hlo(capsys, tmp_path):
    from benchmarks import kernel_count

    counts = kernel_count.count_kernels(GPU_HLO)
    assert counts["entry"] == 3
    assert counts["entry_by_kind"] == {"fusion kLoop wrapped_slice_computation": 1, "copy": 1,
                                       "fusion kLoop fused_pad": 1}
    (loop,) = counts["loops"]
    assert loop["body"] == "region_0.91.clone" and loop["kernels"] == 4
    assert loop["by_kind"] == {"fusion kCustom gemm_fusion_dot": 1,
                               "custom-call __gpu$xla.gpu.triton": 1,
                               "fusion kLoop fused_dynamic_slice": 1,
                               "fusion kLoop fused_rms": 1}
    path = tmp_path / "step.hlo"
    path.write_text(GPU_HLO)
    kernel_count.main(["--hlo", str(path)])
    assert _last_json(capsys)["loops"][0]["kernels"] == 4
    with pytest.raises(ValueError, match="no ENTRY"):
        kernel_count.count_kernels("HloModule empty\n")
    with pytest.raises(SystemExit, match="kernel_count: error: --model"):
        kernel_count.main([])


def test_kernel_count_parses_what_this_jax_prints():
    """The parser on a program this jax compiled here: a loop of three dependent matmuls
    and a sine (the CPU's kernels, which XLA prints in the GPU's format)."""
    from benchmarks import kernel_count

    def body(i, x):
        return jnp.sin(x @ x @ x @ x) + i

    text = jax.jit(lambda x: jax.lax.fori_loop(0, 3, body, x)).lower(
        jnp.ones((8, 8))).compile().as_text()
    counts = kernel_count.count_kernels(text)
    assert len(counts["loops"]) == 1 and counts["loops"][0]["kernels"] >= 3


def test_compile_for_gpu_without_the_cuda_plugin():
    import importlib.util

    from pallas_kernels.gpu_lowering import compile_for_gpu

    if importlib.util.find_spec("jax_cuda12_plugin") is not None:
        pytest.skip("the CUDA plugin is installed: a deviceless compile works here")
    with pytest.raises(RuntimeError, match=r"jax\[cuda12\]"):
        compile_for_gpu(lambda x: x + 1, jax.ShapeDtypeStruct((4,), jnp.float32))


def test_small_batch_matmul_benchmark(capsys, tmp_path):
    """XLA's layer and every kernel tiling timed, each checked against XLA's output."""
    from benchmarks import small_batch_matmul

    out = tmp_path / "sbm.json"
    small_batch_matmul.main(["--smoke", "--output-json", str(out)])
    printed = _last_json(capsys)
    assert printed == json.loads(out.read_text())
    assert printed["benchmark"] == "small_batch_matmul"
    assert [s["padded_rows"] for s in printed["shapes"]] == [32]  # 20 rows, padded
    for shape in printed["shapes"]:
        tiling = "bn16 bk32 st2 s2"  # K in 2 splits
        assert set(shape["results"]) == {"xla", "default", tiling}
        for r in shape["results"].values():
            assert "error" not in r and r["rel_err"] < 1e-4 and r["us_per_layer"] > 0
        assert shape["results"]["xla"]["vs_xla"] == 1
        assert shape["best"] in ("default", tiling)
    labels = [label for label, _ in small_batch_matmul.configurations(
        small_batch_matmul.build_parser().parse_args([]))]
    assert len(labels) == 8 and "bn64 bk256 st3 s1" in labels


def test_decode_layer_benchmark(capsys, tmp_path):
    """Whole layers (attention included) three ways, each checked against XLA's output:
    XLA's projections, the small-batch kernels, one kernel a layer."""
    from benchmarks import decode_layer

    out = tmp_path / "dl.json"
    decode_layer.main(["--smoke", "--output-json", str(out)])
    printed = _last_json(capsys)
    assert printed == json.loads(out.read_text())
    assert printed["benchmark"] == "decode_layer"
    (shape,) = printed["shapes"]
    assert list(shape["results"]) == ["xla", "kernels", "layer k32 w4 attauto"]
    for r in shape["results"].values():
        assert "error" not in r and r["rel_err"] < 1e-4 and r["us_per_layer"] > 0
    assert shape["results"]["xla"]["vs_xla"] == 1
    assert shape["best"] in ("kernels", "layer k32 w4 attauto")


def test_small_batch_matmul_benchmark_per_projection(capsys):
    """One projection's tilings timed in the layer, the others at their defaults, against
    the layer with that projection computed by XLA; each line names the tiling it runs."""
    from benchmarks import small_batch_matmul

    small_batch_matmul.main(["--smoke", "--per-projection", "--projections", "down"])
    (shape,) = _last_json(capsys)["shapes"]
    results = shape["projections"]["down"]["results"]
    # K 96 (the smoke's intermediate size): unsplit by default, 2 splits of 64 asked for
    assert list(results) == ["xla", "default bn64 bk128 ks128 s1 (1 programs)",
                             "bn16 bk32 ks64 s2 (8 programs)"]
    for r in results.values():
        assert "error" not in r and r["rel_err"] < 1e-4 and r["us_per_layer"] > 0
    # each tiling as JAXVLLM_SMALL_BATCH_TILINGS takes it
    assert shape["projections"]["down"]["shape"] == "96x64"
    assert [r.get("tiling") for r in results.values()] == [None, [64, 1], [16, 2]]
