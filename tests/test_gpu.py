"""Pascal rules and TensorRT version gates, decided from the compute capability."""

from __future__ import annotations

import pytest

from memexport.runtime import gpu
from memexport.core.errors import BackendUnavailableError
from memexport.runtime import cuda


@pytest.mark.parametrize(
    "cc, fast_fp16, int8",
    [((6, 1), False, True), ((6, 0), True, False), ((6, 2), True, True), ((5, 2), False, False), ((7, 5), True, True), ((8, 6), True, True)],
)
def test_fp16_and_int8_by_compute_capability(cc, fast_fp16, int8):
    assert gpu.has_fast_fp16(cc) is fast_fp16 and gpu.has_int8(cc) is int8


def test_pascal_advice_says_fp16_brings_no_speed_and_recommends_int8():
    advice = gpu.precision_advice((6, 1))
    assert "no fast FP16" in advice and "--int8" in advice and "TensorRT 8.6" in advice
    assert "no fast FP16" not in gpu.precision_advice((8, 6))
    with_trt10 = gpu.precision_advice((6, 1), "10.16.1.11")
    assert "does not support sm_61" in with_trt10 and "TensorRT 8.6" in with_trt10
    assert "does not support" not in gpu.precision_advice((6, 1), "8.6.1")


@pytest.mark.parametrize(
    "cc, version, problem",
    [
        ((6, 1), "8.6.1", None),
        ((6, 1), "10.0.1", "install TensorRT 8.6"),
        ((6, 1), "11.4.0.106", "install TensorRT 8.6"),
        ((7, 5), "10.16.1.11", None),
        ((7, 0), "10.0.1", None),
        ((3, 7), "8.6.1", "too old"),
    ],
)
def test_tensorrt_support_gate(cc, version, problem):
    found = gpu.tensorrt_support_problem(cc, version)
    assert (found is None) if problem is None else (problem in found)


def test_tensorrt10_on_pascal_stops_with_exit_code_2():
    card = gpu.GpuInfo(0, "NVIDIA GeForce GTX 1080 Ti", (6, 1), 11 * 2**30)
    with pytest.raises(BackendUnavailableError, match=r"GTX 1080 Ti \(GPU 0\): TensorRT 10.3.0 does not support sm_61.*TensorRT 8.6") as caught:
        gpu.require_tensorrt_supports(card, "10.3.0")
    assert caught.value.exit_code == 2
    gpu.require_tensorrt_supports(card, "8.6.1")


def test_install_hint_follows_the_gpu():
    assert "tensorrt==8.6.1" in gpu.tensorrt_install_hint((6, 1))
    assert "tensorrt-cu12>=10" in gpu.tensorrt_install_hint((8, 9))
    both = gpu.tensorrt_install_hint(None)
    assert "tensorrt==8.6.1" in both and "tensorrt-cu12" in both


def test_list_gpus_reads_the_cuda_runtime_without_torch(monkeypatch):
    from tests.fake_tensorrt import HostCuda

    monkeypatch.setattr(cuda, "load_cuda", lambda prefer="auto": HostCuda())
    monkeypatch.setattr(gpu, "_gpus_from_torch", lambda: pytest.fail("torch fallback used although CUDA answered"))
    (card,) = gpu.list_gpus()
    assert card.compute_capability == (6, 1) and card.sm == "sm_61" and card.name == "NVIDIA GeForce GTX 1080 Ti"


def test_doctor_gives_pascal_advice(monkeypatch):
    from memexport.doctor import environment_report
    from tests.fake_tensorrt import HostCuda

    monkeypatch.setattr(cuda, "load_cuda", lambda prefer="auto": HostCuda())
    report = environment_report()
    (card,) = report["gpus"]
    assert card["compute_capability"] == "6.1" and "no fast FP16" in card["advice"] and "--int8" in card["advice"]
