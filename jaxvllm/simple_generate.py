"""Greedy generation without a scheduler: a fixed batch of sequences, each owning a contiguous run of
KV blocks, prefilled in one ragged step and then decoded one token per sequence per step.

It exercises the same model forward, ragged metadata and paged cache as the engine, so it is
the oracle for the model parity tests and the engine's own tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvllm.engine.runner import bucket
from jaxvllm.models.attention import AttentionMetadata, allocate_kv_cache
from jaxvllm.models.transformer import CausalLM


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _forward(graphdef, state, kv, input_ids, positions, meta, logits_indices):
    model = nnx.merge(graphdef, state)
    hidden, kv = model(input_ids, positions, meta, kv)
    return model.compute_logits(hidden[logits_indices]), kv


class SimpleGenerator:
    """Batch generation over a `CausalLM` with a paged cache laid out one run per sequence."""

    def __init__(self, model: CausalLM, *, block_size: int = 16):
        self.model = model
        self.block_size = block_size
        self.graphdef, self.state = nnx.split(model)

    def _layout(self, lengths: list[int], max_len: int):
        bs = self.block_size
        per_seq = -(-max_len // bs)
        num_seqs = bucket(len(lengths), 1)
        block_tables = np.zeros((num_seqs, per_seq), np.int32)
        for i in range(len(lengths)):
            block_tables[i] = 1 + i * per_seq + np.arange(per_seq)  # block 0 is the null block
        kv = allocate_kv_cache(self.model.cfg, 1 + num_seqs * per_seq, bs, self.model.dtype)
        return block_tables, kv

    def _step(self, kv, block_tables, chunks: list[list[int]], starts: list[int], logits_at: str):
        """Run one ragged step: sequence i gets tokens `chunks[i]` at positions starts[i]...

        Returns logits for the last token of every chunk ("last") or every token ("all").
        """
        num_seqs = block_tables.shape[0]
        total = sum(len(c) for c in chunks)
        num_tokens = bucket(total, 8)
        ids = np.zeros(num_tokens, np.int32)
        pos = np.zeros(num_tokens, np.int32)
        slots = np.zeros(num_tokens, np.int32)  # padding writes into the null block
        qsl = np.full(num_seqs + 1, total, np.int32)
        seq_lens = np.zeros(num_seqs, np.int32)
        t = 0
        for i, (chunk, start) in enumerate(zip(chunks, starts)):
            qsl[i] = t
            n = len(chunk)
            p = start + np.arange(n)
            ids[t:t + n], pos[t:t + n] = chunk, p
            slots[t:t + n] = block_tables[i, p // self.block_size] * self.block_size + p % self.block_size
            seq_lens[i] = start + n
            t += n
        qsl[len(chunks):] = total
        if logits_at == "all":
            idx = np.arange(num_tokens, dtype=np.int32)
        else:
            idx = np.zeros(num_seqs, np.int32)
            idx[:len(chunks)] = qsl[1:len(chunks) + 1] - 1
        meta = AttentionMetadata(jnp.asarray(qsl), jnp.asarray(seq_lens), jnp.asarray(block_tables),
                                 jnp.asarray(slots))
        logits, kv = _forward(self.graphdef, self.state, kv, jnp.asarray(ids), jnp.asarray(pos),
                              meta, jnp.asarray(idx))
        return logits, kv

    def prompt_logits(self, prompt: list[int]) -> np.ndarray:
        """Logits [len(prompt), vocab] of one full-prompt forward through the paged cache."""
        block_tables, kv = self._layout([len(prompt)], len(prompt))
        logits, _ = self._step(kv, block_tables, [list(prompt)], [0], "all")
        return np.asarray(logits[:len(prompt)])

    def generate(self, prompts: list[list[int]], max_tokens: int = 16, *,
                 stop_token_ids: tuple[int, ...] = (), prefill_chunk: int | None = None) -> list[list[int]]:
        """Greedy token ids per prompt (stopping at a stop token, which is kept)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be non-empty lists of token ids")
        lengths = [len(p) for p in prompts]
        block_tables, kv = self._layout(lengths, max(lengths) + max_tokens)
        n = len(prompts)
        outputs: list[list[int]] = [[] for _ in prompts]
        done = [False] * n

        # prefill, optionally in chunks (a chunk attends to the cached KV of earlier chunks)
        chunk = prefill_chunk or max(lengths)
        last_logits = None
        for start in range(0, max(lengths), chunk):
            chunks = [list(p[start:start + chunk]) for p in prompts]
            logits, kv = self._step(kv, block_tables, chunks, [min(start, l) for l in lengths], "last")
            ends = jnp.asarray([i for i in range(n) if start < lengths[i] <= start + chunk], jnp.int32)
            last_logits = logits if last_logits is None else last_logits.at[ends].set(logits[ends])
        lens = list(lengths)
        for step in range(max_tokens):
            tokens = np.asarray(jnp.argmax(last_logits, axis=-1))
            for i in range(n):
                if not done[i]:
                    outputs[i].append(int(tokens[i]))
                    done[i] = int(tokens[i]) in stop_token_ids or len(outputs[i]) >= max_tokens
            if all(done) or step == max_tokens - 1:
                break
            chunks = [[outputs[i][-1]] for i in range(n)]
            last_logits, kv = self._step(kv, block_tables, chunks, lens, "last")
            lens = [l + 1 for l in lens]
        return outputs
