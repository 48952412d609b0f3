"""How ``memexport serve`` loads its model and guards its door: :class:`ServeOptions` and the access policy.

The access policy: a bearer token (``--token`` or ``MEMEXPORT_SERVE_TOKEN``) guards every path but
:data:`PUBLIC_PATHS`, and a server listening beyond this machine needs a token unless told ``--insecure``.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Optional

from memexport.core.errors import UsageError

TOKEN_ENV = "MEMEXPORT_SERVE_TOKEN"
# Paths anyone may read without the token: probes, and the page (it holds no data; it asks for the token).
PUBLIC_PATHS = ("/v2/health/live", "/v2/health/ready", "/")


@dataclass(frozen=True)
class ServeOptions:
    """How ``memexport serve`` loads its model and guards its door.

    Attributes:
        backend: Back end (default ``None``: by the artifact's suffix, ``.onnx`` -> ONNX Runtime).
        precision: Compute precision where the back end offers one (default ``None``: exact).
        device: ``cpu``, ``cuda`` or ``auto`` (default ``auto``).
        max_batch_size: Images per inference call; a request is decoded and scored in pieces of at most
            this many rows (default 16).
        max_delay_ms: How long a request waits for others to batch with (default 5 ms).
        max_queue: Requests accepted at once (parsing, decoding, queued or running), whatever the model;
            past it, 503 (default 64). Requests are accepted once their body has arrived.
        max_body_bytes: Largest request body, measured after inflating a gzip or deflate body; past it,
            413 (default 64 MiB).
        max_rows: Rows (images) one request may carry, checked from its header before any is unpacked;
            past it, 413 (default 64).
        timeout_s: Per-request deadline from its arrival to its answer: reading the body, parsing, decoding
            and scoring; a body still arriving past it gets 408, an answer not ready 504 (default 30 s).
        workers: Decoding threads (default ``None``: one per core, at most 8).
        token: Bearer token required on every request but health and the page (default ``None``; never
            shown in the repr).
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
    token: Optional[str] = field(default=None, repr=False)
    check_integrity: bool = True
    decode: str = "exact"
    max_rows: int = 64

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_rows"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.max_delay_ms >= 0 or not self.timeout_s > 0:  # NaN fails both
            raise UsageError(f"--max-delay-ms must be >= 0 and --timeout > 0, got {self.max_delay_ms} and {self.timeout_s}")
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {self.workers}")


def resolve_token(token: Optional[str]) -> Optional[str]:
    """The token given, else the ``MEMEXPORT_SERVE_TOKEN`` environment variable, else ``None``."""
    return token or os.environ.get(TOKEN_ENV) or None


def authorized(token: Optional[str], path: str, authorization: str) -> bool:
    """Whether a request for ``path`` with this ``Authorization`` header may pass.

    Args:
        token: The server's token (``None``: every request passes).
        path: The request's path; :data:`PUBLIC_PATHS` always pass.
        authorization: The request's ``Authorization`` header (``""`` when absent).
    """
    if not token or path in PUBLIC_PATHS:
        return True
    scheme, _, credentials = authorization.strip().partition(" ")
    # The scheme is case-insensitive (RFC 9110, 11.1). Constant time: the comparison must not tell an
    # attacker how much of a guess was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode())


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
