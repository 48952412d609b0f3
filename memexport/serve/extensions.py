"""Triton's statistics and model-configuration extensions over REST (the gRPC servicer answers the same messages).

* ``GET /v2/models/stats``, ``GET /v2/models/{m}/stats`` (and ``/versions/1/stats``): ``{"model_stats": [...]}``,
  Triton's ``ModelStatisticsResponse`` (:mod:`memexport.serve.stats`);
* ``GET /v2/models/{m}/config`` (and ``/versions/1/config``): the model's ``ModelConfig``
  (:mod:`memexport.serve.model_config`),

both in Triton's REST JSON form (:func:`memexport.serve.protos.triton_json`), each model under its served name
with its own figures. Models are found only through :class:`~memexport.serve.lookup.Models`. Without the generated modules (``tritonclient[grpc]``, in the ``serve``
extra) these routes answer ``501`` with the install line; everything else keeps working.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (see memexport.serve.app).
from typing import Any, Callable, Optional

from memexport.core.errors import BackendUnavailableError
from memexport.serve import protos
from memexport.serve.lookup import Models
from memexport.serve.model_config import model_config
from memexport.serve.stats import statistics_of
from memexport.serve.v2 import RequestError


def add_extension_routes(app: Any, models: Models) -> None:
    """Add the routes to ``app``; call it before the ``/v2/models/{model}`` route, which would take ``stats`` for a name."""
    from starlette.responses import JSONResponse, Response

    def answer(build: Callable[[], Any]) -> Response:
        try:
            return JSONResponse(protos.triton_json(build()))
        except BackendUnavailableError as error:
            raise RequestError(501, str(error)) from None

    @app.get("/v2/models/stats")
    async def all_statistics() -> Response:
        return answer(lambda: statistics_of(models.services()))

    @app.get("/v2/models/{model}/stats")
    @app.get("/v2/models/{model}/versions/{version}/stats")
    async def model_statistics(model: str, version: Optional[str] = None) -> Response:
        served = models.service_for(model, version)
        return answer(lambda: statistics_of([served]))

    @app.get("/v2/models/{model}/config")
    @app.get("/v2/models/{model}/versions/{version}/config")
    async def config(model: str, version: Optional[str] = None) -> Response:
        served = models.service_for(model, version)
        return answer(lambda: model_config(served))
