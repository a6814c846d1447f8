"""`jaxvllm serve [MODEL]`: the OpenAI-compatible server, with vLLM's flag names.

Only argparse is imported here; the engine, FastAPI and uvicorn load when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time

API_KEY_ENV = "JAXVLLM_API_KEY"

DESCRIPTION = """\
Serve MODEL over the OpenAI API: /v1/completions, /v1/chat/completions (streaming too),
/v1/models, /tokenize, /detokenize, /health, /version and Prometheus /metrics.

MODEL is a Hugging Face folder, a Hub id in the local cache, a .gguf file, a folder written
by `jaxvllm convert`, or nothing for the embedded SmolLM2-135M-Instruct. The server listens
on 127.0.0.1 unless --host says otherwise; SIGINT or SIGTERM stop it after the requests in
flight finish (at most --shutdown-timeout seconds, then they are aborted)."""

EPILOG = f"""\
examples:
  jaxvllm serve                                        # the embedded default model, port 8000
  jaxvllm serve Qwen/Qwen2.5-1.5B-Instruct --max-model-len 8k --max-num-seqs 64
  jaxvllm serve ./qwen-jax --served-model-name qwen --host 0.0.0.0 --api-key s3cret
  {API_KEY_ENV}=s3cret jaxvllm serve ./model.gguf --port 8080

  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}}'
  python -c "import openai; c = openai.OpenAI(base_url='http://localhost:8000/v1', api_key='-');
  print(c.chat.completions.create(model=c.models.list().data[0].id,
        messages=[{{'role': 'user', 'content': 'Hi!'}}]).choices[0].message.content)\""""


def parse_size(text: str) -> int:
    """4096, 4k, 32K (x1024), 1m, 1M -> int; vLLM's --max-model-len forms."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a number like 4096, 4k or 32K, got {text!r}")
    value, unit = float(match.group(1)), match.group(2)
    scale = {"": 1, "k": 1000, "K": 1024, "m": 10**6, "M": 1 << 20, "g": 10**9, "G": 1 << 30}
    return int(value * scale[unit])


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine flags (vLLM's names), shared with other commands that build an engine."""
    g = p.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: "
                   "the model's)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations (auto: float32 on CPU, bfloat16 on GPU)")
    g.add_argument("--max-model-len", type=parse_size, default=None,
                   help="context length (prompt + output), e.g. 4096 or 8k (default: the "
                        "model's)")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="requests in one batch (default: 256 on GPU, 16 on CPU)")
    g.add_argument("--max-num-batched-tokens", type=parse_size, default=None,
                   help="tokens in one step (default: 8192 on GPU, 256 on CPU)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of device memory for weights, activations and KV cache")
    g.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="KV-cache blocks, ignoring the memory-based sizing")
    g.add_argument("--cpu-kv-cache-bytes", type=parse_size, default=None,
                   help="on CPU, the KV-cache budget, e.g. 4G (default 1G)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True, help="reuse the KV blocks of shared prompt prefixes")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=True, help="split long prompts over several steps")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="devices to shard the model over")
    d = p.add_argument_group("distributed",
                             "several hosts or processes (see docs/tensor_parallel.md)")
    d.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="process 0's address for jax.distributed (also "
                        "$JAXVLLM_COORDINATOR_ADDRESS); every process passes the same one")
    d.add_argument("--num-processes", type=int, default=None,
                   help="processes in all (also $JAXVLLM_NUM_PROCESSES)")
    d.add_argument("--process-id", type=int, default=None,
                   help="this process's rank, 0 serves (also $JAXVLLM_PROCESS_ID)")
    g.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs")
    g.add_argument("--attention-backend", default=None, help=ATTENTION_BACKEND_HELP)
    g.add_argument("--seed", type=int, default=0, help="seed of unseeded sampled requests")
    add_engine_switches(g)


# jaxvllm.models.attention.ATTENTION_BACKENDS, written out: the CLI does not import jax to
# print its help (tests/test_kernels.py checks that the two agree)
ATTENTION_BACKEND_HELP = ("cpu, xla, reference, pallas, pallas_triton, pallas_mosaic_gpu or "
                          "pallas:<variant> (default: pallas on a GPU; on the CPU cpu, the "
                          "native kernel, or xla where it cannot be built)")

# On/off engine options whose default depends on the machine (None: the engine decides).
ENGINE_SWITCHES = {
    "async_scheduling": "schedule each step before the one in flight is collected "
                        "(default: only a multi-step decode after another; "
                        "--no-async-scheduling: never)",
    "unroll_layers": "run the layers unrolled on per-layer fused weights (default: on one device)",
    "small_batch_matmuls": "small decode steps' projections as Pallas kernels with the norm, "
                           "bias, rotary embeddings, gating and residual add fused in "
                           "(unrolled layers, RMSNorm models; interpreted on the CPU; "
                           "default: on a GPU, for the step sizes where a start-up measurement "
                           "found them faster than XLA; off on the CPU)",
    "sampling_kernels": "sample with Pallas kernels instead of XLA's fusions (one device; "
                        "interpreted on the CPU; default: on a GPU, for the step sizes where "
                        "a start-up measurement found them faster; off on the CPU)",
    "decode_layer_kernel": "decode steps of up to 64 rows run each layer as one Pallas kernel "
                           "(unrolled layers of RMSNorm models with a gated MLP and rotary "
                           "embeddings, Triton attention, one device; interpreted on the CPU; "
                           "default: off)",
    "precompile": "compile the decode steps in background threads at start-up "
                  "(default: on a GPU)",
    "wait_for_precompile": "start serving only once those are compiled (default: on a GPU; "
                           "else steps run beside the compilation, padded to compiled ones)",
}


# the flags add_engine_switches adds, by EngineConfig field (unset: the engine's default)
ENGINE_OPTIONS = (*ENGINE_SWITCHES, "num_scheduler_steps")


def add_engine_switches(group) -> None:
    """--async-scheduling / --no-async-scheduling and the other ENGINE_SWITCHES, and
    --num-scheduler-steps."""
    for name, text in ENGINE_SWITCHES.items():
        group.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                           default=None, help=text)
    group.add_argument("--num-scheduler-steps", type=int, default=None,
                       help="decode steps one device call may run when every running request "
                            "decodes and nothing could join (default: 8 on a GPU, 1 on the CPU)")


def engine_kwargs(args) -> dict:
    kwargs = dict(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, seed=args.seed,
                  max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  num_gpu_blocks_override=args.num_gpu_blocks_override,
                  enable_prefix_caching=args.enable_prefix_caching,
                  enable_chunked_prefill=args.enable_chunked_prefill,
                  tensor_parallel_size=args.tensor_parallel_size,
                  scheduling_policy=args.scheduling_policy,
                  attention_backend=args.attention_backend)
    if args.cpu_kv_cache_bytes is not None:
        kwargs["cpu_kv_cache_bytes"] = args.cpu_kv_cache_bytes
    for name in ENGINE_OPTIONS:
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over the OpenAI API",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_tag", nargs="?", metavar="MODEL", default=None,
                   help="the model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--model", default=None, help="the model, when not given as MODEL")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", nargs="+", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' (also read from ${API_KEY_ENV}); "
                        f"/health and /metrics stay open")
    s.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients send; the first is reported (default: MODEL)")
    s.add_argument("--allowed-origins", nargs="*", default=None, metavar="ORIGIN",
                   help="enable CORS for these origins ('*' for any)")
    s.add_argument("--max-request-body-bytes", type=parse_size, default=32 << 20,
                   help="larger request bodies get 413 (default 32M)")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM")
    s.add_argument("--disable-log-requests", action="store_true",
                   help="no log line per request")
    s.add_argument("--disable-log-stats", action="store_true",
                   help="no periodic throughput / KV-cache log line")
    s.add_argument("--log-stats-interval", type=float, default=10.0,
                   help="seconds between throughput lines")
    s.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    add_engine_args(p)
    p.set_defaults(func=run)


logger = logging.getLogger("jaxvllm.serve")


def resolve_api_keys(flag_keys):
    """--api-key wins; else $JAXVLLM_API_KEY; else no key (an open server)."""
    if flag_keys:
        return list(flag_keys)
    env = os.environ.get(API_KEY_ENV)
    return [env] if env else None


def run(args) -> int:
    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise ValueError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
    args.model = args.model_tag if args.model_tag is not None else args.model
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(asctime)s [%(name)s] %(message)s",
                        datefmt="%m-%d %H:%M:%S")
    logging.getLogger("jax").setLevel(logging.WARNING)  # no "Unable to initialize backend"
    if args.disable_log_requests:
        logging.getLogger("jaxvllm.server.requests").setLevel(logging.WARNING)
    api_keys = resolve_api_keys(args.api_key)

    from jaxvllm import distributed

    multi_process = distributed.initialize(args.coordinator_address, args.num_processes,
                                           args.process_id)
    if multi_process and not distributed.is_driver():
        return run_worker_process(args)

    from jaxvllm.entrypoints.openai.server import bind_socket, build_app, run_server

    sock = bind_socket(args.host, args.port)  # fail now, not after loading the model
    try:
        from jaxvllm.config import EngineConfig
        from jaxvllm.engine.async_engine import AsyncLLMEngine
        from jaxvllm.engine.engine import LLMEngine

        start = time.perf_counter()
        engine = LLMEngine(EngineConfig.from_kwargs(**engine_kwargs(args)))
        logger.info("loaded %s (%s, %d layers, %s) in %.1f s: max_model_len %d, %d KV blocks "
                    "of %d tokens", engine.loaded.source.name, engine.model_config.architecture,
                    engine.model_config.num_layers, engine.loaded.dtype.__name__,
                    time.perf_counter() - start, engine.max_model_len, engine.num_blocks,
                    args.block_size)
        async_engine = AsyncLLMEngine(engine, log_stats=not args.disable_log_stats,
                                      log_stats_interval=args.log_stats_interval)
        app = build_app(async_engine, served_model_names=args.served_model_name,
                        api_key=api_keys, max_request_body_bytes=args.max_request_body_bytes,
                        allowed_origins=args.allowed_origins, shutdown_engine=True)
        names = args.served_model_name or [engine.loaded.source.name]
        logger.info("serving %s at http://%s:%d/v1%s (Ctrl-C to stop)", ", ".join(names),
                    args.host, args.port, " with an API key" if api_keys else "")
        run_server(app, args.host, args.port, sock=sock, log_level=args.uvicorn_log_level,
                   timeout_graceful_shutdown=args.shutdown_timeout)
    finally:
        sock.close()
        if multi_process:
            distributed.stop_workers()
    logger.info("stopped")
    return 0


def run_worker_process(args) -> int:
    """A process other than 0 of a multi-process server: load its shards, then run the
    steps process 0 schedules until process 0 stops."""
    import jax

    from jaxvllm import distributed
    from jaxvllm.config import EngineConfig
    from jaxvllm.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig.from_kwargs(**engine_kwargs(args)))
    logger.info("process %d of %d: serving steps for process 0", jax.process_index(),
                jax.process_count())
    steps = distributed.run_worker(engine)
    logger.info("process 0 stopped after %d steps", steps)
    return 0
