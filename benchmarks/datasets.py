"""Benchmark workloads: lists of `SampleRequest` (prompt token ids, and the number of output
tokens to ask for), the same for every engine that runs them.

- `random`: token ids drawn uniformly from the vocabulary; input and output lengths uniform
  in `[len * (1 - range_ratio), len * (1 + range_ratio)]`, as vLLM's random dataset.
- `nano-vllm`: nano-vllm's benchmark, 256 sequences with input and output lengths uniform in
  [100, 1024] and token ids in [0, 10000); `--num-prompts`, `--min-len` and `--max-len` scale
  it down for a small machine.
- `sharegpt`: a ShareGPT-format JSON file (a list of `{"conversations": [{"from", "value"},
  ...]}`); the first turn is the prompt and the second's token count the output length, as in
  vLLM (needs the model's tokenizer). Nothing is downloaded: pass the file you have.

Prompts are token ids, so that models without a tokenizer benchmark too and every engine sees
exactly the same tokens; a text prompt is kept beside them where the dataset has one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

DATASETS = ("random", "nano-vllm", "sharegpt")
NANO_VLLM_NUM_SEQS = 256
NANO_VLLM_MIN_LEN = 100
NANO_VLLM_MAX_LEN = 1024
NANO_VLLM_MAX_TOKEN_ID = 10000


@dataclasses.dataclass
class SampleRequest:
    prompt_token_ids: list[int]
    expected_output_len: int
    prompt: Optional[str] = None  # the text, where the dataset has one

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def engine_prompt(self) -> dict:
        """The prompt as `LLM.generate` takes it (token ids; the text only for display)."""
        out = {"prompt_token_ids": list(self.prompt_token_ids)}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return out


def uniform_lengths(rng: np.random.Generator, n: int, low: int, high: int) -> np.ndarray:
    """n integers uniform in [low, high] (both included)."""
    if low < 1 or high < low:
        raise ValueError(f"length range [{low}, {high}] is empty or below 1")
    return rng.integers(low, high + 1, size=n)


def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                    vocab_size: int, seed: int = 0, prefix_len: int = 0) -> list[SampleRequest]:
    """vLLM's random dataset: lengths uniform in [len * (1 - r), len * (1 + r)]; `prefix_len`
    tokens shared by every prompt come first (not counted in the spread)."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input and output lengths must be >= 1, got {input_len}, {output_len}")
    rng = np.random.default_rng(seed)
    in_lens = uniform_lengths(rng, num_prompts, max(1, int(input_len * (1 - range_ratio))),
                              int(input_len * (1 + range_ratio)))
    out_lens = uniform_lengths(rng, num_prompts, max(1, int(output_len * (1 - range_ratio))),
                               int(output_len * (1 + range_ratio)))
    prefix = rng.integers(0, vocab_size, size=prefix_len).tolist()
    return [SampleRequest(prefix + rng.integers(0, vocab_size, size=int(n)).tolist(), int(m))
            for n, m in zip(in_lens, out_lens)]


def nano_vllm_requests(vocab_size: int, num_prompts: int = NANO_VLLM_NUM_SEQS,
                       min_len: int = NANO_VLLM_MIN_LEN, max_len: int = NANO_VLLM_MAX_LEN,
                       seed: int = 0) -> list[SampleRequest]:
    """nano-vllm's bench.py workload: input and output lengths uniform in [min_len, max_len],
    token ids uniform in [0, min(10000, vocab_size))."""
    rng = np.random.default_rng(seed)
    in_lens = uniform_lengths(rng, num_prompts, min_len, max_len)
    out_lens = uniform_lengths(rng, num_prompts, min_len, max_len)
    top = min(NANO_VLLM_MAX_TOKEN_ID, vocab_size)
    return [SampleRequest(rng.integers(0, top, size=int(n)).tolist(), int(m))
            for n, m in zip(in_lens, out_lens)]


def sharegpt_requests(path: str | Path, num_prompts: int, tokenizer, seed: int = 0,
                      output_len: Optional[int] = None, max_prompt_len: int = 1024,
                      max_total_len: int = 2048) -> list[SampleRequest]:
    """Conversations with at least two turns, shuffled; prompt = first turn, output length =
    the second turn's token count (or `output_len`). As vLLM, pairs with fewer than 4 prompt
    or output tokens, prompts over `max_prompt_len` and pairs over `max_total_len` are
    skipped."""
    if tokenizer is None:
        raise ValueError("the sharegpt dataset needs a tokenizer; this model has none "
                         "(use --dataset random or nano-vllm)")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    convs = [d.get("conversations", d.get("conversation")) for d in data if isinstance(d, dict)]
    convs = [c for c in convs if isinstance(c, list) and len(c) >= 2]
    random.Random(seed).shuffle(convs)
    out: list[SampleRequest] = []
    for conv in convs:
        if len(out) == num_prompts:
            break
        prompt, completion = conv[0].get("value", ""), conv[1].get("value", "")
        ids = list(tokenizer.encode(prompt))
        n_out = output_len if output_len is not None else len(tokenizer.encode(completion))
        if len(ids) < 4 or n_out < 4:
            continue
        if len(ids) > max_prompt_len or len(ids) + n_out > max_total_len:
            continue
        out.append(SampleRequest(ids, int(n_out), prompt))
    if len(out) < num_prompts:
        raise ValueError(f"{path}: only {len(out)} usable conversations for {num_prompts} prompts")
    return out


# -- command-line glue shared by the benchmarks ----------------------------------------------

def add_dataset_args(parser: argparse.ArgumentParser, *, num_prompts: int = 1000,
                     input_len: int = 1024, output_len: int = 128) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--dataset", "--dataset-name", dest="dataset", choices=DATASETS,
                   default="random", help="which workload (default: random)")
    g.add_argument("--dataset-path", default=None, help="the ShareGPT JSON file (sharegpt)")
    g.add_argument("--num-prompts", type=int, default=None,
                   help=f"number of requests (default: {num_prompts}; nano-vllm: "
                        f"{NANO_VLLM_NUM_SEQS})")
    g.add_argument("--input-len", "--random-input-len", dest="input_len", type=int,
                   default=input_len, help="random: mean input length")
    g.add_argument("--output-len", "--random-output-len", dest="output_len", type=int,
                   default=None, help=f"random: mean output length (default {output_len}); "
                                      "sharegpt: a fixed output length instead of the dataset's")
    g.add_argument("--range-ratio", "--random-range-ratio", dest="range_ratio", type=float,
                   default=0.0, help="random: lengths uniform in [len*(1-r), len*(1+r)]")
    g.add_argument("--prefix-len", "--random-prefix-len", dest="prefix_len", type=int, default=0,
                   help="random: tokens shared by every prompt, before the random part")
    g.add_argument("--min-len", type=int, default=NANO_VLLM_MIN_LEN,
                   help="nano-vllm: shortest input/output length")
    g.add_argument("--max-len", type=int, default=NANO_VLLM_MAX_LEN,
                   help="nano-vllm: longest input/output length")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the requested output lengths (default: on)")
    parser.set_defaults(_default_num_prompts=num_prompts, _default_output_len=output_len)


def requests_from_args(args, vocab_size: int, tokenizer=None, seed: int = 0) -> list[SampleRequest]:
    num = args.num_prompts
    if args.dataset == "random":
        return random_requests(num or args._default_num_prompts, args.input_len,
                               args.output_len or args._default_output_len, args.range_ratio,
                               vocab_size, seed=seed, prefix_len=args.prefix_len)
    if args.dataset == "nano-vllm":
        return nano_vllm_requests(vocab_size, num or NANO_VLLM_NUM_SEQS, args.min_len,
                                  args.max_len, seed=seed)
    if not args.dataset_path:
        raise ValueError("--dataset sharegpt needs --dataset-path FILE.json")
    return sharegpt_requests(args.dataset_path, num or args._default_num_prompts, tokenizer,
                             seed=seed, output_len=args.output_len)


def describe(args, requests: Sequence[SampleRequest]) -> dict:
    """The workload as it goes into the JSON line: its name, parameters and length ranges."""
    ins = [r.prompt_len for r in requests]
    outs = [r.expected_output_len for r in requests]
    w = {"dataset": args.dataset, "num_prompts": len(requests),
         "input_len_min": min(ins), "input_len_max": max(ins),
         "input_len_mean": round(float(np.mean(ins)), 1),
         "output_len_min": min(outs), "output_len_max": max(outs),
         "output_len_mean": round(float(np.mean(outs)), 1), "ignore_eos": args.ignore_eos}
    if args.dataset == "random":
        w.update(input_len=args.input_len, output_len=args.output_len or args._default_output_len,
                 range_ratio=args.range_ratio, prefix_len=args.prefix_len)
    elif args.dataset == "nano-vllm":
        w.update(min_len=args.min_len, max_len=args.max_len)
    else:
        w.update(dataset_path=str(args.dataset_path))
    return w
