"""EngineConfig: every engine knob in one frozen dataclass, with vLLM's names and defaults.

`LLM(**kwargs)` and `jaxvllm serve` flags land here; unknown names are an error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

# On CPU the KV cache is not sized from free memory (that would take most of the host's RAM):
# it holds max_num_seqs full-length requests, capped at this many bytes unless raised.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: Any = "auto"
    seed: int = 0
    max_model_len: Optional[int] = None
    block_size: int = 16
    max_num_seqs: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: Optional[int] = None
    cpu_kv_cache_bytes: int = DEFAULT_CPU_KV_CACHE_BYTES
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype), "bfloat16", "float16", "float32"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    tensor_parallel_size: int = 1
    scheduling_policy: str = "fcfs"
    attention_backend: Optional[str] = None
    served_model_name: Optional[str] = None
    # compile the decode-step programs in background threads at start-up (None: on a GPU,
    # for attention kernels that need no host plan, on one device)
    precompile: Optional[bool] = None
    # with precompile, let the engine's constructor return only once those programs are
    # compiled, as vLLM compiles before it serves (None: on a GPU, where a compilation beside
    # the steps slows them more than it takes: the compiler times kernels on the device)
    wait_for_precompile: Optional[bool] = None
    # run the decoder layers unrolled on per-layer, fused weights instead of a scan over the
    # stacked ones (None: on one device; see jaxvllm/models/transformer.py)
    unroll_layers: Optional[bool] = None
    # small decode steps' projections as Pallas kernels that take the RMSNorm before them and
    # the bias, SiLU(gate) * up and residual add after them (pallas_kernels/
    # small_batch_matmul.py); unrolled layers of RMSNorm (pre-norm) models only; on the CPU
    # they run interpreted (slowly: for tests). None: on a GPU, measured at start-up against
    # XLA's way for this model (jaxvllm/engine/autotune.py), on for the step sizes where
    # they were faster; off on the CPU
    small_batch_matmuls: Optional[bool] = None
    # sample with the Pallas kernels of pallas_kernels/sampling.py (one device) instead of
    # XLA's fusions. None: on a GPU, measured at start-up like small_batch_matmuls; off on
    # the CPU
    sampling_kernels: Optional[bool] = None
    # decode-only steps of up to 64 rows run each decoder layer as one Pallas kernel
    # (pallas_kernels/decode_layer.py: projections and attention as stages of one grid);
    # unrolled layers of RMSNorm models with a gated MLP and rotary embeddings, the Triton
    # attention backend, one device; interpreted on the CPU. None: off (not yet the default
    # anywhere: benchmarks/README.md says where it stands)
    decode_layer_kernel: Optional[bool] = None
    # schedule and dispatch the next step before the one in flight is collected (vLLM's
    # async scheduling; not with tensor parallelism). None: only a multi-step decode after
    # another (pipelined); False: never; True: every step where the batch allows it
    async_scheduling: Optional[bool] = None
    # decode steps one device call may run when every running request decodes and nothing
    # could join the batch (vLLM's multi-step scheduling; None: 8 on a GPU, 1 on the CPU,
    # whose steps outweigh the host's work)
    num_scheduler_steps: Optional[int] = None

    def __post_init__(self):
        def check(ok: bool, field: str, rule: str):
            if not ok:
                raise ValueError(f"{field}={getattr(self, field)!r}: {rule}")

        check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128, 256), "block_size",
              "must be a power of two up to 256")
        check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", "must be >= 1")
        check(self.max_num_seqs is None or self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
              "max_num_batched_tokens", "must be >= 1")
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 2,
              "num_gpu_blocks_override", "must be >= 2 (block 0 is reserved)")
        check(self.kv_cache_dtype in ("auto", "bfloat16", "float16", "float32"), "kv_cache_dtype",
              "must be 'auto', 'bfloat16', 'float16' or 'float32'")
        check(self.scheduling_policy in ("fcfs", "priority"), "scheduling_policy",
              "must be 'fcfs' or 'priority'")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        check(self.num_scheduler_steps is None or self.num_scheduler_steps >= 1,
              "num_scheduler_steps", "must be >= 1")
        if self.tensor_parallel_size > 1:
            from jaxvllm.parallel import check_device_count

            check_device_count(self.tensor_parallel_size)  # ValueError: more than available
        if self.attention_backend is not None:
            from jaxvllm.models.attention import resolve_attention_backend

            variant, _ = resolve_attention_backend(self.attention_backend)  # ValueError if unknown
            if variant == "native_cpu":
                from pallas_kernels.native_cpu import unavailable_reason

                reason = unavailable_reason()
                if reason is not None:
                    raise ValueError(f"attention_backend={self.attention_backend!r}: the native "
                                     f"CPU kernel is not available here: {reason}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unexpected engine argument(s): {', '.join(unknown)}; "
                            f"accepted: {', '.join(sorted(names))}")
        return cls(**kwargs)

    @property
    def on_cpu(self) -> bool:
        return jax.default_backend() == "cpu"

    def resolved_max_num_seqs(self) -> int:
        # CPU: 64 measured 1.3x the output tok/s of 16 on SmolLM2 (benchmarks/README.md)
        return self.max_num_seqs or (64 if self.on_cpu else 256)

    def resolved_max_num_batched_tokens(self, max_model_len: int) -> int:
        if self.max_num_batched_tokens:
            return self.max_num_batched_tokens
        return 256 if self.on_cpu else 8192

    def resolved_attention_backend(self) -> str:
        """Unless one was chosen: the Pallas kernels on GPU; on CPU the native kernel, or XLA
        block-pair attention where it cannot be built (pallas_kernels/native_cpu.py)."""
        if self.attention_backend:
            return self.attention_backend
        if not self.on_cpu:
            return "pallas"
        from pallas_kernels.native_cpu import unavailable_reason

        return "cpu" if unavailable_reason() is None else "xla"
