"""Start-up measurements that choose, for this GPU and model, between two ways of running the
same work, each a Pallas kernel against XLA's own code:

- `small_batch_rows`: whether small decode steps run their projections as the small-batch
  kernels (pallas_kernels/small_batch_matmul.py). It times the model's own code
  (`CausalLM.layer_projections`: a layer without its attention) over its first layers'
  weights (`PROBE_BYTES` of them, more than a GPU's L2 cache holds) at 16 and 64 rows;
- `sampling_kernel_rows`: whether a step samples with the sampler's kernels
  (pallas_kernels/sampling.py), timed on random float32 logits (what the model's
  `compute_logits` gives) of its vocabulary at 16 and 64 rows, default sampling
  parameters.

Which is faster depends on the GPU, the model's shapes and the step's rows, so an engine
that leaves `small_batch_matmuls` or `sampling_kernels` unset measures on a GPU instead of
guessing. Each way runs as one jitted loop compiled with the steps' XLA flags (one CUDA graph,
as a decode step runs), each iteration depending on the one before. The kernels then run for
steps of up to the largest row count at which they, and every row count below it, were
faster by `MARGIN` and gave XLA's result (within `TOLERANCE`: the largest difference
relative to the largest value, or for the sampler the share of rows drawing another token);
a row count that loses ends the measurement, the larger ones left uncompiled. Both ways
take turns on the device after a warm-up (`fastest_each`).
A kernel that fails to compile or run counts as slower: the engine runs XLA's way, and says
why in `LLMEngine.stats()`; one that compiles but fails on the device is an error (the
device may be left unusable).

Choices are kept in a file beside JAX's persistent compilation cache (`cache_path`), keyed by
the device kind, jax's version, the measured code's source and the shapes, so later starts
read them instead of measuring.
`JAXVLLM_AUTOTUNE=0` skips the measurements (the kernels stay off).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvllm.cache import cache_dir

logger = logging.getLogger(__name__)

# Padded decode rows measured: the smallest and largest the small-batch kernels take (32,
# between, follows them). The sampler's kernels are measured up to 64 rows too: the
# measurements run before the KV cache is sized from the device's peak memory use, and
# [256, V] logits would add to that peak on the first start only (later ones read the
# cache), which could size the cache, and so every step program, differently.
CANDIDATE_ROWS = (16, 64)
SAMPLER_ROWS = (16, 64)
MARGIN = 0.03  # the kernels must be this much faster: XLA's way is the better-trodden one
TOLERANCE = 0.05
PROBE_BYTES = 256 << 20  # layer weights read per pass over the probed layers
ITERATIONS = 10  # passes in one timed call
REPETITIONS = 5  # timed calls; the fastest counts
WARMUP_SECONDS = 0.2  # of untimed calls first
CACHE_FILE = "autotune.json"


@dataclasses.dataclass
class KernelChoice:
    """What a measurement found: `rows`, the most rows a step runs the kernels for (0:
    never), and per row count XLA's and the kernels' microseconds (a layer, or a sampling),
    the kernels' difference from XLA's result (`rel_err`), or the error that ruled them
    out."""

    feature: str
    rows: int
    timings: dict[int, dict[str, Any]]
    layers: int = 0  # layers probed (small-batch kernels)
    cached: bool = False  # read from the cache file rather than measured now
    seconds: float = 0.0  # the measurement's time (compiling included), when measured now

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "layers": self.layers, "cached": self.cached,
                "seconds": round(self.seconds, 2),
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


def should_measure() -> bool:
    """Whether an engine measures what is unset: on a GPU, unless JAXVLLM_AUTOTUNE=0 (on
    the CPU the kernels run interpreted, never faster)."""
    return jax.default_backend() == "gpu" and os.environ.get("JAXVLLM_AUTOTUNE", "1") != "0"


# -- the small-batch projection kernels ----------------------------------------------------------


def small_batch_rows(model, *, candidates: Sequence[int] = CANDIDATE_ROWS,
                     use_cache: bool = True, iterations: int = ITERATIONS,
                     repetitions: int = REPETITIONS) -> KernelChoice:
    """The row limit for `model`'s small-batch kernels on this device (the module
    docstring): from the cache file, else measured (and stored)."""
    from jaxvllm.models import transformer
    from pallas_kernels import small_batch_matmul

    cfg = model.cfg
    shape = {name: getattr(cfg, name) for name in (
        "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "qkv_bias",
        "o_bias", "mlp", "mlp_bias", "activation", "qk_norm", "position", "norm")}
    key = cache_key("small_batch_matmuls", (small_batch_matmul, transformer), shape,
                    model.dtype, candidates)
    return _cached(key, "small_batch_matmuls", use_cache, lambda: measure(
        model, candidates, iterations=iterations, repetitions=repetitions))


def measure(model, candidates: Sequence[int] = CANDIDATE_ROWS, *,
            iterations: int = ITERATIONS, repetitions: int = REPETITIONS) -> KernelChoice:
    """Time `model.layer_projections` with and without the kernels at each row count."""
    from jaxvllm.models import layers as L

    weights = [layer.arrays() for layer in model.layers.per_layer]
    layer_bytes = sum(int(a.size) * a.dtype.itemsize for a in weights[0].values())
    weights = weights[:max(1, min(len(weights), -(-PROBE_BYTES // layer_bytes)))]
    cfg = model.cfg
    inv_freq = (jnp.asarray(L.rope_inv_freq(cfg), jnp.float32) if cfg.position == "rope"
                else None)

    def measure_rows(rows):
        x = jax.random.normal(jax.random.key(rows), (rows, cfg.hidden_size), model.dtype)
        positions = 500 + jnp.arange(rows, dtype=jnp.int32)
        project = lambda small_batch: functools.partial(model.layer_projections,
                                                        small_batch=small_batch)

        def way(small_batch):
            layer = project(small_batch)

            def body(_, x, weights, positions, inv_freq):
                for p in weights:
                    x = layer(p, x, positions, inv_freq)
                return x

            return body

        def difference():
            want, got = (np.asarray(jax.jit(project(n))(weights[0], x, positions, inv_freq),
                                    np.float32) for n in (0, rows))
            return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-6))

        per_layer = iterations * len(weights)
        return _time_both(way(0), way(rows), (x, weights, positions, inv_freq), difference,
                          iterations, repetitions, per_layer)

    return _measure_each("small_batch_matmuls", candidates, measure_rows, layers=len(weights))


# -- the sampler's kernels -----------------------------------------------------------------------


def sampling_kernel_rows(vocab_size: int, dtype, *, candidates: Sequence[int] = SAMPLER_ROWS,
                         use_cache: bool = True, iterations: int = ITERATIONS,
                         repetitions: int = REPETITIONS) -> KernelChoice:
    """The row limit for the sampler's kernels at this vocabulary and logits dtype on this
    device: from the cache file, else measured (and stored)."""
    from jaxvllm.engine import sampler
    from pallas_kernels import sampling

    key = cache_key("sampling_kernels", (sampling, sampler), {"vocab_size": vocab_size},
                    dtype, candidates)
    return _cached(key, "sampling_kernels", use_cache, lambda: measure_sampler(
        vocab_size, dtype, candidates, iterations=iterations, repetitions=repetitions))


def measure_sampler(vocab_size: int, dtype, candidates: Sequence[int] = SAMPLER_ROWS, *,
                    iterations: int = ITERATIONS,
                    repetitions: int = REPETITIONS) -> KernelChoice:
    """Time `sampler.sample` on default sampling parameters with and without the kernels at
    each row count: the share of rows whose token differs is the check."""
    from jaxvllm.engine.sampler import (PLAIN_RANDOM_PATHS, RowSpec, build_sampling_metadata,
                                        sample)

    def measure_rows(rows):
        meta, _ = build_sampling_metadata([RowSpec(seed=i) for i in range(rows)], vocab_size)
        logits = 3 * jax.random.normal(jax.random.key(rows), (rows, vocab_size), dtype)
        draw = lambda kernel: functools.partial(sample, paths=PLAIN_RANDOM_PATHS,
                                                kernel=kernel)

        def way(kernel):
            def body(i, logits, meta):
                step = dataclasses.replace(meta, step_positions=meta.step_positions + i)
                tokens = draw(kernel)(logits, step).token_ids
                # the next logits depend on these tokens: nothing leaves the loop
                return logits.at[0, tokens[0]].add(jnp.asarray(1e-3, logits.dtype))

            return body

        def difference():
            want, got = (np.asarray(jax.jit(draw(k))(logits, meta).token_ids)
                         for k in (False, True))
            return float(np.mean(want != got))

        return _time_both(way(False), way(True), (logits, meta), difference, iterations,
                          repetitions, iterations)

    return _measure_each("sampling_kernels", candidates, measure_rows)


# -- measuring -----------------------------------------------------------------------------------


def _measure_each(feature: str, candidates: Sequence[int],
                  measure_rows: Callable[[int], dict], layers: int = 0) -> KernelChoice:
    timings: dict[int, dict[str, Any]] = {}
    for rows in sorted(candidates):
        try:
            timings[rows] = measure_rows(rows)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run is not chosen
            timings[rows] = {"error": f"{type(e).__name__}: {e}"[:400]}
        if choose_rows(timings) < rows:
            break  # a loss here rules out every larger count: no need to compile those
    return KernelChoice(feature, choose_rows(timings), timings, layers)


def _time_both(xla_body: Callable, kernel_body: Callable, args: tuple,
               difference: Callable[[], float], iterations: int, repetitions: int,
               units: int) -> dict[str, Any]:
    """Each `body(i, carry, *rest)` (carry = args[0]) looped `iterations` times in one
    jitted call compiled with the steps' XLA flags; microseconds per `units` of each,
    `difference()`, and an error where the kernels' loop gave two results on one input."""
    from jaxvllm import xla_flags

    def compile_loop(body):
        def run(carry, *rest):
            return jax.lax.fori_loop(0, iterations, lambda i, c: body(i, c, *rest), carry)

        return jax.jit(run).lower(*args).compile(
            compiler_options=xla_flags.step_compiler_options())

    # one after the other: XLA's autotuner times GEMM candidates on the device while it
    # compiles, and its choices are kept for the step programs' same shapes
    compiled = [compile_loop(body) for body in (xla_body, kernel_body)]
    try:
        rel_err = difference()
        # the kernels' loop twice on the same input gives the same bits, unless their
        # programs race (the split kernels' counts, pallas_kernels/small_batch_matmul.py)
        runs = [jax.tree.leaves(compiled[1](*args)) for _ in range(2)]
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(*runs))
        xla_s, kernels_s = fastest_each(compiled, args, repetitions)
    except Exception as e:
        # compiled but failed to run: the device may be left unusable, so say so loudly
        logger.error("a Pallas kernel compiled but failed on the device (%r); if the engine "
                     "fails next, start it with small_batch_matmuls=False and "
                     "sampling_kernels=False", e)
        raise
    timing = {"xla_us": round(1e6 * xla_s / units, 2),
              "kernels_us": round(1e6 * kernels_s / units, 2), "rel_err": round(rel_err, 5)}
    if not same:
        timing["error"] = "the kernels gave different results from run to run"
    return timing


def fastest_each(compiled: Sequence, args, repetitions: int) -> list[float]:
    """Seconds of each program's fastest of `repetitions` calls, after WARMUP_SECONDS of
    calls. The programs take turns throughout, so that both meet the same clocks (a GPU's
    rise over its first milliseconds of work): on an H100, timed first and alone, XLA's
    projections came out slower at 16 rows than at 64, and than in a decode step."""
    warm_until = time.perf_counter() + WARMUP_SECONDS
    while True:
        for program in compiled:
            jax.block_until_ready(program(*args))
        if time.perf_counter() >= warm_until:
            break
    best = [float("inf")] * len(compiled)
    for _ in range(repetitions):
        for i, program in enumerate(compiled):
            start = time.perf_counter()
            jax.block_until_ready(program(*args))
            best[i] = min(best[i], time.perf_counter() - start)
    return best


# -- the cache file ------------------------------------------------------------------------------


def cache_key(feature: str, modules, shape: dict, dtype, candidates: Sequence[int]) -> str:
    """What a measurement depends on: the device, jax, the measured code's source (and
    this module's: its margins and format), the shapes, the dtype, the rows tried and the
    small-batch kernels' tiling overrides."""
    import sys

    import jaxlib

    from pallas_kernels.small_batch_matmul import TILINGS_ENV

    digest = hashlib.sha256()
    for module in (*modules, sys.modules[__name__]):
        digest.update(Path(module.__file__).read_bytes())
    return json.dumps([feature, jax.devices()[0].device_kind, jax.__version__,
                       jaxlib.__version__, digest.hexdigest()[:16], shape,
                       str(jnp.dtype(dtype)), sorted(candidates),
                       os.environ.get(TILINGS_ENV, "")], sort_keys=True)


def cache_path() -> Path:
    """Beside JAX's persistent compilation cache where it has one (a start with an empty
    one is cold in this too), else in jaxvllm's cache folder."""
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir) / f"jaxvllm-{CACHE_FILE}"
    return cache_dir() / CACHE_FILE


def _cached(key: str, feature: str, use_cache: bool,
            measure_now: Callable[[], KernelChoice]) -> KernelChoice:
    path = cache_path()
    if use_cache:
        stored = _read(path).get(key)
        try:
            return KernelChoice(feature, int(stored["rows"]),
                                {int(r): dict(t) for r, t in stored["timings"].items()},
                                int(stored["layers"]), cached=True)
        except (TypeError, KeyError, ValueError, AttributeError):  # none, or not readable
            pass
    start = time.perf_counter()
    choice = measure_now()
    choice.seconds = time.perf_counter() - start
    # a failure may be passing (memory taken by another process): measured again next time
    if use_cache and not any("error" in t for t in choice.timings.values()):
        _write(path, key, choice.as_dict())
    return choice


def _read(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
        return entries if isinstance(entries, dict) else {}
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


def describe(choice: KernelChoice) -> str:
    """One line for the log."""
    parts = []
    for rows, t in sorted(choice.timings.items()):
        parts.append(f"{rows} rows: " + (t["error"][:80] if "error" in t else
                                         f"{t['kernels_us']} us against XLA's {t['xla_us']}"))
    where = "cached" if choice.cached else f"measured in {choice.seconds:.1f} s"
    chosen = f"up to {choice.rows} rows" if choice.rows else "off"
    return f"{choice.feature}: {chosen} ({where}; {'; '.join(parts)})"
