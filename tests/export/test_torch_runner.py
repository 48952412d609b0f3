"""The torch reference is rebuilt from exactly the weights an artifact was exported from."""

from __future__ import annotations

import pytest
import torch

from memexport.core.errors import UsageError
from memexport.export.torch_runner import reference_runner_for
from memexport.runtime.metadata import ArtifactMetadata
from memexport.core.spec import RESMEM


def metadata_with(weights: dict) -> ArtifactMetadata:
    return ArtifactMetadata(
        model="resmem", precision="fp32", input_name="image", output_name="score",
        input_shape=RESMEM.input_shape, preprocess=RESMEM.preprocess, opset=17, weights=weights,
    )


def test_changed_main_checkpoint_is_refused(tmp_path, resmem_weights):
    other = tmp_path / "other.pt"
    torch.save({"x": torch.zeros(1)}, other)
    meta = metadata_with({"path": str(resmem_weights), "sha256": "0" * 64, "parts": {}, "seed": 0})
    with pytest.raises(UsageError, match="differ from the weights this artifact was exported from"):
        reference_runner_for(meta, other)


def test_changed_part_checkpoint_is_refused(tmp_path, resmem_weights):
    from memexport.export.weights import sha256_file

    part = tmp_path / "seg.pt"
    torch.save({"a": torch.zeros(2)}, part)
    recorded = {"path": str(part), "sha256": sha256_file(part)}
    meta = metadata_with({"path": str(resmem_weights), "sha256": sha256_file(resmem_weights), "parts": {"segmentation": recorded}, "seed": 0})
    assert reference_runner_for(meta).weights.parts["segmentation"] == part
    torch.save({"a": torch.ones(2)}, part)
    with pytest.raises(UsageError, match="segmentation checkpoint .* changed since export"):
        reference_runner_for(meta)
    part.unlink()
    with pytest.raises(UsageError, match="is missing"):
        reference_runner_for(meta)


def tiny_torch_scorer() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 1), torch.nn.Flatten(0), torch.nn.Sigmoid(),
    )


def test_bf16_autocast_is_a_separate_precision_sharing_the_module(sample_images):
    import numpy as np

    from memexport.export.torch_runner import TorchRunner
    from memexport.export.weights import WeightsSource

    batch = np.random.default_rng(0).random((4, 3, 227, 227), dtype=np.float32)
    module = tiny_torch_scorer()
    with TorchRunner(RESMEM, WeightsSource(None, {}, 0), model=module) as exact:
        fp32 = exact.infer(batch)
        assert exact.precision == "fp32"
    with TorchRunner(RESMEM, WeightsSource(None, {}, 0), model=module, autocast="bf16") as peer:
        bf16 = peer.infer(batch)
        assert peer.precision == "bf16" and peer.model is module
    assert bf16.dtype == np.float32 and 0 < np.abs(bf16 - fp32).max() < 0.02  # BF16 rounding, not another model
    with pytest.raises(UsageError, match="torch autocast 'fp16' is not supported"):
        TorchRunner(RESMEM, WeightsSource(None, {}, 0), autocast="fp16")
