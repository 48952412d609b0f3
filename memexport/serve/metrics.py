"""The Prometheus series of ``GET /metrics``, one registry per app (prometheus-client is in the ``serve`` extra)."""

from __future__ import annotations

from memexport.core.optional import require


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


def endpoint_of(path: str) -> str:
    """A short, bounded label for metrics (never the raw path: it could be anything)."""
    if path.endswith("/infer"):
        return "infer"
    if path in ("/score", "/metrics", "/"):
        return path.strip("/") or "page"
    return "v2" if path.startswith("/v2") else "other"
