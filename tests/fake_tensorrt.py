"""Recording fakes of the ``tensorrt`` module and of the CUDA runtime, for CPU tests.

They check the calls OUR logic makes (which flags, which profile, which addresses, in
what order, under which lock); they never stand in for "engines work": that is what the
``@pytest.mark.gpu`` tests check on a real GPU with real TensorRT.

The fake CUDA keeps "device" memory in host RAM, so copies are real ``memmove``s and the
fake engine's ``execute_async_v3`` can compute the tiny scorer from whatever the runner
really copied in.
"""

from __future__ import annotations

import ctypes
import threading
import time
import types
from typing import Any, Callable

import numpy as np

from memexport.runtime.cuda import CudaApi, DeviceProperties


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def record(self, *call: Any) -> None:
        self.calls.append(call)

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == name]


class _Enum:
    def __init__(self, **members: int) -> None:
        for name, value in members.items():
            setattr(self, name, _Member(name, value))


class _Member:
    def __init__(self, name: str, value: int) -> None:
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return self.name


def fake_tensorrt(version: str, recorder: Recorder, plan: bytes = b"fake-plan", device_memory: int = 123 * 2**20,
                  engine_factory: Callable[[bytes], Any] | None = None, parse_ok: bool = True, input_name: str = "image") -> types.ModuleType:
    """A ``tensorrt`` stand-in with the attributes of ``version`` (8.6 / 10 / 11)."""
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class Logger:
        WARNING = _Member("WARNING", 2)

        def __init__(self, severity: Any) -> None:
            recorder.record("Logger", severity.name)

    # 8.6: EXPLICIT_BATCH only; 10: both; 11: STRONGLY_TYPED only (as in the real bindings).
    flags = {8: {"EXPLICIT_BATCH": 0}, 10: {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}}.get(major, {"STRONGLY_TYPED": 1})
    trt.NetworkDefinitionCreationFlag = _Enum(**flags)
    trt.BuilderFlag = _Enum(**({"FP16": 0, "INT8": 1, "TF32": 2} if major < 11 else {"TF32": 2}))
    trt.MemoryPoolType = _Enum(WORKSPACE=0)
    trt.TensorIOMode = _Enum(NONE=0, INPUT=1, OUTPUT=2)
    trt.DataType = _Enum(FLOAT=0, HALF=1, INT32=3)
    trt.Logger = Logger

    class Tensor:
        def __init__(self, name: str) -> None:
            self.name = name

    class Network:
        num_inputs = 1

        def get_input(self, index: int) -> Tensor:
            return Tensor(input_name)

    class Profile:
        def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
            recorder.record("set_shape", name, tuple(low), tuple(opt), tuple(high))

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return b"timing:" + bytes(self.data)

    class Config:
        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            recorder.record("set_memory_pool_limit", pool.name, size)

        def set_flag(self, flag: Any) -> None:
            recorder.record("set_flag", flag.name)

        def add_optimization_profile(self, profile: Profile) -> int:
            recorder.record("add_optimization_profile")
            return 0

        def create_timing_cache(self, data: bytes) -> TimingCache:
            recorder.record("create_timing_cache", bytes(data))
            self._cache = TimingCache(data)
            return self._cache

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            recorder.record("set_timing_cache", ignore_mismatch)
            return True

        def get_timing_cache(self) -> TimingCache:
            return self._cache

        if major < 11:
            def set_calibration_profile(self, profile: Profile) -> None:
                recorder.record("set_calibration_profile")

            def __setattr__(self, name: str, value: Any) -> None:
                if name == "int8_calibrator":
                    recorder.record("int8_calibrator", type(value).__mro__[1].__name__, value.read_calibration_cache(), value.get_batch(["image"]))
                object.__setattr__(self, name, value)

    class Parser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.num_errors = 0 if parse_ok else 1

        def parse_from_file(self, path: str) -> bool:
            recorder.record("parse_from_file", path)
            return parse_ok

        def get_error(self, index: int) -> Any:
            return types.SimpleNamespace(desc=lambda: "Unsupported ONNX data type: UINT8 (2)")

    class Builder:
        def __init__(self, logger: Logger) -> None:
            recorder.record("Builder")

        def create_network(self, flags: int) -> Network:
            recorder.record("create_network", flags)
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            recorder.record("build_serialized_network")
            return plan

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Any:
            recorder.record("deserialize_cuda_engine", len(data))
            if engine_factory is not None:
                return engine_factory(data)
            attr = "device_memory_size" if major < 10 else "device_memory_size_v2"
            return types.SimpleNamespace(**{attr: device_memory})

    class _Calibrator:
        def __init__(self) -> None:
            pass

    trt.Builder, trt.Runtime, trt.OnnxParser = Builder, Runtime, Parser
    if major < 11:
        trt.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (_Calibrator,), {})
        trt.IInt8MinMaxCalibrator = type("IInt8MinMaxCalibrator", (_Calibrator,), {})
    return trt


class HostCuda(CudaApi):
    """CUDA in host RAM: allocations are numpy buffers, copies are memmove, free memory is tracked."""

    source = "fake"

    def __init__(self, name: str = "NVIDIA GeForce GTX 1080 Ti", cc: tuple[int, int] = (6, 1), total: int = 11 * 2**30) -> None:
        self.props = DeviceProperties(0, name, cc, total)
        self.total = total
        self.used = 0
        self.buffers: dict[int, tuple[np.ndarray, bool]] = {}
        self.streams: set[int] = set()
        self.log: list[tuple[Any, ...]] = []

    def device_count(self) -> int:
        return 1

    def device_properties(self, index: int) -> DeviceProperties:
        return self.props

    def set_device(self, index: int) -> None:
        self.log.append(("set_device", index))

    def mem_get_info(self) -> tuple[int, int]:
        return self.total - self.used, self.total

    def _alloc(self, nbytes: int, device: bool) -> int:
        array = np.zeros(nbytes, np.uint8)
        pointer = array.ctypes.data
        self.buffers[pointer] = (array, device)
        if device:
            self.used += nbytes
        return pointer

    def malloc(self, nbytes: int) -> int:
        return self._alloc(nbytes, True)

    def malloc_host(self, nbytes: int) -> int:
        return self._alloc(nbytes, False)

    def free(self, pointer: int) -> None:
        array, device = self.buffers.pop(pointer)
        assert device
        self.used -= array.nbytes

    def free_host(self, pointer: int) -> None:
        array, device = self.buffers.pop(pointer)
        assert not device

    def stream_create(self) -> int:
        self.streams.add(0xBEEF)
        return 0xBEEF

    def stream_destroy(self, stream: int) -> None:
        self.streams.discard(stream)

    def stream_synchronize(self, stream: int) -> None:
        self.log.append(("sync", stream))

    def memcpy_async(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        assert stream in self.streams
        self.log.append(("memcpy", kind, nbytes))
        ctypes.memmove(dst, src, nbytes)

    def runtime_version(self) -> str:
        return "12.4"


class TinyEngine:
    """Engine stand-in whose context computes the tiny scorer (tests/models.py) from the bytes
    the runner copied to the input address. ``execute_async_v3`` notes overlapping calls."""

    def __init__(self, trt: Any, max_batch: int, input_shape: tuple[int, ...], scorer: Callable[[np.ndarray], np.ndarray],
                 device_memory: int = 64 * 2**20, delay: float = 0.0) -> None:
        self.trt, self.max_batch, self.input_shape, self.scorer, self.delay = trt, max_batch, input_shape, scorer, delay
        self.num_io_tensors = 2
        self.device_memory_size = self.device_memory_size_v2 = device_memory
        self.shapes: list[tuple[int, ...]] = []
        self.active = 0
        self.max_active = 0
        self.guard = threading.Lock()

    def get_tensor_name(self, index: int) -> str:
        return ["image", "score"][index]

    def get_tensor_mode(self, name: str) -> Any:
        return self.trt.TensorIOMode.INPUT if name == "image" else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> Any:
        return self.trt.DataType.FLOAT

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return [(1, *self.input_shape), (max(1, self.max_batch // 2), *self.input_shape), (self.max_batch, *self.input_shape)]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (-1, *self.input_shape) if name == "image" else (-1,)

    def create_execution_context(self) -> "TinyContext":
        return TinyContext(self)


class TinyContext:
    def __init__(self, engine: TinyEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.shape: tuple[int, ...] | None = None

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        self.addresses[name] = pointer
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if not 1 <= shape[0] <= self.engine.max_batch:
            return False
        self.shape = tuple(shape)
        return True

    def execute_async_v3(self, stream: int) -> bool:
        engine = self.engine
        with engine.guard:
            engine.active += 1
            engine.max_active = max(engine.max_active, engine.active)
        try:
            assert self.shape is not None
            engine.shapes.append(self.shape)
            n = self.shape[0]
            count = int(np.prod(self.shape))
            batch = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.addresses["image"])).reshape(self.shape).copy()
            if engine.delay:
                time.sleep(engine.delay)
            scores = engine.scorer(batch).astype(np.float32)
            ctypes.memmove(self.addresses["score"], scores.ctypes.data, 4 * n)
            return True
        finally:
            with engine.guard:
                engine.active -= 1
