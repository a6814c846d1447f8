"""Online serving benchmark, as `vllm bench serve`: an asyncio HTTP client streaming from an
OpenAI-compatible `/v1/completions` endpoint (jaxvllm's or vLLM's server).

    jaxvllm serve &                                        # or: vllm serve MODEL
    python benchmarks/serve.py --dataset random --num-prompts 200 --input-len 256 \\
        --output-len 64 --request-rate 4 --max-concurrency 16 --vocab-size 49152
    python benchmarks/serve.py --base-url http://gpu-box:8000 --model Qwen/Qwen2.5-0.5B \\
        --dataset sharegpt --dataset-path ShareGPT_V3.json --goodput ttft:500 tpot:50
    jaxvllm bench serve ...                                # the same

Requests arrive as a Poisson process at `--request-rate` per second (gamma intervals with
`--burstiness` other than 1; `inf`, the default, sends them all at once), at most
`--max-concurrency` in flight. Each streams (`"stream": true`, usage in the last chunk);
measured per request: TTFT (time to the first chunk), ITL (between chunks), TPOT ((latency -
TTFT) / (output tokens - 1)) and end-to-end latency, reported as mean, median, std and the
`--metric-percentiles`, with request and token throughput, and goodput (requests per second
that met every `--goodput` SLO, in ms). Random prompts are sent as token ids (a model without
a tokenizer works; the vocabulary comes from --vocab-size, --tokenizer or a local --model),
ShareGPT prompts as text. The last line is one JSON object; `--save-result` also writes the
per-request figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import `benchmarks` from the repository root
    _here = Path(__file__).resolve().parent
    # benchmarks/ itself must not lead sys.path: its datasets.py would shadow HF `datasets`
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import asyncio
import dataclasses
import json
import os
import time
from typing import Optional

import numpy as np

from benchmarks import common
from benchmarks.datasets import SampleRequest, add_dataset_args, describe, requests_from_args

SLO_METRICS = ("ttft", "tpot", "e2el")
PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_NAMES = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st)",
                "itl": "Inter-token latency", "e2el": "End-to-end latency"}


@dataclasses.dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from sending to the first chunk
    itl: list[float] = dataclasses.field(default_factory=list)  # seconds between chunks
    latency: float = 0.0  # seconds from sending to the last chunk
    start: float = 0.0  # when it was sent, seconds after the benchmark began
    generated_text: str = ""
    error: str = ""

    @property
    def tpot(self) -> Optional[float]:
        if self.output_tokens > 1:
            return (self.latency - self.ttft) / (self.output_tokens - 1)
        return None


def build_parser() -> argparse.ArgumentParser:
    p = common.parser_from_doc("jaxvllm bench serve", __doc__)
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default=None, help="e.g. http://localhost:8000 "
                   "(default: http://HOST:PORT)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--endpoint", default="/v1/completions")
    g.add_argument("--model", default=None,
                   help="the model name to send (default: the first of GET /v1/models)")
    g.add_argument("--tokenizer", default=None,
                   help="local tokenizer (folder, Hub id in the cache, .gguf) for ShareGPT "
                        "lengths and the random vocabulary")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="random prompts: token ids are drawn from [0, VOCAB_SIZE)")
    add_dataset_args(p, num_prompts=1000, input_len=1024, output_len=128)
    g = p.add_argument_group("traffic")
    g.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (default inf: all at once)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival intervals (1: Poisson; <1 burstier)")
    g.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--timeout", type=float, default=6 * 3600, help="per request, seconds")
    g.add_argument("--skip-test-request", action="store_true",
                   help="do not send one request first to check the endpoint")
    g = p.add_argument_group("report")
    g.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, in ms, keys ttft, tpot, e2el (e.g. ttft:500 tpot:50)")
    g.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                   help="comma-separated metrics to report percentiles of")
    g.add_argument("--metric-percentiles", default="99",
                   help="comma-separated percentiles (e.g. 25,50,75,99)")
    g.add_argument("--plot", default=None, metavar="OUT.png", help="draw the figures here")
    g.add_argument("--save-result", default=None, metavar="FILE.json",
                   help="write the full result, per-request figures included")
    g.add_argument("--disable-tqdm", action="store_true")
    return p


def parse_goodput(items: Optional[list[str]]) -> dict[str, float]:
    slos = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_METRICS:
            raise ValueError(f"--goodput {item!r}: expected KEY:MS with KEY in "
                             f"{', '.join(SLO_METRICS)}")
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of ms") from None
        if slos[key] < 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be >= 0 ms")
    return slos


# -- the client --------------------------------------------------------------------------------


def _headers() -> dict:
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def completion_payload(model: str, req: SampleRequest, temperature: float,
                       ignore_eos: bool) -> dict:
    """The /v1/completions body vLLM's servers take (`ignore_eos` is a vLLM extension)."""
    prompt = req.prompt if req.prompt is not None else req.prompt_token_ids
    return {"model": model, "prompt": prompt,
            "max_tokens": req.expected_output_len, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": ignore_eos}


async def send_request(client, url: str, payload: dict, prompt_len: int,
                       origin: float) -> RequestResult:
    """POST one streaming completion and time its chunks (server-sent events)."""
    result = RequestResult(prompt_len=prompt_len)
    sent = time.perf_counter()
    result.start = sent - origin
    last = sent
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=payload, headers=_headers()) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {resp.status_code}: {body[:500]}"
                return result
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = json.dumps(chunk["error"])[:500]
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if chunks == 0:
                        result.ttft = now - sent
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                    result.generated_text += chunk["choices"][0].get("text") or ""
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
        if chunks == 0:
            result.error = "the stream held no completion chunk"
            return result
        result.latency = last - sent
        result.output_tokens = usage_tokens if usage_tokens is not None else chunks
        result.success = True
    except Exception as e:  # the benchmark goes on; the failure is counted and reported
        result.error = f"{type(e).__name__}: {e}"[:500]
    return result


def arrival_intervals(n: int, rate: float, burstiness: float,
                      rng: np.random.Generator) -> np.ndarray:
    """The n - 1 waits between n arrivals: gamma with shape `burstiness` and mean 1/rate
    (exponential, i.e. a Poisson process, at burstiness 1); zeros at an infinite rate."""
    if not np.isfinite(rate):
        return np.zeros(max(n - 1, 0))
    return rng.gamma(burstiness, 1.0 / (rate * burstiness), size=max(n - 1, 0))


async def arrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator):
    """Yield 0..n-1 at the arrival times: each yield is when request i is due."""
    waits = arrival_intervals(n, rate, burstiness, rng)
    start = time.perf_counter()
    due = 0.0
    for i in range(n):
        delay = start + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield i
        if i < len(waits):
            due += float(waits[i])


async def run_traffic(base_url: str, endpoint: str, model: str, requests: list[SampleRequest],
                      args, progress: bool = False) -> tuple[list[RequestResult], float, int]:
    """Send every request at its arrival time; returns results, duration, peak concurrency."""
    import httpx

    url = base_url.rstrip("/") + endpoint
    limits = httpx.Limits(max_connections=args.max_concurrency or len(requests) or 1,
                          max_keepalive_connections=args.max_concurrency or len(requests) or 1)
    timeout = httpx.Timeout(args.timeout, connect=60.0)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    rng = np.random.default_rng(args.seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), desc="requests", file=sys.stderr)
    in_flight = peak = 0

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        async def one(req: SampleRequest) -> RequestResult:
            nonlocal in_flight, peak
            payload = completion_payload(model, req, args.temperature, args.ignore_eos)
            if sem is not None:
                await sem.acquire()
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await send_request(client, url, payload, req.prompt_len, origin)
            finally:
                in_flight -= 1
                if sem is not None:
                    sem.release()
                if bar is not None:
                    bar.update(1)

        origin = time.perf_counter()
        tasks = []
        async for i in arrival_times(len(requests), args.request_rate, args.burstiness, rng):
            tasks.append(asyncio.create_task(one(requests[i])))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - origin
    if bar is not None:
        bar.close()
    return list(results), duration, peak


async def discover_model(base_url: str) -> str:
    import httpx

    async with httpx.AsyncClient(timeout=30.0) as client:
        resp = await client.get(base_url.rstrip("/") + "/v1/models", headers=_headers())
        resp.raise_for_status()
        models = resp.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]


async def test_request(base_url: str, endpoint: str, model: str, req: SampleRequest,
                       args) -> None:
    import httpx

    short = SampleRequest(req.prompt_token_ids, min(req.expected_output_len, 4), req.prompt)
    payload = completion_payload(model, short, args.temperature, args.ignore_eos)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout, connect=60.0)) as client:
        result = await send_request(client, base_url.rstrip("/") + endpoint, payload,
                                    short.prompt_len, time.perf_counter())
    if not result.success:
        raise ValueError(f"the test request to {base_url}{endpoint} failed: {result.error} "
                         f"(check --base-url/--endpoint/--model; --skip-test-request skips this)")


# -- metrics -----------------------------------------------------------------------------------


def compute_metrics(results: list[RequestResult], duration: float, slos: dict[str, float],
                    percentiles: list[float], metrics: list[str]) -> dict:
    """vLLM's serving metrics: throughput, goodput, and ms statistics of each metric."""
    ok = [r for r in results if r.success]
    r_ = common._r
    inputs = sum(r.prompt_len for r in ok)
    outputs = sum(r.output_tokens for r in ok)
    values = {"ttft": [r.ttft * 1e3 for r in ok],
              "tpot": [r.tpot * 1e3 for r in ok if r.tpot is not None],
              "itl": [x * 1e3 for r in ok for x in r.itl],
              "e2el": [r.latency * 1e3 for r in ok]}
    good = 0
    for r in ok:
        measured = {"ttft": r.ttft * 1e3, "tpot": (r.tpot or 0.0) * 1e3, "e2el": r.latency * 1e3}
        good += all(measured[k] <= v for k, v in slos.items())
    out = {"duration": r_(duration, 4), "completed": len(ok), "failed": len(results) - len(ok),
           "total_input_tokens": inputs, "total_output_tokens": outputs,
           "request_throughput": r_(len(ok) / duration, 4) if duration > 0 else None,
           "request_goodput": (r_(good / duration, 4) if duration > 0 else None) if slos else None,
           "output_throughput": r_(outputs / duration, 2) if duration > 0 else None,
           "total_token_throughput": r_((inputs + outputs) / duration, 2) if duration > 0 else None}
    for name in PERCENTILE_METRICS:  # vLLM's names: mean_ttft_ms, median_ttft_ms, p99_ttft_ms
        v = np.asarray(values[name] or [0.0], dtype=np.float64)
        out[f"mean_{name}_ms"] = r_(v.mean(), 4)
        out[f"median_{name}_ms"] = r_(np.median(v), 4)
        out[f"std_{name}_ms"] = r_(v.std(), 4)
        for p in (percentiles if name in metrics else ()):
            out[f"p{p:g}_{name}_ms".replace(".", "_")] = r_(np.percentile(v, p), 4)
    return out


# -- the benchmark -----------------------------------------------------------------------------


def _vocab_and_tokenizer(args, served_model: str):
    """The tokenizer (ShareGPT needs it) and vocabulary size (random prompts need it)."""
    from jaxvllm.models.source import DEFAULT_MODEL_NAME

    need_tok = args.dataset == "sharegpt"
    if args.vocab_size is not None and not need_tok:
        return args.vocab_size, None
    local = args.tokenizer or args.model or served_model
    if local == DEFAULT_MODEL_NAME:
        local = None  # jaxvllm serve's default name: the embedded model
    try:
        info = common.workload_model_info(local, args.tokenizer, need_tokenizer=need_tok)
    except Exception as e:
        raise ValueError(f"cannot read the model {local or DEFAULT_MODEL_NAME!r} locally for "
                         f"its vocabulary/tokenizer ({type(e).__name__}: {e}); pass "
                         f"--vocab-size (random) or --tokenizer PATH") from None
    return args.vocab_size or info["vocab_size"], info["tokenizer"]


def run(args) -> dict:
    slos = parse_goodput(args.goodput)
    percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in PERCENTILE_METRICS]
    if bad:
        raise ValueError(f"--percentile-metrics: unknown {bad}; choose from {PERCENTILE_METRICS}")
    if args.request_rate <= 0:
        raise ValueError("--request-rate must be > 0 (inf: all at once)")
    if args.burstiness <= 0:
        raise ValueError("--burstiness must be > 0")
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    model = args.model or asyncio.run(discover_model(base_url))
    vocab, tokenizer = _vocab_and_tokenizer(args, model)
    requests = requests_from_args(args, vocab, tokenizer, seed=args.seed)
    if not args.skip_test_request:
        asyncio.run(test_request(base_url, args.endpoint, model, requests[0], args))
    results, duration, peak = asyncio.run(
        run_traffic(base_url, args.endpoint, model, requests, args,
                    progress=not args.disable_tqdm))

    result = {"benchmark": "serve", "model": model, "device": None, "dtype": None,
              "base_url": base_url, "endpoint": args.endpoint,
              "workload": describe(args, requests),
              "request_rate": args.request_rate if np.isfinite(args.request_rate) else "inf",
              "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
              "max_concurrent_requests": peak, "goodput_slos_ms": slos or None,
              **compute_metrics(results, duration, slos, percentiles, metrics)}
    errors = [r.error for r in results if not r.success]
    if errors:
        result["first_error"] = errors[0]
    report(result, percentiles, metrics)
    if args.plot:
        result["plot"] = plot(args.plot, result, results)
    if args.save_result:
        detail = dict(result, input_lens=[r.prompt_len for r in results],
                      output_lens=[r.output_tokens for r in results],
                      ttfts=[r.ttft for r in results], itls=[r.itl for r in results],
                      e2els=[r.latency for r in results], starts=[r.start for r in results],
                      errors=[r.error for r in results])
        Path(args.save_result).write_text(json.dumps(detail, default=str))
    common.emit_json(result)
    return result


def report(res: dict, percentiles: list[float], metrics: list[str]) -> None:
    w = res["workload"]
    rows = [("Server", res["base_url"] + res["endpoint"]), ("Model", res["model"]),
            ("Workload", f"{w['dataset']}: {w['num_prompts']} requests, in "
                         f"{w['input_len_min']}-{w['input_len_max']}, out "
                         f"{w['output_len_min']}-{w['output_len_max']}"),
            ("Request rate (req/s) / burstiness", f"{res['request_rate']} / {res['burstiness']}"),
            ("Max concurrency / peak in flight", f"{res['max_concurrency'] or 'none'} / "
                                                 f"{res['max_concurrent_requests']}"),
            ("Successful requests", res["completed"]), ("Failed requests", res["failed"]),
            ("Benchmark duration (s)", res["duration"]),
            ("Total input tokens", res["total_input_tokens"]),
            ("Total generated tokens", res["total_output_tokens"]),
            ("Request throughput (req/s)", res["request_throughput"]),
            ("Request goodput (req/s)", res["request_goodput"]),
            ("Output token throughput (tok/s)", res["output_throughput"]),
            ("Total token throughput (tok/s)", res["total_token_throughput"])]
    for name in metrics:
        rows.append((f"-- {METRIC_NAMES[name]} --", None))
        rows += [(f"Mean {name.upper()} (ms)", res[f"mean_{name}_ms"]),
                 (f"Median {name.upper()} (ms)", res[f"median_{name}_ms"])]
        for p in percentiles:
            rows.append((f"P{p:g} {name.upper()} (ms)", res[f"p{p:g}_{name}_ms".replace(".", "_")]))
    common.print_table("Serving Benchmark Result", rows)


def plot(path: str, res: dict, results: list[RequestResult]) -> str:
    ok = [r for r in results if r.success]

    def panel(name, values):
        def draw(ax):
            common.plot_cdf(ax, values, f"{len(values)} samples", f"{name} (ms)")
        return (f"{METRIC_NAMES[name]} CDF", draw)

    def timeline(ax):
        ax.scatter([r.start for r in ok], [r.ttft * 1e3 for r in ok], s=6, label="TTFT")
        ax.scatter([r.start for r in ok], [r.latency * 1e3 for r in ok], s=6, label="E2E")
        ax.set_xlabel("sent at (s after start)")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)

    panels = [panel("ttft", [r.ttft * 1e3 for r in ok]),
              panel("itl", [x * 1e3 for r in ok for x in r.itl]),
              panel("tpot", [r.tpot * 1e3 for r in ok if r.tpot is not None]),
              panel("e2el", [r.latency * 1e3 for r in ok]),
              ("latency over the run", timeline)]
    return common.save_plot(path, panels, f"serve: {res['model']} at {res['request_rate']} req/s, "
                                          f"max concurrency {res['max_concurrency']}")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    return common.run_or_exit("serve", run, args)


if __name__ == "__main__":
    main()
    sys.exit(0)
