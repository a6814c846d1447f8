"""The server's ASGI middlewares, plain ASGI so that streamed responses pass through
untouched: the API-key check, the request-body size limit, and the request context
(X-Request-Id in and out, one log line per request when its response ends)."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from typing import Optional, Sequence

from jaxvllm.entrypoints.openai.serving_base import ServingError

request_logger = logging.getLogger("jaxvllm.server.requests")  # the line per request
OPEN_PATHS = ("/health", "/metrics")  # answered without an API key


async def _send_error(send, error: ServingError, headers: Sequence[tuple[bytes, bytes]] = ()):
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer <one of the keys>`; keys compared in constant time."""

    def __init__(self, app, api_keys: Sequence[str]):
        self.app = app
        self.keys = [k.encode() for k in api_keys]

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope["method"] == "OPTIONS"
                or scope["path"] in OPEN_PATHS):
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        ok = False
        for key in self.keys:  # no early exit: the time does not depend on which key matched
            ok |= hmac.compare_digest(token.strip(), key)
        if scheme.lower() != b"bearer" or not ok:
            error = ServingError("Incorrect or missing API key: send the header "
                                 "'Authorization: Bearer <key>'.", 401)
            return await _send_error(send, error, [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over `limit` bytes, from Content-Length or while it is read; the body
    is buffered (bounded by the limit) and replayed to the app."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_large = ServingError(f"the request body is larger than the server's limit of "
                                 f"{self.limit} bytes", 413)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_error(send, too_large, [(b"connection", b"close")])
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _send_error(send, too_large, [(b"connection", b"close")])
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: http.disconnect, when it comes

        return await self.app(scope, replay, send)


class RequestContextMiddleware:
    """X-Request-Id echoed back (or created), and one log line per request:
    `client "METHOD path" status seconds id=... prompt_tokens=... completion_tokens=...`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        status = [500]
        logged = [False]

        def log_line():
            if logged[0]:
                return
            logged[0] = True
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            extra = state.get("log_info", "")
            request_logger.info('%s "%s %s" %d %.3fs%s', where, scope["method"], scope["path"],
                        status[0], time.perf_counter() - start, f" {extra}" if extra else "")

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                rid = state.get("request_id") or _header(scope, b"x-request-id") or uuid.uuid4().hex
                message = dict(message)
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", str(rid).encode())]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log_line()

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log_line()


def _header(scope, name: bytes) -> Optional[str]:
    value = dict(scope["headers"]).get(name)
    return value.decode("latin-1") if value else None
