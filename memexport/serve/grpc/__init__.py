"""``memexport serve --grpc-port``: the KServe V2 / Triton gRPC protocol over the same service as REST.

* :mod:`~memexport.serve.grpc.codec`: ``ModelInferRequest``/``ModelInferResponse`` to and from the REST
  form, and error statuses as gRPC status codes (pure functions);
* :mod:`~memexport.serve.grpc.servicer`: the ``GRPCInferenceService`` handlers, the token rule included;
* :mod:`~memexport.serve.grpc.server`: the ``grpc.aio`` server on the HTTP server's event loop.

The generated message and service modules are those ``tritonclient[grpc]`` ships (:mod:`memexport.serve.protos`).
"""
