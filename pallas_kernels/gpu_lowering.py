"""Checking GPU kernels without a GPU: lower them for CUDA, and compile Triton ones to cubin.

`lower_for_gpu` traces a function and lowers it for the `cuda` platform under an abstract
H100 (no device needed): every `pallas_call` goes through its real GPU lowering, Pallas ->
Triton IR or Pallas -> Mosaic GPU dialect, so unsupported operations, non-power-of-two
Triton shapes and wgmma/TMA shape errors show up on a CPU machine. What it does not do is
XLA's GPU compilation.

`compile_triton` goes one step further for the Triton lowering: it captures the Triton IR
of each kernel while lowering and compiles it with the `triton` package (when installed; it
ships with torch) for sm_90, down to PTX and cubin with the bundled ptxas, reporting shared
memory and registers. jaxlib carries its own Triton version, so this is a strong check of
the kernel's shapes and resource use, not proof that XLA's Triton accepts the same IR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile

import jax

H100 = "NVIDIA H100 80GB HBM3"


@contextlib.contextmanager
def _abstract_gpu(device_kind: str):
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    device = AbstractDevice(device_kind=device_kind, num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def lower_for_gpu(fn, *args, device_kind: str = H100) -> str:
    """StableHLO text of `jax.jit(fn)` lowered for CUDA; args may be ShapeDtypeStructs."""
    with _abstract_gpu(device_kind):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def triton_modules(fn, *args, device_kind: str = H100) -> list[tuple[str, int, int]]:
    """(Triton IR text, num_warps, num_stages) of every Pallas Triton kernel in `fn`."""
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas.triton import core as triton_core
    from jax._src.pallas.triton import pallas_call_registration as registration

    captured: list[str] = []
    original = registration.lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = original(*a, **k)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    params: list[tuple[int, int]] = []
    original_rule = registration.pallas_call_lowering

    def rule(ctx, *in_nodes, compiler_params, **kw):
        params.append((compiler_params.num_warps or 4, compiler_params.num_stages or 3))
        return original_rule(ctx, *in_nodes, compiler_params=compiler_params, **kw)

    registration.lowering.lower_jaxpr_to_triton_module = capture
    pallas_core.register_lowering_rule(triton_core.CompilerParams, rule, "gpu")
    try:
        lower_for_gpu(fn, *args, device_kind=device_kind)
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = original
        pallas_core.register_lowering_rule(triton_core.CompilerParams, original_rule, "gpu")
    return [(ir, w, s) for ir, (w, s) in zip(captured, params)]


@dataclasses.dataclass
class TritonBuild:
    name: str
    shared_bytes: int
    registers: int
    spill_bytes: int
    num_warps: int
    num_stages: int


def compile_triton(fn, *args, arch: int = 90) -> list[TritonBuild]:
    """Compile every Triton kernel of `fn` to cubin for sm_`arch` with the triton package."""
    import triton
    from triton.backends.compiler import GPUTarget

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    builds = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (ir, warps, stages) in enumerate(triton_modules(fn, *args)):
            path = os.path.join(tmp, f"k{i}.ttir")
            with open(path, "w") as f:
                f.write(ir)
            kernel = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                                    options=dict(num_warps=warps, num_stages=stages))
            ptx = os.path.join(tmp, f"k{i}.ptx")
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            report = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", ptx, "-o", os.devnull],
                                    capture_output=True, text=True, check=True).stderr
            regs = re.search(r"Used (\d+) registers", report)
            spill = re.search(r"(\d+) bytes spill stores", report)
            name = re.search(r"tt\.func public @(\w+)", ir)
            builds.append(TritonBuild(name.group(1) if name else f"kernel{i}",
                                      kernel.metadata.shared, int(regs.group(1)) if regs else -1,
                                      int(spill.group(1)) if spill else 0, warps, stages))
    return builds
