"""Tensor-parallel scenarios, run as a script in a fresh process by tests/test_tensor_parallel.py.

The pytest process has already initialized JAX with one CPU device; these need several, so
each run sets `XLA_FLAGS=--xla_force_host_platform_device_count=N` before importing jax
(the caller passes it in the environment) and prints one JSON object as its last line.

    python tests/tp_scenarios.py engines SPEC_JSON       # TP sizes side by side, one process
    python tests/tp_scenarios.py distributed SPEC_JSON   # one process of a jax.distributed run
"""

from __future__ import annotations

import json
import os
import re
import sys

GREEDY = dict(temperature=0.0, max_tokens=12)
SEEDED = dict(temperature=0.9, top_p=0.95, top_k=40, max_tokens=12)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _engine_kwargs(model: str, tp: int, backend: str = "reference", **overrides) -> dict:
    return dict(model=model, tensor_parallel_size=tp, attention_backend=backend,
                max_model_len=64, block_size=4, num_gpu_blocks_override=48, max_num_seqs=4,
                seed=0) | overrides


def _generate(llm, prompts, sampling) -> list[list[int]]:
    from jaxvllm import SamplingParams

    params = [SamplingParams(**sampling, seed=None if sampling["temperature"] == 0 else 100 + i)
              for i in range(len(prompts))]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _collectives(llm) -> dict:
    """Per collective kind, the result shapes in the HLO of the last compiled step."""
    runner = llm.llm_engine.runner
    text = list(runner._programs.values())[-1].as_text()
    found = {name: [] for name in COLLECTIVES}
    for line in text.splitlines():
        m = re.search(r"= (\w+)\[([\d,]*)\]\S* (" + "|".join(COLLECTIVES) + r")(?:-start)?\(",
                      line)
        if m:
            dims = [int(d) for d in m.group(2).split(",") if d]
            found[m.group(3)].append(dims)
    return found


def _shapes(llm) -> dict:
    import jax

    runner = llm.llm_engine.runner
    params = [list(a.shape) for a in jax.tree.leaves(runner.state)]
    kv = list(runner.kv.k.shape)
    return {"params": params, "kv": kv}


def run_engines(spec: dict) -> dict:
    import jax

    from jaxvllm import LLM

    out = {"devices": len(jax.devices()), "models": {}, "errors": {}}
    for name, model in spec["models"].items():
        rec = out["models"][name] = {"greedy": {}, "seeded": {}, "hlo": {}, "stats": {},
                                     "shapes": {}}
        for tp in spec["tp_sizes"]:
            llm = LLM(**_engine_kwargs(model, tp))
            rec["greedy"][str(tp)] = _generate(llm, spec["prompts"], GREEDY)
            rec["seeded"][str(tp)] = _generate(llm, spec["prompts"], SEEDED)
            rec["stats"][str(tp)] = llm.llm_engine.stats()
            rec["shapes"][str(tp)] = _shapes(llm)
            if tp > 1:
                rec["hlo"][str(tp)] = _collectives(llm)
            del llm
    for label, (model, tp, backend) in spec.get("extra", {}).items():
        llm = LLM(**_engine_kwargs(model, tp, backend))
        out["models"][label] = {"greedy": _generate(llm, spec["prompts"], GREEDY),
                                "hlo": _collectives(llm), "shapes": _shapes(llm)}
        del llm
    for label, (model, tp) in spec.get("errors", {}).items():
        try:
            LLM(**_engine_kwargs(model, tp))
            out["errors"][label] = None
        except ValueError as e:
            out["errors"][label] = str(e)
    return out


def run_distributed(spec: dict) -> dict:
    from jaxvllm import distributed

    distributed.initialize(spec["coordinator"], spec["num_processes"], spec["process_id"])
    distributed._POLL_MS = spec.get("poll_ms", distributed._POLL_MS)
    import time

    import jax

    from jaxvllm import LLM

    result = {"process": jax.process_index(), "processes": jax.process_count(),
              "devices": jax.device_count(), "local_devices": jax.local_device_count()}
    try:
        llm = LLM(**_engine_kwargs(spec["model"], spec.get("tp", jax.device_count()),
                                   **spec.get("overrides", {})))
    except ValueError as e:
        return result | {"error": str(e)}
    if distributed.is_driver():
        time.sleep(spec.get("idle_s", 0))  # the workers' waits time out and re-arm meanwhile
        result["greedy"] = _generate(llm, spec["prompts"], GREEDY)
        result["stats"] = llm.llm_engine.stats()
        distributed.stop_workers()
    else:
        result["steps"] = distributed.run_worker(llm)
    return result


def main() -> None:
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    os.environ.setdefault("JAXVLLM_COMPILATION_CACHE", "0")
    result = {"engines": run_engines, "distributed": run_distributed}[mode](spec)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
