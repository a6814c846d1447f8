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
    """The tokenizer embedded in a GGUF file, converted once and then read from the cache."""
    from transformers import AutoTokenizer

    cached = _gguf_tokenizer_cache(path)
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    try:
        tok.save_pretrained(cached)
    except OSError:
        pass  # a read-only cache only costs the rebuild next time
    return tok


def load_tokenizer(model: str | ModelSource | None = None, tokenizer: str | None = None):
    """The tokenizer for `model` (or from `tokenizer`, a folder or Hub id, when given)."""
    from transformers import AutoTokenizer

    if tokenizer is not None:
        source = resolve_model(tokenizer)
    else:
        source = model if isinstance(model, ModelSource) else resolve_model(model)
    if source.kind == "gguf":
        return tokenizer_from_gguf(source.path)
    if not has_tokenizer_files(source.path):
        raise FileNotFoundError(f"{source.path}: no tokenizer files (tokenizer.json, "
                                "tokenizer_config.json, ...); pass tokenizer=PATH")
    return AutoTokenizer.from_pretrained(source.path)
