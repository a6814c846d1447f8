"""GET /metrics: Prometheus metrics with vLLM's names under the `jaxvllm:` prefix.

A `StatLogger` of `AsyncLLMEngine`: the engine thread calls `record` after every step, so the
gauges describe the engine between steps and the histograms see every token. Each server
gets its own registry (several servers can live in one process, as in the tests).
"""

from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, disable_created_metrics, generate_latest)

from jaxvllm.engine.async_engine import IterationStats, SchedulerStats

PREFIX = "jaxvllm:"

disable_created_metrics()  # no `*_created` series next to each counter (as vLLM)

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                  100000)


class PrometheusStatLogger:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name, doc):
            return Gauge(PREFIX + name, doc, labels, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(PREFIX + name, doc, labels, registry=r).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(PREFIX + name, doc, labels, buckets=buckets,
                             registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Number of requests in model execution "
                             "batches.")
        self.waiting = gauge("num_requests_waiting", "Number of requests waiting to be "
                             "processed.")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent "
                              "usage.")
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens "
                                         "processed.")
        self.preemptions = counter("num_preemptions", "Cumulative number of preemptions "
                                   "from the engine.")
        self.prefix_queries = counter("prefix_cache_queries", "Prefix cache queries, in terms "
                                      "of number of queried tokens.")
        self.prefix_hits = counter("prefix_cache_hits", "Prefix cache hits, in terms of "
                                   "number of cached tokens.")
        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first "
                              "token in seconds.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency "
                             "in seconds.", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency "
                             "in seconds.", _E2E_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Number of prefill "
                                               "tokens processed.", _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens", "Number of "
                                                   "generation tokens processed.",
                                                   _TOKEN_BUCKETS)
        self._success = Counter(PREFIX + "request_success", "Count of successfully processed "
                                "requests.", labels + ["finished_reason"], registry=r)
        self._model_name = model_name
        for reason in ("stop", "length", "abort"):
            self._success.labels(model_name, reason)

    def record(self, scheduler: SchedulerStats, iteration: IterationStats) -> None:
        self.running.set(scheduler.num_running)
        self.waiting.set(scheduler.num_waiting)
        self.kv_usage.set(scheduler.kv_cache_usage)
        self.preemptions.inc(scheduler.num_preemptions)
        self.prefix_queries.inc(scheduler.prefix_cache_queries)
        self.prefix_hits.inc(scheduler.prefix_cache_hits)
        self.prompt_tokens.inc(iteration.num_prompt_tokens)
        self.generation_tokens.inc(iteration.num_generation_tokens)
        for value in iteration.time_to_first_tokens:
            self.ttft.observe(value)
        for value in iteration.inter_token_latencies:
            self.itl.observe(value)
        for f in iteration.finished:
            self.e2e.observe(f.e2e_latency)
            self.request_prompt_tokens.observe(f.num_prompt_tokens)
            self.request_generation_tokens.observe(f.num_generation_tokens)
            self._success.labels(self._model_name, f.finish_reason).inc()

    def log(self) -> None:
        pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
