"""``inspect``: metadata, parameters, weight bytes and VRAM estimates, with and without ``onnx``."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from memexport.core.errors import ArtifactError
from memexport.inspect import inspect_artifact
from memexport.runtime.budget import DEFAULT_BUDGET_BYTES, GIB, estimate_vram
from tests.models import write_tiny_scorer


def test_resmem_parameters_weight_bytes_and_vram_table(resmem_onnx):
    info = inspect_artifact(resmem_onnx)
    assert info["model"] == "resmem" and info["parameters"] == 131_688_809
    assert info["weight_bytes"] == {"fp32": 4 * 131_688_809, "fp16": 2 * 131_688_809, "int8": 131_688_809}
    assert info["external_data"] == {} and info["total_bytes"] == resmem_onnx.stat().st_size
    # BatchNorm folded into the convolutions: close to, not equal to, the torch count.
    assert abs(info["onnx_initializer_elements"] - 131_688_809) < 200_000
    # ResNet's first convolution alone outputs 64x114x114 values per image; the peak holds more.
    assert info["activation_elements_per_image"] > 64 * 114 * 114
    table = info["vram_estimate"]
    assert table["budget_bytes"] == DEFAULT_BUDGET_BYTES and list(table["by_batch"]) == ["1", "8", "16", "32"]
    one = table["by_batch"]["1"]["fp32"]
    assert one == estimate_vram(131_688_809, "fp32", 1, info["activation_elements_per_image"]).as_dict()
    totals = [table["by_batch"][b]["fp32"]["total"] for b in ("1", "8", "16", "32")]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    assert table["by_batch"]["1"]["int8"]["total"] < one["total"] and one["fits"]
    json.dumps(info)  # the CLI prints it as JSON


def test_m3m_reports_its_parameters_data_file_and_budget(m3m_onnx):
    info = inspect_artifact(m3m_onnx, batch_sizes=(1, 32), budget_bytes=3 * GIB)
    assert info["model"] == "m3m" and 480_000_000 <= info["parameters"] <= 520_000_000
    assert info["weight_bytes"]["fp32"] == 4 * info["parameters"] > 2 * 10**9
    assert list(info["external_data"]) == ["m3m.onnx.data"] and info["total_bytes"] > 2 * 10**9
    assert info["integrity_verified"] is True
    assert info["weights"]["random_init"] == ["segmentation", "fusion"]
    by_batch = info["vram_estimate"]["by_batch"]
    # 2 GB of FP32 weights leave little of a 3 GiB budget: batch 32 does not fit, INT8 batch 1 does.
    assert not by_batch["32"]["fp32"]["fits"] and by_batch["1"]["int8"]["fits"]
    assert info["vram_estimate"]["largest_batch_that_fits"]["fp32"] < 32


def test_without_onnx_inspect_falls_back_to_onnxruntime(tmp_path, monkeypatch):
    path = write_tiny_scorer(tmp_path / "s.onnx")
    with_onnx = inspect_artifact(path)
    assert with_onnx["parameters"] == 3 and with_onnx["vram_estimate"] is not None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    info = inspect_artifact(path)
    assert info["model"] == "tiny-scorer" and info["inputs"] == [{"name": "image", "shape": ["batch", 3, 227, 227], "type": "tensor(float)"}]
    assert info["parameters"] is None and info["vram_estimate"] is None and "install onnx" in info["vram_note"]
    assert info["integrity_verified"] is True


def test_external_data_outside_the_folder_is_refused(tmp_path):
    import onnx

    inner = tmp_path / "inner"
    inner.mkdir()
    path = write_tiny_scorer(inner / "s.onnx", seal=False, external_data=True)
    shutil.move(inner / "s.onnx.data", tmp_path / "s.onnx.data")
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../s.onnx.data"
    onnx.save(proto, str(path))
    with pytest.raises(ArtifactError, match=r"s\.onnx: external data '\.\./s\.onnx\.data' points outside the model's folder"):
        inspect_artifact(path)


def test_missing_data_file_and_missing_model_are_named(tmp_path):
    path = write_tiny_scorer(tmp_path / "s.onnx", seal=False, external_data=True)
    (tmp_path / "s.onnx.data").unlink()
    with pytest.raises(ArtifactError, match=r"external data file 's\.onnx\.data' is missing"):
        inspect_artifact(path)
    with pytest.raises(ArtifactError, match="model file not found"):
        inspect_artifact(tmp_path / "absent.onnx")
