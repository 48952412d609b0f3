"""The TensorRT runner: runs a ``.plan`` built by ``memexport build``, without torch.

Every plan has a JSON sidecar, ``<plan>.json``, written by the builder
(:mod:`memexport.runtime.engine_sidecar`). It records what
the engine is (model, precision, profile, preprocessing: the full artifact metadata) and
what it is tied to (the TensorRT version and the GPU). The runner reads the sidecar first
and refuses a TensorRT version or GPU that differs, with a clear message, before TensorRT
ever sees the plan (TensorRT's own failure is an opaque deserialisation error).

CUDA is reached through :mod:`memexport.runtime.cuda` (cuda-python or ``libcudart``).
The runner holds one execution context, one stream, device buffers sized for the
profile's maximum batch and page-locked host buffers for the copies; batches within the
profile run as they are, larger ones are split by :meth:`Runner.infer`.

Thread-safety rule: ``infer`` may be called from several threads, but calls are
serialised by a lock, because the context, the stream and the staging buffers are
shared. For parallel inference use one runner per thread (each costs another
``device_memory_size`` of VRAM).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memexport.core.errors import ArtifactError, BackendUnavailableError, UsageError
from memexport.core.optional import require
from memexport.runtime import budget
from memexport.runtime.base import Runner, RunnerOptions
from memexport.runtime.engine_sidecar import EngineSidecar, check_engine_compatible, check_plan_matches, read_sidecar
from memexport.runtime.metadata import ArtifactMetadata

NUMPY_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32}


@dataclass(frozen=True)
class TensorRTOptions:
    """What only the TensorRT runner takes (device, budget, integrity: :class:`RunnerOptions`).

    Attributes:
        allow_other_gpu_model: Load an engine built on another GPU model of the same compute
            capability (default ``False``).
    """

    allow_other_gpu_model: bool = False


class TensorRTRunner(Runner):
    """Runs a TensorRT plan with its sidecar (see the module docstring for the thread-safety rule).

    An engine always runs on a GPU: ``options.device`` picks which (``cuda:N``; ``auto``, ``cuda``
    and, as before, ``cpu``, which applies to ONNX artifacts only, mean GPU 0).
    ``options.check_integrity`` checks the plan's sha256 against the sidecar before loading.

    Args:
        path: The ``.plan``/``.engine`` file; ``<path>.json`` must sit beside it.
        options: Shared runner options (default :class:`RunnerOptions`).
        backend_options: :class:`TensorRTOptions` (default ``None``: its defaults).

    Attributes:
        record: The sidecar, once active.
        vram_estimate: The load estimate (:class:`~memexport.runtime.budget.VramEstimate`).
        vram_measured: Bytes taken by loading (``cudaMemGetInfo`` delta, context excluded).
    """

    backend = "tensorrt"
    options_class = TensorRTOptions

    def __init__(self, path: Path | str, options: RunnerOptions = RunnerOptions(), backend_options: TensorRTOptions | None = None) -> None:
        super().__init__(path, options, backend_options)
        self.record: EngineSidecar | None = None
        self.vram_estimate: budget.VramEstimate | None = None
        self.vram_measured: int | None = None
        self._lock = threading.Lock()
        self._cuda: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: int | None = None
        self._device: dict[str, int] = {}
        self._host: dict[str, int] = {}
        self._host_arrays: dict[str, np.ndarray] = {}
        self._max_batch: int | None = None
        self._output_elements = 1

    @property
    def device(self) -> str:
        return f"cuda:{self.options.device_index}"

    def memory_bytes(self) -> int | None:
        """The load estimate without the CUDA context (plan, execution memory, I/O buffers), once active."""
        estimate = self.vram_estimate
        return None if estimate is None else estimate.total - estimate.context

    @property
    def max_batch(self) -> int | None:
        return self._max_batch

    def describe(self) -> dict[str, Any]:
        """What the engine is, from its sidecar (no TensorRT or GPU needed); for ``memexport inspect``."""
        side = read_sidecar(self.path)
        meta = side.metadata
        info: dict[str, Any] = {
            "path": str(self.path),
            "model": meta.model,
            "precision": side.precision,
            "precision_source": side.precision_source,
            "backend": "tensorrt",
            "device": self.device,
            "tensorrt": side.tensorrt,
            "gpu": side.gpu,
            "profile": side.profile,
            "device_memory_size": side.device_memory_size,
            "workspace_bytes": side.workspace_bytes,
            "onnx": side.onnx,
            "calibration": side.calibration,
            "build_options": side.build_options,
            "vram_estimate": side.vram_estimate,
            "preprocess": meta.preprocess.__dict__ | {"resize": list(meta.preprocess.resize)},
            "weights": dict(meta.weights),
            "versions": dict(meta.versions),
            "memexport_version": side.memexport_version,
            "file_bytes": self.path.stat().st_size,
        }
        info.update({k: v for k, v in meta.extra.items() if k not in info})
        return info

    def activate(self) -> None:
        side = read_sidecar(self.path)
        if self.options.check_integrity:
            check_plan_matches(self.path, side)
        built = side.tensorrt
        trt = require("tensorrt", "tensorrt", f"{self.path}: running this engine", f"it needs tensorrt=={built} "
                      f"(`pip install 'tensorrt=={built}' cuda-python`), or run the ONNX artifact with ONNX Runtime")
        from memexport.runtime.cuda import load_cuda

        cuda = load_cuda()
        index = self.options.device_index
        if cuda.device_count() <= index:
            raise BackendUnavailableError(f"{self.path}: no CUDA GPU {index} here; TensorRT engines need the GPU they were built for ({side.gpu['name']})")
        props = cuda.device_properties(index)
        # Refuse before deserialising: TensorRT's own error for a foreign plan is opaque.
        check_engine_compatible(side, trt.__version__, props.name, props.compute_capability, self.path, self.backend_options.allow_other_gpu_model)
        cuda.set_device(index)
        max_batch = side.max_shape[0]
        estimate = budget.estimate_engine_load(
            int(side.plan["bytes"]), int(side.device_memory_size), side.io_bytes(), side.precision, max_batch, self.options.vram_budget_bytes,
        )
        free_before, _ = cuda.mem_get_info()
        budget.require_engine_fits(str(self.path), estimate, free_before)
        self._cuda = cuda
        try:
            self._load(trt, side.metadata)
        except BaseException:
            self.deactivate()
            raise
        free_after, _ = cuda.mem_get_info()
        self.vram_estimate = estimate
        self.vram_measured = budget.vram_delta(free_before, free_after)
        self.record = side
        self.metadata = side.metadata

    def _load(self, trt: Any, meta: ArtifactMetadata) -> None:
        cuda = self._cuda
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._runtime = runtime
        self._engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise ArtifactError(f"{self.path}: TensorRT could not deserialise the engine (see its messages above); rebuild it")
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != [meta.input_name] or meta.output_name not in outputs:
            raise ArtifactError(
                f"{self.path}: engine tensors are inputs {inputs}, outputs {outputs}; the sidecar names {meta.input_name!r} -> "
                f"{meta.output_name!r}: rebuild the engine"
            )
        for name in (meta.input_name, meta.output_name):
            dtype = getattr(engine.get_tensor_dtype(name), "name", str(engine.get_tensor_dtype(name)))
            if dtype != "FLOAT":
                raise ArtifactError(f"{self.path}: tensor {name!r} is {dtype}, memexport engines keep FLOAT inputs and outputs: rebuild from a memexport ONNX")
        profile_max = tuple(engine.get_tensor_profile_shape(meta.input_name, 0)[2])
        self._max_batch = int(profile_max[0])
        per_image = int(np.prod(meta.input_shape))
        out_shape = tuple(engine.get_tensor_shape(meta.output_name))
        self._output_elements = int(np.prod([d for d in out_shape[1:] if d > 0])) if len(out_shape) > 1 else 1
        sizes = {meta.input_name: 4 * per_image * self._max_batch, meta.output_name: 4 * self._output_elements * self._max_batch}
        self._stream = cuda.stream_create()
        for name, nbytes in sizes.items():
            self._device[name] = cuda.malloc(nbytes)
            self._host[name] = cuda.malloc_host(nbytes)
            buffer = (ctypes.c_byte * nbytes).from_address(self._host[name])
            self._host_arrays[name] = np.frombuffer(buffer, dtype=np.float32)
        self._context = engine.create_execution_context()
        if self._context is None:
            raise ArtifactError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")
        for name, pointer in self._device.items():
            # Addresses never change: buffers are sized for the profile's maximum once.
            self._context.set_tensor_address(name, pointer)

    def deactivate(self) -> None:
        with self._lock:
            self._context = None
            self._engine = None
            self._runtime = None
            self._host_arrays.clear()
            cuda, self._cuda = self._cuda, None
            if cuda is not None:
                for pointer in self._device.values():
                    cuda.free(pointer)
                for pointer in self._host.values():
                    cuda.free_host(pointer)
                if self._stream is not None:
                    cuda.stream_destroy(self._stream)
            self._device.clear()
            self._host.clear()
            self._stream = None

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        from memexport.runtime.cuda import MEMCPY_DEVICE_TO_HOST, MEMCPY_HOST_TO_DEVICE

        meta = self.metadata
        assert meta is not None
        n = batch.shape[0]
        in_name, out_name = meta.input_name, meta.output_name
        with self._lock:
            if self._context is None:
                raise UsageError(f"{self.path}: TensorRT runner was closed; use it inside its `with` block")
            in_bytes = batch.size * 4
            out_count = n * self._output_elements
            self._host_arrays[in_name][: batch.size] = batch.reshape(-1)
            self._cuda.memcpy_async(self._device[in_name], self._host[in_name], in_bytes, MEMCPY_HOST_TO_DEVICE, self._stream)
            if not self._context.set_input_shape(in_name, (n, *meta.input_shape)):
                raise UsageError(f"{self.path}: batch {n} is outside the engine's profile {self.record.profile if self.record else ''}")
            if not self._context.execute_async_v3(self._stream):
                raise ArtifactError(f"{self.path}: TensorRT failed to run the engine (see its messages above)")
            self._cuda.memcpy_async(self._host[out_name], self._device[out_name], out_count * 4, MEMCPY_DEVICE_TO_HOST, self._stream)
            self._cuda.stream_synchronize(self._stream)
            return self._host_arrays[out_name][:out_count].reshape(n, self._output_elements)[:, 0].copy()
