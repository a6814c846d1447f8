"""Model load time: on the fly (GGUF dequantization or safetensors mapping) against a
checkpoint made by `jaxvllm convert`.

    python benchmarks/load_time.py                      # the embedded default model
    python benchmarks/load_time.py --model ./some-hf-folder --dtype bfloat16 --repeats 5
    python benchmarks/load_time.py --converted ./already-converted

Without --converted the model is converted into a temporary folder first (timed as
convert_s). Loads alternate between the two paths, `--repeats` of each, and the medians are
compared; one prompt's logits must be identical from both. Prints a table, then as the last
line one JSON object: model, device, dtype, on_the_fly_s, converted_s, speedup, convert_s.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from convert.checkpoint import read_marker, save_converted
from jaxvllm.models.config import dtype_name, resolve_dtype
from jaxvllm.models.loader import load_model
from jaxvllm.models.source import resolve_model
from jaxvllm.simple_generate import SimpleGenerator

PROMPT = "The capital of France is"


def _timed_load(model: str | None, dtype):
    start = time.perf_counter()
    loaded = load_model(model, dtype=dtype)
    return loaded, time.perf_counter() - start


def _prompt_ids(folder: Path, vocab_size: int) -> list[int]:
    try:
        from jaxvllm.tokenizer import load_tokenizer

        ids = list(load_tokenizer(str(folder)).encode(PROMPT))
        if ids:
            return ids
    except Exception as e:  # a model without tokenizer files still benchmarks
        print(f"(no tokenizer: {type(e).__name__}; using fixed token ids)", file=sys.stderr)
    return [i % vocab_size for i in (1, 504, 3458, 282, 4649, 314)]


def _device() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')}"


def run(model: str | None, converted: str | None, repeats: int, dtype: str) -> dict:
    target = resolve_dtype(dtype)
    source = resolve_model(model)
    convert_s = None
    with tempfile.TemporaryDirectory(prefix="jaxvllm_load_time_") as tmp:
        if converted is None:
            start = time.perf_counter()
            folder = save_converted(model, Path(tmp) / "converted", progress=False)
            convert_s = time.perf_counter() - start
        else:
            folder = Path(converted)
            read_marker(folder)  # a clear error now rather than after the first timings

        times: dict[str, list[float]] = {"on_the_fly": [], "converted": []}
        logits, ids = {}, None
        for i in range(repeats):
            for path, name in ((model, "on_the_fly"), (str(folder), "converted")):
                loaded, seconds = _timed_load(path, target)
                times[name].append(seconds)
                if i == 0:
                    ids = ids or _prompt_ids(folder, loaded.config.vocab_size)
                    logits[name] = SimpleGenerator(loaded.model).prompt_logits(ids)
                del loaded
                gc.collect()
        marker = read_marker(folder)

    same = np.array_equal(logits["on_the_fly"], logits["converted"])
    fly, conv = statistics.median(times["on_the_fly"]), statistics.median(times["converted"])
    rows = [("on the fly (" + source.kind + ")", times["on_the_fly"], fly),
            (f"converted ({marker['dtype']} orbax)", times["converted"], conv)]
    print(f"model {source.name}  device {_device()}  dtype {dtype_name(target)}  "
          f"repeats {repeats}")
    print(f"{'load path':<26} {'median s':>9}   runs (s)")
    for label, runs, med in rows:
        print(f"{label:<26} {med:>9.2f}   {', '.join(f'{t:.2f}' for t in runs)}")
    print(f"speedup {fly / conv:.2f}x   conversion {'%.2f s' % convert_s if convert_s else 'n/a'}"
          f"   logits identical: {same}")
    if not same:
        diff = np.max(np.abs(logits["on_the_fly"].astype(np.float32)
                             - logits["converted"].astype(np.float32)))
        raise SystemExit(f"logits differ between the two load paths (max |diff| {diff})")
    return {"model": source.name, "device": _device(), "dtype": dtype_name(target),
            "on_the_fly_s": round(fly, 3), "converted_s": round(conv, 3),
            "speedup": round(fly / conv, 2),
            "convert_s": None if convert_s is None else round(convert_s, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="HF folder, Hub id or .gguf file (default: the embedded model)")
    parser.add_argument("--converted", default=None,
                        help="an existing `jaxvllm convert` folder of the same model "
                             "(default: convert into a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3, help="loads per path (median taken)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    result = run(args.model, args.converted, args.repeats, args.dtype)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
