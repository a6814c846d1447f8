"""The variant registry: every ragged paged attention implementation, by name.

A variant is a function with the signature of `ragged_paged_attention_reference`

    fn(q, k_cache, v_cache, layer, query_start_loc, seq_lens, block_tables, *,
       scale, sliding_window=None, soft_cap=None) -> [T, H, D]

registered with `register_variant(name, fn, lowering=..., description=...)` at the bottom of
its module in `pallas_kernels/`. Every module of the package is imported the first time the
registry is read, so a new file that registers itself is picked up by
`tests/test_kernels.py` (correctness against the reference in interpret mode), by
`benchmarks/kernels.py` (speed against every other variant and jax's own ops) and by the
engine (`LLM(..., attention_backend="pallas:<name>")`) without editing any of them.

A variant that cannot run a configuration (a head_dim it does not tile, a dtype) says so
through `supports`, which returns None or the reason; tests skip such cases with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import pkgutil
from typing import Callable, Optional

from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

LOWERINGS = ("xla", "cpu", "triton", "mosaic_gpu")  # cpu: native code through XLA's FFI
PALLAS_LOWERINGS = ("triton", "mosaic_gpu")


@dataclasses.dataclass(frozen=True)
class Case:
    """What a variant may need to know to say whether it supports a call."""

    dtype: str  # "float32", "bfloat16", "float16"
    head_dim: int
    num_heads: int
    num_kv_heads: int
    block_size: int
    sliding_window: Optional[int] = None
    soft_cap: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class StepPlanner:
    """How the engine builds a variant's plan on the host, with numpy, once per step.

    sizes(query_start_loc, seq_lens, block_size) -> the step's own plan sizes (ints)
    fits(sizes, compiled_sizes) -> whether a program compiled for `compiled_sizes` should
        run a step of `sizes` (padded) rather than compile one of its own
    compile_sizes(sizes) -> the sizes to compile when none fits (rounded up, with room for
        the steps that follow; they join the program's shape key)
    build(query_start_loc, seq_lens, block_tables, num_tokens, block_size, sizes) -> the
        plan (a pytree of arrays) at `sizes`, which may exceed the step's own sizes
    """

    sizes: Callable
    fits: Callable
    compile_sizes: Callable
    build: Callable


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    fn: Callable
    lowering: str  # one of LOWERINGS
    description: str
    # None: runs anything the contract allows; else returns None or why it cannot run a Case
    supports: Optional[Callable[[Case], Optional[str]]] = None
    # True once the variant has matched the reference on a GPU (recorded in benchmarks/README.md)
    gpu_verified: bool = False
    # A variant that takes a host-built `plan=` keyword (and then no block table) says how
    # to build it: see `StepPlanner`
    plan: Optional["StepPlanner"] = None
    # For steps of one new token per request: the KV write and the attention in one call,
    # `decode(qkv, k_cache, v_cache, layer, seq_lens, block_tables, slot_mapping, *, scale,
    # sliding_window, soft_cap, num_kv_heads[, counters]) -> (out, k_cache, v_cache[,
    # counters])` (the contract of decode_attention_triton.py); None: such steps write,
    # then attend
    decode: Optional[Callable] = None

    @property
    def is_pallas(self) -> bool:
        """A Pallas kernel (takes `interpret=`; lowers for a GPU)."""
        return self.lowering in PALLAS_LOWERINGS

    def unsupported_reason(self, case: Case) -> Optional[str]:
        return None if self.supports is None else self.supports(case)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


_REGISTRY: dict[str, Variant] = {}
_LOADED = False


def register_variant(name: str, fn: Callable, *, lowering: str, description: str,
                     supports: Optional[Callable[[Case], Optional[str]]] = None,
                     gpu_verified: bool = False, plan: Optional["StepPlanner"] = None,
                     decode: Optional[Callable] = None) -> Variant:
    if lowering not in LOWERINGS:
        raise ValueError(f"variant {name!r}: lowering {lowering!r} is not one of {LOWERINGS}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing.fn is not fn:
        raise ValueError(f"a variant named {name!r} is already registered ({existing.description})")
    variant = Variant(name, fn, lowering, description, supports, gpu_verified, plan, decode)
    _REGISTRY[name] = variant
    return variant


def _load_all() -> None:
    """Import every module of pallas_kernels once, so that each registers its variants."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import pallas_kernels

    for info in pkgutil.iter_modules(pallas_kernels.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"pallas_kernels.{info.name}")


def variants() -> dict[str, Variant]:
    """All registered variants by name (the reference first)."""
    _load_all()
    return dict(_REGISTRY)


@contextlib.contextmanager
def overridden_variant(name: str, **fields):
    """Within the block, variant `name` has `fields` replaced (e.g. `decode=None`): for
    benchmarks that compare a variant with and without one of its parts in one run."""
    original = get_variant(name)
    _REGISTRY[name] = dataclasses.replace(original, **fields)
    try:
        yield _REGISTRY[name]
    finally:
        _REGISTRY[name] = original


def get_variant(name: str) -> Variant:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"no attention variant named {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


register_variant(
    "reference", ragged_paged_attention_reference, lowering="xla",
    description="plain jnp: each token gathers its request's keys (the tests' oracle)")
