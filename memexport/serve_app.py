"""The FastAPI app ``memexport serve`` runs, on uvicorn or under Ray Serve, and the uvicorn runner.

Routes only move bytes between HTTP and :class:`~memexport.serve.Service`; the V2 wire format is
:mod:`memexport.serve_v2`. Responses are built by hand (no response models), so the JSON is exactly
the protocol's.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, and `Request`
# is imported inside build_app (fastapi is optional), where only evaluated annotations can see it.
import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

from memexport.core.optional import require
from memexport.core.version import __version__
from memexport.serve import Gate, ServeOptions, Service, error_response, check_host
from memexport.serve_v2 import HEADER_LENGTH, RequestError, infer_response, parse_infer, server_metadata

# /score: at most this many files per request (the body cap bounds their bytes).
MAX_FILES = 256


def build_app(service: Callable[[], Service], lifespan: Optional[Callable] = None) -> Any:
    """The app; ``service`` returns the live :class:`Service` (per process: under Ray, per replica)."""
    fastapi = require("fastapi", "serve", "memexport serve")
    from fastapi import Request
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse, Response

    app = fastapi.FastAPI(title="memexport", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gate, service=service)
    app.add_exception_handler(RequestError, lambda request, exc: error_response(exc))
    app.add_exception_handler(HTTPException, lambda request, exc: error_response(RequestError(exc.status_code, str(exc.detail))))
    # Anything else is the server's fault, still answered in the protocol's shape, on one line.
    app.add_exception_handler(Exception, lambda request, exc: error_response(RequestError(500, f"internal error: {type(exc).__name__}: {exc}")))

    @app.get("/v2")
    async def server() -> Response:
        return JSONResponse(server_metadata(__version__))

    @app.get("/v2/health/live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        state = service()
        ok = state.ready and not state.draining
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def metadata(model: str, version: Optional[str] = None) -> Response:
        service().check_model(model, version)
        return JSONResponse(service().metadata())

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: Optional[str] = None) -> Response:
        service().check_model(model, version)
        return JSONResponse({"name": model, "ready": True})

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: Optional[str] = None) -> Response:
        state = service()
        state.check_model(model, version)
        state.admit()
        try:
            body = await request.body()
            parsed = await state.offload(parse_infer, body, request.headers.get(HEADER_LENGTH), state.predictor.metadata.input_shape)
            scores = await state.infer(parsed)
        finally:
            state.release()
        content, headers = infer_response(state.model_name, parsed, scores)
        return Response(content, headers=headers)

    @app.post("/score")
    async def score(request: Request) -> Response:
        state = service()
        state.admit()
        try:
            files = await read_files(request)
            results = await state.score_files(files)
        finally:
            state.release()
        return JSONResponse(results)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service().metrics.render(), media_type=service().metrics.content_type)

    @app.get("/")
    async def page() -> Response:
        from memexport.serve_page import PAGE

        return HTMLResponse(PAGE)

    return app


async def read_files(request: Any) -> list[tuple[str, bytes]]:
    """The uploaded files of a multipart ``/score`` request as ``(name, bytes)``; names are labels, never paths."""
    require("multipart", "serve", "POST /score")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError(400, "send the images as multipart/form-data, e.g. curl -F file=@photo.jpg")
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
    except RequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - the multipart parser raises its own types on malformed bodies
        raise RequestError(400, f"malformed multipart body ({' '.join(str(exc).split())[:120]}); send files as form fields") from None
    try:
        files = [(str(value.filename or key), await value.read()) for key, value in form.multi_items() if hasattr(value, "filename")]
    finally:
        await form.close()
    if not files:
        raise RequestError(400, "no files in the request; send images as form files, e.g. curl -F file=@photo.jpg")
    return files


def serve(model: Path, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, insecure: bool = False,
          on_listen: Callable[[str], None] = print) -> None:
    """Serve ``model`` on uvicorn until SIGTERM or Ctrl-C, then finish what was accepted.

    Raises:
        UsageError: A non-loopback host without a token or ``insecure`` (see :func:`check_host`).
    """
    check_host(host, options.token, insecure)
    uvicorn = require("uvicorn", "serve", "memexport serve")
    from memexport.runtime.registry import backend_for

    backend_for(model, options.backend)  # an unknown artifact type fails before the server starts
    state: dict[str, Service] = {}

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        state["service"] = Service(model, options)
        loading = asyncio.ensure_future(state["service"].start())
        loading.add_done_callback(lambda task: task.cancelled() or task.exception() is None or server.report_failure(task.exception()))
        yield
        loading.cancel()
        await state["service"].stop()

    app = build_app(lambda: state["service"], lifespan)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=options.timeout_s + 5,
                            limit_concurrency=None)
    server = DrainingServer(config, lambda: state.get("service"), on_listen)
    server.run()
    if server.failure is not None:
        raise server.failure


def _make_server_class() -> type:
    uvicorn = require("uvicorn", "serve", "memexport serve")

    class _DrainingServer(uvicorn.Server):
        """uvicorn's server, draining on the first SIGTERM/Ctrl-C: it keeps listening and answers new work
        503 (``Retry-After``; not ready) until every accepted request is answered, then shuts down. A
        load balancer thus sees a refusal it can retry elsewhere rather than a refused connection."""

        def __init__(self, config: Any, service: Callable[[], Optional[Service]], on_listen: Callable[[str], None]) -> None:
            super().__init__(config)
            self._service = service
            self._on_listen = on_listen
            self._loop: Optional[asyncio.AbstractEventLoop] = None
            self.failure: Optional[BaseException] = None

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            self._loop = asyncio.get_running_loop()
            for server in getattr(self, "servers", []):
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    self._on_listen(f"memexport serve: listening on http://{host}:{port} (loading the model; ready at /v2/health/ready)")

        def handle_exit(self, sig: int, frame: Any) -> None:
            service, loop = self._service(), self._loop
            if service is None or loop is None or service.draining:  # not started, or a second signal: stop now
                return super().handle_exit(sig, frame)
            service.draining = True
            # A signal handler: schedule the drain on the loop rather than run anything here.
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain(service, sig, frame)))

        async def _drain(self, service: Service, sig: int, frame: Any) -> None:
            """Wait (at most the graceful timeout) until nothing accepted is left, then uvicorn's own exit."""
            deadline = time.monotonic() + self.config.timeout_graceful_shutdown
            while service.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            uvicorn.Server.handle_exit(self, sig, frame)

        def report_failure(self, error: BaseException) -> None:
            """Loading failed: stop the server and let :func:`serve` raise the error."""
            self.failure = error
            self.should_exit = True

    return _DrainingServer


def DrainingServer(config: Any, service: Callable[[], Optional[Service]], on_listen: Callable[[str], None]) -> Any:
    """uvicorn's ``Server`` that drains on SIGTERM (built lazily: uvicorn is optional)."""
    return _make_server_class()(config, service, on_listen)
