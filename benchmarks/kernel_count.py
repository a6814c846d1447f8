"""Kernels per decode step on a GPU, counted without one: the engine's step programs compiled
by XLA's GPU compiler for an H100 (deviceless, `pallas_kernels.gpu_lowering.compile_for_gpu`)
and their optimized HLO read for the kernels each launches.

    pip install "jax[cuda12]"                    # XLA's GPU compiler; no GPU needed
    python benchmarks/random_model.py qwen2.5-0.5b /tmp/qwen-0.5b --dtype bfloat16
    JAX_PLATFORMS=cpu python benchmarks/kernel_count.py --model /tmp/qwen-0.5b --rows 1,256
    python benchmarks/kernel_count.py --hlo program.txt      # count a saved HLO text
    jaxvllm bench kernel_count ...                           # the same

At batch 1 a decode step is a few hundred small kernels whose launch and latency, not their
memory traffic, make up most of its time (benchmarks/README.md), so their number is what to
bring down there. The program counted is the multi-step decode call (a loop whose body is
one decode step, what the engine runs for decoding batches on a GPU) padded to each of
`--rows` as the engine pads it, sampling as default `SamplingParams` do (`--greedy`: as
temperature 0); `--single` counts the single-step decode program instead. With
`--compare-unfused` the same programs are also compiled with the attention variant's fused
decode kernel off (KV write and attention as separate kernels), in the same run, and with
`--compare-small-batch-matmuls` with the model's small-batch projection kernels on
(`small_batch_matmuls`, pallas_kernels/small_batch_matmul.py), with
`--compare-sampling-kernels` with the sampler's kernels on (pallas_kernels/sampling.py; and
the small-batch ones, where both are asked for), and with `--compare-decode-layer` with each
layer one kernel (`decode_layer_kernel`, pallas_kernels/decode_layer.py; with the sampler's
kernels where those are compared too).

Without a GPU XLA does not autotune: its GEMM configurations (and the split-K reductions they
may bring) can differ from a real compile's; every other fusion is XLA's real decision. The
count is of kernels launched, not of their time: check the time on a GPU
(`step_profile.py`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import `benchmarks` from the repository root
    _here = Path(__file__).resolve().parent
    # benchmarks/ itself must not lead sys.path: its datasets.py would shadow HF `datasets`
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import collections
import contextlib
import re
import time

# the CUDA plugin checks for a driver when jax starts unless told not to (there is none here)
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

from benchmarks import common  # noqa: E402 - after the environment it reads

# Instructions that launch nothing: values, views and the "done" halves of async pairs.
NOT_LAUNCHED = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
                "partition-id", "replica-id", "opt-barrier", "add-dependency", "fusion-done",
                "copy-done", "async-done", "async-update"}
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^(?:ROOT )?%\S+ = .*? ([a-z][a-z0-9\-]*)\(")


def parse_computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """Optimized HLO text -> ({computation name: its instruction lines}, the entry's name)."""
    computations: dict[str, list[str]] = {}
    current, entry = None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None and " = " in line:
            computations[current].append(line.strip())
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _kind(line: str, op: str) -> str:
    """What a launching instruction is, for the table: a fusion by its kind and fused
    computation's name, a custom call by its target, else the op."""
    if op in ("fusion", "fusion-start"):
        kind = re.search(r"kind=(\w+)", line)
        calls = re.search(r"calls=%([\w\-]+)", line)
        name = re.sub(r"(\.\d+)+$", "", calls.group(1)) if calls else "?"
        return f"fusion {kind.group(1) if kind else '?'} {name}"
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', line)
        return f"custom-call {target.group(1) if target else '?'}"
    return op


def count_kernels(hlo_text: str) -> dict:
    """The kernels a compiled program launches: outside any loop (`entry`, by kind) and per
    iteration of each while loop (`loops`: body name, total and by kind), nested loops as
    their own entries. A conditional counts once, as the host launches it."""
    computations, entry = parse_computations(hlo_text)
    loops: list[dict] = []

    def walk(name: str) -> collections.Counter:
        kinds: collections.Counter = collections.Counter()
        for line in computations.get(name, []):
            match = _INSTRUCTION.match(line)
            if not match or match.group(1) in NOT_LAUNCHED:
                continue
            op = match.group(1)
            if op == "while":
                body = re.search(r"body=%([\w\-.]+)", line).group(1)
                body_kinds = walk(body)
                loops.append({"body": body, "kernels": sum(body_kinds.values()),
                              "by_kind": dict(body_kinds.most_common())})
                continue
            if op == "call":
                kinds.update(walk(re.search(r"to_apply=%([\w\-.]+)", line).group(1)))
                continue
            kinds[_kind(line, op)] += 1
        return kinds

    entry_kinds = walk(entry)
    return {"entry": sum(entry_kinds.values()), "entry_by_kind": dict(entry_kinds.most_common()),
            "loops": loops}


def _build_runner(args, max_rows: int, loaded=None, small_batch_matmuls: bool = False,
                  sampling_kernels: bool = False, decode_layer: bool = False):
    """The engine's runner for the model (`loaded`, else loaded from args.model) as a GPU
    engine builds it: layers unrolled (the default on one GPU), powers-of-two decode buckets
    from 16."""
    from jaxvllm.engine.runner import ModelRunner
    from jaxvllm.models.loader import load_model
    from pallas_kernels import decode_layer as decode_layer_module

    if loaded is None:
        loaded = load_model(args.model, dtype=args.dtype,
                            attention_backend=args.attention_backend)
        loaded.model.unroll_layers()
    # read when the runner splits the model (the engine sets it before, too)
    loaded.model.small_batch_matmuls = small_batch_matmuls
    loaded.model.sampling_kernel_rows = max(max_rows, args.max_num_seqs) if sampling_kernels \
        else 0
    loaded.model.decode_layer_rows = decode_layer_module.MAX_ROWS if decode_layer else 0
    runner = ModelRunner(loaded.model, num_blocks=args.num_blocks, block_size=args.block_size,
                         max_model_len=args.max_model_len,
                         max_num_batched_tokens=args.max_num_batched_tokens,
                         max_num_seqs=max(max_rows, args.max_num_seqs),
                         fine_decode_buckets=False)
    runner.num_scheduler_steps = args.num_scheduler_steps
    return loaded, runner


def _count_program(runner, vocab: int, rows: int, args) -> dict:
    from jaxvllm import xla_flags
    from jaxvllm.engine.sampler import PLAIN_RANDOM_PATHS, SamplerPaths
    from pallas_kernels.gpu_lowering import compile_for_gpu

    paths = SamplerPaths(False, False, False, False) if args.greedy else PLAIN_RANDOM_PATHS
    T = runner.multi_step_rows(rows) if not args.single else runner.token_bucket(rows)
    MB = runner.max_table_width
    if args.single:
        key, inputs = runner.dummy_step(vocab, T, T, MB, paths)
    else:
        key, inputs = runner.dummy_multi_step(vocab, T, MB, paths)
    step, inputs, _ = runner.step_function(key, inputs)
    start = time.perf_counter()
    text = compile_for_gpu(step, *inputs, target=args.target, donate_argnums=(1,),
                           compiler_options=xla_flags.step_compiler_options())
    counts = count_kernels(text)
    counts["compile_s"] = round(time.perf_counter() - start, 2)
    counts["padded_rows"] = T
    if args.single:
        counts["per_decode_step"] = counts["entry"]
    else:
        body = max(counts["loops"], key=lambda loop: loop["kernels"])
        counts["per_decode_step"] = body["kernels"]
    return counts


def run(args) -> dict:
    if args.hlo:
        counts = count_kernels(Path(args.hlo).read_text())
        rows = [("Kernels outside loops", counts["entry"])]
        rows += [(f"Kernels per iteration of {loop['body'][:30]}", loop["kernels"])
                 for loop in counts["loops"]]
        common.print_table("Kernel count", rows)
        return {"benchmark": "kernel_count", "hlo": args.hlo, **counts}
    if not args.model:
        raise ValueError("--model (a folder, e.g. from benchmarks/random_model.py) or --hlo")
    import jax

    from jaxvllm.models.attention import fused_decode_kernel, resolve_attention_backend
    from pallas_kernels.variants import overridden_variant

    rows = sorted({int(r) for r in args.rows.split(",")})
    if not rows or rows[0] < 1:
        raise ValueError(f"--rows {args.rows!r}: row counts >= 1, comma-separated")
    loaded, runner = _build_runner(args, max(rows))
    variant = resolve_attention_backend(args.attention_backend)[0]
    # the multi-step program's steps are decode-only: `attend` fuses them where it can
    fused = fused_decode_kernel(args.attention_backend) is not None and not args.single
    modes = [("fused" if fused else "default", contextlib.nullcontext, runner)]
    if args.compare_unfused and fused:
        modes.append(("unfused", lambda: overridden_variant(variant, decode=None), runner))
    if args.compare_small_batch_matmuls:
        modes.append(("small_batch_matmuls", contextlib.nullcontext,
                      _build_runner(args, max(rows), loaded, small_batch_matmuls=True)[1]))
    if args.compare_sampling_kernels:  # with the small-batch kernels too where compared
        sb = args.compare_small_batch_matmuls
        modes.append(("small_batch_matmuls+sampling_kernels" if sb else "sampling_kernels",
                      contextlib.nullcontext,
                      _build_runner(args, max(rows), loaded, small_batch_matmuls=sb,
                                    sampling_kernels=True)[1]))
    if args.compare_decode_layer:
        sampling = args.compare_sampling_kernels
        modes.append(("decode_layer+sampling_kernels" if sampling else "decode_layer",
                      contextlib.nullcontext,
                      _build_runner(args, max(rows), loaded, sampling_kernels=sampling,
                                    decode_layer=True)[1]))
    results: dict = {}
    for mode, context, mode_runner in modes:
        for r in rows:
            with context():
                results.setdefault(mode, {})[str(r)] = _count_program(
                    mode_runner, loaded.config.vocab_size, r, args)
    table = [("Model", Path(args.model).name), ("Target (deviceless)", args.target),
             ("Program", "single decode step" if args.single
              else f"multi-step decode call, {args.num_scheduler_steps} steps"),
             ("Attention variant", variant), ("Layers", loaded.config.num_layers)]
    for r in rows:
        table.append((f"-- {r} rows (padded to {results[modes[0][0]][str(r)]['padded_rows']})",
                      ""))
        for mode, *_ in modes:
            c = results[mode][str(r)]
            table.append((f"kernels per decode step, {mode}", c["per_decode_step"]))
            if not args.single:
                table.append((f"kernels per call outside the loop, {mode}", c["entry"]))
        for mode, *_ in modes[1:]:
            a, b = (results[m][str(r)]["per_decode_step"] for m in (modes[0][0], mode))
            table.append((f"{modes[0][0]} / {mode}", round(a / b, 3)))
    common.print_table("Kernels per step (XLA GPU compile, no GPU)", table, width=64)
    first = results[modes[0][0]][str(rows[-1])]
    top = (max(first["loops"], key=lambda loop: loop["kernels"])["by_kind"]
           if first["loops"] and not args.single else first["entry_by_kind"])
    print(f"By kind, {rows[-1]} rows ({modes[0][0]}), per decode step:")
    for kind, n in list(top.items())[:args.top]:
        print(f"  {n:5d}  {kind}")
    return {"benchmark": "kernel_count", "model": Path(args.model).name, "target": args.target,
            "jax": jax.__version__, "dtype": args.dtype, "attention_variant": variant,
            "num_layers": loaded.config.num_layers, "single": args.single,
            "num_scheduler_steps": args.num_scheduler_steps, "greedy": args.greedy,
            "per_mode": results}


def build_parser() -> argparse.ArgumentParser:
    from pallas_kernels.gpu_lowering import GPU_TARGETS

    p = common.parser_from_doc("kernel_count", __doc__)
    p.add_argument("--model", help="HF folder of the model (random weights do)")
    p.add_argument("--hlo", help="count the kernels of this optimized HLO text file instead")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention-backend", default="pallas")
    p.add_argument("--target", default="h100", choices=sorted(GPU_TARGETS))
    p.add_argument("--rows", default="1,256", help="decode rows, comma-separated")
    p.add_argument("--num-scheduler-steps", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="as the engine's (on a GPU 256): it bounds the rows' padding")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=256,
                   help="KV blocks of the compiled cache (its size changes no kernel)")
    p.add_argument("--single", action="store_true", help="the single-step decode program")
    p.add_argument("--greedy", action="store_true", help="sampling as temperature 0")
    p.add_argument("--compare-unfused", action="store_true",
                   help="also count with the variant's fused decode kernel off")
    p.add_argument("--compare-sampling-kernels", action="store_true",
                   help="also with the sampler's kernels (pallas_kernels/sampling.py), and the "
                        "small-batch ones where those are compared too")
    p.add_argument("--compare-decode-layer", action="store_true",
                   help="also with each layer one kernel (pallas_kernels/decode_layer.py)")
    p.add_argument("--compare-small-batch-matmuls", action="store_true",
                   help="also count with the small-batch projection kernels on")
    p.add_argument("--top", type=int, default=15, help="kinds listed")
    p.add_argument("--output-json")
    return p


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_scheduler_steps < 2 and not args.single:
        parser.error("--num-scheduler-steps must be >= 2 for the multi-step program")
    return common.main_with_json("kernel_count", parser, run, argv)


if __name__ == "__main__":
    main()
