"""Compiled step programs on disk, found without tracing them.

JAX's persistent compilation cache is keyed by the lowered program, so a warm start still
traces and lowers every step program before it can look one up: for a 24-layer model with
its layers unrolled and Pallas kernels in each, that is most of the start. This cache is
keyed by what a program is made from instead (jaxvllm's source, the model's structure, the
arguments' shapes, dtypes and shardings, the program's key and compiler options, jax's
version and configuration, the devices), so a warm start reads and loads each executable.

Only programs XLA compiled in this process are stored: one that JAX's cache handed back
(loaded from disk) serializes without all its code on the CPU, and such an entry would fail
when run ("Function ... not found"). Those programs come from JAX's cache, as before.

It lives beside JAX's cache (`<jax_compilation_cache_dir>/jaxvllm-programs`) and is on and
off with it; `JAXVLLM_PROGRAM_CACHE=0` turns this one off alone. Entries are evicted
oldest-used first past `JAXVLLM_PROGRAM_CACHE_MAX_BYTES` (default 4 GiB). An entry that
fails to load is deleted and the program compiled. Each entry keeps how long its program
took to compile (`compile_seconds`): what compiling a program of the model costs, known to a
warm start that compiles none. Beside the entries, `rent` keeps the step seconds that ran
padded for want of a program never compiled, summed over processes: the runner compiles a
program once that time reaches its cost (jaxvllm/engine/runner.py, DEFER_MAX_PADDING).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax

logger = logging.getLogger(__name__)

SUFFIX = ".program"
RENT_SUFFIX = ".rent"
DEFAULT_MAX_BYTES = 4 << 30
JAX_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_this_thread = threading.local()  # .jax_cache_hit: JAX's cache served a compile here


def _on_jax_event(event: str, **_) -> None:
    if event == JAX_CACHE_HIT_EVENT:
        _this_thread.jax_cache_hit = True  # recorded in the compiling thread


@functools.cache
def _listen_for_jax_cache_hits() -> None:
    jax.monitoring.register_event_listener(_on_jax_event)


@functools.cache
def source_fingerprint() -> str:
    """A digest of the Python source that builds the step programs: jaxvllm's and its
    Pallas kernels'. Any edit makes every entry a miss."""
    import pallas_kernels

    import jaxvllm

    digest = hashlib.sha256()
    for package in (jaxvllm, pallas_kernels):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def _platform() -> tuple:
    import jaxlib

    backend = jax.devices()[0].client
    return (jax.__version__, jaxlib.__version__, backend.platform, backend.platform_version,
            tuple((d.id, d.device_kind) for d in jax.devices()))


def environment_fingerprint() -> str:
    """jax's and jaxlib's versions, the devices (platform, its version, kinds), XLA's flags,
    the small-batch kernels' tiling overrides (pallas_kernels/small_batch_matmul.py) and
    every jax configuration value as it is now, in this thread (a later change, or a
    `with jax.default_matmul_precision(...)` around the step, is another key)."""
    from jax._src import config

    from pallas_kernels.small_batch_matmul import TILINGS_ENV

    trace_context = getattr(config, "trace_context", lambda: None)  # what jit's cache keys on
    parts = (_platform(), os.environ.get("XLA_FLAGS", ""), os.environ.get(TILINGS_ENV, ""),
             sorted(jax.config.values.items()), trace_context())
    return hashlib.sha256(_without_addresses(repr(parts)).encode()).hexdigest()


def _without_addresses(text: str) -> str:
    """`text` without the memory addresses of object reprs (`<... at 0x7f...>`), which
    differ from one process to the next."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def _shape_dtype(x) -> tuple:
    return tuple(x.shape), str(x.dtype)


def abstract(tree) -> Any:
    """`tree`'s leaves as (shape, dtype, sharding or None): what a program is compiled for."""
    return jax.tree.map(lambda x: (*_shape_dtype(x), getattr(x, "sharding", None)), tree)


class ProgramCache:
    """Executables by a key of their making; see the module docstring."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        # entry key -> the seconds its program took to compile: here, or when it was stored
        self.compile_seconds: dict[str, float] = {}

    @classmethod
    def default(cls) -> Optional["ProgramCache"]:
        """The cache beside JAX's persistent compilation cache; None when that is off or
        the folder cannot be made, or JAXVLLM_PROGRAM_CACHE=0."""
        if (not jax.config.jax_compilation_cache_dir
                or os.environ.get("JAXVLLM_PROGRAM_CACHE", "1") == "0"):
            return None
        directory = Path(jax.config.jax_compilation_cache_dir) / "jaxvllm-programs"
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
        max_bytes = int(os.environ.get("JAXVLLM_PROGRAM_CACHE_MAX_BYTES", DEFAULT_MAX_BYTES))
        return cls(directory, max_bytes)

    @staticmethod
    def key(*parts) -> str:
        """The entry name of a program made from `parts` (reprs that name everything the
        trace depends on besides the source and the environment)."""
        digest = hashlib.sha256()
        digest.update(source_fingerprint().encode())
        digest.update(environment_fingerprint().encode())
        digest.update(_without_addresses(repr(parts)).encode())
        return digest.hexdigest()

    def get_or_compile(self, key: str, args, compile: Callable[[], jax.stages.Compiled]
                       ) -> jax.stages.Compiled:
        """The program stored under `key` for `args`, else `compile()`'s, stored unless
        JAX's own cache supplied it (see the module docstring)."""
        compiled = self.load(key, args)
        if compiled is not None:
            return compiled
        _listen_for_jax_cache_hits()
        _this_thread.jax_cache_hit = False
        start = time.perf_counter()
        compiled = compile()
        self.compile_seconds[key] = time.perf_counter() - start
        if _this_thread.jax_cache_hit:
            logger.debug("program %s from JAX's cache: not stored", key[:12])
        else:
            self.store(key, compiled, self.compile_seconds[key])
        return compiled

    def holds(self, key: str) -> bool:
        """Whether an entry is stored under `key` (it may still fail to load)."""
        return self._path(key).exists()

    def _path(self, key: str, suffix: str = SUFFIX) -> Path:
        return self.directory / (key + suffix)

    def rent(self, key: str) -> float:
        """The step seconds recorded as spent running padded for want of `key`'s program."""
        try:
            return float(self._path(key, RENT_SUFFIX).read_text())
        except (OSError, ValueError):
            return 0.0

    def add_rent(self, key: str, seconds: float) -> None:
        """Add `seconds` to `key`'s rent (a lost update between two processes only delays
        a compilation)."""
        self._write(self._path(key, RENT_SUFFIX), repr(self.rent(key) + seconds).encode())

    def load(self, key: str, args) -> Optional[jax.stages.Compiled]:
        """The executable stored under `key`, loaded, if its arguments' structure, shapes
        and dtypes are those of `args`; else None (a miss)."""
        from jax.experimental import serialize_executable

        path = self._path(key)
        try:
            blob = path.read_bytes()
        except OSError:
            self.misses += 1
            return None
        try:
            payload, in_tree, out_tree, compile_seconds = pickle.loads(blob)
            compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
            stored = jax.tree.map(_shape_dtype, compiled.args_info)
            if stored != jax.tree.map(_shape_dtype, (tuple(args), {})):
                raise ValueError("the stored program takes other arguments")
        except Exception as e:  # noqa: BLE001 - a stale or damaged entry is only a miss
            logger.debug("program cache entry %s not loaded: %r", path.name, e)
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        os.utime(path)  # most recently used, for eviction
        self.hits += 1
        self.compile_seconds[key] = compile_seconds
        return compiled

    def store(self, key: str, compiled: jax.stages.Compiled, compile_seconds: float = 0.0
              ) -> None:
        """Write `compiled` (and the seconds it took to compile) under `key` (atomically),
        then evict past max_bytes. A program that cannot be serialized, or a full disk, is
        not an error: it is not stored."""
        from jax.experimental import serialize_executable

        try:
            blob = pickle.dumps((*serialize_executable.serialize(compiled), compile_seconds))
        except Exception as e:  # noqa: BLE001 - see the docstring
            logger.debug("program %s not stored: %r", key[:12], e)
            return
        if self._write(self._path(key), blob):
            self._path(key, RENT_SUFFIX).unlink(missing_ok=True)  # paid off
            self._evict()

    def _write(self, path: Path, blob: bytes) -> bool:
        """Replace `path` by `blob` atomically; False (logged) where it cannot."""
        temporary = None
        try:
            with tempfile.NamedTemporaryFile(dir=self.directory, delete=False,
                                             suffix=".tmp") as f:
                temporary = f.name
                f.write(blob)
            os.replace(temporary, path)
            return True
        except OSError as e:
            logger.debug("%s not written: %r", path.name, e)
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
            return False

    def _evict(self) -> None:
        entries = []
        for path in [*self.directory.glob("*" + SUFFIX), *self.directory.glob("*" + RENT_SUFFIX)]:
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
