"""jaxvllm's on-disk caches (`JAXVLLM_CACHE_DIR`, default ~/.cache/jaxvllm): converted GGUF
tokenizers and JAX's persistent compilation cache, which is on by default so that a second
start reuses the compiled step programs instead of compiling them again."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("JAXVLLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxvllm")
    return Path(root)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at `path` (default: cache_dir()/xla).

    Set JAXVLLM_COMPILATION_CACHE=0 to leave JAX's own setting alone.
    """
    if os.environ.get("JAXVLLM_COMPILATION_CACHE", "1") == "0":
        return None
    import jax

    target = Path(path) if path is not None else cache_dir() / "xla"
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(target))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return target
