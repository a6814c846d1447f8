"""The `jaxvllm` command line: one sub-command per entry point.

    jaxvllm serve [MODEL]                    the OpenAI-compatible server
    jaxvllm generate [--model M] PROMPT...   generate text (greedy by default; --stream)
    jaxvllm chat [--model M]                 chat in the terminal
    jaxvllm convert SRC OUT                  HF folder / Hub id / GGUF -> orbax checkpoint
    jaxvllm --version

Building the parser imports argparse only: each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys

import jaxvllm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxvllm", description="jaxvllm: LLM inference in JAX with paged attention.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  jaxvllm serve Qwen/Qwen2.5-1.5B-Instruct --max-model-len 8k\n"
               "  jaxvllm generate 'The capital of France is'\n"
               "  jaxvllm generate --stream --temperature 0.8 'Once upon a time'\n"
               "  jaxvllm chat --model ./Qwen2.5-0.5B-Instruct\n"
               "  jaxvllm convert Qwen/Qwen2.5-0.5B-Instruct ./qwen-jax --dtype bfloat16\n"
               "  jaxvllm bench throughput --dataset random --num-prompts 64 --compare-hf\n\n"
               "'jaxvllm COMMAND --help' describes each command.")
    parser.add_argument("--version", action="version", version=f"jaxvllm {jaxvllm.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from convert import cli as convert_cli
    from jaxvllm.entrypoints import bench_cmd, chat_cmd, generate_cmd, serve_cmd

    serve_cmd.add_parser(sub)
    generate_cmd.add_parser(sub)
    chat_cmd.add_parser(sub)
    convert_cli.add_parser(sub)
    bench_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:
        print(f"jaxvllm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"jaxvllm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
