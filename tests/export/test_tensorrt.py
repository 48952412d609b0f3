"""engine_from_onnx: version gates, option -> builder-config mapping, sidecar, budget, CLI errors, API surface.

CPU tests drive the build logic with a recording fake of ``tensorrt`` (tests/fake_tensorrt.py):
it checks the calls our code makes, never that engines work. Engines are checked for real
by the ``gpu`` tests at the end (``make test-gpu``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from memexport.core.errors import ArtifactError, BackendUnavailableError, BudgetError, CalibrationError, UsageError
from memexport.runtime import gpu as gpu_facts
from memexport import pipeline
from memexport.export import tensorrt as trt_build
from memexport.export import trt_version
from memexport.export.tensorrt import BuildOptions, OnnxInfo, calibration_algorithm, precision_plan
from memexport.export.trt_version import TRT_API, trt_features
from memexport.runtime.gpu import GpuInfo
from memexport.runtime.budget import GIB
from memexport.runtime.engine_sidecar import read_sidecar, sidecar_path
from tests.fake_tensorrt import Recorder, fake_tensorrt
from tests.models import TINY_SHAPE, tiny_cnn_proto, tiny_metadata, write_tiny_cnn

ROOT = Path(__file__).resolve().parents[2]
PASCAL = GpuInfo(0, "NVIDIA GeForce GTX 1080 Ti", (6, 1), 11 * GIB)
TURING = GpuInfo(0, "NVIDIA GeForce RTX 2080 Ti", (7, 5), 11 * GIB)
CACHE = b"TRT-8601-EntropyCalibration2\nimage: 3c010a14\nmean: 3c23d70a\n"


def info(precision: str = "fp32", qdq: bool = False) -> OnnxInfo:
    meta = tiny_metadata()
    from dataclasses import replace

    return OnnxInfo(Path("m.onnx"), "0" * 64, replace(meta, precision=precision), 17, qdq, precision == "fp16", 1000, 10)


# ---------------------------------------------------------------------------------- version gates


@pytest.mark.parametrize(
    "version, explicit, flags, attr, max_opset",
    [
        ("8.6.1", True, True, "device_memory_size", 17),
        ("8.6.1.post1", True, True, "device_memory_size", 17),
        ("10.0.1", False, True, "device_memory_size_v2", None),
        ("10.16.1.11", False, True, "device_memory_size_v2", None),
        ("11.4.0.106", False, False, "device_memory_size_v2", None),
    ],
)
def test_version_gates(version, explicit, flags, attr, max_opset):
    features = trt_features(version)
    assert (features.explicit_batch_flag, features.precision_flags, features.implicit_int8) == (explicit, flags, flags)
    assert (features.device_memory_attr, features.max_opset) == (attr, max_opset)


def test_older_tensorrt_is_refused():
    with pytest.raises(BackendUnavailableError, match="8.6 or newer"):
        trt_features("8.5.3.1")


# --------------------------------------------------------------------------- precision mapping


@pytest.mark.parametrize(
    "version, precision, onnx_precision, qdq, cache, source, flags",
    [
        ("8.6.1", "fp32", "fp32", False, False, "fp32", ()),
        ("8.6.1", "fp16", "fp32", False, False, "builder-flag", ("FP16",)),
        ("10.16.1.11", "fp16", "fp16", False, False, "fp16-onnx", ("FP16",)),
        ("11.4.0.106", "fp16", "fp16", False, False, "fp16-onnx", ()),
        ("8.6.1", "int8", "fp32", False, True, "calibration-cache", ("INT8",)),
        ("10.16.1.11", "int8", "int8", True, False, "qdq-onnx", ("INT8",)),
        ("11.4.0.106", "int8", "int8", True, False, "qdq-onnx", ()),
    ],
)
def test_precision_plan(tmp_path, version, precision, onnx_precision, qdq, cache, source, flags):
    cache_file = tmp_path / "m.calib.cache"
    cache_file.write_bytes(CACHE)
    options = BuildOptions(precision=precision, calibration_cache=cache_file if cache else None)
    plan = precision_plan(trt_features(version), options, info(onnx_precision, qdq))
    assert (plan.precision, plan.source, plan.flags) == (precision, source, flags)
    assert plan.calibration_cache == (cache_file if cache else None)


def test_tensorrt11_takes_precision_from_the_onnx_only(tmp_path):
    with pytest.raises(UsageError, match=r"memexport convert --fp16 m.onnx"):
        precision_plan(trt_features("11.4.0.106"), BuildOptions("fp16"), info("fp32"))
    cache_file = tmp_path / "c.cache"
    cache_file.write_bytes(CACHE)
    with pytest.raises(UsageError, match="Q/DQ ONNX"):
        precision_plan(trt_features("11.4.0.106"), BuildOptions("int8", calibration_cache=cache_file), info("fp32"))


def test_precision_plan_refuses_contradictions(tmp_path):
    features = trt_features("8.6.1")
    with pytest.raises(UsageError, match="--calib-cache FILE, --calib DIR, or a Q/DQ ONNX"):
        precision_plan(features, BuildOptions("int8"), info("fp32"))
    with pytest.raises(UsageError, match="build it with --int8"):
        precision_plan(features, BuildOptions("fp32"), info("int8", qdq=True))
    cache_file = tmp_path / "c.cache"
    cache_file.write_bytes(CACHE)
    with pytest.raises(UsageError, match="drop --calib-cache"):
        precision_plan(features, BuildOptions("int8", calibration_cache=cache_file), info("int8", qdq=True))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precision": "int4"}, "unknown precision"),
        ({"min_batch": 8, "opt_batch": 4}, "--min-batch <= --opt-batch"),
        ({"max_batch": 0, "min_batch": 0}, "1 <= --min-batch"),
        ({"precision": "fp16", "calibration_images": Path(".")}, "apply to --int8 only"),
        ({"precision": "int8", "calibration_cache": Path("/nowhere.cache")}, "calibration cache not found"),
    ],
)
def test_build_options_validation(kwargs, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        BuildOptions(**kwargs).validate()


def test_calibration_cache_header_picks_the_calibrator():
    assert calibration_algorithm(CACHE, Path("c")) == "IInt8EntropyCalibrator2"
    assert calibration_algorithm(b"TRT-100001-MinMaxCalibration\nx: 3c000000\n", Path("c")) == "IInt8MinMaxCalibrator"
    with pytest.raises(CalibrationError, match="not a TensorRT calibration header"):
        calibration_algorithm(b"TRT-8601-LegacyCalibration\n", Path("c"))
    with pytest.raises(CalibrationError, match="c.cache"):
        calibration_algorithm(b"\x00\x01garbage", Path("c.cache"))


# ------------------------------------------------------------------ builds through a recording fake


@pytest.fixture()
def tiny_onnx(tmp_path) -> Path:
    return write_tiny_cnn(tmp_path / "tiny.onnx")


def install(monkeypatch, version: str, gpu: GpuInfo = PASCAL, **kwargs):
    recorder = Recorder()
    trt = fake_tensorrt(version, recorder, **kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(gpu_facts, "list_gpus", lambda: [gpu])
    return recorder


def test_int8_build_on_tensorrt86_maps_options_and_writes_sidecar(monkeypatch, tmp_path, tiny_onnx):
    recorder = install(monkeypatch, "8.6.1")
    cache_file = tmp_path / "tiny.calib.cache"
    cache_file.write_bytes(CACHE)
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"previous")
    options = BuildOptions("int8", min_batch=2, opt_batch=4, max_batch=16, calibration_cache=cache_file, timing_cache=timing, cache_dir=tmp_path)
    result = trt_build.engine_from_onnx(tiny_onnx, tmp_path / "tiny.plan", options)

    assert recorder.named("create_network") == [("create_network", 1)]  # 1 << EXPLICIT_BATCH
    assert recorder.named("set_flag") == [("set_flag", "INT8")]
    ((_, pool, workspace),) = recorder.named("set_memory_pool_limit")
    assert pool == "WORKSPACE" and workspace == result.record["workspace_bytes"]
    assert recorder.named("set_shape") == [("set_shape", "image", (2, *TINY_SHAPE), (4, *TINY_SHAPE), (16, *TINY_SHAPE))]
    # The calibrator replays the cache and has no images of its own.
    assert recorder.named("int8_calibrator") == [("int8_calibrator", "IInt8EntropyCalibrator2", CACHE, None)]
    assert recorder.named("set_calibration_profile")
    assert recorder.named("create_timing_cache") == [("create_timing_cache", b"previous")]
    assert timing.read_bytes() == b"timing:previous"  # reused, then written back

    assert (tmp_path / "tiny.plan").read_bytes() == b"fake-plan"
    record = read_sidecar(tmp_path / "tiny.plan").as_dict()
    assert record == json.loads(sidecar_path(tmp_path / "tiny.plan").read_text())
    assert record["tensorrt"] == "8.6.1" and record["gpu"]["compute_capability"] == "6.1"
    assert record["gpu"]["name"] == "NVIDIA GeForce GTX 1080 Ti"
    assert record["precision"] == "int8" and record["precision_source"] == "calibration-cache"
    assert record["profile"]["max"] == [16, *TINY_SHAPE]
    assert record["calibration"]["sha256"] == trt_build.sha256_bytes(CACHE)
    assert record["onnx"]["sha256"] == trt_build.sha256_path(tiny_onnx)
    assert record["device_memory_size"] == 123 * 2**20
    assert record["build_options"]["max_batch"] == 16
    assert record["memexport_version"] == __import__("memexport").__version__
    assert record["metadata"]["precision"] == "int8" and record["metadata"]["input_name"] == "image"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # atomic writes leave no temp files


def test_fp16_build_on_tensorrt10_uses_v2_memory_and_no_explicit_batch_flag(monkeypatch, tmp_path, tiny_onnx):
    recorder = install(monkeypatch, "10.16.1.11", TURING, device_memory=77)
    result = trt_build.engine_from_onnx(tiny_onnx, tmp_path / "t.engine", BuildOptions("fp16", cache_dir=tmp_path))
    assert recorder.named("create_network") == [("create_network", 0)]
    assert recorder.named("set_flag") == [("set_flag", "FP16")]
    assert not recorder.named("int8_calibrator")
    assert result.record["device_memory_size"] == 77
    assert result.notes == ()  # Turing has fast FP16
    # Default timing cache: one per TensorRT version and architecture, in the cache dir.
    assert (tmp_path / "tensorrt" / "timing-10.16.1.11-sm_75.cache").is_file()


def test_fp16_on_pascal_notes_that_fp16_brings_no_speed(monkeypatch, tmp_path, tiny_onnx):
    install(monkeypatch, "8.6.1")
    result = trt_build.engine_from_onnx(tiny_onnx, tmp_path / "t.plan", BuildOptions("fp16", cache_dir=tmp_path))
    assert any("no fast FP16" in note and "--int8" in note for note in result.notes)


def test_fp16_onnx_on_tensorrt11_sets_no_flags(monkeypatch, tmp_path):
    import onnx

    from memexport.export.onnx_export import set_metadata

    proto = tiny_cnn_proto()
    set_metadata(proto, tiny_metadata(precision="fp16"))  # what `memexport convert --fp16` records
    onnx_path = tmp_path / "tiny.fp16.onnx"
    onnx.save(proto, str(onnx_path))
    recorder = install(monkeypatch, "11.4.0.106", TURING)
    result = trt_build.engine_from_onnx(onnx_path, tmp_path / "t.plan", BuildOptions("fp16", cache_dir=tmp_path))
    assert recorder.named("create_network") == [("create_network", 0)] and not recorder.named("set_flag")
    assert result.record["precision_source"] == "fp16-onnx"


def test_tensorrt10_on_pascal_stops_naming_tensorrt86(monkeypatch, tmp_path, tiny_onnx):
    recorder = install(monkeypatch, "10.16.1.11", PASCAL)
    with pytest.raises(BackendUnavailableError, match=r"TensorRT 10.16.1.11 does not support sm_61.*install TensorRT 8.6"):
        trt_build.engine_from_onnx(tiny_onnx, tmp_path / "t.plan", BuildOptions("fp16", cache_dir=tmp_path))
    assert not recorder.named("Builder") and not (tmp_path / "t.plan").exists()


def test_over_budget_names_the_largest_batch_before_building(monkeypatch, tmp_path, tiny_onnx):
    from memexport.runtime.budget import MIN_WORKSPACE_BYTES, estimate_vram

    recorder = install(monkeypatch, "8.6.1")
    budget = 700 * 2**20
    options = BuildOptions("fp32", max_batch=4096, vram_budget_bytes=budget, cache_dir=tmp_path)
    with pytest.raises(BudgetError, match=r"largest batch that fits is (\d+) \(--max-batch \1\)") as caught:
        trt_build.engine_from_onnx(tiny_onnx, tmp_path / "t.plan", options)
    best = int(re.search(r"--max-batch (\d+)", str(caught.value)).group(1))
    # tiny_cnn: 889 weights; peak live activations per image = two 8x32x32 maps (hand count, see test_budget).
    fits = [estimate_vram(889, "fp32", b, 2 * 8 * 32 * 32, budget, MIN_WORKSPACE_BYTES).fits for b in (best, best + 1)]
    assert fits == [True, False] and best > 1
    assert not recorder.named("Builder")


def test_parser_errors_become_one_artifact_error(monkeypatch, tmp_path, tiny_onnx):
    install(monkeypatch, "8.6.1", parse_ok=False)
    with pytest.raises(ArtifactError, match="ONNX parser failed: Unsupported ONNX data type"):
        trt_build.engine_from_onnx(tiny_onnx, tmp_path / "t.plan", BuildOptions("fp32", cache_dir=tmp_path))
    assert not (tmp_path / "t.plan").exists()


def test_opset_above_17_is_refused_on_tensorrt86(monkeypatch, tmp_path, tiny_onnx):
    import onnx

    proto = onnx.load(str(tiny_onnx))
    proto.opset_import[0].version = 18
    onnx.save(proto, str(tiny_onnx))
    install(monkeypatch, "8.6.1")
    with pytest.raises(UsageError, match="opset 18.*re-export with --opset 17"):
        trt_build.engine_from_onnx(tiny_onnx, tmp_path / "t.plan", BuildOptions("fp32", cache_dir=tmp_path))


def test_onnx_cache_key_follows_weights_and_opset():
    base = pipeline.onnx_cache_key("resmem", {"sha256": "a"}, 17)
    assert base == pipeline.onnx_cache_key("resmem", {"sha256": "a"}, 17)
    assert len({base, pipeline.onnx_cache_key("resmem", {"sha256": "b"}, 17), pipeline.onnx_cache_key("resmem", {"sha256": "a"}, 16)}) == 3


def test_build_checks_tensorrt_before_exporting(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    monkeypatch.setattr(gpu_facts, "list_gpus", lambda: [PASCAL])
    monkeypatch.setattr(pipeline, "onnx_for_model", lambda *a, **k: pytest.fail("exported before checking TensorRT"))
    with pytest.raises(BackendUnavailableError, match=r"GTX 1080 Ti \(sm_61\): pip install 'tensorrt==8.6.1'") as caught:
        pipeline.build("resmem", tmp_path / "r.plan", BuildOptions("fp16"))
    assert caught.value.exit_code == 2


def test_calib_dir_calibrates_on_the_way_then_builds_from_the_cache(monkeypatch, tmp_path, tiny_onnx):
    import types

    import memexport.calibration as calibration

    calls = []

    def fake_calibrate(model, images, out_dir, options):
        calls.append((Path(model), Path(images), options.outputs))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        cache = Path(out_dir) / f"{Path(model).stem}.calib.cache"
        cache.write_bytes(CACHE)
        return types.SimpleNamespace(cache=cache)

    monkeypatch.setattr(calibration, "calibrate", fake_calibrate)
    recorder = install(monkeypatch, "8.6.1")
    images = tmp_path / "photos"
    images.mkdir()
    result = pipeline.build(tiny_onnx, tmp_path / "t.plan", BuildOptions("int8", calibration_images=images, cache_dir=tmp_path))
    assert calls == [(tiny_onnx, images, ("cache",))]
    assert recorder.named("int8_calibrator")[0][2] == CACHE
    assert result.record["precision_source"] == "calibration-cache" and result.record["calibration"]["sha256"] == trt_build.sha256_bytes(CACHE)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_cli_build_without_tensorrt_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "memexport", "build", "resmem", "--fp16", "-o", str(tmp_path / "r.plan")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: building an engine needs tensorrt, which is not installed") and "tensorrt==8.6.1" in lines[0] and "Pascal" in lines[0]
    assert not (tmp_path / "r.plan").exists()


def test_cli_build_needs_exactly_one_precision():
    from typer.testing import CliRunner

    from memexport.cli import app

    result = CliRunner().invoke(app, ["build", "resmem", "--fp16", "--int8"])
    assert result.exit_code == 2
    assert "choose exactly one of --fp32, --fp16 or --int8" in result.output


# --------------------------------------------------------------------------------- API surface

TRT_API_DIR = ROOT / ".trt-api"
SOURCES = [ROOT / "export" / "trt_version.py", ROOT / "export" / "tensorrt.py", ROOT / "runtime" / "tensorrt_runner.py"]
# Variables that hold TensorRT objects in our sources (the names we use for them).
TRT_OBJECTS = r"(?:trt|builder|network|config|parser|profile|runtime|engine|context|cache|self\._engine|self\._context)"


def used_trt_names() -> set[str]:
    names: set[str] = set()
    for source in SOURCES:
        text = source.read_text()
        names |= set(re.findall(r"\btrt\.(?:\w+\.)*?(\w+)", text))
        names |= set(re.findall(rf"\b{TRT_OBJECTS}\.(\w+)\(", text))
        names |= set(re.findall(r"\btensorrt\(\)\.(\w+)", text))
        names |= {n for pair in re.findall(r'enum_member\("(\w+)", "(\w+)"\)', text) for n in pair}
    # Our own attributes and Python built-ins that the patterns also catch.
    ours = {"read_bytes", "is_file", "parent", "get", "copy", "reshape", "append", "record", "path", "notes", "__init__"}
    return names - ours


def test_trt_api_list_is_complete():
    used = used_trt_names()
    builder_flags = {"FP16", "INT8"}  # set through enum_member("BuilderFlag", flag) from PrecisionPlan.flags
    missing = sorted((used | builder_flags) - set(TRT_API))
    assert not missing, f"TensorRT names used in the sources but missing from TRT_API: {missing}"
    # Nothing listed that the sources no longer mention.
    text = "\n".join(source.read_text() for source in SOURCES)
    stale = [n for n in TRT_API if n not in ("TRT_API",) and len(re.findall(rf"\b{re.escape(n)}\b", text)) < 2]
    assert not stale, f"TRT_API lists names the sources do not use: {stale}"
    # And the scan does see our code: these are certainly used.
    assert {"execute_async_v3", "set_tensor_address", "set_memory_pool_limit", "build_serialized_network"} <= used


def binding_names(version_glob: str) -> tuple[bytes, str]:
    wheels = sorted(TRT_API_DIR.glob(version_glob))
    if not wheels:
        pytest.skip(f"no {version_glob} in {TRT_API_DIR}; run `make trt-api` to fetch the TensorRT binding wheels")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        so = next(n for n in wheel.namelist() if n.endswith("tensorrt.so"))
        init = next(n for n in wheel.namelist() if n.endswith("tensorrt_bindings/__init__.py"))
        return wheel.read(so), wheel.read(init).decode()


def present(name: str, binary: bytes, init: str) -> bool:
    # pybind11 registers every attribute with a NUL-terminated C string; __version__ lives in __init__.py.
    return (name.encode() + b"\0") in binary or re.search(rf"\b{re.escape(name)}\b\s*=", init) is not None


@pytest.mark.parametrize(
    "wheel, absent",
    [
        ("tensorrt_bindings-8.6.1-*.whl", {"device_memory_size_v2"}),
        ("tensorrt_cu12_bindings-10.*.whl", set()),
    ],
)
def test_trt_api_exists_in_bindings(wheel, absent):
    binary, init = binding_names(wheel)
    missing = {n for n in TRT_API if not present(n, binary, init)}
    # Names gated by version (TRT_API_VERSIONED) may be absent exactly where the gate says so.
    assert missing == absent, f"{wheel}: missing {sorted(missing)}"
    # The scan can tell names apart: a made-up attribute is not found.
    assert not present("execute_async_v9", binary, init)


def test_tensorrt11_lacks_exactly_the_names_we_gate():
    binary, init = binding_names("tensorrt_cu12_bindings-11.*.whl")
    missing = {n for n in TRT_API if not present(n, binary, init)}
    assert missing <= set(trt_version.TRT_API_VERSIONED), f"ungated names missing in TensorRT 11: {sorted(missing - set(trt_version.TRT_API_VERSIONED))}"
    assert {"IInt8EntropyCalibrator2", "int8_calibrator", "EXPLICIT_BATCH", "device_memory_size"} <= missing


# ----------------------------------------------------------------------------------------- GPU


def _gpu_ready() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    from memexport.runtime.gpu import list_gpus

    if not list_gpus():
        return "no CUDA GPU visible"
    return None


@pytest.fixture(scope="module")
def gpu_or_skip():
    reason = _gpu_ready()
    if reason:
        pytest.skip(reason)


def _parity(engine: Path, sample_images, resmem_weights, precision: str):
    from memexport.core.parity import compare
    from memexport.core.spec import RESMEM
    from memexport.verify import VerifyOptions, verify_artifact

    result = verify_artifact(engine, sample_images, VerifyOptions(weights=resmem_weights, device="cuda"))
    report = compare(result.candidate, result.reference, RESMEM.tolerance(precision))
    return result, report


NO_TENSORRT = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed (GPU test; run `make test-gpu` on a CUDA machine)")


@pytest.mark.gpu
@NO_TENSORRT
@pytest.mark.covers("resmem", "parity:fp16")
def test_resmem_fp16_engine_parity_and_budget(gpu_or_skip, resmem_onnx, sample_images, resmem_weights, tmp_path):
    from memexport.runtime.tensorrt_runner import TensorRTRunner
    from memexport.core.ranks import spearman

    result = trt_build.engine_from_onnx(resmem_onnx, tmp_path / "resmem.fp16.plan", BuildOptions("fp16", cache_dir=tmp_path))
    verify, report = _parity(result.engine, sample_images, resmem_weights, "fp16")
    # Stated tolerance: the spec's fp16 tolerance (max abs err <= 1e-3) and Spearman >= 0.99.
    assert report.passed, report.lines()
    assert spearman(verify.candidate, verify.reference) >= 0.99
    with TensorRTRunner(result.engine) as runner:
        assert runner.vram_measured is not None and runner.vram_estimate is not None
        # The estimate (context excluded) bounds what loading took, within 2x either way.
        expected = runner.vram_estimate.total - runner.vram_estimate.context
        assert expected / 2 <= runner.vram_measured <= expected * 2, (runner.vram_measured, expected)


@pytest.mark.gpu
@NO_TENSORRT
@pytest.mark.covers("resmem", "parity:int8")
def test_resmem_int8_engine_parity(gpu_or_skip, resmem_onnx, sample_images, resmem_weights, tmp_path, data_dir):
    from memexport.core.ranks import spearman

    try:
        cache = pipeline.calibration_cache_for(resmem_onnx, data_dir, tmp_path / "calib")
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    features = trt_features(sys.modules["tensorrt"].__version__ if "tensorrt" in sys.modules else __import__("tensorrt").__version__)
    if not features.implicit_int8:
        pytest.skip("TensorRT 11 builds INT8 from the Q/DQ ONNX only; covered by the calibration tests")
    result = trt_build.engine_from_onnx(resmem_onnx, tmp_path / "resmem.int8.plan", BuildOptions("int8", calibration_cache=cache, cache_dir=tmp_path))
    verify, report = _parity(result.engine, sample_images, resmem_weights, "int8")
    assert spearman(verify.candidate, verify.reference) >= 0.99, report.lines()
    assert report.passed, report.lines()
