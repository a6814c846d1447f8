"""Ragged paged attention as native CPU code: `cpu_paged_attention.cc`, called through XLA's
FFI as one custom call per layer (the CPU default where it builds).

XLA on the CPU can only gather the KV blocks a step needs into a new array and then reduce
over it; the native kernel reads each block once, in place, through the block table (see
the .cc file). It is built on first use with the system's C++ compiler (`CXX`, else g++,
c++ or clang++) for this machine's CPU, against the FFI headers of the installed jaxlib,
and kept in the jaxvllm cache (`cache_dir()/native`, one file per source, flags, compiler,
jaxlib and CPU). Where it cannot be built or loaded, `unavailable_reason()` says why and the
engine stays on the XLA variant; `JAXVLLM_NATIVE_CPU=0` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.variants import Case, register_variant

SOURCE = Path(__file__).with_name("cpu_paged_attention.cc")
TARGET = "jaxvllm_paged_attention_cpu"
SYMBOL = "JaxvllmPagedAttentionCpu"
# -ffast-math lets exp and tanh vectorize (glibc's vector math); the kernel keeps no
# infinities of its own for it to break. Only for compiling: linked with it, GCC < 13 adds
# a constructor that sets flush-to-zero for the whole process that loads the library.
CXX_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-std=c++17", "-fPIC",
             "-w")
DTYPES = ("float32", "bfloat16", "float16")

_lock = threading.Lock()
_loaded: dict[str, object] = {}


def compiler() -> Optional[list[str]]:
    """The C++ compiler command: `CXX` (which may carry arguments, e.g. "ccache g++"), else
    the first of g++, c++, clang++ on the PATH."""
    named = shlex.split(os.environ.get("CXX", ""))
    if named:
        return named
    path = next((p for name in ("g++", "c++", "clang++") if (p := shutil.which(name))), None)
    return [path] if path else None


def _compiler_version(cxx: list[str]) -> str:
    try:
        return subprocess.run([*cxx, "--version"], capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's feature flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path(cxx: list[str]) -> Path:
    from jaxvllm.cache import cache_dir

    import jaxlib

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CXX_FLAGS).encode(), " ".join(cxx).encode(),
                 _compiler_version(cxx).encode(), jaxlib.__version__.encode(),
                 platform.machine().encode(), _cpu_signature().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / "native" / f"cpu_paged_attention-{key.hexdigest()[:16]}.so"


def build(cxx: list[str], path: Path) -> Path:
    """Compile the kernel to `path` (atomically: a concurrent build never sees half a file).
    A failure is written beside it (`.failed`), so that later processes do not try again
    until the source, flags, compiler, jaxlib or CPU change."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    obj = partial.with_suffix(".o")
    steps = [[*cxx, *CXX_FLAGS, "-I", jax.ffi.include_dir(), "-c", str(SOURCE), "-o", str(obj)],
             [*cxx, "-shared", str(obj), "-o", str(partial)]]
    try:
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                error = f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}"
                _failure_note(path).write_text(error)
                raise RuntimeError(error)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        obj.unlink(missing_ok=True)
    return path


def _failure_note(path: Path) -> Path:
    return path.with_suffix(".failed")


def _load() -> Optional[str]:
    if os.environ.get("JAXVLLM_NATIVE_CPU", "1") == "0":
        return "turned off (JAXVLLM_NATIVE_CPU=0)"
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler found (set CXX)"
    try:
        path = library_path(cxx)
        failed = _failure_note(path)
        if failed.exists():
            return (f"could not be built (an earlier try, {failed}; delete it to try "
                    f"again): {failed.read_text()[-500:]}")
        if not path.exists():
            build(cxx, path)
        library = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(library, SYMBOL)),
                                    platform="cpu")
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        return f"could not be built or loaded: {e}"
    _loaded["library"] = library  # keeps the handler's code mapped
    return None


def unavailable_reason() -> Optional[str]:
    """None once the kernel is built (or found built), loaded and registered with XLA;
    otherwise why it cannot run here. Builds at most once per process."""
    with _lock:
        if "reason" not in _loaded:
            _loaded["reason"] = _load()
        return _loaded["reason"]


def native_cpu_attention(q, k_cache, v_cache, layer, query_start_loc, seq_lens, block_tables,
                         *, scale: float, sliding_window: Optional[int] = None,
                         soft_cap: Optional[float] = None) -> jax.Array:
    """The contract of `ragged_paged_attention_reference`, on the CPU, in native code."""
    reason = unavailable_reason()
    if reason is not None:
        raise ValueError(f"the native CPU attention kernel is not available: {reason}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window}: must be >= 1 (or None)")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    i32 = lambda a: jnp.asarray(a, jnp.int32)
    out = call(q.astype(jnp.float32), k_cache, v_cache, i32(layer).reshape(()),
               i32(query_start_loc), i32(seq_lens), i32(block_tables),
               scale=np.float32(scale), sliding_window=np.int64(sliding_window or 0),
               soft_cap=np.float32(soft_cap or 0.0))
    return out.astype(q.dtype)


def _supports(case: Case) -> Optional[str]:
    if case.dtype not in DTYPES:
        return f"dtype {case.dtype} (runs {', '.join(DTYPES)})"
    if jax.default_backend() != "cpu":
        return "runs where the CPU is JAX's backend"
    return unavailable_reason()


register_variant(
    "native_cpu", native_cpu_attention, lowering="cpu", supports=_supports,
    description="native CPU code through XLA's FFI: blocks read in place via the block table")
