"""Tensor parallelism on JAX's SPMD machinery: the device mesh, where every parameter and the
KV cache live on it, and the checks that make an impossible layout a clear error.

One mesh axis, `"tp"`, over `tensor_parallel_size` devices. Layouts (Megatron-style, as vLLM):

    embed [V, E], lm_head [E, V]          sharded over the vocabulary
    q/k/v_proj [L, d, heads * D]          column parallel (by head), their biases alike
    o_proj [L, heads * D, d]              row parallel: partial sums, one all-reduce
    gate/up_proj [L, d, I]                column parallel, their biases alike
    down_proj [L, I, d]                   row parallel: one all-reduce
    norms, o/down biases, positions,      replicated
    OPT's project_in/out, q/k norms
    KV cache [L, N, B, KVH, D]            sharded by KV head

Where a model has fewer KV heads than devices (`tp % kv_heads == 0`), each KV head is
replicated over `tp / kv_heads` devices as vLLM does: the k/v projections are widened on the
host to `tp` heads (head `j` repeated) and the model runs with `num_kv_heads = tp`, so that
every device holds exactly the one KV head its query heads read. Query head `h` reads
widened head `h // (H / tp)`, which is original head `h // (H / kv_heads)`: the same math.

Everything else in a step (norms, residuals, rotary, the sampler on the gathered logits) is
left to XLA's SPMD partitioner, which inserts the collectives. `active_mesh()` tells traced
code (the attention glue, the step function) whether it runs under a mesh; with
tensor_parallel_size 1 there is no mesh and no sharding code runs at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "tp"

# Per-layer parameters ([L, ...] stacks): which axis (of the stacked array) is split over tp.
_LAYER_SPLIT_AXIS = {
    "q_proj": 2, "k_proj": 2, "v_proj": 2, "q_bias": 1, "k_bias": 1, "v_bias": 1,
    "o_proj": 1,
    "gate_proj": 2, "up_proj": 2, "gate_bias": 1, "up_bias": 1,
    "down_proj": 1,
}
# Parameters outside the layer stack.
_TOP_SPLIT_AXIS = {"embed": 0, "lm_head": 1}


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_device_count(tensor_parallel_size: int, num_devices: Optional[int] = None) -> None:
    """ValueError unless 1 <= tensor_parallel_size <= the devices JAX sees."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size}: must be >= 1")
    n = len(jax.devices()) if num_devices is None else num_devices
    if tensor_parallel_size > n:
        platform = jax.default_backend()
        hint = (" (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before "
                "jax is imported to get N devices)" if platform == "cpu" else "")
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} exceeds the {n} "
                         f"available {platform} device(s){hint}")


def check_model_divisible(cfg, tensor_parallel_size: int) -> None:
    """ValueError naming the first dimension of `cfg` that cannot be split `tp` ways."""
    tp = tensor_parallel_size
    if tp == 1:
        return
    where = f"tensor_parallel_size={tp} does not fit {cfg.architecture}"
    if cfg.num_heads % tp:
        raise ValueError(f"{where}: its {cfg.num_heads} attention heads are not divisible by "
                         f"{tp}; choose a tensor_parallel_size that divides {cfg.num_heads}")
    kvh = cfg.num_kv_heads
    if kvh >= tp and kvh % tp:
        raise ValueError(f"{where}: its {kvh} KV heads are not divisible by {tp}")
    if kvh < tp and tp % kvh:
        raise ValueError(f"{where}: with fewer KV heads ({kvh}) than devices, each KV head is "
                         f"replicated, which needs tensor_parallel_size to be a multiple of "
                         f"{kvh}")
    if cfg.intermediate_size % tp:
        raise ValueError(f"{where}: its MLP width (intermediate_size {cfg.intermediate_size}) "
                         f"is not divisible by {tp}")
    if cfg.vocab_size % tp:
        raise ValueError(f"{where}: its vocabulary ({cfg.vocab_size} tokens) is not divisible "
                         f"by {tp}, which the vocabulary-sharded embedding and LM head need")


def check_processes(tensor_parallel_size: int) -> None:
    """With several JAX processes the mesh spans every device of every process, and every
    process must bring the same number of devices."""
    if jax.process_count() == 1:
        return
    counts = {}
    for d in jax.devices():
        counts[d.process_index] = counts.get(d.process_index, 0) + 1
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"process {p}: {n}" for p, n in sorted(counts.items()))
        raise ValueError(f"the {jax.process_count()} processes hold different numbers of "
                         f"devices ({listed}); give every process the same number")
    if tensor_parallel_size != jax.device_count():
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size}, but the {jax.process_count()} "
            f"processes hold {jax.device_count()} devices in all; across processes the model "
            f"is sharded over every device: use tensor_parallel_size={jax.device_count()}")


# ---------------------------------------------------------------------------------------------
# The mesh and the model's layout on it
# ---------------------------------------------------------------------------------------------


def make_mesh(tensor_parallel_size: int, devices: Optional[Sequence] = None) -> Mesh:
    """A one-axis ("tp") mesh over the first `tensor_parallel_size` devices."""
    check_device_count(tensor_parallel_size, None if devices is None else len(devices))
    check_processes(tensor_parallel_size)
    devices = list(jax.devices() if devices is None else devices)[:tensor_parallel_size]
    grid = np.asarray(devices, dtype=object)
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:
        try:  # jax >= 0.5: say Auto explicitly (jax.make_mesh's default became Explicit)
            return Mesh(grid, (AXIS,), axis_types=(axis_type.Auto,))
        except TypeError:
            pass
    return Mesh(grid, (AXIS,))


def tp_size(mesh: Optional[Mesh]) -> int:
    return 1 if mesh is None else mesh.shape[AXIS]


def tp_model_config(cfg, tensor_parallel_size: int):
    """The config the model runs with under `tp` devices: KV heads widened to `tp` when
    there are fewer (each replicated), everything else unchanged."""
    check_model_divisible(cfg, tensor_parallel_size)
    if cfg.num_kv_heads < tensor_parallel_size:
        return dataclasses.replace(cfg, num_kv_heads=tensor_parallel_size)
    return cfg


def widen_kv_heads(params: dict[str, Any], cfg, tensor_parallel_size: int) -> dict[str, Any]:
    """Host params with k/v projections (and biases) repeated to `tp` KV heads where the
    model has fewer; `params` itself is not modified."""
    repeat = tensor_parallel_size // cfg.num_kv_heads
    if repeat <= 1:
        return params
    layers = dict(params["layers"])
    for name in ("k_proj", "v_proj", "k_bias", "v_bias"):
        if name in layers:
            a = np.asarray(layers[name])
            heads = a.reshape(*a.shape[:-1], cfg.num_kv_heads, cfg.head_dim)
            layers[name] = np.repeat(heads, repeat, axis=-2).reshape(*a.shape[:-1], -1)
    return {**params, "layers": layers}


def _spec(ndim: int, axis: Optional[int]) -> P:
    parts = [None] * ndim
    if axis is not None:
        parts[axis] = AXIS
    return P(*parts)


def param_partition_specs(params: dict[str, Any]) -> dict[str, Any]:
    """A PartitionSpec for every leaf of the model's pure-dict state (same structure)."""
    specs: dict[str, Any] = {}
    for name, value in params.items():
        if name == "layers":
            specs[name] = {n: _spec(len(a.shape), _LAYER_SPLIT_AXIS.get(n))
                           for n, a in value.items()}
        else:
            specs[name] = _spec(len(value.shape), _TOP_SPLIT_AXIS.get(name))
    return specs


def kv_cache_spec() -> P:
    """[L, N, B, KVH, D]: sharded by KV head."""
    return P(None, None, None, AXIS, None)


def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, kv_cache_spec())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(host_array, sharding: NamedSharding, dtype=None) -> jax.Array:
    """A host (numpy) array placed shard by shard: each device receives only its slice, so
    no device ever holds the full array first. Works across processes, each process placing
    its own devices' slices from its own copy of the host array."""
    a = np.asarray(host_array)
    if dtype is not None and a.dtype != np.dtype(dtype):
        a = a.astype(np.dtype(dtype))
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def replicate(host_tree, mesh: Mesh):
    """A pytree of host arrays copied onto every device of `mesh` (one batched transfer in
    a single process; per device from each process's own copy across processes)."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(host_tree, sharding)
    return jax.tree.map(lambda a: put(a, sharding), host_tree)


def shard_params(params: dict[str, Any], mesh: Mesh, dtype) -> dict[str, Any]:
    """Host pure-dict params -> the same dict of jax Arrays sharded over `mesh`."""
    specs = param_partition_specs(params)
    return jax.tree.map(lambda a, s: put(a, NamedSharding(mesh, s), dtype), params, specs,
                        is_leaf=lambda x: isinstance(x, P))


def allocate_kv_cache(cfg, num_blocks: int, block_size: int, dtype, mesh: Mesh):
    """The stacked KV cache created in place on its shards (each device zeroes only its KV
    heads; nothing is built whole first)."""
    import jax.numpy as jnp

    from jaxvllm.models.attention import KVCache

    shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    sharding = kv_cache_sharding(mesh)
    zeros = jax.jit(lambda: (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)),
                    out_shardings=(sharding, sharding))
    return KVCache(*zeros())


def kv_cache_bytes_per_block_per_device(cfg, block_size: int, dtype,
                                        tensor_parallel_size: int = 1) -> int:
    """KV bytes one block costs each device (widened KV heads counted as stored)."""
    run_cfg = tp_model_config(cfg, tensor_parallel_size)
    heads_per_device = run_cfg.num_kv_heads // tensor_parallel_size
    return (2 * cfg.num_layers * block_size * heads_per_device * cfg.head_dim
            * np.dtype(dtype).itemsize)


def bytes_per_device(tree) -> dict[str, int]:
    """Bytes of every jax Array in `tree` held by each of this process's devices."""
    totals: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            key = str(shard.device)
            totals[key] = totals.get(key, 0) + shard.data.nbytes
    return totals


# ---------------------------------------------------------------------------------------------
# Traced code under a mesh
# ---------------------------------------------------------------------------------------------

_local = threading.local()


@contextlib.contextmanager
def tracing_under(mesh: Optional[Mesh]):
    """Marks the code traced inside as running under `mesh` (None: no mesh, a no-op)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(mesh)
    try:
        yield
    finally:
        stack.pop()


def active_mesh() -> Optional[Mesh]:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def constrain(x: jax.Array, spec: P) -> jax.Array:
    """`with_sharding_constraint` under the active mesh; `x` unchanged without one."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def gather_logits(logits: jax.Array) -> jax.Array:
    """[N, V] logits computed vocabulary-sharded (against the sharded LM head / embedding),
    then gathered whole onto every device: an all-gather of the logits, never of the
    weights. Unchanged without a mesh."""
    return constrain(constrain(logits, P(None, AXIS)), P())


def shard_map(fn, mesh: Mesh, in_specs, out_specs):
    """`shard_map` without replication checks (Pallas calls inside cannot be checked), on
    jax versions that have it at `jax.shard_map` (check_vma) or only in
    `jax.experimental.shard_map` (check_rep)."""
    if hasattr(jax, "shard_map"):
        try:
            return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                 check_vma=False)
        except TypeError:
            pass
    from jax.experimental.shard_map import shard_map as legacy

    return legacy(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def fetch(tree):
    """Replicated step outputs -> numpy, also when the arrays span other processes'
    devices (every process then reads its own copy)."""
    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)

    return jax.tree.map(one, tree)
