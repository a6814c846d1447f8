"""One host-to-device copy per step: a step's numpy inputs packed into one byte buffer.

A compiled program called with twenty small numpy arrays copies each to the device on its
own (on a GPU, a transfer and its bookkeeping per array, every step). `pack` lays the arrays
end to end in one uint8 buffer and returns the `PackedLayout` (tree structure, dtypes,
shapes and byte offsets: static, part of what the program is compiled for); `unpack`, inside
the jitted step, slices the buffer and bitcasts each piece back.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ALIGN = 8  # each array starts at a multiple of this many bytes


class PackedLeaf(NamedTuple):
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]


class PackedLayout(NamedTuple):
    treedef: Any
    leaves: tuple[PackedLeaf, ...]
    num_bytes: int


def pack(tree) -> tuple[np.ndarray, PackedLayout]:
    """A pytree of numpy arrays (or scalars) -> (one uint8 buffer, its layout)."""
    leaves_in, treedef = jax.tree.flatten(tree)
    arrays = []
    for a in leaves_in:
        a = np.asarray(a)
        # 64-bit arrays become 32-bit ones, as jax makes them without x64
        arrays.append(a.astype(jax.dtypes.canonicalize_dtype(a.dtype), copy=False))
    leaves, offset = [], 0
    for a in arrays:
        leaves.append(PackedLeaf(offset, a.dtype, a.shape))
        offset += -(-a.nbytes // ALIGN) * ALIGN
    buffer = np.zeros(max(offset, ALIGN), np.uint8)
    for a, leaf in zip(arrays, leaves):
        buffer[leaf.offset:leaf.offset + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(
            np.uint8)
    return buffer, PackedLayout(treedef, tuple(leaves), buffer.size)


def unpack(buffer: jax.Array, layout: PackedLayout):
    """The pytree `pack` packed, from its buffer (traceable; `layout` is static)."""
    return jax.tree.unflatten(layout.treedef, [_leaf(buffer, leaf) for leaf in layout.leaves])


def _leaf(buffer: jax.Array, leaf: PackedLeaf) -> jax.Array:
    dtype = leaf.dtype
    size = int(np.prod(leaf.shape, dtype=np.int64))
    if size == 0:
        return jnp.zeros(leaf.shape, dtype)
    raw = jax.lax.slice(buffer, (leaf.offset,), (leaf.offset + size * dtype.itemsize,))
    if dtype == np.bool_:
        return (raw != 0).reshape(leaf.shape)
    if dtype.itemsize > 1:
        raw = raw.reshape(size, dtype.itemsize)
    return jax.lax.bitcast_convert_type(raw, dtype).reshape(leaf.shape)
