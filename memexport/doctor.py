"""``doctor``: what this machine can run, and what that means for FP16, BF16 and INT8."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from typing import Any

from memexport.core.optional import optional
from memexport.runtime.cpu import CpuUnits, cpu_units


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_report() -> dict[str, Any]:
    """Versions, execution providers, TensorRT, CUDA devices and precision advice."""
    from memexport.core.version import __version__
    from memexport.runtime.gpu import list_gpus, precision_advice

    report: dict[str, Any] = {
        "memexport": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "onnxruntime_gpu": _version("onnxruntime-gpu"),
        "tensorrt": None,
    }
    onnxruntime = optional("onnxruntime")
    report["onnxruntime_providers"] = onnxruntime.get_available_providers() if onnxruntime is not None else []
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import tensorrt

            report["tensorrt"] = tensorrt.__version__
        except Exception as exc:  # noqa: BLE001 - a broken install is worth reporting, not raising
            report["tensorrt"] = f"broken ({type(exc).__name__}: {exc})"
    report["openvino"] = _version("openvino")
    report["cpu"] = cpu_report(cpu_units())
    gpus = list_gpus()
    report["gpus"] = [
        {
            "index": g.index, "name": g.name, "compute_capability": f"{g.compute_capability[0]}.{g.compute_capability[1]}",
            "memory_gib": round(g.total_memory / 1024**3, 2), "advice": precision_advice(g.compute_capability, report["tensorrt"]),
        }
        for g in gpus
    ]
    if not gpus:
        report["advice"] = "no CUDA GPU visible: run on the CPU; the cpu lines above say what each back end and precision gains here"
    return report


# Speed against ONNX Runtime FP32 (batch 16), as measured with `memexport bench` on the CPU kinds
# named; the other cells are the targets for that kind of CPU, not measurements.
_MEASURED_AMX = "measured on a 2-core AMX Xeon, README *OpenVINO*"
_MEASURED_EPYC = "measured on an AVX-512 VNNI EPYC"


def cpu_advice(units: CpuUnits) -> list[dict[str, str]]:
    """What each CPU back end and precision is expected to gain on a CPU with ``units``, against ONNX Runtime FP32."""
    if units.amx:
        # Ranges over the two AMX hosts measured (README *OpenVINO*): the ratio moved with the host, not the code.
        bf16 = f"3x or more: AMX-BF16 (2.7-5.9x, Spearman 0.9999 against FP32 on 45 photos with the stem in FP32, {_MEASURED_AMX})"
        ov_int8 = f"5x or more: AMX-INT8 (4.6-9.1x with BF16 outside INT8, Spearman 0.994 on 45 photos, {_MEASURED_AMX})"
        ort_int8 = f"~2.7x: VNNI only, ONNX Runtime's INT8 kernels do not use AMX (2.44-2.89x, {_MEASURED_AMX})"
    else:
        bf16 = "~1.3x expected: AVX512-BF16 without AMX" if units.bf16 else "refused: no BF16 unit (OpenVINO would emulate it, slower than FP32)"
        ov_int8 = "~2.5x expected: VNNI" if units.vnni else "little: no VNNI or AMX for INT8"
        ort_int8 = f"~3x: VNNI (2.99x, {_MEASURED_EPYC})" if units.vnni else "little: no VNNI for INT8"
    return [
        {"backend": "onnxruntime", "precision": "fp32", "expect": "1x: the exact reference and the default"},
        {"backend": "onnxruntime", "precision": "int8", "expect": ort_int8 + "; the *.int8-cpu.onnx artifact"},
        {"backend": "openvino", "precision": "fp32", "expect": f"~0.9x (0.90-0.99x, {_MEASURED_AMX}): exact, but ONNX Runtime is as fast or faster"},
        {"backend": "openvino", "precision": "bf16", "expect": bf16},
        {"backend": "openvino", "precision": "int8", "expect": ov_int8 + "; the *.int8-openvino artifact"},
    ]


def cpu_report(units: CpuUnits) -> dict[str, Any]:
    """The CPU's matrix units (AMX, AVX512-BF16, VNNI), OpenVINO's view of them, and the advice for each back end."""
    report: dict[str, Any] = {"model": units.model, "matrix_units": list(units.flags), "kind": units.kind}
    openvino = optional("openvino")
    if openvino is not None:
        try:
            report["openvino_capabilities"] = list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        except Exception as exc:  # noqa: BLE001 - a broken install is worth reporting, not raising
            report["openvino_capabilities"] = f"broken ({type(exc).__name__}: {exc})"
    report["advice"] = cpu_advice(units)
    return report
