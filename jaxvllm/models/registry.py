"""Maps a Hugging Face `architectures` name to the family module that knows its config keys
and weight names. Every family runs on `transformer.CausalLM`."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from jaxvllm.models import llama, opt
from jaxvllm.models.config import ModelConfig

_FAMILIES: tuple[ModuleType, ...] = (llama, opt)
REGISTRY: dict[str, ModuleType] = {arch: fam for fam in _FAMILIES for arch in fam.ARCHITECTURES}


def supported_architectures() -> list[str]:
    return sorted(REGISTRY)


def family_of(hf_config: dict[str, Any], source: str = "config.json") -> tuple[str, ModuleType]:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in REGISTRY:
            return arch, REGISTRY[arch]
    raise ValueError(
        f"{source}: architecture {archs or hf_config.get('model_type')!r} is not supported; "
        f"supported architectures: {', '.join(supported_architectures())}")


def model_config_from_hf(hf_config: dict[str, Any], source: str = "config.json") -> ModelConfig:
    arch, family = family_of(hf_config, source)
    try:
        return family.config_from_hf(hf_config, arch)
    except KeyError as e:
        raise ValueError(f"{source}: {arch} config is missing the key {e.args[0]!r}") from None
