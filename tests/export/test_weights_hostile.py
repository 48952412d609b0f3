"""Hostile checkpoints: a pickle payload never runs; broken files get one clear error naming them."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from memexport.core.errors import CheckpointError  # noqa: E402
from memexport.export.weights import load_checkpoint  # noqa: E402


class Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("form", ["zip", "legacy", "raw-pickle", "nested-state-dict"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, form):
    marker = tmp_path / "PWNED"
    checkpoint = tmp_path / f"{form}.pt"
    evil = {"fc.weight": torch.zeros(2), "x": Payload(marker)}
    if form == "zip":
        torch.save(evil, checkpoint)
    elif form == "legacy":
        torch.save(evil, checkpoint, _use_new_zipfile_serialization=False)
    elif form == "raw-pickle":
        checkpoint.write_bytes(pickle.dumps(evil))
    else:
        torch.save({"state_dict": evil}, checkpoint)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.exists(), "the payload must be live: plain unpickling runs it"
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(checkpoint)
    message = str(caught.value)
    assert str(checkpoint) in message and "refused" in message and "\n" not in message and "\x1b" not in message
    assert "weights_only=False" not in message  # never advise the unsafe way out
    assert not marker.exists()


def test_export_with_a_payload_checkpoint_fails_without_running_it(tmp_path):
    marker = tmp_path / "PWNED"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"x": Payload(marker)}, checkpoint)
    result = subprocess.run(
        [sys.executable, "-m", "memexport", "export", "resmem", "-o", str(tmp_path / "x.onnx"), "--weights", str(checkpoint)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr and "evil.pt" in result.stderr
    assert not marker.exists() and not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "folder"])
def test_broken_checkpoints_name_the_file(tmp_path, damage):
    checkpoint = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.ones(64, 64)}, checkpoint)
    data = checkpoint.read_bytes()
    if damage == "truncated":
        checkpoint.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        checkpoint.write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    elif damage == "empty":
        checkpoint.write_bytes(b"")
    else:
        checkpoint.unlink()
        checkpoint.mkdir()
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(checkpoint)
    assert str(checkpoint) in str(caught.value) and "\n" not in str(caught.value)


def test_plain_state_dict_still_loads(tmp_path):
    checkpoint = tmp_path / "ok.pt"
    torch.save({"fc.weight": torch.ones(2, 2)}, checkpoint)
    assert set(load_checkpoint(checkpoint)) == {"fc.weight"}
