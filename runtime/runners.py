"""Runners: one ``infer`` contract over ONNX Runtime, TensorRT and the torch reference.

A runner is a context manager. Entering it loads the artifact, checks its inputs against
the metadata and checks the memory budget; ``infer`` then maps a float32 NCHW batch to a
float32 vector of scores, one per image. Runners never preprocess: :class:`Predictor` does.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from memexport.errors import ArtifactError, BackendUnavailableError, UsageError
from memexport.runtime.metadata import ArtifactMetadata, metadata_from_map


class Runner(abc.ABC):
    """Base class: subclasses implement :meth:`activate`, :meth:`deactivate` and :meth:`_infer`.

    Attributes:
        backend: Short back-end name used by ``bench`` records (``onnxruntime``, ``tensorrt``, ``torch``).
        metadata: The artifact's metadata, available once active.
    """

    backend: str = "runner"

    def __init__(self) -> None:
        self.metadata: ArtifactMetadata | None = None
        self._active = False

    @property
    def precision(self) -> str:
        return self.metadata.precision if self.metadata else "unknown"

    @property
    def max_batch(self) -> int | None:
        """Largest batch one ``infer`` call accepts, or ``None`` when unbounded."""
        return None

    def __enter__(self) -> "Runner":
        self.activate()
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._active = False
        self.deactivate()

    @abc.abstractmethod
    def activate(self) -> None:
        """Load the artifact, read its metadata, check inputs and budget."""

    def deactivate(self) -> None:
        """Release the artifact (default: nothing to release)."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Score a preprocessed batch.

        Args:
            batch: float32 array of shape ``(N, *input_shape)``, N >= 1.

        Returns:
            float32 array of shape ``(N,)``.

        Raises:
            UsageError: Inactive runner, or a batch of the wrong dtype or shape.
        """
        if not self._active or self.metadata is None:
            raise UsageError(f"{type(self).__name__} is not active; use it as `with runner: runner.infer(batch)`")
        expected = tuple(self.metadata.input_shape)
        if not isinstance(batch, np.ndarray) or batch.dtype != np.float32 or batch.ndim != 1 + len(expected) or tuple(batch.shape[1:]) != expected or batch.shape[0] < 1:
            seen = f"{batch.dtype} {tuple(batch.shape)}" if isinstance(batch, np.ndarray) else type(batch).__name__
            raise UsageError(f"{self.backend} runner: expected a float32 batch of shape (N, {', '.join(map(str, expected))}), got {seen}")
        limit = self.max_batch
        if limit is None or batch.shape[0] <= limit:
            return self._infer(np.ascontiguousarray(batch)).reshape(-1).astype(np.float32, copy=False)
        # Batches beyond the engine's profile are split rather than refused.
        parts = [self._infer(np.ascontiguousarray(batch[i : i + limit])).reshape(-1) for i in range(0, batch.shape[0], limit)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    @abc.abstractmethod
    def _infer(self, batch: np.ndarray) -> np.ndarray:
        """Back-end inference on a validated batch within ``max_batch``."""


@dataclass(frozen=True)
class OrtOptions:
    """ONNX Runtime runner options.

    Attributes:
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (default ``"auto"``: CUDA when onnxruntime-gpu
            can use it, else CPU).
        tensorrt_ep: Prefer ONNX Runtime's TensorRT execution provider when present (default ``False``).
        intra_op_threads: Threads per operator; 0 lets ONNX Runtime use every core (default 0).
        vram_budget_bytes: GPU memory budget checked before a CUDA session starts, against the
            weights and CUDA context (default 11 GiB).
        check_integrity: Verify the sha256 recorded at export before loading (default ``True``;
            about 1 s per 500 MB, once per file per process; see ``runtime.integrity``).
    """

    device: str = "auto"
    tensorrt_ep: bool = False
    intra_op_threads: int = 0
    vram_budget_bytes: int = 11 * 1024**3
    check_integrity: bool = True


def check_external_data_location(model_path: Path, locations: Sequence[str]) -> None:
    """Refuse external-data references that leave the model's folder.

    Raises:
        ArtifactError: For an absolute path, a ``..`` escape or a symlink out of the folder.
    """
    folder = model_path.resolve().parent
    for location in locations:
        candidate = Path(location)
        target = (folder / candidate).resolve()
        if candidate.is_absolute() or (folder != target and folder not in target.parents):
            raise ArtifactError(
                f"{model_path}: external data {location!r} points outside the model's folder {folder}; "
                "refusing to read it. Keep the .onnx and its data file side by side (re-export or move them together)"
            )


def external_data_locations(model_path: Path) -> list[str]:
    """Locations of every external-data tensor in an ONNX file (needs the ``onnx`` package).

    Returns an empty list where ``onnx`` is not installed; ONNX Runtime then applies its own
    checks (it also refuses paths that escape the model folder).
    """
    try:
        import onnx
        from onnx.external_data_helper import _get_all_tensors
    except ImportError:
        return []
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt artifact
        raise ArtifactError(f"{model_path}: not a readable ONNX file ({type(exc).__name__}); re-export it") from None
    locations = []
    for tensor in _get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.append(entry.value)
    return sorted(set(locations))


def tensorrt_ep_options(model_path: Path | None) -> dict[str, Any]:
    """Options for ONNX Runtime's TensorRT execution provider.

    Engines and timing caches are cached (they take minutes to build). A Q/DQ ONNX
    (``*.int8-qdq.onnx``) runs with ``trt_int8_enable``; an FP32 ONNX with a TensorRT
    calibration table ``<stem>.calib.cache`` beside it (from ``memexport calibrate``) runs
    implicit INT8 from that table. ORT looks the table up inside ``trt_engine_cache_path``,
    so that path is then the model's folder.
    """
    from memexport.export.tensorrt import default_cache_dir

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


def ort_providers(options: OrtOptions, model_path: Path | None = None) -> list[Any]:
    """Choose ONNX Runtime execution providers for ``options``.

    With onnxruntime-gpu: the CUDA EP (FP32 and FP16 ONNX) and, when ``options.tensorrt_ep``
    is set and available, the TensorRT EP first (see :func:`tensorrt_ep_options`).

    Raises:
        BackendUnavailableError: ``device="cuda"`` without a CUDA-capable onnxruntime-gpu.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if options.device == "cpu":
        return ["CPUExecutionProvider"]
    providers: list[Any] = []
    if options.tensorrt_ep and "TensorrtExecutionProvider" in available:
        providers.append(("TensorrtExecutionProvider", tensorrt_ep_options(model_path)))
    if "CUDAExecutionProvider" in available:
        # HEURISTIC skips cuDNN's exhaustive search, which allocates large scratch buffers
        # that would break the VRAM budget on an 11 GB card.
        providers.append(("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
    elif options.device == "cuda":
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
        options: Runner options (default :class:`OrtOptions`).
    """

    backend = "onnxruntime"

    def __init__(self, path: Path | str, options: OrtOptions = OrtOptions()) -> None:
        super().__init__()
        self.path = Path(path)
        self.options = options
        self.session: Any = None
        self._lock = threading.Lock()

    def activate(self) -> None:
        import onnxruntime as ort

        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: model file not found; export one with `memexport export resmem -o {self.path.name}`")
        if self.path.stat().st_size == 0:
            raise ArtifactError(f"{self.path}: model file is empty (0 bytes); re-export it")
        check_external_data_location(self.path, external_data_locations(self.path))
        if self.options.check_integrity:
            from memexport.runtime.integrity import check_onnx

            check_onnx(self.path)  # before ONNX Runtime parses a possibly tampered file
        providers = ort_providers(self.options, self.path)
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        if "CUDAExecutionProvider" in names or "TensorrtExecutionProvider" in names:
            from memexport.runtime import budget

            budget.check_onnx_fits(self.path, self.options.vram_budget_bytes)
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3
        if self.options.intra_op_threads:
            session_options.intra_op_num_threads = self.options.intra_op_threads
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=session_options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/InvalidProtobuf types
            first = " ".join(str(exc).split())[:200]
            raise ArtifactError(f"{self.path}: ONNX Runtime cannot load this model ({first}); re-export it or check that it is complete") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if self.options.check_integrity and "memexport" in props:
            from memexport.runtime.integrity import check_onnx

            check_onnx(self.path, parsed_value=props["memexport"])  # cached: cross-checks the JSON hashed
        self.metadata = metadata_from_map(props, self.path)
        inputs = {i.name: i for i in self.session.get_inputs()}
        meta = self.metadata
        if meta.input_name not in inputs:
            raise ArtifactError(f"{self.path}: metadata names input {meta.input_name!r} but the graph has {sorted(inputs)}; re-export it")
        shape = inputs[meta.input_name].shape
        if [d for d in shape[1:]] != list(meta.input_shape):
            raise ArtifactError(f"{self.path}: graph input shape {shape} does not match metadata (N, {meta.input_shape}); re-export it")

    def deactivate(self) -> None:
        self.session = None

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers()) if self.session is not None else []

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        assert self.metadata is not None
        return self.session.run([self.metadata.output_name], {self.metadata.input_name: batch})[0]


def runner_for(path: Path | str, device: str = "auto", **kwargs: Any) -> Runner:
    """Pick the runner for an artifact by its suffix: ``.onnx`` → ONNX Runtime, ``.plan``/``.engine`` → TensorRT.

    Args:
        path: Artifact path.
        device: For ONNX: ``cpu``, ``cuda`` or ``auto`` (default ``auto``).
        **kwargs: Passed to the runner's options.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".plan", ".engine", ".trt"):
        try:
            from memexport.runtime.tensorrt_runner import TensorRTRunner
        except ImportError as exc:  # pragma: no cover - depends on the TensorRT issue's module
            raise BackendUnavailableError(f"{path}: TensorRT runner unavailable ({exc})") from None
        return TensorRTRunner(path, **kwargs)
    if suffix == ".onnx":
        return OnnxRuntimeRunner(path, OrtOptions(device=device, **kwargs))
    raise UsageError(f"{path}: unknown artifact type {suffix or '(no suffix)'!r}; expected .onnx, .plan or .engine")
