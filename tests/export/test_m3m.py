"""M3M: the reconstruction's layout, its checkpoints, the external-data export and its parity.

The real 510M-parameter export happens once per session (``m3m_export`` in conftest); the
exporter's crash-safety is checked on a tiny module through the same function.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from memexport.core.errors import ArtifactError, CheckpointError, UsageError
from memexport.export import m3m, onnx_export
from memexport.export.onnx_export import ExportOptions
from memexport.export.weights import WeightsSource
from memexport.runtime.metadata import metadata_from_map
from memexport.core.spec import M3M, ModelSpec, PreprocessSpec, get_spec

# Keys of torchvision's deeplabv3_resnet101 state_dict (its own names, checked by hand against
# torchvision.models.segmentation.deeplabv3): a user's checkpoint must load under them.
TORCHVISION_KEYS = {
    "backbone.conv1.weight": (64, 3, 7, 7),
    "backbone.layer3.22.conv2.weight": (256, 256, 3, 3),
    "backbone.layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
    "classifier.0.convs.0.0.weight": (256, 2048, 1, 1),
    "classifier.0.convs.3.0.weight": (256, 2048, 3, 3),
    "classifier.0.convs.4.1.weight": (256, 2048, 1, 1),
    "classifier.0.convs.4.2.running_var": (256,),
    "classifier.0.project.0.weight": (256, 1280, 1, 1),
    "classifier.0.project.1.bias": (256,),
    "classifier.1.weight": (256, 256, 3, 3),
    "classifier.2.running_mean": (256,),
    "classifier.4.weight": (13, 256, 1, 1),
    "classifier.4.bias": (13,),
}


def seeded(module_type, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module_type().eval()


@pytest.fixture(scope="module")
def segmentation_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision-style DeepLabV3-ResNet-101 checkpoint (13 classes) with its training-only aux head."""
    branch = seeded(m3m.SegmentationBranch, 7)
    state = {k: v.clone() for k, v in branch.state_dict().items()}
    for tensor in state.values():
        if tensor.is_floating_point():
            tensor.add_(0.01)  # distinguishable from any freshly initialised branch
    saved = dict(state)
    saved["aux_classifier.0.weight"] = torch.zeros(256, 1024, 3, 3)
    saved["aux_classifier.4.bias"] = torch.zeros(13)
    path = tmp_path_factory.mktemp("seg") / "deeplabv3_resnet101_13.pth"
    torch.save(saved, path)
    return path, state


# --- the reconstruction ---------------------------------------------------------------------


def test_parameter_count_is_in_the_published_range_and_matches_the_spec():
    with torch.device("meta"):
        model = m3m.M3M()
    total = sum(p.numel() for p in model.parameters())
    assert total == M3M.parameters and 480_000_000 <= total <= 520_000_000
    assert model.fc6.in_features == 9216 + 1000 + 24 * 57 * 57
    # The shared parts keep ResMem's names and shapes, except fc6's wider input.
    from memexport.export.resmem import ResMem

    with torch.device("meta"):
        resmem = ResMem().state_dict()
    own = model.state_dict()
    assert all(tuple(own[k].shape) == tuple(v.shape) for k, v in resmem.items() if k != "fc6.weight")


def test_segmentation_branch_has_torchvision_names_and_13_class_maps():
    branch = seeded(m3m.SegmentationBranch, 0)
    state = branch.state_dict()
    assert {k: tuple(state[k].shape) for k in TORCHVISION_KEYS} == TORCHVISION_KEYS
    assert not any(k.startswith(("aux", "backbone.fc", "backbone.avgpool")) or k in ("mean", "std") for k in state)
    with torch.no_grad():
        maps = branch(torch.rand(1, 3, 227, 227))
    assert maps.shape == (1, 13, 227, 227)
    assert torch.allclose(maps.sum(1), torch.ones(1, 227, 227), atol=1e-5)  # softmax over the classes


def test_segmentation_checkpoint_loads_strictly_and_drops_the_aux_head(segmentation_checkpoint):
    path, state = segmentation_checkpoint
    branch = seeded(m3m.SegmentationBranch, 0)
    dropped = m3m.load_segmentation(branch, path)
    assert dropped == ["aux_classifier.0.weight", "aux_classifier.4.bias"]
    loaded = branch.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_segmentation_checkpoint_with_21_classes_is_refused(segmentation_checkpoint, tmp_path):
    path, state = segmentation_checkpoint
    voc = dict(state, **{"classifier.4.weight": torch.zeros(21, 256, 1, 1), "classifier.4.bias": torch.zeros(21)})
    torch.save(voc, tmp_path / "voc.pth")
    with pytest.raises(CheckpointError, match=r"voc\.pth.*classifier\.4\.weight \(21, 256, 1, 1\) != \(13, 256, 1, 1\)"):
        m3m.load_segmentation(seeded(m3m.SegmentationBranch, 0), tmp_path / "voc.pth")


def test_resnet50_segmentation_checkpoint_is_refused_with_the_key_count(segmentation_checkpoint, tmp_path):
    path, state = segmentation_checkpoint
    resnet50 = {k: v for k, v in state.items() if not any(k.startswith(f"backbone.layer3.{i}.") for i in range(6, 23))}
    torch.save(resnet50, tmp_path / "r50.pth")
    with pytest.raises(CheckpointError, match=r"r50\.pth: not a DeepLabV3-ResNet-101.*missing keys \[backbone\.layer3\.10"):
        m3m.load_segmentation(seeded(m3m.SegmentationBranch, 0), tmp_path / "r50.pth")


def test_from_resmem_weights_full_checkpoint_round_trip_and_conflicts(resmem_weights, segmentation_checkpoint, tmp_path):
    """ResMem's weights fill the shared parts; a saved full M3M state_dict reloads exactly, alone."""
    seg_path, seg_state = segmentation_checkpoint
    from memexport.export.weights import load_checkpoint

    resmem = load_checkpoint(resmem_weights)
    model = m3m.m3m_from_weights(WeightsSource(resmem_weights, {"segmentation": seg_path}, seed=3))
    assert model.random_init_parts == ["fusion"]
    assert torch.equal(model.fc6.weight[:, :10216], resmem["fc6.weight"])
    assert torch.equal(model.features.layer4[2].conv3.weight, resmem["features.layer4.2.conv3.weight"])
    assert torch.equal(model.conv5.weight, resmem["conv5.weight"]) and torch.equal(model.fc12.bias, resmem["fc12.bias"])
    assert torch.equal(model.segmentation.classifier[4].weight, seg_state["classifier.4.weight"])
    del resmem
    full = tmp_path / "m3m_full.pt"
    torch.save(model.state_dict(), full)
    probes = {k: model.state_dict()[k].clone() for k in ("segconv1.weight", "segconv2.bias", "segmentation.backbone.conv1.weight")}
    probes["fc6_tail"] = model.fc6.weight[:, -3:].clone()
    del model
    reloaded = m3m.m3m_from_weights(WeightsSource(full, seed=99))  # the seed must not matter: nothing is random
    assert reloaded.random_init_parts == []
    state = reloaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in probes.items() if k != "fc6_tail")
    assert torch.equal(reloaded.fc6.weight[:, -3:], probes["fc6_tail"])
    del reloaded, state
    with pytest.raises(UsageError, match="full M3M checkpoint.*drop --segmentation-weights"):
        m3m.m3m_from_weights(WeightsSource(full, {"segmentation": seg_path}))
    full.unlink()


class _SharedOnly(nn.Module):
    """Stand-in holding only M3M's fc6 (on the meta device): the shared part under test."""

    def __init__(self) -> None:
        super().__init__()
        self.fc6 = nn.Linear(m3m.FC6_IN, 4096, device="meta")


def test_resmem_checkpoint_with_a_foreign_fc6_is_refused(tmp_path):
    torch.save({"fc6.weight": torch.zeros(4096, 10000), "fc6.bias": torch.zeros(4096)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: fc6\.weight has shape \(4096, 10000\), expected ResMem's \(4096, 10216\)"):
        m3m.load_resmem_parts(_SharedOnly(), tmp_path / "other.pt")


def test_checkpoint_that_is_neither_resmem_nor_m3m_is_refused(tmp_path):
    torch.save({"fc6.weight": torch.zeros(4096, 10216)}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"partial\.pt: not a ResMem \(the shared parts of M3M.*1 missing keys \[fc6\.bias\]"):
        m3m.load_resmem_parts(_SharedOnly(), tmp_path / "partial.pt")


def test_a_part_other_than_segmentation_is_a_usage_error(resmem_weights):
    with pytest.raises(UsageError, match="only a 'segmentation' part"):
        m3m.m3m_from_weights(WeightsSource(resmem_weights, {"depth": resmem_weights}))


# --- the exported artifact ------------------------------------------------------------------


@pytest.mark.covers("m3m", "export")
def test_export_writes_one_relative_data_file_beside_the_model(m3m_export):
    path, warnings = m3m_export
    assert sorted(p.name for p in path.parent.iterdir()) == ["m3m.onnx", "m3m.onnx.data"]
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert proto.graph.input[0].name == "image" and dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == [3, 227, 227]
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim[1:]] == [1]
    data_size = path.with_name("m3m.onnx.data").stat().st_size
    assert 2.0e9 < data_size < 2.1e9 and path.stat().st_size < 2_000_000
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    entries = [{e.key: e.value for e in t.external_data} for t in external]
    assert {e["location"] for e in entries} == {"m3m.onnx.data"}
    spans = sorted((int(e["offset"]), int(e["length"])) for e in entries)
    assert all(offset % 4096 == 0 for offset, _ in spans)
    assert all(a + la <= b for (a, la), (b, _) in zip(spans, spans[1:])) and spans[-1][0] + spans[-1][1] == data_size
    meta = metadata_from_map({p.key: p.value for p in proto.metadata_props}, path)
    assert meta.model == "m3m" and meta.extra["parameters"] == M3M.parameters
    assert meta.weights["random_init"] == ["segmentation", "fusion"] and meta.weights["seed"] == 0
    assert list(meta.extra["integrity"]["external"]) == ["m3m.onnx.data"]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: M3M HAS RANDOMLY INITIALISED PARTS (seed 0)")


@pytest.fixture(scope="module")
def m3m_verified(m3m_onnx, sample_images):
    """ONNX Runtime FP32 against the torch reference rebuilt from the artifact's metadata."""
    from memexport.verify import verify_artifact

    return verify_artifact(m3m_onnx, sample_images)


@pytest.mark.covers("m3m", "parity:fp32")
def test_onnxruntime_fp32_matches_the_rebuilt_torch_reference(m3m_verified, sample_images):
    report = m3m_verified.report
    assert report.count == len(sample_images) == 8
    assert report.max_abs <= 1e-4 and report.spearman >= 0.9999
    assert report.passed, report.failures
    # The scores are real model outputs, not a constant: they differ across the images.
    assert np.ptp(m3m_verified.reference) > 1e-3


def test_predict_scores_m3m_as_verify_did(m3m_onnx, m3m_verified, data_dir, tmp_path):
    from memexport.runtime.batch import PredictOptions, scores_csv_from_images

    out = tmp_path / "scores.csv"
    summary = scores_csv_from_images(m3m_onnx, [data_dir], out, PredictOptions(batch_size=4, device="cpu", workers=0))
    assert summary.scored == 8 and summary.failed == 0
    with open(out, newline="") as handle:
        scores = {Path(row["path"]).name: float(row["score"]) for row in csv.DictReader(handle)}
    expected = {Path(n).name: s for n, s in zip(m3m_verified.names, m3m_verified.candidate)}
    assert scores.keys() == expected.keys()
    assert max(abs(scores[k] - expected[k]) for k in scores) <= 1e-6


def test_model_whose_data_points_outside_its_folder_is_refused(m3m_onnx, tmp_path):
    """A copy of the real graph whose tensors read ../<export folder>/m3m.onnx.data is never opened."""
    from memexport.inspect import inspect_artifact
    from memexport.runtime.base import RunnerOptions
    from memexport.runtime.onnxruntime_runner import OnnxRuntimeRunner

    proto = onnx.load(str(m3m_onnx), load_external_data=False)
    escape = os.path.relpath(m3m_onnx.with_name("m3m.onnx.data"), tmp_path / "inner")
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = escape
    moved = tmp_path / "inner" / "m3m.onnx"
    moved.parent.mkdir()
    onnx.save(proto, str(moved))
    with pytest.raises(ArtifactError, match="points outside the model's folder"):
        OnnxRuntimeRunner(moved, RunnerOptions(device="cpu", check_integrity=False)).activate()
    with pytest.raises(ArtifactError, match="points outside the model's folder"):
        inspect_artifact(moved)


# --- the external-data exporter on a tiny module ----------------------------------------------


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 5)  # 1200 weights: stored externally
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 1)  # 16 weights: stay inline
        self.random_init_parts = ["fusion"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


TINY_SPEC = ModelSpec(
    name="m3m", builder="unused:unused", input_shape=(3, 16, 16), preprocess=PreprocessSpec(resize=(18, 18), crop=16),
    external_data=True,
)


@pytest.fixture
def tiny_export(monkeypatch):
    tiny = seeded(_Tiny, 1)
    with torch.no_grad():
        tiny.bn.running_mean.uniform_(-0.5, 0.5)
    monkeypatch.setattr(onnx_export, "build_torch_model", lambda spec, weights: tiny)

    def export(path: Path, warn=lambda _: None):
        return m3m.onnx_with_external_data_from_torch(TINY_SPEC, WeightsSource(None, seed=5), path, ExportOptions(), warn=warn)

    return tiny, export


def test_exporter_layout_and_values_on_a_tiny_module(tiny_export, tmp_path):
    import onnxruntime as ort

    tiny, export = tiny_export
    warnings: list[str] = []
    result = export(tmp_path / "t.onnx", warnings.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx", "t.onnx.data"]
    assert result.data == tmp_path / "t.onnx.data" and "fusion" in warnings[0]
    proto = onnx.load(str(tmp_path / "t.onnx"), load_external_data=False)
    stored = {t.name: t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer}
    assert stored["conv.weight"] and not stored["fc.weight"]
    x = torch.rand(3, 3, 16, 16)
    session = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, tiny(x).numpy(), atol=1e-6)


def test_failed_export_leaves_the_previous_artifact_and_no_temporary_files(tiny_export, tmp_path, monkeypatch):
    _, export = tiny_export
    export(tmp_path / "t.onnx")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_checker(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated checker failure")

    monkeypatch.setattr(onnx.checker, "check_model", broken_checker)
    with pytest.raises(ArtifactError, match="fails onnx.checker"):
        export(tmp_path / "t.onnx")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_crash_between_the_renames_leaves_no_model_under_the_final_name(tiny_export, tmp_path, monkeypatch):
    _, export = tiny_export
    export(tmp_path / "t.onnx")
    real_replace, calls = os.replace, []

    def crash_on_model(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == "t.onnx":
            raise KeyboardInterrupt  # the process dies after the data file moved
        real_replace(src, dst)

    monkeypatch.setattr(m3m.os, "replace", crash_on_model)
    with pytest.raises(KeyboardInterrupt):
        export(tmp_path / "t.onnx")
    assert calls == ["t.onnx.data", "t.onnx"]
    # No model pairs with the new data: the old one was removed before the data moved.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx.data"]


def test_output_must_be_an_onnx_path(tiny_export, tmp_path):
    _, export = tiny_export
    with pytest.raises(UsageError, match="must end in .onnx"):
        export(tmp_path / "t.bin")


def test_m3m_spec_declares_only_the_precision_ci_checks():
    assert get_spec("m3m") is M3M and set(M3M.tolerances) == {"fp32"} and M3M.external_data


def test_bench_ratio_puts_m3m_against_resmem():
    """``bench -m resmem.onnx -m m3m.onnx`` prints M3M's throughput as a multiple of ResMem's (pure logic)."""
    from memexport.bench import BenchRecord, ratio_table

    def record(model: str, backend: str, batch: int, images_per_s: float) -> BenchRecord:
        return BenchRecord(model, f"{model}.onnx", backend, "fp32", "cpu", batch, 1.0, 1.0, 1.0, images_per_s, 1.0, 5)

    records = [record("resmem", "onnxruntime", 16, 20.0), record("m3m", "onnxruntime", 16, 4.0),
               record("m3m", "onnxruntime", 1, 3.0), record("resmem", "torch", 16, 10.0), record("m3m", "torch", 16, 1.0)]
    lines = ratio_table(records)
    assert lines[1] == "4.00x torch, 0.20x resmem"
    assert lines[2] == ""  # no ResMem record at batch 1 to compare with
    assert lines[4] == "0.25x onnxruntime fp32, 0.10x resmem" and "resmem" not in lines[0]
