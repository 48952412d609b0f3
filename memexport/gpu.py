"""GPU discovery without torch: compute capability and what it means for FP16/INT8.

Placeholder-free minimal version: the TensorRT issue extends this with cudart probing.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device.

    Attributes:
        index: CUDA device ordinal.
        name: Marketing name.
        compute_capability: ``(major, minor)``.
        total_memory: Bytes of device memory.
    """

    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int


def list_gpus() -> list[GpuInfo]:
    """CUDA devices visible through torch, when installed; empty otherwise."""
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(GpuInfo(index, props.name, (props.major, props.minor), props.total_memory))
    return gpus


def precision_advice(compute_capability: tuple[int, int], tensorrt_version: str | None = None) -> str:
    """What FP16 and INT8 mean on a GPU of this compute capability.

    Decided from the compute capability, not from TensorRT's ``platform_has_fast_fp16``.
    """
    major, minor = compute_capability
    if major == 6 and minor != 0:
        return (
            f"sm_{major}{minor} (Pascal consumer): no fast FP16 (1/64 of the FP32 rate), so an FP16 engine runs at about FP32 speed; "
            "INT8 (DP4A) is the real speed-up: build with --int8. TensorRT 8.6 is the last release for this GPU"
        )
    if major < 6:
        return f"sm_{major}{minor}: too old for TensorRT 8.6; use ONNX Runtime"
    if major == 6:
        return "sm_60 (P100): fast FP16 but no INT8 DP4A; build with --fp16. TensorRT 8.6 is the last release for this GPU"
    return f"sm_{major}{minor}: fast FP16 and INT8 tensor cores; --fp16 or --int8 both pay off"
