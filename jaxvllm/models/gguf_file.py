"""GGUF files: llama.cpp metadata translated to an HF-style config, tensors dequantized to
numpy under their HF names (with llama.cpp's rotary row permutation of q/k undone), and the
tokenizer rebuilt from the embedded vocabulary. Needs only `gguf` (numpy)."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# GGUF `general.architecture` -> HF architecture name.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


class GGUFModel:
    """One GGUF file: metadata parsed up front, tensors memory-mapped and dequantized lazily."""

    def __init__(self, path: str | Path):
        import gguf

        from jaxvllm.models.gguf_reader import GGUFFile

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: GGUF file not found")
        try:
            self.reader = GGUFFile(self.path)
        except (ValueError, struct.error, UnicodeDecodeError, OverflowError) as e:
            raise ValueError(f"{self.path}: not a readable GGUF file ({e})") from None
        self._gguf = gguf

    def field(self, key: str, default: Any = None) -> Any:
        return self.reader.field(key, default)

    @property
    def gguf_architecture(self) -> str:
        return self.field("general.architecture", "?")

    def hf_config(self) -> dict[str, Any]:
        arch = self.gguf_architecture
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"{self.path}: GGUF architecture {arch!r} is not supported; "
                             f"supported: {', '.join(sorted(GGUF_ARCHITECTURES))}")
        a = lambda key, default=None: self.field(f"{arch}.{key}", default)
        heads = int(a("attention.head_count"))
        hidden = int(a("embedding_length"))
        vocab = a("vocab_size") or len(self.field("tokenizer.ggml.tokens", []))
        names = {t.name for t in self.reader.tensors}
        config = {
            "architectures": [GGUF_ARCHITECTURES[arch]],
            "model_type": arch,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(a("feed_forward_length")),
            "num_hidden_layers": int(a("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(a("attention.head_count_kv", heads)),
            "head_dim": int(a("attention.key_length", hidden // heads)),
            "max_position_embeddings": int(a("context_length", 2048)),
            "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(a("rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id"),
            "hidden_act": "silu",
        }
        if arch == "qwen2":
            config["attention_bias"] = False  # Qwen2's q/k/v bias is implied by the architecture
        window = a("attention.sliding_window")
        if window and arch == "mistral":
            config["sliding_window"] = int(window)
        scaling = a("rope.scaling.type")
        if scaling and scaling not in ("none",):
            config["rope_scaling"] = {"rope_type": scaling, "factor": float(a("rope.scaling.factor", 1.0))}
        return config

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, float32 array in HF layout) for every tensor, dequantized one at a time."""
        permute = self.gguf_architecture == "llama"
        heads = int(self.field("llama.attention.head_count", 0) or 0)
        kv_heads = int(self.field("llama.attention.head_count_kv", heads) or heads)
        for t in self.reader.tensors:
            name = self._hf_name(t.name)
            if name is None:
                continue
            array = self._dequantize(t)
            if permute and name.endswith("self_attn.q_proj.weight"):
                array = unpermute_rotary_rows(array, heads)
            elif permute and name.endswith("self_attn.k_proj.weight"):
                array = unpermute_rotary_rows(array, kv_heads)
            yield name, array

    def _hf_name(self, name: str) -> str | None:
        if name in _TOP:
            return _TOP[name]
        m = _BLOCK.fullmatch(name)
        if m and m.group(2) in _LAYER:
            return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
        return None  # e.g. rope_freqs: recomputed from the config

    def _dequantize(self, t) -> np.ndarray:
        quant_type = self._gguf.GGMLQuantizationType
        try:
            qtype = quant_type(t.type_id)
        except ValueError:
            raise ValueError(f"{self.path}: tensor {t.name!r} has unknown GGML type {t.type_id}") from None
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        block, type_size = self._gguf.GGML_QUANT_SIZES[qtype]
        row = int(t.shape[0]) if t.shape else 1
        count = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
        if row % block:
            raise ValueError(f"{self.path}: tensor {t.name!r} rows of {row} are not a multiple "
                             f"of the {qtype.name} block size {block}")
        raw = self.reader.raw(t, count // block * type_size)
        plain = {quant_type.F32: np.float32, quant_type.F16: np.float16, quant_type.F64: np.float64}
        if qtype in plain:
            return raw.view(plain[qtype]).astype(np.float32).reshape(shape)
        fast = dequantize_whole(raw, qtype.name)
        if fast is not None:
            return fast.reshape(shape)
        try:
            array = self._gguf.quants.dequantize(raw.reshape(-1, row // block * type_size), qtype)
        except NotImplementedError:
            raise ValueError(f"{self.path}: tensor {t.name!r} uses quantization type "
                             f"{qtype.name}, which cannot be dequantized; re-export the "
                             "model with a supported type (F32, F16, BF16, Q4_0..Q8_0, K-quants)") from None
        return np.asarray(array, np.float32).reshape(shape)


# bytes per block of 32 weights: a float16 scale (Q4_1: and a float16 minimum), then the
# quants (Q8_0: 32 int8; Q4_0 / Q4_1: 16 bytes, weight j in the low nibble of byte j and
# weight j + 16 in its high nibble)
_WHOLE_TENSOR_TYPES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def dequantize_whole(raw: np.ndarray, type_name: str) -> np.ndarray | None:
    """Q8_0, Q4_0 or Q4_1 bytes -> float32 weights, one numpy pass over the whole tensor (the
    gguf package loops over row groups: seconds for a 135M model); None for other types."""
    block_bytes = _WHOLE_TENSOR_TYPES.get(type_name)
    if block_bytes is None:
        return None
    blocks = raw.reshape(-1, block_bytes)

    def halves(lo: int) -> np.ndarray:  # [n, 1] float32 from the float16 at bytes lo, lo+1
        return np.ascontiguousarray(blocks[:, lo:lo + 2]).view(np.float16).astype(np.float32)

    scale = halves(0)
    if type_name == "Q8_0":
        return np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.float32) * scale
    packed = blocks[:, 4:] if type_name == "Q4_1" else blocks[:, 2:]
    quants = np.concatenate([packed & 0x0F, packed >> 4], axis=1)
    if type_name == "Q4_0":
        return scale * (quants.astype(np.float32) - 8.0)
    return scale * quants.astype(np.float32) + halves(2)


def unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved rotary pairs) back to HF's rotate-half.

    llama.cpp views each head's rows as [2, D/2] and transposes them to [D/2, 2]; transposing
    back restores the HF order.
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    return (w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])
             .swapaxes(1, 2)
             .reshape(w.shape))
