"""``doctor``: what this machine can run, and what that means for FP16 and INT8."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from typing import Any

from memexport.optional import optional


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_report() -> dict[str, Any]:
    """Versions, execution providers, TensorRT, CUDA devices and precision advice."""
    from memexport import __version__
    from memexport.gpu import list_gpus, precision_advice

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
    gpus = list_gpus()
    report["gpus"] = [
        {
            "index": g.index, "name": g.name, "compute_capability": f"{g.compute_capability[0]}.{g.compute_capability[1]}",
            "memory_gib": round(g.total_memory / 1024**3, 2), "advice": precision_advice(g.compute_capability, report["tensorrt"]),
        }
        for g in gpus
    ]
    if not gpus:
        report["advice"] = "no CUDA GPU visible: ONNX Runtime on CPU (FP32 or the INT8 CPU artifact) is the way to run here"
    return report
