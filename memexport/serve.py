"""``memexport serve``: one artifact behind the KServe V2 REST protocol, ``/score`` and a page.

One :class:`Service` holds the loaded :class:`~memexport.runtime.predictor.Predictor`, decodes
request images on a small thread pool with the runtime's own preprocessing, and hands batches
to an inference function: the plain server's :class:`~memexport.serve_batching.Batcher`, or Ray
Serve's ``@serve.batch`` (:mod:`memexport.serve_ray`). :func:`build_app` is the FastAPI app both
engines serve, so their answers are the same. Guarantees:

* at most ``max_queue`` requests are accepted at a time; past it, 503 with ``Retry-After``, and
  every accepted request is answered (SIGTERM stops accepting, then finishes them);
* the event loop never decodes, parses big bodies or infers: threads do;
* the server never opens a path named by a request; bodies over ``max_body_bytes`` get 413;
* a bearer token guards everything but the health checks and the page itself.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, Sequence

import numpy as np

from memexport.core.errors import InputImageError, UsageError
from memexport.core.optional import require
from memexport.serve_v2 import IMAGE, InferRequest, RequestError, check_version, model_metadata

TOKEN_ENV = "MEMEXPORT_SERVE_TOKEN"
# Paths anyone may read without the token: probes, and the page (it holds no data; it asks for the token).
PUBLIC_PATHS = ("/v2/health/live", "/v2/health/ready", "/")
RETRY_AFTER_S = 1
# A refused body is read and dropped up to this many times the body cap, then the connection is cut.
DRAIN_FACTOR = 4


@dataclass(frozen=True)
class ServeOptions:
    """How ``memexport serve`` loads its model and guards its door.

    Attributes:
        backend: Back end (default ``None``: by the artifact's suffix, ``.onnx`` -> ONNX Runtime).
        precision: Compute precision where the back end offers one (default ``None``: exact).
        device: ``cpu``, ``cuda`` or ``auto`` (default ``auto``).
        max_batch_size: Images per inference call (default 16).
        max_delay_ms: How long a request waits for others to batch with (default 5 ms).
        max_queue: Requests accepted at once (decoding, queued or running); past it, 503 (default 64).
        max_body_bytes: Largest request body; past it, 413 (default 64 MiB).
        timeout_s: Per-request limit from acceptance to answer; past it, 504 (default 30 s).
        workers: Decoding threads (default ``None``: one per core, at most 8).
        token: Bearer token required on every request but health and the page (default ``None``).
        check_integrity: Verify the artifact's recorded digest before loading (default ``True``).
        decode: ``exact`` (default: the original code's pixels) or ``fast`` (JPEGs at a DCT scale; see
            :class:`~memexport.runtime.predictor.Predictor`).
    """

    backend: Optional[str] = None
    precision: Optional[str] = None
    device: str = "auto"
    max_batch_size: int = 16
    max_delay_ms: float = 5.0
    max_queue: int = 64
    max_body_bytes: int = 64 * 1024 * 1024
    timeout_s: float = 30.0
    workers: Optional[int] = None
    token: Optional[str] = None
    check_integrity: bool = True
    decode: str = "exact"

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_delay_ms < 0 or self.timeout_s <= 0:
            raise UsageError(f"--max-delay-ms must be >= 0 and --timeout > 0, got {self.max_delay_ms} and {self.timeout_s}")


def resolve_token(token: Optional[str]) -> Optional[str]:
    """The token given, else the ``MEMEXPORT_SERVE_TOKEN`` environment variable, else ``None``."""
    return token or os.environ.get(TOKEN_ENV) or None


def check_host(host: str, token: Optional[str], insecure: bool) -> None:
    """Refuse to listen beyond this machine without a token, unless told ``--insecure``.

    Raises:
        UsageError: A non-loopback ``host`` with no token and no ``insecure``.
    """
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not token and not insecure:
        raise UsageError(f"--host {host} lets other machines in; set --token (or {TOKEN_ENV}) to require a bearer token, "
                         "or pass --insecure to serve without one")


def load_predictor(model: Path, options: ServeOptions) -> Any:
    """The one place serve builds its :class:`Predictor` (new predictor options are passed here).

    The runner is entered here, so ``--no-integrity-check`` can reach it; the caller exits it
    (``predictor.runner.__exit__``) after ``predictor.close()``.
    """
    from memexport.runtime.base import RunnerOptions
    from memexport.runtime.predictor import Predictor
    from memexport.runtime.registry import runner_for

    # varying_batch: the batcher forms batches of every size up to max_batch_size.
    runner_options = RunnerOptions(device=options.device, check_integrity=options.check_integrity, varying_batch=True)
    runner = runner_for(model, runner_options, options.backend,
                        precision=options.precision)
    with_runner = runner.__enter__()
    try:
        return Predictor(with_runner, batch_size=options.max_batch_size, decode=options.decode)
    except BaseException:
        runner.__exit__(None, None, None)
        raise


class Metrics:
    """The Prometheus series of ``GET /metrics``, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        pc = require("prometheus_client", "serve", "memexport serve")
        self.registry = pc.CollectorRegistry()
        self.requests = pc.Counter("memexport_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"], registry=self.registry)
        self.latency = pc.Histogram("memexport_request_seconds", "Time from arrival to answer, by endpoint", ["endpoint"], registry=self.registry,
                                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch_size = pc.Histogram("memexport_batch_size", "Images per inference call formed by the batcher", registry=self.registry,
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queue_depth = pc.Gauge("memexport_queue_depth", "Requests accepted and not yet answered", registry=self.registry)
        self.images = pc.Counter("memexport_images_scored", "Images scored", registry=self.registry)
        self.input_errors = pc.Counter("memexport_input_errors", "Bad input images, by kind", ["kind"], registry=self.registry)
        self._latest = pc.generate_latest
        self.content_type = pc.CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        return self._latest(self.registry)


InferFn = Callable[[np.ndarray], Awaitable[np.ndarray]]


class Service:
    """The loaded model plus admission, decoding and batching: what every route calls.

    Args:
        model: The artifact.
        options: :class:`ServeOptions`.
    """

    def __init__(self, model: Path, options: ServeOptions) -> None:
        self.model_path = Path(model)
        self.options = options
        self.metrics = Metrics()
        self.predictor: Any = None
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._batcher: Any = None
        self._infer: Optional[InferFn] = None
        from memexport.runtime.batch import default_workers

        self._pool = ThreadPoolExecutor(options.workers or default_workers(), thread_name_prefix="memexport-decode")

    # -- life cycle ---------------------------------------------------------------------------

    def load(self) -> None:
        """Load the artifact (integrity first) and warm it up at batch 1 and the largest batch (blocking)."""
        self.predictor = load_predictor(self.model_path, self.options)
        shape = tuple(self.predictor.metadata.input_shape)
        for size in sorted({1, self.options.max_batch_size}):
            self.predictor.infer(np.zeros((size, *shape), np.float32))

    async def start(self) -> None:
        """Load on a thread (``live`` answers meanwhile), then start the plain server's batcher and turn ready."""
        from memexport.serve_batching import Batcher

        await asyncio.get_running_loop().run_in_executor(None, self.load)
        self._batcher = Batcher(self.predictor.infer, self.options.max_batch_size, self.options.max_delay_ms / 1000,
                                self.metrics.batch_size.observe)
        self._batcher.start()
        self.activate(self._batcher.submit)

    def activate(self, infer: InferFn) -> None:
        """Turn ready, scoring through ``infer`` (the batcher's ``submit``, or Ray Serve's batched method)."""
        self._infer = infer
        self.ready = True

    async def stop(self) -> None:
        """Stop accepting, answer everything accepted, then release the model."""
        self.draining = True
        if self.in_flight:
            self._idle.clear()
            await self._idle.wait()
        if self._batcher is not None:
            await self._batcher.stop()
        self._pool.shutdown(wait=True)
        if self.predictor is not None:
            self.predictor.close()
            self.predictor.runner.__exit__(None, None, None)  # entered by load_predictor, not by the Predictor

    # -- what routes call -----------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        self.require_ready()
        return self.predictor.metadata.model

    def require_ready(self) -> None:
        if not self.ready:
            raise RequestError(503, f"the model is still loading ({self.model_path.name}); retry shortly")

    def check_model(self, model: str, version: Optional[str] = None) -> None:
        if model != self.model_name:
            raise RequestError(404, f"unknown model {model!r}; this server serves {self.model_name!r}")
        check_version(version)

    def metadata(self) -> dict[str, Any]:
        meta = self.predictor.metadata
        return model_metadata(meta.model, f"memexport_{self.predictor.runner.backend}", meta.input_shape)

    def admit(self) -> None:
        """Take a slot, or 503 when draining or full. Every admitted request calls :meth:`release` once."""
        self.require_ready()
        if self.draining:
            raise RequestError(503, "the server is shutting down; retry on another replica")
        if self.in_flight >= self.options.max_queue:
            raise RequestError(503, f"the server is busy ({self.in_flight} requests queued, --max-queue {self.options.max_queue}); retry shortly")
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)

    def release(self, _: object = None) -> None:
        self.in_flight -= 1
        self.metrics.queue_depth.set(self.in_flight)
        if self.in_flight == 0:
            self._idle.set()

    async def offload(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run ``func`` on the decoding pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    async def decode(self, rows: Sequence[bytes], names: Sequence[str]) -> list[Any]:
        """Each encoded image preprocessed, or its :class:`InputImageError` (counted by kind)."""
        def one(data: bytes, name: str) -> Any:
            try:
                return self.predictor.preprocess_bytes(data, name)
            except InputImageError as error:
                return error

        items = await asyncio.gather(*(self.offload(one, data, name) for data, name in zip(rows, names)))
        for item in items:
            if isinstance(item, InputImageError):
                self.metrics.input_errors.labels(item.reason).inc()
        return list(items)

    async def score(self, batch: np.ndarray) -> np.ndarray:
        """Scores for a preprocessed batch, through the batcher; 504 past the per-request timeout.

        A timed-out request keeps its slot until its batch has run, so the queue stays bounded.
        """
        assert self._infer is not None
        task = asyncio.ensure_future(self._infer(batch))
        try:
            scores = await asyncio.wait_for(asyncio.shield(task), self.options.timeout_s)
        except asyncio.TimeoutError:
            self.in_flight += 1
            task.add_done_callback(self.release)
            raise RequestError(504, f"no answer within {self.options.timeout_s:g} s (server overloaded); retry later") from None
        self.metrics.images.inc(len(scores))
        return scores

    async def infer(self, request: InferRequest) -> np.ndarray:
        """All or nothing: one bad image row fails the request with one line per bad row."""
        if request.input_name != IMAGE:
            return await self.score(request.rows)
        items = await self.decode(request.rows, [f"row {i}" for i in range(request.count)])
        bad = [str(item) for item in items if isinstance(item, InputImageError)]
        if bad:
            raise RequestError(400, "\n".join(bad))
        return await self.score(np.stack(items))

    async def score_files(self, files: Sequence[tuple[str, bytes]]) -> list[dict[str, Any]]:
        """``/score``: every good file scored, every bad one reported, in the order sent."""
        items = await self.decode([data for _, data in files], [name for name, _ in files])
        good = [item for item in items if not isinstance(item, InputImageError)]
        scores = iter((await self.score(np.stack(good))).tolist() if good else [])
        return [{"file": name, "error": item.detail} if isinstance(item, InputImageError) else {"file": name, "score": float(next(scores))}
                for (name, _), item in zip(files, items)]


def endpoint_of(path: str) -> str:
    """A short, bounded label for metrics (never the raw path: it could be anything)."""
    if path.endswith("/infer"):
        return "infer"
    if path in ("/score", "/metrics", "/"):
        return path.strip("/") or "page"
    return "v2" if path.startswith("/v2") else "other"


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
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        token = service.options.token
        if token and scope["path"] not in PUBLIC_PATHS:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
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
