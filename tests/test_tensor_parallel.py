"""Tensor parallelism and multi-process serving, on CPU.

This process's JAX already runs with one CPU device, so every scenario that needs several
runs `tests/tp_scenarios.py` in a fresh process with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` in its environment (set before that
process imports jax) and reads back one JSON object:

- one 4-device process runs TP 1, 2 and 4 side by side for a Llama-style (untied) and a
  Qwen2-style (tied, q/k/v biases) tiny model, both with 2 KV heads (so TP 4 replicates
  each KV head twice), plus the Pallas kernel per shard, a converted (orbax) checkpoint and
  the error cases;
- two 2-device processes joined by `jax.distributed` (coordinator on 127.0.0.1) run TP 4
  with one scheduler on process 0.

The rest (layout rules, divisibility errors, flag checks) runs here without devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pallas_kernels import native_cpu

SCRIPT = Path(__file__).with_name("tp_scenarios.py")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 17, 33, 2, 9], [100, 3, 7, 8, 200, 45, 67, 12, 13, 14, 15, 16, 90, 91, 92, 93,
                                94, 95, 96, 97], [1, 2]]
TP_SIZES = [1, 2, 4]
NATIVE_CPU = native_cpu.unavailable_reason() is None
needs_native_cpu = pytest.mark.skipif(not NATIVE_CPU, reason="the native CPU kernel is not built")
VOCAB = 256
HIDDEN = 64


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAXVLLM_COMPILATION_CACHE"] = "0"  # the HLO is read from freshly compiled programs
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in the output:\n{stdout[-3000:]}")


def _run(mode: str, spec: dict, devices: int, timeout: float = 240) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), mode, json.dumps(spec)],
                          env=_env(devices), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return _last_json(proc.stdout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(spec: dict, num_processes: int = 2, devices: int = 2,
                   timeout: float = 240) -> list[dict]:
    """One jax.distributed run: `num_processes` processes of `devices` CPU devices each."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, str(SCRIPT), "distributed",
         json.dumps(spec | {"coordinator": coordinator, "num_processes": num_processes,
                            "process_id": i})],
        env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(num_processes)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"process failed:\n{out[-2000:]}\n{err[-4000:]}"
            results.append(_last_json(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return sorted(results, key=lambda r: r["process"])


@pytest.fixture(scope="module")
def models(zoo) -> dict[str, str]:
    return {"llama": str(zoo.case("llama_gqa").path),
            "qwen2": str(zoo.case("qwen2_bias_tied").path)}


@pytest.fixture(scope="module")
def converted(zoo, tmp_path_factory) -> str:
    from convert.checkpoint import save_converted

    out = tmp_path_factory.mktemp("tp-converted") / "llama"
    return str(save_converted(str(zoo.case("llama_gqa").path), out, progress=False))


@pytest.fixture(scope="module")
def engines(models, converted) -> dict:
    spec = {"models": models, "tp_sizes": TP_SIZES, "prompts": PROMPTS,
            "extra": {"qwen2_pallas_tp2": [models["qwen2"], 2, "pallas"],
                      "llama_pallas_triton_kv_tp4": [models["llama"], 4, "pallas+kv_triton"],
                      "llama_converted_tp2": [converted, 2, "reference"],
                      **({"llama_native_cpu_tp2": [models["llama"], 2, "cpu"]}
                         if NATIVE_CPU else {})},
            "errors": {"tp_exceeds_devices": [models["llama"], 8],
                       "heads_indivisible": [models["llama"], 3]}}
    return _run("engines", spec, devices=4)


# ---------------------------------------------------------------------------------------------
# Several devices in one process
# ---------------------------------------------------------------------------------------------


def test_four_devices_seen(engines):
    assert engines["devices"] == 4


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_greedy_tokens_equal_across_tp_sizes(engines, name):
    greedy = engines["models"][name]["greedy"]
    assert all(len(t) == 12 for t in greedy["1"])
    for tp in TP_SIZES[1:]:
        assert greedy[str(tp)] == greedy["1"], f"{name}: TP {tp} differs from TP 1"


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_seeded_sampling_equal_across_tp_sizes(engines, name):
    rec = engines["models"][name]
    seeded = rec["seeded"]
    assert seeded["1"] != rec["greedy"]["1"]  # it did sample
    for tp in TP_SIZES[1:]:
        assert seeded[str(tp)] == seeded["1"], f"{name}: seeded TP {tp} differs from TP 1"


@pytest.mark.parametrize("label,reference", [
    ("qwen2_pallas_tp2", "qwen2"), ("llama_pallas_triton_kv_tp4", "llama"),
    ("llama_converted_tp2", "llama"),
    pytest.param("llama_native_cpu_tp2", "llama", marks=needs_native_cpu)])
def test_pallas_per_shard_and_converted_checkpoint(engines, label, reference):
    """The Pallas kernels (attention and KV write) and the native CPU kernel inside
    shard_map, and weights from an orbax checkpoint placed into their shards, give TP 1's
    tokens."""
    assert engines["models"][label]["greedy"] == engines["models"][reference]["greedy"]["1"]


def _forbidden_shapes(shapes: dict, tp: int) -> set[tuple[int, ...]]:
    """Shapes that an all-gather of the KV cache or of a full weight would produce."""
    kv = tuple(shapes["kv"])
    out = {kv, kv[1:]}  # the stacked cache, one layer of it
    for p in shapes["params"]:
        p = tuple(p)
        out |= {p, p[1:]} if len(p) == 3 else {p}  # stacked [L, in, out] and one layer
    return {s for s in out if len(s) >= 2}


def _check_collectives(hlo: dict, shapes: dict, tp: int, where: str) -> None:
    # Row-parallel o_proj and down_proj: one all-reduce of [T, hidden] each per layer (the
    # scan body holds one layer), plus one for the vocabulary-sharded embedding lookup.
    reduces = [s for s in hlo["all-reduce"] if len(s) == 2 and s[1] == HIDDEN]
    assert len(reduces) >= 3, f"{where}: expected the row-parallel all-reduces, got {hlo}"
    forbidden = _forbidden_shapes(shapes, tp)
    for kind, found in hlo.items():
        for s in found:
            assert tuple(s) not in forbidden, f"{where}: {kind} of a weight or KV shape {s}"
    # The only all-gather: the vocabulary-sharded logits [R, V], gathered for sampling.
    assert hlo["all-gather"], f"{where}: no logits all-gather"
    for s in hlo["all-gather"]:
        assert len(s) == 2 and s[1] == VOCAB and s[0] <= 16, f"{where}: all-gather {s}"


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("tp", TP_SIZES[1:])
def test_compiled_step_collectives(engines, name, tp):
    rec = engines["models"][name]
    _check_collectives(rec["hlo"][str(tp)], rec["shapes"][str(tp)], tp, f"{name} TP {tp}")


@pytest.mark.parametrize("label", ["qwen2_pallas_tp2", "llama_pallas_triton_kv_tp4",
                                   pytest.param("llama_native_cpu_tp2", marks=needs_native_cpu)])
def test_compiled_step_collectives_pallas(engines, label):
    rec = engines["models"][label]
    _check_collectives(rec["hlo"], rec["shapes"], int(label[-1]), label)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_memory_per_device(engines, name):
    """Parameters split about tp ways (norms and o/down biases stay whole); the KV cache
    split by KV head, with the 2 KV heads each held by 2 devices at TP 4 (as vLLM)."""
    rec = engines["models"][name]
    total_params = sum(int(np.prod(s)) * 4 for s in rec["shapes"]["1"]["params"])
    total_kv = 2 * int(np.prod(rec["shapes"]["1"]["kv"])) * 4
    rows = [("TP", "params/device", "KV/device")] + [(1, total_params, total_kv)]
    previous = total_params
    for tp in TP_SIZES[1:]:
        stats = rec["stats"][str(tp)]
        assert stats["tensor_parallel_size"] == tp
        params, kv = stats["param_bytes_per_device"], stats["kv_cache_bytes_per_device"]
        rows.append((tp, params, kv))
        assert params < previous and params < 1.2 * total_params / tp + 8192
        previous = params
        assert kv == total_kv // min(tp, 2)  # 2 KV heads: TP 4 replicates each on 2 devices
    assert "tensor_parallel_size" not in rec["stats"]["1"]  # TP 1: the unsharded path
    print(f"\n{name} bytes per device: " + "; ".join(f"{a} {b} {c}" for a, b, c in rows))


def test_errors_in_engine(engines):
    errors = engines["errors"]
    assert "tensor_parallel_size=8 exceeds the 4 available cpu device(s)" in errors[
        "tp_exceeds_devices"]
    assert "4 attention heads are not divisible by 3" in errors["heads_indivisible"]


# ---------------------------------------------------------------------------------------------
# Two processes (jax.distributed)
# ---------------------------------------------------------------------------------------------


def test_two_process_run_matches_tp1(engines, models):
    """Two processes of two CPU devices each, TP 4 across both; process 0 schedules and
    broadcasts every step. Process 0 idles first, so process 1's waits time out and re-arm;
    the KV cache is sized by each process (no override) and agreed on from process 0."""
    results = _run_processes({"model": models["llama"], "prompts": PROMPTS, "poll_ms": 300,
                              "idle_s": 1.0, "overrides": {"num_gpu_blocks_override": None}})
    driver, worker = results
    assert (driver["processes"], driver["devices"], driver["local_devices"]) == (2, 4, 2)
    assert driver["greedy"] == engines["models"]["llama"]["greedy"]["1"]
    assert worker["steps"] == driver["stats"]["steps"] > 0
    assert driver["stats"]["tensor_parallel_size"] == 4


def test_two_process_server(engines, models):
    """`jaxvllm serve` on two processes: process 0 answers HTTP, process 1 runs its steps and
    exits when process 0 is stopped."""
    import signal
    import time
    import urllib.request

    coordinator, port = f"127.0.0.1:{_free_port()}", _free_port()
    common = [sys.executable, "-m", "jaxvllm.entrypoints.cli", "serve", models["llama"],
              "--tensor-parallel-size", "4", "--max-model-len", "64", "--block-size", "4",
              "--coordinator-address", coordinator, "--num-processes", "2"]
    procs = [subprocess.Popen(common + ["--process-id", str(i), "--port", str(port)],
                              env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    try:
        body = None
        deadline = time.monotonic() + 180
        while body is None and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/completions", method="POST",
                    headers={"Content-Type": "application/json"},
                    data=json.dumps({"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0,
                                     "return_token_ids": True}).encode())
                with urllib.request.urlopen(request, timeout=60) as response:
                    body = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, "the server did not answer"
        assert body["choices"][0]["token_ids"] == engines["models"]["llama"]["greedy"]["1"][0]
        procs[0].send_signal(signal.SIGINT)
        outputs = [p.communicate(timeout=60)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs[1][-2000:]
        assert "process 0 stopped after" in outputs[1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_processes_must_span_every_device(models):
    """Two processes of two devices but tensor_parallel_size 2: both say what to use."""
    for r in _run_processes({"model": models["llama"], "prompts": PROMPTS, "tp": 2}):
        assert ("across processes the model is sharded over every device: use "
                "tensor_parallel_size=4") in r["error"]


def test_mismatched_engine_flags(models, tmp_path):
    """Process 1 started with another max_model_len: both processes say so."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = []
    for i, max_len in enumerate((64, 32)):
        spec = {"model": models["llama"], "prompts": PROMPTS, "coordinator": coordinator,
                "num_processes": 2, "process_id": i, "overrides": {"max_model_len": max_len}}
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), "distributed",
                                       json.dumps(spec)], env=_env(2), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        assert "process(es) [1] were started with a different engine configuration" in \
            _last_json(out)["error"]


# ---------------------------------------------------------------------------------------------
# Layout rules and checks (no devices needed)
# ---------------------------------------------------------------------------------------------


def _cfg(zoo, name: str):
    return zoo.loaded(name).config


def test_divisibility_errors(zoo):
    from jaxvllm.parallel import check_model_divisible

    cfg = _cfg(zoo, "llama_gqa")  # 4 heads, 2 KV heads, MLP 128, vocab 256
    check_model_divisible(cfg, 2)
    check_model_divisible(cfg, 4)  # KV heads replicated
    cases = [
        (dict(), 3, "its 4 attention heads are not divisible by 3"),
        (dict(num_heads=12, num_kv_heads=6), 4, "its 6 KV heads are not divisible by 4"),
        (dict(num_heads=24, num_kv_heads=3), 8, "needs tensor_parallel_size to be a multiple of 3"),
        (dict(intermediate_size=102), 4, "intermediate_size 102) is not divisible by 4"),
        (dict(vocab_size=250), 4, "vocabulary (250 tokens) is not divisible by 4"),
    ]
    for changes, tp, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_model_divisible(dataclasses.replace(cfg, **changes), tp)


def test_tp_larger_than_devices_is_an_error():
    import jax

    from jaxvllm.config import EngineConfig

    n = len(jax.devices())
    with pytest.raises(ValueError, match=f"tensor_parallel_size={n + 1} exceeds the {n} "
                                         "available"):
        EngineConfig(tensor_parallel_size=n + 1)
    with pytest.raises(ValueError, match="must be >= 1"):
        EngineConfig(tensor_parallel_size=0)


def test_widened_kv_heads_keep_the_gqa_mapping():
    """With KV heads replicated to tp, query head h reads widened head h // (H / tp), which
    must be original head h // (H / KVH)."""
    from jaxvllm.models.config import ModelConfig
    from jaxvllm.parallel import tp_model_config, widen_kv_heads

    cfg = ModelConfig("LlamaForCausalLM", vocab_size=16, hidden_size=8, intermediate_size=8,
                      num_layers=1, num_heads=8, num_kv_heads=2, head_dim=3,
                      max_position_embeddings=8)
    k = np.arange(1 * 8 * 6, dtype=np.float32).reshape(1, 8, 6)  # heads [0 0 0 1 1 1]
    params = {"embed": np.zeros((16, 8)), "layers": {"k_proj": k, "v_proj": k + 1,
                                                      "k_bias": np.arange(6.0)[None]}}
    for tp in (4, 8):
        run = tp_model_config(cfg, tp)
        assert run.num_kv_heads == tp and run.num_heads == 8
        wide = widen_kv_heads(params, cfg, tp)["layers"]["k_proj"].reshape(1, 8, tp, 3)
        orig = k.reshape(1, 8, 2, 3)
        for h in range(cfg.num_heads):
            np.testing.assert_array_equal(wide[:, :, h // (8 // tp)], orig[:, :, h // 4])
    assert tp_model_config(cfg, 2) is cfg
    assert widen_kv_heads(params, cfg, 2) is params


@pytest.mark.parametrize("case", ["llama_gqa", "llama_mha_tied", "mistral_sliding",
                                  "qwen2_bias_tied", "qwen3_qknorm", "opt_prenorm",
                                  "opt_350m_style"])
def test_every_parameter_has_a_layout(zoo, case):
    """Every parameter of every family gets a spec; split axes divide by tp; what is split
    is what Megatron splits (column-parallel outputs, row-parallel inputs, the vocabulary)."""
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    from jaxvllm.models.loader import abstract_model
    from jaxvllm.models.registry import model_config_from_hf
    from jaxvllm.parallel import AXIS, param_partition_specs, tp_model_config

    base = zoo.case(case)
    cfg = model_config_from_hf(json.loads((base.path / "config.json").read_text()), case)
    tp = 4
    run = tp_model_config(cfg, tp)
    params = nnx.to_pure_dict(nnx.state(abstract_model(run, np.float32)))
    specs = param_partition_specs(params)
    flat = {("layers", n): (params["layers"][n], specs["layers"][n]) for n in params["layers"]}
    flat |= {(n,): (params[n], specs[n]) for n in params if n != "layers"}
    split = set()
    for name, (array, spec) in flat.items():
        assert isinstance(spec, P) and len(spec) == len(array.shape), name
        for axis, part in enumerate(spec):
            if part == AXIS:
                assert array.shape[axis] % tp == 0, (name, array.shape, spec)
                split.add(name[-1])
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "embed"}
    assert expected <= split
    replicated_names = {"attn_norm_scale", "mlp_norm_scale", "o_bias", "down_bias", "q_norm",
                        "k_norm", "pos_embed", "project_in", "project_out", "final_norm_scale"}
    assert not split & replicated_names


def test_distributed_flag_errors(monkeypatch):
    from jaxvllm import distributed

    for var in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False  # nothing given: one process
    with pytest.raises(ValueError, match="needs --num-processes and --process-id"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match=r"--process-id=2: must be in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="expected host:port"):
        distributed.initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match="without --coordinator-address"):
        distributed.initialize(None, 2, 1)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="expected an integer"):
        distributed.initialize()


def test_serve_has_the_distributed_flags():
    import argparse

    from jaxvllm.entrypoints import serve_cmd

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    serve_cmd.add_parser(sub)
    args = parser.parse_args(["serve", "m", "--tensor-parallel-size", "4",
                              "--coordinator-address", "10.0.0.1:1234", "--num-processes", "2",
                              "--process-id", "1"])
    assert (args.tensor_parallel_size, args.coordinator_address, args.num_processes,
            args.process_id) == (4, "10.0.0.1:1234", 2, 1)
    assert serve_cmd.engine_kwargs(args)["tensor_parallel_size"] == 4
