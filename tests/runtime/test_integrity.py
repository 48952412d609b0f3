"""Tampered, truncated and escaping artifacts are refused with the file named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from memexport.core.errors import ArtifactError
from memexport.runtime import integrity
from memexport.runtime.integrity import check_onnx, find_metadata_entry, metadata_entry_bytes, onnx_digest
from memexport.runtime.base import RunnerOptions
from memexport.runtime.registry import runner_for
from tests.models import write_tiny_scorer

CPU = RunnerOptions(device="cpu")


def activate(path: Path, options: RunnerOptions = CPU, backend: str = "onnxruntime") -> None:
    with runner_for(path, options, backend) as runner:
        runner.infer(np.zeros((1, 3, 227, 227), np.float32))


@pytest.fixture()
def sealed(tmp_path) -> Path:
    return write_tiny_scorer(tmp_path / "model.onnx")


def flip_weight(path: Path) -> None:
    data = bytearray(path.read_bytes())
    index = data.find(np.float32(1.5).tobytes())
    assert index > 0
    data[index : index + 4] = np.float32(1.5001).tobytes()
    path.write_bytes(bytes(data))


def test_sealed_artifact_verifies_and_runs(sealed, onnx_backend):
    record = check_onnx(sealed, use_cache=False)
    assert record is not None and record["sha256"] == onnx_digest(sealed)[0]
    activate(sealed, backend=onnx_backend)


def test_entry_location_matches_onnx_serialisation(sealed):
    import onnx

    proto = onnx.load(str(sealed))
    value = next(p.value for p in proto.metadata_props if p.key == "memexport")
    span = find_metadata_entry(sealed.read_bytes())
    assert span.value == value and sealed.read_bytes()[span.start : span.end] == metadata_entry_bytes(value)


def test_a_changed_weight_is_caught_at_activation(sealed, onnx_backend):
    flip_weight(sealed)
    with pytest.raises(ArtifactError, match=r"model\.onnx: sha256 .* does not match"):
        activate(sealed, backend=onnx_backend)
    activate(sealed, RunnerOptions(device="cpu", check_integrity=False), onnx_backend)  # opt-out still works


def test_edited_metadata_is_caught(sealed):
    data = sealed.read_bytes()
    span = find_metadata_entry(data)
    meta = json.loads(span.value)
    meta["preprocess"]["crop"] = 224  # what a tamperer would change to skew scores
    edited = data[: span.start] + metadata_entry_bytes(json.dumps(meta, sort_keys=True)) + data[span.end :]
    sealed.write_bytes(edited)
    with pytest.raises(ArtifactError, match="does not match"):
        check_onnx(sealed, use_cache=False)


def test_verified_digest_is_cached_until_the_file_changes(sealed, monkeypatch):
    check_onnx(sealed)
    calls = []
    real = integrity.onnx_digest
    monkeypatch.setattr(integrity, "onnx_digest", lambda p: calls.append(p) or real(p))
    check_onnx(sealed)
    assert calls == []
    flip_weight(sealed)  # new mtime/size/ctime: hashed again, and caught
    with pytest.raises(ArtifactError):
        check_onnx(sealed)
    assert len(calls) == 1


def test_unsealed_artifact_is_accepted_and_derived_metadata_drops_the_seal(tmp_path, sealed, onnx_backend):
    import onnx

    from memexport.export.onnx_export import set_metadata
    from memexport.runtime.metadata import metadata_from_map

    plain = write_tiny_scorer(tmp_path / "plain.onnx", seal=False)
    assert check_onnx(plain, use_cache=False) is None
    activate(plain, backend=onnx_backend)
    # An fp16/int8 conversion copies metadata from a sealed source: the stale seal must not follow.
    proto = onnx.load(str(sealed))
    meta = metadata_from_map({p.key: p.value for p in proto.metadata_props}, sealed)
    assert "integrity" in meta.extra
    set_metadata(proto, meta.with_extra(precision_note="derived"))
    derived = tmp_path / "derived.onnx"
    onnx.save(proto, str(derived))
    assert check_onnx(derived, use_cache=False) is None


def test_external_data_tampering_and_escape_are_refused(tmp_path, onnx_backend):
    import onnx

    (tmp_path / "ext").mkdir()
    model = write_tiny_scorer(tmp_path / "ext" / "model.onnx", external_data=True)
    data_file = model.parent / "model.onnx.data"
    activate(model, backend=onnx_backend)
    original = data_file.read_bytes()
    data_file.write_bytes(np.float32(9.0).tobytes() + original[4:])
    with pytest.raises(ArtifactError, match="model.onnx.data: external data sha256"):
        check_onnx(model, use_cache=False)
    # An ONNX whose external data points outside its folder.
    proto = onnx.load(str(model), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../etc/passwd"
    escaping = tmp_path / "ext" / "escape.onnx"
    onnx.save(proto, str(escaping))
    with pytest.raises(ArtifactError, match="points outside the model's folder"):
        activate(escaping, RunnerOptions(device="cpu", check_integrity=False), onnx_backend)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_corrupt_onnx_names_the_file(sealed, damage, onnx_backend):
    data = sealed.read_bytes()
    sealed.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x08\x07not onnx at all" * 40, "empty": b""}[damage])
    with pytest.raises(ArtifactError) as caught:
        activate(sealed, backend=onnx_backend)
    assert str(sealed) in str(caught.value) and "\n" not in str(caught.value)


def test_real_export_is_sealed_and_verifies(resmem_onnx, tmp_path):
    record = check_onnx(resmem_onnx, use_cache=False)
    assert record is not None and len(record["sha256"]) == 64
    copy = tmp_path / "resmem.onnx"
    shutil.copyfile(resmem_onnx, copy)
    with open(copy, "r+b") as handle:  # one flipped bit in the middle of the weights
        handle.seek(copy.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ArtifactError, match="does not match"):
        check_onnx(copy, use_cache=False)
