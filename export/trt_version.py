"""The TensorRT version layer: what differs between TensorRT 8.6, 10.x and 11.x, decided in one place.

One code base serves TensorRT 8.6 (the last release for Pascal, e.g. the GTX 1080 Ti) and
TensorRT 10.x/11.x. Only the name-based tensor API is used. What differs by version is
decided in :func:`trt_features` from ``tensorrt.__version__`` (parsed with ``packaging``):

* 8.6: explicit batch must be requested with ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``;
  ``ICudaEngine.device_memory_size``.
* 10.x: explicit batch is the only mode (the flag is ignored); ``device_memory_size_v2``.
* 11.x: strong typing only. ``BuilderFlag.FP16``/``INT8`` and INT8 calibrators are gone, so
  precision comes from the ONNX itself: an FP16 ONNX (``memexport convert --fp16``) or a
  Q/DQ ONNX (``memexport calibrate``).

``tensorrt`` is imported lazily, once, by :func:`tensorrt` (through :func:`memexport.core.optional.require`);
the builder's helpers call it instead of receiving the module as a parameter.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

from packaging.version import Version

from memexport.runtime import gpu
from memexport.core.errors import BackendUnavailableError
from memexport.core.optional import require

# Every TensorRT attribute this package uses (module attributes, enum members and methods
# of TensorRT objects), in one place. tests/export/test_tensorrt.py checks each name against
# the Python bindings of TensorRT 8.6.1 and the newest 10.x, and checks that this list is
# complete by scanning export/trt_version.py, export/tensorrt.py and runtime/tensorrt_runner.py.
TRT_API: tuple[str, ...] = (
    # module
    "__version__", "Logger", "Builder", "Runtime", "OnnxParser",
    "NetworkDefinitionCreationFlag", "BuilderFlag", "MemoryPoolType", "TensorIOMode",
    "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator",
    # enum members
    "WARNING", "EXPLICIT_BATCH", "FP16", "INT8", "WORKSPACE", "INPUT", "FLOAT",
    # IBuilder
    "create_network", "create_builder_config", "create_optimization_profile", "build_serialized_network",
    # INetworkDefinition / ITensor
    "num_inputs", "get_input", "name",
    # IParser / IParserError
    "parse_from_file", "num_errors", "get_error", "desc",
    # IBuilderConfig / IOptimizationProfile / ITimingCache
    "set_memory_pool_limit", "set_flag", "add_optimization_profile", "int8_calibrator", "set_calibration_profile",
    "create_timing_cache", "set_timing_cache", "get_timing_cache", "serialize", "set_shape",
    # IInt8Calibrator overrides
    "get_batch_size", "get_batch", "read_calibration_cache", "write_calibration_cache",
    # IRuntime / ICudaEngine / IExecutionContext
    "deserialize_cuda_engine", "device_memory_size", "device_memory_size_v2", "num_io_tensors", "get_tensor_name",
    "get_tensor_mode", "get_tensor_dtype", "get_tensor_shape", "get_tensor_profile_shape", "create_execution_context",
    "set_input_shape", "set_tensor_address", "execute_async_v3",
)
# Names used only where TRT_FEATURES says the running version has them.
TRT_API_VERSIONED: dict[str, str] = {
    "EXPLICIT_BATCH": "< 10 (ignored in 10, removed in 11)",
    "device_memory_size": "< 10 (removed in 11)",
    "device_memory_size_v2": ">= 10",
    "FP16": "< 11 as a BuilderFlag (DataType.HALF elsewhere)",
    "IInt8EntropyCalibrator2": "< 11",
    "IInt8MinMaxCalibrator": "< 11",
    "int8_calibrator": "< 11",
    "set_calibration_profile": "< 11",
    "get_batch_size": "< 11", "get_batch": "< 11", "read_calibration_cache": "< 11", "write_calibration_cache": "< 11",
}

# TensorRT 8.6's ONNX parser reads opset 17 at most.
TRT86_MAX_OPSET = 17


@dataclass(frozen=True)
class TrtFeatures:
    """What the installed TensorRT can do, from its version alone.

    Attributes:
        version: The parsed TensorRT version.
        explicit_batch_flag: The network must be created with ``EXPLICIT_BATCH`` (8.x).
        precision_flags: ``BuilderFlag.FP16``/``INT8`` exist (before 11).
        implicit_int8: INT8 calibrators and calibration caches work (before 11).
        device_memory_attr: ``device_memory_size`` (8.x) or ``device_memory_size_v2`` (10+).
        max_opset: Highest ONNX opset the parser reads (``None``: not limited here).
    """

    version: Version
    explicit_batch_flag: bool
    precision_flags: bool
    implicit_int8: bool
    device_memory_attr: str
    max_opset: int | None


def trt_features(version: str | Version) -> TrtFeatures:
    """Version gates for TensorRT 8.6, 10.x and 11.x (see the module docstring)."""
    v = version if isinstance(version, Version) else Version(str(version))
    if v < Version("8.6"):
        raise BackendUnavailableError(f"TensorRT {v} is too old; memexport needs TensorRT 8.6 or newer ({gpu.tensorrt_install_hint(None)})")
    return TrtFeatures(
        version=v,
        explicit_batch_flag=v.major < 10,
        precision_flags=v.major < 11,
        implicit_int8=v.major < 11,
        device_memory_attr="device_memory_size" if v.major < 10 else "device_memory_size_v2",
        max_opset=TRT86_MAX_OPSET if v.major < 10 else None,
    )


def tensorrt(device: int = 0) -> types.ModuleType:
    """The ``tensorrt`` module, imported on first use; or one line saying how to install it for this GPU.

    Args:
        device: The CUDA ordinal the install hint is for (default 0).

    Raises:
        BackendUnavailableError: TensorRT missing or broken (TensorRT 8.6 named for Pascal).
    """

    def hint() -> str:
        found = next((g for g in gpu.list_gpus() if g.index == device), None)
        seen = f"{found.name} ({found.sm})" if found else "no CUDA GPU seen"
        return f"{seen}: {gpu.tensorrt_install_hint(found.compute_capability if found else None)}"

    return require("tensorrt", "tensorrt", "building an engine", hint)


def enum_member(enum: str, member: str) -> Any:
    """``tensorrt.<enum>.<member>``, looked up by name (the names are gated by version)."""
    return getattr(getattr(tensorrt(), enum), member)


def network_flags(features: TrtFeatures) -> int:
    """``create_network`` flags: EXPLICIT_BATCH on 8.x; 0 on 10+ (explicit batch, and on 11 strong typing, are the only modes)."""
    if features.explicit_batch_flag:
        return 1 << int(enum_member("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH"))
    return 0


def device_memory_size(engine: Any, features: TrtFeatures) -> int:
    """An engine's execution memory: ``device_memory_size`` (8.x) or ``device_memory_size_v2`` (10+)."""
    return int(getattr(engine, features.device_memory_attr))
