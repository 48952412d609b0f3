"""``memexport serve`` on uvicorn: the app of :mod:`memexport.serve.app`, draining on SIGTERM."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from memexport.core.errors import MemexportError
from memexport.core.optional import require
from memexport.serve.app import build_app
from memexport.serve.lookup import Registry
from memexport.serve.options import ServeOptions, check_host
from memexport.serve.service import Service


def serve(models: Sequence[tuple[str, Path]], options: ServeOptions, host: str = "127.0.0.1", port: int = 8000,
          insecure: bool = False, on_listen: Callable[[str], None] = print, grpc_port: Optional[int] = None) -> None:
    """Serve ``models`` (``(name, artifact)`` each, see :func:`memexport.runtime.names.name_artifacts`) on
    uvicorn until SIGTERM or Ctrl-C, then finish what was accepted.

    With ``grpc_port``, the V2 gRPC protocol too, on the same host and service (:mod:`memexport.serve.grpc`),
    every model by its served name, stopped after the drain.

    Raises:
        UsageError: A non-loopback host without a token or ``insecure`` (see :func:`check_host`).
    """
    check_host(host, options.token, insecure)
    uvicorn = require("uvicorn", "serve", "memexport serve")
    from memexport.runtime.registry import backend_for

    for _, model in models:
        backend_for(model, options.backend)  # an unknown artifact type fails before the server starts
    if grpc_port is not None:
        from memexport.serve.grpc.server import check_available

        check_available()
    state: dict[str, Service] = {}

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        state["service"] = Service(models, options)
        grpc_server = None
        if grpc_port is not None:
            from memexport.serve.grpc.server import start_grpc

            try:
                grpc_server = await start_grpc(Registry(lambda: state["service"]), options, host, grpc_port, on_listen)
            except MemexportError as error:  # the port cannot be bound: one line, as a loading failure
                server.report_failure(error)
                yield
                return
        loading = asyncio.ensure_future(state["service"].start())
        loading.add_done_callback(lambda task: task.cancelled() or task.exception() is None or server.report_failure(task.exception()))
        yield
        loading.cancel()
        if grpc_server is not None:  # after the drain: nothing accepted is left, only probes may be cut
            await grpc_server.stop(options.timeout_s)
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
                    self._on_listen(f"memexport serve: listening on http://{host}:{port} (loading the models; ready at /v2/health/ready)")

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
