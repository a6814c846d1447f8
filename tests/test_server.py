"""The OpenAI-compatible server through the official `openai` client (and raw HTTP where the
wire format itself is the point): every endpoint, streaming, n, logprobs, stop, usage, the
error bodies, the API key, 64 concurrent streams and client disconnects.

The model (conftest's `tiny_chat_model`) is a random 2-layer Llama carrying SmolLM2's
tokenizer and chat template: its text is nonsense, but it has a real vocabulary and template
and steps in milliseconds, so the expected texts are computed from the server itself (greedy,
so repeatable). One engine and one server on a loopback port serve the module; a second app
with an API key shares the engine. tests/test_server_smollm2.py checks real answers with the
embedded model.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from jaxvllm.engine.async_engine import AsyncLLMEngine
from jaxvllm.entrypoints.openai.server import ServerThread, build_app

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
BODY_LIMIT = 64 << 10
MAX_MODEL_LEN = 512
NAMES = ["tiny-chat", "tiny-alias"]


@pytest.fixture(scope="module")
def engine(tiny_chat_model):
    eng = AsyncLLMEngine.from_engine_args(model=str(tiny_chat_model), max_model_len=MAX_MODEL_LEN,
                                          max_num_seqs=16, seed=0)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    app = build_app(engine, served_model_names=NAMES, max_request_body_bytes=BODY_LIMIT)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


MODEL = NAMES[0]


def complete(client, **kw):
    kw.setdefault("model", MODEL)
    kw.setdefault("prompt", PROMPT)
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 8)
    return client.completions.create(**kw)


def chat(client, **kw):
    kw.setdefault("model", MODEL)
    kw.setdefault("messages", QUESTION)
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 8)
    return client.chat.completions.create(**kw)


def sse_events(server, path: str, body: dict) -> list[str]:
    """The `data:` payloads of a streamed response, read off the wire."""
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == ""  # every event ends with a blank line
    assert all(e.startswith("data: ") for e in events[:-1]), raw
    return [e[len("data: "):] for e in events[:-1]]


def metrics(server) -> dict[str, float]:
    """/metrics as {sample name with labels but model_name: value}."""
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        out[name.replace(f'model_name="{MODEL}"', "").replace("{,", "{").replace(",}", "}")
            .replace("{}", "")] = float(value)
    return out


def wait_idle(server, timeout: float = 30.0) -> dict[str, float]:
    """Poll /metrics (the test's side) until no request runs or waits."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m["jaxvllm:num_requests_running"] == 0 and m["jaxvllm:num_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


def free_blocks(engine) -> tuple[int, int]:
    async def read():
        return await engine.call(lambda e: (e.kv_manager.num_free_blocks, e.num_blocks - 1))

    return asyncio.run(read())


# ---------------------------------------------------------------------------------------------
# models, health, version
# ---------------------------------------------------------------------------------------------


def test_models_health_version(server, client, engine):
    models = client.models.list()
    assert [m.id for m in models.data] == NAMES
    card = models.data[0]
    assert card.object == "model" and card.owned_by == "jaxvllm"
    assert card.model_extra["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve("tiny-alias").id == "tiny-alias"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json() == {"version": "0.1.0"}
    # an alias is accepted; the first name is reported
    assert complete(client, model="tiny-alias", max_tokens=1).model == MODEL


# ---------------------------------------------------------------------------------------------
# completions
# ---------------------------------------------------------------------------------------------


def test_completion_request_id_and_usage(client):
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
        extra_headers={"X-Request-Id": "my-trace-42"})
    assert raw.headers["x-request-id"] == "my-trace-42"
    out = raw.parse()
    assert out.id == "cmpl-my-trace-42" and out.object == "text_completion"
    (choice,) = out.choices
    assert choice.text and choice.finish_reason == "length" and choice.index == 0
    usage = out.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (5, 8, 13)
    # reusing an id is fine
    again = complete(client, extra_headers={"X-Request-Id": "my-trace-42"})
    assert again.choices[0].text == choice.text
    generated = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPT,
                                                            max_tokens=1)
    assert generated.parse().id == f"cmpl-{generated.headers['x-request-id']}"


def test_completion_stream_equals_full(server, client):
    full = complete(client, max_tokens=12).choices[0].text
    chunks = list(complete(client, max_tokens=12, stream=True,
                           stream_options={"include_usage": True}))
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == full
    reasons = [c.choices[0].finish_reason for c in text_chunks]
    assert reasons[-1] == "length" and reasons.count("length") == 1 and set(reasons[:-1]) == {None}
    assert usage_chunk.choices == []
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (5, 12)
    assert len({c.id for c in chunks}) == 1

    events = sse_events(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12,
                                                    "temperature": 0, "stream": True})
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert all(p["object"] == "text_completion" and "usage" not in p for p in parsed)
    assert "".join(p["choices"][0]["text"] for p in parsed) == full

    continuous = [json.loads(e) for e in sse_events(server, "/v1/completions", {
        "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})[:-1]]
    assert [c["usage"]["completion_tokens"] for c in continuous][-1] == 4
    assert all(c["usage"]["prompt_tokens"] == 5 for c in continuous)


def test_completion_n_and_seed(client):
    kw = dict(temperature=1.0, n=3, max_tokens=6, seed=1234, extra_body={"ignore_eos": True})
    out = complete(client, **kw)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert len({c.text for c in out.choices}) == 3  # different samples
    assert out.usage.completion_tokens == 18 and out.usage.prompt_tokens == 5
    assert [c.text for c in complete(client, **kw).choices] == [c.text for c in out.choices]

    finishes: dict[int, list] = {0: [], 1: [], 2: []}
    texts = {0: "", 1: "", 2: ""}
    for chunk in complete(client, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            finishes[c.index].append(c.finish_reason)
    assert all(f[-1] == "length" and f.count("length") == 1 for f in finishes.values())
    assert [texts[i] for i in range(3)] == [c.text for c in out.choices]


def test_completion_prompt_forms(server, client):
    single = complete(client, max_tokens=4).choices[0].text
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert complete(client, prompt=ids, max_tokens=4).choices[0].text == single
    other = complete(client, prompt="Once upon a time", max_tokens=4)
    out = complete(client, prompt=[PROMPT, "Once upon a time"], max_tokens=4)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [single, other.choices[0].text]
    assert out.usage.prompt_tokens == 5 + other.usage.prompt_tokens
    assert out.usage.completion_tokens == 8
    both = complete(client, prompt=[ids, ids], max_tokens=4, n=2, temperature=0.5, seed=3)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    streamed = list(complete(client, prompt=[PROMPT, "Once upon a time"], max_tokens=4,
                             stream=True))
    assert sorted({c.choices[0].index for c in streamed}) == [0, 1]
    assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == 1) \
        == other.choices[0].text
    truncated = complete(client, prompt=[7, 8, 9] + ids, max_tokens=4,
                         extra_body={"truncate_prompt_tokens": 5})
    assert truncated.usage.prompt_tokens == 5 and truncated.choices[0].text == single


def test_completion_stop(client):
    full = complete(client, max_tokens=16).choices[0].text
    words = full.split()
    stop = words[len(words) // 2]
    expected = full[:full.index(stop)]
    out = complete(client, max_tokens=16, stop=[stop, "never-seen-stop-string"])
    (choice,) = out.choices
    assert choice.text == expected and choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop
    streamed = list(complete(client, max_tokens=16, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"
    kept = complete(client, max_tokens=16, stop=[stop],
                    extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == expected + stop
    ids = complete(client, max_tokens=16, extra_body={"return_token_ids": True}).choices[0]
    token = ids.model_extra["token_ids"][3]
    by_id = complete(client, max_tokens=16, extra_body={"stop_token_ids": [token]}).choices[0]
    assert by_id.finish_reason == "stop" and by_id.model_extra["stop_reason"] == token


def test_completion_logprobs_and_echo(client):
    out = complete(client, logprobs=2, max_tokens=4)
    (choice,) = out.choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 2 <= len(top) <= 3
        assert top[token] == pytest.approx(value)
        assert value == pytest.approx(max(top.values()))  # greedy took the most likely token

    streamed = list(complete(client, logprobs=2, max_tokens=4, stream=True))
    assert [t for c in streamed for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [o for c in streamed for o in c.choices[0].logprobs.text_offset] == lp.text_offset

    echo = complete(client, logprobs=1, max_tokens=4, echo=True).choices[0]
    assert echo.text == PROMPT + choice.text
    assert len(echo.logprobs.tokens) == 5 + 4
    assert echo.logprobs.token_logprobs[0] is None and echo.logprobs.top_logprobs[0] is None
    assert all(v is not None for v in echo.logprobs.token_logprobs[1:])
    assert "".join(echo.logprobs.tokens) == echo.text
    assert echo.logprobs.tokens[5:] == lp.tokens
    assert echo.logprobs.token_logprobs[5:] == pytest.approx(lp.token_logprobs)
    streamed_echo = list(complete(client, max_tokens=4, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed_echo) == PROMPT + choice.text

    prompt_only = complete(client, logprobs=1, max_tokens=0, echo=True)
    (scored,) = prompt_only.choices
    assert scored.text == PROMPT and prompt_only.usage.completion_tokens == 0
    assert scored.logprobs.tokens == echo.logprobs.tokens[:5]
    assert scored.logprobs.token_logprobs == pytest.approx(echo.logprobs.token_logprobs[:5])
    streamed_scored = list(complete(client, max_tokens=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed_scored) == PROMPT
    assert streamed_scored[-1].choices[0].finish_reason == "length"

    as_ids = complete(client, logprobs=0, max_tokens=2,
                      extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    assert all(t.startswith("token_id:") for t in as_ids.tokens)


def test_vllm_extra_sampling_fields(client):
    extra = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 3,
             "length_penalty": 1.0, "skip_special_tokens": True, "bad_words": ["the"],
             "spaces_between_special_tokens": True, "allowed_token_ids": list(range(100, 400)),
             "an_unknown_field": 1, "priority": 0}
    kw = dict(temperature=0.9, top_p=0.9, seed=7, max_tokens=6, presence_penalty=0.5,
              frequency_penalty=0.5, logit_bias={"200": 5}, extra_body=extra)
    first = complete(client, **kw)
    assert complete(client, **kw).choices[0].text == first.choices[0].text
    assert first.usage.completion_tokens == 6
    ids = complete(client, max_tokens=6, extra_body={
        "allowed_token_ids": [300, 301], "return_token_ids": True}).choices[0]
    assert set(ids.model_extra["token_ids"]) <= {300, 301}
    out = chat(client, max_tokens=6, extra_body={"ignore_eos": True, "min_tokens": 6})
    assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"


# ---------------------------------------------------------------------------------------------
# chat completions
# ---------------------------------------------------------------------------------------------


def test_chat(server, client, engine):
    out = chat(client, max_tokens=10)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    rendered = engine.tokenizer.apply_chat_template(QUESTION, tokenize=False,
                                                    add_generation_prompt=True)
    prompt_ids = engine.tokenizer.encode(rendered, add_special_tokens=False)
    assert out.usage.prompt_tokens == len(prompt_ids) and out.usage.completion_tokens == 10
    same = complete(client, prompt=prompt_ids, max_tokens=10).choices[0].text
    assert choice.message.content == same  # the template, then plain generation

    chunks = list(chat(client, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == out.usage
    body = chunks[:-1]
    assert "".join(c.choices[0].delta.content or "" for c in body) == choice.message.content
    reasons = [c.choices[0].finish_reason for c in body]
    assert reasons[-1] == "length" and reasons.count("length") == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    events = sse_events(server, "/v1/chat/completions",
                        {"messages": QUESTION, "max_tokens": 3, "stream": True})
    assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["delta"] == {
        "role": "assistant", "content": ""}


def test_chat_n_stop_and_options(client, engine):
    out = chat(client, n=2, temperature=1.0, seed=5, max_tokens=5)
    assert [c.index for c in out.choices] == [0, 1]
    streamed = {0: "", 1: ""}
    for chunk in chat(client, n=2, temperature=1.0, seed=5, max_tokens=5, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[0], streamed[1]] == [c.message.content for c in out.choices]

    full = chat(client, max_tokens=12).choices[0].message.content
    stop = full.split()[2]
    stopped = chat(client, max_tokens=12, stop=[stop]).choices[0]
    assert stopped.message.content == full[:full.index(stop)]
    assert stopped.finish_reason == "stop"

    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}]
    out = chat(client, messages=messages, max_tokens=None, max_completion_tokens=3)
    assert out.usage.completion_tokens == 3

    # no max_tokens: up to the context length (here a stop token ends it)
    ids = chat(client, max_tokens=6, extra_body={"return_token_ids": True}).choices[0]
    token_ids = ids.model_extra["token_ids"]
    unbounded = chat(client, max_tokens=None, extra_body={"stop_token_ids": [token_ids[5]]})
    assert unbounded.choices[0].finish_reason == "stop"
    assert unbounded.usage.completion_tokens == token_ids.index(token_ids[5]) + 1

    cont = chat(client, max_tokens=3, messages=QUESTION + [
        {"role": "assistant", "content": "The answer"}], extra_body={
        "add_generation_prompt": False, "continue_final_message": True, "echo": True})
    assert cont.choices[0].message.content.startswith("The answer")


def test_chat_logprobs(client):
    out = chat(client, logprobs=True, top_logprobs=2, max_tokens=5)
    (choice,) = out.choices
    content = choice.logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    assert "".join(c.token for c in content) == choice.message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes) == entry.token.encode()
    streamed = list(chat(client, logprobs=True, top_logprobs=2, max_tokens=5, stream=True))
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs
              for e in c.choices[0].logprobs.content]
    assert tokens == [c.token for c in content]
    assert chat(client, max_tokens=2).choices[0].logprobs is None
    plain = chat(client, logprobs=True, max_tokens=2).choices[0].logprobs.content
    assert len(plain) == 2 and all(e.top_logprobs == [] for e in plain)


# ---------------------------------------------------------------------------------------------
# tokenize / detokenize / metrics
# ---------------------------------------------------------------------------------------------


def test_tokenize_detokenize(server, engine):
    r = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT, "return_token_strs": True})
    body = r.json()
    assert body["count"] == len(body["tokens"]) == 5 and body["max_model_len"] == MAX_MODEL_LEN
    assert body["tokens"] == engine.tokenizer.encode(PROMPT)
    assert len(body["token_strs"]) == 5
    back = httpx.post(server.url + "/detokenize", json={"tokens": body["tokens"]}).json()
    assert back == {"prompt": PROMPT}
    chat_ids = httpx.post(server.url + "/tokenize", json={"messages": QUESTION}).json()
    rendered = engine.tokenizer.apply_chat_template(QUESTION, tokenize=False,
                                                    add_generation_prompt=True)
    assert chat_ids["tokens"] == engine.tokenizer.encode(rendered, add_special_tokens=False)


def test_metrics(server, client):
    chat(client, max_tokens=1)  # the chat prompt fills two KV blocks: a prefix hit below
    before = metrics(server)
    chat(client, max_tokens=3)
    after = metrics(server)
    assert after["jaxvllm:num_requests_running"] == after["jaxvllm:num_requests_waiting"] == 0
    assert after["jaxvllm:kv_cache_usage_perc"] == 0

    def delta(name):
        return after[name] - before[name]

    assert delta("jaxvllm:generation_tokens_total") == 3
    assert delta("jaxvllm:prompt_tokens_total") == 37
    assert delta("jaxvllm:time_to_first_token_seconds_count") == 1
    assert delta("jaxvllm:inter_token_latency_seconds_count") == 2
    assert delta("jaxvllm:e2e_request_latency_seconds_count") == 1
    assert delta('jaxvllm:request_success_total{finished_reason="length"}') == 1
    assert delta("jaxvllm:prefix_cache_queries_total") >= 37
    assert delta("jaxvllm:prefix_cache_hits_total") >= 32
    assert "jaxvllm:num_preemptions_total" in after


# ---------------------------------------------------------------------------------------------
# errors: status, OpenAI error body, and the next request still served
# ---------------------------------------------------------------------------------------------

LONG = "hello " * 600  # > 512 tokens

BAD_REQUESTS = [
    # (id, path, body (bytes: sent raw), status, param)
    ("malformed-json", "/v1/completions", b'{"prompt": "x",', 400, None),
    ("not-an-object", "/v1/completions", b'["x"]', 400, None),
    ("wrong-type", "/v1/completions", {"prompt": PROMPT, "max_tokens": "ten"}, 422, "max_tokens"),
    ("wrong-prompt-type", "/v1/completions", {"prompt": 3.5}, 422, "prompt"),
    ("missing-prompt", "/v1/completions", {"max_tokens": 3}, 422, "prompt"),
    ("missing-messages", "/v1/chat/completions", {"model": MODEL}, 422, "messages"),
    ("unknown-model", "/v1/completions", {"prompt": PROMPT, "model": "gpt-5"}, 404, "model"),
    ("unknown-model-chat", "/v1/chat/completions", {"messages": QUESTION, "model": "x"}, 404,
     "model"),
    ("top-p", "/v1/completions", {"prompt": PROMPT, "top_p": 1.5}, 400, "top_p"),
    ("temperature", "/v1/completions", {"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ("top-k", "/v1/completions", {"prompt": PROMPT, "top_k": -5}, 400, "top_k"),
    ("repetition-penalty", "/v1/chat/completions",
     {"messages": QUESTION, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("max-tokens-zero", "/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ("greedy-n", "/v1/completions", {"prompt": PROMPT, "temperature": 0, "n": 2}, 400, "n"),
    ("logprobs-too-many", "/v1/completions", {"prompt": PROMPT, "logprobs": 50}, 400, "logprobs"),
    ("bad-token-id", "/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("bad-stop-token-id", "/v1/completions", {"prompt": PROMPT, "stop_token_ids": [10**9]}, 400,
     "stop_token_ids"),
    ("empty-prompt", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("empty-messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("prompt-too-long", "/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("chat-too-long", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("max-tokens-too-large", "/v1/completions", {"prompt": PROMPT, "max_tokens": 600}, 400,
     "max_tokens"),
    ("suffix", "/v1/completions", {"prompt": PROMPT, "suffix": "end"}, 400, "suffix"),
    ("beam-search", "/v1/completions", {"prompt": PROMPT, "use_beam_search": True}, 400,
     "use_beam_search"),
    ("json-mode", "/v1/chat/completions",
     {"messages": QUESTION, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("tools", "/v1/chat/completions", {"messages": QUESTION, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "tool_choice"),
    ("top-logprobs-without-logprobs", "/v1/chat/completions",
     {"messages": QUESTION, "top_logprobs": 2}, 400, "top_logprobs"),
    ("image-content", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages"),
    ("stream-options-without-stream", "/v1/completions",
     {"prompt": PROMPT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("body-too-large", "/v1/completions", {"prompt": "x" * (BODY_LIMIT + 1)}, 413, None),
    ("detokenize-out-of-vocab", "/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("tokenize-unknown-model", "/tokenize", {"prompt": "x", "model": "y"}, 404, "model"),
    ("unknown-route", "/v1/nothing-here", {}, 404, None),
]


@pytest.fixture(scope="module")
def one_token(client) -> str:
    return complete(client, max_tokens=1).choices[0].text


@pytest.mark.parametrize("path,body,status,param", [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request(server, client, one_token, path, body, status, param):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"] and error["type"].endswith("Error")
    assert error["param"] == param, error
    assert complete(client, max_tokens=1).choices[0].text == one_token


def test_bad_request_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, top_p=3.0)
    assert "top_p" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        complete(client, model="not-this-model")
    with pytest.raises(openai.UnprocessableEntityError):
        complete(client, max_tokens="many")
    with pytest.raises(openai.BadRequestError):
        chat(client, messages=[{"role": "user", "content": LONG}])
    assert chat(client, max_tokens=2).usage.completion_tokens == 2


# ---------------------------------------------------------------------------------------------
# API key
# ---------------------------------------------------------------------------------------------


def test_api_key(engine, one_token):
    app = build_app(engine, served_model_names=NAMES, api_key="s3cret-key")
    with ServerThread(app) as keyed:
        good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="s3cret-key", max_retries=0)
        assert [m.id for m in good.models.list().data] == NAMES
        assert complete(good, max_tokens=1).choices[0].text == one_token
        assert len(list(chat(good, max_tokens=1, stream=True))) == 2
        for wrong in ("wrong", "s3cret-key-but-longer", "s3cret-ke"):
            bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key=wrong, max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                complete(bad, max_tokens=1)
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        for header in ("s3cret-key", "Basic s3cret-key", "Bearer"):  # no scheme, wrong scheme
            r = httpx.get(keyed.url + "/v1/models", headers={"Authorization": header})
            assert r.status_code == 401
        r = httpx.post(keyed.url + "/v1/completions", json={"prompt": PROMPT})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        error = r.json()["error"]
        assert error["code"] == 401 and error["type"] == "AuthenticationError"
        for method, path in (("GET", "/v1/models"), ("GET", "/version"), ("POST", "/tokenize"),
                             ("POST", "/v1/chat/completions"), ("POST", "/detokenize")):
            assert httpx.request(method, keyed.url + path, json={}).status_code == 401
        # open without a key
        assert httpx.get(keyed.url + "/health").status_code == 200
        assert "jaxvllm:num_requests_running" in httpx.get(keyed.url + "/metrics").text
        r = httpx.get(keyed.url + "/version", headers={"Authorization": "Bearer s3cret-key"})
        assert r.status_code == 200


# ---------------------------------------------------------------------------------------------
# concurrency and disconnects
# ---------------------------------------------------------------------------------------------


def test_64_concurrent_streams_match_solo_runs(server, client, engine):
    requests = [(f"Request {i}: " + "tell me something " * (i % 7), 1 + (i * 7) % 24)
                for i in range(64)]
    solo = [complete(client, prompt=p, max_tokens=k).choices[0] for p, k in requests]

    async def stream_all():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused",
                                     max_retries=0, timeout=300)

        async def one(prompt, max_tokens):
            text, reasons = "", []
            stream = await aclient.completions.create(model=MODEL, prompt=prompt, stream=True,
                                                      max_tokens=max_tokens, temperature=0)
            async for chunk in stream:
                for c in chunk.choices:
                    text += c.text
                    reasons.append(c.finish_reason)
            return text, reasons

        try:
            return await asyncio.gather(*(one(p, k) for p, k in requests))
        finally:
            await aclient.close()

    results = asyncio.run(stream_all())
    for (prompt, k), alone, (text, reasons) in zip(requests, solo, results):
        assert text == alone.text, (prompt, k)
        assert reasons[-1] == alone.finish_reason and sum(r is not None for r in reasons) == 1
    m = wait_idle(server, timeout=5)
    assert m["jaxvllm:num_requests_running"] == 0 and m["jaxvllm:kv_cache_usage_perc"] == 0
    free, usable = free_blocks(engine)
    assert free == usable


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_client_disconnect_aborts_and_frees_blocks(server, client, engine, one_token, stream):
    before = metrics(server)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 480, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            received = [next(lines) for _ in range(6)]  # 3 events, each with its blank line
        assert received[0].startswith("data: ")
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    m = wait_idle(server)
    assert m["jaxvllm:kv_cache_usage_perc"] == 0
    abort_key = 'jaxvllm:request_success_total{finished_reason="abort"}'
    assert m[abort_key] == before[abort_key] + 1
    assert m["jaxvllm:generation_tokens_total"] - before["jaxvllm:generation_tokens_total"] < 480
    free, usable = free_blocks(engine)
    assert free == usable
    assert httpx.get(server.url + "/health").status_code == 200
    assert complete(client, max_tokens=1).choices[0].text == one_token
