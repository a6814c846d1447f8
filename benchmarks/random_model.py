"""Random-weight models of published shapes, for benchmarks on machines without the Hub.

    python benchmarks/random_model.py qwen2.5-0.5b /tmp/qwen-0.5b --dtype bfloat16
    python benchmarks/random_model.py qwen2.5-0.5b /tmp/tiny --num-layers 2   # a cut-down copy

Writes a Hugging Face folder (config.json, model.safetensors, no tokenizer) that both
jaxvllm and transformers load, so the throughput and latency benchmarks can compare them on
a real model's shape. Speed depends on the shape only, not on the values: weights are drawn
from N(0, 0.02) (norm weights 1), small enough that activations stay finite in bfloat16.
Benchmarks feed such a model token ids (random, nano-vllm datasets) and ignore EOS.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# config.json fields of the published checkpoints (architecture and sizes only)
SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "tie_word_embeddings": True, "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True,
        "bos_token_id": 128000, "eos_token_id": 128001,
    },
    # not a published checkpoint: a model whose steps cost little, for host-side benchmarks
    "tiny-qwen2": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 1,
    },
}


def build(shape: str, out: str | Path, dtype: str = "bfloat16", num_layers: int | None = None,
          seed: int = 0) -> Path:
    """Write the random model of `shape` to `out` (created); returns the folder."""
    import torch
    import transformers

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
    if num_layers is not None and num_layers < 1:
        raise ValueError(f"num_layers={num_layers}: must be >= 1")
    fields = dict(SHAPES[shape])
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    model_type = fields.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **fields)
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                   "float32": torch.float32}[dtype]
    torch.manual_seed(seed)
    config.initializer_range = 0.02
    # drawing ~0.5B normal numbers takes a CPU tens of seconds, a GPU well under one
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="random_model", description=__doc__.split("\n\n")[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out", help="the folder to write")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--num-layers", type=int, default=None, help="fewer layers (tests, smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = build(args.shape, args.out, args.dtype, args.num_layers, args.seed)
    print(path)


if __name__ == "__main__":
    main()
