"""The server with the embedded SmolLM2-135M-Instruct, through the official `openai` client:
real answers, streamed and not. (tests/test_server.py covers the API surface with a tiny
model; this module only checks that a real model answers as it does offline.)

Greedy continuation of PROMPT is " Paris.\\n\\nThe answer is:" and the greedy chat answer to
QUESTION is "The capital of France is Paris." (as in tests/test_llm_api.py).
"""

from __future__ import annotations

import openai
import pytest

from jaxvllm.engine.async_engine import AsyncLLMEngine
from jaxvllm.entrypoints.openai.server import ServerThread, build_app

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def client():
    # the engine settings of tests/test_llm_api.py: the compiled programs are shared
    engine = AsyncLLMEngine.from_engine_args(max_model_len=512, max_num_seqs=8, seed=0)
    try:
        with ServerThread(build_app(engine)) as server:
            yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                timeout=120)
    finally:
        engine.shutdown()


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_streamed_and_not(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    out = client.completions.create(**kw)
    assert out.choices[0].text == " Paris.\n\nThe answer is:"
    assert out.choices[0].finish_reason == "length" and out.usage.total_tokens == 13
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    stopped = client.completions.create(stop=["\n"], **kw).choices[0]
    assert stopped.text == " Paris." and stopped.finish_reason == "stop"


def test_chat_streamed_and_not(client):
    kw = dict(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    out = client.chat.completions.create(**kw)
    (choice,) = out.choices
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"  # the end-of-turn token, before max_tokens
    chunks = list(client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == choice.message.content
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage == out.usage
