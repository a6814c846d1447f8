"""Start-up measurements that choose, for this GPU and model, between two ways of running the
same step: whether small decode steps run their projections as the small-batch kernels
(pallas_kernels/small_batch_matmul.py) or as XLA's GEMMs and fusions.

Which is faster depends on the GPU, the model's shapes and the step's rows, so an engine
whose `small_batch_matmuls` is unset measures it on a GPU instead of guessing. It times the
model's own code (`CausalLM.layer_projections`: a layer without its attention) over its
first layers' weights (`PROBE_BYTES` of them, more than a GPU's L2 cache holds), for each
row count a decode step is padded to and the kernels can run (16, 32, 64), with the kernels
and without, each as one jitted loop compiled with the steps' XLA flags (one CUDA graph, as a
decode step runs). The kernels then run for steps of up to the largest row count at which
they, and every row count below it, were faster by `MARGIN` and gave XLA's result within
`TOLERANCE`. A kernel that fails to compile or run counts as slower: the engine runs XLA's
way, and says why in `LLMEngine.stats()["small_batch_probe"]`.

The choice is kept in `cache_dir()/autotune.json`, keyed by the device kind, jax's version,
the kernels' and the layer's source and the model's shapes, so later starts read it instead
of measuring. `JAXVLLM_AUTOTUNE=0` skips the measurement (the kernels stay off).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvllm.cache import cache_dir

logger = logging.getLogger(__name__)

CANDIDATE_ROWS = (16, 32, 64)  # padded decode rows (runner buckets) the kernels can run
MARGIN = 0.03  # the kernels must be this much faster: XLA's way is the better-trodden one
TOLERANCE = 0.05  # largest difference from XLA's output, relative to its largest value
PROBE_BYTES = 256 << 20  # weights read per pass over the probed layers
ITERATIONS = 10  # passes over the probed layers in one timed call
REPETITIONS = 5  # timed calls; the fastest counts
CACHE_FILE = "autotune.json"


@dataclasses.dataclass
class SmallBatchChoice:
    """What the measurement found: `rows`, the most rows a step runs the kernels for (0:
    never), and per padded row count XLA's and the kernels' microseconds a layer, the
    kernels' relative difference from XLA's output, or the error that ruled them out."""

    rows: int
    timings: dict[int, dict[str, Any]]
    layers: int = 0  # layers probed
    cached: bool = False  # read from the cache file rather than measured now

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "layers": self.layers, "cached": self.cached,
                "timings": {str(r): t for r, t in self.timings.items()}}


def choose_rows(timings: dict[int, dict[str, Any]], margin: float = MARGIN,
                tolerance: float = TOLERANCE) -> int:
    """The largest row count at which the kernels, and at every smaller one measured, were
    correct and faster than XLA by `margin`; 0 if none."""
    limit = 0
    for rows in sorted(timings):
        t = timings[rows]
        if ("error" in t or t["rel_err"] > tolerance
                or t["kernels_us"] > (1 - margin) * t["xla_us"]):
            break
        limit = rows
    return limit


def small_batch_rows(model, *, candidates: Sequence[int] = CANDIDATE_ROWS,
                     use_cache: bool = True, iterations: int = ITERATIONS,
                     repetitions: int = REPETITIONS) -> SmallBatchChoice:
    """The row limit for `model`'s small-batch kernels on this device (the module docstring):
    from the cache file, else measured (and stored)."""
    key = cache_key(model, candidates)
    path = cache_dir() / CACHE_FILE
    if use_cache:
        stored = _read(path).get(key)
        if stored is not None:
            return SmallBatchChoice(stored["rows"], {int(r): t for r, t in
                                                     stored["timings"].items()},
                                    stored["layers"], cached=True)
    choice = measure(model, candidates, iterations=iterations, repetitions=repetitions)
    if use_cache:
        _write(path, key, choice.as_dict() | {"cached": False})
    return choice


def measure(model, candidates: Sequence[int] = CANDIDATE_ROWS, *,
            iterations: int = ITERATIONS, repetitions: int = REPETITIONS) -> SmallBatchChoice:
    """Time `model.layer_projections` with and without the kernels at each row count."""
    from jaxvllm.models import layers as L

    per_layer = model.layers.per_layer
    weights = [layer.arrays() for layer in per_layer]
    layer_bytes = sum(int(a.size) * a.dtype.itemsize for a in weights[0].values())
    weights = weights[:max(1, min(len(weights), -(-PROBE_BYTES // layer_bytes)))]
    cfg = model.cfg
    inv_freq = (jnp.asarray(L.rope_inv_freq(cfg), jnp.float32) if cfg.position == "rope"
                else None)
    timings: dict[int, dict[str, Any]] = {}
    for rows in sorted(candidates):
        try:
            timings[rows] = _measure_rows(model, weights, rows, inv_freq, iterations,
                                          repetitions)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run is not chosen
            timings[rows] = {"error": f"{type(e).__name__}: {e}"[:400]}
    return SmallBatchChoice(choose_rows(timings), timings, len(weights))


def _measure_rows(model, weights, rows: int, inv_freq, iterations: int,
                  repetitions: int) -> dict[str, Any]:
    from jaxvllm import xla_flags

    x = jax.random.normal(jax.random.key(rows), (rows, model.cfg.hidden_size), model.dtype)
    positions = 500 + jnp.arange(rows, dtype=jnp.int32)

    def project(small_batch):
        return functools.partial(model.layer_projections, small_batch=small_batch)

    def loop(small_batch):
        layer = project(small_batch)

        def run(x, weights, positions, inv_freq):
            def body(_, x):
                for p in weights:
                    x = layer(p, x, positions, inv_freq)
                return x

            return jax.lax.fori_loop(0, iterations, body, x)

        args = (x, weights, positions, inv_freq)
        return jax.jit(run).lower(*args).compile(
            compiler_options=xla_flags.step_compiler_options()), args

    # the two loops compile side by side (most of the time on a GPU: XLA's autotuner)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        xla_loop, kernel_loop = pool.map(loop, (0, rows))
    # one layer's output each way, for the check
    want = np.asarray(jax.jit(project(0))(weights[0], x, positions, inv_freq), np.float32)
    got = np.asarray(jax.jit(project(rows))(weights[0], x, positions, inv_freq), np.float32)
    rel_err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-6))
    per_layer = lambda s: 1e6 * s / (iterations * len(weights))
    return {"xla_us": round(per_layer(_fastest(*xla_loop, repetitions)), 2),
            "kernels_us": round(per_layer(_fastest(*kernel_loop, repetitions)), 2),
            "rel_err": round(rel_err, 5)}


def _fastest(compiled, args, repetitions: int) -> float:
    """Seconds of the fastest of `repetitions` calls, after one to warm up."""
    jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(repetitions):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - start)
    return best


def cache_key(model, candidates: Sequence[int]) -> str:
    """What a measurement depends on: the device, jax, the code measured, the layer's shapes
    and options, the dtype and the rows tried."""
    import jaxlib

    from jaxvllm.models import transformer
    from pallas_kernels import small_batch_matmul

    digest = hashlib.sha256()
    for module in (small_batch_matmul, transformer):
        digest.update(Path(module.__file__).read_bytes())
    cfg = model.cfg
    shape = {name: getattr(cfg, name) for name in (
        "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "qkv_bias",
        "o_bias", "mlp", "mlp_bias", "activation", "qk_norm", "position", "norm")}
    return json.dumps([jax.devices()[0].device_kind, jax.__version__, jaxlib.__version__,
                       digest.hexdigest()[:16], shape, str(jnp.dtype(model.dtype)),
                       sorted(candidates)], sort_keys=True)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, key: str, entry: dict) -> None:
    """Add `entry` under `key`, replacing the file atomically (an unwritable cache folder
    only costs the next start a measurement)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read(path)
        entries[key] = entry
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False,
                                         suffix=".tmp") as f:
            json.dump(entries, f, indent=1)
        os.replace(f.name, path)
    except OSError as e:
        logger.debug("autotune choice not stored: %r", e)


def should_measure() -> bool:
    """Whether an engine measures what is unset: on a GPU, unless JAXVLLM_AUTOTUNE=0 (on
    the CPU the kernels run interpreted, never faster)."""
    return jax.default_backend() == "gpu" and os.environ.get("JAXVLLM_AUTOTUNE", "1") != "0"


def describe(choice: Optional[SmallBatchChoice]) -> str:
    """One line for the log."""
    if choice is None:
        return "small-batch kernels: not measured"
    parts = []
    for rows, t in sorted(choice.timings.items()):
        parts.append(f"{rows} rows: " + (t["error"][:80] if "error" in t else
                                         f"{t['kernels_us']} us a layer against XLA's "
                                         f"{t['xla_us']}"))
    where = "cached" if choice.cached else f"measured over {choice.layers} layers"
    chosen = f"up to {choice.rows} rows" if choice.rows else "off"
    return f"small-batch kernels {chosen} ({where}; {'; '.join(parts)})"
