"""The "not verified" warning of ``predict`` and ``verify``: metadata that cannot be parsed is itself a one-line warning."""

from __future__ import annotations

from memexport.verify import unverified_warning
from tests.models import write_tiny_scorer

IR_WITH_BAD_JSON = '<?xml version="1.0"?>\n<net name="m" version="11"><layers/><edges/><rt_info><memexport value="{&quot;extra&quot;: {broken"/></rt_info></net>\n'


def test_metadata_that_cannot_be_parsed_is_a_one_line_warning(tmp_path):
    broken_json = tmp_path / "broken-json.int8-openvino.xml"
    broken_json.write_text(IR_WITH_BAD_JSON)
    torn_xml = tmp_path / "torn.int8-openvino.xml"
    torn_xml.write_text(IR_WITH_BAD_JSON[:60])
    for path in (broken_json, torn_xml, onnx_with_metadata(tmp_path / "list.int8-cpu.onnx", '["not", "an", "object"]')):
        warning = unverified_warning(path)
        assert warning is not None, path.name
        assert warning.startswith(f"warning: {path.name}: cannot read its memexport metadata") and "\n" not in warning
        assert "verified is unknown" in warning


def test_readable_metadata_without_a_failed_guard_gives_no_warning(tmp_path):
    assert unverified_warning(write_tiny_scorer(tmp_path / "tiny.onnx")) is None
    empty, not_ours = tmp_path / "empty.onnx", tmp_path / "not-ours.onnx"
    empty.write_bytes(b"")
    not_ours.write_bytes(b"\x08\x07\x12\x04junk" * 64)
    assert unverified_warning(empty) is None and unverified_warning(not_ours) is None  # the runner refuses them in its own line


def onnx_with_metadata(path, value: str):
    """The tiny scorer with its memexport metadata entry replaced by ``value``."""
    import onnx

    proto = onnx.load(str(write_tiny_scorer(path, seal=False)))
    entry = next(prop for prop in proto.metadata_props if prop.key == "memexport")
    entry.value = value
    onnx.save(proto, str(path))
    return path
