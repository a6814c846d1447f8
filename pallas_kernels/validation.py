"""Host-side checks of one step's attention inputs.

The kernels trust their inputs: on a GPU an out-of-range block id or a negative length reads
another request's memory (or garbage), and in interpret mode an out-of-range index is
silently clamped, so a wrong table can even pass a CPU test. `validate_attention_inputs`
checks on the host, with numpy, everything the kernels assume, and raises ValueError naming
the first request that breaks a rule. Call it on concrete arrays (before the jitted step);
`maybe_validate` does so only when the arrays are concrete, so it is free under `jax.jit`.
"""

from __future__ import annotations

import jax
import numpy as np


def validate_attention_inputs(query_start_loc, seq_lens, block_tables, *, num_tokens: int,
                              num_blocks: int, block_size: int, slot_mapping=None) -> None:
    """Raise ValueError unless the step's metadata is well formed:

    - shapes: `query_start_loc [R+1]`, `seq_lens [R]`, `block_tables [R, MB]`, integers;
    - `query_start_loc` starts at 0, never decreases and ends at or before `num_tokens`;
    - `0 <= q_len <= seq_len` per request;
    - the table is wide enough: `seq_len <= MB * block_size`;
    - every block a request uses (`cdiv(seq_len, block_size)` entries) is in `[0, num_blocks)`;
    - `slot_mapping [num_tokens]`, if given, within `[0, num_blocks * block_size)`.
    """
    qsl = np.asarray(query_start_loc)
    lens = np.asarray(seq_lens)
    tables = np.asarray(block_tables)
    for name, a in (("query_start_loc", qsl), ("seq_lens", lens), ("block_tables", tables)):
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must be integers, got {a.dtype}")
    num_reqs = lens.shape[0] if lens.ndim == 1 else -1
    if lens.ndim != 1 or qsl.shape != (num_reqs + 1,) or tables.ndim != 2 \
            or tables.shape[0] != num_reqs:
        raise ValueError(f"shapes disagree: query_start_loc {qsl.shape} must be [R+1], seq_lens "
                         f"{lens.shape} [R], block_tables {tables.shape} [R, max_blocks]")
    if qsl[0] != 0:
        raise ValueError(f"query_start_loc[0] = {qsl[0]}, must be 0")
    q_lens = np.diff(qsl)
    if (q_lens < 0).any():
        r = int(np.argmax(q_lens < 0))
        raise ValueError(f"query_start_loc decreases at request {r}: {qsl[r]} -> {qsl[r + 1]}")
    if qsl[-1] > num_tokens:
        raise ValueError(f"query_start_loc[R] = {qsl[-1]} exceeds the {num_tokens} query tokens")
    bad = (lens < q_lens) | (lens < 0)
    if bad.any():
        r = int(np.argmax(bad))
        raise ValueError(f"request {r}: seq_len {lens[r]} < q_len {q_lens[r]} (seq_len counts "
                         f"the cached tokens plus this step's)")
    width = tables.shape[1] * block_size
    if (lens > width).any():
        r = int(np.argmax(lens > width))
        raise ValueError(f"request {r}: seq_len {lens[r]} needs more than the block table's "
                         f"{tables.shape[1]} blocks of {block_size}")
    used = np.arange(tables.shape[1])[None, :] < -(-lens[:, None] // block_size)
    bad = used & ((tables < 0) | (tables >= num_blocks))
    if bad.any():
        r, j = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"request {r}: block_tables[{r}, {j}] = {tables[r, j]} is not a block "
                         f"id in [0, {num_blocks})")
    if slot_mapping is not None:
        slots = np.asarray(slot_mapping)
        if slots.shape != (num_tokens,):
            raise ValueError(f"slot_mapping {slots.shape} must be [{num_tokens}]")
        bad = (slots < 0) | (slots >= num_blocks * block_size)
        if bad.any():
            t = int(np.argmax(bad))
            raise ValueError(f"slot_mapping[{t}] = {slots[t]} is outside the cache's "
                             f"{num_blocks * block_size} slots")


def is_concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def maybe_validate(q, k_cache, query_start_loc, seq_lens, block_tables) -> None:
    """`validate_attention_inputs` when called outside a trace (eager calls, tests)."""
    if is_concrete(query_start_loc, seq_lens, block_tables):
        validate_attention_inputs(query_start_loc, seq_lens, block_tables,
                                  num_tokens=q.shape[0], num_blocks=k_cache.shape[1],
                                  block_size=k_cache.shape[2])
