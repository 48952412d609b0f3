"""Which served model answers a model name: the one seam between routes and models.

The statistics and model-config routes (:mod:`memexport.serve.extensions`) and the gRPC servicer
(:mod:`memexport.serve.grpc.servicer`) find a model only through a :class:`Models`:
:meth:`Models.service_for` (one model, or 404 / ``NOT_FOUND``), :meth:`Models.services` (every model, for
``/v2/models/stats``) and :meth:`Models.server` (the server-wide :class:`Service`: admission, deadline,
decoding and readiness, shared by every model). :class:`Registry` gives them over the several models one
:class:`Service` serves (``serve -m A -m B``), each under its served name (:mod:`memexport.runtime.names`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from memexport.serve.service import ServedModel, Service


class Models(Protocol):
    """What the routes need to find a model."""

    def service_for(self, name: str, version: Optional[str] = None) -> ServedModel:
        """The model served as ``name`` (at ``version``, ``None``: any): its predictor, inference loop and statistics.

        Raises:
            RequestError: 404 for an unknown model or version, 503 while the models load.
        """

    def services(self) -> list[ServedModel]:
        """Every served model, in the order the server was given them.

        Raises:
            RequestError: 503 while the models load.
        """

    def server(self) -> Service:
        """The service every model shares (admission, deadline, decoding, readiness)."""


@dataclass(frozen=True)
class Registry:
    """The served models of one :class:`Service`, by name, as the plain server and each Ray replica hold them.

    Attributes:
        current: Returns the live service (created in the app's lifespan, or per Ray replica).
    """

    current: Callable[[], Service]

    def service_for(self, name: str, version: Optional[str] = None) -> ServedModel:
        return self.current().check_model(name, version)

    def services(self) -> list[ServedModel]:
        service = self.current()
        service.require_loaded()
        return list(service.models.values())

    def server(self) -> Service:
        return self.current()
