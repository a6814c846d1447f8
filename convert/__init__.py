"""Weight conversion: any model source jaxvllm can read (HF folder, Hub id, GGUF file) written
once as an orbax checkpoint of the `CausalLM` parameters, so that later loads skip the
dequantization and name mapping.

    jaxvllm convert SRC OUT [--dtype auto|float32|bfloat16|float16]

`convert.checkpoint` holds the format (save_converted / load_converted), `convert.cli` the
sub-command. Names are imported lazily so that building the CLI parser does not import JAX.
"""

_EXPORTS = ("FORMAT_VERSION", "load_converted", "read_marker", "save_converted")
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        from convert import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
