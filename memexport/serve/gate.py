"""The ASGI gate in front of the app, and the one shape of every error answer.

:class:`Gate` counts and times every answer (``/metrics``), refuses a request without the token
(401, the policy of :func:`memexport.serve.options.authorized`) or with a declared body over
``max_body_bytes`` (413), and caps bodies sent without a length while they arrive. A refused
body is drained (up to :data:`DRAIN_FACTOR` times the cap) so the client reads the answer.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from memexport.serve.metrics import endpoint_of
from memexport.serve.options import authorized
from memexport.serve.service import Service
from memexport.serve.v2 import RequestError

RETRY_AFTER_S = 1
# A refused body is read and dropped up to this many times the body cap, then the connection is cut.
DRAIN_FACTOR = 4


class Gate:
    """ASGI middleware: counts and times every answer; refuses a missing token (401), a declared
    oversized body (413) and, while draining, new work (503); caps bodies sent without a length."""

    def __init__(self, app: Any, service: Callable[[], Service]) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service, start, seen = self.service(), time.perf_counter(), {"status": 500}

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        try:
            refusal = self.refusal(service, scope)
            if refusal is not None:
                await drain(receive, DRAIN_FACTOR * service.options.max_body_bytes)
                await error_response(refusal)(scope, receive, counted)
            else:
                await self.app(scope, capped(receive, service.options.max_body_bytes), counted)
        finally:
            endpoint = endpoint_of(scope["path"])
            service.metrics.requests.labels(endpoint, str(seen["status"])).inc()
            service.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    @staticmethod
    def refusal(service: Service, scope: dict) -> Optional[RequestError]:
        """The answer for a request refused before the app sees it, or ``None`` to let it in."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not authorized(service.options.token, scope["path"], headers.get("authorization", "")):
            return RequestError(401, "missing or wrong bearer token; send the header Authorization: Bearer <token>")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > service.options.max_body_bytes:
            return RequestError(413, f"request body of {int(length):,} bytes is over the limit of {service.options.max_body_bytes:,}; send fewer or smaller images")
        return None


async def drain(receive: Callable, limit: int) -> None:
    """Read and drop the rest of a refused body (at most ``limit`` bytes), so the client, which
    sends its whole body before reading, gets the error answer instead of a broken pipe."""
    seen = 0
    while seen <= limit:
        message = await receive()
        seen += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def capped(receive: Callable, limit: int) -> Callable:
    """``receive`` that raises 413 once more than ``limit`` body bytes have arrived (the rest is drained)."""
    total = 0

    async def wrapped() -> dict:
        nonlocal total
        message = await receive()
        total += len(message.get("body", b""))
        if total > limit:
            if message.get("more_body", False):
                await drain(receive, DRAIN_FACTOR * limit)
            raise RequestError(413, f"request body is over the limit of {limit:,} bytes; send fewer or smaller images")
        return message

    return wrapped


def error_response(error: RequestError) -> Any:
    """The protocol's error shape: ``{"error": "..."}`` with the status (and ``Retry-After`` on 503)."""
    from starlette.responses import JSONResponse

    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else {}
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": str(error) if error.status != 400 else error.args[0]}, status_code=error.status, headers=headers)
