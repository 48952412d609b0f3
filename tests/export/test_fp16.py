"""FP16 ONNX with FP32 inputs and outputs: numerics verified on CPU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from memexport.cli import app
from memexport.core.errors import UsageError
from memexport.export.fp16 import fp16_onnx_from_onnx
from memexport.runtime.base import RunnerOptions
from memexport.runtime.onnxruntime_runner import OnnxRuntimeRunner
from memexport.core.ranks import spearman
from tests.models import write_tiny_cnn


def _scores(path, batch):
    with OnnxRuntimeRunner(path, RunnerOptions(device="cpu")) as runner:
        return runner.infer(batch), runner.metadata


def test_tiny_model_fp16_numerics(tmp_path, sample_images):
    from memexport.calibration.images import load_all
    from tests.models import TINY_PREPROCESS

    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    out = tmp_path / "tiny.fp16.onnx"
    meta = fp16_onnx_from_onnx(model, out)
    assert meta.precision == "fp16"
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {t.data_type for t in proto.graph.initializer if t.name == "wb"} == {onnx.TensorProto.FLOAT16}
    batch = load_all(sample_images, TINY_PREPROCESS)
    fp32, _ = _scores(model, batch)
    fp16, meta16 = _scores(out, batch)
    assert meta16.precision == "fp16" and meta16.extra["converted_from"] == "tiny.onnx"
    assert np.abs(fp16 - fp32).max() <= 1e-3
    assert spearman(fp16, fp32) >= 0.999


def test_refuses_non_fp32_input(tmp_path):
    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    fp16_onnx_from_onnx(model, tmp_path / "a.onnx")
    with pytest.raises(UsageError, match="FP32"):
        fp16_onnx_from_onnx(tmp_path / "a.onnx", tmp_path / "b.onnx")


def test_cli_convert(tmp_path):
    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    runner = CliRunner()
    called = runner.invoke(app, ["convert", "--fp16", str(model), "-o", str(tmp_path / "t16.onnx")])
    assert called.exit_code == 0, called.output
    assert (tmp_path / "t16.onnx").is_file() and "fp16" in called.output
    called = runner.invoke(app, ["convert", str(model), "-o", str(tmp_path / "x.onnx")])
    assert called.exit_code == 2 and "--fp16" in called.output
    called = runner.invoke(app, ["convert", "--fp16", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "x.onnx")])
    assert called.exit_code == 1 and "not found" in called.output


@pytest.mark.slow
@pytest.mark.covers("resmem", "parity:fp16")
def test_resmem_fp16_parity(resmem_onnx, sample_images, tmp_path):
    """FP16 ResMem against FP32 ONNX (max abs <= 1e-3, Spearman >= 0.999) and against torch via `verify`."""
    from memexport.core.parity import require
    from memexport.verify import verify_artifact

    out = tmp_path / "resmem.fp16.onnx"
    fp16_onnx_from_onnx(resmem_onnx, out)
    result = verify_artifact(out, sample_images)
    assert result.precision == "fp16"
    require(result.report, str(out))  # the spec's fp16 tolerance: max abs <= 1e-3, spearman >= 0.999
    fp32 = np.concatenate([_scores(resmem_onnx, result_batch)[0] for result_batch in [_batch(sample_images)]])
    assert np.abs(result.candidate - fp32).max() <= 1e-3
    assert spearman(result.candidate, fp32) >= 0.999


def _batch(paths):
    from memexport.runtime.preprocess import preprocess
    from memexport.core.spec import RESMEM

    return np.stack([preprocess(p, RESMEM.preprocess) for p in paths])


def test_converted_artifact_is_sealed_and_tampering_is_caught(tmp_path):
    from memexport.core.errors import ArtifactError
    from memexport.runtime.integrity import check_onnx

    out = tmp_path / "tiny.fp16.onnx"
    fp16_onnx_from_onnx(write_tiny_cnn(tmp_path / "tiny.onnx"), out)
    record = check_onnx(out, use_cache=False)
    assert record is not None and len(record["sha256"]) == 64
    data = bytearray(out.read_bytes())
    data[len(data) // 3] ^= 0x01  # one flipped bit inside the graph/weights
    out.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        check_onnx(out, use_cache=False)
