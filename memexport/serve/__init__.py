"""``memexport serve``: one artifact behind the KServe V2 REST (and gRPC) protocol, ``/score`` and a page.

One module per job:

* :mod:`~memexport.serve.options`: :class:`~memexport.serve.options.ServeOptions` and the access
  policy (the bearer token, which paths are public, which hosts need a token);
* :mod:`~memexport.serve.service`: loading the predictor and the
  :class:`~memexport.serve.service.Service` every route calls (admission, decoding, scoring);
* :mod:`~memexport.serve.metrics`: the Prometheus series of ``GET /metrics``;
* :mod:`~memexport.serve.stats`: Triton's statistics extension, recorded per model by the scoring path;
* :mod:`~memexport.serve.model_config`: the served model's Triton ``ModelConfig``;
* :mod:`~memexport.serve.protos`: the generated KServe/Triton messages (lazily) and their REST JSON form;
* :mod:`~memexport.serve.lookup`: which service serves a model name (the one seam between routes and models);
* :mod:`~memexport.serve.extensions`: ``/v2/models/{m}/stats`` and ``/v2/models/{m}/config``;
* :mod:`~memexport.serve.v2`: the V2 wire format as pure functions (parse requests, build answers);
* :mod:`~memexport.serve.batching`: the plain server's dynamic batcher;
* :mod:`~memexport.serve.gate`: the ASGI gate in front of the app (token, body caps, counting)
  and the error answer's shape;
* :mod:`~memexport.serve.app`: the FastAPI app both engines serve, and ``page.html``, the page at ``/``;
* :mod:`~memexport.serve.runner`: the plain server on uvicorn, draining on SIGTERM;
* :mod:`~memexport.serve.ray`: the same app under Ray Serve (``--engine ray``, KubeRay's ``app_builder``);
* :mod:`~memexport.serve.grpc`: the V2 gRPC protocol (``--grpc-port``) over the same service.

Guarantees:

* at most ``max_queue`` requests are accepted at a time; past it, 503 with ``Retry-After``, and
  every accepted request is answered (SIGTERM stops accepting, then finishes them);
* the event loop never decodes, parses big bodies or infers: threads do;
* the server never opens a path named by a request; bodies over ``max_body_bytes`` get 413;
* a bearer token guards everything but the health checks and the page itself.
"""
