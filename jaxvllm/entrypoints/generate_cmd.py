"""`jaxvllm generate`: load a model (the embedded default when none is named), generate for
the prompts given on the command line and print the texts (as they come with --stream)."""

from __future__ import annotations

import argparse
import sys
import time

DEMO_PROMPTS = ["The capital of France is", "The three primary colors are",
                "def fibonacci(n):"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text for prompts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate continuations of PROMPTs (greedy unless --temperature > 0).",
        epilog="examples:\n  jaxvllm generate 'The capital of France is'\n"
               "  jaxvllm generate --model ./Qwen2.5-0.5B-Instruct --chat 'Tell me a joke'\n"
               "  jaxvllm generate --stream --max-tokens 200 --temperature 0.8 'Once upon a time'\n"
               "  jaxvllm generate --stop '.' --repetition-penalty 1.2 'The three colors are'\n"
               "  jaxvllm generate --demo")
    p.add_argument("prompts", nargs="*", metavar="PROMPT")
    p.add_argument("--model", default=None, help="HF folder, Hub id, .gguf file or converted "
                   "checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--stream", action="store_true",
                   help="print the tokens as they are generated, one prompt after another")
    from jaxvllm.entrypoints.chat_cmd import add_sampling_args

    add_sampling_args(p, max_tokens=32, temperature=0.0)
    p.add_argument("--demo", action="store_true",
                   help="run the demo: example prompts, greedy then sampled, and a chat turn")
    p.set_defaults(func=run)


def _validate(args) -> None:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be non-negative, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be 0 (off) or positive, got {args.top_k}")


def run(args) -> int:
    _validate(args)
    if not args.prompts and not args.demo:
        raise ValueError("give at least one PROMPT (or --demo)")
    from jaxvllm.entrypoints.chat_cmd import sampling_params

    flags_params = sampling_params(args)  # check every sampling flag before loading
    from jaxvllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype, seed=args.seed,
              max_model_len=args.max_model_len)
    engine = llm.llm_engine
    print(f"loaded {engine.loaded.source.name} ({engine.model_config.architecture}, "
          f"{engine.model_config.num_layers} layers, {engine.loaded.dtype.__name__}) "
          f"in {time.perf_counter() - start:.1f} s")

    def run_batch(title, prompts, chat, **sampling):
        params = SamplingParams(max_tokens=args.max_tokens, **sampling)
        start = time.perf_counter()
        if chat:
            outs = [llm.chat([{"role": "user", "content": p}], params, use_tqdm=False)[0]
                    for p in prompts]
        else:
            outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(f"\n== {title} ({tokens} tokens in {seconds:.1f} s)")
        for prompt, out in zip(prompts, outs):
            print(f"{prompt!r} -> {out.outputs[0].text!r}")

    sampled = dict(temperature=args.temperature or 0.8, top_p=args.top_p if args.top_p < 1 else 0.95,
                   top_k=args.top_k, seed=args.seed)
    if args.demo:
        prompts = args.prompts or DEMO_PROMPTS
        run_batch("greedy", prompts, args.chat, temperature=0)
        run_batch(f"sampled (temperature={sampled['temperature']}, top_p={sampled['top_p']}, "
                  f"seed={args.seed})", prompts, args.chat, **sampled)
        run_batch("chat (greedy)", ["What is the capital of France?"], True, temperature=0)
    elif args.stream:
        _stream(llm, args.prompts, args.chat, flags_params)
    else:
        title = "greedy" if args.temperature == 0 else "sampled"
        run_batch(title, args.prompts, args.chat, **_changed_fields(flags_params, args))
    print(f"\ncompiled programs: {engine.runner.num_compiled}, "
          f"compile time: {engine.runner.compile_seconds:.1f} s")
    return 0


def _changed_fields(params, args) -> dict:
    """The flags as SamplingParams keyword arguments (run_batch adds max_tokens)."""
    from jaxvllm import SamplingParams

    default = SamplingParams(max_tokens=args.max_tokens)
    names = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "min_tokens", "stop", "stop_token_ids", "ignore_eos", "seed")
    return {k: getattr(params, k) for k in names if getattr(params, k) != getattr(default, k)}


def _stream(llm, prompts, chat: bool, params) -> None:
    """Each prompt alone, its continuation printed token by token."""
    from jaxvllm.entrypoints.chat_cmd import stream_text

    engine = llm.llm_engine
    for i, prompt in enumerate(prompts):
        request = prompt
        if chat:
            ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                       tokenize=True, add_generation_prompt=True)
            request = {"prompt_token_ids": list(ids["input_ids"] if hasattr(ids, "keys") else ids)}
        print(f"\n== {prompt!r} ->", flush=True)
        for delta in stream_text(engine, request, params.clone(), request_id=f"stream-{i}"):
            sys.stdout.write(delta)
            sys.stdout.flush()
        print(flush=True)
