"""``memexport serve``: artifacts behind the KServe V2 REST (and gRPC) protocol, ``/score`` and a page.

One module per job:

* :mod:`~memexport.serve.options`: :class:`~memexport.serve.options.ServeOptions` and the access
  policy (the bearer token, which paths are public, which hosts need a token);
* :mod:`~memexport.serve.service`: loading the predictors and the
  :class:`~memexport.serve.service.Service` every route calls (one served model per artifact;
  admission, decoding and scoring in pieces, the deadline);
* :mod:`~memexport.serve.metrics`: the Prometheus series of ``GET /metrics``;
* :mod:`~memexport.serve.stats`: Triton's statistics extension, recorded per served model by the scoring path;
* :mod:`~memexport.serve.model_config`: each served model's Triton ``ModelConfig``;
* :mod:`~memexport.serve.protos`: the generated KServe/Triton messages (lazily) and their REST JSON form;
* :mod:`~memexport.serve.lookup`: which served model answers a model name (the one seam between routes,
  REST and gRPC alike, and the several models);
* :mod:`~memexport.serve.extensions`: ``/v2/models/{m}/stats`` and ``/v2/models/{m}/config``;
* :mod:`~memexport.serve.v2`: the V2 wire format as pure functions (parse requests, build answers);
* :mod:`~memexport.serve.batching`: the plain server's dynamic batcher;
* :mod:`~memexport.serve.gate`: the ASGI gate in front of the app (token, early refusals, the body read
  within the deadline, inflated and capped) and the error answer's shape;
* :mod:`~memexport.serve.app`: the FastAPI app both engines serve, and ``page.html``, the page at ``/``;
* :mod:`~memexport.serve.runner`: the plain server on uvicorn, draining on SIGTERM;
* :mod:`~memexport.serve.ray`: the same app under Ray Serve (``--engine ray``, KubeRay's ``app_builder``);
* :mod:`~memexport.serve.grpc`: the V2 gRPC protocol (``--grpc-port``) over the same service, limits and models.

Guarantees:

* every request is answered within ``timeout_s`` of its arrival (408 while its body still arrives,
  504 after; over gRPC, from its handler's start, once gRPC has read the capped message), and a bad
  one gets a 4xx (its gRPC status) with one line per problem, never a 5xx;
* at most ``max_queue`` requests are accepted at a time, server-wide, once their body has arrived
  (a slow client holds no slot); past it, 503 with ``Retry-After``, and every accepted request is
  answered (SIGTERM stops accepting, then finishes them);
* memory is bounded: a body is at most ``max_body_bytes`` after inflating, a request at most
  ``max_rows`` rows (checked before any is unpacked), decoded and scored ``max_batch_size`` rows at a
  time, and the bodies held at once at most ``max_queue`` times ``max_body_bytes``;
* the event loop never decodes, parses big bodies or infers: threads do;
* the server never opens a path named by a request, and never reads the body of a request it refuses;
* a bearer token guards everything but the health checks and the page itself, and is never printed.
"""
