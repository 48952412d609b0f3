"""Which :class:`~memexport.serve.service.Service` serves a model name: the one seam between routes and models.

The statistics and model-config routes (:mod:`memexport.serve.extensions`) and the gRPC servicer
(:mod:`memexport.serve.grpc.servicer`) find a model's service only through a :class:`Models`:
:meth:`Models.service_for` (one model, or 404 / ``NOT_FOUND``) and :meth:`Models.services` (every model,
for ``/v2/models/stats`` and server readiness). :class:`SingleModel` is today's one-artifact server; a
server of several models gives the same two methods over its registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from memexport.serve.service import Service


class Models(Protocol):
    """What the routes need to find a model's service."""

    def service_for(self, name: str, version: Optional[str] = None) -> Service:
        """The service of model ``name`` (at ``version``, ``None``: any).

        Raises:
            RequestError: 404 for an unknown model or version, 503 while the model loads.
        """

    def services(self) -> list[Service]:
        """Every model's service, in a stable order."""


@dataclass(frozen=True)
class SingleModel:
    """One artifact's service, as the plain server and each Ray replica hold it.

    Attributes:
        current: Returns the live service (created in the app's lifespan, or per Ray replica).
    """

    current: Callable[[], Service]

    def service_for(self, name: str, version: Optional[str] = None) -> Service:
        service = self.current()
        service.check_model(name, version)
        return service

    def services(self) -> list[Service]:
        return [self.current()]
