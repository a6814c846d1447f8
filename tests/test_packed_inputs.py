"""Packed step inputs: every leaf comes back from the one buffer with its dtype, shape and
values, inside a jitted function."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxvllm.engine.packed_inputs import ALIGN, pack, unpack


def test_pack_round_trip_in_a_jitted_function():
    tree = {"ids": np.arange(5, dtype=np.int32) - 2,
            "flags": (np.array([True, False, True]), np.float32([1.5, -2.25])),
            "seeds": np.uint32([2**32 - 1, 7]),
            "empty": np.zeros((0, 3), np.int32),
            "wide": np.int64([-3, 2**31 - 1]),  # canonicalized to int32, as jax does
            "bytes": np.int8([-1, 5]).reshape(1, 2),
            "scalar": np.float32(0.25),  # 0-d stays 0-d
            "bf16": np.array([1.5, -0.125], ml_dtypes.bfloat16),
            "none": None}
    buffer, layout = pack(tree)
    assert buffer.dtype == np.uint8 and buffer.size == layout.num_bytes
    assert all(leaf.offset % ALIGN == 0 for leaf in layout.leaves)
    out = jax.jit(lambda b: unpack(b, layout))(buffer)
    assert out["none"] is None
    for path, want in jax.tree_util.tree_leaves_with_path(tree):
        got = out
        for key in path:
            got = got[key.key if hasattr(key, "key") else key.idx]
        want = np.asarray(want)
        want_dtype = jax.dtypes.canonicalize_dtype(want.dtype)
        assert got.dtype == want_dtype and got.shape == want.shape, path
        np.testing.assert_array_equal(np.asarray(got), want.astype(want_dtype), err_msg=str(path))


def test_same_shapes_give_the_same_layout():
    a = {"x": np.zeros(4, np.int32), "y": np.ones((2, 2), np.float32)}
    b = {"x": np.arange(4, dtype=np.int32), "y": np.full((2, 2), 3, np.float32)}
    assert pack(a)[1] == pack(b)[1]
    c = {"x": np.zeros(5, np.int32), "y": np.ones((2, 2), np.float32)}
    assert pack(a)[1] != pack(c)[1]
    assert jnp.asarray(pack(a)[0]).dtype == jnp.uint8
