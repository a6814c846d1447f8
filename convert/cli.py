"""`jaxvllm convert SRC OUT`: write a model as a jaxvllm (orbax) checkpoint folder."""

from __future__ import annotations

import argparse
import time

DESCRIPTION = """\
Convert a model to a jaxvllm checkpoint: the weights already mapped to jaxvllm's layout and
saved with orbax, plus config.json and the tokenizer files. Loading the folder afterwards
(`--model OUT`, `load_model(OUT)`) skips the GGUF dequantization and weight-name mapping.

SRC is a Hugging Face model folder (config.json + *.safetensors), a Hub id already in the
local Hugging Face cache, a .gguf file, or "" for the embedded default model."""

EPILOG = """\
examples:
  jaxvllm convert ./SmolLM2-135M-Instruct ./smollm2-jax
  jaxvllm convert Qwen/Qwen2.5-0.5B-Instruct ./qwen-jax --dtype bfloat16
  jaxvllm convert ./model.Q4_K_M.gguf ./model-jax          (dequantized, stored as float32)
  jaxvllm convert "" ./default-jax --force                 (the embedded default model)
  jaxvllm generate --model ./qwen-jax 'The capital of France is'"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert", help="convert a HF folder / Hub id / GGUF file to a jaxvllm orbax checkpoint",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC",
                        help="HF model folder, Hub id in the HF cache, .gguf file, or '' for the "
                             "embedded default model")
    parser.add_argument("out", metavar="OUT", help="output folder (created; must be empty "
                                                   "unless --force)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype the weights are stored in (default: auto = the source's own: "
                             "float32 for GGUF and float32 safetensors, bfloat16/float16 when the "
                             "safetensors are all bfloat16/float16)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty OUT, replacing an earlier conversion there")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="do not show the progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from convert.checkpoint import read_marker, save_converted

    start = time.perf_counter()
    out = save_converted(args.src or None, args.out, dtype=args.dtype, progress=args.progress,
                         force=args.force)
    seconds = time.perf_counter() - start
    marker = read_marker(out)
    print(f"converted {marker['source']} -> {out}: {marker['architecture']}, "
          f"{_count(marker['num_params'])} params, stored {marker['dtype']}, {seconds:.1f} s")
    return 0


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
