"""The converted-checkpoint format: writing it (`save_converted`) and reading it back
(`load_converted`, called by `jaxvllm.models.loader.load_model` for a converted folder).

A converted folder holds

    state/                   orbax PyTree checkpoint of the parameters' pure dict: numpy
                             arrays keyed as `assemble_params` builds them (top-level names,
                             and "layers": {name: [num_layers, ...]}), already in jaxvllm's
                             layout ([in, out] linears, q/k rows in HF order)
    config.json              the HF-style config (for GGUF, the one derived from its metadata)
    tokenizer files          copied from the source folder, or rebuilt from the GGUF vocabulary
    jaxvllm_checkpoint.json  the marker: format version, architecture, stored dtype, source,
                             jaxvllm version; written last, so a folder whose conversion did
                             not finish is never taken for a checkpoint

Stored dtype: "auto" keeps what the source holds without loss: float32 for GGUF (its tensors
are dequantized to float32) and for float32 or mixed safetensors, bfloat16 (float16) when
every floating safetensors tensor is bfloat16 (float16). Loading casts to the requested dtype
exactly as the on-the-fly path does, so both give identical parameters.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxvllm.models.config import ModelConfig, dtype_name, resolve_dtype
from jaxvllm.models.source import CHECKPOINT_MARKER, ModelSource, resolve_model

FORMAT_NAME = "jaxvllm-orbax-params"
FORMAT_VERSION = 1
STATE_DIR = "state"
CONFIG_FILE = "config.json"
STORE_DTYPES = ("auto", "float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------
# writing


def save_converted(source_model: str | None, out_dir: str | Path, dtype: str = "auto",
                   progress: bool = True, force: bool = False) -> Path:
    """Convert `source_model` (HF folder, Hub id in the HF cache, GGUF file; None = the embedded
    default model) into a checkpoint folder `out_dir` and return its path.

    `out_dir` must be missing or empty unless `force`; with `force` the files of an earlier
    conversion there (state/, config.json, tokenizer files, the marker) are replaced and any
    other file is left alone.
    """
    from tqdm.auto import tqdm

    from jaxvllm.models.loader import assemble_params, source_config_and_weights
    from jaxvllm.models.registry import model_config_from_hf

    if dtype not in STORE_DTYPES:
        raise ValueError(f"stored dtype {dtype!r} is not supported; choose one of "
                         f"{', '.join(map(repr, STORE_DTYPES))}")
    out = Path(out_dir).expanduser()
    source = resolve_model(source_model)
    if source.kind == "converted":
        raise ValueError(f"{source.path}: already a converted checkpoint; load it directly "
                         "(or convert its original model again)")
    _check_out(out, source, force)

    where = str(source.path)
    hf_config, weights = source_config_and_weights(source)
    cfg = model_config_from_hf(hf_config, where)
    stored = _stored_dtype(source, dtype)
    bar = tqdm(total=_count_used_tensors(cfg), desc=f"converting {source.name}", unit="tensor",
               disable=not progress, file=sys.stderr)
    try:
        params = assemble_params(cfg, hf_config, weights, resolve_dtype(stored), where,
                                 progress=bar)
    finally:
        bar.close()

    config_text = json.dumps(hf_config, indent=2, sort_keys=True, default=_json_scalar) + "\n"
    if model_config_from_hf(json.loads(config_text), where) != cfg:
        raise ValueError(f"{where}: the config does not survive a JSON round trip unchanged; "
                         "it cannot be stored as config.json")

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _clear_previous(out)
        _save_state(out / STATE_DIR, params)
        (out / CONFIG_FILE).write_text(config_text)
        has_tokenizer = _save_tokenizer(source, out)
        marker = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "architecture": cfg.architecture,
            "dtype": stored,
            "num_params": int(sum(a.size for a in _leaves(params))),
            "source": source.name,
            "source_kind": source.kind,
            "tokenizer": has_tokenizer,
            "jaxvllm_version": _jaxvllm_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (out / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _check_out(out: Path, source: ModelSource, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: output path exists and is not a folder")
    if out.exists() and out.resolve() == source.folder.resolve():
        raise ValueError(f"{out}: the output folder is the source model's own folder; "
                         "choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"{out}: output folder is not empty; choose an empty or new folder, "
                         "or pass --force (force=True) to overwrite it")


def _clear_previous(out: Path) -> None:
    from jaxvllm.tokenizer import TOKENIZER_FILES

    (out / CHECKPOINT_MARKER).unlink(missing_ok=True)  # first: never a marker over stale state
    state = out / STATE_DIR
    if state.is_dir() and not state.is_symlink():
        shutil.rmtree(state)
    elif state.exists() or state.is_symlink():
        state.unlink()
    for name in (CONFIG_FILE, *TOKENIZER_FILES):
        (out / name).unlink(missing_ok=True)


def _stored_dtype(source: ModelSource, dtype: str) -> str:
    if dtype != "auto":
        return dtype_name(resolve_dtype(dtype))
    if source.kind != "hf":
        return "float32"  # GGUF tensors come dequantized to float32
    from jaxvllm.models.safetensors_file import SafetensorsFile, safetensors_files

    kinds = set()
    for path in safetensors_files(source.path):
        f = SafetensorsFile(path)
        for name in f.keys():
            dt = np.dtype(f.get(name).dtype)
            if dt.kind == "f" or dt.name == "bfloat16":
                kinds.add(dt.name)
    if kinds == {"bfloat16"} or kinds == {"float16"}:
        return kinds.pop()
    return "float32"


def _count_used_tensors(cfg: ModelConfig) -> int:
    """How many source tensors `assemble_params` consumes (and ticks the progress bar for)."""
    from jaxvllm.models.transformer import layer_param_shapes, top_param_shapes

    return len(top_param_shapes(cfg)) + cfg.num_layers * len(layer_param_shapes(cfg))


def _save_state(path: Path, params: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    # A synchronous checkpointer: save() returns once the files are committed, and the
    # context manager closes its thread pools.
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path.resolve(), args=ocp.args.PyTreeSave(params))


def _save_tokenizer(source: ModelSource, out: Path) -> bool:
    from jaxvllm.tokenizer import TOKENIZER_FILES, has_tokenizer_files, tokenizer_from_gguf

    if source.kind == "gguf":
        try:
            tokenizer = tokenizer_from_gguf(source.path)
        except Exception as e:  # the weights are still useful; say why the tokenizer is not
            print(f"warning: {source.path}: could not rebuild the tokenizer from the GGUF "
                  f"vocabulary ({type(e).__name__}: {e}); the checkpoint has no tokenizer",
                  file=sys.stderr)
            return False
        tokenizer.save_pretrained(out)
        return True
    for name in TOKENIZER_FILES:
        if (source.path / name).is_file():
            shutil.copyfile(source.path / name, out / name)  # follows HF-cache symlinks
    return has_tokenizer_files(out)


def _json_scalar(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"config value {value!r} ({type(value).__name__}) is not JSON serializable")


# ----------------------------------------------------------------------------------------
# reading


def read_marker(folder: str | Path) -> dict[str, Any]:
    """The marker of a converted folder, checked for a format version this code reads."""
    from jaxvllm.models.loader import read_json_object

    path = Path(folder) / CHECKPOINT_MARKER
    marker = read_json_object(path, f"not found; {folder} is not a checkpoint made by "
                              "`jaxvllm convert`", missing_error=ValueError)
    version = marker.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: unknown checkpoint format version {version!r} (this jaxvllm "
                         f"reads version {FORMAT_VERSION}); convert the model again")
    for key in ("architecture", "dtype"):
        if not isinstance(marker.get(key), str):
            raise ValueError(f"{path}: the field {key!r} is missing")
    return marker


def load_converted(folder: str | Path, dtype) -> tuple[dict[str, Any], ModelConfig, dict[str, Any]]:
    """(HF config, ModelConfig, params) of a converted folder; params are numpy arrays in
    `dtype`, keyed as `assemble_params` builds them."""
    from flax import nnx

    from jaxvllm.models.loader import abstract_model, read_hf_config
    from jaxvllm.models.registry import model_config_from_hf

    folder = Path(folder)
    marker = read_marker(folder)
    hf_config = read_hf_config(folder)
    cfg = model_config_from_hf(hf_config, str(folder / CONFIG_FILE))
    if cfg.architecture != marker["architecture"]:
        raise ValueError(f"{folder}: config.json says {cfg.architecture} but "
                         f"{CHECKPOINT_MARKER} says {marker['architecture']}")
    state = folder / STATE_DIR
    if not state.is_dir():
        raise ValueError(f"{state}: the checkpoint's weights are missing (no orbax state "
                         "folder); convert the model again")
    stored = resolve_dtype(marker["dtype"])
    target = resolve_dtype(dtype)
    expected = nnx.to_pure_dict(nnx.state(abstract_model(cfg, stored)))
    params = _restore_state(state, expected)
    _check_shapes(state, params, expected)
    np_target = np.dtype(target)
    params = _map(lambda a: a if a.dtype == np_target else a.astype(np_target), params)
    return hf_config, cfg, params


def _restore_state(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    # Host numpy arrays in the stored dtype; the caller casts with numpy, the same
    # conversion `assemble_params` applies on the on-the-fly path.
    restore_args = _map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray), expected)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            return ckptr.restore(path.resolve(), args=ocp.args.PyTreeRestore(
                item=expected, restore_args=restore_args))
    except Exception as e:
        raise ValueError(f"{path}: cannot restore the orbax checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "convert the model again") from e


def _check_shapes(path: Path, params: Any, expected: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(params, dict) or set(params) != set(expected):
        raise ValueError(f"{path}: the stored parameters do not match the model in config.json "
                         f"(expected {sorted(expected)} under {prefix or 'the root'})")
    for name, spec in expected.items():
        if isinstance(spec, dict):
            _check_shapes(path, params[name], spec, f"{prefix}{name}.")
        elif tuple(np.shape(params[name])) != tuple(spec.shape):
            raise ValueError(f"{path}: parameter {prefix}{name} has shape "
                             f"{tuple(np.shape(params[name]))}, expected {tuple(spec.shape)}")


# ----------------------------------------------------------------------------------------
# helpers


def _map(fn, tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _leaves(tree: dict[str, Any]):
    for v in tree.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


def _jaxvllm_version() -> str:
    import jaxvllm

    return getattr(jaxvllm, "__version__", "unknown")
