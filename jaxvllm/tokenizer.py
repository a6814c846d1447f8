"""Tokenizers and chat templates: transformers' fast tokenizer read from the model folder, or
rebuilt from a GGUF file's embedded vocabulary and cached (the rebuild takes seconds)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from jaxvllm.cache import cache_dir
from jaxvllm.models.source import ModelSource, resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                                "tokenizer_config.json"))


def _gguf_tokenizer_cache(path: Path) -> Path:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "gguf_tokenizers" / digest[:16]


def tokenizer_from_gguf(path: Path):
    """The tokenizer embedded in a GGUF file, built once and then read from the cache."""
    # the fast tokenizer class itself: AutoTokenizer would read a model config first, which
    # imports torch when it is installed (1.5 s of a warm start)
    from transformers import PreTrainedTokenizerFast

    cached = _gguf_tokenizer_cache(path)
    if (cached / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(cached)
    tok = _byte_level_bpe_from_gguf(path)
    try:
        tok.save_pretrained(cached)
    except OSError:
        pass  # a read-only cache only costs the rebuild next time
    return tok


def _byte_level_bpe_from_gguf(path: Path):
    """Build a fast tokenizer from GGUF `tokenizer.ggml.*` metadata (byte-level BPE, the
    "gpt2" model of llama.cpp used by SmolLM, Qwen, Llama 3, ...), without torch."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from jaxvllm.models.gguf_file import GGUFModel

    g = GGUFModel(path)
    kind = g.field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported (byte-level "
                         "BPE 'gpt2' is); pass tokenizer=FOLDER with the model's tokenizer files")
    tokens = g.field("tokenizer.ggml.tokens")
    types = g.field("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in g.field("tokenizer.ggml.merges") or []]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(g.field("tokenizer.ggml.add_space_prefix", False)), use_regex=True)
    backend.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4]
    backend.add_special_tokens(control)
    backend.add_tokens(user)

    def token(key):
        i = g.field(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("bos")
    if g.field("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokens.index(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=token("eos"),
                                  unk_token=token("unknown"), pad_token=token("padding"))
    template = g.field("tokenizer.chat_template")
    if template:
        tok.chat_template = template
    return tok


def load_tokenizer(model: str | ModelSource | None = None, tokenizer: str | None = None):
    """The tokenizer for `model` (or from `tokenizer`, a folder or Hub id, when given)."""
    if tokenizer is not None:
        source = resolve_model(tokenizer)
    else:
        source = model if isinstance(model, ModelSource) else resolve_model(model)
    if source.kind == "gguf":
        return tokenizer_from_gguf(source.path)
    if not has_tokenizer_files(source.path):
        raise FileNotFoundError(f"{source.path}: no tokenizer files (tokenizer.json, "
                                "tokenizer_config.json, ...); pass tokenizer=PATH")
    from transformers import AutoTokenizer  # imports torch when installed: not for GGUF

    return AutoTokenizer.from_pretrained(source.path)
