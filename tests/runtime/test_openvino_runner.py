"""The OpenVINO runner: exact FP32 next to ONNX Runtime, BF16 only where asked for and fast, one-line refusals."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from memexport.core.errors import ArtifactError, UsageError
from memexport.runtime.base import RunnerOptions
from memexport.runtime.cpu import CpuUnits, cpu_units
from memexport.runtime.registry import runner_for
from tests.conftest import needs_openvino
from tests.models import scorer_scores, write_tiny_scorer

CPU = RunnerOptions(device="cpu")
NO_BF16 = "this CPU has no BF16 unit (neither amx_bf16 nor avx512_bf16 in /proc/cpuinfo, or OpenVINO lacks BF16): nothing to test here"


def options(precision: str = "fp32"):
    from memexport.runtime.openvino_runner import OpenVinoOptions

    return OpenVinoOptions(precision=precision)


def bf16_here() -> bool:
    import openvino as ov

    return cpu_units().bf16 and "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def preprocessed(paths) -> np.ndarray:
    from memexport.runtime.preprocess import preprocess
    from memexport.core.spec import RESMEM

    return np.stack([preprocess(p, RESMEM.preprocess) for p in paths])


def scores(path, batch, backend, precision=None, threads=0):
    backend_options = options(precision) if precision else None
    with runner_for(path, RunnerOptions(device="cpu", threads=threads), backend, backend_options) as runner:
        return runner.infer(batch), runner.describe()


@needs_openvino
@pytest.mark.slow
def test_fp32_matches_onnxruntime_on_resmem(resmem_onnx, sample_images):
    batch = preprocessed(sample_images)
    ort, _ = scores(resmem_onnx, batch, "onnxruntime")
    ov, facts = scores(resmem_onnx, batch, "openvino")
    assert facts["precision"] == "fp32" and facts["inference_precision_hint"] == "f32"
    assert np.abs(ov - ort).max() <= 1e-5


@needs_openvino
def test_fp32_is_forced_where_openvino_would_pick_bf16(tmp_path):
    """OpenVINO's own default on a BF16 CPU is BF16; the runner's FP32 must not inherit it."""
    import openvino as ov

    model = write_tiny_scorer(tmp_path / "tiny.onnx")
    core = ov.Core()
    default = core.compile_model(core.read_model(str(model)), "CPU").get_property("INFERENCE_PRECISION_HINT")
    with runner_for(model, CPU, "openvino") as runner:
        compiled = runner.compiled.get_property("INFERENCE_PRECISION_HINT")
    assert compiled == ov.Type.f32
    if bf16_here():
        assert default == ov.Type.bf16  # the silent choice this runner overrides


@needs_openvino
@pytest.mark.slow
@pytest.mark.covers("resmem", "parity:bf16")
def test_bf16_fidelity_within_the_spec_on_tests_data(resmem_onnx, sample_images):
    if not bf16_here():
        pytest.skip(NO_BF16)
    from memexport.core.parity import compare
    from memexport.core.spec import RESMEM

    batch = preprocessed(sample_images)
    fp32, _ = scores(resmem_onnx, batch, "onnxruntime")
    bf16, facts = scores(resmem_onnx, batch, "openvino", "bf16")
    assert facts["precision"] == "bf16" and facts["inference_precision_hint"] == "bf16"
    assert facts["fp32_until"] == list(RESMEM.bf16_fp32_until)  # the stem, kept in FP32
    assert np.abs(bf16 - fp32).max() > 1e-5  # really computed in BF16, not FP32
    report = compare(bf16, fp32, RESMEM.tolerance("bf16"))
    assert report.passed, report.lines()


@needs_openvino
def test_bf16_is_refused_in_one_line_without_a_bf16_unit(tmp_path, monkeypatch):
    from memexport.runtime import openvino_runner

    model = write_tiny_scorer(tmp_path / "tiny.onnx")
    monkeypatch.setattr(openvino_runner, "cpu_units", lambda: CpuUnits("AMD EPYC 7B12", ("avx512_vnni", "avx512f")))
    with pytest.raises(UsageError) as caught:
        with runner_for(model, CPU, "openvino", options("bf16")):
            pass
    message = str(caught.value)
    assert "\n" not in message and "tiny.onnx" in message and "no BF16 unit" in message and "--precision fp32" in message
    with runner_for(model, CPU, "openvino", options("fp32")) as runner:  # FP32 still runs there
        assert runner.precision == "fp32"


@needs_openvino
def test_scores_batches_exactly(tiny, sample_images):
    batch = preprocessed(sample_images)
    with runner_for(tiny, CPU, "openvino") as runner:
        whole = runner.infer(batch)
        singles = np.concatenate([runner.infer(batch[i : i + 1]) for i in range(len(batch))])
        with pytest.raises(UsageError, match=r"expected a float32 batch of shape \(N, 3, 227, 227\), got float64"):
            runner.infer(batch.astype(np.float64))
    assert whole.shape == (len(batch),) and whole.dtype == np.float32
    np.testing.assert_allclose(whole, scorer_scores(batch), atol=1e-6)
    np.testing.assert_allclose(singles, whole, atol=1e-6)


@needs_openvino
def test_static_batch_models_match_the_dynamic_graph_and_stay_bounded(tiny, sample_images):
    from memexport.runtime.openvino_runner import STATIC_SHAPES_KEPT, OpenVinoOptions

    batch = preprocessed(sample_images)
    with runner_for(tiny, CPU, "openvino", OpenVinoOptions(static_batch=False)) as dynamic:
        held_dynamic = dynamic.memory_bytes()
        expected = dynamic.infer(batch)
        assert dynamic.memory_bytes() == held_dynamic and not dynamic._static  # the dynamic graph served it
    with runner_for(tiny, CPU, "openvino") as runner:
        assert list(runner._static) == [1] and runner.memory_bytes() == held_dynamic  # compiled on activation: batch 1 only
        for size in (len(batch), 3, 1, len(batch)):
            np.testing.assert_allclose(runner.infer(batch[:size]), expected[:size], atol=1e-6)
        kept = list(runner._static)
        assert kept == [1, len(batch)][-STATIC_SHAPES_KEPT:]  # least recently used sizes dropped first
        assert runner.memory_bytes() == held_dynamic * STATIC_SHAPES_KEPT  # no dynamic graph held beside them
        assert [list(runner._static.values())[i].input(0).get_partial_shape()[0].get_length() for i in range(len(kept))] == kept


@needs_openvino
def test_varying_batch_runs_the_dynamic_graph_for_every_size(tiny, sample_images):
    """A server's batcher forms every size; each would otherwise compile its own static model."""
    batch = preprocessed(sample_images)
    with runner_for(tiny, CPU, "openvino") as static:
        expected = static.infer(batch)
    with runner_for(tiny, RunnerOptions(device="cpu", varying_batch=True), "openvino") as runner:
        compiled = runner.compiled
        assert compiled is not None and compiled.input(0).get_partial_shape()[0].is_dynamic
        for size in (len(batch), 3, 1, 2):
            np.testing.assert_allclose(runner.infer(batch[:size]), expected[:size], atol=1e-6)
        assert not runner._static and runner.compiled is compiled  # nothing compiled per size


@needs_openvino
def test_threads_reach_openvino(tiny, sample_images):
    batch = preprocessed(sample_images[:3])
    one, facts = scores(tiny, batch, "openvino", threads=1)
    default, _ = scores(tiny, batch, "openvino")
    assert facts["inference_num_threads"] == "1"
    np.testing.assert_allclose(one, default, atol=1e-6)


@needs_openvino
def test_shared_runner_is_thread_safe(tiny, sample_images):
    from concurrent.futures import ThreadPoolExecutor

    batch = preprocessed(sample_images)
    with runner_for(tiny, CPU, "openvino") as runner:
        serial = runner.infer(batch)
        jobs = [np.roll(batch, -i, axis=0)[: 2 + i % 5] for i in range(40)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(runner.infer, jobs))
    for i, result in enumerate(results):
        np.testing.assert_allclose(result, np.roll(serial, -i)[: 2 + i % 5], atol=1e-6)


@needs_openvino
def test_reads_openvino_ir_with_its_metadata(tmp_path, sample_images):
    import openvino as ov

    model = write_tiny_scorer(tmp_path / "tiny.onnx")
    xml = tmp_path / "tiny.xml"
    ov.save_model(ov.Core().read_model(str(model)), str(xml))
    batch = preprocessed(sample_images[:2])
    with runner_for(xml, CPU) as runner:  # .xml defaults to OpenVINO
        assert runner.backend == "openvino" and runner.metadata.model == "tiny-scorer"
        np.testing.assert_allclose(runner.infer(batch), scorer_scores(batch), atol=1e-6)
    xml.with_suffix(".bin").unlink()
    with pytest.raises(ArtifactError, match=r"tiny\.xml: OpenVINO IR without its weights tiny\.bin"):
        with runner_for(xml, CPU):
            pass


@needs_openvino
def test_describe_and_memory(tmp_path):
    model = write_tiny_scorer(tmp_path / "tiny.onnx")
    with runner_for(model, CPU, "openvino") as runner:
        facts = runner.describe()
        held = runner.memory_bytes()
    assert facts["backend"] == "openvino" and facts["device"] == "cpu" and facts["openvino"]
    assert held is not None and 12 <= held < 4096  # three float32 weights and a few shape constants
    assert runner.memory_bytes() is None  # released


@needs_openvino
def test_gpu_device_and_unknown_precision_are_one_line_usage_errors(tmp_path):
    from memexport.runtime.openvino_runner import OpenVinoOptions

    model = write_tiny_scorer(tmp_path / "tiny.onnx")
    with pytest.raises(UsageError, match="runs on the CPU; use --device cpu"):
        with runner_for(model, RunnerOptions(device="cuda"), "openvino"):
            pass
    with pytest.raises(UsageError, match="precision 'fp16' is not supported; choose one of fp32, bf16"):
        OpenVinoOptions(precision="fp16")


def test_missing_openvino_is_one_line(tmp_path):
    model = write_tiny_scorer(tmp_path / "tiny.onnx")
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "openvino":
                    raise ImportError(name=name)
        sys.meta_path.insert(0, Block())
        from memexport.core.errors import BackendUnavailableError
        from memexport.runtime.registry import runner_for
        try:
            with runner_for({str(model)!r}, backend="openvino"):
                pass
        except BackendUnavailableError as error:
            print(error)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "the OpenVINO back end needs openvino, which is not installed; install it with pip install 'memexport[openvino]'"


@needs_openvino
def test_int8_artifact_runs_as_its_guard_verified_it_unless_asked_otherwise(tmp_path):
    """An INT8 artifact whose guard passed with BF16 outside INT8 runs that way by default; --precision fp32 still wins."""
    import dataclasses

    import onnx
    import openvino as ov

    from memexport.export.onnx_export import set_metadata
    from memexport.runtime.integrity import seal_onnx
    from tests.models import scorer_metadata

    path = write_tiny_scorer(tmp_path / "tiny.int8-like.onnx", seal=False)
    proto = onnx.load(str(path))
    set_metadata(proto, dataclasses.replace(scorer_metadata(), precision="int8", extra={"inference_precision": "bf16"}))
    onnx.save(proto, str(path))
    seal_onnx(path, [])
    with runner_for(path, CPU, "openvino") as runner:
        default = runner.compiled.get_property("INFERENCE_PRECISION_HINT")
        assert runner.precision == "int8"
    with runner_for(path, CPU, "openvino", options("fp32")) as runner:
        asked = runner.compiled.get_property("INFERENCE_PRECISION_HINT")
    assert asked == ov.Type.f32
    assert default == (ov.Type.bf16 if bf16_here() else ov.Type.f32)


def tiny_cnn_sealed(tmp_path):
    from memexport.runtime.integrity import seal_onnx
    from tests.models import write_tiny_cnn

    path = write_tiny_cnn(tmp_path / "cnn.onnx")
    seal_onnx(path, [])
    return path


@needs_openvino
def test_split_model_parts_compose_to_the_whole_graph(tmp_path):
    import openvino as ov

    from memexport.runtime.openvino_runner import split_model

    core = ov.Core()
    model = core.read_model(str(tiny_cnn_sealed(tmp_path)))
    prefix, rest = split_model(ov, model, ["a_relu"])
    assert [p.get_friendly_name() for p in rest.get_parameters()] == ["image", "a_relu"]
    assert "conv_a" not in {op.get_friendly_name() for op in rest.get_ordered_ops()}
    assert {op.get_friendly_name() for op in prefix.get_ordered_ops()} >= {"conv_a"}
    assert "conv_b" not in {op.get_friendly_name() for op in prefix.get_ordered_ops()}
    x = np.random.default_rng(0).normal(0, 1, (5, 3, 32, 32)).astype(np.float32)
    exact = {"INFERENCE_PRECISION_HINT": "f32"}
    whole = core.compile_model(model, "CPU", exact)(x)[0]
    middle = core.compile_model(prefix, "CPU", exact)(x)[0]
    np.testing.assert_allclose(core.compile_model(rest, "CPU", exact)({"image": x, "a_relu": middle})[0], whole, atol=1e-6)
    assert len(model.get_parameters()) == 1  # the model it was given is left whole
    with pytest.raises(ArtifactError) as caught:
        split_model(ov, model, ["no_such_tensor"])
    assert "\n" not in str(caught.value) and "'no_such_tensor'" in str(caught.value) and "re-export" in str(caught.value)


@needs_openvino
def test_bf16_keeps_the_specs_fp32_part_in_fp32(tmp_path, monkeypatch):
    """A spec's ``bf16_fp32_until`` runs in FP32 under --precision bf16; a tensor the graph lacks is one line."""
    if not bf16_here():
        pytest.skip(NO_BF16)
    import openvino as ov

    from memexport.runtime import openvino_runner
    from memexport.core.spec import ModelSpec

    path = tiny_cnn_sealed(tmp_path)
    monkeypatch.setattr(openvino_runner, "MODELS", {"tiny": ModelSpec("tiny", "tests:none", bf16_fp32_until=("a_relu",))})
    batch = np.random.default_rng(1).normal(0, 1, (6, 3, 32, 32)).astype(np.float32)
    with runner_for(path, CPU, "openvino", options("fp32")) as exact:
        fp32 = exact.infer(batch)
        assert "fp32_until" not in exact.describe()
    with runner_for(path, CPU, "openvino", options("bf16")) as runner:
        whole, part = runner.infer(batch), runner.infer(batch[:2])
        staged = runner._compiled_for(len(batch))
        facts = runner.describe()
    assert staged.prefix.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert staged.rest.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    assert facts["fp32_until"] == ["a_relu"] and facts["precision"] == "bf16"
    np.testing.assert_allclose(part, whole[:2], atol=1e-6)
    np.testing.assert_allclose(whole, fp32, atol=1e-2)
    monkeypatch.setattr(openvino_runner, "MODELS", {"tiny": ModelSpec("tiny", "tests:none", bf16_fp32_until=("gone",))})
    with pytest.raises(ArtifactError) as caught:
        with runner_for(path, CPU, "openvino", options("bf16")):
            pass
    assert "\n" not in str(caught.value) and str(path) in str(caught.value) and "'gone'" in str(caught.value)
