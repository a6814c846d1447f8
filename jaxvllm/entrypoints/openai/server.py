"""The OpenAI-compatible HTTP server: a FastAPI app over an `AsyncLLMEngine`, run by uvicorn.

Routes (all but /health and /metrics need `Authorization: Bearer KEY` when an API key is set):

    POST /v1/completions        POST /v1/chat/completions      GET /v1/models[/{id}]
    POST /tokenize              POST /detokenize               GET /version
    GET  /health                GET  /metrics (Prometheus)

Handlers parse the body themselves so that every failure has an OpenAI error body
`{"error": {"message", "type", "param", "code"}}`: 400 malformed JSON or a bad value (sampling
values, context length, ...), 401 missing or wrong API key, 404 unknown model or route, 413 a
body over the size limit, 422 a field of the wrong type or a missing field. Non-streaming
handlers are cancelled when the client disconnects, streaming ones when a write fails; either
way the engine requests are aborted and their KV blocks freed.

The middlewares (middleware.py): the API-key check, the body-size limit, and the request
context (X-Request-Id in and out, one log line per request when its response ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
import time
from typing import Any, Optional, Sequence, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import jaxvllm
from jaxvllm.engine.async_engine import AsyncLLMEngine
from jaxvllm.entrypoints.openai.metrics import PrometheusStatLogger
from jaxvllm.entrypoints.openai.middleware import (APIKeyMiddleware, BodyLimitMiddleware,
                                                   RequestContextMiddleware)
from jaxvllm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                                 DetokenizeRequest, DetokenizeResponse,
                                                 ModelCard, ModelList, TokenizeChatRequest,
                                                 TokenizeCompletionRequest, TokenizeResponse)
from jaxvllm.entrypoints.openai.serving_base import OpenAIServing, ServingError, bad_request
from jaxvllm.entrypoints.openai.serving_chat import OpenAIServingChat
from jaxvllm.entrypoints.openai.serving_completion import OpenAIServingCompletion

logger = logging.getLogger("jaxvllm.server")

DEFAULT_MAX_REQUEST_BODY_BYTES = 32 << 20


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    return validate(await json_body(request), model)


async def json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ServingError(f"malformed JSON in the request body: {e}", 400) from e


def validate(data: Any, model: type[BaseModel]) -> BaseModel:
    if not isinstance(data, dict):
        raise ServingError("the request body must be a JSON object", 400)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from e


def _validation_error(e: ValidationError) -> ServingError:
    errors = e.errors(include_url=False)
    # a field that fits no member of a union reports once per member: say it once
    by_field: dict[str, str] = {}
    for err in errors:
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else ""
        if field not in by_field:
            by_field[field] = f"{'.'.join(loc) or 'body'}: {err['msg']}"
            if err["type"] != "missing" and "input" in err:
                by_field[field] += f" (got {json.dumps(err['input'], default=str)[:80]})"
    param = next(iter(by_field), None) or None
    return ServingError("; ".join(by_field.values()), 422, param)


async def _until_disconnect(request: Request, coro):
    """Run `coro`; cancel it (its `finally` aborts the engine requests) if the client
    disconnects first."""
    task = asyncio.ensure_future(coro)

    async def wait_disconnect():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    listener = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        listener.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return Response(status_code=499)  # nobody reads it: the client is gone


def _respond(result) -> Response:
    if isinstance(result, Response):
        return result
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


async def _generate(raw_request: Request, request_type: type[BaseModel], create) -> Response:
    """A completion or chat route: the body as `request_type`, `create(request, raw_request)`
    run until the client disconnects, its result as JSON or as an event stream."""
    request = await parse_body(raw_request, request_type)
    return _respond(await _until_disconnect(raw_request, create(request, raw_request)))


def build_app(engine: AsyncLLMEngine, *, served_model_names: Optional[Sequence[str]] = None,
              api_key: Union[str, Sequence[str], None] = None,
              max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
              allowed_origins: Optional[Sequence[str]] = None,
              shutdown_engine: bool = False) -> FastAPI:
    """The FastAPI app serving `engine`.

    `served_model_names`: names clients may send as `model` (the first is reported in
    responses; default: the model as it was named when loaded). `api_key`: one key or
    several. `shutdown_engine`: stop the engine thread when the app shuts down (the
    `jaxvllm serve` process); leave it False to share one engine between apps.
    """
    llm_engine = engine.engine
    names = list(served_model_names or [llm_engine.loaded.source.name])
    root = str(llm_engine.loaded.source.path)
    metrics = next((s for s in engine.stat_loggers if isinstance(s, PrometheusStatLogger)), None)
    if metrics is None:
        metrics = PrometheusStatLogger(names[0])
        engine.stat_loggers.append(metrics)
    base = OpenAIServing(engine, names)
    completion = OpenAIServingCompletion(engine, names, shared=base)
    chat = OpenAIServingChat(engine, names, shared=base)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            base.close()
            if shutdown_engine:
                await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="jaxvllm OpenAI-compatible server", version=jaxvllm.__version__,
                  lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    # -- errors ---------------------------------------------------------------------------

    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, e: ServingError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        error = ServingError(str(e.detail), e.status_code)
        return JSONResponse(error.body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, e: RequestValidationError):
        error = ServingError(str(e), 422)
        return JSONResponse(error.body(), status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        logger.exception("unhandled error")
        error = ServingError(f"internal server error: {type(e).__name__}: {e}", 500)
        return JSONResponse(error.body(), status_code=500)

    # -- routes ---------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not engine.is_running:
            reason = engine.dead_error or "not started or shutting down"
            raise ServingError(f"the engine is not running: {reason}", 503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": jaxvllm.__version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, root=root, max_model_len=engine.max_model_len)

    @app.get("/v1/models")
    async def list_models():
        return ModelList(data=[card(n) for n in names]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        base.check_model(model_id)
        return card(model_id).model_dump()

    @app.post("/v1/completions")
    async def create_completion(raw_request: Request):
        return await _generate(raw_request, CompletionRequest, completion.create_completion)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(raw_request: Request):
        return await _generate(raw_request, ChatCompletionRequest, chat.create_chat_completion)

    @app.post("/tokenize")
    async def tokenize(raw_request: Request):
        data = await json_body(raw_request)
        is_chat = isinstance(data, dict) and "messages" in data
        request = validate(data, TokenizeChatRequest if is_chat else TokenizeCompletionRequest)
        base.check_model(request.model)
        base.require_tokenizer("/tokenize", "messages" if is_chat else "prompt")

        def run():
            text = base.render_chat(request) if is_chat else request.prompt
            ids = base.encode(text, request.add_special_tokens)
            strs = (base.tokenizer.convert_ids_to_tokens(ids)
                    if request.return_token_strs else None)
            return ids, strs

        try:
            ids, strs = await base.off_loop(run)
        except ValueError as e:
            raise bad_request(e, ("messages", "prompt")) from e
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
                                token_strs=strs).model_dump(exclude_none=True)

    @app.post("/detokenize")
    async def detokenize(raw_request: Request):
        request = await parse_body(raw_request, DetokenizeRequest)
        base.check_model(request.model)
        base.require_tokenizer("/detokenize", "tokens")
        bad = [t for t in request.tokens if not 0 <= t < engine.vocab_size]
        if bad:
            raise ServingError(f"tokens: ids {bad[:8]} are outside the vocabulary "
                               f"[0, {engine.vocab_size})", 400, "tokens")
        text = await base.off_loop(base.tokenizer.decode, request.tokens)
        return DetokenizeResponse(prompt=text).model_dump()

    # -- middlewares (the last added runs first) ------------------------------------------

    app.add_middleware(BodyLimitMiddleware, limit=max_request_body_bytes)
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    if keys:
        app.add_middleware(APIKeyMiddleware, api_keys=keys)
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_credentials=True, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(RequestContextMiddleware)
    return app


# ---------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server, except that SIGINT/SIGTERM end in a normal exit after the graceful
    shutdown (uvicorn re-raises the signal afterwards); a second SIGINT still forces it."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self._on_signal)
                     for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig, frame):
        if not self.should_exit:
            logger.info("%s received: finishing in-flight requests (at most %s s), then "
                        "stopping", signal.Signals(sig).name,
                        self.config.timeout_graceful_shutdown)
        self.handle_exit(sig, frame)


def uvicorn_config(app: FastAPI, host: str, port: int, *, log_level: str = "info",
                   timeout_graceful_shutdown: Optional[float] = 10.0,
                   access_log: bool = False, **kwargs) -> uvicorn.Config:
    # log_config=None: uvicorn's loggers propagate to the process's logging set-up instead of
    # uvicorn running dictConfig, which closes every handler already installed (and their
    # streams, when a library such as absl installed one on a since-replaced sys.stderr).
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                          timeout_graceful_shutdown=timeout_graceful_shutdown, lifespan="on",
                          log_config=None, **kwargs)


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
               sock: Optional[socket.socket] = None, **kwargs) -> None:
    """Serve until SIGINT/SIGTERM, then finish or abort in-flight requests and return.
    `sock`: a socket already bound to host:port (bind early to fail before loading)."""
    _Server(uvicorn_config(app, host, port, **kwargs)).run(sockets=[sock] if sock else None)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port; OSError names the address when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


class ServerThread:
    """The app served from a background thread on a loopback port (tests, notebooks).

        with ServerThread(build_app(engine)) as server:
            openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, **kwargs):
        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        kwargs.setdefault("log_level", "warning")
        self.server = _Server(uvicorn_config(app, self.host, self.port, **kwargs))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="jaxvllm-http", daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
