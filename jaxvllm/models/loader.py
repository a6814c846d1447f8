"""Loading a model: resolve the source, read its config and weights (HF safetensors, GGUF or a
converted orbax checkpoint), map HF tensor names onto the stacked `CausalLM` parameters, and
place them on the device in the requested dtype."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvllm.models.config import ModelConfig, resolve_dtype
from jaxvllm.models.registry import family_of, model_config_from_hf
from jaxvllm.models.source import ModelSource, resolve_model
from jaxvllm.models.transformer import CausalLM, layer_param_shapes, top_param_shapes

# Parameters stored [in, out] here and [out, in] by HF Linear layers.
_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "lm_head", "project_in", "project_out"}


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    hf_config: dict[str, Any]
    model: CausalLM
    source: ModelSource
    dtype: Any
    load_seconds: float


def read_json_object(path: Path, missing: str, missing_error=FileNotFoundError) -> dict[str, Any]:
    """A JSON object from `path`; errors name the file (`missing` explains an absent one)."""
    if not path.is_file():
        raise missing_error(f"{path}: {missing}")
    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def read_hf_config(folder: Path) -> dict[str, Any]:
    return read_json_object(folder / "config.json", "config.json not found")


def hf_weights(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    from jaxvllm.models.safetensors_file import SafetensorsFile, safetensors_files

    for path in safetensors_files(folder):
        f = SafetensorsFile(path)
        for name in f.keys():
            yield name, f.get(name)


def source_config_and_weights(source: ModelSource) -> tuple[dict[str, Any], Iterable]:
    """The HF-style config and a lazy (hf_name, array) stream for an HF folder or GGUF file."""
    if source.kind == "gguf":
        from jaxvllm.models.gguf_file import GGUFModel

        gguf_model = GGUFModel(source.path)
        return gguf_model.hf_config(), gguf_model.tensors()
    if source.kind == "hf":
        config = read_hf_config(source.path)
        family_of(config, str(source.path / "config.json"))
        return config, hf_weights(source.path)
    raise ValueError(f"{source.path}: a converted checkpoint has no HF weights to read")


def assemble_params(cfg: ModelConfig, hf_config: dict[str, Any], weights: Iterable,
                    dtype, where: str, progress=None) -> dict[str, Any]:
    """Map (hf_name, array) pairs onto the pure-dict state of `CausalLM` (numpy, `dtype`)."""
    _, family = family_of(hf_config, where)
    np_dtype = np.dtype(dtype)
    top_shapes = top_param_shapes(cfg)
    layer_shapes = layer_param_shapes(cfg)
    layer_re = re.compile(re.escape(family.LAYER_PREFIX) + r"\.(\d+)\.(.+)")
    top: dict[str, np.ndarray] = {}
    stacks = {n: np.empty((cfg.num_layers, *s), np_dtype) for n, s in layer_shapes.items()}
    filled = {n: np.zeros(cfg.num_layers, bool) for n in layer_shapes}

    for hf_name, array in weights:
        key = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
        m = layer_re.fullmatch(key)
        if m:
            layer, param = int(m.group(1)), family.LAYER_WEIGHTS.get(m.group(2))
            if param is None or param not in layer_shapes or layer >= cfg.num_layers:
                continue
            stacks[param][layer] = _oriented(param, array, layer_shapes[param], hf_name, where)
            filled[param][layer] = True
        else:
            param = family.TOP_WEIGHTS.get(key)
            if param is None or param not in top_shapes:
                continue  # e.g. a tied lm_head, rotary inv_freq buffers
            top[param] = _oriented(param, array, top_shapes[param], hf_name, where).astype(np_dtype)
        if progress is not None:
            progress.update(1)

    hf_top = {p: n for n, p in family.TOP_WEIGHTS.items()}
    hf_layer = {p: n for n, p in family.LAYER_WEIGHTS.items()}
    full = lambda key: key if key.startswith("lm_head") else f"model.{key}"
    missing = [full(hf_top[n]) for n in top_shapes if n not in top]
    missing += [full(f"{family.LAYER_PREFIX}.{i}.{hf_layer[n]}")
                for n, f in filled.items() for i in np.flatnonzero(~f)]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"{where}: weights missing for {cfg.architecture}: {shown}")
    return {**top, "layers": stacks}


def _oriented(param: str, array: np.ndarray, shape: tuple, hf_name: str, where: str) -> np.ndarray:
    expected = tuple(reversed(shape)) if param in _LINEAR else tuple(shape)  # HF Linear: [out, in]
    if tuple(array.shape) != expected:
        raise ValueError(f"{where}: tensor {hf_name!r} has shape {tuple(array.shape)}, "
                         f"expected {expected} (for parameter {param!r})")
    return array.T if param in _LINEAR else array


def abstract_model(cfg: ModelConfig, dtype, attention_backend: str = "reference") -> CausalLM:
    return nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0),
                                           attention_backend=attention_backend))


def build_model(cfg: ModelConfig, params: dict[str, Any], dtype,
                attention_backend: str = "reference", mesh=None) -> CausalLM:
    """A CausalLM whose parameters are `params` (a pure dict of host arrays) on the device.

    With a `mesh` (tensor parallelism), each parameter goes straight from the host into its
    shards (see jaxvllm/parallel.py) and the module runs with the mesh's KV-head layout."""
    if mesh is not None:
        from jaxvllm import parallel

        tp = parallel.tp_size(mesh)
        run_cfg = parallel.tp_model_config(cfg, tp)
        params = parallel.shard_params(parallel.widen_kv_heads(params, cfg, tp), mesh, dtype)
        cfg = run_cfg
    graphdef, state = nnx.split(abstract_model(cfg, dtype, attention_backend))
    if mesh is None:
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def load_model(model: str | None = None, *, dtype: str | Any = "auto",
               attention_backend: str = "reference", mesh=None) -> LoadedModel:
    """Resolve `model` and return it loaded, with its config and where it came from; with a
    `mesh`, sharded over it for tensor parallelism (`config` stays the checkpoint's)."""
    start = time.perf_counter()
    source = resolve_model(model)
    target = resolve_dtype(dtype)
    if source.kind == "converted":
        from convert.checkpoint import load_converted

        hf_config, cfg, params = load_converted(source.path, target)
    else:
        hf_config, weights = source_config_and_weights(source)
        cfg = model_config_from_hf(hf_config, str(source.path))
        if mesh is not None:  # an impossible layout fails before any weight is read
            from jaxvllm.parallel import check_model_divisible, tp_size

            check_model_divisible(cfg, tp_size(mesh))
        params = assemble_params(cfg, hf_config, weights, target, str(source.path))
    module = build_model(cfg, params, target, attention_backend, mesh)
    jax.block_until_ready(nnx.state(module))
    return LoadedModel(cfg, hf_config, module, source, target, time.perf_counter() - start)
