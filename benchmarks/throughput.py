"""Offline throughput: `LLM.generate` over a whole workload, as `vllm bench throughput`.

    python benchmarks/throughput.py --dataset random --num-prompts 64 --input-len 128 \\
        --output-len 128 --range-ratio 0.75 --compare-hf
    python benchmarks/throughput.py --dataset nano-vllm                  # 256 x [100, 1024]
    python benchmarks/throughput.py --dataset nano-vllm --num-prompts 64 --min-len 32 --max-len 256
    python benchmarks/throughput.py --dataset sharegpt --dataset-path ShareGPT_V3.json
    jaxvllm bench throughput ...                                          # the same

Reports requests/s, total tokens/s and output tokens/s over the wall time of `generate`
(compilation of new step buckets included, and also reported apart), the time from `LLM(...)`
to the first generated token, the engine's counters (compiled programs, compile time, KV
blocks, preemptions), KV utilization sampled after every step, and padding waste where the
runner counts it. `--compare-hf` runs Hugging Face transformers `generate` on the same model,
prompts and output lengths first, in the same process (static left-padded batches, as large
as fit, useful tokens only), and prints the ratios. The last line is one JSON object.
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
import time

from benchmarks import common
from benchmarks.datasets import add_dataset_args, describe, requests_from_args


def build_parser() -> argparse.ArgumentParser:
    p = common.parser_from_doc("jaxvllm bench throughput", __doc__)
    common.add_engine_args(p)
    add_dataset_args(p, num_prompts=1000, input_len=1024, output_len=128)
    g = p.add_argument_group("run")
    g.add_argument("--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (vLLM's benchmark uses 1.0; 0 = greedy)")
    g.add_argument("--compare-hf", action="store_true",
                   help="also run HF transformers generate on the same workload, and the ratios")
    g.add_argument("--hf-batch-size", type=int, default=None,
                   help="HF static batch size (default: the largest that fits, all at once)")
    g.add_argument("--plot", default=None, metavar="OUT.png", help="draw the figures here")
    g.add_argument("--output-json", default=None, help="also write the JSON object to this file")
    g.add_argument("--disable-tqdm", action="store_true")
    return p


def run(args) -> dict:
    from jaxvllm import SamplingParams

    if args.compare_hf and args.n != 1:
        raise ValueError("--compare-hf compares one completion per prompt; use --n 1")
    info = common.workload_model_info(args.model, args.tokenizer,
                                      need_tokenizer=args.dataset == "sharegpt")
    requests = requests_from_args(args, info["vocab_size"], info["tokenizer"], seed=args.seed)
    common.check_fits(requests, args.max_model_len or info["max_position_embeddings"] or 1 << 30)
    workload = describe(args, requests)

    hf = None
    if args.compare_hf:  # first, so that on a GPU torch is done before JAX claims the memory
        print(f"HF transformers generate: {len(requests)} requests ...", file=sys.stderr)
        hf = common.hf_generate(args.model, [r.prompt_token_ids for r in requests],
                                [r.expected_output_len for r in requests], dtype=args.dtype,
                                batch_size=args.hf_batch_size, temperature=args.temperature,
                                log=lambda m: print(m, file=sys.stderr))

    cache = common.compilation_cache_state()
    origin = time.perf_counter()
    llm = common.build_llm(args)
    load_s = time.perf_counter() - origin
    engine = llm.llm_engine
    common.check_fits(requests, engine.max_model_len)
    params = [SamplingParams(n=args.n, temperature=args.temperature, top_p=1.0,
                             ignore_eos=args.ignore_eos, max_tokens=r.expected_output_len)
              for r in requests]
    before = engine.stats()
    with common.StepProbe(engine, origin) as probe:
        start = time.perf_counter()
        outputs = llm.generate([r.engine_prompt() for r in requests], params,
                               use_tqdm=not args.disable_tqdm)
        elapsed = time.perf_counter() - start

    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_lens = [sum(len(c.token_ids) for c in o.outputs) for o in outputs]
    output_tokens = sum(output_lens)
    stats = common.engine_stats(llm, before)
    steps = probe.summary()
    busy = elapsed - stats["compile_seconds_in_run"]
    r = common._r
    result = {"benchmark": "throughput", **common.describe_model(llm), "workload": workload,
              "elapsed_time": r(elapsed), "num_requests": len(outputs),
              "total_prompt_tokens": prompt_tokens, "total_output_tokens": output_tokens,
              "total_num_tokens": prompt_tokens + output_tokens,
              "requests_per_second": r(len(outputs) / elapsed, 4),
              "tokens_per_second": r((prompt_tokens + output_tokens) / elapsed, 2),
              "output_tokens_per_second": r(output_tokens / elapsed, 2),
              "output_tokens_per_second_excl_compile":
                  r(output_tokens / busy, 2) if busy > 0 else None,
              "load_s": r(load_s), "first_token_s": r(probe.first_token_s),
              **cache, "engine": stats, "steps": steps}
    if hf is not None:
        result["hf"] = hf
        result["ratio_output_tokens_per_second_vs_hf"] = common.ratio(
            result["output_tokens_per_second"], hf["output_tokens_per_s"])
        result["ratio_excl_compile_vs_hf"] = common.ratio(
            result["output_tokens_per_second_excl_compile"], hf["output_tokens_per_s"])
        if output_lens != [q.expected_output_len for q in requests]:
            result["hf_note"] = ("jaxvllm stopped some requests early (no --ignore-eos); HF "
                                 "generated the requested lengths")
    report(result)
    if args.plot:
        result["plot"] = plot(args.plot, result, probe, origin)
    if args.output_json:
        import json

        Path(args.output_json).write_text(json.dumps(result, indent=2, default=str))
    common.emit_json(result)
    return result


def report(res: dict) -> None:
    w, e, s = res["workload"], res["engine"], res["steps"]
    rows = [("Model", res["model"]), ("Device", res["device"]), ("Dtype", res["dtype"]),
            ("Workload", f"{w['dataset']}: {w['num_prompts']} requests, in "
                         f"{w['input_len_min']}-{w['input_len_max']}, out "
                         f"{w['output_len_min']}-{w['output_len_max']}"),
            ("-- jaxvllm LLM.generate --", None),
            ("Elapsed (s)", res["elapsed_time"]),
            ("Requests/s", res["requests_per_second"]),
            ("Total tokens/s", res["tokens_per_second"]),
            ("Output tokens/s", res["output_tokens_per_second"]),
            ("Output tokens/s without compile time", res["output_tokens_per_second_excl_compile"]),
            ("Prompt / output tokens", f"{res['total_prompt_tokens']:,} / "
                                       f"{res['total_output_tokens']:,}"),
            ("-- engine --", None),
            ("LLM(...) construction (s)", res["load_s"]),
            ("LLM(...) to first token (s)", res["first_token_s"]),
            ("Compilation cache entries before", res["compilation_cache_entries"]),
            ("Compiled programs (in this run)", f"{e['num_compiled_programs']} "
                                                f"({e['compiled_in_run']})"),
            ("Compile seconds (in this run)", f"{e['compile_seconds']:.2f} "
                                              f"({e['compile_seconds_in_run']:.2f})"),
            ("Background compile seconds (in this run)",
             f"{e.get('background_compile_seconds', 0.0):.2f} "
             f"({e.get('background_compile_seconds_in_run', 0.0):.2f})"),
            ("KV blocks / preemptions", f"{e['num_blocks']:,} / {e['num_preemptions']}"),
            ("Steps / mean step (ms)", f"{s.get('num_steps', 0)} / {s.get('step_ms_mean')}"),
            ("Steps scheduled ahead of the one in flight", e.get("steps_scheduled_ahead")),
            ("KV utilization (stored / allocated slots)", s.get("kv_utilization")),
            ("KV blocks in use, peak", s.get("kv_cache_usage_peak")),
            ("Padding waste (padded / real tokens)", s.get("padding_waste")),
            ("Runner host / device ms per step", _host_device(s))]
    hf = res.get("hf")
    if hf:
        rows += [("-- HF transformers generate --", None),
                 ("Batch size x batches", f"{hf['batch_size']} x {hf['num_batches']}"),
                 ("Elapsed (s)", hf["elapsed_s"]),
                 ("Output tokens/s (useful)", hf["output_tokens_per_s"]),
                 ("Total tokens/s", hf["total_tokens_per_s"]),
                 ("-- ratio jaxvllm / HF --", None),
                 ("Output tokens/s", res["ratio_output_tokens_per_second_vs_hf"]),
                 ("Output tokens/s without compile time", res["ratio_excl_compile_vs_hf"])]
    common.print_table("Throughput", rows)


def _host_device(steps: dict):
    if steps.get("host_ms_per_step") is None:
        return None
    return f"{steps['host_ms_per_step']:.2f} / {steps['device_ms_per_step']:.2f}"


def plot(path: str, res: dict, probe, origin: float) -> str:
    labels, values = ["jaxvllm"], [res["output_tokens_per_second"]]
    if res.get("hf"):
        labels.append("HF generate")
        values.append(res["hf"]["output_tokens_per_s"])

    def bars(ax):
        common.plot_bars(ax, labels, values, "output tokens/s")

    w = res["workload"]
    return common.save_plot(path, [("output tokens/s", bars)] + common.step_panels(probe, origin),
                            f"throughput: {res['model']} on {res['device']} ({res['dtype']}), "
                            f"{w['dataset']} x {w['num_prompts']}")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    return common.run_or_exit("throughput", run, args)


if __name__ == "__main__":
    main()
    sys.exit(0)
