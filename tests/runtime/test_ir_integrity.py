"""The OpenVINO IR seal: written with the IR, checked by the runner, tampering refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

from memexport.core.errors import ArtifactError
from memexport.runtime.base import RunnerOptions
from memexport.runtime.ir_integrity import IR_SCHEME, check_openvino_ir, ir_digest, seal_openvino_ir
from memexport.runtime.registry import runner_for
from tests.conftest import needs_openvino
from tests.models import scorer_metadata, write_tiny_scorer

CPU = RunnerOptions(device="cpu")


def sealed_ir(tmp_path, name="tiny.xml", metadata=None):
    import openvino as ov

    from memexport.calibration.openvino_int8 import save_openvino_artifact

    model = ov.Core().read_model(str(write_tiny_scorer(tmp_path / f"{name}.onnx")))
    return save_openvino_artifact(model, metadata or scorer_metadata(), tmp_path / name)


@needs_openvino
def test_the_seal_is_written_and_the_runner_checks_it(tmp_path):
    xml = sealed_ir(tmp_path)
    record = check_openvino_ir(xml)
    assert record is not None and record["scheme"] == IR_SCHEME and record["sha256"] == ir_digest(xml)[0]
    assert not list(tmp_path.glob("*.tmp*"))
    with runner_for(xml, CPU) as runner:
        assert runner.metadata.extra["integrity"] == record
        assert runner.infer(np.zeros((1, 3, 227, 227), np.float32)).shape == (1,)


@needs_openvino
@pytest.mark.parametrize("tamper", ["weights", "graph", "metadata", "truncated_bin"])
def test_tampering_is_refused_in_one_line_unless_checks_are_off(tmp_path, tamper):
    xml = sealed_ir(tmp_path)
    weights = xml.with_suffix(".bin")
    if tamper == "weights":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    elif tamper == "graph":
        xml.write_text(xml.read_text().replace("<layers>", "<layers><!-- edited -->", 1))
    elif tamper == "metadata":
        xml.write_text(xml.read_text().replace("&quot;bilinear&quot;", "&quot;nearest&quot;"))
    else:
        weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(ArtifactError) as caught:
        with runner_for(xml, CPU):
            pass
    message = str(caught.value)
    assert "\n" not in message and str(xml) in message
    assert "does not match the" in message and "recorded when it was written" in message
    if tamper == "graph":
        with runner_for(xml, RunnerOptions(device="cpu", check_integrity=False)) as runner:  # --no-integrity-check
            assert runner.metadata.model == "tiny-scorer"


@needs_openvino
def test_two_different_metadata_values_and_unsealable_ir_are_refused(tmp_path):
    import openvino as ov

    xml = sealed_ir(tmp_path)
    text = xml.read_text()
    first = text.index('<memexport value="')
    xml.write_text(text[:first] + text[first:].replace("tiny-scorer", "tiny-scorer-2", 1))
    with pytest.raises(ArtifactError, match="two different memexport metadata entries"):
        check_openvino_ir(xml)
    bare = tmp_path / "bare.xml"
    ov.save_model(ov.Core().read_model(str(write_tiny_scorer(tmp_path / "bare.onnx"))), str(bare))
    text = bare.read_text()
    bare.write_text(text.replace("<memexport value=", "<elsewhere value="))
    assert check_openvino_ir(bare) is None  # nothing recorded, nothing to check
    with pytest.raises(ArtifactError, match="no memexport metadata in this IR to seal"):
        seal_openvino_ir(bare)


def test_metadata_copies_inside_subgraph_bodies_are_hashed_not_read(tmp_path):
    """An If body carries the ONNX's own metadata: only the model's rt_info (after the last </edges>) counts."""
    from memexport.runtime.ir_integrity import ir_metadata_value

    body = '<layer><then_body><edges/></edges><rt_info><framework><memexport value="{&quot;old&quot;: 1}" /></framework></rt_info></then_body></layer>'
    xml = tmp_path / "m.xml"
    xml.write_text(f'<net><layers>{body}</layers><edges></edges><rt_info><memexport value="{{&quot;model&quot;: &quot;m&quot;}}" /></rt_info></net>')
    xml.with_suffix(".bin").write_bytes(b"\0" * 8)
    assert ir_metadata_value(xml) == '{"model": "m"}'
    record = seal_openvino_ir(xml)
    assert check_openvino_ir(xml) == record and '{&quot;old&quot;: 1}' in xml.read_text()
    xml.write_text(xml.read_text().replace("&quot;old&quot;: 1", "&quot;old&quot;: 2"))
    with pytest.raises(ArtifactError, match="does not match the"):
        check_openvino_ir(xml)


@needs_openvino
def test_verified_ir_is_not_hashed_again_until_a_file_changes(tmp_path, monkeypatch):
    from memexport.runtime import ir_integrity

    xml = sealed_ir(tmp_path)
    record = check_openvino_ir(xml)
    calls = []
    real = ir_integrity.ir_digest
    monkeypatch.setattr(ir_integrity, "ir_digest", lambda p, data=None: calls.append(p) or real(p, data))
    assert check_openvino_ir(xml) == record and calls == []
    assert check_openvino_ir(xml, use_cache=False) == record and len(calls) == 1
    weights = xml.with_suffix(".bin")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))  # same size, new mtime/ctime: hashed again, and caught
    with pytest.raises(ArtifactError, match="does not match the"):
        check_openvino_ir(xml)
    assert len(calls) == 2
