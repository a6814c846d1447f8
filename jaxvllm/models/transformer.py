"""CausalLM: one Flax NNX decoder for every supported family, layers run as a `lax.scan` or,
once unrolled (`CausalLM.unroll_layers`), as a Python loop over per-layer weights.

Llama, Mistral, Qwen2, Qwen3 and OPT differ only in switches of `ModelConfig` (norm kind,
biases, q/k norm, rotary vs learned positions, gated vs plain MLP, pre- vs post-norm), so one
wiring serves all of them; the family modules only translate configs and weight names.

Per-layer parameters are stacked on a leading `[L]` axis and the KV cache is stacked the
same way and threaded through the scan's carry: each layer scatters its new k/v at
`[l, block, offset]` and gathers at `[l, block_table]`, so a step never copies the cache.
Weights are stored `[in, out]` (HF Linear transposed) so that `x @ w` needs no transpose.

Unrolled (the engine's default on one device), each layer's weights are separate arrays,
with q/k/v and gate/up concatenated into one matrix each: the device runs one matmul where
the scan ran three (and two), reads each weight where it lies instead of copying it out of
the stack every step, and the step has no loop, so a GPU can put all of it in one command
buffer. On the CPU the copies cost as much as the matmuls' own read of the weights: a
SmolLM2 decode step of one row takes ~29 ms unrolled against ~48 ms as a scan. The layer is
traced and lowered once (a jitted function called per layer, which XLA inlines), but XLA
compiles it num_layers times: the price is compile time (SmolLM2 on the CPU: ~4.3 s against
~1.9 s a program), paid once per program with the program cache.

With `small_batch_matmuls` (unrolled, RMSNorm, pre-norm models), a step of at most
`small_batch_matmul.MAX_ROWS` rows (or of the row limit it is set to: the engine's start-up
measurement, jaxvllm/engine/autotune.py, picks one on a GPU) runs each projection as one
Pallas kernel that also does the RMSNorm before it and the bias, rotary embeddings (without
q/k norms), SiLU(gate) * up and residual add after it: four kernels a layer beside the
attention, where XLA launches about nine. Those split over K, and the decode attention split
over keys, find their last program to finish with arrival counts: one int32 array of zeros
a step (`_split_counters`), passed from kernel to kernel through the layers.

With `decode_layer_rows` (the engine's `decode_layer_kernel`), a decode-only step of at most
that many rows runs each layer as one kernel (pallas_kernels/decode_layer.py: the four
projections and the attention as stages of one grid, on the same counts) where the model
and the attention backend allow it (`decode_layer_supported`, `_layer_kernel`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvllm import parallel
from jaxvllm.models import layers as L
from jaxvllm.models.attention import AttentionMetadata, KVCache, attend, fused_decode_kernel
from jaxvllm.models.config import ModelConfig
from pallas_kernels import decode_layer, small_batch_matmul
from pallas_kernels.decode_attention_triton import decode_attention_triton


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


# Activations the small-batch kernels apply (Pallas Triton has no lowering of the exact GELU's
# erf)
SMALL_BATCH_ACTIVATIONS = ("silu", "swish", "relu", "gelu_new", "gelu_pytorch_tanh")


def small_batch_supported(cfg: ModelConfig) -> bool:
    """Whether `small_batch_matmuls` can run this model's layers: RMSNorm before the
    projections and an activation the kernels lower (see the module docstring)."""
    return cfg.pre_norm and cfg.norm == "rms" and cfg.activation in SMALL_BATCH_ACTIVATIONS


def decode_layer_supported(cfg: ModelConfig) -> bool:
    """Whether a decode step can run this model's layers as one kernel each
    (pallas_kernels/decode_layer.py): what `small_batch_supported` asks, a gated MLP,
    rotary embeddings over whole heads, no q/k norms and no O or MLP biases."""
    return (small_batch_supported(cfg) and cfg.mlp == "gated" and cfg.position == "rope"
            and not (cfg.qk_norm or cfg.o_bias or cfg.mlp_bias)
            and decode_layer.supports(1, cfg.hidden_size, cfg.intermediate_size,
                                      cfg.num_heads, cfg.num_kv_heads, cfg.head_dim))


# Weights an unrolled layer keeps as one matrix (or bias): (name, parts, concatenated on the
# last axis in this order).
FUSED_WEIGHTS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")),
                 ("qkv_bias", ("q_bias", "k_bias", "v_bias")),
                 ("gate_up_proj", ("gate_proj", "up_proj")),
                 ("gate_up_bias", ("gate_bias", "up_bias")))


class NamedParams(nnx.Module):
    """Parameters held as attributes whose names are listed in `names`."""

    names: tuple[str, ...] = ()

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}


class LayerWeights(NamedParams):
    """One layer's parameters, by name, as separate arrays (an unrolled model)."""

    def __init__(self, arrays: dict[str, jax.Array]):
        for name, array in arrays.items():
            setattr(self, name, nnx.Param(array))
        self.names = tuple(arrays)


class LayerStack(NamedParams):
    """All decoder layers' parameters, each stacked on a leading [num_layers] axis, or, once
    `unstack`ed, one `LayerWeights` per layer."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        for name, shape in layer_param_shapes(cfg).items():
            setattr(self, name, nnx.Param(_init(name, (cfg.num_layers, *shape), rngs.params(), dtype)))
        self.names = tuple(layer_param_shapes(cfg))
        self.num_layers = cfg.num_layers
        self.unstacked = False

    def unstack(self) -> None:
        """Split every stacked parameter into per-layer arrays, fusing FUSED_WEIGHTS. One
        group at a time goes through host memory: its stacked arrays are dropped from the
        device before its per-layer pieces are put there, so device memory never holds more
        than the weights (the engine sizes the KV cache from the peak)."""
        if self.unstacked:
            return
        per_layer: list[dict[str, jax.Array]] = [{} for _ in range(self.num_layers)]
        groups = [(fused, parts) for fused, parts in FUSED_WEIGHTS
                  if all(p in self.names for p in parts)]
        fused_parts = {p for _, parts in groups for p in parts}
        groups += [(name, (name,)) for name in self.names if name not in fused_parts]
        for name, parts in groups:
            stacked = [np.asarray(jax.device_get(getattr(self, p)[...])) for p in parts]
            for p in parts:
                delattr(self, p)
            for layer, weights in enumerate(per_layer):
                pieces = [a[layer] for a in stacked]
                weights[name] = jnp.asarray(
                    pieces[0] if len(pieces) == 1 else np.concatenate(pieces, -1))
            del stacked
        self.names = ()
        self.per_layer = nnx.List([LayerWeights(w) for w in per_layer])
        self.unstacked = True


class CausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_backend: str = "reference"):
        self.cfg = cfg
        self.dtype = dtype
        self.attention_backend = attention_backend
        # set by the engine: False, True, or the most rows a step runs the kernels for
        # (see the module docstring)
        self.small_batch_matmuls = False
        # set by the engine: steps of at most this many rows sample with the Pallas kernels
        # of pallas_kernels/sampling.py (jaxvllm/engine/runner.py)
        self.sampling_kernel_rows = 0
        # set by the engine: decode-only steps of at most this many rows run each layer as
        # one kernel (see the module docstring)
        self.decode_layer_rows = 0
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
            x, kv, _ = self._layer(p, layer, x, positions, inv_freq, meta, kv, None)
            return (x, kv), None

        if self.layers.unstacked:
            # one jitted layer, called once a layer with that layer's weights and index: the
            # program traces and lowers it once instead of num_layers times (seconds a
            # program with the Pallas kernels), and XLA inlines the calls
            first = self.layers.per_layer[0].arrays()
            counters = self._split_counters(first)
            if self._layer_kernel(x.shape[0], meta):
                layer_fn = jax.jit(self._one_kernel_layer)
            else:
                layer_fn = functools.partial(jax.jit(self._layer, static_argnames="small_batch"),
                                             small_batch=self.small_batch_limit())
            for layer, weights in enumerate(self.layers.per_layer):
                x, kv, counters = layer_fn(weights.arrays(), np.int32(layer), x, positions,
                                           inv_freq, meta, kv, counters)
        else:
            layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            (x, kv), _ = jax.lax.scan(one_layer, (x, kv), (self.layers.arrays(), layer_ids))

        if cfg.final_norm:
            x = self._norm(x, self.final_norm_scale[...],
                           self.final_norm_bias[...] if cfg.norm == "layer" else None)
        if cfg.has_projections:
            x = x @ self.project_out[...]
        return x, kv

    def unroll_layers(self) -> None:
        """Run the layers unrolled from now on, on per-layer (fused) weights: see the module
        docstring. In place; the stacked parameters are gone afterwards."""
        self.layers.unstack()

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """[N, E] hidden states -> [N, vocab] float32 logits."""
        if self.cfg.tie_word_embeddings:
            # contracted on the embedding's own axis: `hidden @ embed.T` took a transpose
            # that made a one-row product 4x slower on the CPU (XLA's matrix-vector path)
            logits = jnp.einsum("te,ve->tv", hidden, self.embed[...])
        else:
            logits = hidden @ self.lm_head[...]
        return logits.astype(jnp.float32)

    def _norm(self, x, scale, bias):
        if self.cfg.norm == "layer":
            return L.layer_norm(x, scale, bias, self.cfg.norm_eps)
        return L.rms_norm(x, scale, self.cfg.norm_eps)

    @staticmethod
    def _projections(h, p, names, fused, splits):
        """h @ each of the `names` projections (+ bias): one matmul split at `splits` when the
        layer holds them fused (see FUSED_WEIGHTS), else one matmul each."""
        if f"{fused}_proj" in p:
            out = h @ p[f"{fused}_proj"]
            if f"{fused}_bias" in p:
                out = out + p[f"{fused}_bias"]
            return jnp.split(out, splits, axis=-1)
        return [h @ p[f"{n}_proj"] + p[f"{n}_bias"] if f"{n}_bias" in p else h @ p[f"{n}_proj"]
                for n in names]

    def _fused_kernels(self, p, t: int, small_batch: int) -> bool:
        """Whether an unrolled layer's projections run as small-batch kernels for `t` rows
        (`small_batch`: the most rows they run for; 0: never)."""
        return ("qkv_proj" in p and small_batch_supported(self.cfg)
                and t <= min(small_batch, small_batch_matmul.MAX_ROWS))

    def small_batch_limit(self) -> int:
        """`small_batch_matmuls` as the most rows a step's kernels run for (True: up to
        `small_batch_matmul.MAX_ROWS`; False, 0: none)."""
        value = self.small_batch_matmuls
        return small_batch_matmul.MAX_ROWS if value is True else int(value)

    def _split_counters(self, p):
        """The arrival counts the small-batch kernels split over K share
        (`small_batch_matmul.split_counters`) for layers of weights like `p`, or the layer
        kernels (`decode_layer.counters_size`), passed from one kernel to the next through a
        step (and dropped by XLA where none runs)."""
        counts = small_batch_matmul.split_counters(
            max((w.shape[1] for name, w in p.items() if name.endswith("_proj")), default=0))
        if self.decode_layer_rows and decode_layer_supported(self.cfg):
            cfg = self.cfg
            size = decode_layer.counters_size(cfg.hidden_size, cfg.intermediate_size,
                                              cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
            counts = jnp.zeros((max(size, counts.shape[0]),), jnp.int32)
        return counts

    def layer_kernel_possible(self) -> bool:
        """Whether decode steps can run each layer as one kernel: unrolled (fused) weights,
        a model `decode_layer_supported`, the attention backend's decode kernel the Triton
        one."""
        return (self.layers.unstacked and decode_layer_supported(self.cfg)
                and fused_decode_kernel(self.attention_backend) is decode_attention_triton)

    def _layer_kernel(self, t: int, meta: AttentionMetadata) -> bool:
        """Whether this step runs each layer as one kernel: a decode-only step of at most
        `decode_layer_rows` rows, on one device, where `layer_kernel_possible`."""
        return (meta.decode_only and 0 < t <= min(self.decode_layer_rows, decode_layer.MAX_ROWS)
                and parallel.active_mesh() is None and self.layer_kernel_possible())

    def _one_kernel_layer(self, p, layer, x, positions, inv_freq, meta, kv, counters):
        """One decoder layer of a decode-only step as one kernel -> (x, kv, counters)."""
        cfg = self.cfg
        x, k_cache, v_cache, counters = decode_layer.decode_layer(
            x, p, kv.k, kv.v, layer, positions, meta.seq_lens, meta.block_tables,
            meta.slot_mapping, inv_freq=inv_freq, num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads, norm_eps=cfg.norm_eps,
            gated_act=L.activation(cfg.activation), scale=cfg.head_dim ** -0.5,
            sliding_window=cfg.sliding_window, counters=counters)
        return x, KVCache(k_cache, v_cache), counters

    @staticmethod
    def _small_batch(x, p, name, counters, row_count, **epilogue):
        """(x @ p[name] (+ its bias) with `epilogue` as one kernel where its shapes fit (a
        rotation in `epilogue` the caller has checked: see `_layer`), counters). `row_count`:
        the rows that matter (see `_real_rows`), or None."""
        w = p[name]
        n_out = w.shape[1] // (2 if epilogue.get("gated_act") else 1)
        bias = p.get(name.replace("_proj", "_bias"))
        if small_batch_matmul.supports(x.shape[0], w.shape[0], n_out):
            return small_batch_matmul.fused_matmul(x, w, bias=bias, counters=counters,
                                                   row_count=row_count, **epilogue)
        return small_batch_matmul.reference(x, w, bias=bias, **epilogue), counters

    @staticmethod
    def _real_rows(meta: AttentionMetadata):
        """A decode-only step's rows up to its last request (of seq_len > 0; the padding
        rows come last): the rows the small-batch kernels' split sums carry (a batch-1
        multi-step decode is 16 rows, one real); None for other steps."""
        if not meta.decode_only:
            return None
        rows = jnp.arange(1, meta.seq_lens.shape[0] + 1, dtype=jnp.int32)
        return jnp.max(jnp.where(meta.seq_lens > 0, rows, 0))

    def _layer(self, p, layer, x, positions, inv_freq, meta, kv, counters,
               small_batch: int = 0):
        """One decoder layer -> (x, kv, counters). Its kernels pass `counters` along
        (`_split_counters`; None in a scan, which runs none of them). `small_batch`: its
        projections as the small-batch kernels for steps of at most that many rows (the
        module docstring); a static argument, not read from `self`: the jitted layer's trace
        is cached by function, and would keep an earlier setting."""
        cfg = self.cfg
        fused = self._fused_kernels(p, x.shape[0], small_batch)
        row_count = self._real_rows(meta) if fused else None
        q, k, v, qkv_heads, counters = self._attention_inputs(p, x, positions, inv_freq,
                                                              fused, counters, row_count)
        o, kv, *counted = attend(q, k, v, kv, layer, meta, scale=cfg.head_dim ** -0.5,
                                 sliding_window=cfg.sliding_window,
                                 backend=self.attention_backend, qkv=qkv_heads,
                                 counters=counters)
        counters = counted[0] if counted else None
        x, counters = self._after_attention(p, x, o.reshape(x.shape[0], cfg.q_size), fused,
                                            counters, row_count)
        return x, kv, counters

    def layer_projections(self, p, x, positions, inv_freq, small_batch: int = 0):
        """A layer without its attention, whose output is taken to be the queries: all of
        its projections and the work around them as `_layer` runs them (for
        `jaxvllm.engine.autotune`, which times them with and without the kernels)."""
        fused = self._fused_kernels(p, x.shape[0], small_batch)
        counters = self._split_counters(p)
        q, *_, counters = self._attention_inputs(p, x, positions, inv_freq, fused, counters,
                                                 None)
        return self._after_attention(p, x, q.reshape(x.shape[0], self.cfg.q_size), fused,
                                     counters, None)[0]

    def _attention_inputs(self, p, x, positions, inv_freq, fused: bool, counters, row_count):
        """(q [T, H, D], k, v [T, KVH, D], qkv: the three as one [T, H + 2 KVH, D] array
        where the small-batch QKV kernel gave them so, else None, counters), normed,
        projected, rotated."""
        cfg = self.cfg
        t = x.shape[0]
        # rotary embeddings in the QKV kernel, unless q/k norms come between or half a head
        # is no whole number of the kernel's column tiles
        qkv_size = cfg.q_size + 2 * cfg.kv_size
        rope_fused = (fused and inv_freq is not None and not cfg.qk_norm
                      and small_batch_matmul.supports(t, cfg.hidden_size, qkv_size,
                                                      rope_head_dim=cfg.head_dim))
        qkv_heads = None
        if fused:
            rope = dict(rope_positions=positions, rope_inv_freq=inv_freq,
                        rope_columns=cfg.q_size + cfg.kv_size) if rope_fused else {}
            qkv, counters = self._small_batch(x, p, "qkv_proj", counters, row_count,
                                              norm_scale=p["attn_norm_scale"],
                                              norm_eps=cfg.norm_eps, **rope)
            if rope_fused or inv_freq is None and not cfg.qk_norm:
                qkv_heads = qkv.reshape(t, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim)
            q, k, v = jnp.split(qkv, (cfg.q_size, cfg.q_size + cfg.kv_size), axis=-1)
        else:
            h = self._norm(x, p["attn_norm_scale"], p.get("attn_norm_bias")) if cfg.pre_norm \
                else x
            q, k, v = self._projections(h, p, ("q", "k", "v"), "qkv",
                                        (cfg.q_size, cfg.q_size + cfg.kv_size))
        q = q.reshape(t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = L.rms_norm(q, p["q_norm"], cfg.norm_eps)
            k = L.rms_norm(k, p["k_norm"], cfg.norm_eps)
        if inv_freq is not None and not rope_fused:
            q = L.apply_rope(q, positions, inv_freq)
            k = L.apply_rope(k, positions, inv_freq)
        return q, k, v, qkv_heads, counters

    def _after_attention(self, p, x, o, fused: bool, counters, row_count):
        """(The rest of the layer from the attention's output o [T, H * D]: the O projection
        and residual, then the MLP block; counters)."""
        cfg = self.cfg
        attn_norm = lambda h: self._norm(h, p["attn_norm_scale"], p.get("attn_norm_bias"))
        mlp_norm = lambda h: self._norm(h, p["mlp_norm_scale"], p.get("mlp_norm_bias"))
        if fused:
            x, counters = self._small_batch(o, p, "o_proj", counters, row_count, residual=x)
            act = L.activation(cfg.activation)
            norm = dict(norm_scale=p["mlp_norm_scale"], norm_eps=cfg.norm_eps)
            if cfg.mlp == "gated":
                up, counters = self._small_batch(x, p, "gate_up_proj", counters, row_count,
                                                 gated_act=act, **norm)
            else:
                up, counters = self._small_batch(x, p, "up_proj", counters, row_count, **norm)
                up = act(up)
            return self._small_batch(up, p, "down_proj", counters, row_count, residual=x)
        o = o @ p["o_proj"]
        if cfg.o_bias:
            o = o + p["o_bias"]
        x = x + o
        if not cfg.pre_norm:
            x = attn_norm(x)

        h = mlp_norm(x) if cfg.pre_norm else x
        act = L.activation(cfg.activation)
        if cfg.mlp == "gated":
            gate, up = self._projections(h, p, ("gate", "up"), "gate_up",
                                         (cfg.intermediate_size,))
            up = act(gate) * up
        else:
            up = act(h @ p["up_proj"] + (p["up_bias"] if cfg.mlp_bias else 0))
        m = up @ p["down_proj"] + (p["down_bias"] if cfg.mlp_bias else 0)
        x = x + m
        if not cfg.pre_norm:
            x = mlp_norm(x)
        return x, counters
