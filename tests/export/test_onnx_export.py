"""ONNX export of ResMem: opset 17, dynamic batch, checker, metadata, determinism, parity."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from memexport import __version__
from memexport.core.errors import UsageError
from memexport.export import export_model
from memexport.runtime.metadata import METADATA_KEY, metadata_from_map
from memexport.runtime.preprocess import preprocess
from memexport.core.spec import RESMEM


@pytest.mark.covers("resmem", "export")
def test_export_is_opset17_dynamic_batch_and_checks(resmem_onnx):
    model = onnx.load(str(resmem_onnx), load_external_data=False)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    onnx.checker.check_model(str(resmem_onnx), full_check=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert model.graph.input[0].name == "image" and dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == [3, 227, 227]
    assert model.graph.output[0].name == "score"


def test_metadata_is_self_sufficient(resmem_onnx, resmem_weights):
    from memexport.export.weights import sha256_file

    model = onnx.load(str(resmem_onnx), load_external_data=False)
    meta = metadata_from_map({p.key: p.value for p in model.metadata_props}, resmem_onnx)
    assert meta.model == "resmem" and meta.precision == "fp32" and meta.opset == 17
    assert meta.preprocess == RESMEM.preprocess
    assert (meta.input_name, meta.output_name) == ("image", "score")
    assert meta.weights["sha256"] == sha256_file(resmem_weights)
    assert meta.versions["memexport"] == __version__ and meta.versions["torch"].startswith("2.")
    assert meta.extra["parameters"] == 131_688_809


def test_exporting_twice_gives_the_same_graph(resmem_onnx, tmp_path, resmem_weights):
    again = tmp_path / "again.onnx"
    export_model("resmem", again, weights=resmem_weights)
    first, second = onnx.load(str(resmem_onnx)), onnx.load(str(again))
    assert first.graph.SerializeToString() == second.graph.SerializeToString()
    assert [(p.key, p.value) for p in first.metadata_props] == [(p.key, p.value) for p in second.metadata_props]


@pytest.mark.covers("resmem", "parity:fp32")
def test_onnxruntime_fp32_matches_original_resmem_scores(resmem_onnx, sample_images, reference_scores):
    session = ort.InferenceSession(str(resmem_onnx), providers=["CPUExecutionProvider"])
    batch = np.stack([preprocess(p, RESMEM.preprocess) for p in sample_images])
    scores = session.run(None, {"image": batch})[0][:, 0]
    expected = np.array([reference_scores[p.name] for p in sample_images])
    assert np.abs(scores - expected).max() <= 1e-4
    assert list(np.argsort(scores, kind="stable")) == list(np.argsort(expected, kind="stable"))


def test_dynamic_batch_gives_batch_independent_scores(resmem_onnx, sample_images):
    session = ort.InferenceSession(str(resmem_onnx), providers=["CPUExecutionProvider"])
    batch = np.stack([preprocess(p, RESMEM.preprocess) for p in sample_images[:3]])
    together = session.run(None, {"image": batch})[0][:, 0]
    alone = [session.run(None, {"image": batch[i : i + 1]})[0][0, 0] for i in range(3)]
    np.testing.assert_allclose(together, alone, atol=1e-6)


def test_metadata_lives_under_one_key(resmem_onnx):
    model = onnx.load(str(resmem_onnx), load_external_data=False)
    assert [p.key for p in model.metadata_props].count(METADATA_KEY) == 1


def test_too_old_opset_is_refused(tmp_path, resmem_weights):
    with pytest.raises(UsageError, match="opset 11 is too old"):
        export_model("resmem", tmp_path / "x.onnx", weights=resmem_weights, opset=11)
    assert not (tmp_path / "x.onnx").exists()
