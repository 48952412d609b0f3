"""The runner registry: suffix and back-end dispatch, lazily, and the shared options."""

from __future__ import annotations

import subprocess
import sys

import pytest

from memexport.core.errors import UsageError
from memexport.runtime import registry
from memexport.runtime.base import RunnerOptions, parse_device
from memexport.runtime.onnxruntime_runner import OnnxRuntimeRunner, OrtOptions
from memexport.runtime.tensorrt_runner import TensorRTOptions, TensorRTRunner


def test_suffix_picks_the_runner():
    assert isinstance(registry.runner_for("m.onnx"), OnnxRuntimeRunner)
    for name in ("e.plan", "e.ENGINE", "e.trt"):
        assert isinstance(registry.runner_for(name), TensorRTRunner)
    assert registry.backend_names()[:2] == ("onnxruntime", "tensorrt")


def test_options_reach_the_runner():
    runner = registry.runner_for("e.plan", RunnerOptions(device="cuda:1", check_integrity=False), backend_options=TensorRTOptions(True))
    assert runner.device == "cuda:1" and runner.options.check_integrity is False and runner.backend_options.allow_other_gpu_model
    assert registry.runner_for("m.onnx").backend_options == OrtOptions()


def test_unknown_suffix_and_backends_are_one_line_usage_errors():
    with pytest.raises(UsageError, match=r"m\.bin: unknown artifact type '\.bin'; expected \.onnx, \.xml \(OpenVINO IR\), \.plan or \.engine"):
        registry.runner_for("m.bin")
    with pytest.raises(UsageError, match=r"unknown back end 'nope'; choose one of onnxruntime, tensorrt"):
        registry.runner_for("m.onnx", backend="nope")
    with pytest.raises(UsageError, match=r"the tensorrt back end reads \.plan, \.engine, \.trt files, not '\.onnx'; choose one of onnxruntime"):
        registry.runner_for("m.onnx", backend="tensorrt")


def test_wrong_backend_options_type_is_refused():
    with pytest.raises(UsageError, match="unknown option type OrtOptions; expected TensorRTOptions"):
        TensorRTRunner("e.plan", RunnerOptions(), OrtOptions())


def test_add_backend_registers_one_entry(monkeypatch):
    monkeypatch.setattr(registry, "BACKENDS", dict(registry.BACKENDS))
    entry = registry.Entry((".onnx", ".OTHER"), "memexport.runtime.onnxruntime_runner", "OnnxRuntimeRunner", default_for=".other")
    assert entry.suffixes == (".onnx", ".other") and entry.default_for == (".other",) and registry.BACKENDS["onnxruntime"].suffixes == (".onnx",)
    registry.add_backend("other", entry)
    registry.add_backend("other", entry)  # same entry again: no-op
    assert registry.backend_for("m.other") == "other" and registry.backend_for("m.onnx") == "onnxruntime"
    assert registry.backend_for("m.onnx", "other") == "other"
    with pytest.raises(UsageError, match="already registered"):
        registry.add_backend("other", registry.BACKENDS["tensorrt"])


@pytest.mark.parametrize("text, parsed", [("auto", ("auto", 0)), ("cpu", ("cpu", 0)), ("cuda", ("cuda", 0)), ("cuda:3", ("cuda", 3)), ("CUDA:1", ("cuda", 1))])
def test_device_strings(text, parsed):
    assert parse_device(text) == parsed


@pytest.mark.parametrize("text", ["gpu", "cpu:1", "cuda:", "1", ""])
def test_bad_device_strings_are_usage_errors(text):
    with pytest.raises(UsageError, match="expected auto, cpu, cuda or cuda:N"):
        RunnerOptions(device=text)


def test_importing_the_registry_imports_no_back_end():
    code = ("import sys, memexport.runtime.registry as r; r.runner_for('m.onnx', r.RunnerOptions(device='cpu'));"
            "print(sorted(m for m in ('onnxruntime', 'memexport.runtime.tensorrt_runner', 'tensorrt', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_onnxruntime_runner_answers_the_contract(tmp_path):
    from tests.models import write_tiny_scorer

    model = write_tiny_scorer(tmp_path / "s.onnx")
    runner = registry.runner_for(model, RunnerOptions(device="cpu", threads=1))
    assert runner.device == "cpu" and runner.memory_bytes() is None and runner.precision == "unknown"
    with runner:
        info = runner.describe()
        assert runner.device == "cpu" and runner.precision == "fp32" and runner.memory_bytes() == model.stat().st_size
    assert info["backend"] == "onnxruntime" and info["providers"] == ["CPUExecutionProvider"] and info["device"] == "cpu"
    assert info["memory_bytes"] == model.stat().st_size and info["precision"] == "fp32"


def test_openvino_is_one_entry_reading_onnx_and_ir():
    assert registry.backend_for("m.xml") == "openvino" and registry.backend_for("m.onnx") == "onnxruntime"
    assert registry.backend_for("m.onnx", "openvino") == "openvino"
    with pytest.raises(UsageError, match=r"the openvino back end reads \.onnx, \.xml files, not '\.plan'"):
        registry.runner_for("e.plan", backend="openvino")


def test_precision_becomes_the_back_ends_own_options():
    assert registry.runner_for("m.onnx", backend="openvino", precision="bf16").backend_options.precision == "bf16"
    assert registry.runner_for("m.onnx", precision="fp32").backend_options == OrtOptions()
    with pytest.raises(UsageError, match=r"m\.onnx: --precision bf16: the onnxruntime back end computes the artifact's own precision; use --backend openvino"):
        registry.runner_for("m.onnx", precision="bf16")
    with pytest.raises(UsageError, match=r"e\.plan: --precision bf16: the tensorrt back end"):
        registry.runner_for("e.plan", precision="bf16")
