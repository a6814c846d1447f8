"""The plain-XLA baseline: a fixed batch decoded greedily by plain JAX, without paging.

What a straightforward JAX implementation of the same model does, on the engine's own
weights (loaded by jaxvllm's loader, so the two compare on identical numbers): each layer
keeps a contiguous KV cache `[batch, max_len, kv_heads, head_dim]`, written with
`dynamic_update_slice` and read whole under a causal mask; the layers are a Python loop (as
the engine's on a GPU); one jitted function serves the prefill (all prompt tokens) and, at
another shape, every decode step (its position traced), its caches donated. No scheduler,
no block tables, no bucketing: every row of the batch has the same prompt length.

`latency.py --compare-xla` runs it on the latency benchmark's batches and prints the
ratios; the decoder families it covers are those with rotary positions, RMS norms and a
gated MLP (Llama, Mistral, Qwen2, Qwen3).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvllm.models import layers as L
from jaxvllm.models.config import ModelConfig


def check_supported(cfg: ModelConfig) -> None:
    """ValueError unless the plain decoder below covers `cfg`'s family."""
    unsupported = {"learned positions": cfg.position != "rope", "layer norm": cfg.norm != "rms",
                   "post-norm": not cfg.pre_norm, "a plain MLP": cfg.mlp != "gated",
                   "input/output projections": cfg.has_projections,
                   "a sliding window": cfg.sliding_window is not None,
                   "MLP or output biases": cfg.mlp_bias or cfg.o_bias}
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise ValueError(f"the plain-XLA baseline covers rotary, RMS-norm, gated-MLP decoders "
                         f"(Llama, Mistral, Qwen2, Qwen3); {cfg.architecture} has "
                         + ", ".join(found))


def _attention(q, k_cache, v_cache, positions, scale):
    """q [B, N, H, D] at `positions` [N] over the caches [B, S, KVH, D], causal."""
    B, N, H, D = q.shape
    kvh = k_cache.shape[2]
    q = q.reshape(B, N, kvh, H // kvh, D).astype(jnp.float32)
    scores = jnp.einsum("bnkgd,bskd->bkgns", q, k_cache.astype(jnp.float32)) * scale
    visible = jnp.arange(k_cache.shape[1])[None, :] <= positions[:, None]  # [N, S]
    scores = jnp.where(visible, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgns,bskd->bnkgd", weights, v_cache.astype(jnp.float32))
    return out.reshape(B, N, H * D).astype(k_cache.dtype)


def _forward(cfg: ModelConfig, top, layers, caches, ids, start):
    """ids [B, N] at positions start.. -> (greedy next tokens [B, 1], the updated caches)."""
    B, N = ids.shape
    positions = start + jnp.arange(N, dtype=jnp.int32)
    inv_freq = jnp.asarray(L.rope_inv_freq(cfg), jnp.float32)
    x = top["embed"][ids]
    act = L.activation(cfg.activation)
    new_caches = []
    for p, (k_cache, v_cache) in zip(layers, caches):
        h = L.rms_norm(x, p["attn_norm_scale"], cfg.norm_eps)
        q, k, v = (h @ p[f"{n}_proj"] + (p[f"{n}_bias"] if cfg.qkv_bias else 0)
                   for n in ("q", "k", "v"))
        q = q.reshape(B, N, cfg.num_heads, cfg.head_dim)
        k = k.reshape(B, N, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(B, N, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = L.rms_norm(q, p["q_norm"], cfg.norm_eps), L.rms_norm(k, p["k_norm"], cfg.norm_eps)
        q, k = L.apply_rope(q, positions, inv_freq), L.apply_rope(k, positions, inv_freq)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, start, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, start, 0, 0))
        new_caches.append((k_cache, v_cache))
        x = x + _attention(q, k_cache, v_cache, positions, cfg.head_dim ** -0.5) @ p["o_proj"]
        h = L.rms_norm(x, p["mlp_norm_scale"], cfg.norm_eps)
        x = x + (act(h @ p["gate_proj"]) * (h @ p["up_proj"])) @ p["down_proj"]
    last = L.rms_norm(x[:, -1], top["final_norm_scale"], cfg.norm_eps)
    if cfg.tie_word_embeddings:  # contracted on the embedding's axis, as the engine does
        logits = jnp.einsum("be,ve->bv", last, top["embed"])
    else:
        logits = last @ top["lm_head"]
    logits = logits.astype(jnp.float32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None], new_caches


class PlainXLADecoder:
    """Greedy decoding of [B, P] prompts by `_forward`; see the module docstring."""

    def __init__(self, model, max_len: int):
        cfg = model.cfg
        check_supported(cfg)
        self.cfg, self.max_len, self.dtype = cfg, max_len, model.dtype
        stacked = model.layers.arrays()
        self.layers = [{name: a[i] for name, a in stacked.items()} for i in range(cfg.num_layers)]
        self.top = {name: getattr(model, name)[...] for name in ("embed", "final_norm_scale",
                                                                  "lm_head") if hasattr(model, name)}
        self._step = jax.jit(functools.partial(_forward, cfg), donate_argnums=(2,))

    def _caches(self, batch: int):
        shape = (batch, self.max_len, self.cfg.num_kv_heads, self.cfg.head_dim)
        return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
                for _ in range(self.cfg.num_layers)]

    def generate(self, prompts: list[list[int]], output_len: int) -> dict:
        """Greedy tokens [B, output_len] of prompts of one length, and the seconds to the
        first token and in all (the decode steps dispatched back to back, the tokens read
        once at the end)."""
        ids = np.asarray(prompts, np.int32)
        if ids.ndim != 2 or ids.shape[1] + output_len > self.max_len:
            raise ValueError(f"prompts must be of one length with length + output_len <= "
                             f"{self.max_len}")
        caches = self._caches(ids.shape[0])
        start = time.perf_counter()
        token, caches = self._step(self.top, self.layers, caches, jnp.asarray(ids),
                                   jnp.int32(0))
        token.block_until_ready()
        prefill_s = time.perf_counter() - start
        tokens = [token]
        for i in range(1, output_len):
            token, caches = self._step(self.top, self.layers, caches, token,
                                       jnp.int32(ids.shape[1] + i - 1))
            tokens.append(token)
        out = np.asarray(jnp.concatenate(tokens, axis=1))
        return {"tokens": out, "prefill_s": prefill_s, "seconds": time.perf_counter() - start}
