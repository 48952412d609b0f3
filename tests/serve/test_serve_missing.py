"""Without the serve extra (or Ray Serve), ``memexport serve`` says so in one line, before binding anything."""

from __future__ import annotations

import sys

import pytest

from memexport.core.errors import BackendUnavailableError
from memexport.runtime.names import ModelArg
from memexport.serve.options import ServeOptions


def test_serve_without_fastapi_is_one_line(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    from memexport.serve.runner import serve

    with pytest.raises(BackendUnavailableError, match=r"^memexport serve needs (fastapi|uvicorn), which is not installed; install it with pip install 'memexport\[serve\]'$"):
        serve([("tiny-scorer", tiny)], ServeOptions(), port=0)


def test_ray_engine_without_ray_serve_is_one_line(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    from memexport.serve.ray import RayServeOptions, serve_on_ray

    with pytest.raises(BackendUnavailableError, match=r"--engine ray needs ray.serve, which is not installed; install it with pip install 'memexport\[ray\]'$"):
        serve_on_ray([ModelArg(tiny)], ServeOptions(), "127.0.0.1", 0, False, RayServeOptions())


@pytest.mark.parametrize("missing", ["grpc", "tritonclient.grpc.service_pb2_grpc"])
def test_grpc_port_without_grpc_is_one_line(monkeypatch, tiny, missing):
    monkeypatch.setitem(sys.modules, missing, None)
    from memexport.serve.runner import serve

    with pytest.raises(BackendUnavailableError, match=rf"^memexport serve --grpc-port needs {missing}, which is not installed; install it with pip install 'memexport\[serve\]'$"):
        serve([("tiny-scorer", tiny)], ServeOptions(), port=0, grpc_port=0)
