"""Shared fixtures: an offline session, JAX's persistent compilation cache, and a zoo of tiny
random Hugging Face models saved as safetensors folders (built once per session).

Every parameter of the tiny models is randomized, biases and norm weights included (HF inits
those to zero and one), so that a bias or norm the loader drops or mis-maps changes the
logits instead of hiding behind its default value.
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub/transformers (they read these at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import pytest

XLA_TEST_CACHE = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                  / "jaxvllm" / "xla-tests")


def _enable_compilation_cache() -> None:
    try:
        XLA_TEST_CACHE.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # a read-only home only costs the recompiles
    jax.config.update("jax_compilation_cache_dir", str(XLA_TEST_CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_enable_compilation_cache()


@pytest.fixture(scope="session", autouse=True)
def _offline_session():
    """No test may reach the Hub: keep the offline switches on for the whole session."""
    yield
    assert os.environ.get("HF_HUB_OFFLINE") == "1", "a test cleared HF_HUB_OFFLINE"


@dataclasses.dataclass
class FakeSamplingParams:
    """Stand-in for SamplingParams in the KV-cache and scheduler tests: the fields the
    scheduler reads."""

    max_tokens: int | None = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    # read to decide whether a multi-step decode may run (sampler.plain_params)
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict | None = None
    allowed_token_ids: list[int] | None = None
    logprobs: int | None = None


# ---------------------------------------------------------------------------------------------
# Tiny random HF models
# ---------------------------------------------------------------------------------------------

VOCAB = 256
# No EOS: with one, transformers' `min_new_tokens` would mask that token out of its greedy
# choices while SimpleGenerator (no stop tokens) may pick it, and the continuations would part.
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=256, bos_token_id=1,
               eos_token_id=None, pad_token_id=0)


def _llama_gqa():
    import transformers

    # llama3 rope scaling with head_dim 16 and an original context of 64: the wavelengths
    # (6.3, 19.9, 62.8, 199, ...) fall in all three bands (kept, blended, divided).
    return transformers.LlamaConfig(
        num_key_value_heads=2, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        **_COMMON)


def _llama_mha_tied():
    import transformers

    return transformers.LlamaConfig(num_key_value_heads=4, tie_word_embeddings=True,
                                    rope_theta=500.0, **_COMMON)


def _mistral():
    import transformers

    return transformers.MistralConfig(num_key_value_heads=2, sliding_window=12,
                                      tie_word_embeddings=False, **_COMMON)


def _qwen2():
    import transformers

    return transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True,
                                    use_sliding_window=False, **_COMMON)


def _qwen3():
    import transformers

    # head_dim 32 while hidden/heads is 16; one KV head (GQA ratio 4)
    return transformers.Qwen3Config(num_key_value_heads=1, head_dim=32, tie_word_embeddings=False,
                                    use_sliding_window=False, **_COMMON)


_OPT_COMMON = dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=256, bos_token_id=1,
                   eos_token_id=None, pad_token_id=0)


def _opt():
    import transformers

    return transformers.OPTConfig(do_layer_norm_before=True, word_embed_proj_dim=64, **_OPT_COMMON)


def _opt_350m():
    import transformers

    # OPT-350m: post-norm layers, no final norm, project_in/out between 32 and 64
    return transformers.OPTConfig(do_layer_norm_before=False, word_embed_proj_dim=32, **_OPT_COMMON)


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    make_config: Callable[[], Any]
    architecture: str
    block_size: int  # the KV block size the parity tests run this model with
    seed: int
    # Standard deviations of the random weights, chosen per family so that greedy decoding
    # does not collapse into repeating one token (tied embeddings make that likely).
    std: float = 0.15
    embed_std: float = 0.05


CASES: dict[str, CaseSpec] = {
    "llama_gqa": CaseSpec(_llama_gqa, "LlamaForCausalLM", 4, 1),
    "llama_mha_tied": CaseSpec(_llama_mha_tied, "LlamaForCausalLM", 16, 2),
    "mistral_sliding": CaseSpec(_mistral, "MistralForCausalLM", 4, 3),
    "qwen2_bias_tied": CaseSpec(_qwen2, "Qwen2ForCausalLM", 8, 4),
    "qwen3_qknorm": CaseSpec(_qwen3, "Qwen3ForCausalLM", 4, 5),
    "opt_prenorm": CaseSpec(_opt, "OPTForCausalLM", 16, 6, std=0.3, embed_std=0.1),
    "opt_350m_style": CaseSpec(_opt_350m, "OPTForCausalLM", 4, 7, std=0.05, embed_std=0.2),
}


def randomize_(model, seed: int, std: float, embed_std: float) -> None:
    """Overwrite every parameter in place: norm weights ~ 1 + 0.1 N(0, 1), embeddings (token
    and position) ~ N(0, embed_std), everything else (projections, linear and norm biases)
    ~ N(0, std)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    norm_weights, embeddings = set(), set()
    for module in model.modules():
        if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
            norm_weights.add(id(module.weight))
        if isinstance(module, torch.nn.Embedding):
            embeddings.add(id(module.weight))
    with torch.no_grad():
        for _, p in model.named_parameters():  # tied parameters are listed once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if id(p) in norm_weights:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_((embed_std if id(p) in embeddings else std) * noise)


def build_hf_model(spec: CaseSpec):
    import torch
    import transformers

    torch.manual_seed(spec.seed)
    model = transformers.AutoModelForCausalLM.from_config(spec.make_config()).float().eval()
    randomize_(model, spec.seed, spec.std, spec.embed_std)
    return model


@dataclasses.dataclass
class HFCase:
    name: str
    spec: CaseSpec
    hf_model: Any  # the float32 torch model (the reference)
    path: Path  # its save_pretrained folder (one model.safetensors)


class ModelZoo:
    """Tiny random models built on first use and shared by every test of the session."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory):
        self._tmp = tmp_path_factory
        self._cases: dict[str, HFCase] = {}
        self._loaded: dict[tuple[str, str], Any] = {}

    def case(self, name: str) -> HFCase:
        if name not in self._cases:
            spec = CASES[name]
            model = build_hf_model(spec)
            path = self._tmp.mktemp(name)
            model.save_pretrained(path)
            self._cases[name] = HFCase(name, spec, model, path)
        return self._cases[name]

    def loaded(self, name: str, dtype: str = "float32"):
        """`jaxvllm.models.loader.load_model` of the case's folder (cached per dtype)."""
        from jaxvllm.models.loader import load_model

        key = (name, dtype)
        if key not in self._loaded:
            self._loaded[key] = load_model(str(self.case(name).path), dtype=dtype)
        return self._loaded[key]

    def save_variant(self, name: str, label: str, **save_kwargs) -> Path:
        """The case's model saved again into a fresh folder (e.g. sharded, or in bf16)."""
        import copy

        import torch

        case = self.case(name)
        model = case.hf_model
        dtype = save_kwargs.pop("torch_dtype", None)
        if dtype is not None:
            model = copy.deepcopy(model).to(dtype)
        path = self._tmp.mktemp(f"{name}-{label}")
        with torch.no_grad():
            model.save_pretrained(path, **save_kwargs)
        return path


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> ModelZoo:
    return ModelZoo(tmp_path_factory)


@pytest.fixture(scope="session")
def llama_folder(zoo) -> Path:
    """A valid tiny HF checkpoint folder (Llama, GQA); copy it before modifying it."""
    return zoo.case("llama_gqa").path


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer and chat template (a saved HF folder):
    nonsense text, but a real vocabulary and template, and milliseconds per step. The server
    and CLI tests share it, and with it their compiled programs."""
    import torch
    import transformers

    from jaxvllm.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-chat")
    tok = load_tokenizer(None)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
