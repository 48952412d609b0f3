"""The TensorRT runner: runs a ``.plan`` built by ``memexport build``, without torch.

Every plan has a JSON sidecar, ``<plan>.json``, written by the builder. It records what
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
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from packaging.version import InvalidVersion, Version

from memexport.errors import ArtifactError, BackendUnavailableError, EngineMismatchError, UsageError
from memexport.runtime import budget
from memexport.runtime.metadata import ArtifactMetadata
from memexport.optional import require
from memexport.runtime.base import Runner, RunnerOptions
from memexport.runtime.integrity import sha256_file

SIDECAR_FORMAT = "memexport-tensorrt-engine"
SIDECAR_SCHEMA = 1
SIDECAR_KEYS = ("format", "schema", "plan", "tensorrt", "gpu", "precision", "profile", "onnx", "calibration",
                "build_options", "device_memory_size", "memexport_version", "metadata")
NUMPY_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32}


def sidecar_path(plan: Path | str) -> Path:
    """``resmem.plan`` -> ``resmem.plan.json``."""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


sha256_path = sha256_file  # the sidecar records plan and ONNX digests with the one file hasher


def read_sidecar(plan: Path | str) -> dict[str, Any]:
    """Read and check a plan's sidecar (no TensorRT or GPU needed).

    Raises:
        ArtifactError: Missing plan or sidecar, unreadable JSON, unknown format or missing fields.
    """
    plan = Path(plan)
    side = sidecar_path(plan)
    if not plan.is_file():
        raise ArtifactError(f"{plan}: engine file not found; build one with `memexport build resmem --fp16 -o {plan.name}`")
    if not side.is_file():
        raise ArtifactError(f"{plan}: its sidecar {side.name} is missing; engines are only loaded with the sidecar `memexport build` writes: rebuild it")
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{side}: sidecar is not valid JSON ({type(exc).__name__}); rebuild the engine") from None
    if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT:
        raise ArtifactError(f"{side}: not a memexport engine sidecar (expected format {SIDECAR_FORMAT!r}); rebuild the engine")
    if record.get("schema") != SIDECAR_SCHEMA:
        raise ArtifactError(f"{side}: sidecar schema {record.get('schema')!r}, this memexport reads {SIDECAR_SCHEMA}; rebuild or upgrade memexport")
    missing = [k for k in SIDECAR_KEYS if k not in record]
    if missing:
        raise ArtifactError(f"{side}: sidecar lacks {', '.join(missing)}; rebuild the engine")
    return record


def sidecar_metadata(record: dict[str, Any], plan: Path | str) -> ArtifactMetadata:
    return ArtifactMetadata.from_json(json.dumps(record["metadata"]), str(sidecar_path(plan)))


def check_plan_matches(plan: Path, record: dict[str, Any]) -> None:
    """Refuse a plan that is not the one its sidecar describes (replaced, truncated or tampered).

    Raises:
        ArtifactError: Size or sha256 differ.
    """
    expected = record["plan"]
    size = plan.stat().st_size
    if size != expected.get("bytes") or sha256_path(plan) != expected.get("sha256"):
        raise ArtifactError(
            f"{plan}: the plan ({size} bytes) is not the one its sidecar describes ({expected.get('bytes')} bytes, sha256 "
            f"{str(expected.get('sha256'))[:12]}...); the file was replaced or damaged: rebuild it with `memexport build`"
        )


def parse_compute_capability(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def check_engine_compatible(record: dict[str, Any], tensorrt_version: str, gpu_name: str, compute_capability: tuple[int, int],
                            plan: Path | str, allow_other_gpu_model: bool = False) -> None:
    """Refuse an engine built with another TensorRT version or for another GPU.

    Args:
        record: The sidecar.
        tensorrt_version: ``tensorrt.__version__`` here.
        gpu_name: This GPU's name.
        compute_capability: This GPU's ``(major, minor)``.
        plan: The plan path (for the message).
        allow_other_gpu_model: Accept another GPU model of the same compute capability
            (TensorRT allows it but may run slower; default ``False``).

    Raises:
        EngineMismatchError: With what was built for, what is here, and how to fix it.
    """
    built, here = str(record["tensorrt"]), str(tensorrt_version)
    try:
        same_trt = Version(built) == Version(here)
    except InvalidVersion:
        same_trt = built == here
    if not same_trt:
        raise EngineMismatchError(
            f"{plan}: built with TensorRT {built} but TensorRT {here} is installed; an engine only loads in the TensorRT "
            f"version that built it: rebuild it here with `memexport build` or install tensorrt=={built}"
        )
    gpu = record["gpu"]
    built_cc = parse_compute_capability(gpu["compute_capability"])
    built_sm, here_sm = f"sm_{built_cc[0]}{built_cc[1]}", f"sm_{compute_capability[0]}{compute_capability[1]}"
    if built_cc != tuple(compute_capability):
        raise EngineMismatchError(
            f"{plan}: built for {gpu['name']} ({built_sm}) but this GPU is {gpu_name} ({here_sm}); engines are tied to the GPU "
            "architecture: rebuild it on this GPU with `memexport build`"
        )
    if gpu["name"] != gpu_name and not allow_other_gpu_model:
        raise EngineMismatchError(
            f"{plan}: built for {gpu['name']} but this GPU is {gpu_name} (both {here_sm}); rebuild it on this GPU with "
            "`memexport build`, or pass allow_other_gpu_model=True to accept possibly slower kernels"
        )


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
        self.record: dict[str, Any] | None = None
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
        record = read_sidecar(self.path)
        meta = sidecar_metadata(record, self.path)
        info: dict[str, Any] = {
            "path": str(self.path),
            "model": meta.model,
            "precision": record["precision"],
            "precision_source": record.get("precision_source"),
            "backend": "tensorrt",
            "device": self.device,
            "tensorrt": record["tensorrt"],
            "gpu": record["gpu"],
            "profile": record["profile"],
            "device_memory_size": record["device_memory_size"],
            "workspace_bytes": record.get("workspace_bytes"),
            "onnx": record["onnx"],
            "calibration": record["calibration"],
            "build_options": record["build_options"],
            "vram_estimate": record.get("vram_estimate"),
            "preprocess": meta.preprocess.__dict__ | {"resize": list(meta.preprocess.resize)},
            "weights": dict(meta.weights),
            "versions": dict(meta.versions),
            "memexport_version": record["memexport_version"],
            "file_bytes": self.path.stat().st_size,
        }
        info.update({k: v for k, v in meta.extra.items() if k not in info})
        return info

    def activate(self) -> None:
        record = read_sidecar(self.path)
        meta = sidecar_metadata(record, self.path)
        if self.options.check_integrity:
            check_plan_matches(self.path, record)
        built = record["tensorrt"]
        trt = require("tensorrt", "tensorrt", f"{self.path}: running this engine", f"it needs tensorrt=={built} "
                      f"(`pip install 'tensorrt=={built}' cuda-python`), or run the ONNX artifact with ONNX Runtime")
        from memexport.runtime.cuda import load_cuda

        cuda = load_cuda()
        index = self.options.device_index
        if cuda.device_count() <= index:
            raise BackendUnavailableError(f"{self.path}: no CUDA GPU {index} here; TensorRT engines need the GPU they were built for ({record['gpu']['name']})")
        props = cuda.device_properties(index)
        # Refuse before deserialising: TensorRT's own error for a foreign plan is opaque.
        check_engine_compatible(record, trt.__version__, props.name, props.compute_capability, self.path, self.backend_options.allow_other_gpu_model)
        cuda.set_device(index)
        max_shape = [int(d) for d in record["profile"]["max"]]
        estimate = budget.estimate_engine_load(
            int(record["plan"]["bytes"]), int(record["device_memory_size"]), 4 * max_shape[0] * (int(np.prod(max_shape[1:])) + 1),
            record["precision"], max_shape[0], self.options.vram_budget_bytes,
        )
        free_before, _ = cuda.mem_get_info()
        budget.require_engine_fits(str(self.path), estimate, free_before)
        self._cuda = cuda
        try:
            self._load(trt, meta)
        except BaseException:
            self.deactivate()
            raise
        free_after, _ = cuda.mem_get_info()
        self.vram_estimate = estimate
        self.vram_measured = budget.vram_delta(free_before, free_after)
        self.record = record
        self.metadata = meta

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
                raise UsageError(f"{self.path}: batch {n} is outside the engine's profile {self.record['profile'] if self.record else ''}")
            if not self._context.execute_async_v3(self._stream):
                raise ArtifactError(f"{self.path}: TensorRT failed to run the engine (see its messages above)")
            self._cuda.memcpy_async(self._host[out_name], self._device[out_name], out_count * 4, MEMCPY_DEVICE_TO_HOST, self._stream)
            self._cuda.stream_synchronize(self._stream)
            return self._host_arrays[out_name][:out_count].reshape(n, self._output_elements)[:, 0].copy()
