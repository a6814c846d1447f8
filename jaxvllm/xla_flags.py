"""XLA flags jaxvllm sets by default, before the backend starts, unless the user set them.

XLA reads `XLA_FLAGS` once, when the first device is used, so `import jaxvllm` adds them to
the environment. A flag the user already gave (in `XLA_FLAGS`) is left as the user wrote it.

- `--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL`: a step may run its layers as one
  `lax.scan` (and `sample` without host-decided paths branches with `lax.cond`s); recording
  those loops and branches into CUDA graphs too (not only the straight runs of kernels,
  XLA's default) saves launching hundreds of small kernels one by one from the host. On an
  H200 this took a decode step of 256 requests at context 512 from 13.3 to 11.1 ms (batch 1:
  4.43 -> 4.33 ms; benchmarks/README.md), when the layers were a scan and the sampler still
  branched on the device. A branch XLA cannot record (one around a sort) still runs from
  the host, which then waits for its predicate: the engine's steps hold none. The CPU
  backend ignores it.

`step_compiler_options()` is for the engine's step programs only (passed to their
`compile`): XLA's rematerialization pass off. It counts the donated KV cache twice (as the
argument and as each layer's write) and, with the cache sized to most of a GPU's memory,
tries to get under the limit by computing matmuls twice (it cannot get there, and the step
is slower for it). The engine sizes the cache from a real step's peak memory instead.
"""

from __future__ import annotations

import os

DEFAULT_FLAGS = {"xla_gpu_enable_command_buffer": "+WHILE,+CONDITIONAL"}


def with_defaults(flags: str, defaults: dict[str, str] = DEFAULT_FLAGS) -> str:
    """`flags` (an XLA_FLAGS value) plus each default whose name it does not mention."""
    given = {part.lstrip("-").split("=", 1)[0] for part in flags.split()}
    extra = [f"--{name}={value}" for name, value in defaults.items() if name not in given]
    return " ".join([flags.strip(), *extra]).strip()


def step_compiler_options(flags: str | None = None) -> dict[str, str]:
    """Compile options of a step program: the passes `flags` (default: XLA_FLAGS) disables,
    plus rematerialization (an option given at compile time replaces the flag's value)."""
    flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
    passes = []
    for part in flags.split():
        name, _, value = part.lstrip("-").partition("=")
        if name == "xla_disable_hlo_passes":
            passes += [p for p in value.split(",") if p]
    return {"xla_disable_hlo_passes": ",".join(dict.fromkeys([*passes, "rematerialization"]))}


def apply_defaults() -> None:
    os.environ["XLA_FLAGS"] = with_defaults(os.environ.get("XLA_FLAGS", ""))
