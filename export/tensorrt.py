"""``engine_from_onnx``: build a TensorRT engine (plan + JSON sidecar) from an exported ONNX model.

One code base serves TensorRT 8.6 (the last release for Pascal, e.g. the GTX 1080 Ti) and
TensorRT 10.x/11.x. Only the name-based tensor API is used. What differs by version is
decided in :func:`trt_features` from ``tensorrt.__version__`` (parsed with ``packaging``):

* 8.6: explicit batch must be requested with ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``;
  ``ICudaEngine.device_memory_size``.
* 10.x: explicit batch is the only mode (the flag is ignored); ``device_memory_size_v2``.
* 11.x: strong typing only. ``BuilderFlag.FP16``/``INT8`` and INT8 calibrators are gone, so
  precision comes from the ONNX itself: an FP16 ONNX (``memexport convert --fp16``) or a
  Q/DQ ONNX (``memexport calibrate``).

On 8.6 and 10 the builder flags work too, and INT8 can come from a TensorRT calibration
cache, read by a calibrator that only replays the cache (it never sees images).

``tensorrt`` is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from packaging.version import Version

from memexport import __version__
from memexport.errors import ArtifactError, BackendUnavailableError, CalibrationError, UsageError
from memexport.gpu import GpuInfo, list_gpus, precision_advice, require_tensorrt_supports, tensorrt_install_hint
from memexport.runtime import budget
from memexport.runtime.metadata import ArtifactMetadata
from memexport.runtime.tensorrt_runner import SIDECAR_FORMAT, SIDECAR_SCHEMA, sidecar_path, sha256_bytes, sha256_path
from memexport.spec import PRECISIONS

# Every TensorRT attribute this package uses (module attributes, enum members and methods
# of TensorRT objects), in one place. tests/export/test_tensorrt.py checks each name against
# the Python bindings of TensorRT 8.6.1 and the newest 10.x, and checks that this list is
# complete by scanning export/tensorrt.py and runtime/tensorrt_runner.py.
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
CALIBRATION_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")
CALIBRATORS = {"EntropyCalibration2": "IInt8EntropyCalibrator2", "MinMaxCalibration": "IInt8MinMaxCalibrator"}


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
        raise BackendUnavailableError(f"TensorRT {v} is too old; memexport needs TensorRT 8.6 or newer ({tensorrt_install_hint(None)})")
    return TrtFeatures(
        version=v,
        explicit_batch_flag=v.major < 10,
        precision_flags=v.major < 11,
        implicit_int8=v.major < 11,
        device_memory_attr="device_memory_size" if v.major < 10 else "device_memory_size_v2",
        max_opset=TRT86_MAX_OPSET if v.major < 10 else None,
    )


def default_cache_dir() -> Path:
    """``$MEMEXPORT_CACHE_DIR``, else ``$XDG_CACHE_HOME/memexport``, else ``~/.cache/memexport``."""
    if os.environ.get("MEMEXPORT_CACHE_DIR"):
        return Path(os.environ["MEMEXPORT_CACHE_DIR"])
    root = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return root / "memexport"


@dataclass(frozen=True)
class BuildOptions:
    """How to build an engine.

    Attributes:
        precision: ``fp32``, ``fp16`` or ``int8`` (default ``fp16``, the design card's example).
        min_batch: Smallest batch of the optimisation profile (default 1).
        opt_batch: Batch TensorRT tunes kernels for (default 8).
        max_batch: Largest batch of the profile (default 32); the runner splits larger batches.
        vram_budget_bytes: VRAM budget (default 11 GiB, a GTX 1080 Ti); the workspace limit is
            derived from it and the build is refused when the estimate exceeds it.
        workspace_bytes: Builder workspace limit (default ``None``: derived from the budget).
        calibration_cache: TensorRT calibration cache for implicit INT8 on 8.6/10 (default ``None``).
        calibration_images: Folder to calibrate from on the way (``--calib DIR``; default ``None``).
        timing_cache: Timing cache file, read before and written after each build (default
            ``None``: ``<cache_dir>/tensorrt/timing-<TensorRT version>-<sm>.cache``).
        cache_dir: Where exported ONNX files and timing caches are kept (default ``None``:
            :func:`default_cache_dir`).
        device: CUDA device ordinal to build on (default 0).
    """

    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    vram_budget_bytes: int = budget.DEFAULT_BUDGET_BYTES
    workspace_bytes: int | None = None
    calibration_cache: Path | None = None
    calibration_images: Path | None = None
    timing_cache: Path | None = None
    cache_dir: Path | None = None
    device: int = 0

    def validate(self) -> "BuildOptions":
        """Check the options without TensorRT; return ``self``.

        Raises:
            UsageError: Unknown precision, an unordered profile, or calibration for non-INT8.
        """
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UsageError(
                f"the profile needs 1 <= --min-batch <= --opt-batch <= --max-batch, got {self.min_batch}, {self.opt_batch}, {self.max_batch}"
            )
        if self.precision != "int8" and (self.calibration_cache or self.calibration_images):
            raise UsageError(f"--calib/--calib-cache apply to --int8 only, not --{self.precision}")
        if self.calibration_cache and self.calibration_images:
            raise UsageError("pass either --calib DIR (calibrate now) or --calib-cache FILE (reuse a cache), not both")
        if self.calibration_cache is not None and not Path(self.calibration_cache).is_file():
            raise UsageError(f"{self.calibration_cache}: calibration cache not found; make one with `memexport calibrate`")
        if self.calibration_images is not None and not Path(self.calibration_images).is_dir():
            raise UsageError(f"{self.calibration_images}: calibration image folder not found")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise UsageError(f"workspace must be positive, got {self.workspace_bytes}")
        return self

    def as_record(self) -> dict[str, Any]:
        """JSON-friendly copy for the sidecar (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class OnnxInfo:
    """What the builder needs to know about an ONNX model before TensorRT sees it.

    Attributes:
        path: The file.
        sha256: Its sha256 (external data not included).
        metadata: The embedded memexport metadata.
        opset: Default-domain opset.
        has_qdq: The graph holds QuantizeLinear/DequantizeLinear (explicit INT8).
        is_fp16: Metadata precision ``fp16`` or FP16 weights (an FP16 ONNX).
        parameters: Weight elements (initializers).
        activation_elements: Peak live activation elements per image.
    """

    path: Path
    sha256: str
    metadata: ArtifactMetadata
    opset: int
    has_qdq: bool
    is_fp16: bool
    parameters: int
    activation_elements: int


def onnx_info(path: Path | str) -> OnnxInfo:
    """Read metadata, opset, precision markers, parameter count and activation size of an ONNX file.

    Raises:
        BackendUnavailableError: ``onnx`` is not installed. ArtifactError: unreadable file or no metadata.
    """
    try:
        import onnx
    except ImportError:
        raise BackendUnavailableError("building engines reads the ONNX graph with the onnx package; `pip install onnx`") from None
    from memexport.runtime.metadata import metadata_from_map

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: ONNX file not found; export one with `memexport export resmem -o {path.name}`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt artifact
        raise ArtifactError(f"{path}: not a readable ONNX file ({type(exc).__name__}); re-export it") from None
    metadata = metadata_from_map({p.key: p.value for p in proto.metadata_props}, path)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    ops = {n.op_type for n in proto.graph.node}
    fp16_weights = any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    profile = budget.activation_profile(proto)
    return OnnxInfo(
        path=path, sha256=sha256_path(path), metadata=metadata, opset=opset,
        has_qdq=bool(ops & {"QuantizeLinear", "DequantizeLinear"}),
        is_fp16=metadata.precision == "fp16" or fp16_weights,
        parameters=int(metadata.extra.get("parameters") or budget.onnx_parameter_count(proto)),
        activation_elements=profile.peak_elements,
    )


@dataclass(frozen=True)
class PrecisionPlan:
    """How the requested precision is reached with this TensorRT and this ONNX.

    Attributes:
        precision: ``fp32``, ``fp16`` or ``int8``.
        source: ``fp32``, ``builder-flag``, ``fp16-onnx``, ``qdq-onnx`` or ``calibration-cache``.
        flags: ``BuilderFlag`` member names to set.
        calibration_cache: Cache replayed by the calibrator (implicit INT8 only).
    """

    precision: str
    source: str
    flags: tuple[str, ...] = ()
    calibration_cache: Path | None = None


def precision_plan(features: TrtFeatures, options: BuildOptions, info: OnnxInfo) -> PrecisionPlan:
    """Map the requested precision onto builder flags, a calibration cache or the ONNX's own types.

    Raises:
        UsageError: A combination this TensorRT or this ONNX cannot do, with the way out.
    """
    name = info.path.name
    if options.precision == "fp32":
        if info.has_qdq or info.is_fp16:
            kind = "an INT8 Q/DQ" if info.has_qdq else "an FP16"
            raise UsageError(f"{name} is {kind} ONNX; build it with --{'int8' if info.has_qdq else 'fp16'}, or pass the FP32 ONNX for --fp32")
        return PrecisionPlan("fp32", "fp32")
    if options.precision == "fp16":
        if info.has_qdq:
            raise UsageError(f"{name} is an INT8 Q/DQ ONNX; build it with --int8")
        if info.is_fp16:
            return PrecisionPlan("fp16", "fp16-onnx", ("FP16",) if features.precision_flags else ())
        if not features.precision_flags:
            raise UsageError(
                f"TensorRT {features.version} takes precision from the ONNX only (no FP16 builder flag); convert first with "
                f"`memexport convert --fp16 {name} -o {Path(name).stem}.fp16.onnx` and build that, or use TensorRT 8.6/10"
            )
        return PrecisionPlan("fp16", "builder-flag", ("FP16",))
    # int8
    if info.has_qdq:
        if options.calibration_cache:
            raise UsageError(f"{name} is a Q/DQ ONNX (explicit INT8); it takes no calibration cache: drop --calib-cache")
        return PrecisionPlan("int8", "qdq-onnx", ("INT8",) if features.precision_flags else ())
    if options.calibration_cache is None:
        raise UsageError(
            f"--int8 needs --calib-cache FILE, --calib DIR, or a Q/DQ ONNX from `memexport calibrate` (got the plain {name})"
        )
    if not features.implicit_int8:
        raise UsageError(
            f"TensorRT {features.version} has no implicit INT8 calibration; build the Q/DQ ONNX (<stem>.int8-qdq.onnx from "
            "`memexport calibrate`) instead of --calib-cache"
        )
    return PrecisionPlan("int8", "calibration-cache", ("INT8",), Path(options.calibration_cache))


def calibration_algorithm(data: bytes, path: Path) -> str:
    """The calibrator class a cache was written by, from its header ``TRT-<version>-<Algorithm>``.

    Raises:
        CalibrationError: An unreadable or unsupported header.
    """
    first = data.split(b"\n", 1)[0].decode("ascii", "replace").strip()
    match = CALIBRATION_HEADER.match(first)
    if not match or match.group(2) not in CALIBRATORS:
        raise CalibrationError(
            f"{path}: first line {first[:60]!r} is not a TensorRT calibration header; expected TRT-<version>-EntropyCalibration2 "
            "or TRT-<version>-MinMaxCalibration (make one with `memexport calibrate`)"
        )
    return CALIBRATORS[match.group(2)]


def cache_only_calibrator(trt: Any, cache: bytes, path: Path) -> Any:
    """An INT8 calibrator that only replays ``cache``: it has no images, so a cache missing
    tensors fails the build instead of calibrating on nothing."""
    base = getattr(trt, calibration_algorithm(cache, path))

    class CacheOnlyCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.cache = cache

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            return None

        def read_calibration_cache(self) -> bytes:
            return self.cache

        def write_calibration_cache(self, data: Any) -> None:
            return None

    return CacheOnlyCalibrator()


def import_tensorrt(device: int = 0) -> Any:
    """``import tensorrt``, or a one-line error saying how to install it for this GPU.

    Raises:
        BackendUnavailableError: TensorRT missing or broken (TensorRT 8.6 named for Pascal).
    """
    try:
        import tensorrt
    except ImportError as exc:
        gpus = list_gpus()
        gpu = next((g for g in gpus if g.index == device), None)
        seen = f"{gpu.name} ({gpu.sm})" if gpu else "no CUDA GPU seen"
        detail = "" if getattr(exc, "name", None) == "tensorrt" else f" ({exc})"
        raise BackendUnavailableError(
            f"TensorRT is not installed{detail}; {seen}: {tensorrt_install_hint(gpu.compute_capability if gpu else None)}"
        ) from None
    return tensorrt


def select_gpu(device: int = 0) -> GpuInfo:
    """The build GPU.

    Raises:
        BackendUnavailableError: No CUDA GPU with that ordinal.
    """
    gpus = list_gpus()
    for gpu in gpus:
        if gpu.index == device:
            return gpu
    seen = ", ".join(f"{g.index}: {g.name}" for g in gpus) or "none"
    raise BackendUnavailableError(f"building an engine needs CUDA GPU {device}; visible GPUs: {seen}. Engines are built on the GPU they run on")


def enum_member(trt: Any, enum: str, member: str) -> Any:
    return getattr(getattr(trt, enum), member)


def network_flags(trt: Any, features: TrtFeatures) -> int:
    """``create_network`` flags: EXPLICIT_BATCH on 8.x; 0 on 10+ (explicit batch, and on 11 strong typing, are the only modes)."""
    if features.explicit_batch_flag:
        return 1 << int(enum_member(trt, "NetworkDefinitionCreationFlag", "EXPLICIT_BATCH"))
    return 0


def parse_onnx(trt: Any, network: Any, logger: Any, path: Path) -> Any:
    """Parse ``path`` into ``network``; parser errors become one :class:`ArtifactError`."""
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data beside the model (ONNX over 2 GB).
    if not parser.parse_from_file(str(path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise ArtifactError(f"{path}: TensorRT's ONNX parser failed: {'; '.join(errors[:3]) or 'no detail'}; check the opset and re-export")
    return parser


def configure_builder(
    trt: Any, builder: Any, network: Any, options: BuildOptions, plan: PrecisionPlan, workspace: int, input_name: str,
    input_shape: tuple[int, ...], timing_cache: bytes | None, features: TrtFeatures,
) -> Any:
    """Create the builder config: workspace limit, precision flags, profile, calibrator, timing cache."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    for flag in plan.flags:
        config.set_flag(enum_member(trt, "BuilderFlag", flag))
    profile = builder.create_optimization_profile()
    shapes = [(b, *input_shape) for b in (options.min_batch, options.opt_batch, options.max_batch)]
    profile.set_shape(input_name, *shapes)
    config.add_optimization_profile(profile)
    if plan.calibration_cache is not None and features.implicit_int8:
        config.int8_calibrator = cache_only_calibrator(trt, Path(plan.calibration_cache).read_bytes(), Path(plan.calibration_cache))
        config.set_calibration_profile(profile)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, False)
    return config


def timing_cache_file(options: BuildOptions, features: TrtFeatures, gpu: GpuInfo) -> Path:
    """The timing cache path; by default one per TensorRT version and GPU architecture (they are not portable)."""
    if options.timing_cache is not None:
        return Path(options.timing_cache)
    return (options.cache_dir or default_cache_dir()) / "tensorrt" / f"timing-{features.version}-{gpu.sm}.cache"


def engine_device_memory(trt: Any, features: TrtFeatures, logger: Any, plan_bytes: bytes) -> int:
    """Execution memory the engine needs at its profile's maximum, read back from the built plan."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise ArtifactError("TensorRT built a plan it cannot deserialise; see TensorRT's messages above")
    return int(getattr(engine, features.device_memory_attr))


def cuda_runtime_version() -> str | None:
    from memexport.errors import CudaError
    from memexport.runtime.cuda import load_cuda

    try:
        return load_cuda().runtime_version()
    except (BackendUnavailableError, CudaError):
        return None


@dataclass(frozen=True)
class BuildResult:
    """What :func:`engine_from_onnx` wrote.

    Attributes:
        engine: The plan file.
        sidecar: Its JSON sidecar.
        record: The sidecar's content.
        notes: Advice worth printing (e.g. FP16 on Pascal).
    """

    engine: Path
    sidecar: Path
    record: dict[str, Any]
    notes: tuple[str, ...] = field(default_factory=tuple)


def engine_from_onnx(onnx_path: Path | str, output: Path | str, options: BuildOptions = BuildOptions()) -> BuildResult:
    """Build a TensorRT engine from an exported ONNX model; write the plan and its sidecar atomically.

    Args:
        onnx_path: FP32 ONNX (or FP16 / Q/DQ ONNX) with memexport metadata.
        output: Destination plan (``.plan`` or ``.engine``); the sidecar is ``<output>.json``.
        options: See :class:`BuildOptions` (default: FP16, profile 1/8/32, 11 GiB budget).

    Returns:
        :class:`BuildResult`.

    Raises:
        BackendUnavailableError: No TensorRT or GPU, or TensorRT >= 10 on Pascal (names 8.6).
        UsageError: Options this TensorRT or ONNX cannot honour. BudgetError: Over the VRAM budget
            (names the largest batch that fits). ArtifactError: Unreadable ONNX or failed build.
    """
    options.validate()
    output = Path(output)
    if output.suffix.lower() not in (".plan", ".engine", ".trt"):
        raise UsageError(f"{output}: engine files end in .plan or .engine (the runtime picks the TensorRT runner by suffix)")
    trt = import_tensorrt(options.device)
    features = trt_features(trt.__version__)
    gpu = select_gpu(options.device)
    require_tensorrt_supports(gpu, features.version)
    info = onnx_info(onnx_path)
    if features.max_opset is not None and info.opset > features.max_opset:
        raise UsageError(
            f"{info.path}: opset {info.opset} but TensorRT {features.version}'s parser reads opset <= {features.max_opset}; re-export with --opset 17"
        )
    plan = precision_plan(features, options, info)
    notes = []
    if plan.precision == "fp16" and gpu.compute_capability[0] == 6:
        notes.append(precision_advice(gpu.compute_capability))
    meta = info.metadata
    input_shape = tuple(meta.input_shape)
    workspace = options.workspace_bytes or budget.workspace_for_budget(
        info.parameters, plan.precision, options.max_batch, info.activation_elements, options.vram_budget_bytes
    )
    estimate = budget.require_fits(
        str(info.path), info.parameters, plan.precision, options.max_batch, info.activation_elements, options.vram_budget_bytes, workspace
    )
    timing_path = timing_cache_file(options, features, gpu)
    timing = timing_path.read_bytes() if timing_path.is_file() else None

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, features))
    parser = parse_onnx(trt, network, logger, info.path)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    if [t.name for t in inputs] != [meta.input_name]:
        raise ArtifactError(f"{info.path}: TensorRT sees inputs {[t.name for t in inputs]}, metadata names {meta.input_name!r}; re-export it")
    config = configure_builder(trt, builder, network, options, plan, workspace, meta.input_name, input_shape, timing, features)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"{info.path}: TensorRT could not build the {plan.precision} engine (see TensorRT's messages above)")
    plan_bytes = bytes(memoryview(serialized))
    del parser
    from memexport.atomic import write_bytes_atomic, write_text_atomic

    write_bytes_atomic(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
    device_memory = engine_device_memory(trt, features, logger, plan_bytes)
    calibration = None
    if plan.calibration_cache is not None:
        calibration = {"file": str(plan.calibration_cache), "sha256": sha256_path(Path(plan.calibration_cache))}
    elif plan.source == "qdq-onnx":
        calibration = {"file": None, "sha256": None, "note": "explicit Q/DQ scales inside the ONNX", **dict(meta.extra.get("calibration", {}) or {})}
    metadata = replace(meta, precision=plan.precision, versions={**meta.versions, "tensorrt": str(features.version)})
    load_estimate = budget.estimate_engine_load(len(plan_bytes), device_memory, io_bytes(input_shape, options.max_batch), plan.precision, options.max_batch, options.vram_budget_bytes)
    record = {
        "format": SIDECAR_FORMAT,
        "schema": SIDECAR_SCHEMA,
        "plan": {"file": output.name, "bytes": len(plan_bytes), "sha256": sha256_bytes(plan_bytes)},
        "tensorrt": str(features.version),
        "cuda_runtime": cuda_runtime_version(),
        "gpu": {"name": gpu.name, "compute_capability": f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}", "total_memory": gpu.total_memory},
        "precision": plan.precision,
        "precision_source": plan.source,
        "profile": {
            "input": meta.input_name,
            "min": [options.min_batch, *input_shape], "opt": [options.opt_batch, *input_shape], "max": [options.max_batch, *input_shape],
        },
        "onnx": {"file": str(info.path), "sha256": info.sha256, "opset": info.opset},
        "calibration": calibration,
        "build_options": options.as_record(),
        "workspace_bytes": workspace,
        "device_memory_size": device_memory,
        "vram_estimate": {"build": estimate.as_dict(), "load": load_estimate.as_dict()},
        "memexport_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # The artifact metadata, so the runtime needs nothing but the plan and this file.
        "metadata": json.loads(metadata.to_json()),
    }
    # Plan first, sidecar last: a crash in between leaves a plan the runner refuses (no
    # sidecar, or a sidecar whose sha256 names another plan), never a silent mismatch.
    write_bytes_atomic(output, plan_bytes)
    write_text_atomic(sidecar_path(output), json.dumps(record, indent=2, sort_keys=True))
    return BuildResult(output, sidecar_path(output), record, tuple(notes))


def io_bytes(input_shape: tuple[int, ...], max_batch: int, output_elements: int = 1) -> int:
    """Device bytes of the runner's FP32 input and output buffers at ``max_batch``."""
    elements = 1
    for d in input_shape:
        elements *= d
    return 4 * max_batch * (elements + output_elements)


def onnx_cache_key(model: str, weights_record: dict[str, Any], opset: int) -> str:
    """Hash of everything that determines an export: model, weights (by sha256), opset, memexport version."""
    payload = json.dumps({"model": model, "weights": weights_record, "opset": opset, "memexport": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def onnx_for_model(name: str, cache_dir: Path | None = None, weights: Path | None = None, opset: int = 17,
                   warn: Callable[[str], None] = print) -> Path:
    """Export model ``name`` once and reuse the ONNX from the cache while its inputs are unchanged.

    The file is ``<cache_dir>/onnx/<name>-<hash>.onnx``; the hash covers the model name, the
    weights' sha256, the opset and the memexport version.
    """
    from memexport.export import export_model, require_export_deps
    from memexport.export.weights import resolve
    from memexport.spec import get_spec

    get_spec(name)
    require_export_deps()
    source = resolve(weights)
    key = onnx_cache_key(name, source.describe(), opset)
    path = (cache_dir or default_cache_dir()) / "onnx" / f"{name}-{key}.onnx"
    if not path.is_file():
        warn(f"exporting {name} to {path}")
        export_model(name, path, weights=weights, opset=opset, warn=warn)
    return path


def calibration_cache_for(onnx_path: Path, images: Path, workdir: Path) -> Path:
    """Calibrate on the way (``--calib DIR``) with the calibration module, returning the cache path.

    Raises:
        BackendUnavailableError: The calibration module (``memexport.calibration``) lacks
            ``calibrate``.
    """
    try:
        from memexport.calibration import CalibrationOptions, calibrate  # type: ignore[attr-defined]
    except ImportError:
        raise BackendUnavailableError(
            "--calib DIR needs memexport.calibration.calibrate, which this install lacks; "
            "run `memexport calibrate` and pass --calib-cache FILE instead"
        ) from None
    result = calibrate(onnx_path, images, workdir, CalibrationOptions(outputs=("cache",)))
    cache = Path(getattr(result, "cache", result) or workdir / f"{onnx_path.stem}.calib.cache")
    if not cache.is_file():
        raise CalibrationError(f"calibration of {onnx_path} from {images} wrote no cache at {cache}")
    return cache


def build(model_or_onnx: str | Path, output: Path | str, options: BuildOptions = BuildOptions(),
          warn: Callable[[str], None] = print) -> BuildResult:
    """The CLI's ``build``: a model name (exported and cached first) or an ONNX file in, an engine out.

    TensorRT is checked first, so a machine without it fails in a second, not after an export.
    """
    options.validate()
    import_tensorrt(options.device)
    source = Path(model_or_onnx)
    if source.suffix.lower() == ".onnx" or source.exists():
        onnx_path = source
    else:
        onnx_path = onnx_for_model(str(model_or_onnx), options.cache_dir, warn=warn)
    if options.calibration_images is not None:
        workdir = (options.cache_dir or default_cache_dir()) / "calibration" / sha256_path(onnx_path)[:16]
        cache = calibration_cache_for(onnx_path, Path(options.calibration_images), workdir)
        options = replace(options, calibration_cache=cache, calibration_images=None)
    return engine_from_onnx(onnx_path, output, options)
