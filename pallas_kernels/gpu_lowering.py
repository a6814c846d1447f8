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

`compile_for_gpu` goes all the way: XLA's own GPU compiler, without a device, for a target
described by `GPU_TARGETS` (the CUDA plugin, `pip install "jax[cuda12]"`, must be installed;
run with `JAX_PLATFORMS=cpu`). Its optimized HLO says which kernels a step launches. It
does not autotune (there is no GPU to time on), so its GEMM configurations, and the
split-K reductions they bring, may differ from a real compile; the fusions of everything
else are XLA's real decisions.
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

# XLA's GpuTargetConfig text for deviceless compiles, from the device's published figures
GPU_TARGETS = {"h100": """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
runtime_version { major: 12 minor: 8 }
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""}


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
    ir: str = ""  # the Triton IR it was built from


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
                                      int(spill.group(1)) if spill else 0, warps, stages,
                                      ir))
    return builds


@contextlib.contextmanager
def _as_if_on_gpu(compute_capability: int):
    """Trace as on a GPU: kernels compiled, not interpreted (they ask `default_backend`), and
    Pallas Triton told the target's compute capability (it asks the attached device)."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    info = registration.gpu_info_lib
    original_info, original_backend = info.get_gpu_info, jax.default_backend
    target = dataclasses.make_dataclass("Target", [("compute_capability", int)])
    info.get_gpu_info = lambda *_, **__: target(compute_capability)
    jax.default_backend = lambda: "gpu"
    try:
        yield
    finally:
        info.get_gpu_info, jax.default_backend = original_info, original_backend


def compile_for_gpu(fn, *args, target: str = "h100", donate_argnums=(),
                    compiler_options=None) -> str:
    """The optimized HLO text of `jax.jit(fn)` compiled by XLA for `target` (a key of
    GPU_TARGETS) without a GPU. `args` are arrays or ShapeDtypeStructs (placed on the
    target). Needs the CUDA plugin; raises RuntimeError with what to install otherwise."""
    from jax.experimental import topologies

    config = GPU_TARGETS[target]
    try:
        topology = topologies.get_topology_desc(target, "cuda", target_config=config,
                                                topology="1x1x1")
    except Exception as e:  # noqa: BLE001 - the plugin missing shows in many ways
        raise RuntimeError(f"a deviceless GPU compile needs jax's CUDA plugin "
                           f"(pip install \"jax[cuda12]\"; no GPU needed): {e}") from e
    sharding = jax.sharding.SingleDeviceSharding(topology.devices[0])
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    capability = re.search(r"cuda_compute_capability \{\s*major: (\d+)(?:\s+minor: (\d+))?",
                           config)
    with _as_if_on_gpu(10 * int(capability.group(1)) + int(capability.group(2) or 0)):
        lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(
            *jax.tree.map(spec, args))
    return lowered.compile(compiler_options=compiler_options).as_text()
