"""VRAM budget arithmetic with the published model sizes, activation counting and measurement helpers."""

from __future__ import annotations

import re

import pytest

from memexport.core.errors import BudgetError, UsageError
from memexport.runtime import budget
from memexport.runtime.budget import GIB, MIB
from memexport.core.spec import RESMEM
from tests.models import tiny_cnn_proto

M3M_PARAMETERS = 500_000_000  # published: about 500M parameters, about 2 GB FP32


def test_published_sizes():
    resmem = budget.estimate_vram(RESMEM.parameters, "fp32", 1, 0)
    assert RESMEM.parameters == 131_688_809
    assert resmem.weights == 131_688_809 * 4 and round(resmem.weights / 1e9, 2) == 0.53
    assert budget.estimate_vram(RESMEM.parameters, "fp16", 1, 0).weights * 2 == resmem.weights
    m3m = budget.estimate_vram(M3M_PARAMETERS, "fp32", 1, 0)
    assert round(m3m.weights / 1e9, 1) == 2.0
    # Both fit an 11 GiB card at batch 32 with ResNet-152-sized activations (~30M elements per image).
    for parameters in (RESMEM.parameters, M3M_PARAMETERS):
        assert budget.require_fits("m", parameters, "fp32", 32, 30_000_000).fits


def test_over_budget_names_the_largest_batch_that_fits():
    parameters, per_image = M3M_PARAMETERS, 60_000_000  # 240 MB FP32 activations per image
    with pytest.raises(BudgetError, match=r"largest batch that fits is (\d+) \(--max-batch \1\)") as caught:
        budget.require_fits("m3m.onnx", parameters, "fp32", 64, per_image)
    best = int(re.search(r"--max-batch (\d+)", str(caught.value)).group(1))
    # Brute force, independent of largest_batch_that_fits's closed form.
    brute = max(b for b in range(1, 200) if budget.estimate_vram(parameters, "fp32", b, per_image).fits)
    assert best == brute and "m3m.onnx" in str(caught.value)
    with pytest.raises(BudgetError, match="even batch 1 does not fit"):
        budget.require_fits("huge", 3_000_000_000, "fp32", 1, 0)


def test_workspace_is_derived_from_the_budget():
    per_image = 30_000_000
    workspace = budget.workspace_for_budget(RESMEM.parameters, "fp16", 32, per_image)
    assert budget.MIN_WORKSPACE_BYTES <= workspace <= budget.MAX_WORKSPACE_BYTES
    assert budget.estimate_vram(RESMEM.parameters, "fp16", 32, per_image, workspace_bytes=workspace).fits
    small = budget.workspace_for_budget(RESMEM.parameters, "fp16", 32, per_image, budget_bytes=4 * GIB)
    assert small < workspace  # a smaller budget leaves less scratch
    with pytest.raises(BudgetError, match=r"--max-batch \d+"):
        budget.workspace_for_budget(RESMEM.parameters, "fp32", 256, per_image, budget_bytes=4 * GIB)


@pytest.mark.parametrize("text, expected", [("11GiB", 11 * GIB), ("11 GB", 11 * GIB), ("512MiB", 512 * MIB), ("1.5g", int(1.5 * GIB)), ("1048576", MIB)])
def test_parse_bytes(text, expected):
    assert budget.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["eleven", "-1GiB", "0"])
def test_parse_bytes_refuses(text):
    with pytest.raises(UsageError):
        budget.parse_bytes(text)


def test_activation_profile_counts_live_tensors():
    profile = budget.activation_profile(tiny_cnn_proto())
    # Per image: image 3x32x32 = 3072; a, a_relu, b, b_relu, c, c_relu each 8x32x32 = 8192;
    # pooled 8, flat 8, logit 1, score 1. At most one conv input and its output are live at once.
    assert profile.peak_elements == 2 * 8192
    assert profile.total_elements == 3072 + 6 * 8192 + 8 + 8 + 1 + 1
    assert profile.unknown == ()
    assert budget.onnx_parameter_count(tiny_cnn_proto()) == 8 * 3 * 9 + 8 + 8 * 8 * 9 + 8 + 8 * 8 + 8 + 8 + 1


def test_engine_load_estimate_and_refusal():
    estimate = budget.estimate_engine_load(500 * MIB, 3 * GIB, 32 * MIB, "fp16", 32, budget_bytes=11 * GIB)
    assert estimate.total == 500 * MIB + 3 * GIB + 32 * MIB + budget.CUDA_CONTEXT_BYTES
    assert budget.require_engine_fits("e.plan", estimate) is estimate
    with pytest.raises(BudgetError, match=r"GPU's free memory.*--max-batch (\d+)") as caught:
        budget.require_engine_fits("e.plan", estimate, free_bytes=2 * GIB)
    best = int(re.search(r"--max-batch (\d+)", str(caught.value)).group(1))
    per_image = (3 * GIB + 32 * MIB) / 32
    assert 500 * MIB + best * per_image <= 2 * GIB < 500 * MIB + (best + 1) * per_image


def test_measurement_helpers():
    assert budget.vram_delta(None, 5) is None and budget.vram_delta(10 * MIB, 4 * MIB) == 6 * MIB
    estimate = budget.estimate_vram(RESMEM.parameters, "fp32", 8, 1000)
    report = budget.compare_measured(estimate, (estimate.total - estimate.context) // 2)
    assert report["measured_over_estimate"] == 0.5


def test_onnx_runtime_gpu_check_counts_weights_data_file_and_context(tmp_path):
    from memexport.core.errors import BudgetError
    from memexport.runtime.budget import CUDA_CONTEXT_BYTES, MIB, check_onnx_fits

    model = tmp_path / "m.onnx"
    model.write_bytes(b"\0" * MIB)
    (tmp_path / "m.onnx.data").write_bytes(b"\0" * (3 * MIB))
    check_onnx_fits(model, CUDA_CONTEXT_BYTES + 4 * MIB)  # exactly fits
    with pytest.raises(BudgetError, match=r"m\.onnx: weights and CUDA context need"):
        check_onnx_fits(model, CUDA_CONTEXT_BYTES + 4 * MIB - 1)
