"""The KServe V2 / Triton ``GRPCInferenceService`` over the same :class:`~memexport.serve.service.Service` as REST.

Served: ``ServerLive``, ``ServerReady``, ``ModelReady``, ``ServerMetadata``, ``ModelMetadata``, ``ModelConfig``,
``ModelStatistics`` and ``ModelInfer``; every other RPC of the service answers ``UNIMPLEMENTED`` in one line.
``ModelInfer`` routes by ``model_name`` to one of the served models and takes the same path as
``POST /v2/models/{m}/infer``: the row limit (``--max-rows``, checked from the shape before any row is
unpacked), admission (once the message has arrived), decoding and scoring in pieces of ``--max-batch-size``
rows through the model's batcher, the deadline (``--timeout`` from the handler's start) and the error
rules: a :class:`~memexport.serve.v2.RequestError` becomes the status code of
:data:`memexport.serve.grpc.codec.STATUS_CODES` with the REST error's text. Readiness follows the REST rule:
``ServerReady`` is false while loading, draining or once an inference loop has died, ``ModelReady`` false
for that model's dead loop or while draining, ``ServerLive`` false once a loop has died. The token rule is the REST one,
read from the ``authorization`` metadata (``Bearer`` in any case); ``ServerLive`` and ``ServerReady`` need no
token, like ``/v2/health/live`` and ``/v2/health/ready``. Models are found only through
:class:`~memexport.serve.lookup.Models`.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Awaitable, Callable, Optional

from memexport.core.version import __version__
from memexport.serve import protos
from memexport.serve.grpc.codec import details, infer_response, parse_request, status_code
from memexport.serve.lookup import Models
from memexport.serve.model_config import model_config
from memexport.serve.options import authorized
from memexport.serve.service import ServedModel, Service
from memexport.serve.stats import statistics_of
from memexport.serve.v2 import InferRequest, RequestError, server_metadata

PURPOSE = "memexport serve --grpc-port"
# RPCs anyone may call, as the REST paths they stand for (the access policy's public paths).
PUBLIC = {"ServerLive": "/v2/health/live", "ServerReady": "/v2/health/ready"}

Handler = Callable[[Any, Any, Any], Awaitable[Any]]


def rpc(method: Handler) -> Handler:
    """Check the token, then answer; a :class:`RequestError` (or a server fault) becomes a gRPC status."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self: "Servicer", request: Any, context: Any) -> Any:
        grpc = protos.grpc(PURPOSE)
        try:
            metadata = {key.lower(): value for key, value in (context.invocation_metadata() or ())}
            if not authorized(self.token, PUBLIC.get(name, f"/grpc/{name}"), str(metadata.get("authorization", ""))):
                raise RequestError(401, "missing or wrong bearer token; send the metadata authorization: Bearer <token>")
            return await method(self, request, context)
        except RequestError as error:
            code, text = status_code(error), details(error)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the server's fault, still answered in one line
            code, text = "INTERNAL", f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"
        await context.abort(getattr(grpc.StatusCode, code), text)

    return handler


class Servicer:
    """The ``GRPCInferenceService`` handlers (``grpc.aio``), registered with the generated ``add_..._to_server``.

    Args:
        models: Where each served model, and the service they share, are found.
        token: The server's bearer token (``None``: none needed).
    """

    def __init__(self, models: Models, token: Optional[str]) -> None:
        self.models = models
        self.token = token
        self.pb = protos.service_pb2(PURPOSE)

    def __getattr__(self, name: str) -> Handler:
        """Every RPC not served here: ``UNIMPLEMENTED``, named (the generated registration asks for all of them)."""
        if not name[:1].isupper():
            raise AttributeError(name)

        async def unimplemented(request: Any, context: Any) -> Any:
            grpc = protos.grpc(PURPOSE)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not served by memexport; see docs/serving.md for the RPCs it serves")

        return unimplemented

    def _model(self, request: Any) -> ServedModel:
        return self.models.service_for(request.name, request.version or None)

    @rpc
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return self.pb.ServerLiveResponse(live=self.models.server().live)

    @rpc
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return self.pb.ServerReadyResponse(ready=self.models.server().ready)

    @rpc
    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            model = self._model(request)
        except RequestError:  # unknown or still loading: not ready, as Triton answers
            return self.pb.ModelReadyResponse(ready=False)
        return self.pb.ModelReadyResponse(ready=self.models.server().model_ready(model))

    @rpc
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return protos.from_dict(server_metadata(__version__), self.pb.ServerMetadataResponse())

    @rpc
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        # KServe's ModelMetadataResponse has no properties map; over gRPC, ModelConfig's parameters say the same.
        meta = {key: value for key, value in self._model(request).metadata().items() if key != "properties"}
        return protos.from_dict(meta, self.pb.ModelMetadataResponse())

    @rpc
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        return self.pb.ModelConfigResponse(config=model_config(self._model(request)))

    @rpc
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        return statistics_of([self._model(request)] if request.name else self.models.services())

    @rpc
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        # The deadline starts here: gRPC has read the whole message (capped at --max-body-mb) before this
        # handler runs, so a slow sender holds no slot, and admission is taken only now, as REST takes it.
        service = self.models.server()
        deadline = asyncio.get_running_loop().time() + service.options.timeout_s
        model = self.models.service_for(request.model_name, request.model_version or None)
        # Service.run shields the work: a client that cancels (or whose own deadline passes) leaves it to
        # finish and free its slot, as a timed-out REST request does, so cancelling never lets more work in
        # than --max-queue.
        parsed, scores = await service.run(deadline, lambda: self._infer(service, model, request, deadline))
        return infer_response(self.pb, model.name, parsed, scores)

    async def _infer(self, service: Service, model: ServedModel, request: Any, deadline: float) -> tuple[InferRequest, Any]:
        """Parsed by the REST rules (the row limit included, off the event loop), then scored as REST scores."""
        parse = functools.partial(parse_request, max_rows=service.options.max_rows)
        parsed = await service.offload(parse, request, model.predictor.metadata.input_shape)
        return parsed, await service.infer(model, parsed, deadline)
