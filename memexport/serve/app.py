"""The FastAPI app ``memexport serve`` runs, on uvicorn (:mod:`memexport.serve.runner`) or under Ray Serve.

Routes only move bytes between HTTP and :class:`~memexport.serve.service.Service`; the V2 wire format is
:mod:`memexport.serve.v2`, the gate in front of the routes :mod:`memexport.serve.gate`. Responses are
built by hand (no response models), so the JSON is exactly the protocol's. The page at ``/`` is the
resource file ``page.html`` beside this module.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, and `Request`
# is imported inside build_app (fastapi is optional), where only evaluated annotations can see it.
import functools
from importlib import resources
from typing import Any, Callable, Optional

from memexport.core.optional import require
from memexport.core.version import __version__
from memexport.serve.extensions import add_extension_routes
from memexport.serve.gate import Gate, deadline_of, error_response
from memexport.serve.lookup import Registry
from memexport.serve.service import Service
from memexport.serve.v2 import HEADER_LENGTH, RequestError, infer_response, server_metadata

# /score answers each file under its name, cut to this many characters (a name is a label, never echoed in full).
MAX_NAME = 255


def build_app(service: Callable[[], Service], lifespan: Optional[Callable] = None) -> Any:
    """The app; ``service`` returns the live :class:`Service` (per process: under Ray, per replica)."""
    fastapi = require("fastapi", "serve", "memexport serve")
    from fastapi import Request
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import HTMLResponse, JSONResponse, Response

    app = fastapi.FastAPI(title="memexport", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gate, service=service)
    app.add_exception_handler(RequestError, lambda request, exc: error_response(exc))
    app.add_exception_handler(HTTPException, lambda request, exc: error_response(RequestError(exc.status_code, str(exc.detail))))
    app.add_exception_handler(ClientDisconnect, lambda request, exc: error_response(RequestError(400, "the client went away before its body arrived")))
    # Anything else is the server's fault, still answered in the protocol's shape, on one line.
    app.add_exception_handler(Exception, lambda request, exc: error_response(RequestError(500, f"internal error: {type(exc).__name__}: {exc}")))
    models = Registry(service)  # every route finds a model by its served name here (404 naming the served ones)
    # Triton's statistics and model-config extensions; first, so /v2/models/stats is not taken for a model's name.
    add_extension_routes(app, models)

    @app.get("/v2")
    async def server() -> Response:
        return JSONResponse(server_metadata(__version__))

    @app.get("/v2/health/live")
    async def live() -> Response:
        ok = service().live
        return JSONResponse({"live": ok}, status_code=200 if ok else 503)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        ok = service().ready
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def metadata(model: str, version: Optional[str] = None) -> Response:
        return JSONResponse(models.service_for(model, version).metadata())

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: Optional[str] = None) -> Response:
        served = models.service_for(model, version)
        ok = service().model_ready(served)
        return JSONResponse({"name": served.name, "ready": ok}, status_code=200 if ok else 503)

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: Optional[str] = None) -> Response:
        state, served = service(), models.service_for(model, version)
        body = await request.body()  # through the gate: within the deadline, inflated, capped; no slot held yet
        deadline = deadline_of(request.scope)
        parsed, scores = await state.run(deadline, lambda: state.infer_body(served, body, request.headers.get(HEADER_LENGTH), deadline))
        content, headers = infer_response(served.name, parsed, scores)
        return Response(content, headers=headers)

    @app.post("/score")
    async def score(request: Request) -> Response:
        state = service()
        files = await read_files(request, state.options.max_rows)
        deadline = deadline_of(request.scope)
        return JSONResponse(await state.run(deadline, lambda: state.score_files(files, deadline)))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service().metrics.render(), media_type=service().metrics.content_type)

    @app.get("/")
    async def page() -> Response:
        return HTMLResponse(page_html())

    return app


async def read_files(request: Any, max_files: int) -> list[tuple[str, bytes]]:
    """The uploaded files of a multipart ``/score`` request as ``(name, bytes)``; names are labels, never paths.

    Raises:
        RequestError: 400 for a body that is not multipart or not well formed; 413 past ``max_files`` (``--max-rows``).
    """
    require("multipart", "serve", "POST /score")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError(400, "send the images as multipart/form-data, e.g. curl -F file=@photo.jpg")
    try:
        form = await request.form(max_files=max_files, max_fields=max_files)
    except RequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - the multipart parser raises its own types on malformed bodies
        if "Too many files" in str(exc):
            raise RequestError(413, f"more than {max_files} files; this server takes at most {max_files} per request (--max-rows): "
                                    "split it into smaller requests") from None
        raise RequestError(400, f"malformed multipart body ({' '.join(str(exc).split())[:120]}); send files as form fields") from None
    try:
        files = [(str(value.filename or key)[:MAX_NAME], await value.read()) for key, value in form.multi_items() if hasattr(value, "filename")]
    finally:
        await form.close()
    if not files:
        raise RequestError(400, "no files in the request; send images as form files, e.g. curl -F file=@photo.jpg")
    return files


@functools.lru_cache(maxsize=1)
def page_html() -> str:
    """The single page ``GET /`` serves: drop or pick photos, see them ranked by score (through ``POST /score``).

    Self-contained (no external scripts, styles or fonts), so it works offline and behind any proxy.
    Thumbnails are the browser's own copies of the files (object URLs): images never come back from
    the server. A token field appears for servers started with ``--token``. Read once from the package.
    """
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
