"""The OpenVINO INT8 artifact (``<stem>.int8-openvino.xml``) on a tiny model: guarded, ranged, skippable."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from memexport.calibration import CalibrationOptions, calibrate
from memexport.calibration.openvino_int8 import OpenVinoInt8Options, ignored_patterns
from memexport.errors import BackendUnavailableError
from tests.models import SENSITIVE_LAYER, write_tiny_cnn

OPTIONS = CalibrationOptions(method="minmax", held_out_fraction=0.5, augment=1, outputs=("openvino",))


def test_ignored_patterns_match_a_layer_and_its_parts_only():
    patterns = ignored_patterns(OpenVinoInt8Options(pinned=("/features/layer1/",), exclude=frozenset({"conv_b"})))
    matches = lambda name: any(re.search(p, name) for p in patterns)  # noqa: E731
    assert matches("/features/layer1/layer1.0/conv1/Conv/WithoutBiases") and matches("conv_b") and matches("conv_b/WithoutBiases")
    assert not matches("conv_b2") and not matches("/features/layer2/layer2.0/conv1/Conv") and not matches("x/conv_b")


def test_default_run_skips_it_in_one_line_without_openvino(tmp_path, sample_images, monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf now raises ImportError
    model = write_tiny_cnn(tmp_path / "tiny.onnx")
    lines: list[str] = []
    result = calibrate(model, sample_images[0].parent, tmp_path / "out", CalibrationOptions(min_spearman=0), log=lines.append)
    assert result.cpu is not None and result.qdq is not None and not list((tmp_path / "out").glob("*.xml"))
    skipped = [line for line in lines if "int8-openvino" in line]
    assert len(skipped) == 1 and skipped[0].startswith("skipped tiny.int8-openvino.xml:") and "memexport[openvino]" in skipped[0]
    with pytest.raises(BackendUnavailableError, match=r"needs nncf, which is not installed") as error:
        calibrate(model, sample_images[0].parent, tmp_path / "out2", OPTIONS)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, sample_images):
    pytest.importorskip("openvino", reason="the OpenVINO INT8 artifact needs the openvino extra (pip install 'memexport[openvino]')")
    pytest.importorskip("nncf", reason="the OpenVINO INT8 artifact needs the openvino extra (pip install 'memexport[openvino]')")
    folder = tmp_path_factory.mktemp("ov")
    model = write_tiny_cnn(folder / "tiny.onnx", planted=True)
    lines: list[str] = []
    result = calibrate(model, sample_images[0].parent, folder / "out", OPTIONS, log=lines.append)
    return model, result, lines


def test_artifact_obeys_the_guard(calibrated, sample_images):
    """The planted layer ruins all-INT8 scores; the IR written keeps it out of INT8 and, rescored here, meets the target."""
    import openvino as ov

    from memexport.calibration.guard import fidelity, ort_session, session_scores
    from memexport.calibration.images import load_all, split_images
    from memexport.calibration.openvino_int8 import openvino_scores
    from memexport.runtime.metadata import METADATA_KEY, ArtifactMetadata

    model_path, result, lines = calibrated
    report = result.guards["openvino"]
    assert result.openvino.name == "tiny.int8-openvino.xml" and result.openvino.with_suffix(".bin").is_file()
    assert not report.initial.passed and report.passed and SENSITIVE_LAYER in report.fallback
    assert any(line.startswith("tiny.int8-openvino.xml: all layers INT8") for line in lines)
    model = ov.Core().read_model(str(result.openvino))
    metadata = ArtifactMetadata.from_json(str(model.get_rt_info([METADATA_KEY]).astype(str)))
    assert metadata.precision == "int8" and metadata.extra["quantization"] == "openvino-fakequantize-int8"
    assert metadata.extra["fallback_layers"] == list(report.fallback) and metadata.extra["inference_precision"] in ("f32", "bf16")
    # No quantizer feeds the planted layer any more.
    feeds = {target.get_node().get_friendly_name() for node in model.get_ordered_ops() if node.get_type_name() == "FakeQuantize"
             for target in node.output(0).get_target_inputs()}
    assert feeds and not any(name.split("/")[0] == SENSITIVE_LAYER for name in feeds)
    # The file as written, scored again on the guard's held-out images, meets the guard's target.
    held = load_all(split_images(sample_images, OPTIONS.held_out_fraction).held_out, metadata.preprocess)
    reference = session_scores(ort_session(str(model_path)), held)
    again = fidelity(openvino_scores(model, held, metadata.extra["inference_precision"]), reference, report.target)
    assert again.passed and again.count == report.final.count == result.held_out


def test_quantizers_take_memexports_ranges_and_signs(tmp_path, sample_images):
    """Every activation quantizer gets the statistics' range; tensors that went negative get a signed one."""
    pytest.importorskip("openvino", reason="needs the openvino extra")
    pytest.importorskip("nncf", reason="needs the openvino extra")
    from memexport.calibration.cpu_int8 import cpu_ranges
    from memexport.calibration.images import load_all
    from memexport.calibration.openvino_int8 import SIGNED_LOW, openvino_int8_model
    from memexport.calibration.stats import activation_stats_from_batches, amax_from_stats
    from tests.models import TINY_PREPROCESS

    model_path = write_tiny_cnn(tmp_path / "tiny.onnx", residual=True)
    batch = load_all(sample_images, TINY_PREPROCESS)
    stats = activation_stats_from_batches(model_path, [batch], len(batch))
    amax = amax_from_stats(stats, "percentile", 99.9)
    signed = {name: low < 0.0 for name, (low, _) in cpu_ranges(stats, 99.9).items()}
    model = openvino_int8_model(model_path, batch[:2], amax, signed)
    seen = {}
    for node in model.get_ordered_ops():
        if node.get_type_name() == "FakeQuantize":
            tensor = next(name for name in node.input_value(0).get_names() if name in amax)
            low, high = (float(node.input_value(i).get_node().get_data().max()) for i in (1, 2))
            assert high == pytest.approx(amax[tensor], rel=1e-6)
            assert low == (pytest.approx(-high * SIGNED_LOW, rel=1e-6) if signed[tensor] else 0.0)
            seen[tensor] = signed[tensor]
    # the residual branch ("c", before the Add) is signed; ReLU outputs are not; the FC head is never quantised
    assert seen.get("c") is True and seen.get("a_relu") is False and "flat" not in seen
