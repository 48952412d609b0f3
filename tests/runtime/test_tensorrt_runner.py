"""TensorRTRunner: sidecar checks, refusals before deserialising, buffer plumbing, batch splitting, thread safety.

TensorRT and CUDA are recording fakes here (tests/fake_tensorrt.py): the fake CUDA keeps
"device" memory in RAM and the fake engine computes a known function of the bytes the runner
copied in, so these tests check our plumbing, not TensorRT. Real engines: tests marked gpu.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from memexport.core.errors import ArtifactError, BackendUnavailableError, EngineMismatchError, UsageError
from memexport.runtime import cuda as cuda_mod
from memexport.runtime.base import RunnerOptions
from memexport.runtime.onnxruntime_runner import OrtOptions
from memexport.runtime.registry import runner_for
from memexport.runtime.engine_sidecar import (
    SIDECAR_FORMAT, SIDECAR_SCHEMA, check_engine_compatible, read_sidecar, sha256_bytes, sidecar_path,
)
from memexport.runtime.tensorrt_runner import TensorRTRunner
from tests.fake_tensorrt import HostCuda, Recorder, TinyEngine, fake_tensorrt
from tests.models import TINY_SHAPE, tiny_metadata

PLAN = b"not a real plan, but the bytes the sidecar describes"


def scorer(batch: np.ndarray) -> np.ndarray:
    return batch.reshape(len(batch), -1).mean(axis=1)


def write_engine(folder: Path, tensorrt: str = "8.6.1", gpu: str = "NVIDIA GeForce GTX 1080 Ti", cc: str = "6.1", max_batch: int = 4) -> Path:
    plan = folder / "tiny.plan"
    plan.write_bytes(PLAN)
    record = {
        "format": SIDECAR_FORMAT, "schema": SIDECAR_SCHEMA,
        "plan": {"file": plan.name, "bytes": len(PLAN), "sha256": sha256_bytes(PLAN)},
        "tensorrt": tensorrt, "gpu": {"name": gpu, "compute_capability": cc, "total_memory": 11 * 2**30},
        "precision": "fp16", "precision_source": "builder-flag",
        "profile": {"input": "image", "min": [1, *TINY_SHAPE], "opt": [2, *TINY_SHAPE], "max": [max_batch, *TINY_SHAPE]},
        "onnx": {"file": "tiny.onnx", "sha256": "0" * 64}, "calibration": None, "build_options": {"precision": "fp16"},
        "device_memory_size": 64 * 2**20, "memexport_version": "0.1.0",
        "metadata": json.loads(tiny_metadata(precision="fp16").to_json()),
    }
    sidecar_path(plan).write_text(json.dumps(record))
    return plan


@pytest.fixture()
def fakes(monkeypatch):
    """Install a fake TensorRT 8.6.1 whose engine is a TinyEngine, and a host-memory CUDA (a GTX 1080 Ti)."""
    recorder = Recorder()
    engines: list[TinyEngine] = []
    holder: dict = {}

    def make_engine(data: bytes) -> TinyEngine:
        engine = TinyEngine(holder["trt"], holder.get("max_batch", 4), TINY_SHAPE, scorer, delay=holder.get("delay", 0.0))
        engines.append(engine)
        return engine

    holder["trt"] = fake_tensorrt("8.6.1", recorder, engine_factory=make_engine)
    cuda = HostCuda()
    monkeypatch.setitem(sys.modules, "tensorrt", holder["trt"])
    monkeypatch.setattr(cuda_mod, "load_cuda", lambda prefer="auto": cuda)
    return {"recorder": recorder, "engines": engines, "cuda": cuda, "holder": holder}


def test_sidecar_problems_are_artifact_errors(tmp_path):
    plan = write_engine(tmp_path)
    assert read_sidecar(plan).tensorrt == "8.6.1"
    side = sidecar_path(plan)
    record = json.loads(side.read_text())
    side.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_sidecar(plan)
    side.write_text(json.dumps({**record, "format": "other"}))
    with pytest.raises(ArtifactError, match="not a memexport engine sidecar"):
        read_sidecar(plan)
    side.write_text(json.dumps({k: v for k, v in record.items() if k != "gpu"}))
    with pytest.raises(ArtifactError, match="lacks gpu"):
        read_sidecar(plan)
    side.unlink()
    with pytest.raises(ArtifactError, match=r"tiny.plan.json is missing"):
        read_sidecar(plan)


@pytest.mark.parametrize(
    "tensorrt, gpu, cc, allow, message",
    [
        ("10.16.1.11", "NVIDIA GeForce GTX 1080 Ti", (6, 1), False, r"built with TensorRT 8.6.1 but TensorRT 10.16.1.11 is installed"),
        ("8.6.1", "NVIDIA GeForce RTX 3090", (8, 6), False, r"built for NVIDIA GeForce GTX 1080 Ti \(sm_61\) but this GPU is NVIDIA GeForce RTX 3090 \(sm_86\)"),
        ("8.6.1", "NVIDIA TITAN Xp", (6, 1), False, r"built for NVIDIA GeForce GTX 1080 Ti but this GPU is NVIDIA TITAN Xp \(both sm_61\)"),
        ("8.6.1", "NVIDIA TITAN Xp", (6, 1), True, None),
        ("8.6.1", "NVIDIA GeForce GTX 1080 Ti", (6, 1), False, None),
    ],
)
def test_engine_compatibility(tmp_path, tensorrt, gpu, cc, allow, message):
    record = read_sidecar(write_engine(tmp_path))
    if message is None:
        check_engine_compatible(record, tensorrt, gpu, cc, "e.plan", allow)
    else:
        with pytest.raises(EngineMismatchError, match=message):
            check_engine_compatible(record, tensorrt, gpu, cc, "e.plan", allow)


def test_mismatch_is_refused_before_deserialising(tmp_path, fakes):
    plan = write_engine(tmp_path, gpu="NVIDIA GeForce RTX 2080 Ti", cc="7.5")
    with pytest.raises(EngineMismatchError, match="rebuild it on this GPU"):
        with TensorRTRunner(plan):
            pass
    assert not fakes["recorder"].named("deserialize_cuda_engine")
    plan = write_engine(tmp_path, tensorrt="8.6.0")
    with pytest.raises(EngineMismatchError, match="install tensorrt==8.6.0"):
        TensorRTRunner(plan).activate()
    assert not fakes["recorder"].named("deserialize_cuda_engine")


def test_replaced_plan_is_refused(tmp_path, fakes):
    plan = write_engine(tmp_path)
    plan.write_bytes(PLAN[:-1] + b"?")
    with pytest.raises(ArtifactError, match="not the one its sidecar describes"):
        TensorRTRunner(plan).activate()
    assert not fakes["recorder"].named("deserialize_cuda_engine")


def test_no_integrity_check_skips_the_plan_hash_as_it_skips_the_onnx_digest(tmp_path, fakes):
    plan = write_engine(tmp_path)
    plan.write_bytes(PLAN[:-1] + b"?")
    with runner_for(plan, RunnerOptions(check_integrity=False)) as runner:
        assert runner.device == "cuda:0" and runner.memory_bytes() == runner.vram_estimate.total - runner.vram_estimate.context
    assert fakes["recorder"].named("deserialize_cuda_engine")


def test_infer_copies_splits_and_frees(tmp_path, fakes):
    plan = write_engine(tmp_path, max_batch=4)
    batch = np.random.default_rng(0).random((10, *TINY_SHAPE), dtype=np.float32)
    cuda = fakes["cuda"]
    runner = runner_for(plan, RunnerOptions(device="cuda", vram_budget_bytes=8 * 2**30))
    assert isinstance(runner, TensorRTRunner) and runner.options.vram_budget_bytes == 8 * 2**30
    with runner:
        assert runner.max_batch == 4 and runner.precision == "fp16" and runner.metadata.model == "tiny"
        scores = runner.infer(batch)
        # Loading took exactly the device buffers (input + output at max batch), as cudaMemGetInfo saw it.
        assert runner.vram_measured == 4 * 4 * int(np.prod(TINY_SHAPE)) + 4 * 4
        assert runner.vram_estimate.total == len(PLAN) + 64 * 2**20 + runner.vram_measured + runner.vram_estimate.context
    np.testing.assert_allclose(scores, scorer(batch), rtol=1e-6)
    assert [s[0] for s in fakes["engines"][0].shapes] == [4, 4, 2]  # split within the profile
    assert cuda.used == 0 and not cuda.buffers and not cuda.streams  # everything freed on exit
    with pytest.raises(UsageError, match="not active"):
        runner.infer(batch)


def test_thread_safety_rule_infer_calls_are_serialised(tmp_path, fakes):
    fakes["holder"]["delay"] = 0.01
    plan = write_engine(tmp_path, max_batch=4)
    rng = np.random.default_rng(1)
    batches = [rng.random((3, *TINY_SHAPE), dtype=np.float32) for _ in range(8)]
    results: dict[int, np.ndarray] = {}
    with TensorRTRunner(plan) as runner:
        def work(i: int) -> None:
            results[i] = runner.infer(batches[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # One context, one stream, shared staging buffers: never two executions at once,
    # and every thread got the scores of its own batch.
    assert fakes["engines"][0].max_active == 1
    for i, batch in enumerate(batches):
        np.testing.assert_allclose(results[i], scorer(batch), rtol=1e-6)


def test_over_budget_engine_names_the_batch_that_fits(tmp_path, fakes):
    plan = write_engine(tmp_path, max_batch=32)
    from memexport.core.errors import BudgetError

    # 64 MiB device memory at batch 32 -> 2 MiB per image; 600 MiB context + 20 MiB leaves room for 10.
    with pytest.raises(BudgetError, match=r"rebuild with --max-batch (\d+)"):
        TensorRTRunner(plan, RunnerOptions(vram_budget_bytes=620 * 2**20 + len(PLAN))).activate()
    assert not fakes["recorder"].named("deserialize_cuda_engine")


def test_unknown_option_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="unknown option"):
        TensorRTRunner(tmp_path / "x.plan", RunnerOptions(device="cuda"), OrtOptions())


def test_describe_and_inspect_need_no_tensorrt(tmp_path, monkeypatch):
    from memexport.inspect import inspect_artifact

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    plan = write_engine(tmp_path)
    info = inspect_artifact(plan)
    assert info["backend"] == "tensorrt" and info["tensorrt"] == "8.6.1" and info["precision"] == "fp16"
    assert info["gpu"]["compute_capability"] == "6.1" and info["profile"]["max"][0] == 4 and info["model"] == "tiny"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_without_tensorrt_the_runner_says_which_version_to_install(tmp_path):
    with pytest.raises(BackendUnavailableError, match=r"needs tensorrt==8.6.1.*ONNX Runtime"):
        TensorRTRunner(write_engine(tmp_path)).activate()
