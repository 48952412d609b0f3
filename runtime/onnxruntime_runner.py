"""The ONNX Runtime runner: the exact FP32 default, on CPU, CUDA or ONNX Runtime's TensorRT EP."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memexport.core.cachedir import default_cache_dir
from memexport.core.errors import ArtifactError, BackendUnavailableError
from memexport.runtime.base import Runner, RunnerOptions
from memexport.runtime.integrity import check_external_data_location, check_model_present, check_onnx, external_data_locations
from memexport.runtime.metadata import metadata_from_map

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass(frozen=True)
class OrtOptions:
    """What only the ONNX Runtime runner takes (device, threads, budget, integrity: :class:`RunnerOptions`).

    Attributes:
        tensorrt_ep: Prefer ONNX Runtime's TensorRT execution provider when present (default ``False``).
    """

    tensorrt_ep: bool = False


def tensorrt_ep_options(model_path: Path | None) -> dict[str, Any]:
    """Options for ONNX Runtime's TensorRT execution provider.

    Engines and timing caches are cached (they take minutes to build). A Q/DQ ONNX
    (``*.int8-qdq.onnx``) runs with ``trt_int8_enable``; an FP32 ONNX with a TensorRT
    calibration table ``<stem>.calib.cache`` beside it (from ``memexport calibrate``) runs
    implicit INT8 from that table. ORT looks the table up inside ``trt_engine_cache_path``,
    so that path is then the model's folder.
    """
    cache = str(default_cache_dir() / "ort-tensorrt")
    options: dict[str, Any] = {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache, "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}
    if model_path is None:
        return options
    table = model_path.with_name(f"{model_path.stem}.calib.cache")
    if model_path.name.endswith(".int8-qdq.onnx"):
        options["trt_int8_enable"] = True
    elif table.is_file():
        options.update(
            trt_int8_enable=True, trt_int8_calibration_table_name=table.name, trt_int8_use_native_calibration_table=True,
            trt_engine_cache_path=str(model_path.resolve().parent),
        )
    return options


def ort_providers(options: RunnerOptions, model_path: Path | None = None, ort_options: OrtOptions = OrtOptions()) -> list[Any]:
    """Choose ONNX Runtime execution providers.

    With onnxruntime-gpu: the CUDA EP (FP32 and FP16 ONNX) on ``cuda:N`` and, when
    ``ort_options.tensorrt_ep`` is set and available, the TensorRT EP first (see :func:`tensorrt_ep_options`).

    Raises:
        BackendUnavailableError: ``device="cuda"`` without a CUDA-capable onnxruntime-gpu.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if options.device_kind == "cpu":
        return ["CPUExecutionProvider"]
    index = options.device_index
    providers: list[Any] = []
    if ort_options.tensorrt_ep and "TensorrtExecutionProvider" in available:
        providers.append(("TensorrtExecutionProvider", {"device_id": index, **tensorrt_ep_options(model_path)}))
    if "CUDAExecutionProvider" in available:
        # HEURISTIC skips cuDNN's exhaustive search, which allocates large scratch buffers
        # that would break the VRAM budget on an 11 GB card.
        providers.append(("CUDAExecutionProvider", {"device_id": index, "cudnn_conv_algo_search": "HEURISTIC"}))
    elif options.device_kind == "cuda":
        raise BackendUnavailableError(
            f"ONNX Runtime has no CUDA execution provider (available: {', '.join(available)}); "
            "install onnxruntime-gpu (<=1.26 on Pascal GPUs) or use --device cpu"
        )
    return providers + ["CPUExecutionProvider"]


class OnnxRuntimeRunner(Runner):
    """Runs an exported ONNX artifact with ONNX Runtime (CPU, CUDA or TensorRT EP).

    ``infer`` is safe to call from several threads at once: ONNX Runtime sessions are
    thread-safe for ``run``.

    Args:
        path: The ``.onnx`` artifact.
        options: Shared runner options (default :class:`RunnerOptions`).
        backend_options: :class:`OrtOptions` (default ``None``: its defaults).
    """

    backend = "onnxruntime"
    options_class = OrtOptions

    def __init__(self, path: Path | str, options: RunnerOptions = RunnerOptions(), backend_options: OrtOptions | None = None) -> None:
        super().__init__(path, options, backend_options)
        self.session: Any = None
        self._lock = threading.Lock()

    def activate(self) -> None:
        import onnxruntime as ort

        self._check_file()
        providers = ort_providers(self.options, self.path, self.backend_options)
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        if any(n in GPU_PROVIDERS for n in names):
            from memexport.runtime import budget

            budget.check_onnx_fits(self.path, self.options.vram_budget_bytes)
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3
        if self.options.threads:
            # A runner sized to N CPUs (a Ray actor's num_cpus) must not take the host: ORT ignores
            # OMP_NUM_THREADS, and its inter-op pool (parallel execution mode only) stays at one.
            session_options.intra_op_num_threads = self.options.threads
            session_options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=session_options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/InvalidProtobuf types
            first = " ".join(str(exc).split())[:200]
            raise ArtifactError(f"{self.path}: ONNX Runtime cannot load this model ({first}); re-export it or check that it is complete") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if self.options.check_integrity and "memexport" in props:
            check_onnx(self.path, parsed_value=props["memexport"])  # cached: cross-checks the JSON hashed
        self.metadata = metadata_from_map(props, self.path)
        self._check_inputs()

    def _check_file(self) -> None:
        """Refuse a missing, empty, escaping or (with ``check_integrity``) tampered file before ONNX Runtime parses it."""
        check_model_present(self.path)
        check_external_data_location(self.path, external_data_locations(self.path))
        if self.options.check_integrity:
            check_onnx(self.path)

    def _check_inputs(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        meta = self.metadata
        assert meta is not None
        if meta.input_name not in inputs:
            raise ArtifactError(f"{self.path}: metadata names input {meta.input_name!r} but the graph has {sorted(inputs)}; re-export it")
        shape = inputs[meta.input_name].shape
        if [d for d in shape[1:]] != list(meta.input_shape):
            raise ArtifactError(f"{self.path}: graph input shape {shape} does not match metadata (N, {meta.input_shape}); re-export it")

    def deactivate(self) -> None:
        self.session = None

    @property
    def providers(self) -> list[str]:
        """The execution providers of the active session (empty before activation)."""
        return list(self.session.get_providers()) if self.session is not None else []

    @property
    def device(self) -> str:
        if self.session is None:
            return self.options.device
        on_gpu = any(p in GPU_PROVIDERS for p in self.providers)
        return f"cuda:{self.options.device_index}" if on_gpu else "cpu"

    def memory_bytes(self) -> int | None:
        """The weights the session holds (the ONNX file and its external data), on CPU or GPU."""
        if self.session is None:
            return None
        from memexport.runtime.budget import onnx_weight_bytes

        return onnx_weight_bytes(self.path)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"providers": self.providers}

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        assert self.metadata is not None
        return self.session.run([self.metadata.output_name], {self.metadata.input_name: batch})[0]
