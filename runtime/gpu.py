"""GPU discovery without torch, and what the compute capability means for FP16, INT8 and TensorRT.

Devices are read through the CUDA runtime (:mod:`memexport.runtime.cuda`: cuda-python or
``libcudart``), with torch as a fallback. Every rule here is decided from the compute
capability, never from TensorRT's ``platform_has_fast_fp16`` (which TensorRT 11 removed
and which says nothing about INT8).
"""

from __future__ import annotations

from packaging.version import Version

from memexport.core.errors import BackendUnavailableError, CudaError
from memexport.runtime import cuda
from memexport.runtime.cuda import DeviceProperties

# The last TensorRT release that supports Pascal (sm_6x) and Maxwell (sm_5x).
PASCAL_TENSORRT = "8.6"
# TensorRT 10 and later need Volta (sm_70) or newer.
TENSORRT10_MIN_CC = (7, 0)
# TensorRT 8.6 supports Maxwell (sm_50) and newer.
TENSORRT86_MIN_CC = (5, 0)
INSTALL_PASCAL = "pip install 'tensorrt==8.6.1' 'cuda-python>=12' (TensorRT 8.6 is the last release for Pascal/sm_6x GPUs)"
INSTALL_NEWER = "pip install 'tensorrt-cu12>=10' 'cuda-python>=12'"


# One device record for the whole package: the CUDA layer's. ``GpuInfo`` is its name here.
GpuInfo = DeviceProperties


def _gpus_from_cuda() -> list[GpuInfo] | None:
    try:
        api = cuda.load_cuda()
        return [api.device_properties(i) for i in range(api.device_count())]
    except (BackendUnavailableError, CudaError):
        return None


def _gpus_from_torch() -> list[GpuInfo]:
    from memexport.core.optional import optional

    torch = optional("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(DeviceProperties(index, props.name, (props.major, props.minor), props.total_memory))
    return gpus


def list_gpus() -> list[GpuInfo]:
    """CUDA devices through the CUDA runtime (no torch), else through torch; empty without a GPU."""
    gpus = _gpus_from_cuda()
    return gpus if gpus is not None else _gpus_from_torch()


def has_fast_fp16(compute_capability: tuple[int, int]) -> bool:
    """Whether FP16 arithmetic runs at least at the FP32 rate.

    Consumer Pascal (sm_61: GTX 10x0, Titan Xp, P40/P4) runs FP16 at 1/64 of the FP32 rate;
    P100 (sm_60), Jetson TX1/TX2 (sm_53, sm_62) and Volta or newer have fast FP16.
    """
    return compute_capability in ((5, 3), (6, 0), (6, 2)) or compute_capability[0] >= 7


def has_int8(compute_capability: tuple[int, int]) -> bool:
    """Whether the GPU has fast INT8 (DP4A from sm_61, tensor cores from sm_72/75)."""
    return compute_capability >= (6, 1)


def tensorrt_install_hint(compute_capability: tuple[int, int] | None) -> str:
    """The pip command that installs a TensorRT serving this GPU (``None``: no GPU seen)."""
    if compute_capability is None:
        return f"on a Pascal GPU (GTX 10x0): {INSTALL_PASCAL}; on Volta or newer: {INSTALL_NEWER}"
    if compute_capability < TENSORRT10_MIN_CC:
        return INSTALL_PASCAL
    return INSTALL_NEWER


def tensorrt_support_problem(compute_capability: tuple[int, int], tensorrt_version: str | Version) -> str | None:
    """Why this TensorRT cannot build or run engines for this GPU, or ``None`` when it can."""
    version = tensorrt_version if isinstance(tensorrt_version, Version) else Version(str(tensorrt_version))
    sm = f"sm_{compute_capability[0]}{compute_capability[1]}"
    if version.major >= 10 and compute_capability < TENSORRT10_MIN_CC:
        return (
            f"TensorRT {version} does not support {sm} (TensorRT 10 and later need sm_70+); "
            f"install TensorRT {PASCAL_TENSORRT}: {INSTALL_PASCAL}"
        )
    if compute_capability < TENSORRT86_MIN_CC:
        return f"{sm} is too old for any TensorRT memexport supports (8.6 needs sm_50+); run the ONNX artifacts with ONNX Runtime"
    return None


def require_tensorrt_supports(gpu: GpuInfo, tensorrt_version: str | Version) -> None:
    """Stop before building or loading when TensorRT cannot serve ``gpu``.

    Raises:
        BackendUnavailableError: e.g. TensorRT >= 10 on a Pascal GPU (names TensorRT 8.6).
    """
    problem = tensorrt_support_problem(gpu.compute_capability, tensorrt_version)
    if problem:
        raise BackendUnavailableError(f"{gpu.name} (GPU {gpu.index}): {problem}")


def precision_advice(compute_capability: tuple[int, int], tensorrt_version: str | None = None) -> str:
    """What FP16 and INT8 mean on a GPU of this compute capability (and this TensorRT, if given).

    Decided from the compute capability, not from TensorRT's ``platform_has_fast_fp16``.
    """
    major, minor = compute_capability
    sm = f"sm_{major}{minor}"
    if major < 5:
        advice = f"{sm}: too old for TensorRT 8.6; use ONNX Runtime"
    elif major == 6 and not has_fast_fp16(compute_capability):
        advice = (
            f"{sm} (Pascal consumer): no fast FP16 (1/64 of the FP32 rate), so FP16 brings no speed here and an FP16 engine "
            "runs at about FP32 speed; INT8 (DP4A) is the real speed-up: build with --int8. TensorRT 8.6 is the last release for this GPU"
        )
    elif major == 6:
        advice = f"{sm}: fast FP16 but no INT8 DP4A; build with --fp16. TensorRT 8.6 is the last release for this GPU"
    elif major == 5:
        advice = f"{sm} (Maxwell): no INT8; FP32 or FP16 engines with TensorRT 8.6 at most"
    else:
        advice = f"{sm}: fast FP16 and INT8 tensor cores; --fp16 or --int8 both pay off"
    if tensorrt_version and not tensorrt_version.startswith("broken"):
        try:
            problem = tensorrt_support_problem(compute_capability, tensorrt_version)
        except ValueError:
            problem = None
        if problem:
            advice += f". Installed {problem}"
    return advice
