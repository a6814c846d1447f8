"""LLM: the offline API, as in vLLM: `LLM(model).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
import time
from typing import Any, Optional, Sequence, Union

from jaxvllm.config import EngineConfig
from jaxvllm.engine.engine import LLMEngine
from jaxvllm.outputs import RequestOutput
from jaxvllm.sampling_params import RequestOutputKind, SamplingParams

PromptType = Union[str, list[int], dict[str, Any]]


class LLM:
    """An engine for offline batch generation.

    Args are vLLM's: `model` (HF folder, Hub id in the cache, .gguf, converted checkpoint, or
    None for the embedded SmolLM2-135M-Instruct), `tokenizer`, `dtype`, `seed`,
    `max_model_len`, `block_size`, `max_num_seqs`, `max_num_batched_tokens`,
    `gpu_memory_utilization`, `num_gpu_blocks_override`, `enable_prefix_caching`,
    `tensor_parallel_size`, ... (see `EngineConfig`). Unknown arguments raise TypeError.
    """

    def __init__(self, model: Optional[str] = None, **kwargs):
        self.llm_engine = LLMEngine(EngineConfig.from_kwargs(model=model, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True, priority: Optional[list[int]] = None) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order."""
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        params = _final_only(params)
        ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                rid = str(next(self._counter))
                self.llm_engine.add_request(rid, prompt, p, priority=priority[i] if priority else 0)
                ids.append(rid)
        except Exception:
            self.llm_engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, chat_template: Optional[str] = None,
             continue_final_message: bool = False, **template_kwargs) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        tok = self.get_tokenizer()
        if tok is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            ids = tok.apply_chat_template(conv, tokenize=True, chat_template=chat_template,
                                          add_generation_prompt=add_generation_prompt,
                                          continue_final_message=continue_final_message,
                                          **template_kwargs)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        start = time.perf_counter()
        in_tokens = out_tokens = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
                    if bar is not None:
                        in_tokens += len(out.prompt_token_ids)
                        out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"est. speed input: {in_tokens / elapsed:.2f} toks/s, "
                                            f"output: {out_tokens / elapsed:.2f} toks/s")
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [finished[i] for i in ids if i in finished]


def _final_only(params: list[SamplingParams]) -> list[SamplingParams]:
    """Copies of `params` (one per distinct object) asking only for final outputs: `generate`
    returns nothing else, and the engine then builds no output of a running request."""
    copies: dict[int, SamplingParams] = {}
    out = []
    for p in params:
        if not isinstance(p, SamplingParams):  # left for add_request to reject
            out.append(p)
            continue
        if id(p) not in copies:
            copies[id(p)] = p.with_output_kind(RequestOutputKind.FINAL_ONLY)
        out.append(copies[id(p)])
    return out
