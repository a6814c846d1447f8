"""Pallas attention kernels for jaxvllm, each with a pure-jnp reference beside it.

    ragged_paged_attention.py          the contract (shapes, padding) and the jnp reference
    ragged_tiles.py                    ragged query tokens -> fixed-size per-request tiles
    ragged_paged_attention_triton.py   the kernel, Pallas Triton lowering (Ampere, Hopper)
    ragged_paged_attention_mosaic.py   the kernel, Pallas Mosaic GPU lowering (Hopper)
    decode_attention_triton.py         decode-only steps: KV write and attention in one kernel
    block_pairs.py                     XLA attention as (query rows, KV block) work items
    native_cpu.py                      native CPU attention through XLA's FFI (the CPU default),
                                       built from cpu_paged_attention.cc on first use
    kv_write.py                        this step's K/V into the cache: XLA scatter or kernel
    validation.py                      host-side checks of block tables and lengths
    variants.py                        the registry every variant registers itself in
    gpu_lowering.py                    lowering for CUDA / compiling Triton, or whole
                                       programs with XLA, without a GPU

A new variant is a module here that calls `variants.register_variant`; the tests, the kernel
benchmark and the engine (`attention_backend="pallas:<name>"`) find it by name.
"""
