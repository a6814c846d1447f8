"""CausalLM: one Flax NNX decoder for every supported family, layers run as a `lax.scan`.

Llama, Mistral, Qwen2, Qwen3 and OPT differ only in switches of `ModelConfig` (norm kind,
biases, q/k norm, rotary vs learned positions, gated vs plain MLP, pre- vs post-norm), so one
wiring serves all of them; the family modules only translate configs and weight names.

Per-layer parameters are stacked on a leading `[L]` axis and the KV cache is stacked the
same way and threaded through the scan's carry: each layer scatters its new k/v at
`[l, block, offset]` and gathers at `[l, block_table]`, so a step never copies the cache.
Weights are stored `[in, out]` (HF Linear transposed) so that `x @ w` needs no transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvllm.models import layers as L
from jaxvllm.models.attention import AttentionMetadata, KVCache, paged_attention, write_kv
from jaxvllm.models.config import ModelConfig


def layer_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's parameters (stacked to [L, ...] in the module)."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {"attn_norm_scale": (d,),
              "q_proj": (d, cfg.q_size), "k_proj": (d, cfg.kv_size), "v_proj": (d, cfg.kv_size),
              "o_proj": (cfg.q_size, d),
              "mlp_norm_scale": (d,),
              "up_proj": (d, i), "down_proj": (i, d)}
    if cfg.norm == "layer":
        shapes |= {"attn_norm_bias": (d,), "mlp_norm_bias": (d,)}
    if cfg.qkv_bias:
        shapes |= {"q_bias": (cfg.q_size,), "k_bias": (cfg.kv_size,), "v_bias": (cfg.kv_size,)}
    if cfg.o_bias:
        shapes["o_bias"] = (d,)
    if cfg.qk_norm:
        shapes |= {"q_norm": (cfg.head_dim,), "k_norm": (cfg.head_dim,)}
    if cfg.mlp == "gated":
        shapes["gate_proj"] = (d, i)
    if cfg.mlp_bias:
        shapes |= {"up_bias": (i,), "down_bias": (d,)}
        if cfg.mlp == "gated":
            shapes["gate_bias"] = (i,)
    return shapes


def top_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters outside the layer stack."""
    d, e = cfg.hidden_size, cfg.word_embed_dim
    shapes = {"embed": (cfg.vocab_size, e)}
    if cfg.position == "learned":
        shapes["pos_embed"] = (cfg.max_position_embeddings + cfg.position_offset, d)
    if cfg.has_projections:
        shapes |= {"project_in": (e, d), "project_out": (d, e)}
    if cfg.final_norm:
        shapes["final_norm_scale"] = (d,)
        if cfg.norm == "layer":
            shapes["final_norm_bias"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (e, cfg.vocab_size)
    return shapes


def _init(name: str, shape, key, dtype):
    if name.endswith("_scale") or name in ("q_norm", "k_norm"):
        return jnp.ones(shape, dtype)
    if name.endswith("_bias"):
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class LayerStack(nnx.Module):
    """All decoder layers' parameters, each stacked on a leading [num_layers] axis."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        for name, shape in layer_param_shapes(cfg).items():
            setattr(self, name, nnx.Param(_init(name, (cfg.num_layers, *shape), rngs.params(), dtype)))
        self.names = tuple(layer_param_shapes(cfg))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}


class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_backend: str = "reference"):
        self.cfg = cfg
        self.dtype = dtype
        self.attention_backend = attention_backend
        for name, shape in top_param_shapes(cfg).items():
            setattr(self, name, nnx.Param(_init(name, shape, rngs.params(), dtype)))
        self.layers = LayerStack(cfg, dtype, rngs)

    def __call__(self, input_ids: jax.Array, positions: jax.Array, meta: AttentionMetadata,
                 kv: KVCache) -> tuple[jax.Array, KVCache]:
        """input_ids, positions: [T]. Returns the final hidden states [T, E] and the new cache."""
        cfg = self.cfg
        x = self.embed[...][input_ids].astype(self.dtype)
        if cfg.has_projections:
            x = x @ self.project_in[...]
        if cfg.position == "learned":
            x = x + self.pos_embed[...][positions + cfg.position_offset]
        inv_freq = jnp.asarray(L.rope_inv_freq(cfg), jnp.float32) if cfg.position == "rope" else None

        def one_layer(carry, xs):
            x, kv = carry
            p, layer = xs
            x, kv = self._layer(p, layer, x, positions, inv_freq, meta, kv)
            return (x, kv), None

        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, kv), _ = jax.lax.scan(one_layer, (x, kv), (self.layers.arrays(), layer_ids))

        if cfg.final_norm:
            x = self._norm(x, self.final_norm_scale[...],
                           self.final_norm_bias[...] if cfg.norm == "layer" else None)
        if cfg.has_projections:
            x = x @ self.project_out[...]
        return x, kv

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """[N, E] hidden states -> [N, vocab] float32 logits."""
        if self.cfg.tie_word_embeddings:
            logits = hidden @ self.embed[...].T
        else:
            logits = hidden @ self.lm_head[...]
        return logits.astype(jnp.float32)

    def _norm(self, x, scale, bias):
        if self.cfg.norm == "layer":
            return L.layer_norm(x, scale, bias, self.cfg.norm_eps)
        return L.rms_norm(x, scale, self.cfg.norm_eps)

    def _layer(self, p, layer, x, positions, inv_freq, meta, kv):
        cfg = self.cfg
        t = x.shape[0]
        attn_norm = lambda h: self._norm(h, p["attn_norm_scale"], p.get("attn_norm_bias"))
        mlp_norm = lambda h: self._norm(h, p["mlp_norm_scale"], p.get("mlp_norm_bias"))

        h = attn_norm(x) if cfg.pre_norm else x
        q, k, v = h @ p["q_proj"], h @ p["k_proj"], h @ p["v_proj"]
        if cfg.qkv_bias:
            q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
        q = q.reshape(t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = L.rms_norm(q, p["q_norm"], cfg.norm_eps)
            k = L.rms_norm(k, p["k_norm"], cfg.norm_eps)
        if inv_freq is not None:
            q = L.apply_rope(q, positions, inv_freq)
            k = L.apply_rope(k, positions, inv_freq)

        kv = write_kv(kv, layer, k, v, meta, self.attention_backend)
        o = paged_attention(q, kv, layer, meta, scale=cfg.head_dim ** -0.5,
                            sliding_window=cfg.sliding_window, backend=self.attention_backend)
        o = o.reshape(t, cfg.q_size) @ p["o_proj"]
        if cfg.o_bias:
            o = o + p["o_bias"]
        x = x + o
        if not cfg.pre_norm:
            x = attn_norm(x)

        h = mlp_norm(x) if cfg.pre_norm else x
        act = L.activation(cfg.activation)
        up = h @ p["up_proj"] + (p["up_bias"] if cfg.mlp_bias else 0)
        if cfg.mlp == "gated":
            gate = h @ p["gate_proj"] + (p["gate_bias"] if cfg.mlp_bias else 0)
            up = act(gate) * up
        else:
            up = act(up)
        m = up @ p["down_proj"] + (p["down_bias"] if cfg.mlp_bias else 0)
        x = x + m
        if not cfg.pre_norm:
            x = mlp_norm(x)
        return x, kv
