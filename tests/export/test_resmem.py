"""ResMem in plain torch: published parameter count, strict loading, reference scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memexport.core.errors import CheckpointError
from memexport.export.resmem import ResMem, resmem_from_weights
from memexport.export.weights import WeightsSource, installed_resmem_weights, load_checkpoint, resolve
from memexport.runtime.preprocess import preprocess
from memexport.core.spec import RESMEM


def test_architecture_has_the_published_parameter_count():
    assert sum(p.numel() for p in ResMem().parameters()) == 131_688_809


def test_installed_weights_are_found_without_importing_resmem():
    import sys

    path = installed_resmem_weights()
    assert path.name == "model.pt" and path.parent.name == "resmem"
    assert "resmem" not in sys.modules  # its __init__ would import torchvision


def test_published_weights_reproduce_reference_scores(resmem_weights, sample_images, reference_scores):
    model = resmem_from_weights(resolve(resmem_weights))
    batch = torch.from_numpy(np.stack([preprocess(p, RESMEM.preprocess) for p in sample_images]))
    with torch.inference_mode():
        scores = model(batch).numpy()[:, 0]
    expected = np.array([reference_scores[p.name] for p in sample_images])
    assert np.abs(scores - expected).max() <= 1e-5


def test_wrong_checkpoint_lists_missing_and_unexpected_keys(tmp_path):
    bad = tmp_path / "other.pt"
    torch.save({"features.conv1.weight": torch.zeros(64, 3, 7, 7), "head.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(CheckpointError) as info:
        resmem_from_weights(WeightsSource(bad))
    message = str(info.value)
    assert str(bad) in message and "missing keys" in message and "head.weight" in message and "1 unexpected" in message
    assert "\n" not in message


def test_shape_mismatch_is_reported(tmp_path, resmem_weights):
    state = load_checkpoint(resmem_weights)
    state["fc12.weight"] = torch.zeros(2, 256)
    bad = tmp_path / "shape.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"fc12.weight \(2, 256\) != \(1, 256\)"):
        resmem_from_weights(WeightsSource(bad))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", json.dumps({"a": 1}).encode()])
def test_unreadable_checkpoints_get_one_line_errors(tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
