"""jaxvllm: vLLM for JAX. `from jaxvllm import LLM, SamplingParams`."""

__version__ = "0.1.0"

from jaxvllm.xla_flags import apply_defaults as _apply_xla_defaults  # noqa: E402

_apply_xla_defaults()  # before any device is used (see jaxvllm/xla_flags.py)

from jaxvllm.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from jaxvllm.sampling_params import SamplingParams  # noqa: E402


def __getattr__(name):
    # LLM pulls in the engine (and jax); import it on first use.
    if name == "LLM":
        from jaxvllm.llm import LLM

        return LLM
    if name == "LLMEngine":
        from jaxvllm.engine.engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
