"""Fixtures the serve tests share: the tiny scorer's ``Predictor`` (the scores a server must give), a
``tritonclient.http`` client of the module's ``server``, and the real ResMem artifact."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve.server import ROOT


@pytest.fixture(scope="module")
def predictor(tiny: Path):
    from memexport.runtime.predictor import Predictor

    with Predictor(tiny) as scorer:
        yield scorer


@pytest.fixture()
def client(server):
    """``tritonclient.http`` on the test module's own ``server`` fixture."""
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (test extra)")
    triton = httpclient.InferenceServerClient(server.url)
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def resmem_artifact(request: pytest.FixtureRequest) -> Path:
    """``make demo``'s artifacts/resmem.onnx when present, else the session's own export."""
    shared = ROOT / "artifacts" / "resmem.onnx"
    return shared if shared.is_file() else request.getfixturevalue("resmem_onnx")
