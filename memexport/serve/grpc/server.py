"""The V2 gRPC server (``--grpc-port``): ``grpc.aio`` on the HTTP server's own event loop.

On the same loop, gRPC requests share the :class:`~memexport.serve.service.Service` as they are: its
admission count, its batcher's queue and its drain need no locks. Messages over ``--max-body-mb`` are
refused by gRPC itself with ``RESOURCE_EXHAUSTED`` (``grpc.max_receive_message_length``), the cap REST
answers 413 for. The server starts with the HTTP one and stops after the drain (:mod:`memexport.serve.runner`).
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from memexport.core.errors import UsageError
from memexport.serve import protos
from memexport.serve.grpc.servicer import PURPOSE, Servicer
from memexport.serve.lookup import Models
from memexport.serve.options import ServeOptions


def check_available() -> None:
    """Raise the ``serve`` extra's one line now, before anything listens, if grpcio or the generated modules are missing."""
    protos.grpc(PURPOSE)
    protos.service_pb2_grpc(PURPOSE)


def probe(host: str, port: int) -> None:
    """Refuse in one line, before gRPC tries (and logs its own error lines), an address that cannot be bound."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a closing connection does not count
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as error:
            raise _unbindable(host, port, error.strerror or str(error)) from None


def _unbindable(host: str, port: int, reason: str) -> UsageError:
    return UsageError(f"--grpc-port {port}: cannot listen on {address(host, port)} ({reason}); choose a free port, or 0 for any")


def address(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start_grpc(models: Models, options: ServeOptions, host: str, port: int,
                     on_listen: Callable[[str], None] = print) -> Any:
    """Listen on ``host:port`` (``0``: a free port, printed) and serve :class:`Servicer`; returns the started server.

    Raises:
        UsageError: The address cannot be bound (in use, or not this machine's).
    """
    grpc = protos.grpc(PURPOSE)
    probe(host, port)
    # so_reuseport off: a second server on the same port must fail, not share the port's connections.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", options.max_body_bytes),
                                      ("grpc.max_send_message_length", options.max_body_bytes), ("grpc.so_reuseport", 0)])
    protos.service_pb2_grpc(PURPOSE).add_GRPCInferenceServiceServicer_to_server(Servicer(models, options.token), server)
    try:
        bound = server.add_insecure_port(address(host, port))
    except RuntimeError:  # lost a race with another process since the probe
        raise _unbindable(host, port, "in use") from None
    await server.start()
    on_listen(f"memexport serve: gRPC listening on {address(host, bound)} (KServe V2 / Triton GRPCInferenceService)")
    return server
