"""`jaxvllm generate`: load a model (the embedded default when none is named), generate for
the prompts given on the command line and print the texts."""

from __future__ import annotations

import argparse
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
               "  jaxvllm generate --demo")
    p.add_argument("prompts", nargs="*", metavar="PROMPT")
    p.add_argument("--model", default=None, help="HF folder, Hub id, .gguf file or converted "
                   "checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
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
    from jaxvllm.cache import enable_compilation_cache
    from jaxvllm.models.loader import load_model
    from jaxvllm.simple_generate import SimpleGenerator
    from jaxvllm.tokenizer import load_tokenizer

    enable_compilation_cache()
    lm = load_model(args.model, dtype=args.dtype)
    tok = load_tokenizer(lm.source, args.tokenizer)
    print(f"loaded {lm.source.name} ({lm.config.architecture}, {lm.config.num_layers} layers, "
          f"{lm.dtype.__name__ if hasattr(lm.dtype, '__name__') else lm.dtype}) in {lm.load_seconds:.1f} s")
    gen = SimpleGenerator(lm.model)
    stop = tuple(lm.config.eos_token_ids) + ((tok.eos_token_id,) if tok.eos_token_id is not None else ())

    def run_batch(title, prompts, chat, **sampling):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) if chat else p for p in prompts]
        ids = [tok.encode(t, add_special_tokens=not chat) for t in texts]
        start = time.perf_counter()
        outs = gen.generate(ids, args.max_tokens, stop_token_ids=stop, **sampling)
        seconds = time.perf_counter() - start
        print(f"\n== {title} ({sum(map(len, outs))} tokens in {seconds:.1f} s)")
        for prompt, out in zip(prompts, outs):
            text = tok.decode(out, skip_special_tokens=True)
            print(f"{prompt!r} -> {text!r}")

    sampled = dict(temperature=args.temperature or 0.8, top_p=args.top_p if args.top_p < 1 else 0.95,
                   top_k=args.top_k, seed=args.seed)
    if args.demo:
        prompts = args.prompts or DEMO_PROMPTS
        run_batch("greedy", prompts, args.chat)
        run_batch(f"sampled (temperature={sampled['temperature']}, top_p={sampled['top_p']}, "
                  f"seed={args.seed})", prompts, args.chat, **sampled)
        run_batch("chat (greedy)", ["What is the capital of France?"], True)
    elif args.temperature == 0:
        run_batch("greedy", args.prompts, args.chat)
    else:
        run_batch("sampled", args.prompts, args.chat, temperature=args.temperature,
                  top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    return 0
