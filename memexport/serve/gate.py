"""The ASGI gate in front of the app, the request body as the app reads it, and the one shape of every error answer.

:class:`Gate` counts and times every answer (``/metrics``) and refuses, before reading any of the body, a
request without the token (401, the policy of :func:`memexport.serve.options.authorized`), one declaring a
body over ``max_body_bytes`` (413), one in an encoding it cannot read (415), and new work while the server
is loading, full or draining (503). A refused request's body is never read: the answer goes out with
``Connection: close`` and the connection is closed, so ``Expect: 100-continue`` never turns into an
upload. Any error answered before the body was read in full closes the connection the same way.

Everything else reads its body through :class:`Body`: within the request's deadline (``timeout_s`` from
its arrival; past it, 408), inflated as it arrives when it is gzip or deflate (``Content-Encoding``),
capped at ``max_body_bytes`` after inflating (a zip bomb stops one byte past the cap, never inflated in
full), and counted against the server's budget of body bytes held at once (``max_queue`` times
``max_body_bytes``; past it, 503).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from typing import Any, Callable, Optional

from memexport.serve.metrics import endpoint_of
from memexport.serve.options import authorized
from memexport.serve.service import Service
from memexport.serve.v2 import RequestError, quoted

RETRY_AFTER_S = 1
# Content-Encoding -> zlib's wbits: gzip's header and trailer, or the zlib stream HTTP calls deflate.
ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
DEADLINE = "memexport.deadline"  # the ASGI scope key holding the request's deadline (event-loop time)


def request_headers(scope: dict) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def deadline_of(scope: dict) -> float:
    """The request's deadline on the event loop's clock (set by the gate when the request arrived)."""
    return scope[DEADLINE]


class Gate:
    """ASGI middleware: counts and times every answer, refuses early without reading the body, and hands
    the app a :class:`Body` that reads it within the deadline and the caps."""

    def __init__(self, app: Any, service: Callable[[], Service]) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service, start, seen = self.service(), time.perf_counter(), {"status": 500}
        scope[DEADLINE] = asyncio.get_running_loop().time() + service.options.timeout_s
        headers = request_headers(scope)
        body = Body(receive, headers, service, scope[DEADLINE])

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                if message["status"] >= 400 and body.unread:  # answer and close: the rest is never read
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            refusal = self.refusal(service, scope, headers)
            if refusal is not None:
                await error_response(refusal)(scope, receive, counted)
            else:
                await self.app(scope, body.receive, counted)
        finally:
            body.release()
            endpoint = endpoint_of(scope["path"])
            service.metrics.requests.labels(endpoint, str(seen["status"])).inc()
            service.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    @staticmethod
    def refusal(service: Service, scope: dict, headers: dict[str, str]) -> Optional[RequestError]:
        """The answer for a request refused before any of its body is read, or ``None`` to let it in."""
        options = service.options
        if not authorized(options.token, scope["path"], headers.get("authorization", "")):
            return RequestError(401, "missing or wrong bearer token; send the header Authorization: Bearer <token>")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > options.max_body_bytes:
            return RequestError(413, f"request body of {int(length):,} bytes is over the limit of {options.max_body_bytes:,}; send fewer or smaller images")
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ENCODINGS and encoding not in ("", "identity"):
            return RequestError(415, f"Content-Encoding {quoted(encoding)} is not read here; send the body as is, gzip or deflate")
        if scope["method"] == "POST":
            try:
                service.check_room()
            except RequestError as full:  # loading, draining or full: say so before the body is sent
                return full
        return None


class Body:
    """A request's body as the app reads it: within the deadline, inflated, capped and counted.

    Args:
        receive: The server's ASGI ``receive``.
        headers: The request's headers (lower-case names).
        service: The service, for the caps and the server's budget of body bytes.
        deadline: When reading must be done (event-loop time).
    """

    def __init__(self, receive: Callable, headers: dict[str, str], service: Service, deadline: float) -> None:
        self._receive = receive
        self._service = service
        self._deadline = deadline
        self._limit = service.options.max_body_bytes
        encoding = headers.get("content-encoding", "").strip().lower()
        self._inflater = Inflater(encoding) if encoding in ENCODINGS else None
        self.size = 0  # bytes handed to the app (inflated), held against the server's budget until release
        # A body is still unread while it may have bytes the app has not asked for.
        self.unread = headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers

    async def receive(self) -> dict:
        if not self.unread:
            return await self._receive()  # the body is done: only a disconnect can come
        left = self._deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self._receive(), left) if left > 0 else None
        except asyncio.TimeoutError:
            message = None
        if message is None:
            timeout = self._service.options.timeout_s
            raise RequestError(408, f"the request body did not arrive within {timeout:g} s (--timeout); send it at once, or smaller")
        if message["type"] != "http.request":
            self.unread = False
            return message
        more = message.get("more_body", False)
        data = message.get("body", b"")
        if self._inflater is not None:
            data = self._inflater.feed(data, self._limit - self.size, final=not more)
        if self.size + len(data) > self._limit:
            raise RequestError(413, f"request body is over the limit of {self._limit:,} bytes{' once inflated' if self._inflater else ''}; "
                                    "send fewer or smaller images")
        self._service.hold_body(len(data))
        self.size += len(data)
        self.unread = more
        return {"type": "http.request", "body": data, "more_body": more}

    def release(self) -> None:
        """Give the body's bytes back to the server's budget (the request is answered)."""
        self._service.hold_body(-self.size)
        self.size = 0


class Inflater:
    """A gzip or deflate body inflated as it arrives, never more than one byte past the room left.

    Args:
        encoding: ``gzip`` or ``deflate`` (a zlib stream; a raw deflate stream is read too).
    """

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._z = zlib.decompressobj(ENCODINGS[encoding])
        self._started = False

    def feed(self, chunk: bytes, room: int, final: bool) -> bytes:
        """The inflated bytes of ``chunk``: at most ``room + 1`` (one past the room tells the caller it is over).

        Raises:
            RequestError: 400 for a body that is not valid, truncated or followed by other data.
        """
        try:
            data = self._inflate(chunk, room)
        except zlib.error as exc:
            raise RequestError(400, f"the {self.encoding} body cannot be inflated ({exc}); send valid {self.encoding} or drop Content-Encoding") from None
        if len(data) > room:
            return data
        if self._z.eof and self._z.unused_data:
            raise RequestError(400, f"data follows the end of the {self.encoding} stream; send one {self.encoding} stream")
        if final and not self._z.eof:
            raise RequestError(400, f"the {self.encoding} body ends before its stream does (truncated); send it whole")
        return data

    def _inflate(self, chunk: bytes, room: int) -> bytes:
        if not self._started and chunk and self.encoding == "deflate":
            # HTTP's deflate is a zlib stream, but some clients send raw deflate: the first bytes tell which.
            self._started = True
            try:
                return self._z.decompress(chunk, room + 1)
            except zlib.error:
                self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._started = self._started or bool(chunk)
        return self._z.decompress(chunk, room + 1)


def error_response(error: RequestError) -> Any:
    """The protocol's error shape: ``{"error": "..."}`` with the status (and ``Retry-After`` on 503)."""
    from starlette.responses import JSONResponse

    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else {}
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": str(error) if error.status != 400 else error.args[0]}, status_code=error.status, headers=headers)
